"""Time training through the product's own path (`entrypoint.py train`) and summarise metrics.jsonl.

    python bench/train_bench.py --data PREFIX [--quick]

Runs, each in its own process: the 0.1b demo shape (micro_bsz 16, ctx 512, bf16, DeepSpeed stage 2) with grad_cp 1
and 0, strategies single and ddp (one rank: its code path against single's), then 0.4b and 1.5b for a few steps.
`--only 0.1b-single-cp1 0.1b-ddp1-cp1` runs the one-GPU ddp figure side by side. Per run: median ms/step and
tokens/s after warm-up, MFU, peak memory.
Prints one table last and writes bench/train_bench.json (or --json PATH).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from train_runs import ROOT, metric_rows, throughput, train as train_run


def run(name: str, recipe: str, data: str, steps: int, out_root: Path, extra: list[str], profile=False) -> dict:
    out = out_root / name
    t0 = time.time()
    p = train_run(out, *extra, data=data, recipe=recipe, steps=steps,
                  env={"RWKV7_PROFILE_STEP": "20"} if profile else None)
    wall = time.time() - t0
    if p.returncode != 0:
        print(p.stdout[-3000:], p.stderr[-5000:], sep="\n")
        return {"name": name, "error": f"exit {p.returncode}", "wall_s": round(wall, 1)}
    rows = metric_rows(out)
    tokens_per_step = rows[0].get("tokens_per_step") or 0
    res = {"name": name, "steps": len(rows), "wall_s": round(wall, 1), **throughput(rows),
           "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"]}
    if tokens_per_step:
        res["ms_per_step"] = round(1000 * tokens_per_step / res["tokens_per_s"], 1)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="binidx prefix (World tokens), e.g. the stand-in corpus")
    ap.add_argument("--out", default="/tmp/rwkv7-train-bench")
    ap.add_argument("--json", default=str(ROOT / "bench" / "train_bench.json"))
    ap.add_argument("--quick", action="store_true", help="fewer steps")
    ap.add_argument("--only", nargs="*", help="run only these names")
    ap.add_argument("--profile", nargs="*", help="write profile.txt (steps 20-22) for these names")
    args = ap.parse_args()
    n = 40 if args.quick else 100
    plan = [("0.1b-ds-cp1", "0.1b-short", n, []),
            ("0.1b-ds-cp0", "0.1b-short", n, ["train.grad_cp=0"]),
            ("0.1b-single-cp1", "0.1b-short", n, ["train.strategy=single"]),
            ("0.1b-ddp1-cp1", "0.1b-short", n, ["train.strategy=ddp"]),  # ddp's code path on one rank
            ("0.1b-single-cp1-eager", "0.1b-short", n, ["train.strategy=single", "train.cuda_graph=0"]),
            ("0.1b-single-cp0", "0.1b-short", n, ["train.strategy=single", "train.grad_cp=0"]),
            ("0.1b-single-cp1-compile", "0.1b-short", n, ["train.strategy=single", "train.compile=1"]),
            ("0.1b-single-cp0-compile", "0.1b-short", n, ["train.strategy=single", "train.grad_cp=0",
                                                          "train.compile=1"]),
            ("0.1b-ds-cp1-compile", "0.1b-short", n, ["train.compile=1"]),
            ("0.4b-ds-cp1", "0.1b-short", 20, ["model.n_layer=24", "model.n_embd=1024"]),
            ("0.4b-single-cp1", "0.1b-short", 20, ["model.n_layer=24", "model.n_embd=1024", "train.strategy=single"]),
            ("1.5b-ds-cp1", "0.1b-short", 20, ["model.n_layer=24", "model.n_embd=2048"]),
            ("1.5b-single-cp1", "0.1b-short", 20, ["model.n_layer=24", "model.n_embd=2048",
                                                          "train.strategy=single"])]
    results = []
    for name, recipe, steps, extra in plan:
        if args.only and name not in args.only:
            continue
        results.append(run(name, recipe, args.data, steps, Path(args.out), extra,
                           profile=name in (args.profile or [])))
        print(json.dumps(results[-1]), flush=True)
    Path(args.json).write_text(json.dumps({"gpu": gpu_name(), "date": time.strftime("%Y-%m-%d"),
                                           "results": results}, indent=1))
    print(f"\n{'run':22} {'steps':>5} {'tok/s':>9} {'ms/step':>8} {'MFU':>6} {'peak GiB':>9} {'reserved':>9} "
          f"{'loss first→last':>18}")
    for r in results:
        if "error" in r:
            print(f"{r['name']:22} {r['error']}")
            continue
        print(f"{r['name']:22} {r['steps']:>5} {r['tokens_per_s']:>9,} {r.get('ms_per_step', 0):>8} "
              f"{r['mfu']:>6.1%} {r['peak_mem_gib']:>9.2f} {r['peak_reserved_gib']:>9.2f} "
              f"{r['first_loss']:>8.3f}→{r['last_loss']:.3f}")
    return 0


def gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
