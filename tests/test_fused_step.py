"""The fused training step against the eager reference: compiled blocks (with each recompute mode), the head fused into
the loss, and the wkv kernel's recompute-in-backward mode.

On the CPU the compiled block is traced with the `aot_eager` backend (same graph capture, partitioning and
recomputation as on GPUs, without code generation) and must give the eager gradients exactly. On a GPU (tests marked
gpu) the Triton-generated kernels run in bf16, so the compiled gradients are compared with the eager bf16 ones by
relative error against the bf16 noise floor: the distance between the eager bf16 model and an fp32 copy of it.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rwkv7.init import init_model
from rwkv7.model import ModelShape, RWKV7
from rwkv7.train.loss import head_loss, lm_loss, training_loss

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_model(n_layer=3, n_embd=128, vocab=256, grad_cp=True, device="cpu", dtype=torch.float32):
    model = RWKV7(ModelShape(n_layer, n_embd, vocab), grad_cp=grad_cp)
    init_model(model, seed=1)
    return model.to(device=device, dtype=dtype).train()


def grads(model, loss_fn, x, y):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, x, y)
    loss.backward()
    return float(loss), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


class CountOps(TorchDispatchMode):
    """Counts the calls of the given aten ops as they are dispatched (below autograd: what actually runs)."""

    def __init__(self, ops):
        super().__init__()
        self.ops, self.count = frozenset(ops), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.ops
        return func(*args, **(kwargs or {}))


def worst_rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-30)) for n in a)


def batch(vocab, B, T, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (B, T + 1), generator=g).to(device)
    return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()


def test_compiled_blocks_give_the_eager_gradients_on_cpu():
    """Every parameter's gradient, layer 0 (ln0, v_first) and layer 1 (value residual; its compiled graph serves all
    later layers), through checkpointing with the matmul-keeping policy."""
    x, y = batch(256, 2, 16, "cpu")
    model = make_model(n_layer=2, n_embd=64)
    loss0, ref = grads(model, training_loss, x, y)
    model.compile_blocks(recompute="selective", backend="aot_eager")
    loss1, got = grads(model, training_loss, x, y)
    assert loss1 == loss0
    assert worst_rel(got, ref) == 0.0
    model.eval()  # evaluation runs the eager blocks (other shapes, no backward): same logits
    with torch.no_grad():
        assert torch.equal(model(x), RWKV7.forward(model, x))


def test_compile_blocks_rejects_an_unknown_recompute_mode():
    with pytest.raises(ValueError, match="recompute"):
        make_model(n_layer=2).compile_blocks(recompute="some")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("recompute,grad_cp", [("full", True), ("selective", True), ("full", False)])
def test_compiled_blocks_match_eager_within_bf16_noise_on_gpu(recompute, grad_cp):
    x, y = batch(65536, 2, 64, "cuda")
    ref_model = make_model(n_layer=2, n_embd=256, vocab=65536, grad_cp=grad_cp, device="cuda", dtype=torch.bfloat16)
    _, ref = grads(ref_model, training_loss, x, y)
    _, f32 = grads(make_model(n_layer=2, n_embd=256, vocab=65536, grad_cp=grad_cp, device="cuda"),
                   training_loss, x, y)
    floor = worst_rel(ref, f32)
    model = make_model(n_layer=2, n_embd=256, vocab=65536, grad_cp=grad_cp, device="cuda", dtype=torch.bfloat16)
    model.compile_blocks(recompute=recompute)
    _, got = grads(model, training_loss, x, y)
    assert worst_rel(got, ref) <= max(2 * floor, 1e-2), (worst_rel(got, ref), floor)


@gpu
@pytest.mark.gpu
def test_head_loss_matches_logits_loss_on_gpu_in_bf16():
    """Several chunks of rows, large logits (edge values for the L2Wrap argmax and the exp)."""
    from rwkv7.train.loss import CHUNK_ROWS

    g = torch.Generator(device="cuda").manual_seed(0)
    n, C, V = 2 * CHUNK_ROWS + 3, 256, 65536
    hidden0 = (4 * torch.randn(n, C, device="cuda", generator=g)).bfloat16()
    weight0 = (0.5 * torch.randn(V, C, device="cuda", generator=g)).bfloat16()
    targets = torch.randint(0, V, (n,), device="cuda", generator=g)
    out = []
    for fused in (False, True):
        h, w = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        loss = head_loss(h, w, targets) if fused else lm_loss(h @ w.t(), targets)
        loss.backward()
        out.append((float(loss), h.grad.float(), w.grad.float()))
    (l0, h0, w0), (l1, h1, w1) = out
    assert l1 == pytest.approx(l0, rel=1e-5)
    assert float((h1 - h0).norm() / h0.norm()) < 1e-2
    assert float((w1 - w0).norm() / w0.norm()) < 1e-2


@gpu
@pytest.mark.gpu
def test_wkv_recompute_in_backward_gives_identical_gradients():
    from rwkv7 import wkv_cuda
    from tests.test_wkv_cuda import make_inputs

    if not wkv_cuda.available():
        pytest.skip("wkv7 kernel unavailable")
    xs = make_inputs(2, 64, 3, "cuda", zrange=(-3.0, 5.0), seed=4)
    dy = torch.randn_like(xs[0])
    results = []
    for recompute in (False, True):
        leaves = [t.clone().requires_grad_() for t in xs]
        y = wkv_cuda.wkv7_cuda(*leaves, recompute=recompute)
        y.backward(dy)
        results.append([y] + [t.grad for t in leaves])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("grad_cp,training,runs", [(True, True, 2), (False, True, 1), (True, False, 1)])
def test_grad_cp_reruns_each_block_in_the_backward_only_when_training(grad_cp, training, runs):
    """Activation checkpointing (grad_cp 1): each block's forward runs again in the backward instead of keeping its
    activations; in eval mode there is nothing to keep, and blocks run once."""
    model = make_model(n_layer=2, n_embd=64, grad_cp=grad_cp)
    model.train(training)
    calls = []
    for block in model.blocks:
        # a pre-hook: the recomputation stops early, once the saved tensors are back, so a post-hook may not run
        block.register_forward_pre_hook(lambda mod, args: calls.append(mod))
    x, y = batch(256, 2, 16, "cpu")
    training_loss(model, x, y).backward()
    assert len(calls) == runs * len(model.blocks)


def test_a_batch_gives_each_sequence_its_own_logits():
    """Sequences of a batch do not mix: the logits of a batch of 3 are those of each sequence alone."""
    model = make_model(n_layer=2, n_embd=64, grad_cp=False).eval()
    x, _ = batch(256, 3, 16, "cpu")
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(3)])
    assert together.shape == (3, 16, 256)
    assert torch.allclose(together, alone, rtol=1e-5, atol=1e-5)
