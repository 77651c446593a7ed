"""Quiet output (issue 17): `make train`'s tiny CPU run prints no warning lines, while real warnings still show."""
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# `make train` runs `entrypoint.py train --recipe tiny` with the progress bar on. Lightning's DataLoader-workers hint
# only appears on machines with more than 2 CPUs (CI has 2), so the run pretends to have 16.
MAKE_TRAIN = f"""if True:
    import multiprocessing, runpy, sys
    multiprocessing.cpu_count = lambda: 16
    sys.argv = ["entrypoint.py", "train", "--recipe", "tiny", "--out", sys.argv[1], "--no-check",
                "--set", "train.epoch_steps=5", "train.epoch_count=2"]
    runpy.run_path({str(ROOT / "entrypoint.py")!r}, run_name="__main__")
"""


def test_make_train_tiny_prints_no_warning_lines(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("PYTHONWARNINGS", None)
    p = subprocess.run([sys.executable, "-c", MAKE_TRAIN, str(tmp_path / "run")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = re.split(r"[\r\n]", p.stdout + p.stderr)
    noisy = [ln for ln in lines if re.search(r"warn|deprecat|Traceback|destroy_process_group", ln, re.I)]
    assert noisy == [], noisy
    assert any(re.match(r"1 \d\.\d+ ", ln) for ln in lines)  # the run itself still reports its mini-epochs


def test_only_the_named_warnings_are_silenced():
    from rwkv7 import quiet

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.install()
        warnings.warn("pkg_resources is deprecated as an API. See ...", UserWarning)
        warnings.warn("The dataloader, train_dataloader, does not have many workers which may be a bottleneck.",
                      UserWarning)
        warnings.warn("the loss went up", UserWarning)  # a real problem: must still show
        warnings.warn("pkg_resources is deprecated as an API", RuntimeWarning)  # another category: shown
    assert [str(w.message) for w in seen] == ["the loss went up", "pkg_resources is deprecated as an API"]
