"""The chunked form of the wkv (rwkv7/wkv_chunked.py, the specification of a tensor-core kernel) against the
step-by-step reference, in fp64, including the decays at both ends of their range within one chunk."""
import pytest
import torch

from rwkv7.wkv import wkv7_reference
from rwkv7.wkv_chunked import MAX_GROWTH, MIN_DECAY, wkv7_chunked


def inputs(B, T, H, zrange, seed, dtype=torch.float64):
    """Model-shaped inputs: r, k, v ~ 0.5 randn; decay logits spread over zrange; a = -kk, b = kk * iclr."""
    g = torch.Generator().manual_seed(seed)
    shape = (B, T, H, 64)
    r, k, v = (0.5 * torch.randn(shape, generator=g, dtype=dtype) for _ in range(3))
    lo, hi = zrange
    w = lo + (hi - lo) * torch.rand(shape, generator=g, dtype=dtype)
    kk = torch.nn.functional.normalize(torch.randn(shape, generator=g, dtype=dtype), dim=-1)
    iclr = torch.sigmoid(torch.randn(shape, generator=g, dtype=dtype))
    s0 = 0.3 * torch.randn(B, H, 64, 64, generator=g, dtype=dtype)
    return (r, w, k, v, -kk, kk * iclr), s0


def rel(x, ref):
    return float((x - ref).norm() / ref.norm())


@pytest.mark.parametrize("T,chunk", [(16, 16), (64, 16), (37, 16), (48, 64), (20, 1)])
@pytest.mark.parametrize("zrange", [(-1.0, 3.0), (-30.0, 30.0)])  # the second: decays near 1 and near the minimum
def test_chunked_equals_step_by_step_in_fp64(T, chunk, zrange):
    xs, s0 = inputs(2, T, 2, zrange, seed=T + chunk)
    y_ref, s_ref = wkv7_reference(*xs, state=s0, return_state=True)
    y, s = wkv7_chunked(*xs, state=s0, return_state=True, chunk=chunk)
    assert y.dtype == torch.float64 and s.shape == s_ref.shape
    assert rel(y, y_ref) < 1e-10 and rel(s, s_ref) < 1e-10


def test_chunked_in_fp32_stays_within_fp32_rounding_at_extreme_decays():
    """fp32, the hardest decays (logits +-30 within each chunk of 16): the 1/g factors reach about MAX_GROWTH."""
    xs, s0 = inputs(1, 64, 2, (-30.0, 30.0), seed=7)
    y_ref = wkv7_reference(*xs, state=s0)
    y = wkv7_chunked(*(x.float() for x in xs), state=s0.float())
    assert rel(y.double(), y_ref) < 1e-4
    assert 1e4 < MAX_GROWTH < 2e4 and 0.545 < MIN_DECAY < 0.546


def test_chunked_gradients_match_the_reference():
    xs, s0 = inputs(1, 24, 1, (-3.0, 5.0), seed=3)
    grads = []
    for fn in (wkv7_reference, wkv7_chunked):
        leaves = [x.clone().requires_grad_() for x in xs] + [s0.clone().requires_grad_()]
        y, s = fn(*leaves[:6], state=leaves[6], return_state=True)
        (y.square().sum() + s.sum()).backward()
        grads.append([t.grad for t in leaves])
    for g_ref, g in zip(*grads):
        assert rel(g, g_ref) < 1e-9


def test_chunk_must_be_positive():
    xs, _ = inputs(1, 4, 1, (0.0, 1.0), seed=0)
    with pytest.raises(ValueError, match="chunk"):
        wkv7_chunked(*xs, chunk=0)
