"""Checkpoints: official-format weights (`rwkv-N.pth`) and full training checkpoints for exact resume.

Weights: a flat state dict with the official names, bf16 by default like the official trainer's files, loadable by
the `rwkv` package and the official demos. Full checkpoints: a folder `ckpt/step-NNNNNNNN/` holding `meta.json` (step,
mini-epoch records, partial mini-epoch sums, recipe fingerprint) and `state.pt` (model + optimizer, CPU/plain
runs) or DeepSpeed's own files. A folder is written under a temporary name and renamed when complete, so a
checkpoint is either whole or absent. All loads use torch.load(weights_only=True): no pickle code runs.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from rwkv7.errors import UserError
from rwkv7.fsutil import (atomic_write, atomic_write_text, ensure_space, fsync_dir, is_write_failure,
                          write_failure_message)
from rwkv7.model import RWKV7, shape_from_state_dict

CKPT_DIR = "ckpt"
PREFIXES = ("_forward_module.", "module.", "model.")  # wrappers' prefixes, stripped on load


def save_weights(model: torch.nn.Module, path: str | os.PathLike, dtype=torch.bfloat16) -> None:
    save_state_dict(model.state_dict(), path, dtype)


def save_state_dict(sd: dict, path: str | os.PathLike, dtype=torch.bfloat16) -> None:
    """Write weights atomically; a failed write (full disk, no permission, ...) is a UserError and leaves no file."""
    path = Path(path)
    sd = {k: v.detach().to("cpu", dtype) for k, v in sd.items()}
    need = sum(v.numel() * v.element_size() for v in sd.values())
    try:
        ensure_space(path.parent, need)
        atomic_write(path, lambda f: torch.save(sd, f))
    except Exception as e:
        if not is_write_failure(e):
            raise
        raise UserError(write_failure_message(path.name, path.parent, e, need)) from None


def read_state_dict(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: give the path of an rwkv-*.pth file")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e}): make it readable (chmod +r)") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or foreign files
        raise UserError(f"{path} is not a readable PyTorch weights file ({type(e).__name__}): "
                        "was it truncated, or written by something else?") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} does not hold a flat state dict of tensors (an official-format rwkv-*.pth)")
    for prefix in PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_weights(path: str | os.PathLike, device="cpu", dtype=None) -> RWKV7:
    """An official-format .pth → RWKV7 in eval mode (dtype: the file's, unless given)."""
    sd = read_state_dict(path)
    try:
        shape = shape_from_state_dict(sd)
    except (KeyError, ValueError):
        raise UserError(f"{path} is not an RWKV-7 checkpoint (no emb.weight / blocks.0.att.r_k)") from None
    model = RWKV7(shape)
    load_into(model, sd, str(path))
    dtype = dtype or sd["emb.weight"].dtype
    return model.to(device=device, dtype=dtype).eval()


def load_into(model: RWKV7, sd: dict, origin: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or extra or wrong:
        detail = "; ".join(f"{what}: {', '.join(ks[:3])}{' ...' if len(ks) > 3 else ''}"
                           for what, ks in (("missing", missing), ("unexpected", extra), ("shape differs", wrong))
                           if ks)
        raise UserError(f"{origin} does not match this model ({detail}): check the recipe's [model] section")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(sd[k].to(v.dtype))


# ---- full training checkpoints ------------------------------------------------------------------------------------

def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = run_dir / CKPT_DIR
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "meta.json").is_file()]
    return sorted(done, key=lambda p: p.name)


def begin_checkpoint(run_dir: Path, step: int) -> Path:
    """A fresh temporary folder to write checkpoint `step` into; finish with commit_checkpoint."""
    tmp = run_dir / CKPT_DIR / f".tmp-step-{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(tmp: Path, meta: dict, keep: int) -> Path:
    """Write meta.json last, rename the folder into place, then drop all but the newest `keep`."""
    atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1))
    final = tmp.parent / tmp.name.replace(".tmp-", "")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    for old in checkpoint_dirs(tmp.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_bytes(run_dir: Path, model: torch.nn.Module) -> int:
    """What the next full checkpoint needs: the size of the newest one, else fp32 weights and two Adam moments."""
    dirs = checkpoint_dirs(run_dir)
    if dirs:
        try:
            return sum(f.stat().st_size for f in dirs[-1].rglob("*") if f.is_file())
        except OSError:  # removed meanwhile: estimate instead
            pass
    return 12 * sum(p.numel() for p in model.parameters())


def write_error(run_dir: Path, step: int, error: BaseException | None, need: int | None) -> UserError:
    """The one-line error for a checkpoint that could not be written (the newest complete one is kept)."""
    kept = checkpoint_dirs(run_dir)
    keep = f"kept {kept[-1].name}" if kept else "no earlier checkpoint exists"
    if error is None:
        return UserError(f"could not write the checkpoint of step {step}: another rank could not write its part "
                         f"({keep}); free disk space in {run_dir} and run the same command to resume")
    return UserError(write_failure_message(f"the checkpoint of step {step}", run_dir / CKPT_DIR, error, need,
                                           f", then run the same command to resume ({keep})"))


def read_meta(ckpt: Path) -> dict:
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {ckpt} is unreadable ({e}): delete that folder to resume from an older one")
    state = meta.get("state") if isinstance(meta, dict) else None
    if not (isinstance(state, dict) and isinstance(meta.get("fingerprint"), str)
            and isinstance(state.get("step"), int) and isinstance(state.get("records", []), list)):
        raise UserError(f"checkpoint {ckpt} is unreadable (meta.json lacks a valid state and fingerprint): "
                        "delete that folder to resume from an older one")
    return meta


def save_plain_state(tmp: Path, model: torch.nn.Module, optimizer) -> None:
    state = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "optimizer": optimizer.state_dict()}
    atomic_write(tmp / "state.pt", lambda f: torch.save(state, f))


def load_plain_state(ckpt: Path) -> dict:
    try:
        return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {ckpt}/state.pt is unreadable ({type(e).__name__}): "
                        "delete that folder to resume from an older one") from None
