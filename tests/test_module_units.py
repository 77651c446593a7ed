"""The loss module (RWKV7Module) and the bf16 master-weight optimizer (MasterWeightAdamW) as units, on the CPU.

The GPU-only pieces are replaced by recording stand-ins: the CUDA graph (rwkv7.train.graphed.GraphedStep), strategy
ddp's step and sharded optimizer (rwkv7.train.data_parallel), DeepSpeed's CPU Adam, and Lightning's optimizer handle.
Written against the mutants mutmut found alive in rwkv7/train/module.py and rwkv7/train/bf16_optim.py
(docs/TESTING.md); every test checks what a caller sees, not how the code is spelled."""
import io
import math
import sys
import types

import pytest
import torch

from rwkv7.init import init_model
from rwkv7.model import ModelShape, RWKV7
from rwkv7.recipe import load_recipe
from rwkv7.testhooks import Faults
from rwkv7.train.bf16_optim import MasterWeightAdamW
from rwkv7.train.module import NonFiniteLoss, RWKV7Module, param_groups, training_loss
from rwkv7.train.tracker import RunTracker

SHAPE = ModelShape(n_layer=2, n_embd=64, vocab_size=32, head_size=64)
SMALL = ["model.n_layer=2", "model.n_embd=64", "model.vocab_size=32"]
GPU = ["train.accelerator=gpu", "train.precision=bf16"]


def new_model():
    model = RWKV7(SHAPE)
    init_model(model, seed=0)
    return model


def new_module(*overrides, cuda=False, monkeypatch=None, **kwargs):
    """RWKV7Module over the tiny recipe; cuda=True builds it as on a host with a GPU (the module asks torch)."""
    recipe = load_recipe("tiny", SMALL + list(overrides))
    model = new_model()
    if not cuda:
        return RWKV7Module(model, recipe, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        return RWKV7Module(model, recipe, **kwargs)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 32, (2, 8), generator=g), torch.randint(0, 32, (2, 8), generator=g)


def total_norm(tensors):
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors])))


# ---------------------------------------------------------------------------------------------------------------
# RWKV7Module: flags, routing of the training step


@pytest.mark.parametrize("overrides,cuda,want", [
    # (check_now, use_graph, data_parallel, automatic_optimization)
    ([], False, (True, False, False, True)),                                           # CPU, plain Lightning
    (["train.strategy=ddp"], False, (True, False, True, False)),                       # CPU ranks over gloo
    (GPU + ["train.strategy=single"], True, (False, True, False, False)),              # the CUDA graph
    (GPU + ["train.strategy=single"], False, (False, False, False, True)),             # no GPU: eager
    (GPU + ["train.strategy=single", "train.max_bad_steps=1"], True, (True, False, False, True)),
    (GPU + ["train.strategy=single", "train.cuda_graph=false"], True, (False, False, False, True)),
    (GPU + ["train.strategy=ddp", "train.devices=2"], True, (False, True, True, False)),
    (GPU + ["train.strategy=ddp", "train.max_bad_steps=1"], True, (True, False, True, False)),
    (GPU + ["train.strategy=deepspeed_stage_2"], True, (False, False, False, True)),
])
def test_flags_per_strategy_and_accelerator(monkeypatch, overrides, cuda, want):
    """check_now: CPU runs or bad steps to skip; the CUDA graph: a graph-capable strategy with train.cuda_graph, no
    early check and a GPU; ddp: manual optimization (its own step), as is the graph."""
    m = new_module(*overrides, cuda=cuda, monkeypatch=monkeypatch)
    assert (m.check_now, m.use_graph, m.data_parallel, m.automatic_optimization) == want


def test_a_new_module_has_no_bad_steps_yet(capsys):
    """bad_steps defaults to none so far: with one bad step allowed, the first non-finite loss is skipped."""
    class NanLoss(Faults):
        def loss(self, step, loss):
            return loss * float("nan")

    m = RWKV7Module(new_model(), load_recipe("tiny", SMALL + ["train.max_bad_steps=1"]), faults=NanLoss())
    assert m.training_step(batch(), 0) is None and m.bad_steps == 1
    assert "skipped (1/1 allowed)" in capsys.readouterr().out
    with pytest.raises(NonFiniteLoss, match=r"\(2 bad step\(s\)"):
        m.training_step(batch(), 0)


def test_forward_is_the_models_logits():
    m = new_module()
    x, _ = batch()
    with torch.no_grad():
        got, want = m(x), m.model(x)
    assert got.shape == (2, 8, 32) and torch.equal(got, want)


def test_ddp_training_step_is_data_parallels_with_the_module_and_batch(monkeypatch):
    from rwkv7.train import data_parallel

    seen = []
    marker = torch.tensor(1.25)
    monkeypatch.setattr(data_parallel, "training_step", lambda *args: seen.append(args) or marker)
    m = new_module("train.strategy=ddp")
    x, y = batch()
    assert m.training_step((x, y), 0) is marker
    (args,) = seen
    assert len(args) == 3 and args[0] is m and args[1] is x and args[2] is y


class FakeGraph:
    """Stands in for GraphedStep: records how it is built and called, and computes the loss eagerly."""
    built = []

    def __init__(self, *args):
        FakeGraph.built.append(args)
        self.model, self.loss_fn = args[0], args[1]
        self.calls = []

    def __call__(self, *args):
        self.calls.append(args)
        x, y = args
        with torch.no_grad():
            return self.loss_fn(self.model, x, y)


class FakeOptimizerHandle:
    """Lightning's LightningOptimizer: the real optimizer in .optimizer, step() runs it."""

    def __init__(self, events):
        self.optimizer = types.SimpleNamespace(keep_model_grads=False)
        self.events = events

    def step(self):
        self.events.append("step")


def test_graphed_step_builds_the_graph_once_and_steps_the_optimizer_after_it(monkeypatch):
    from rwkv7.train import graphed

    events = []

    class Recorder(Faults):
        def loss(self, step, loss):
            events.append(("faults", step, float(loss)))
            return loss + 100.0

    FakeGraph.built = []
    monkeypatch.setattr(graphed, "GraphedStep", FakeGraph)
    m = new_module(*GPU, "train.strategy=single", cuda=True, monkeypatch=monkeypatch, faults=Recorder())
    assert m.use_graph
    handle = FakeOptimizerHandle(events)
    monkeypatch.setattr(m, "optimizers", lambda: handle)
    (x1, y1), (x2, y2) = batch(1), batch(2)
    with torch.no_grad():
        want1, want2 = float(training_loss(m.model, x1, y1)), float(training_loss(m.model, x2, y2))
    m.run_step = 5
    out1 = m.training_step((x1, y1), 0)
    m.run_step = 6
    out2 = m.training_step((x2, y2), 1)
    (args,) = FakeGraph.built  # captured once, on the first batch, with the module's model and the training loss
    assert len(args) == 4 and args[0] is m.model and args[1] is training_loss and args[2] is x1 and args[3] is y1
    assert m.graphed.calls == [(x1, y1), (x2, y2)]
    assert handle.optimizer.keep_model_grads is True  # the graph's gradient buffers must survive the step
    assert events == [("faults", 5, pytest.approx(want1)), "step", ("faults", 6, pytest.approx(want2)), "step"]
    assert float(out1) == pytest.approx(want1 + 100.0) and float(out2) == pytest.approx(want2 + 100.0)


# ---------------------------------------------------------------------------------------------------------------
# RWKV7Module: gradient clipping


def backward(m):
    x, y = batch()
    training_loss(m.model, x, y).backward()
    return [p for p in m.model.parameters() if p.grad is not None]


def test_without_a_clip_value_the_gradients_stay_and_the_norm_is_kept():
    m = new_module()
    params = backward(m)
    before = [p.grad.clone() for p in params]
    m.configure_gradient_clipping(None, gradient_clip_val=None)
    assert float(m.last_grad_norm) == pytest.approx(total_norm(before), rel=1e-5)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, before))
    assert m.bad_steps == 0


def test_master_weights_precheck_keeps_finite_gradients_unclipped():
    """strategy single with bad steps to skip: the module only looks at the gradients (MasterWeightAdamW clips)."""
    m = new_module(*GPU, "train.strategy=single", "train.max_bad_steps=1")
    params = backward(m)
    before = [p.grad.clone() for p in params]
    m.configure_gradient_clipping(None, gradient_clip_val=total_norm(before) / 10)
    assert all(p.grad is not None and torch.equal(p.grad, g) for p, g in zip(params, before))
    assert m.bad_steps == 0 and m.last_grad_norm is None


def test_master_weights_precheck_drops_non_finite_gradients_as_a_bad_step(capsys):
    m = new_module(*GPU, "train.strategy=single", "train.max_bad_steps=1")
    m.run_step = 4
    params = backward(m)
    params[0].grad[0] = math.inf
    m.configure_gradient_clipping(None, gradient_clip_val=1.0)
    assert all(p.grad is None for p in m.model.parameters()) and m.bad_steps == 1
    assert "step 4: gradient norm is inf; skipped (1/1 allowed)" in capsys.readouterr().out


@pytest.mark.parametrize("overrides", [[*GPU, "train.strategy=single"],  # checked one step late
                                       [*GPU, "train.strategy=deepspeed_stage_2", "train.max_bad_steps=1"]])
def test_optimizer_clipped_gradients_are_left_to_the_optimizer(overrides):
    """No early check (single without bad steps to skip), or DeepSpeed (no master-weight optimizer of ours): the
    module leaves even non-finite gradients alone."""
    m = new_module(*overrides)
    params = backward(m)
    params[0].grad[0] = math.inf
    m.configure_gradient_clipping(None, gradient_clip_val=1.0)
    assert all(p.grad is not None for p in params) and math.isinf(float(params[0].grad[0].flatten()[0]))
    assert m.bad_steps == 0 and m.last_grad_norm is None


# ---------------------------------------------------------------------------------------------------------------
# RWKV7Module: the optimizer per strategy


def same_groups(got, want):
    return ([g["name"] for g in got] == [g["name"] for g in want]
            and [[id(p) for p in g["params"]] for g in got] == [[id(p) for p in g["params"]] for g in want]
            and [g["weight_decay"] for g in got] == [g["weight_decay"] for g in want])


@pytest.mark.parametrize("wd,adamw", [(0.0, False), (0.001, True)])
def test_offload_strategy_uses_deepspeed_cpu_adam(monkeypatch, wd, adamw):
    """DeepSpeedCPUAdam over the official groups: decoupled weight decay (adamw_mode) only when there is any."""
    built = []

    class DeepSpeedCPUAdam:
        def __init__(self, *args, **kwargs):
            built.append((args, kwargs))

    fake = types.ModuleType("deepspeed.ops.adam")
    fake.DeepSpeedCPUAdam = DeepSpeedCPUAdam
    monkeypatch.setitem(sys.modules, "deepspeed.ops.adam", fake)
    m = new_module(*GPU, "train.strategy=deepspeed_stage_2_offload", f"train.weight_decay={wd}",
                   "train.lr_init=3e-4", "train.lr_final=1e-5", "train.beta1=0.8", "train.adam_eps=1e-9")
    opt = m.configure_optimizers()
    assert type(opt) is DeepSpeedCPUAdam
    ((args, kwargs),) = built
    assert len(args) == 1 and same_groups(args[0], param_groups(m.model, wd))
    assert kwargs == {"adamw_mode": adamw, "lr": 3e-4, "betas": (0.8, 0.99), "eps": 1e-9}


def test_ddp_builds_the_sharded_optimizer_for_the_training_batch_shape(monkeypatch):
    from rwkv7.train import data_parallel

    built = []
    monkeypatch.setattr(data_parallel, "sharded_optimizer", lambda *a, **k: built.append((a, k)) or "sharded")
    m = new_module("train.strategy=ddp", "train.micro_bsz=3", "train.ctx_len=32", "train.grad_clip=0.7",
                   "train.lr_init=3e-4", "train.lr_final=1e-5", "train.beta1=0.8", "train.adam_eps=1e-9")
    assert m.configure_optimizers() == "sharded"
    ((args, kwargs),) = built
    assert len(args) == 3 and args[0] is m.model and same_groups(args[1], param_groups(m.model, 0.001))
    assert args[2] == (3, 32)
    assert kwargs == {"clip": 0.7, "lr": 3e-4, "betas": (0.8, 0.99), "eps": 1e-9}


# ---------------------------------------------------------------------------------------------------------------
# MasterWeightAdamW on bf16 parameters (CPU)


def bf16_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g).to(torch.bfloat16)),
            torch.nn.Parameter(torch.randn(5, generator=g).to(torch.bfloat16))]


def groups_of(params):
    return [{"params": [params[0]], "weight_decay": 0.1}, {"params": [params[1]], "weight_decay": 0.0}]


def masters_of(opt):
    return [m for g in opt.param_groups for m in g["params"]]


def set_grads(params, step, scale=1.0):
    """Deterministic gradients (in the weights' dtype) for step `step` that depend on the current weights, as a real
    loss's do."""
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = (scale * (p.detach().float() * 0.5 + torch.randn(p.shape, generator=g))).to(p.dtype)


def test_default_clip_is_global_norm_one():
    """As the official trainer: the fp32 gradients are clipped to global L2 norm 1.0 before AdamW; the norm before
    clipping is reported. Adam's first moment after one step is (1 - beta1) x the clipped gradient."""
    params = bf16_params()
    opt = MasterWeightAdamW(groups_of(params), lr=1e-3, betas=(0.9, 0.99), eps=1e-8)
    set_grads(params, 0, scale=10.0)
    grads = [p.grad.float() for p in params]
    norm = total_norm(grads)
    assert norm > 5
    opt.step()
    assert float(opt.last_grad_norm) == pytest.approx(norm, rel=1e-6)
    moments = [opt.state[m]["exp_avg"] / 0.1 for m in masters_of(opt)]
    assert total_norm(moments) == pytest.approx(1.0, rel=1e-5)
    for mom, g in zip(moments, grads):
        torch.testing.assert_close(mom, g / norm, rtol=1e-5, atol=1e-7)


def test_bf16_gradients_are_freed_by_the_step_unless_kept():
    """By default step() frees the bf16 gradients; under a CUDA graph (keep_model_grads) they are its fixed buffers
    and must stay."""
    params = bf16_params()
    opt = MasterWeightAdamW(groups_of(params), lr=1e-3)
    set_grads(params, 0)
    opt.step()
    assert all(p.grad is None for p in params)

    params = bf16_params()
    opt = MasterWeightAdamW(groups_of(params), lr=1e-3)
    opt.keep_model_grads = True
    set_grads(params, 0)
    buffers = [p.grad for p in params]
    opt.step()
    assert all(p.grad is b for p, b in zip(params, buffers))


def test_grad_norm_reaches_the_tracker_only_after_a_step():
    """Before its first step the optimizer has no norm, so the tracker reports the module's; after it, the global L2
    norm of the gradients."""
    params = bf16_params()
    opt = MasterWeightAdamW(groups_of(params), lr=1e-3)
    trainer, module = types.SimpleNamespace(optimizers=[opt]), types.SimpleNamespace(last_grad_norm=torch.tensor(3.0))
    assert float(RunTracker.grad_norm(trainer, module)) == 3.0
    set_grads(params, 0)
    norm = total_norm([p.grad for p in params])
    opt.step()
    assert float(RunTracker.grad_norm(trainer, module)) == pytest.approx(norm, rel=1e-6)


def test_zero_grad_clears_bf16_and_master_gradients():
    """zero_grad() sets every gradient to None: the model's bf16 ones and any on the fp32 masters (the optimizer's
    param_groups), as torch's default set_to_none does."""
    params = bf16_params()
    opt = MasterWeightAdamW(groups_of(params), lr=1e-3)
    set_grads(params, 0)
    for m in masters_of(opt):
        m.grad = torch.ones_like(m)
    opt.zero_grad()
    assert all(p.grad is None for p in params) and all(m.grad is None for m in masters_of(opt))


def test_state_dict_holds_copies_of_the_fp32_masters():
    params = bf16_params()
    opt = MasterWeightAdamW(groups_of(params), lr=1e-2)
    set_grads(params, 0)
    opt.step()
    sd = opt.state_dict()
    assert len(sd["param_groups"]) == 2 and len(sd["state"]) == 2  # torch's own parts are there too
    saved = sd["masters"]
    assert [s.dtype for s in saved] == [torch.float32] * 2
    assert all(torch.equal(s, m) for s, m in zip(saved, masters_of(opt)))
    assert any(not torch.equal(s, p.float()) for s, p in zip(saved, params))  # fp32, more than the bf16 weights
    kept = [s.clone() for s in saved]
    set_grads(params, 1)
    opt.step()  # a later step does not change the saved state
    assert all(torch.equal(s, k) for s, k in zip(saved, kept))
    assert any(not torch.equal(s, m) for s, m in zip(saved, masters_of(opt)))


def run_steps(params, opt, steps):
    for step in steps:
        set_grads(params, step)
        opt.step()


def test_a_resumed_optimizer_continues_exactly_like_the_uninterrupted_one():
    """load_state_dict restores the fp32 masters and the bf16 weights from them, and Adam's state: after a reload
    (through a checkpoint file) into a fresh model and optimizer, the next steps match bit for bit."""
    kwargs = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    params = bf16_params(seed=0)
    opt = MasterWeightAdamW(groups_of(params), **kwargs)
    run_steps(params, opt, range(3))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    run_steps(params, opt, range(3, 6))

    fresh = bf16_params(seed=7)
    resumed = MasterWeightAdamW(groups_of(fresh), **kwargs)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    run_steps(fresh, resumed, range(3, 6))
    assert all(torch.equal(a, b) for a, b in zip(fresh, params))
    assert all(torch.equal(a, b) for a, b in zip(masters_of(resumed), masters_of(opt)))
    assert all(fresh_p.dtype == torch.bfloat16 for fresh_p in fresh)


def test_loading_sets_the_bf16_weights_to_the_saved_masters():
    params = bf16_params(seed=0)
    opt = MasterWeightAdamW(groups_of(params), lr=1e-2)
    run_steps(params, opt, range(2))
    sd = opt.state_dict()
    saved = [s.clone() for s in sd["masters"]]
    fresh = bf16_params(seed=7)
    resumed = MasterWeightAdamW(groups_of(fresh), lr=1e-2)
    resumed.load_state_dict(sd)
    assert all(torch.equal(m, s) for m, s in zip(masters_of(resumed), saved))
    assert all(torch.equal(p, s.to(torch.bfloat16)) for p, s in zip(fresh, saved))
    assert resumed.state_dict()["state"][0]["step"] == 2
    again = MasterWeightAdamW(groups_of(bf16_params(seed=8)), lr=1e-2)
    again.load_state_dict(sd)  # the same dict a second time: it still holds the masters
    assert all(torch.equal(m, s) for m, s in zip(masters_of(again), saved))


def test_a_state_dict_without_masters_keeps_the_masters_from_the_weights():
    """A plain AdamW state (no "masters", as ShardedMasterAdamW also accepts) loads: Adam's moments and step are
    taken, the fp32 masters stay the model's own weights."""
    params = bf16_params(seed=0)
    plain_params = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    plain = torch.optim.AdamW(groups_of(plain_params), lr=1e-2)
    set_grads(plain_params, 0)
    plain.step()
    opt = MasterWeightAdamW(groups_of(params), lr=1e-2)
    opt.load_state_dict(plain.state_dict())
    assert all(torch.equal(m, p.float()) for m, p in zip(masters_of(opt), params))
    assert float(opt.state_dict()["state"][0]["step"]) == 1
    torch.testing.assert_close(opt.state[masters_of(opt)[1]]["exp_avg"], plain.state[plain_params[1]]["exp_avg"])
