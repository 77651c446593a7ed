"""Time our wkv7 CUDA kernel, forward and forward+backward, at B16 T512 H12 and B16 T4096 H12 (bf16, head 64).

    python bench/wkv_kernel.py [--lanes 2,4,8] [--json FILE]

Medians of triton.testing.do_bench over direct op calls (the forward as in training: checkpoints and sa saved).
Every thread layout (wkv_cuda.LAYOUTS) is timed; the defaults in rwkv7/wkv_cuda.py are marked f (forward), b (backward). If the
official kernels were copied into the git-ignored ref/ (rwkv7_clampw_v3_for_h100.cu + rwkv7_clampw_v3.cpp; with
--classic the classic wkv7_cuda.cu + wkv7_op.cpp), they are JIT-compiled and timed side by side, and their outputs compared with
ours (same inputs; their y and gradients are bf16 too).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rwkv7 import wkv_cuda  # noqa: E402

SHAPES = [(16, 512, 12), (16, 4096, 12)]
OFFICIAL_FLAGS = ["-res-usage", "-D_N_=64", "-D_C_=64", "-D_CHUNK_LEN_=16", "--use_fast_math", "-O3", "-Xptxas -O3",
                  "--extra-device-vectorization"]


def make_inputs(B, T, H, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (B, T, H, 64)
    r, k, v = (torch.randn(shape, generator=g) * 0.5 for _ in range(3))
    w = torch.rand(shape, generator=g) * 4 - 1 + 0.5 * torch.randn(shape, generator=g)
    kk = torch.nn.functional.normalize(torch.randn(shape, generator=g), dim=-1)
    a, b = -kk, kk * torch.sigmoid(torch.randn(shape, generator=g))
    dy = torch.randn(shape, generator=g) * 0.5
    return [x.to("cuda", torch.bfloat16).contiguous() for x in (r, w, k, v, a, b, dy)]


def load_official(classic=False):
    """JIT the official kernel from ref/ if present: returns {name: (fwd, bwd)} with our argument convention."""
    from torch.utils.cpp_extension import load

    ref = REPO / "ref"
    out = {}
    if (ref / "rwkv7_clampw_v3_for_h100.cu").exists() and (ref / "rwkv7_clampw_v3.cpp").exists():
        try:
            load(name="rwkv7_clampw_v3", sources=[str(ref / "rwkv7_clampw_v3.cpp"), str(ref / "rwkv7_clampw_v3_for_h100.cu")],
                 is_python_module=False, verbose=False, extra_cuda_cflags=OFFICIAL_FLAGS,
                 build_directory=str(_mkdir(ref / "build_v3")))
            op = torch.ops.rwkv7_clampw_v3

            def fwd(r, w, k, v, a, b):
                B, T, H, N = r.shape
                y = torch.empty_like(r)
                s = torch.empty(B, H, T // 16, N, N, device=r.device)
                sa = torch.empty(B, T, H, N, device=r.device)
                op.forward(r, w, k, v, a, b, y, s, sa)
                return y, s, sa

            def bwd(r, w, k, v, a, b, dy, s, sa):
                grads = [torch.empty_like(r) for _ in range(6)]
                op.backward(r, w, k, v, a, b, dy, s, sa, *grads)
                return grads

            out["official clampw_v3_for_h100"] = (fwd, bwd)
        except Exception as exc:  # noqa: BLE001 - the side-by-side is optional
            print(f"(official v3 kernel not built: {type(exc).__name__}: {str(exc)[-300:]})")
    # Loading both official libraries into one process made their ops collide (identical timings, v3 results off),
    # so the classic one is opt-in: run it alone with --classic.
    if classic and (ref / "wkv7_cuda.cu").exists() and (ref / "wkv7_op.cpp").exists():
        try:
            load(name="wind_backstepping", sources=[str(ref / "wkv7_op.cpp"), str(ref / "wkv7_cuda.cu")],
                 is_python_module=False, verbose=False, extra_cuda_cflags=OFFICIAL_FLAGS,
                 build_directory=str(_mkdir(ref / "build_classic")))
            op = torch.ops.wind_backstepping
            scale = math.exp(-0.5)

            def classic_w(w):  # classic takes w' with decay = exp(-exp(w')); same decay as ours
                return torch.log(scale * torch.sigmoid(w.float())).bfloat16()

            cache = {}

            def cw(w):  # the conversion is not part of the kernel's time
                key = (w.data_ptr(), tuple(w.shape))
                if key not in cache:
                    cache.clear()
                    cache[key] = classic_w(w)
                return cache[key]

            def fwd(r, w, k, v, a, b):
                B, T, H, N = r.shape
                y = torch.empty_like(r)
                s = torch.empty(B, H, T // 16, N, N, device=r.device)
                sa = torch.empty(B, T, H, N, device=r.device)
                op.forward(cw(w), r, k, v, a, b, y, s, sa)
                return y, s, sa

            def bwd(r, w, k, v, a, b, dy, s, sa):
                grads = [torch.empty_like(r) for _ in range(6)]  # dw, dq, dk, dv, dz(a), da(b)
                op.backward(cw(w), r, k, v, a, b, dy, s, sa, *grads)
                return None  # its dw is w.r.t. w', not comparable

            out["official classic wkv7_cuda"] = (fwd, bwd)
        except Exception as exc:  # noqa: BLE001
            print(f"(official classic kernel not built: {type(exc).__name__}: {str(exc)[-300:]})")
    return out


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.norm()).item()


def main(argv=None):
    from triton.testing import do_bench

    parser = argparse.ArgumentParser()
    parser.add_argument("--lanes", default=",".join(str(x) for x in wkv_cuda.LAYOUTS))
    parser.add_argument("--classic", action="store_true", help="also the classic official kernel (own process!)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    lanes_list = [int(x) for x in args.lanes.split(",")]
    wkv_cuda.load()
    ext = torch.ops.rwkv7_wkv7_ext
    official = load_official(args.classic)
    dev = torch.cuda.get_device_name()
    rows, results = [], []

    def bench(fn):
        return do_bench(fn, warmup=25, rep=200, return_mode="median")

    for B, T, H in SHAPES:
        r, w, k, v, a, b, dy = make_inputs(B, T, H)
        xs = (r, w, k, v, a, b)
        y0, ck0, sa0 = ext.forward(*xs, None, True, 2)
        g0 = ext.backward(*xs, dy, ck0, sa0, None, 2)
        for lanes in lanes_list:
            tf = bench(lambda: ext.forward(*xs, None, True, lanes))
            y, ck, sa = ext.forward(*xs, None, True, lanes)
            tb = bench(lambda: ext.backward(*xs, dy, ck, sa, None, lanes))
            tfb = bench(lambda: ext.backward(*xs, dy, *ext.forward(*xs, None, True, lanes)[1:], None, lanes))
            tinf = bench(lambda: ext.forward(*xs, None, False, lanes))
            star = ("f" if lanes == wkv_cuda.FWD_LANES else " ") + ("b" if lanes == wkv_cuda.BWD_LANES else " ")
            rows.append((f"ours lanes={lanes}{star}", B, T, H, tf, tb, tfb, tinf))
        fl, bl = wkv_cuda.FWD_LANES, wkv_cuda.BWD_LANES
        tf = bench(lambda: ext.forward(*xs, None, True, fl))
        tfb = bench(lambda: ext.backward(*xs, dy, *ext.forward(*xs, None, True, fl)[1:], None, bl))
        rows.append((f"ours default (fwd {fl}, bwd {bl})", B, T, H, tf, tfb - tf, tfb, float("nan")))
        for name, (fwd, bwd) in official.items():
            tf = bench(lambda: fwd(*xs))
            y, s, sa = fwd(*xs)
            tb = bench(lambda: bwd(*xs, dy, s, sa))
            tfb = bench(lambda: bwd(*xs, dy, *fwd(*xs)[1:]))
            rows.append((name, B, T, H, tf, tb, tfb, float("nan")))
            grads = bwd(*xs, dy, s, sa)
            diffs = {"y": rel(y0, y)}
            if grads is not None:
                diffs.update({n: rel(g0[i], grads[i]) for i, n in enumerate(["dr", "dw", "dk", "dv", "da", "db"])})
            print(f"ours(layout 2) vs {name} at B{B} T{T} H{H}: " + " ".join(f"{k}={v:.1e}" for k, v in diffs.items()))
        torch.cuda.empty_cache()

    print(f"\nwkv7 kernel timings, {dev}, torch {torch.__version__}, CUDA {torch.version.cuda} (median ms)")
    print(f"{'kernel':34s} {'B':>3s} {'T':>5s} {'H':>3s} {'fwd':>8s} {'bwd':>8s} {'fwd+bwd':>8s} {'fwd(inf)':>8s}")
    for name, B, T, H, tf, tb, tfb, tinf in rows:
        print(f"{name:34s} {B:3d} {T:5d} {H:3d} {tf:8.3f} {tb:8.3f} {tfb:8.3f} {tinf:8.3f}")
        results.append(dict(kernel=name, B=B, T=T, H=H, fwd_ms=tf, bwd_ms=tb, fwd_bwd_ms=tfb, fwd_inference_ms=tinf,
                            device=dev))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
