"""What the training benchmarks share: one `entrypoint.py train` run in its own process, and its metrics.jsonl.

    from train_runs import train, metric_rows, throughput   (bench/ scripts run as `python bench/NAME.py`)
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train_command(out: Path, *sets: str, data: str | None = None, recipe: str = "0.1b-short",
                  steps: int | None = None, fresh: bool = True, load_model: str | None = None) -> list[str]:
    """The `entrypoint.py train` command line of train() (no check, no progress bar)."""
    if data:
        sets = (f"data.path={data}",) + sets
    if steps:
        sets = (f"train.epoch_steps={steps}", "train.epoch_count=1", "train.epoch_save=1000") + sets
    cmd = [sys.executable, str(ROOT / "entrypoint.py"), "train", "--recipe", recipe, "--out", str(out), "--no-check",
           "--no-progress"] + (["--fresh"] if fresh else []) + (["--load-model", str(load_model)] if load_model else [])
    return cmd + (["--set", *sets] if sets else [])


def train(out: Path, *sets: str, data: str | None = None, recipe: str = "0.1b-short", steps: int | None = None,
          fresh: bool = True, env: dict | None = None, load_model: str | None = None,
          timeout: float | None = None) -> subprocess.CompletedProcess:
    """Train `recipe` into `out` (wandb off) with `--set` overrides; steps=N makes it one mini-epoch of N steps
    without checkpoints; load_model starts from those weights. The output goes to <out>.log beside the run folder.
    A run past `timeout` seconds is killed (subprocess.TimeoutExpired)."""
    cmd = train_command(out, *sets, data=data, recipe=recipe, steps=steps, fresh=fresh, load_model=load_model)
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled", **(env or {})},
                       capture_output=True, text=True, timeout=timeout)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.log").write_text(p.stdout + p.stderr)
    return p


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def throughput(rows: list[dict]) -> dict:
    """Median tokens/s and MFU after warm-up (the first third: compile, allocator, capture), peak memory."""
    warm = [r for r in rows[len(rows) // 3:] if r.get("tokens_per_s")]
    return {"tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in warm)),
            "mfu": statistics.median(r.get("mfu", 0) for r in warm),
            "peak_mem_gib": max(r.get("peak_mem_gib", 0) for r in rows),
            "peak_reserved_gib": max(r.get("peak_reserved_gib", 0) for r in rows)}
