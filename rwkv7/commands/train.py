"""`rwkv7 train --recipe NAME [--set section.key=value]... [--out DIR]`: train, then check the loss trajectory."""
from __future__ import annotations

import os
from pathlib import Path

from rwkv7.cliargs import overrides, recipe_parser


def register(sub) -> None:
    p = recipe_parser(sub, "train", "train a recipe and check its loss trajectory",
                      "Train a recipe. Re-running with the same --out resumes from the newest checkpoint. Exit: 0 ok, "
                      "1 loss check failed, 2 bad input, 3 diverged, 130 stopped by a signal (resumable).",
                      "run folder [out/<recipe>]")
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints in --out (start over)")
    p.add_argument("--force-resume", action="store_true", help="resume even though the recipe changed")
    p.add_argument("--load-model", metavar="PTH", help="start from these weights (fresh optimizer and schedule)")
    p.add_argument("--no-check", action="store_true", help="skip the loss-trajectory check at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--wandb", metavar="PROJECT", help="log every step to this wandb project (off by default; "
                   "WANDB_MODE and WANDB_API_KEY are read from the environment)")
    p.set_defaults(func=run)


def run(args) -> int:
    from rwkv7.errors import UserError
    from rwkv7.recipe import load_recipe

    recipe = load_recipe(args.recipe, overrides(args))
    out = Path(args.out or Path("out") / recipe.name)
    expected = recipe.expected_log()
    if not args.no_check and expected is not None and not expected.is_file():
        raise UserError(f"check.expected {expected} not found: fix the path, set check.expected= (empty) for no "
                        "check, or pass --no-check")
    from contextlib import nullcontext

    from rwkv7 import runlock
    from rwkv7.train.run import RunOptions, launched_as_rank_zero, run_training

    options = RunOptions(resume=not args.fresh, force_resume=args.force_resume, load_model=args.load_model,
                         progress=not args.no_progress, check=not args.no_check, wandb_project=args.wandb,
                         **options_from_env(os.environ))
    with runlock.hold(out) if launched_as_rank_zero() else nullcontext():  # ranks > 0 run under rank 0's lock
        if args.fresh:
            clear_run(out, keep=args.load_model)
        return run_training(recipe, out, options)


def options_from_env(environ) -> dict:
    """The run's environment switches, read here once: RWKV7_PROFILE_STEP=N (profile steps N..N+2 into
    profile.txt) and RWKV7_TEST_FAULT (fault injection for the reliability tests, rwkv7/testhooks.py)."""
    from rwkv7.errors import UserError
    from rwkv7.testhooks import faults_from_env

    step = environ.get("RWKV7_PROFILE_STEP") or None
    if step is not None and not step.strip().isdigit():
        raise UserError(f"RWKV7_PROFILE_STEP={step!r}: give a step number (steps N..N+2 are profiled)")
    return {"profile_step": int(step) if step is not None else None, "faults": faults_from_env(environ)}


def clear_run(out: Path, keep: str | None) -> None:
    """--fresh: remove what a previous run left (checkpoints, weights, verdict), except the --load-model file."""
    import shutil

    keep_path = Path(keep).resolve() if keep else None
    shutil.rmtree(out / "ckpt", ignore_errors=True)
    for f in [*out.glob("rwkv-*.pth"), out / "check.json", out / "loss.png", out / "profile.txt"]:
        if f.is_file() and f.resolve() != keep_path:
            f.unlink()
