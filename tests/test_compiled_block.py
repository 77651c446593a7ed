"""What RWKV7.compile_blocks builds around the compiler, with torch.compile replaced by the identity: the parameter
passing, which block's graph serves which layer, the recompute modes, the wkv recompute flag, and when the compiled
path is taken. These run in a second; the compiler itself is checked by test_fused_step.py (aot_eager on the CPU,
Triton on a GPU)."""
import logging

import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy

import rwkv7.model as model_module
from rwkv7.model import Block, RWKV7
from rwkv7.train.loss import training_loss
from tests.test_fused_step import CountOps, batch, grads, make_model


class FakeCompile:
    """torch.compile stand-in: returns the function itself, wrapped to record each call's tensors."""

    def __init__(self):
        self.backends, self.calls = [], []

    def __call__(self, fn, backend):
        self.backends.append(backend)

        def traced(flat, x, v_first):
            self.calls.append([t.shape for t in flat])
            return fn(flat, x, v_first)

        return traced


@pytest.fixture
def fake_compile(monkeypatch):
    fake = FakeCompile()
    monkeypatch.setattr(torch, "compile", fake)
    return fake


@pytest.fixture
def wkv_flags(monkeypatch):
    """The `recompute` argument of every wkv7 call."""
    flags, real = [], model_module.wkv7

    def recording(*args, **kwargs):
        flags.append(kwargs["recompute"])
        return real(*args, **kwargs)

    monkeypatch.setattr(model_module, "wkv7", recording)
    return flags


MODES = [(False, "selective"), (True, "full"), (True, "selective")]


@pytest.mark.parametrize("grad_cp,recompute", MODES)
def test_compiled_wrapper_gives_the_eager_loss_and_gradients_exactly(fake_compile, grad_cp, recompute):
    """Three layers: layer 0 (ln0, sets v_first) has its own graph, layers 1 and 2 share layer 1's."""
    x, y = batch(256, 2, 8, "cpu")
    model = make_model(n_layer=3, n_embd=64, grad_cp=grad_cp)
    loss0, ref = grads(model, training_loss, x, y)
    model.compile_blocks(recompute=recompute, backend="aot_eager")
    loss1, got = grads(model, training_loss, x, y)
    assert len(fake_compile.calls) == 3  # every layer went through a wrapper
    assert loss1 == loss0
    unused = {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}  # layer 0 has no value residual
    assert got.keys() == ref.keys() == {n for n, _ in model.named_parameters()} - unused
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


def test_one_graph_per_kind_of_block_and_the_backend_passed_on(fake_compile):
    model = make_model(n_layer=4, n_embd=64)
    model.compile_blocks(recompute="full", backend="aot_eager")
    assert fake_compile.backends == ["aot_eager"] * 4  # layer 0 and the rest, each plain and recomputing
    plain, cp = model.__dict__["_compiled"], model.__dict__["_compiled_cp"]
    assert len(plain) == len(cp) == 4
    assert plain[0] is not plain[1] and plain[1] is plain[2] is plain[3]
    assert cp[0] is not cp[1] and cp[1] is cp[2] is cp[3]
    assert not set(map(id, plain)) & set(map(id, cp))
    make_model(n_layer=2).compile_blocks()
    assert fake_compile.backends[4:] == ["inductor"] * 4  # the default backend


def test_parameters_enter_the_graph_flat_where_they_are_1_1_c(fake_compile):
    """torch 2.11's compiled backward returned [C] gradients for [1, 1, C] parameters (see compiled_block)."""
    x, y = batch(256, 1, 8, "cpu")
    model = make_model(n_layer=2, n_embd=64, grad_cp=False)
    model.compile_blocks(recompute="selective", backend="aot_eager")
    training_loss(model, x, y).backward()
    for layer, shapes in enumerate(fake_compile.calls):
        expected = [p.shape if p.dim() != 3 else torch.Size([p.numel()]) for p in model.blocks[layer].parameters()]
        assert shapes == expected
        assert all(len(s) != 3 for s in shapes)
    assert all(p.grad.shape == p.shape for n, p in model.named_parameters() if not n.startswith("blocks.0.att.v"))


@pytest.mark.parametrize("grad_cp,recompute,flag", [(False, "full", False), (True, "full", True),
                                                     (True, "selective", True)])
def test_the_wkv_recomputes_in_the_backward_only_in_checkpointed_compiled_blocks(fake_compile, wkv_flags,
                                                                                 grad_cp, recompute, flag):
    x, y = batch(256, 1, 8, "cpu")
    model = make_model(n_layer=2, n_embd=64, grad_cp=grad_cp)
    training_loss(model, x, y).backward()
    assert wkv_flags == [False, False] + [False, False] * grad_cp  # eager: never (grad_cp reruns each block once)
    wkv_flags.clear()
    model.compile_blocks(recompute=recompute, backend="aot_eager")
    training_loss(model, x, y).backward()
    assert wkv_flags == [flag, flag] * (2 if grad_cp else 1)  # a checkpointed block reruns its forward once
    assert all(block.att.wkv_recompute is False for block in model.blocks)  # the module's own blocks untouched


@pytest.mark.parametrize("training,grad_enabled", [(False, True), (True, False), (False, False)])
def test_evaluation_runs_the_eager_blocks(fake_compile, training, grad_enabled):
    x, _ = batch(256, 1, 8, "cpu")
    model = make_model(n_layer=2, n_embd=64, grad_cp=True)
    model.compile_blocks(recompute="selective", backend="aot_eager")
    model.train(training)
    with torch.set_grad_enabled(grad_enabled):
        logits = model(x)
    assert fake_compile.calls == []
    assert torch.equal(logits, RWKV7.forward(make_model(n_layer=2, n_embd=64).train(training), x))


def backward_matmuls(grad_cp, recompute):
    x, y = batch(256, 1, 8, "cpu")
    model = make_model(n_layer=2, n_embd=64, grad_cp=grad_cp)
    model.compile_blocks(recompute=recompute, backend="aot_eager")
    loss = training_loss(model, x, y)
    with CountOps(model_module._MATMUL_OPS) as counter:
        loss.backward()
    return counter.count


def test_selective_recompute_keeps_the_matmul_outputs_and_full_recomputes_them(fake_compile):
    """In the backward, "full" reruns each block's forward matmuls; "selective" keeps their outputs, so its backward
    runs only the gradient matmuls, as the backward of blocks that keep everything does."""
    plain = backward_matmuls(False, "selective")
    selective = backward_matmuls(True, "selective")
    full = backward_matmuls(True, "full")
    assert plain > 0
    assert selective == plain
    assert full > plain


def test_keep_matmuls_policy():
    for op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
        assert model_module._keep_matmuls(None, op) == CheckpointPolicy.MUST_SAVE
    for op in (torch.ops.aten.mul.Tensor, torch.ops.aten.exp.default, torch.ops.aten.native_layer_norm.default):
        assert model_module._keep_matmuls(None, op) == CheckpointPolicy.PREFER_RECOMPUTE


def test_the_checkpoint_policy_notice_is_dropped_and_nothing_else(fake_compile):
    make_model(n_layer=2).compile_blocks(recompute="selective", backend="aot_eager")
    logger = logging.getLogger("torch._higher_order_ops.wrap")
    notice = [f for f in logger.filters if isinstance(f, model_module._DropInPlaceNotice)]
    assert notice
    record = lambda msg: logging.LogRecord("x", logging.WARNING, __file__, 1, msg, None, None)  # noqa: E731
    text = "Detected that context_fn is passed to torch.utils.checkpoint under torch.compile."
    assert notice[0].filter(record(text)) is False
    assert notice[0].filter(record("another warning")) is True
    for f in notice:
        logger.removeFilter(f)


def test_a_block_is_compiled_from_a_copy_on_the_meta_device(fake_compile, monkeypatch):
    """The compiled function holds the block's structure only (its parameters come with each call): no copy of a
    block's weights is kept beside the model."""
    import torch.func

    devices, real = [], torch.func.functional_call

    def recording(module, params, args):
        devices.extend(p.device.type for p in module.parameters())
        return real(module, params, args)

    monkeypatch.setattr(torch.func, "functional_call", recording)
    model = make_model(n_layer=2, n_embd=64)
    before = {n: p.clone() for n, p in model.named_parameters()}
    model.compile_blocks(recompute="full", backend="aot_eager")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert [n for n, _ in model.named_parameters()] == list(before)  # the wrappers are outside the module tree
    assert isinstance(model.blocks[0], Block)
    x, y = batch(256, 1, 8, "cpu")
    training_loss(model, x, y).backward()
    assert devices and set(devices) == {"meta"}


@pytest.mark.parametrize("compiled", [False, True])
def test_checkpointed_blocks_support_autograd_grad(fake_compile, compiled):
    """grad_cp uses non-reentrant checkpointing, which (unlike the reentrant form) supports torch.autograd.grad as
    well as backward(), and gives the gradients of the model without checkpointing."""
    x, y = batch(256, 1, 8, "cpu")
    plain = make_model(n_layer=2, n_embd=64, grad_cp=False)
    names = [n for n, _ in plain.named_parameters() if not n.startswith("blocks.0.att.v")]
    ref = torch.autograd.grad(training_loss(plain, x, y), [dict(plain.named_parameters())[n] for n in names])
    model = make_model(n_layer=2, n_embd=64, grad_cp=True)
    if compiled:
        model.compile_blocks(recompute="full", backend="aot_eager")
    got = torch.autograd.grad(training_loss(model, x, y), [dict(model.named_parameters())[n] for n in names])
    for name, a, b in zip(names, got, ref):
        assert torch.equal(a, b), name


def test_checkpointing_is_off_unless_asked_for():
    """A model built without grad_cp (generation, evaluation, tools) keeps its activations: each block runs once."""
    from rwkv7.init import init_model
    from rwkv7.model import ModelShape

    model = init_model(RWKV7(ModelShape(2, 64, 256)), seed=1).train()
    calls = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda mod, args: calls.append(mod))
    x, y = batch(256, 1, 8, "cpu")
    training_loss(model, x, y).backward()
    assert len(calls) == 2
