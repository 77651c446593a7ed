"""Several GPUs of one host against one (issues 7, 8, 16): same global batch → same loss curve; throughput scaling.

    python bench/multi_gpu.py --data PREFIX [--devices 2] [--steps 100] [--strategy ddp|deepspeed_stage_2]

Runs recipe 0.1b-short (bf16, grad_cp 1, ctx 512) with --strategy (default ddp: the graphed one-GPU step on every
rank, sharded optimizer; deepspeed_stage_2: the official path) through `entrypoint.py train`:
  1. one GPU, micro_bsz 16 (global batch 16), --steps steps;
  2. --devices GPUs, micro_bsz 16/devices (the same global batch and samples), the same steps: per-step losses must
     agree with run 1 within 0.02;
  3. --devices GPUs at micro_bsz 16 each (weak scaling): tokens/s against run 1;
  4. 1.5b (L24 D2048) on --devices GPUs at micro_bsz 16, a few steps: tokens/s, MFU, peak memory.
Prints a JSON summary and a table; writes multi_gpu.json into --out/STRATEGY.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from train_runs import metric_rows, throughput, train as train_run


def train(out: Path, data: str, steps: int, devices: int, micro: int, extra=(), strategy="ddp") -> dict:
    p = train_run(out, f"train.devices={devices}", f"train.micro_bsz={micro}", f"train.strategy={strategy}", *extra,
                  data=data, steps=steps)
    if p.returncode:
        return {"error": f"exit {p.returncode}", "tail": (p.stdout + p.stderr)[-1500:]}
    rows = metric_rows(out)
    return {"losses": [r["loss"] for r in rows], **throughput(rows)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--strategy", default="ddp", choices=["ddp", "deepspeed_stage_2"])
    ap.add_argument("--out", default="/tmp/rwkv7-multi-gpu")
    args = ap.parse_args()
    out, n, st = Path(args.out) / args.strategy, args.devices, args.strategy
    out.mkdir(parents=True, exist_ok=True)
    one = train(out / "gpu1", args.data, args.steps, 1, 16, strategy=st)
    same = train(out / f"gpu{n}-same-batch", args.data, args.steps, n, 16 // n, strategy=st)
    weak = train(out / f"gpu{n}-weak", args.data, 40, n, 16, strategy=st)
    big = train(out / f"gpu{n}-1.5b", args.data, 20, n, 16, ["model.n_layer=24", "model.n_embd=2048"], strategy=st)
    res = {"devices": n, "strategy": st, "runs": {"1 GPU micro 16": one, f"{n} GPUs micro {16 // n}": same,
                                  f"{n} GPUs micro 16": weak, f"1.5b {n} GPUs micro 16": big}}
    if "losses" in one and "losses" in same:
        d = [abs(a - b) for a, b in zip(one["losses"], same["losses"])]
        res["same_batch_max_step_delta"] = max(d)
        res["same_batch_mean_step_delta"] = sum(d) / len(d)
        res["same_batch_ok"] = max(d) <= 0.02 and len(d) == args.steps
    if "tokens_per_s" in one and "tokens_per_s" in weak:
        res["weak_scaling_efficiency"] = round(weak["tokens_per_s"] / (n * one["tokens_per_s"]), 3)
    (out / "multi_gpu.json").write_text(json.dumps(res, indent=1))
    for r in res["runs"].values():
        r.pop("losses", None)
    print(json.dumps(res, indent=1))
    return 0 if res.get("same_batch_ok") else 1


if __name__ == "__main__":
    sys.exit(main())
