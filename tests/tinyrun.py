"""The `tiny` recipe as the tests of the run's mechanics train it, in subprocesses.

Those tests check what happens around the steps (checkpoints, resume, signals, faults, ranks), not the model, so
they train a smaller one: ctx 32 and n_embd 64 (one head) make a CPU step about four times cheaper, and a 256-token
validation is one batch instead of sixteen. The recipe's own numbers are checked by test_regression.py, which trains
`tiny` unchanged. SHORT: 4 mini-epochs of 5 steps, a checkpoint after each. The runs are forked from a zygote that
has imported the training stack already (tests/zygote.py): a real process each, without ~5 s of imports.
"""
import os
import subprocess
import sys
from pathlib import Path

from tests import zygote

ROOT = Path(__file__).resolve().parent.parent
SMALLER = ["train.ctx_len=32", "model.n_embd=64", "data.val_tokens=256"]
SHORT = ["--set", "train.epoch_steps=5", "train.epoch_count=4", "train.epoch_save=1", *SMALLER, "--no-progress"]


def train_cmd(out, *extra) -> list[str]:
    return [sys.executable, str(ROOT / "entrypoint.py"), "train", "--recipe", "tiny", "--out", str(out), *SHORT,
            *extra]


def run_train(out, *extra, env=None, check=True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    p = zygote.run(train_cmd(out, *extra), cwd=ROOT, env=full_env, timeout=600)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p
