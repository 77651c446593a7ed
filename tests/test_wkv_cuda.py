"""Our wkv7 CUDA kernel (rwkv7.wkv_cuda) against an fp64 reference, plus CPU-side dispatch checks.

GPU tests skip without CUDA. Each compares the forward output, the final state, all six input gradients and the
initial-state gradient with an fp64 autograd reference by ||x - ref|| / ||ref|| <= 5e-3, on inputs drawn the way the
model makes them (a = -kk, b = kk * sigmoid(.), kk L2-normalised per head). Outputs are checked fully written: the
caching allocator is filled with NaN before every kernel call, so an unwritten element shows up as NaN.
"""
import os

import pytest
import torch

from rwkv7 import wkv, wkv_cuda
from rwkv7.errors import UserError

TOL = 5e-3
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def reference_fp64(r, w, k, v, a, b, state=None):
    """The reference recurrence on float64 inputs (it computes in fp64 then): our ground truth."""
    return wkv.wkv7_reference(r, w, k, v, a, b, state=state, return_state=True)


def make_inputs(B, T, H, device, zrange=(-1.0, 3.0), seed=0):
    """bf16 inputs with the model's structure: r,k,v ~ 0.5 randn; w logits spread over zrange; a=-kk, b=kk*iclr."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (B, T, H, 64)
    r, k, v = (torch.randn(shape, generator=g) * 0.5 for _ in range(3))
    lo, hi = zrange
    w = torch.rand(shape, generator=g) * (hi - lo) + lo + 0.5 * torch.randn(shape, generator=g)
    kk = torch.nn.functional.normalize(torch.randn(shape, generator=g), dim=-1)
    iclr = torch.sigmoid(torch.randn(shape, generator=g))
    a, b = -kk, kk * iclr
    return [x.to(device=device, dtype=torch.bfloat16) for x in (r, w, k, v, a, b)]


def rel(x, ref):
    x, ref = x.double(), ref.double()
    assert torch.isfinite(x).all(), "non-finite values (unwritten output?)"
    return ((x - ref).norm() / ref.norm()).item()


def poison():
    """Fill free memory of the caching allocator with NaN so that unwritten outputs are caught."""
    free, _ = torch.cuda.mem_get_info()
    n = min(free // 4, 1 << 30) // 4
    torch.empty(n, dtype=torch.float32, device="cuda").fill_(float("nan"))  # large-block pool
    [torch.empty(1 << 17, device="cuda").fill_(float("nan")) for _ in range(16)]  # small-block pool (<= 1 MB)
    torch.cuda.synchronize()


def run_kernel(xs, s0, dy, dsT):
    leaves = [x.clone().requires_grad_() for x in xs]
    s0 = None if s0 is None else s0.clone().requires_grad_()
    poison()
    y, sT = wkv_cuda.wkv7_cuda(*leaves, state=s0, return_state=True)
    poison()
    torch.autograd.backward([y, sT], [dy, dsT])
    grads = [x.grad for x in leaves] + ([s0.grad] if s0 is not None else [])
    return y, sT, grads


def run_reference(xs, s0, dy, dsT):
    leaves = [x.double().requires_grad_() for x in xs]
    s064 = None if s0 is None else s0.double().requires_grad_()
    y, sT = reference_fp64(*leaves, state=s064)
    torch.autograd.backward([y, sT], [dy.double(), dsT.double()])
    grads = [x.grad for x in leaves] + ([s064.grad] if s0 is not None else [])
    return y, sT, grads


# (B, T, H, with initial state, w-logit range): every B in {1,3,16}, T in {16,64,512,4096}, H in {1,12,32}
CASES = [
    (1, 16, 1, False, (-1.0, 3.0)),
    (16, 16, 12, True, (-1.0, 3.0)),
    (3, 64, 12, True, (-1.0, 3.0)),
    (16, 64, 32, True, (-1.0, 3.0)),
    (3, 512, 12, True, (-1.0, 3.0)),
    (16, 512, 1, False, (-7.0, -1.0)),  # near-1 decays, as at initialisation
    (1, 4096, 1, True, (-1.0, 3.0)),
    (1, 4096, 12, False, (2.0, 6.0)),  # strongest decays: worst case for the backward's state inversion
]


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("B,T,H,with_state,zrange", CASES)
def test_matches_fp64_reference(B, T, H, with_state, zrange):
    xs = make_inputs(B, T, H, "cuda", zrange, seed=B * 1000 + T + H)
    g = torch.Generator(device="cpu").manual_seed(1)
    s0 = (torch.randn(B, H, 64, 64, generator=g) * 0.3).cuda() if with_state else None
    dy = (torch.randn(B, T, H, 64, generator=g) * 0.5).to("cuda", torch.bfloat16)
    dsT = (torch.randn(B, H, 64, 64, generator=g) * 0.1).cuda()
    y, sT, grads = run_kernel(xs, s0, dy, dsT)
    y_ref, sT_ref, grads_ref = run_reference(xs, s0, dy, dsT)
    assert y.dtype == torch.bfloat16 and sT.dtype == torch.float32 and sT.shape == (B, H, 64, 64)
    errors = {"y": rel(y, y_ref), "final_state": rel(sT, sT_ref)}
    for name, g_, g_ref in zip(["dr", "dw", "dk", "dv", "da", "db", "ds0"], grads, grads_ref):
        errors[name] = rel(g_, g_ref)
    print(f"B{B} T{T} H{H} state={with_state} z{zrange}: " + " ".join(f"{k}={v:.1e}" for k, v in errors.items()))
    assert all(e <= TOL for e in errors.values()), errors


def run_layouts(fwd, bwd, T, seed):
    """Forward with layout `fwd`, backward with layout `bwd`, through the raw ops, against the fp64 reference:
    y, final state, all six gradients and ds0 (initial state in, final-state gradient in), a repeat that must be
    bit-identical, and the inference path (no saving), which must give the same y and final state."""
    wkv_cuda.load()
    ext = torch.ops.rwkv7_wkv7_ext
    B, H = 3, 12
    xs = make_inputs(B, T, H, "cuda", seed=seed)
    s0 = torch.randn(B, H, 64, 64, device="cuda") * 0.3
    dy = (torch.randn(B, T, H, 64, device="cuda") * 0.5).bfloat16()
    dsT = torch.randn(B, H, 64, 64, device="cuda") * 0.1
    poison()
    y, ckpt, sa = ext.forward(*xs, s0, True, fwd)
    poison()
    grads = ext.backward(*xs, dy, ckpt, sa, dsT, bwd)
    y_ref, sT_ref, grads_ref = run_reference(xs, s0, dy, dsT)
    assert ckpt.shape == (B, H, T // 16, 64, 64) and sa.shape == (B, T, H, 64)
    assert rel(y, y_ref) <= TOL and rel(ckpt[:, :, -1], sT_ref) <= 1e-4
    for name, g_, g_ref in zip(["dr", "dw", "dk", "dv", "da", "db", "ds0"], grads, grads_ref):
        assert rel(g_, g_ref) <= TOL, (name, rel(g_, g_ref))
    poison()
    y1, ckpt1, sa1 = ext.forward(*xs, s0, True, fwd)
    grads1 = ext.backward(*xs, dy, ckpt1, sa1, dsT, bwd)
    assert torch.equal(y1, y) and torch.equal(ckpt1, ckpt) and torch.equal(sa1, sa)
    assert all(torch.equal(a, b) for a, b in zip(grads1, grads))
    # inference mode keeps only the final state, and it is the same
    poison()
    y2, final, sa2 = ext.forward(*xs, s0, False, fwd)
    assert torch.equal(y2, y) and torch.equal(final[:, :, 0], ckpt[:, :, -1]) and sa2.numel() == 0
    return xs, s0, (y, ckpt, sa), grads


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("T", [16, 80])
@pytest.mark.parametrize("lanes", wkv_cuda.FWD_LAYOUTS)
def test_every_forward_layout(lanes, T):
    """Each compiled forward layout (backward: layout 2). Its checkpoints and sa, which the backward reads, must also
    match layout 28's closely: same [B,H,T/16,64,64] and [B,T,H,64] layouts, every element written."""
    xs, s0, (y, ckpt, sa), _ = run_layouts(lanes, 2, T, seed=lanes + T)
    y28, ckpt28, sa28 = torch.ops.rwkv7_wkv7_ext.forward(*xs, s0, True, 28)
    assert rel(ckpt, ckpt28) <= 1e-5 and rel(sa, sa28) <= 1e-5 and rel(y, y28) <= 1e-2


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("T", [16, 80])
@pytest.mark.parametrize("lanes", wkv_cuda.BWD_LAYOUTS)
def test_every_backward_layout(lanes, T):
    """Each compiled backward layout (forward: layout 28); the cluster layouts only where clusters exist (sm_90+)."""
    if not wkv_cuda.bwd_layout_supported(lanes):
        pytest.skip(f"backward layout {lanes} needs thread-block clusters (compute capability 9.0+)")
    run_layouts(28, lanes, T, seed=lanes + T)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("lanes", wkv_cuda.CLUSTER_BWD_LAYOUTS)
def test_cluster_backward_layouts(lanes):
    """The cluster (2-block) backward layouts, decay folded or not: against fp64 with the strongest decays (worst case
    for the state inversion and for the folded per-column scales) over many chunks, and close to layout 112 (same
    math, other summation order); on GPUs without clusters the launch must fail cleanly, not run."""
    wkv_cuda.load()
    ext = torch.ops.rwkv7_wkv7_ext
    B, T, H = 2, 256, 12
    xs = make_inputs(B, T, H, "cuda", zrange=(2.0, 6.0), seed=lanes)
    g = torch.Generator(device="cpu").manual_seed(2)
    s0 = (torch.randn(B, H, 64, 64, generator=g) * 0.3).cuda()
    dy = (torch.randn(B, T, H, 64, generator=g) * 0.5).to("cuda", torch.bfloat16)
    dsT = (torch.randn(B, H, 64, 64, generator=g) * 0.1).cuda()
    y, ckpt, sa = ext.forward(*xs, s0, True, 28)
    if not wkv_cuda.bwd_layout_supported(lanes):
        with pytest.raises(RuntimeError, match="not supported"):
            ext.backward(*xs, dy, ckpt, sa, dsT, lanes)
        torch.cuda.synchronize()
        return
    poison()
    grads = ext.backward(*xs, dy, ckpt, sa, dsT, lanes)
    _, _, grads_ref = run_reference(xs, s0, dy, dsT)
    grads112 = ext.backward(*xs, dy, ckpt, sa, dsT, 112)
    for name, g_, g_ref, g112 in zip(["dr", "dw", "dk", "dv", "da", "db", "ds0"], grads, grads_ref, grads112):
        assert rel(g_, g_ref) <= TOL, (name, rel(g_, g_ref))
        assert rel(g_, g112) <= 1e-2, (name, rel(g_, g112))
    assert all(torch.equal(a, b) for a, b in zip(ext.backward(*xs, dy, ckpt, sa, dsT, lanes), grads))
    # without a final-state gradient (dsT = None): same as passing zeros
    zero = ext.backward(*xs, dy, ckpt, sa, torch.zeros_like(dsT), lanes)
    assert all(torch.equal(a, b) for a, b in zip(ext.backward(*xs, dy, ckpt, sa, None, lanes), zero))


@cuda
@pytest.mark.gpu
def test_split_layouts_repeat_layout_28_exactly():
    """Forward 128, 228, 428 and backward 128 do layout 28's per-row arithmetic in the same order (only the staging,
    and for the forward the number of blocks per head, differ), so their outputs are bit-identical to layout 28's."""
    wkv_cuda.load()
    ext = torch.ops.rwkv7_wkv7_ext
    B, T, H = 3, 80, 12
    xs = make_inputs(B, T, H, "cuda", seed=9)
    s0 = torch.randn(B, H, 64, 64, device="cuda") * 0.3
    dy = (torch.randn(B, T, H, 64, device="cuda") * 0.5).bfloat16()
    dsT = torch.randn(B, H, 64, 64, device="cuda") * 0.1
    y, ckpt, sa = ext.forward(*xs, s0, True, 28)
    for lanes in (128, 228, 428):
        out = ext.forward(*xs, s0, True, lanes)
        assert all(torch.equal(a, b) for a, b in zip(out, (y, ckpt, sa))), lanes
    grads = ext.backward(*xs, dy, ckpt, sa, dsT, 28)
    assert all(torch.equal(a, b) for a, b in zip(ext.backward(*xs, dy, ckpt, sa, dsT, 128), grads))


def test_lane_codes_parse_and_validate():
    assert wkv_cuda.parse_lanes("211,112") == (211, 112)
    assert wkv_cuda.parse_lanes("1228,1212") == (1228, 1212)
    assert wkv_cuda.bwd_layout_supported(1212, (9, 0)) and not wkv_cuda.bwd_layout_supported(212, (8, 9))
    assert wkv_cuda.bwd_layout_supported(112, (8, 0)) and not wkv_cuda.bwd_layout_supported(1228, (9, 0))
    assert wkv_cuda.parse_lanes(f"{wkv_cuda.FWD_LANES},{wkv_cuda.BWD_LANES}") == (wkv_cuda.FWD_LANES,
                                                                                   wkv_cuda.BWD_LANES)
    for bad in ("211", "211,1228", "3,2", "x,2", "28,2,2"):
        with pytest.raises(UserError, match="RWKV7_WKV_LANES"):
            wkv_cuda.parse_lanes(bad)


@cuda
@pytest.mark.gpu
def test_bit_identical_runs():
    B, T, H = 3, 512, 12
    xs = make_inputs(B, T, H, "cuda", seed=7)
    s0 = torch.randn(B, H, 64, 64, device="cuda") * 0.3
    dy = (torch.randn(B, T, H, 64, device="cuda") * 0.5).bfloat16()
    dsT = torch.randn(B, H, 64, 64, device="cuda") * 0.1
    first = run_kernel(xs, s0, dy, dsT)
    second = run_kernel(xs, s0, dy, dsT)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert all(torch.equal(a, b) for a, b in zip(first[2], second[2]))


@cuda
@pytest.mark.gpu
def test_public_wkv7_dispatch_fp32_inputs_and_odd_T():
    """wkv7(..., backend='cuda') casts fp32 inputs to bf16, returns r's dtype, pads T to a multiple of 16."""
    B, T, H = 2, 40, 4
    xs = [x.float() for x in make_inputs(B, T, H, "cuda", seed=3)]
    s0 = torch.randn(B, H, 64, 64, device="cuda") * 0.3
    assert wkv.select_backend(xs[0]) == "torch"  # auto: T=40 is not a multiple of 16
    y, sT = wkv.wkv7(*xs, state=s0, return_state=True, backend="cuda")
    y_ref, sT_ref = reference_fp64(*(x.double() for x in xs), state=s0.double())
    assert y.dtype == torch.float32 and rel(y, y_ref) <= TOL and rel(sT, sT_ref) <= 1e-4
    with torch.no_grad():
        y_ng, sT_ng = wkv.wkv7(*xs, state=s0, return_state=True, backend="cuda")
    assert torch.equal(y_ng, y) and torch.equal(sT_ng, sT)
    leaves = [x.clone().requires_grad_() for x in xs]
    wkv.wkv7(*leaves, backend="cuda").float().square().sum().backward()
    assert all(x.grad is not None and x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all() for x in leaves)


@cuda
@pytest.mark.gpu
def test_ops_are_opaque_to_torch_compile():
    wkv_cuda.load()
    B, T, H = 2, 64, 4
    xs = make_inputs(B, T, H, "cuda", seed=5)
    torch.library.opcheck(torch.ops.rwkv7.wkv7_forward.default, (*xs, None, True),
                          test_utils=("test_schema", "test_faketensor"))

    @torch.compile(fullgraph=True)
    def f(r, w, k, v, a, b):
        y, ckpt, _ = torch.ops.rwkv7.wkv7_forward(r, w, k, v, a, b, None, False)
        return y.float() * 2, ckpt[:, :, 0] + 1

    y, s = f(*xs)
    y_eager, ckpt_eager, _ = torch.ops.rwkv7.wkv7_forward(*xs, None, False)
    assert torch.equal(y, y_eager.float() * 2) and torch.equal(s, ckpt_eager[:, :, 0] + 1)

    leaves = [x.clone().requires_grad_() for x in xs]
    compiled = torch.compile(lambda *t: wkv_cuda.wkv7_cuda(*t).float().square().sum())
    compiled(*leaves).backward()
    leaves_eager = [x.clone().requires_grad_() for x in xs]
    wkv_cuda.wkv7_cuda(*leaves_eager).float().square().sum().backward()
    for x, x_eager in zip(leaves, leaves_eager):
        assert rel(x.grad, x_eager.grad) <= 1e-2


# ------------------------------------------------------------------------------------------------ CPU (CI)

def test_reference_in_fp32_is_close_to_fp64():
    xs = [x.float() for x in make_inputs(2, 20, 3, "cpu", seed=11)]
    s0 = torch.randn(2, 3, 64, 64) * 0.3
    y, sT = wkv.wkv7_reference(*xs, state=s0, return_state=True)
    y64, sT64 = reference_fp64(*(x.double() for x in xs), state=s0.double())
    assert rel(y, y64) < 1e-5 and rel(sT, sT64) < 1e-5


def test_auto_backend_on_cpu_uses_torch_reference():
    xs = [x.float() for x in make_inputs(1, 32, 2, "cpu", seed=2)]
    assert wkv.select_backend(xs[0], "auto") == "torch"
    assert torch.equal(wkv.wkv7(*xs, backend="auto"), wkv.wkv7_reference(*xs))


def test_available_is_false_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(wkv_cuda._state, "available", None)
    assert wkv_cuda.available() is False  # and it did not raise
    assert wkv_cuda.available() is False  # cached
    with pytest.raises(UserError):
        wkv_cuda.wkv7_cuda(*make_inputs(1, 16, 1, "cpu"))


def test_normalise_arch_list_for_deepspeed(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a 9.0+PTX")
    wkv_cuda.normalise_arch_list_for_deepspeed()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0;9.0+PTX"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    wkv_cuda.normalise_arch_list_for_deepspeed()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"


def test_arch_coverage_rules():
    assert wkv_cuda.arch_covers("9.0a", (9, 0))
    assert wkv_cuda.arch_covers("8.0", (8, 6))
    assert not wkv_cuda.arch_covers("9.0a", (10, 0))
    assert not wkv_cuda.arch_covers("8.6", (8, 0))
    assert wkv_cuda.arch_covers("8.0+PTX", (9, 0))


def test_build_reports_missing_gpu_as_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA"):
        wkv_cuda.build(wkv_cuda.cache_dir())


def test_cluster_backward_falls_back_on_older_gpus(monkeypatch):
    """The default backward needs thread-block clusters (sm_90+); an A100 gets BWD_FALLBACK instead of a failed
    launch."""
    monkeypatch.setattr(wkv_cuda, "_BWD_BY_DEVICE", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    expected = wkv_cuda.BWD_LANES if wkv_cuda.BWD_LANES not in wkv_cuda.CLUSTER_BWD_LAYOUTS else wkv_cuda.BWD_FALLBACK
    assert wkv_cuda._bwd_lanes(torch.device("cuda", 0)) == expected
    assert wkv_cuda.BWD_FALLBACK in wkv_cuda.BWD_LAYOUTS and wkv_cuda.BWD_FALLBACK not in wkv_cuda.CLUSTER_BWD_LAYOUTS
    monkeypatch.setattr(wkv_cuda, "_BWD_BY_DEVICE", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert wkv_cuda._bwd_lanes(torch.device("cuda", 0)) == wkv_cuda.BWD_LANES
