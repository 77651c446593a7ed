"""The wkv7 recurrence: one function, two backends.

    wkv7(r, w, k, v, a, b, state=None, return_state=False) -> y  (or (y, final_state))

r, w, k, v, a, b: [B, T, H, N]. `w` is the raw decay logit z; the decay is exp(-e^-0.5 * sigmoid(z)) computed in fp32,
which equals the official exp(-exp(-softplus(-z) - 0.5)) (docs/ALIGNMENT.md, "decay"). State S: [B, H, N, N] fp32,
row i = value channel, column j = key channel, zero unless given. For each t:

    sa   = S a_t
    S    = S diag(decay_t) + sa b_t^T + v_t k_t^T
    y_t  = S r_t

Backends: "torch" (the reference below: fp32 state, any T, autograd; every CPU path uses it) and "cuda" (our kernel
in kernels/wkv7, registered by rwkv7.wkv_cuda as torch.library custom ops). "auto" picks cuda for CUDA tensors when the
kernel supports the shape, else torch. RWKV7_WKV_BACKEND overrides the choice (for tests and benchmarks).
"""
from __future__ import annotations

import math
import os

import torch

DECAY_SCALE = math.exp(-0.5)  # decay = exp(-DECAY_SCALE * sigmoid(z)), so decay lies in (0.545, 1)
BACKENDS = ("auto", "torch", "cuda")


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def decay_from_logit(w: torch.Tensor) -> torch.Tensor:
    return torch.exp(-DECAY_SCALE * torch.sigmoid(_at_least_fp32(w)))


def wkv7_reference(r, w, k, v, a, b, state=None, return_state=False):
    """Step-by-step recurrence in fp32 (fp64 for fp64 inputs, which the tests use as ground truth); output in r's
    dtype."""
    B, T, H, N = r.shape
    out_dtype = r.dtype
    r, k, v, a, b = (_at_least_fp32(t) for t in (r, k, v, a, b))
    decay = decay_from_logit(w)
    S = r.new_zeros(B, H, N, N) if state is None else state.to(r.dtype)
    ys = []
    for t in range(T):
        sa = torch.einsum("bhij,bhj->bhi", S, a[:, t])
        S = (S * decay[:, t, :, None, :] + sa[..., :, None] * b[:, t, :, None, :]
             + v[:, t, :, :, None] * k[:, t, :, None, :])
        ys.append(torch.einsum("bhij,bhj->bhi", S, r[:, t]))
    y = torch.stack(ys, dim=1).to(out_dtype) if T else r.new_zeros(B, 0, H, N, dtype=out_dtype)
    return (y, S) if return_state else y


def cuda_supports(r: torch.Tensor) -> bool:
    """True when the CUDA kernel can take this call (CUDA tensor, head size 64, T a multiple of 16, kernel built)."""
    if not r.is_cuda or r.shape[-1] != 64 or r.shape[1] % 16:
        return False
    from rwkv7 import wkv_cuda  # imported lazily: CPU paths never touch the CUDA build

    return wkv_cuda.available()


def select_backend(r: torch.Tensor, backend: str = "auto") -> str:
    backend = os.environ.get("RWKV7_WKV_BACKEND", backend) if backend == "auto" else backend
    if backend not in BACKENDS:
        raise ValueError(f"unknown wkv7 backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "cuda" if cuda_supports(r) else "torch"
    return backend


def wkv7(r, w, k, v, a, b, state=None, return_state=False, backend: str = "auto", recompute: bool = False):
    """recompute (CUDA kernel, training under selective recomputation): keep only the inputs for the backward, which
    reruns the forward for its per-chunk state checkpoints (fp32 B*H*(T/16)*64*64: 100 MiB per layer at 0.1b)."""
    if select_backend(r, backend) == "cuda":
        from rwkv7 import wkv_cuda

        return wkv_cuda.wkv7_cuda(r, w, k, v, a, b, state=state, return_state=return_state, recompute=recompute)
    return wkv7_reference(r, w, k, v, a, b, state=state, return_state=return_state)
