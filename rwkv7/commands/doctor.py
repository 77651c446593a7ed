"""`rwkv7 doctor [--recipe R] [--set ...] [--out DIR]`: check this machine for a recipe, one ok/warn/fail line each.

Exit 0 when nothing fails (warnings allowed), 2 when a check fails. Memory and disk figures are estimates
(rwkv7/doctor.py says how they are computed).
"""
from __future__ import annotations

from pathlib import Path

from rwkv7.cliargs import overrides, recipe_parser


def register(sub) -> None:
    p = recipe_parser(sub, "doctor", "check GPU, kernel, memory, disk, data and tools for a recipe",
                      "Check this machine for a recipe: versions, GPU and the wkv7 kernel's arch, free GPU memory and "
                      "disk against rough estimates, data present and valid, DeepSpeed, WANDB_MODE. One line per "
                      "check: ok, warn or fail. Exit 0 if nothing fails, 2 otherwise.",
                      "run folder whose disk is checked [out/<recipe>]")
    p.set_defaults(func=run)


def run(args) -> int:
    from rwkv7.doctor import iter_checks
    from rwkv7.preflight import FAIL, WARN
    from rwkv7.errors import UserError
    from rwkv7.recipe import load_recipe

    recipe = load_recipe(args.recipe, overrides(args))
    run_dir = Path(args.out or Path("out") / recipe.name)
    print(f"rwkv7 doctor: recipe {recipe.name}, run folder {run_dir}")
    checks = []
    for c in iter_checks(recipe, run_dir):
        print(c.line(), flush=True)
        checks.append(c)
    failed = [c.name for c in checks if c.status == FAIL]
    warned = sum(c.status == WARN for c in checks)
    print(f"{len(checks) - len(failed) - warned} ok, {warned} warn, {len(failed)} fail "
          "(memory and disk figures are estimates)")
    if failed:
        raise UserError(f"doctor: {len(failed)} check(s) failed ({', '.join(failed)}): see the fail lines above")
    return 0
