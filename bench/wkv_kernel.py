"""Time our wkv7 CUDA kernel, forward and forward+backward, at B16 T512 H12 and B16 T4096 H12 (bf16, head 64).

    python bench/wkv_kernel.py [--fwd 28,211] [--bwd 2,112] [--lanes 2,4,8] [--json FILE]

Medians of triton.testing.do_bench over direct op calls (the forward as in training: checkpoints and sa saved).
Every forward layout (wkv_cuda.FWD_LAYOUTS) and every backward layout (wkv_cuda.BWD_LAYOUTS) is timed on its own (the
backward on layout 28's checkpoints; the cluster layouts 2xx / 12xx only on compute capability 9.0+); --lanes sets both
lists at once. The defaults in rwkv7/wkv_cuda.py are marked *.
Per shape it prints the fastest forward and backward, and times fwd+bwd for the default pair and the fastest pair.
If the official kernels were copied into the git-ignored ref/ (rwkv7_clampw_v3_for_h100.cu + rwkv7_clampw_v3.cpp;
with --classic the classic wkv7_cuda.cu + wkv7_op.cpp), they are JIT-compiled and timed side by side, and their outputs
compared with ours (same inputs; their y and gradients are bf16 too).
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
    parser.add_argument("--fwd", default=",".join(str(x) for x in wkv_cuda.FWD_LAYOUTS), help="forward layouts")
    parser.add_argument("--bwd", default=",".join(str(x) for x in wkv_cuda.BWD_LAYOUTS), help="backward layouts")
    parser.add_argument("--lanes", default=None, help="layouts for both directions (overrides --fwd and --bwd)")
    parser.add_argument("--classic", action="store_true", help="also the classic official kernel (own process!)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    fwd_list = [int(x) for x in (args.lanes or args.fwd).split(",")]
    bwd_list = [int(x) for x in (args.lanes or args.bwd).split(",")]
    for code in fwd_list:
        if code not in wkv_cuda.FWD_LAYOUTS:
            parser.error(f"unknown forward layout {code}; known: {wkv_cuda.FWD_LAYOUTS}")
    for code in bwd_list:
        if code not in wkv_cuda.BWD_LAYOUTS:
            parser.error(f"unknown backward layout {code}; known: {wkv_cuda.BWD_LAYOUTS}")
    wkv_cuda.load()
    ext = torch.ops.rwkv7_wkv7_ext
    official = load_official(args.classic)
    dev = torch.cuda.get_device_name()
    rows, results, summary = [], [], []
    nan = float("nan")

    def bench(fn):
        return do_bench(fn, warmup=25, rep=200, return_mode="median")

    def fwd_bwd(fl, bl):
        return bench(lambda: ext.backward(*xs, dy, *ext.forward(*xs, None, True, fl)[1:], None, bl))

    for B, T, H in SHAPES:
        r, w, k, v, a, b, dy = make_inputs(B, T, H)
        xs = (r, w, k, v, a, b)
        y0, ck0, sa0 = ext.forward(*xs, None, True, 2)
        g0 = ext.backward(*xs, dy, ck0, sa0, None, 2)
        ck28, sa28 = ext.forward(*xs, None, True, 28)[1:]
        fwd_times, bwd_times = {}, {}
        for lanes in fwd_list:
            tf = bench(lambda: ext.forward(*xs, None, True, lanes))
            tinf = bench(lambda: ext.forward(*xs, None, False, lanes))
            fwd_times[lanes] = tf
            star = "*" if lanes == wkv_cuda.FWD_LANES else " "
            rows.append((f"ours fwd layout {lanes}{star}", B, T, H, tf, nan, nan, tinf))
        for lanes in bwd_list:
            if not wkv_cuda.bwd_layout_supported(lanes):
                print(f"(bwd layout {lanes} skipped: needs thread-block clusters, compute capability 9.0+)")
                continue
            tb = bench(lambda: ext.backward(*xs, dy, ck28, sa28, None, lanes))
            bwd_times[lanes] = tb
            star = "*" if lanes == wkv_cuda.BWD_LANES else " "
            rows.append((f"ours bwd layout {lanes}{star}", B, T, H, nan, tb, nan, nan))
        fl, bl = wkv_cuda.FWD_LANES, wkv_cuda.BWD_LANES
        tf = bench(lambda: ext.forward(*xs, None, True, fl))
        tfb = fwd_bwd(fl, bl)
        rows.append((f"ours default (fwd {fl}, bwd {bl})", B, T, H, tf, tfb - tf, tfb, nan))
        best_f, best_b = min(fwd_times, key=fwd_times.get), min(bwd_times, key=bwd_times.get)
        if (best_f, best_b) != (fl, bl):
            tfb = fwd_bwd(best_f, best_b)
            rows.append((f"ours fastest (fwd {best_f}, bwd {best_b})", B, T, H, fwd_times[best_f], bwd_times[best_b],
                         tfb, nan))
        summary.append(f"B{B} T{T} H{H}: fastest forward layout {best_f} ({fwd_times[best_f]:.3f} ms), "
                       f"fastest backward layout {best_b} ({bwd_times[best_b]:.3f} ms)")
        for name, (fwd, bwd) in official.items():
            tf = bench(lambda: fwd(*xs))
            y, s, sa = fwd(*xs)
            tb = bench(lambda: bwd(*xs, dy, s, sa))
            tfb = bench(lambda: bwd(*xs, dy, *fwd(*xs)[1:]))
            rows.append((name, B, T, H, tf, tb, tfb, nan))
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
    print("\n".join(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
