"""rwkv7: pre-train RWKV-7 (x070) models exactly as the official RWKV-LM trainer does.

Public face: `RWKV7` (the model), `load_model(path)` (an official-format .pth → model), `model(idx)` → logits.
The package import is light (torch loads on first use), so the CLI can install its signal handlers first.
"""
__all__ = ["RWKV7", "ModelShape", "load_model"]


def __getattr__(name):
    if name in ("RWKV7", "ModelShape"):
        from rwkv7 import model

        return getattr(model, name)
    raise AttributeError(f"module 'rwkv7' has no attribute {name!r}")


def load_model(path, device="cpu", dtype=None):
    from rwkv7.checkpoint import load_weights

    return load_weights(path, device=device, dtype=dtype)
