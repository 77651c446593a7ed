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
from rwkv7.fsutil import atomic_write, atomic_write_text, fsync_dir
from rwkv7.model import RWKV7, shape_from_state_dict

CKPT_DIR = "ckpt"
PREFIXES = ("_forward_module.", "module.", "model.")  # wrappers' prefixes, stripped on load


def save_weights(model: torch.nn.Module, path: str | os.PathLike, dtype=torch.bfloat16) -> None:
    sd = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    atomic_write(path, lambda f: torch.save(sd, f))


def read_state_dict(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: give the path of an rwkv-*.pth file")
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
