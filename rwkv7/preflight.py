"""The checks a run needs to pass before any work: GPU, DeepSpeed, data, run folder and disk.

Each check returns a `Check` (ok / warn / fail, a short name, what was found) or raises UserError for a fail; `run`
turns both, and a check that crashes, into a Check: a crash is a fail carrying its message, never a silent pass.
`preflight(recipe, run_dir)` (called by the training run) raises UserError on the first fail; it never probes the GPU
(no kernel load, no CUDA context), so it is safe before Lightning starts its processes. `rwkv7 doctor` runs these and
the informational probes of rwkv7/doctor.py.

Disk in the run folder: params x 2 bytes (one bf16 weights file) + params x 16 bytes (one full checkpoint) x
train.keep_checkpoints; hub data also needs its download size where that is known.
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rwkv7.errors import UserError
from rwkv7.fsutil import folder_problem, free_bytes, gib
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


def run(name: str, fn: Callable, *args) -> Check | None:
    """One check as a result: UserError is a fail with its message; any other exception is a fail too (the check
    itself broke, so nothing is known to be fine)."""
    try:
        return fn(*args)
    except UserError as e:
        return Check(name, FAIL, str(e))
    except Exception as e:  # noqa: BLE001 - a broken check is reported as a fail, never a traceback
        return Check(name, FAIL, f"the check itself failed ({type(e).__name__}: {e})")


def n_params(recipe: Recipe) -> int:
    from rwkv7.plan import count_parameters

    return count_parameters(recipe)


def disk_estimate(recipe: Recipe, params: int) -> int:
    return params * WEIGHTS_BYTES_PER_PARAM + params * CHECKPOINT_BYTES_PER_PARAM * recipe.train.keep_checkpoints


def driver_version() -> str:
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
        detail = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, driver {driver_version()}, "
                  f"CUDA {torch.version.cuda}")
    return Check("gpu", OK, detail + ("" if t.accelerator == "gpu" else "; this recipe runs on CPU"))


def check_deepspeed(recipe: Recipe, run_dir: Path, probe: bool) -> Check:
    import torch

    t = recipe.train
    found = importlib.util.find_spec("deepspeed") is not None
    if not (t.accelerator == "gpu" and t.strategy.uses_deepspeed):
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


def validate_binidx(prefix, recipe: Recipe) -> str:
    """open_binidx + check_vocab + the sampler's size and magic_prime checks; returns a summary."""
    from rwkv7.data.source import open_training_binidx

    data, _ = open_training_binidx(prefix, recipe)
    return f"{data.prefix}.bin/.idx: {len(data):,} tokens, ids < {recipe.model.vocab_size}"


def missing_data(recipe: Recipe, loc) -> str:
    """What will happen to data that is not there yet, or a UserError when it cannot be made or fetched."""
    d = recipe.data
    if d.source == "synthetic":
        _, problem = folder_problem(loc.folder, "data folder")
        if problem:
            raise UserError(problem)
        return f"synthetic: {d.synthetic_tokens:,} tokens will be generated at {loc.prefix}"
    from rwkv7.data.fetch import hub_offline

    _, problem = folder_problem(loc.folder, "data.data_dir")
    if problem:
        raise UserError(problem)
    if hub_offline():
        raise UserError(f"HF_HUB_OFFLINE is set and {loc.prefix}.bin/.idx are not there: run `rwkv7 fetch` once "
                        "with network, or point --set data.path=PREFIX at a local copy")
    if not loc.download_bytes:
        return f"hub {d.hub_repo}: not in {loc.folder} yet, will download (size known once fetched)"
    free = free_bytes(loc.folder)
    if free < loc.download_bytes:
        raise UserError(f"downloading {d.hub_repo} needs {gib(loc.download_bytes)} in {loc.folder} but only "
                        f"{gib(free)} is free there")
    return f"hub {d.hub_repo}: not in {loc.folder} yet, will download {gib(loc.download_bytes)} ({gib(free)} free)"


def check_data(recipe: Recipe, run_dir: Path, probe: bool) -> Check:
    from rwkv7.data.source import data_location

    d = recipe.data
    loc = data_location(recipe)  # a UserError when data.path is empty
    if not loc.present:
        detail = missing_data(recipe, loc)
    else:
        detail = (f"hub {d.hub_repo}, local copy: " if d.source == "hub" else "") + validate_binidx(loc.prefix, recipe)
    if d.val_path:
        from rwkv7.data.binidx import check_vocab, open_binidx

        val = open_binidx(d.val_path)
        check_vocab(val, recipe.model.vocab_size)
        detail += f"; validation {len(val):,} tokens"
    return Check("data", OK, detail)


def check_disk(recipe: Recipe, run_dir: Path, probe: bool) -> Check:
    _, problem = folder_problem(run_dir, "run folder")
    if problem:
        raise UserError(f"{problem}: choose another --out")
    params = n_params(recipe)
    need = disk_estimate(recipe, params)
    one = params * (WEIGHTS_BYTES_PER_PARAM + CHECKPOINT_BYTES_PER_PARAM)
    free = free_bytes(run_dir)
    text = (f"{run_dir}: {gib(free)} free; checkpoints need about {gib(need)} (estimate: {params:,} params x "
            f"(2 B weights + 16 B x {recipe.train.keep_checkpoints} full checkpoints))")
    if free < one:
        raise UserError(f"{run_dir}: only {gib(free)} free but one weights file and one full checkpoint need about "
                        f"{gib(one)}: free disk space or choose another --out")
    if free < need:
        return Check("disk", WARN, text + ": may run out; lower train.keep_checkpoints or free space")
    return Check("disk", OK, text)


# the checks a run must pass, in the order doctor prints them among its probes
RUN_CHECKS: list[tuple[str, Callable]] = [("gpu", check_gpu), ("deepspeed", check_deepspeed), ("data", check_data),
                                          ("disk", check_disk)]


def preflight(recipe: Recipe, run_dir: Path) -> None:
    """Raise UserError with the first failing check's message; warnings pass silently."""
    for name, fn in RUN_CHECKS:
        c = run(name, fn, recipe, Path(run_dir), False)
        if c is not None and c.status == FAIL:
            raise UserError(c.detail)
