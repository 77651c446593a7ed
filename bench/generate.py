"""Generation throughput: prefill and RNN-mode decode tokens/s for the 0.1b and 1.5b shapes (random weights).

    python bench/generate.py --quick               # CUDA, bf16; well under a minute on an H100
    python bench/generate.py                       # more steps / repeats
    python bench/generate.py --device cpu --tiny   # smoke check of the same code path on the CPU

Models are built directly on the device with random weights (timing only: no checkpoint needed, outputs are
meaningless). Prefill = rwkv7.generate.prefill (parallel over the prompt: wkv CUDA kernel for multiple-of-16 chunks,
torch reference for a shorter tail). Decode = rwkv7.generate.RNNDecoder (one T=1 forward_with_state per token,
captured as a CUDA graph unless --no-graph) with greedy argmax kept on the device; decode tok/s = batch * steps /
time. An "eager" decode row at batch 1 shows the cost of the step without the CUDA graph.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rwkv7.generate import RNNDecoder, kernel_active, prefill  # noqa: E402
from rwkv7.model import RWKV7, ModelShape  # noqa: E402

SHAPES = {
    "0.1b": ModelShape(n_layer=12, n_embd=768, vocab_size=65536),
    "1.5b": ModelShape(n_layer=24, n_embd=2048, vocab_size=65536),
    "tiny": ModelShape(n_layer=2, n_embd=128, vocab_size=512),
}


def random_model(shape: ModelShape, device: torch.device, dtype: torch.dtype, seed: int = 0) -> RWKV7:
    torch.manual_seed(seed)
    with torch.device(device):
        model = RWKV7(shape)
    model = model.to(dtype).eval().requires_grad_(False)
    for name, p in model.named_parameters():
        if name.endswith(("ln0.weight", "ln1.weight", "ln2.weight", "ln_out.weight", "ln_x.weight")):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.02)
    return model


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int) -> float:
    """Seconds per call (after one warm-up call)."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


@torch.no_grad()
def bench_prefill(model, batch: int, T: int, reps: int, device) -> dict:
    idx = torch.randint(1, model.shape.vocab_size, (batch, T), device=device)
    s = timed(lambda: prefill(model, idx), device, reps)
    return {"phase": "prefill", "batch": batch, "tokens": T, "mode": "kernel" if kernel_active(device) else "torch",
            "ms": s * 1e3, "tok_s": batch * T / s}


@torch.no_grad()
def bench_decode(model, batch: int, steps: int, graph: bool, device) -> dict:
    idx = torch.randint(1, model.shape.vocab_size, (batch, 16), device=device)
    _, state = prefill(model, idx)
    decoder = RNNDecoder(model, state, graph=graph)
    tok = idx[:, -1]
    for _ in range(3):  # warm-up
        tok = decoder.step(tok).argmax(-1)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = decoder.step(tok).argmax(-1)
    sync(device)
    s = time.perf_counter() - t0
    del decoder
    return {"phase": "decode", "batch": batch, "tokens": steps, "mode": "graph" if graph else "eager",
            "ms": s / steps * 1e3, "tok_s": batch * steps / s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and repeats (< 1 min on an H100)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--dtype", default=None, choices=("bf16", "fp32"), help="[bf16 on cuda, fp32 on cpu]")
    ap.add_argument("--tiny", action="store_true", help="only the tiny shape (L2 D128 V512), small sizes")
    ap.add_argument("--shapes", default="0.1b,1.5b", help="comma-separated from %s [0.1b,1.5b]" % ",".join(SHAPES))
    ap.add_argument("--no-graph", action="store_true", help="decode without CUDA graphs")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU visible (use --device cpu --tiny for a CPU smoke check)", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    graph = device.type == "cuda" and not args.no_graph
    shapes = ["tiny"] if args.tiny else [s.strip() for s in args.shapes.split(",") if s.strip()]
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"unknown shape {s!r}")

    t_kernel = time.perf_counter()
    kernel = kernel_active(device)  # builds/loads the wkv kernel once, outside the timings
    t_kernel = time.perf_counter() - t_kernel
    if args.tiny:
        prefills, decode_batches, steps, eager_steps, reps = [(1, 64), (4, 32)], [1, 4], 16, 8, 2
    else:
        prefills = [(1, 4096), (16, 512)]
        decode_batches = [1, 32]
        steps, eager_steps, reps = (64, 16, 2) if args.quick else (256, 64, 5)
        if not kernel:
            prefills = [(b, T // 8) for b, T in prefills]  # the torch reference is a per-token Python loop
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# rwkv7 generation benchmark: {name}, torch {torch.__version__}, {str(dtype).replace('torch.', '')}, "
          f"wkv kernel {'on' if kernel else 'off (torch reference)'} ({t_kernel:.1f} s to load), "
          f"decode {'CUDA graph' if graph else 'eager'}", flush=True)

    rows = []
    for sname in shapes:
        shape = SHAPES[sname]
        model = random_model(shape, device, dtype)
        for b, T in prefills:
            rows.append({"shape": sname, **bench_prefill(model, b, T, reps, device)})
        for b in decode_batches:
            rows.append({"shape": sname, **bench_decode(model, b, steps, graph, device)})
        if graph:
            rows.append({"shape": sname, **bench_decode(model, 1, eager_steps, False, device)})
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    head = f"{'shape':<6} {'L':>3} {'D':>5} {'phase':<8} {'batch':>5} {'tokens':>6} {'mode':<7} {'ms':>9} {'tok/s':>11}"
    print(head)
    print("-" * len(head))
    for r in rows:
        s = SHAPES[r["shape"]]
        print(f"{r['shape']:<6} {s.n_layer:>3} {s.n_embd:>5} {r['phase']:<8} {r['batch']:>5} {r['tokens']:>6} "
              f"{r['mode']:<7} {r['ms']:>9.2f} {r['tok_s']:>11,.0f}")
    print("(prefill: ms per call over batch x tokens; decode: ms per T=1 step, tokens = timed steps; "
          "tok/s counts all rows of the batch)")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "dtype": str(dtype), "kernel": kernel,
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
