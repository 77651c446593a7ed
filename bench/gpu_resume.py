"""A GPU run killed with SIGKILL and started again continues the loss curve of an uninterrupted run (issue 5).

    python bench/gpu_resume.py --data PREFIX [--reference RUN_DIR] [--kill-at 120]

Trains recipe 0.1b-short (DeepSpeed stage 2, bf16, 4 mini-epochs of 50 steps) into a fresh folder with
RWKV7_TEST_FAULT=kill@N (SIGKILL right after step N, mid mini-epoch), runs the same command again (it resumes from the
last full checkpoint: DeepSpeed's own optimizer state, data position, partial sums), and compares train_log.txt and
the per-step losses after the resume point with the uninterrupted run in --reference (run it first when missing).
Writes resume.json next to the runs and exits 1 when a mini-epoch differs by more than the recipe's tolerance.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from train_runs import ROOT, metric_rows, train as train_run

sys.path.insert(0, str(ROOT))


def train(out: Path, data: str, fault: str | None = None, fresh: bool = False) -> int:
    return train_run(out, data=data, fresh=fresh, env={"RWKV7_TEST_FAULT": fault or ""}).returncode


def step_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metric_rows(run)}


def main() -> int:
    from rwkv7.recipe import load_recipe
    from rwkv7.trajectory import parse_log_text

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--reference", default="/tmp/golden", help="an uninterrupted 0.1b-short run on the same data")
    ap.add_argument("--out", default="/tmp/rwkv7-resume")
    ap.add_argument("--kill-at", type=int, default=120)
    args = ap.parse_args()
    ref, out = Path(args.reference), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (ref / "train_log.txt").is_file():
        if train(ref, args.data, fresh=True):
            raise SystemExit(f"the reference run failed: see {ref}.log")
    run = out / "run"
    rc_killed = train(run, args.data, fault=f"kill@{args.kill_at}", fresh=True)
    rc_resumed = train(run, args.data)
    tol = load_recipe("0.1b-short").check.tolerance
    a = {r.epoch: r.loss for r in parse_log_text((ref / "train_log.txt").read_text())}
    b = {r.epoch: r.loss for r in parse_log_text((run / "train_log.txt").read_text())}
    epochs = sorted(set(a) & set(b))
    ds, dr = step_losses(ref), step_losses(run)
    after = [s for s in sorted(ds) if s > args.kill_at and s in dr]
    result = {"kill_at": args.kill_at, "rc_killed": rc_killed, "rc_resumed": rc_resumed,
              "epochs_compared": epochs, "epoch_abs_delta": {e: abs(a[e] - b[e]) for e in epochs},
              "max_epoch_delta": max((abs(a[e] - b[e]) for e in epochs), default=None), "tolerance": tol,
              "steps_after_kill": len(after),
              "max_step_delta_after_kill": max((abs(ds[s] - dr[s]) for s in after), default=None),
              "resume_message": next((ln for ln in Path(f"{run}.log").read_text().splitlines()
                                      if ln.startswith("resuming")), None)}
    result["ok"] = (rc_killed == -9 or rc_killed == 137) and rc_resumed == 0 and len(epochs) == len(a) \
        and result["max_epoch_delta"] is not None and result["max_epoch_delta"] <= tol
    print(json.dumps(result, indent=1))
    (out / "resume.json").write_text(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
