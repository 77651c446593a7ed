"""rwkv7: pre-train RWKV-7 (x070) models exactly as the official RWKV-LM trainer does.

Public face: `RWKV7` (the model), `load_model(path)` (an official-format .pth → model), `model(idx)` → logits.
"""
from rwkv7.model import RWKV7, ModelShape

__all__ = ["RWKV7", "ModelShape", "load_model"]


def load_model(path, device="cpu", dtype=None):
    from rwkv7.checkpoint import load_weights

    return load_weights(path, device=device, dtype=dtype)
