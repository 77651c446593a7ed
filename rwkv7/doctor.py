"""`rwkv7 doctor`'s checks: the run's own (rwkv7/preflight.py: GPU, DeepSpeed, data, disk) and informational probes
(versions, the wkv7 kernel, GPU memory, wandb) that may warn but never stop a run.

Each check is one line: ok / warn / fail, a short name and what was found. A fail means the run cannot work as
configured (or the check itself broke); a warn means it may be slow or may run out of something (kernel not
prebuilt, GPU memory or disk below the estimate). GPU memory is the model of rwkv7/plan.py for the recipe's strategy
(weights, optimizer state, loss head, activations with the recipe's grad_cp), checked there against measured peaks.
Nothing here prints or stores a secret: WANDB_API_KEY and HF_TOKEN are only ever reported as set / not set.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Callable, Iterator

from rwkv7.fsutil import gib
from rwkv7.preflight import (OK, WARN, Check, check_data, check_deepspeed, check_disk, check_gpu, n_params,
                             run)
from rwkv7.recipe import Recipe
from rwkv7.strategy import Strategy


def gpu_memory_estimate(recipe: Recipe, params: int) -> int:
    """Bytes per GPU for the recipe's strategy (the model of rwkv7.plan)."""
    from rwkv7.plan import GIB, memory

    t = recipe.train
    strategy = t.strategy if t.strategy.planned else Strategy.SINGLE
    return int(memory(recipe, strategy, t.gpus, t.grad_cp, params)[0] * GIB)


def check_versions(recipe: Recipe, run_dir: Path, probe: bool) -> Check | None:
    if not probe:
        return None
    import torch

    cuda = torch.version.cuda or "none (CPU build)"
    return Check("versions", OK, f"python {platform.python_version()}, torch {torch.__version__}, "
                                 f"torch CUDA build {cuda}")


def check_kernel(recipe: Recipe, run_dir: Path, probe: bool) -> Check | None:
    import torch

    if not probe or not torch.cuda.is_available():
        return None
    from rwkv7 import wkv_cuda

    cap = torch.cuda.get_device_capability(0)
    arch = f"sm_{cap[0]}{cap[1]}"
    if os.environ.get("RWKV7_WKV_BACKEND") == "torch":
        return Check("kernel", WARN, f"RWKV7_WKV_BACKEND=torch: the wkv7 CUDA kernel is off ({arch}); training is "
                                     "much slower")
    if cap < (8, 0):
        return Check("kernel", WARN, f"GPU is {arch}; the wkv7 kernel needs sm_80 or newer: the slow torch "
                                     "backend will be used")
    prebuilt = wkv_cuda.find_prebuilt(cap)
    if prebuilt is None:
        return Check("kernel", WARN, f"no prebuilt wkv7 kernel covers {arch} in {wkv_cuda.aot_dir()} or "
                                     f"{wkv_cuda.cache_dir()}: it will be JIT-compiled on first use (needs nvcc and "
                                     "ninja, takes minutes); prebuild with `python kernels/build.py`")
    if wkv_cuda.available():
        return Check("kernel", OK, f"wkv7 CUDA kernel loads and runs on {arch} ({prebuilt.parent.name})")
    return Check("kernel", WARN, f"wkv7 kernel covers {arch} but failed to run ({wkv_cuda.unavailable_reason()}): "
                                 "training falls back to the slow torch backend")


def check_gpu_memory(recipe: Recipe, run_dir: Path, probe: bool) -> Check | None:
    import torch

    if not probe or recipe.train.accelerator != "gpu" or not torch.cuda.is_available():
        return None
    need = gpu_memory_estimate(recipe, n_params(recipe))
    free, total = torch.cuda.mem_get_info(0)
    text = f"estimate {gib(need)} per GPU (rwkv7 plan's model), {gib(free)} free of {gib(total)}"
    if need > free:
        return Check("gpu mem", WARN, text + ": may run out of memory; lower train.micro_bsz or set train.grad_cp=1")
    return Check("gpu mem", OK, text)


def check_wandb(recipe: Recipe, run_dir: Path, probe: bool) -> Check | None:
    if not probe:
        return None
    mode = os.environ.get("WANDB_MODE")
    key = "set" if os.environ.get("WANDB_API_KEY") else "not set"
    text = f"WANDB_MODE={mode if mode is not None else '(unset)'}, WANDB_API_KEY {key}"
    if (mode or "").lower() == "online" and key == "not set" and not (Path.home() / ".netrc").is_file():
        return Check("wandb", WARN, text + ": online mode without a key or ~/.netrc login")
    return Check("wandb", OK, text + " (rwkv7 train logs locally; its value is never printed)")


CHECKS: list[tuple[str, Callable]] = [
    ("versions", check_versions), ("gpu", check_gpu), ("kernel", check_kernel), ("gpu mem", check_gpu_memory),
    ("deepspeed", check_deepspeed), ("data", check_data), ("disk", check_disk), ("wandb", check_wandb),
]


def iter_checks(recipe: Recipe, run_dir: Path, probe: bool = True) -> Iterator[Check]:
    """Run every check in order (a crash is a fail with its message). probe=False skips what only informs or warns
    and touches the GPU (versions, kernel load, GPU memory, wandb)."""
    for name, fn in CHECKS:
        c = run(name, fn, recipe, Path(run_dir), probe)
        if c is not None:
            yield c
