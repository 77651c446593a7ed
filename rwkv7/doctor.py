"""Environment checks for a recipe: `rwkv7 doctor` prints them, `run_training` runs the ones that can fail.

Each check is one line: ok / warn / fail, a short name and what was found. A fail means the run cannot work as
configured (no GPU for a GPU recipe, data missing or invalid, a run folder that cannot be created, too little disk for
a single checkpoint, DeepSpeed missing for a DeepSpeed strategy); a warn means it may be slow or may run out of
something (kernel not prebuilt, GPU memory or disk below the estimate). Memory and disk figures are estimates:

- GPU memory: the model of rwkv7/plan.py for the recipe's strategy (weights, optimizer state, loss head,
  activations with the recipe's grad_cp), checked there against measured peaks;
- disk in the run folder: params x 2 bytes (one bf16 weights file) + params x 16 bytes (one full checkpoint) x
  train.keep_checkpoints; hub data also needs its download size where that is known.

`preflight(recipe, run_dir)` runs the checks without probing the GPU (no kernel load, no CUDA context, so it is safe
before Lightning starts its processes) and raises UserError on the first fail. Nothing here prints or stores a
secret: WANDB_API_KEY and HF_TOKEN are only ever reported as set / not set.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from rwkv7.errors import UserError
from rwkv7.recipe import Recipe

OK, WARN, FAIL = "ok", "warn", "fail"
CHECKPOINT_BYTES_PER_PARAM = 16  # one full checkpoint (weights, masters, Adam moments), upper bound
WEIGHTS_BYTES_PER_PARAM = 2      # one bf16 rwkv-N.pth


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str

    def line(self) -> str:
        return f"{self.status:<4}  {self.name:<10} {self.detail}"


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def n_params(recipe: Recipe) -> int:
    from rwkv7.plan import count_parameters

    return count_parameters(recipe)


def gpu_memory_estimate(recipe: Recipe, params: int) -> int:
    """Bytes per GPU for the recipe's strategy (the model of rwkv7.plan)."""
    from rwkv7.plan import GIB, memory

    t = recipe.train
    strategy = t.strategy if t.strategy in ("single", "ddp") or t.strategy.startswith("deepspeed") else "single"
    return int(memory(recipe, strategy, t.devices * t.num_nodes, t.grad_cp, params)[0] * GIB)


def disk_estimate(recipe: Recipe, params: int) -> int:
    return params * WEIGHTS_BYTES_PER_PARAM + params * CHECKPOINT_BYTES_PER_PARAM * recipe.train.keep_checkpoints


def _existing_ancestor(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def folder_problem(path: Path, what: str) -> tuple[Path, str | None]:
    """The folder that exists nearest `path` and, if `path` cannot be created or written there, why not."""
    base = _existing_ancestor(path)
    if not base.is_dir():
        return base, f"cannot create {what} {path}: {base} exists and is not a folder"
    if not os.access(base, os.W_OK | os.X_OK):
        return base, f"cannot write {what} {path}: {base} is not writable"
    return base, None


# ---- the checks, in the order doctor prints them -----------------------------------------------------------------

def check_versions(recipe: Recipe, run_dir: Path, probe: bool) -> Check | None:
    if not probe:
        return None
    import torch

    cuda = torch.version.cuda or "none (CPU build)"
    return Check("versions", OK, f"python {platform.python_version()}, torch {torch.__version__}, "
                                 f"torch CUDA build {cuda}")


def _driver_version() -> str:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return "unknown (no nvidia-smi)"
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=15)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def check_gpu(recipe: Recipe, run_dir: Path, probe: bool) -> Check:
    import torch

    t = recipe.train
    present = torch.cuda.is_available()
    if t.accelerator == "gpu":
        if not present:
            raise UserError(f"recipe {recipe.name!r} needs a CUDA GPU and none is visible: on a CPU-only machine "
                            "use `make train` (recipe tiny) or --set train.accelerator=cpu train.precision=fp32 "
                            "train.strategy=auto")
        if t.devices > torch.cuda.device_count():
            raise UserError(f"train.devices={t.devices} but only {torch.cuda.device_count()} GPU(s) are visible")
    if not present:
        return Check("gpu", OK, "no CUDA GPU visible; not needed (CPU recipe)")
    detail = f"{torch.cuda.device_count()} visible"
    if probe:
        detail = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, driver {_driver_version()}, "
                  f"CUDA {torch.version.cuda}")
    return Check("gpu", OK, detail + ("" if t.accelerator == "gpu" else "; this recipe runs on CPU"))


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
    name = wkv_cuda.extension_name()
    prebuilt = next((so for root in (wkv_cuda.aot_dir(), wkv_cuda.cache_dir())
                     if (so := wkv_cuda._find_prebuilt(root, name, cap)) is not None), None)
    if prebuilt is None:
        return Check("kernel", WARN, f"no prebuilt wkv7 kernel covers {arch} in {wkv_cuda.aot_dir()} or "
                                     f"{wkv_cuda.cache_dir()}: it will be JIT-compiled on first use (needs nvcc and "
                                     "ninja, takes minutes); prebuild with `python kernels/build.py`")
    if wkv_cuda.available():
        return Check("kernel", OK, f"wkv7 CUDA kernel loads and runs on {arch} ({prebuilt.parent.name})")
    return Check("kernel", WARN, f"wkv7 kernel covers {arch} but failed to run ({wkv_cuda._state['reason']}): "
                                 "training falls back to the slow torch backend")


def check_gpu_memory(recipe: Recipe, run_dir: Path, probe: bool) -> Check | None:
    import torch

    if not probe or recipe.train.accelerator != "gpu" or not torch.cuda.is_available():
        return None
    need = gpu_memory_estimate(recipe, n_params(recipe))
    free, total = torch.cuda.mem_get_info(0)
    text = (f"estimate {_gib(need)} per GPU (rwkv7 plan's model), {_gib(free)} free of "
            f"{_gib(total)}")
    if need > free:
        return Check("gpu mem", WARN, text + ": may run out of memory; lower train.micro_bsz or set train.grad_cp=1")
    return Check("gpu mem", OK, text)


def check_deepspeed(recipe: Recipe, run_dir: Path, probe: bool) -> Check:
    t = recipe.train
    needed = t.accelerator == "gpu" and t.strategy.startswith("deepspeed")
    import importlib.util

    import torch

    found = importlib.util.find_spec("deepspeed") is not None
    if not needed:
        return Check("deepspeed", OK, f"{'installed' if found else 'not installed'}; not needed "
                                      f"(train.strategy={t.strategy}, {t.accelerator})")
    if not torch.cuda.is_available():  # the gpu check has failed already; importing it here only adds noise
        if not found:
            raise UserError(f"train.strategy={t.strategy} needs deepspeed, which is not installed: run `make setup`")
        return Check("deepspeed", OK, f"installed (train.strategy={t.strategy}); import not tried without a GPU")
    from rwkv7.wkv_cuda import normalise_arch_list_for_deepspeed

    normalise_arch_list_for_deepspeed()
    try:
        import deepspeed
    except Exception as e:  # noqa: BLE001 - any import failure means the strategy cannot run
        raise UserError(f"train.strategy={t.strategy} needs deepspeed, which failed to import ({e}): "
                        "run `make setup`") from None
    return Check("deepspeed", OK, f"deepspeed {getattr(deepspeed, '__version__', '?')} imports "
                                  f"(train.strategy={t.strategy})")


def _validate_binidx(prefix, recipe: Recipe) -> str:
    """open_binidx + check_vocab + the sampler's size and magic_prime checks; returns a summary."""
    from rwkv7.data.source import open_training_binidx

    data, _ = open_training_binidx(prefix, recipe)
    return f"{data.prefix}.bin/.idx: {len(data):,} tokens, ids < {recipe.model.vocab_size}"


def check_data(recipe: Recipe, run_dir: Path, probe: bool) -> Check:
    d = recipe.data
    if d.source == "synthetic":
        from rwkv7.data.binidx import paths
        from rwkv7.data.source import synthetic_prefix

        prefix = synthetic_prefix(recipe)
        if all(p.is_file() for p in paths(prefix)):
            detail = _validate_binidx(prefix, recipe)
        else:
            _, problem = folder_problem(prefix.parent, "data folder")
            if problem:
                raise UserError(problem)
            detail = f"synthetic: {d.synthetic_tokens:,} tokens will be generated at {prefix}"
    elif d.source == "hub":
        from rwkv7.data.fetch import KNOWN_SIZES, _bin_prefix

        data_dir = Path(d.data_dir).expanduser()
        local = data_dir / _bin_prefix(d.hub_files)
        if all((data_dir / f).is_file() for f in d.hub_files):
            detail = f"hub {d.hub_repo}, local copy: " + _validate_binidx(local, recipe)
        else:
            size = sum(KNOWN_SIZES.get((d.hub_repo, f), 0) for f in d.hub_files)
            base, problem = folder_problem(data_dir, "data.data_dir")
            if problem:
                raise UserError(problem)
            if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
                raise UserError(f"HF_HUB_OFFLINE is set and {local}.bin/.idx are not there: run `rwkv7 fetch` once "
                                "with network, or point --set data.source=binidx data.path=PREFIX at a local copy")
            if size:
                free = shutil.disk_usage(base).free
                if free < size:
                    raise UserError(f"downloading {d.hub_repo} needs {_gib(size)} in {data_dir} but only "
                                    f"{_gib(free)} is free there")
                detail = f"hub {d.hub_repo}: not in {data_dir} yet, will download {_gib(size)} ({_gib(free)} free)"
            else:
                detail = f"hub {d.hub_repo}: not in {data_dir} yet, will download (size known once fetched)"
    else:
        from rwkv7.data.source import locate

        detail = _validate_binidx(locate(recipe), recipe)  # locate: a UserError when data.path is empty
    if d.val_path:
        from rwkv7.data.binidx import check_vocab, open_binidx

        val = open_binidx(d.val_path)
        check_vocab(val, recipe.model.vocab_size)
        detail += f"; validation {len(val):,} tokens"
    return Check("data", OK, detail)


def check_disk(recipe: Recipe, run_dir: Path, probe: bool) -> Check:
    base, problem = folder_problem(run_dir, "run folder")
    if problem:
        raise UserError(f"{problem}: choose another --out")
    params = n_params(recipe)
    need = disk_estimate(recipe, params)
    one = params * (WEIGHTS_BYTES_PER_PARAM + CHECKPOINT_BYTES_PER_PARAM)
    free = shutil.disk_usage(base).free
    text = (f"{run_dir}: {_gib(free)} free; checkpoints need about {_gib(need)} (estimate: {params:,} params x "
            f"(2 B weights + 16 B x {recipe.train.keep_checkpoints} full checkpoints))")
    if free < one:
        raise UserError(f"{run_dir}: only {_gib(free)} free but one weights file and one full checkpoint need about "
                        f"{_gib(one)}: free disk space or choose another --out")
    if free < need:
        return Check("disk", WARN, text + ": may run out; lower train.keep_checkpoints or free space")
    return Check("disk", OK, text)


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
    """Run the checks in order. probe=False skips what only informs or warns and touches the GPU (versions, kernel
    load, GPU memory, wandb), leaving the checks that can fail."""
    for name, fn in CHECKS:
        try:
            c = fn(recipe, Path(run_dir), probe)
        except UserError as e:
            c = Check(name, FAIL, str(e))
        except Exception as e:  # noqa: BLE001 - a check that breaks is reported, never a traceback
            c = Check(name, WARN, f"could not check ({type(e).__name__}: {e})")
        if c is not None:
            yield c


def run_checks(recipe: Recipe, run_dir: Path) -> list[Check]:
    return list(iter_checks(recipe, run_dir, probe=True))


def preflight(recipe: Recipe, run_dir: Path) -> None:
    """Raise UserError with the first failing check's message; warnings pass silently."""
    for c in iter_checks(recipe, run_dir, probe=False):
        if c.status == FAIL:
            raise UserError(c.detail)
