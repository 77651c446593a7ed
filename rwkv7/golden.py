"""Regenerate a recipe's expected log from a fresh run: `make golden` (= python -m rwkv7.golden tiny).

Writes recipes/expected/<name>.log: comment lines recording where and how it was made, then the run's mini-epoch
lines in the official train_log.txt format. Only this explicit command changes an expected log.
"""
from __future__ import annotations

import datetime
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from rwkv7.fsutil import atomic_write_text
from rwkv7.recipe import RECIPES_DIR, load_recipe
from rwkv7.trajectory import parse_log


def make_golden(name: str, overrides: list[str] = ()) -> Path:
    from rwkv7.train.run import run_training

    recipe = load_recipe(name, list(overrides))
    target = recipe.expected_log() or RECIPES_DIR / "expected" / f"{name}.log"
    with tempfile.TemporaryDirectory() as tmp:
        code = run_training(recipe, Path(tmp) / "run", resume=False, progress=False, check=False)
        if code:
            raise SystemExit(f"golden run of {name} failed with exit code {code}")
        log = (Path(tmp) / "run" / "train_log.txt").read_text()
        records = parse_log(Path(tmp) / "run" / "train_log.txt")
    lines = [ln for ln in log.splitlines(keepends=True) if ln[:1].isdigit()]
    header = [
        f"# expected log of recipe {name!r}, made by `make golden` on {datetime.date.today()}",
        f"# recipe fingerprint {recipe.fingerprint()}, overrides {list(overrides) or 'none'}",
        f"# python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
        f"{platform.machine()} {platform.system()}, torch threads {torch.get_num_threads()}",
        f"# {len(records)} mini-epochs; loss {records[0].loss:.4f} -> {records[-1].loss:.4f}",
    ]
    atomic_write_text(target, "\n".join(header) + "\n" + "".join(lines))
    print(f"wrote {target}")
    return target


if __name__ == "__main__":
    make_golden(sys.argv[1] if len(sys.argv) > 1 else "tiny", sys.argv[2:])
