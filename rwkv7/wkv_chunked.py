"""The wkv7 recurrence in chunks: the state update and outputs of L steps as small matrix products.

This is the formulation a tensor-core kernel computes (issue "wkv7 at tensor-core speed"); here it is written in
PyTorch, in fp32 or fp64, as the tested specification of that kernel. It computes the same function as
rwkv7.wkv.wkv7_reference (tests/test_wkv_chunked.py compares them in fp64); the derivation is in docs/ALIGNMENT.md
("The chunked form of the wkv").

Per step (rwkv7/wkv.py): S_t = S_{t-1} (D_t + a_t b_t^T) + v_t k_t^T, y_t = S_t r_t, D_t = diag(decay_t).
Within a chunk starting from state S0, with g_t = decay_1 * ... * decay_t (elementwise, g_0 = 1):
    a~_t = g_{t-1} a_t,  r~_t = g_t r_t,  b^_s = b_s / g_s,  k^_s = k_s / g_s           (rows of [L, N] matrices)
    SA  = (I - tril_-1(A~ B^T))^-1 (A~ S0^T + tril_-1(A~ K^T) V)                       (row t: (S_{t-1} a_t)^T)
    Y   = R~ S0^T + tril_0(R~ B^T) SA + tril_0(R~ K^T) V
    S_L = (S0 + SA^T B^ + V^T K^) diag(g_L)
tril_-1 keeps the strictly lower triangle (s < t), tril_0 the lower triangle with the diagonal (s <= t). Every
entry of tril(A~ K^T) is a_t . (g_{t-1} / g_s) k_s with g_{t-1} / g_s <= 1, so the products are bounded; only the
separate factors 1/g_s grow, by at most 1 / min(decay)^L (module constant MAX_GROWTH).
"""
from __future__ import annotations

import math

import torch

from rwkv7.wkv import decay_from_logit

MIN_DECAY = math.exp(-math.exp(-0.5))  # decay = exp(-e^-0.5 sigmoid(z)) > this, whatever the logit z
DEFAULT_CHUNK = 16
MAX_GROWTH = MIN_DECAY ** -DEFAULT_CHUNK  # the largest 1/g over a default chunk: about 1.6e4


def wkv7_chunked(r, w, k, v, a, b, state=None, return_state=False, chunk: int = DEFAULT_CHUNK):
    """Same contract as rwkv7.wkv.wkv7_reference (inputs [B, T, H, N], w the raw decay logit, state [B, H, N, N]
    fp32), computed chunk by chunk; T need not be a multiple of `chunk`. Math in fp32 (fp64 for fp64 inputs)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    B, T, H, N = r.shape
    out_dtype, acc = r.dtype, torch.promote_types(r.dtype, torch.float32)
    r, k, v, a, b = (t.to(acc).transpose(1, 2) for t in (r, k, v, a, b))  # [B, H, T, N]
    decay = decay_from_logit(w).to(acc).transpose(1, 2)
    S = r.new_zeros(B, H, N, N) if state is None else state.to(acc)
    ys = []
    for t0 in range(0, T, chunk):
        sl = slice(t0, min(t0 + chunk, T))
        y, S = _chunk(r[:, :, sl], decay[:, :, sl], k[:, :, sl], v[:, :, sl], a[:, :, sl], b[:, :, sl], S)
        ys.append(y)
    y = torch.cat(ys, 2) if ys else r.new_zeros(B, H, 0, N)
    y = y.transpose(1, 2).to(out_dtype)
    return (y, S) if return_state else y


def _chunk(r, decay, k, v, a, b, S0):
    """One chunk: inputs [B, H, L, N], S0 [B, H, N, N] (row i = value channel). Returns (y [B, H, L, N], S_L)."""
    L = r.shape[2]
    g = torch.cumprod(decay, dim=2)                                    # g_t, t = 1..L
    g_prev = torch.cat([torch.ones_like(g[:, :, :1]), g[:, :, :-1]], 2)  # g_{t-1}
    a_t, r_t = a * g_prev, r * g                                       # a~, r~
    b_h, k_h = b / g, k / g                                            # b^, k^
    strict = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)
    incl = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(0)
    A_ab = (a_t @ b_h.transpose(-1, -2)).masked_fill(~strict, 0)
    A_ak = (a_t @ k_h.transpose(-1, -2)).masked_fill(~strict, 0)
    S0_T = S0.transpose(-1, -2)
    eye = torch.eye(L, dtype=r.dtype, device=r.device)
    sa = torch.linalg.solve_triangular(eye - A_ab, a_t @ S0_T + A_ak @ v, upper=False, unitriangular=True)
    R_b = (r_t @ b_h.transpose(-1, -2)).masked_fill(~incl, 0)
    R_k = (r_t @ k_h.transpose(-1, -2)).masked_fill(~incl, 0)
    y = r_t @ S0_T + R_b @ sa + R_k @ v
    S = (S0 + sa.transpose(-1, -2) @ b_h + v.transpose(-1, -2) @ k_h) * g[:, :, -1:, :]
    return y, S
