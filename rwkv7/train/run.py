"""One training run: recipe → data → model → Lightning Trainer → train_log.txt, checkpoints, verdict.

Run folder (default out/<recipe>/): train_log.txt (official format), metrics.jsonl (one line per step), run.json,
rwkv-init.pth, rwkv-N.pth / rwkv-final.pth (official weights), ckpt/step-N/ (full checkpoints), check.json, loss.png.
A run started again with the same folder resumes from the newest complete checkpoint; the data order, schedule and
optimizer state continue exactly where they were. The per-step bookkeeping is rwkv7.train.tracker's; this module
sets the run up and reports how it ended.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rwkv7 import checkpoint as ckpt
from rwkv7.data.source import TrainingData, prepare_data
from rwkv7.errors import UserError
from rwkv7.fsutil import append_line, atomic_write_text
from rwkv7.recipe import Recipe
from rwkv7.testhooks import Faults
from rwkv7.train.module import NonFiniteLoss
from rwkv7.train.resume import RunState, checkpoint_weights, find_resume, repair_run_files
from rwkv7.train.schedule import total_steps

EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


@dataclass
class RunOptions:
    """How to run (not what: that is the recipe). The environment is read once, by the command line."""

    resume: bool = True
    force_resume: bool = False
    load_model: str | None = None
    progress: bool = True
    check: bool = True
    wandb_project: str | None = None
    profile_step: int | None = None   # RWKV7_PROFILE_STEP
    faults: Faults = field(default_factory=Faults)  # RWKV7_TEST_FAULT (rwkv7/testhooks.py)


def launched_as_rank_zero() -> bool:
    """Lightning starts ranks > 0 as copies of this command with LOCAL_RANK/NODE_RANK set; only rank 0 writes the
    run folder's shared files before the Trainer (and its process group) exists."""
    global_rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))  # torchrun / srun set these
    return (int(global_rank) == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0
            and int(os.environ.get("NODE_RANK", 0)) == 0)


def run_training(recipe: Recipe, run_dir: Path, options: RunOptions | None = None, **kwargs) -> int:
    """Train `recipe` into run_dir; returns the exit code (0 ok, 1 check failed, 3 diverged, 130 interrupted).
    kwargs: RunOptions fields, for callers that set one or two."""
    from rwkv7.preflight import preflight

    o = options or RunOptions(**kwargs)
    start_weights = ckpt.read_state_dict(o.load_model) if o.load_model else None  # fails before anything is made
    preflight(recipe, run_dir)  # GPU, DeepSpeed, data, run folder and disk: a UserError before any work
    data = prepare_data(recipe)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_from, state = find_resume(run_dir, recipe, o.force_resume) if o.resume else (None, RunState())
    if o.load_model and resume_from is not None:
        raise UserError(f"--load-model given but {run_dir} already holds checkpoints: use a fresh --out")
    last_step = (recipe.train.epoch_count * recipe.epoch_steps if recipe.train.epoch_count
                 else total_steps(data.exit_tokens, recipe.tokens_per_step))
    if state.step >= last_step:
        print(f"{run_dir}: already trained {state.step} of {last_step} steps; nothing to do")
        final = run_dir / "rwkv-final.pth"
        if resume_from is not None and launched_as_rank_zero() and not final.is_file():  # stopped before it
            ckpt.save_state_dict(checkpoint_weights(resume_from), final)
        return finish(recipe, run_dir, o.check)
    torch.manual_seed(recipe.train.seed)
    if recipe.train.accelerator == "cpu" and recipe.train.cpu_threads:
        torch.set_num_threads(recipe.train.cpu_threads)
    writer = launched_as_rank_zero()
    model = starting_model(recipe, run_dir, state, resume_from, start_weights, o.load_model, writer)
    del start_weights
    if resume_from is not None and writer:
        print(f"resuming {run_dir} from {resume_from.name} (step {state.step} of {last_step})")
    if writer:
        write_run_header(recipe, run_dir, data)
    from rwkv7.train.tracker import RunPlan

    plan = RunPlan(recipe, run_dir, data, last_step, state.step // recipe.epoch_steps, resume_from, o.progress,
                   o.wandb_project, o.profile_step, o.faults)
    return fit(plan, state, model, o.check)


def starting_model(recipe: Recipe, run_dir: Path, state: RunState, resume_from: Path | None,
                   start_weights: dict | None, load_model: str | None, writer: bool):
    """The model to train: the checkpoint's weights (and the run's files repaired to agree with it), --load-model's,
    or the official init (saved as rwkv-init.pth, and a fresh run's logs removed)."""
    from rwkv7.init import init_model
    from rwkv7.model import ModelShape, RWKV7

    m = recipe.model
    model = RWKV7(ModelShape(m.n_layer, m.n_embd, m.vocab_size, m.head_size), grad_cp=bool(recipe.train.grad_cp))
    if resume_from is not None:
        ckpt.load_into(model, checkpoint_weights(resume_from), str(resume_from))
        if writer:
            repair_run_files(run_dir, state)
    elif start_weights is not None:
        ckpt.load_into(model, start_weights, load_model)
    else:
        init_model(model, seed=recipe.train.seed, bf16_round=recipe.train.init_bf16_round)
        if writer:
            ckpt.save_weights(model, run_dir / "rwkv-init.pth")
            for name in ("train_log.txt", "metrics.jsonl", "val_log.txt"):
                (run_dir / name).unlink(missing_ok=True)
    return model


def write_run_header(recipe: Recipe, run_dir: Path, data: TrainingData) -> None:
    append_line(run_dir / "train_log.txt", f"NEW RUN {datetime.datetime.now().strftime('%Y-%m-%d-%H-%M-%S')}\n"
                                           f"{json.dumps(recipe.to_dict())}")
    atomic_write_text(run_dir / "run.json", json.dumps(run_info(recipe, data), indent=1))


def data_loader(recipe: Recipe, data: TrainingData, first_step: int, last_step: int):
    from rwkv7.data.sampler import MagicPrimeWindows

    t = recipe.train
    dataset = MagicPrimeWindows(data.data.tokens, t.ctx_len, data.magic_prime, t.micro_bsz, recipe.real_bsz,
                                first_step, last_step - first_step)
    loader = torch.utils.data.DataLoader(dataset, batch_size=t.micro_bsz, shuffle=False, num_workers=t.num_workers,
                                         drop_last=True, pin_memory=t.accelerator == "gpu", persistent_workers=False)
    return dataset, loader


def fit(plan, state: RunState, model, check: bool) -> int:
    """Run the Trainer from state.step to plan.last_step and say how it ended."""
    from rwkv7.train.module import RWKV7Module
    from rwkv7.train.tracker import RunTracker
    from rwkv7.train.trainer import build_trainer

    recipe, run_dir = plan.recipe, plan.run_dir
    dataset, loader = data_loader(recipe, plan.data, state.step, plan.last_step)
    if recipe.train.strategy.master_weights and recipe.train.precision == "bf16":
        model = model.to(torch.bfloat16)  # as DeepSpeed's bf16 mode: the whole module in bf16
    if recipe.train.compile and recipe.train.accelerator == "gpu":  # CPU runs stay the eager reference
        model.compile_blocks(recompute=recipe.train.recompute)
    module = RWKV7Module(model, recipe, bad_steps=state.bad_steps, faults=plan.faults)
    tracker = RunTracker(plan, state, dataset)
    trainer = build_trainer(recipe, [tracker], plan.last_step - state.step)
    try:
        trainer.fit(module, loader)
    except NonFiniteLoss as e:
        print(f"error: {e}; the last good checkpoint is kept in {run_dir / ckpt.CKPT_DIR}")
        return EXIT_DIVERGED
    if tracker.stopped and state.step < plan.last_step:  # a signal during the last step: the run is done
        print(f"stopped by a signal at step {state.step}; run the same command to resume")
        return EXIT_INTERRUPTED
    if trainer.is_global_zero:
        ckpt.save_weights(model, run_dir / "rwkv-final.pth")
    return finish(recipe, run_dir, check) if trainer.is_global_zero else 0


def finish(recipe: Recipe, run_dir: Path, check: bool) -> int:
    expected = recipe.expected_log()
    if not check or expected is None:
        return 0
    if not expected.is_file():
        print(f"no expected log at {expected} yet: nothing to check against (make one with `make golden`)")
        return 0
    from rwkv7.trajectory import run_check

    c = recipe.check
    return run_check(run_dir / "train_log.txt", expected, tolerance=c.tolerance, rel_tolerance=c.rel_tolerance,
                     max_outliers=c.max_outliers)


def run_info(recipe: Recipe, data: TrainingData) -> dict:
    import numpy as np

    info = {"recipe": recipe.to_dict(), "fingerprint": recipe.fingerprint(), "data": data.data.prefix,
            "n_tokens": data.n_tokens, "magic_prime": data.magic_prime, "my_exit_tokens": data.exit_tokens,
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "cuda": torch.version.cuda, "time": datetime.datetime.now().isoformat()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
