"""Ahead-of-time build of our wkv7 CUDA kernel (kernels/wkv7) for the arch list in TORCH_CUDA_ARCH_LIST.

    python kernels/build.py [--dir DIR] [--arch 9.0a] [--verbose]

Compiles with torch.utils.cpp_extension (ninja) into DIR (default $RWKV7_KERNEL_DIR or kernels/build/), in a
sub-folder named after a hash of the sources, flags, torch and CUDA versions, next to a build.json recording the arch
list. rwkv7.wkv_cuda loads it from there; without it, the kernel is JIT-compiled once into $RWKV7_KERNEL_CACHE
(default ~/.cache/rwkv7/kernels). Exits 2 with one clear line when nvcc, ninja, a GPU or a matching arch is missing.

Also re-exports normalise_arch_list_for_deepspeed(): the GPU image sets TORCH_CUDA_ARCH_LIST=9.0a, which DeepSpeed's
op builder cannot parse; call it before importing deepspeed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rwkv7.errors import UserError  # noqa: E402
from rwkv7.wkv_cuda import aot_dir, build, normalise_arch_list_for_deepspeed  # noqa: E402,F401


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="output folder (default $RWKV7_KERNEL_DIR or kernels/build)")
    parser.add_argument("--arch", default=None, help="arch list, e.g. '9.0a' or '8.0;9.0' (default TORCH_CUDA_ARCH_LIST)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        path = build(args.dir or aot_dir(), verbose=args.verbose, arch_list=args.arch)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
