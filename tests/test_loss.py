"""Contracts of the training loss (rwkv7/train/loss.py) beyond its numbers, which test_alignment.py checks against
hand-computed values and the logits path: where it allocates, which gradients it computes, what training_loss picks
on each device, and that the training path reuses the logits' memory."""
import pytest
import torch

from rwkv7.train.loss import CHUNK_ROWS, head_loss, lm_loss, training_loss
from tests.test_fused_step import CountOps, batch, make_model

MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm.default)

N, C, V = CHUNK_ROWS + 9, 16, 24  # two row chunks, the last one partial


def inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g).to(dtype)
    weight = (0.5 * torch.randn(V, C, generator=g)).to(dtype)
    return hidden, weight, torch.randint(0, V, (N,), generator=g)


def reference(hidden, weight, targets):
    """lm_loss of the whole logits: loss and the gradients of hidden and weight."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = lm_loss(h @ w.t(), targets)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def test_the_loss_allocates_on_its_inputs_device_not_the_default_one():
    """A process whose default device is another one (torch.set_default_device) still gets its loss where its
    tensors are; the meta device stands in for it here, so any buffer made on the default device would fail."""
    hidden, weight, targets = inputs()
    want, want_h, want_w = reference(hidden, weight, targets)
    with torch.device("meta"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = head_loss(h, w, targets)
        loss.backward()
        logits = (hidden @ weight.t()).requires_grad_()
        plain = lm_loss(logits, targets)
        plain.backward()
    assert loss.device.type == plain.device.type == "cpu"
    assert torch.allclose(loss, want, rtol=1e-12) and torch.allclose(plain, want, rtol=1e-12)
    assert torch.allclose(h.grad, want_h, rtol=1e-10, atol=1e-15)
    assert torch.allclose(w.grad, want_w, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("hidden_grad,weight_grad", [(True, False), (False, True), (True, True)])
def test_head_loss_gives_each_input_the_gradient_asked_for(hidden_grad, weight_grad):
    """A frozen head (or frozen hidden states) still gives the other input its gradient."""
    hidden, weight, targets = inputs()
    _, want_h, want_w = reference(hidden, weight, targets)
    h, w = hidden.clone().requires_grad_(hidden_grad), weight.clone().requires_grad_(weight_grad)
    head_loss(h, w, targets).backward()
    assert (h.grad is not None) == hidden_grad and (w.grad is not None) == weight_grad
    if hidden_grad:
        assert torch.allclose(h.grad, want_h, rtol=1e-10, atol=1e-15)
    if weight_grad:
        assert torch.allclose(w.grad, want_w, rtol=1e-10, atol=1e-15)


def test_head_loss_without_gradients_computes_only_the_logits():
    """Evaluation (no_grad, or inputs that need no gradient) runs one matmul per row chunk, no gradient work."""
    hidden, weight, targets = inputs()
    chunks = -(-N // CHUNK_ROWS)
    with torch.no_grad(), CountOps(MATMULS) as counter:
        loss = head_loss(hidden.requires_grad_(), weight.requires_grad_(), targets)
    assert counter.count == chunks
    with CountOps(MATMULS) as counter:
        head_loss(hidden.detach(), weight.detach(), targets)
    assert counter.count == chunks
    with CountOps(MATMULS) as counter:
        head_loss(hidden, weight, targets)
    assert counter.count == 3 * chunks  # logits, d(hidden), d(weight)
    assert torch.allclose(loss, reference(hidden.detach(), weight.detach(), targets)[0], rtol=1e-12)


def test_head_loss_takes_hidden_states_of_any_leading_shape():
    """[B, T, C] hidden states with targets [B, T] (T differs from C): the mean over all B*T tokens."""
    hidden, weight, targets = inputs()
    B, T = 3, 7
    rows = B * T
    h3 = hidden[:rows].reshape(B, T, C)
    assert torch.allclose(head_loss(h3, weight, targets[:rows].reshape(B, T)),
                          reference(hidden[:rows], weight, targets[:rows])[0], rtol=1e-12)


def test_head_loss_gradients_come_back_in_the_inputs_dtypes():
    """bf16 weights and hidden states (GPU training): fp32 accumulation inside, bf16 gradients out."""
    hidden, weight, targets = inputs(torch.bfloat16)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = head_loss(h, w, targets)
    loss.backward()
    assert loss.dtype == torch.float32
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    _, want_h, want_w = reference(hidden.double(), weight.double(), targets)
    assert float((h.grad.double() - want_h).norm() / want_h.norm()) < 1e-2
    assert float((w.grad.double() - want_w).norm() / want_w.norm()) < 1e-2


class LooksCuda(torch.Tensor):
    """A CPU tensor that says it is on a GPU (results of ops on it are plain tensors), to see training_loss's choice
    of path without a GPU."""
    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def is_cuda(self):
        return True


@pytest.mark.parametrize("on_gpu", [False, True])
def test_training_loss_fuses_the_head_on_gpus_and_reuses_the_logits_elsewhere(on_gpu):
    """On GPUs the head runs inside the loss (the head module is never called: no whole logits); on the CPU the
    logits are computed and their memory takes their gradient (reuse_logits). Both give the logits path's loss."""
    model = make_model(n_layer=2, n_embd=64, grad_cp=False).double()
    x, y = batch(256, 2, 8, "cpu")
    want = lm_loss(model(x), y)
    logits = []
    model.head.register_forward_hook(lambda mod, args, out: logits.append((out, out.detach().clone())))
    idx = x.as_subclass(LooksCuda) if on_gpu else x
    loss = training_loss(model, idx, y)
    assert torch.allclose(loss, want, rtol=1e-12)
    loss.backward()
    if on_gpu:
        assert logits == []
    else:
        (out, before), = logits
        assert not torch.equal(out, before)  # overwritten by the gradient
        assert float(out.abs().max()) < 1.0  # softmax - onehot, divided by the token count
