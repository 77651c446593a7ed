"""Shared test setup: no wandb, no network, small fixtures."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process: returns (exit code, stdout, stderr)."""
    from rwkv7.cli import main

    def run(*argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="session")
def small_binidx(tmp_path_factory):
    """20k tokens, ids < 512 (the tiny recipe's vocab): enough for ctx_len 64. Tests only read it."""
    import numpy as np

    from rwkv7.data.binidx import write_binidx

    rng = np.random.default_rng(0)
    prefix = tmp_path_factory.mktemp("data") / "small"
    write_binidx(prefix, [rng.integers(1, 512, 500) for _ in range(40)])
    return prefix
