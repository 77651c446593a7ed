"""The training step's variants side by side on one GPU: eager vs compiled blocks, recompute modes, fused head loss.

    python bench/fused_step.py [--shapes 0.1b,1.5b] [--variants ...] [--check]

Each variant runs forward + loss + backward of one micro-batch (B16 T512, bf16) as one CUDA graph, as strategy
`single` does (no optimizer step: that is the same for every variant). Per variant: set-up time (compile, warm-up,
capture), median ms per step over 20 replays, peak memory allocated. --check first compares the gradients of every
variant with the eager path's (L2 D256 T64, the official init) and prints the relative errors next to the bf16
noise floor (eager bf16 against an fp32 copy of the same model). Prints one table last; --json writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback

import torch

from rwkv7.init import init_model
from rwkv7.model import ModelShape, RWKV7
from rwkv7.train.graphed import GraphedStep
from rwkv7.train.loss import head_loss, lm_loss

SHAPES = {"0.1b": (12, 768), "0.4b": (24, 1024), "1.5b": (24, 2048)}
# name: (grad_cp, compile recompute mode or None for eager, fused head loss)
VARIANTS = {
    "eager-cp1-logits": (1, None, False),   # the path before this change
    "eager-cp1": (1, None, True),
    "eager-cp0": (0, None, True),
    "compiled-cp1-full": (1, "full", True),
    "compiled-cp1-selective": (1, "selective", True),
    "compiled-cp0": (0, "none", True),
}


def loss_fn(fused: bool):
    if fused:
        return lambda model, x, y: head_loss(model.hidden(x), model.head.weight, y)
    return lambda model, x, y: lm_loss(model(x), y, reuse_logits=True)


def build(L, C, variant, seed_init=False, dtype=torch.bfloat16):
    grad_cp, mode, fused = VARIANTS[variant]
    model = RWKV7(ModelShape(L, C, 65536), grad_cp=bool(grad_cp))
    if seed_init:
        init_model(model, seed=0)
    else:  # timing only: cheap random weights of the right scale (the official init takes minutes at 1.5b on CPU)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
    model = model.cuda().to(dtype).train()
    if mode is not None:
        model.compile_blocks(recompute="selective" if mode == "none" else mode)
    return model, loss_fn(fused)


def time_variant(L, C, variant, B=16, T=512):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model, fn = build(L, C, variant)
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(0, 65536, (B, T + 1), device="cuda", generator=g) for _ in range(4)]
    t0 = time.time()
    step = GraphedStep(model, fn, batches[0][:, :-1].contiguous(), batches[0][:, 1:].contiguous())
    torch.cuda.synchronize()
    setup = time.time() - t0
    times = []
    for i in range(25):
        b = batches[i % len(batches)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(b[:, :-1], b[:, 1:])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    ms = statistics.median(times[5:])
    res = {"shape": f"L{L} D{C}", "variant": variant, "setup_s": round(setup, 1), "ms": round(ms, 2),
           "tok_s": round(B * T / ms * 1e3), "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)}
    del step, model
    return res


def grads_of(model, fn, x, y):
    model.zero_grad(set_to_none=True)
    fn(model, x, y).backward()
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def rel_errors(a: dict, b: dict) -> tuple[float, str]:
    worst, name = 0.0, ""
    for n in a:
        e = float((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-30))
        if e > worst:
            worst, name = e, n
    return worst, name


def check(L=2, C=256, B=2, T=64):
    """Gradient agreement of every variant with the eager bf16 path (same weights, same batch)."""
    torch.manual_seed(0)
    x = torch.randint(0, 65536, (B, T + 1), device="cuda")
    x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    ref_model, ref_fn = build(L, C, "eager-cp1-logits", seed_init=True)
    ref = grads_of(ref_model, ref_fn, x, y)
    f32_model, _ = build(L, C, "eager-cp1-logits", seed_init=True, dtype=torch.float32)
    f32 = grads_of(f32_model, ref_fn, x, y)
    floor = rel_errors(ref, f32)
    print(f"bf16 noise floor (eager bf16 vs eager fp32 weights): worst param rel err {floor[0]:.2e} ({floor[1]})")
    out = {"floor": floor[0]}
    for v in VARIANTS:
        if v == "eager-cp1-logits":
            continue
        try:
            model, fn = build(L, C, v, seed_init=True)
            err = rel_errors(grads_of(model, fn, x, y), ref)
            print(f"{v:26} worst param rel err vs eager bf16 {err[0]:.2e} ({err[1]})")
            out[v] = err[0]
        except Exception as exc:  # noqa: BLE001 - report and go on with the other variants
            print(f"{v:26} FAILED: {type(exc).__name__}: {str(exc)[:400]}")
            traceback.print_exc(limit=3)
            out[v] = None
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="0.1b,1.5b")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    print("torch", torch.__version__, torch.cuda.get_device_name(), flush=True)
    results = {"check": check() if args.check else None, "timing": []}
    for shape in args.shapes.split(","):
        L, C = SHAPES[shape]
        for v in args.variants.split(","):
            try:
                r = time_variant(L, C, v)
            except Exception as exc:  # noqa: BLE001
                r = {"shape": f"L{L} D{C}", "variant": v, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                traceback.print_exc(limit=4)
            results["timing"].append(r)
            print(json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(f"\n{'shape':10} {'variant':26} {'setup s':>8} {'ms/step':>8} {'tok/s':>9} {'peak GiB':>9}")
    for r in results["timing"]:
        if "error" in r:
            print(f"{r['shape']:10} {r['variant']:26} {r['error'][:80]}")
        else:
            print(f"{r['shape']:10} {r['variant']:26} {r['setup_s']:>8} {r['ms']:>8} {r['tok_s']:>9,} "
                  f"{r['peak_gib']:>9}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
