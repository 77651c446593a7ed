"""Strategy ddp (rwkv7/train/data_parallel.py) as units on the CPU, over gloo.

Every multi-rank test runs rank 0 in the pytest process itself and ranks 1.. in os.fork()ed children (torch is
already imported; a FileStore joins them), so that all rank 0 executes counts for these tests (mutmut attributes only
code run in the test process; tests/test_data_parallel.py spawns every rank). A child reports a failure through a
pipe and its exit code; every group is destroyed and every child reaped, with timeouts, whatever happens.
The expectations come from elsewhere: MasterWeightAdamW (rwkv7/train/bf16_optim.py) over the whole batch on one
process, shard layouts worked out by hand, and Lightning's own classes.
Written against the mutants mutmut found alive in rwkv7/train/data_parallel.py (docs/TESTING.md)."""
import contextlib
import copy
import datetime
import math
import os
import signal
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist

from rwkv7.init import init_model
from rwkv7.model import ModelShape, RWKV7
from rwkv7.testhooks import Faults
from rwkv7.train import data_parallel as dp
from rwkv7.train import graphed
from rwkv7.train.bf16_optim import MasterWeightAdamW
from rwkv7.train.loss import training_loss
from rwkv7.train.module import param_groups

TIMEOUT = 60          # seconds a forked rank may live
GLOO_TIMEOUT = 30     # seconds a collective waits for the other ranks
GRACE = 5             # seconds the children get to finish once rank 0 has failed
KW = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-18)
CLIP = 0.5            # bites: the tiny model's gradient norms are above it
ROWS = 2              # rows of each rank's micro-batch
CTX = 16
# The tiny model (RWKV7(ModelShape(2, 64, 64, 64))): 141952 parameters, of which layer 0's value-residual LoRA
# (blocks.0.att.v0 64, v1 64x32, v2 32x64: 4160) gets no gradient; 137792 are reached = 2153 x 64.
REACHED = 137792
UNREACHED = {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}
# shard_len = ceil(n / (world * 64)) * 64:  2 ranks: ceil(1076.5) = 1077 -> 68928;  3 ranks: ceil(717.67) = 718 -> 45952
SHARD_LEN = {1: REACHED, 2: 68928, 3: 45952}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread here as in the forked ranks (three spinning OpenMP pools on two cores crawl)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    assert not dist.is_initialized()  # no test leaves a default process group behind


# ---------------------------------------------------------------------------------------------------------------
# forked ranks


def _join(store: str, rank: int, world: int) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=GLOO_TIMEOUT))


def _child(store: str, rank: int, world: int, fn, args, w: int) -> None:
    code = 1
    try:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(TIMEOUT)
        torch.set_num_threads(1)
        _join(store, rank, world)
        try:
            fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        code = 0
    except BaseException:  # noqa: BLE001 (anything a rank raises is reported to the test)
        try:
            os.write(w, traceback.format_exc()[-8000:].encode())
        except BaseException:  # noqa: BLE001
            pass
    finally:
        os._exit(code)


def _reap(children, deadline: float) -> list[str]:
    errors = []
    for rank, pid, r in children:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.005)
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
        os.close(r)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            errors.append(f"rank {rank} exited with {code}:\n" + b"".join(chunks).decode(errors="replace"))
    return errors


def on_ranks(world: int, fn, *args):
    """fn(rank, world, *args) on a gloo group of `world` ranks: rank 0 here, the others forked. Returns rank 0's
    result; any rank's exception fails the test."""
    assert not dist.is_initialized()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        children = []
        try:
            for rank in range(1, world):
                r, w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.close(r)
                    _child(store, rank, world, fn, args, w)
                os.close(w)
                children.append((rank, pid, r))
            _join(store, 0, world)
            try:
                result = fn(0, world, *args)
            finally:
                dist.destroy_process_group()
        except BaseException as e:
            for note in _reap(children, time.monotonic() + GRACE):
                e.add_note(note)
            raise
        errors = _reap(children, time.monotonic() + TIMEOUT)
        assert not errors, "\n".join(errors)
        return result


# ---------------------------------------------------------------------------------------------------------------
# models, batches, references


def tiny_model(seed=0, dtype=torch.float32):
    model = RWKV7(ModelShape(2, 64, 64, 64))
    init_model(model, seed=seed, bf16_round=False)
    return model.to(dtype)


def reference(model, clip=CLIP):
    """The unsharded optimizer over the whole model: what every number of ranks must reproduce."""
    return MasterWeightAdamW(param_groups(model, 0.1), clip=clip, **KW)


def sharded(model, clip=CLIP):
    return dp.sharded_optimizer(model, param_groups(model, 0.1), (1, CTX), clip=clip, **KW)


def batches(n, rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        b = torch.randint(0, 64, (rows, CTX + 1), generator=g)
        out.append((b[:, :-1], b[:, 1:]))
    return out


def set_lr(opt, step):
    for group in opt.param_groups:  # a schedule that changes the lr, per-group scale kept (lr_2x)
        group["lr"] = (1e-2 - 2e-3 * step) * group["my_lr_scale"]


def ref_step(ref, ref_opt, x, y):
    training_loss(ref, x, y).backward()
    ref_opt.step()
    ref_opt.zero_grad()


def assert_same_params(a, b, exact=False):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.shape == q.shape and p.dtype == q.dtype, name
        if exact:
            assert torch.equal(p, q), (name, (p - q).abs().max())
        else:
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), (name, (p - q).abs().max())


def assert_same_state(got, want, exact=False):
    """got (a state dict in MasterWeightAdamW's format) is want, tensor by tensor (shape and dtype included)."""
    def same(a, b, what):
        assert torch.is_tensor(a) and a.shape == b.shape and a.dtype == b.dtype, (what, a, b)
        if exact:
            assert torch.equal(a, b), what
        else:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-8), (what, (a - b).abs().max())

    assert sorted(got) == sorted(want) == ["masters", "param_groups", "state"]
    assert got["param_groups"] == want["param_groups"]
    assert sorted(got["state"]) == sorted(want["state"])
    for i, st in want["state"].items():
        assert sorted(got["state"][i]) == sorted(st), i
        for k, v in st.items():
            if k == "step":
                assert torch.equal(got["state"][i][k], v), (i, got["state"][i][k], v)
            else:
                same(got["state"][i][k], v, (i, k))
    assert len(got["masters"]) == len(want["masters"])
    for i, (a, b) in enumerate(zip(got["masters"], want["masters"])):
        same(a, b, ("master", i))


def assert_same_tensors(a, b, what=()):
    """Nested dicts/lists of tensors and plain values, equal exactly."""
    if torch.is_tensor(b):
        assert torch.is_tensor(a) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), what
    elif isinstance(b, dict):
        assert sorted(a, key=str) == sorted(b, key=str), what
        for k in b:
            assert_same_tensors(a[k], b[k], (*what, k))
    elif isinstance(b, (list, tuple)):
        assert len(a) == len(b), what
        for k, (u, v) in enumerate(zip(a, b)):
            assert_same_tensors(u, v, (*what, k))
    else:
        assert a == b, what


@contextlib.contextmanager
def default_dtype(dtype):
    """torch's default dtype changed (by whatever else runs in the process): the checkpoint stays fp32."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def param(*shape, seed):
    return torch.nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)))


# ---------------------------------------------------------------------------------------------------------------
# _world, reached_parameters


def test_without_a_process_group_this_is_the_only_rank():
    assert not dist.is_initialized()
    assert dp._world() == (1, 0)


def _world_of(rank, world):
    assert dp._world() == (world, rank)


def test_each_rank_sees_the_group_size_and_its_rank():
    on_ranks(3, _world_of)


def test_reached_parameters_are_all_but_layer_0s_value_lora_and_leave_no_gradient():
    model = tiny_model()
    names = {id(p): n for n, p in model.named_parameters()}
    for p in model.parameters():  # stale gradients everywhere, the unreached parameters included
        p.grad = torch.ones_like(p)
    model.head.weight.requires_grad_(False)  # frozen: not a parameter to train
    got = dp.reached_parameters(model, (1, CTX))
    want = [n for n, _ in model.named_parameters() if n not in UNREACHED and n != "head.weight"]
    assert [names[id(p)] for p in got] == want  # in the model's order
    assert all(p.grad is None for n, p in model.named_parameters() if n != "head.weight")
    assert model.head.weight.grad is not None  # a frozen parameter is left alone


# ---------------------------------------------------------------------------------------------------------------
# FlatBuffers


@pytest.mark.parametrize("sizes,world,shard_len", [
    ([10], 1, 64), ([64], 1, 64), ([40, 25], 1, 128),    # one rank: rounded up to 64
    ([64, 64], 2, 64), ([64, 65], 2, 128),               # exact fit, one over: another 64 per rank
    ([100, 50, 30], 3, 64), ([100, 50, 50], 3, 128),     # 180 <= 192, 200 > 192
])
def test_flat_buffer_length_is_ranks_times_an_aligned_shard(sizes, world, shard_len):
    params = [param(n, seed=i) for i, n in enumerate(sizes)]
    for rank in range(world):
        flat = dp.FlatBuffers(params, world, rank)
        assert flat.shard_len == shard_len
        assert flat.weights.shape == flat.grads.shape == (world * shard_len,)
        assert (flat.lo, flat.hi) == (rank * shard_len, (rank + 1) * shard_len)


def test_parameters_and_gradients_become_views_of_the_flat_buffers():
    a, b, c = param(10, 10, seed=1), param(5, 10, seed=2), param(30, seed=3)
    values = [p.detach().clone() for p in (a, b, c)]
    flat = dp.FlatBuffers([a, b, c], 3, 1)  # 180 elements: 3 x 64, padded by 12
    assert flat.offset == {id(a): 0, id(b): 100, id(c): 150}
    want = torch.cat([v.reshape(-1) for v in values] + [torch.zeros(12)])
    assert torch.equal(flat.weights, want)
    assert torch.equal(flat.grads, torch.zeros(192))
    for p, v, off in zip((a, b, c), values, (0, 100, 150)):
        assert p.shape == v.shape and torch.equal(p.detach(), v)
        assert p.grad.shape == v.shape and p.grad.dtype == v.dtype
    with torch.no_grad():
        flat.weights.copy_(torch.arange(192.0))
        flat.grads.copy_(-torch.arange(192.0))
    assert torch.equal(b.detach(), torch.arange(100.0, 150.0).view(5, 10))  # the parameter reads the buffer
    assert torch.equal(c.grad, -torch.arange(150.0, 180.0))
    assert torch.equal(a.grad, -torch.arange(100.0).view(10, 10))


def test_bf16_parameters_give_bf16_buffers():
    a, b = param(8, seed=1).bfloat16(), param(3, 3, seed=2).bfloat16()
    a, b = torch.nn.Parameter(a), torch.nn.Parameter(b)
    flat = dp.FlatBuffers([a, b], 1, 0)
    assert flat.weights.dtype == flat.grads.dtype == torch.bfloat16 and a.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("other", [
    lambda: torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16)),
    lambda: torch.nn.Parameter(torch.zeros(4, device="meta")),
], ids=["dtype", "device"])
def test_flat_buffers_need_one_dtype_and_device(other):
    with pytest.raises(ValueError, match=r"^strategy ddp flattens the parameters into one buffer: "
                                         r"they need one dtype and device$"):
        dp.FlatBuffers([param(4, seed=0), other()], 1, 0)


def test_buffers_and_checkpoint_vectors_are_on_the_parameters_device():
    """Parameters on the meta device (standing in for a GPU here): the buffers are there too, and so is the
    fp32 shard vector a checkpoint is gathered from."""
    a = torch.nn.Parameter(torch.zeros(10, dtype=torch.bfloat16, device="meta"))
    b = torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.bfloat16, device="meta"))
    flat = dp.FlatBuffers([a, b], 1, 0)
    assert flat.weights.device.type == flat.grads.device.type == a.device.type == a.grad.device.type == "meta"
    opt = dp.ShardedMasterAdamW([{"params": [a, b]}], flat, lr=1e-3)
    vec = opt._shard_vector([m for _, m in opt._pairs()])
    assert vec.device.type == "meta" and vec.dtype == torch.float32 and vec.shape == (64,)


# ---------------------------------------------------------------------------------------------------------------
# ShardedMasterAdamW: which pieces a rank owns (the world given by hand: construction needs no collective)

# A (8x8, 64) | U (20, never reached: not in the buffer) | B (80) | C (3x10, 30): 174 elements, 3 ranks x 64
# rank 0 [0, 64): all of A, ending on the boundary;  rank 1 [64, 128): B[0:64];  rank 2: B[64:80], C, 18 padding
LAYOUT = {0: [(0, 0, 64)], 1: [(2, 0, 64)], 2: [(2, 64, 80), (3, 0, 30)]}


def layout_params():
    return param(8, 8, seed=1), param(20, seed=2), param(80, seed=3), param(3, 10, seed=4)


def layout_groups(a, u, b, c):
    return [{"params": [a, u], "weight_decay": 0.0, "my_lr_scale": 2.0, "name": "first"},
            {"params": [b, c], "weight_decay": 0.1, "my_lr_scale": 1.0, "name": "second"}]


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_each_rank_owns_the_pieces_of_its_shard_in_the_official_groups(monkeypatch, rank):
    monkeypatch.setattr(dp, "_world", lambda: (3, rank))
    a, u, b, c = layout_params()
    full = [a, u, b, c]
    flat = dp.FlatBuffers([a, b, c], 3, rank)
    opt = dp.ShardedMasterAdamW(layout_groups(a, u, b, c), flat, clip=0.25, lr=1e-3)
    assert (opt.world, opt.rank) == (3, rank) and opt.flat is flat
    assert opt.full_params == full and opt.group_sizes == [2, 2]
    assert opt.pieces == LAYOUT[rank]
    assert opt.grad_factor == pytest.approx(1 / 3) and opt.keep_model_grads is True and opt.clip == 0.25
    lo = 64 * rank
    assert opt.shard_grads.shape == (64,) and opt.shard_grads.data_ptr() != flat.grads[lo].data_ptr()
    # the optimizer's parameters: 1-D views of the weight buffer, their gradients views of the reduced shard
    views = [v for g in opt.model_params for v in g]
    assert len(views) == len(LAYOUT[rank])
    for v, (i, s, e) in zip(views, LAYOUT[rank]):
        start = flat.offset[id(full[i])] + s
        assert v.shape == (e - s,) and v.data_ptr() == flat.weights[start].data_ptr()
        assert v.grad.shape == (e - s,) and v.grad.data_ptr() == opt.shard_grads[start - lo].data_ptr()
    # the official groups, each with its own options, holding this rank's pieces of its parameters
    want_counts = {0: [1, 0], 1: [0, 1], 2: [0, 2]}[rank]
    assert [len(g["params"]) for g in opt.param_groups] == want_counts
    assert [(g["weight_decay"], g["my_lr_scale"], g["name"], g["lr"]) for g in opt.param_groups] == [
        (0.0, 2.0, "first", 1e-3), (0.1, 1.0, "second", 1e-3)]
    masters = [m for g in opt.param_groups for m in g["params"]]
    assert all(m.dtype == torch.float32 and torch.equal(m, v) for m, v in zip(masters, views))


def test_one_rank_reduces_nothing_its_shard_gradients_are_the_buffer():
    a, u, b, c = layout_params()
    flat = dp.FlatBuffers([a, b, c], 1, 0)  # 174 elements: one shard of 192
    opt = dp.ShardedMasterAdamW(layout_groups(a, u, b, c), flat, lr=1e-3)
    assert (opt.world, opt.rank) == (1, 0) and opt.grad_factor == 1.0 and opt.clip == 1.0
    assert opt.pieces == [(0, 0, 64), (2, 0, 80), (3, 0, 30)]
    assert opt.shard_grads.data_ptr() == flat.grads.data_ptr() and opt.shard_grads.shape == (192,)


def test_a_rank_past_the_parameters_is_an_error(monkeypatch):
    a = param(10, seed=0)
    monkeypatch.setattr(dp, "_world", lambda: (3, 0))
    dp.ShardedMasterAdamW([{"params": [a]}], dp.FlatBuffers([a], 3, 0), lr=1e-3)  # rank 0 holds all ten
    monkeypatch.setattr(dp, "_world", lambda: (3, 2))
    with pytest.raises(ValueError, match=r"^rank 2 holds no parameters: the model is too small for 3 ranks$"):
        dp.ShardedMasterAdamW([{"params": [a]}], dp.FlatBuffers([a], 3, 2), lr=1e-3)


def test_zero_grad_zeroes_the_buffer_and_keeps_the_views():
    model = tiny_model()
    opt = sharded(model)
    views = {id(p): p.grad for p in model.parameters() if p.grad is not None}
    opt.flat.grads.fill_(3.0)
    opt.zero_grad()
    assert torch.equal(opt.flat.grads, torch.zeros(SHARD_LEN[1]))
    assert len(views) == len(list(model.parameters())) - len(UNREACHED)
    assert all(p.grad is views[id(p)] for p in model.parameters() if id(p) in views)


# ---------------------------------------------------------------------------------------------------------------
# one rank: MasterWeightAdamW's arithmetic and checkpoint format


def small_params(seed):
    """s (1 element: its moments are as long as the step counter) | a 3x4 | u (never reached) | b 70."""
    return param(1, seed=seed), param(3, 4, seed=seed + 1), param(5, seed=seed + 2), param(70, seed=seed + 3)


def small_groups(s, a, u, b):
    return [{"params": [s, a], "weight_decay": 0.0, "my_lr_scale": 2.0, "name": "x"},
            {"params": [u, b], "weight_decay": 0.1, "my_lr_scale": 1.0, "name": "y"}]


def test_one_rank_steps_and_saves_as_master_weight_adamw_with_hand_set_gradients():
    ref_params, params = small_params(0), small_params(0)
    ref_opt = MasterWeightAdamW(small_groups(*ref_params), clip=0.3, **KW)
    s, a, u, b = params
    opt = dp.ShardedMasterAdamW(small_groups(*params), dp.FlatBuffers([s, a, b], 1, 0), clip=0.3, **KW)
    assert_same_state(opt.state_dict(), ref_opt.state_dict(), exact=True)  # before any step: masters only
    g = torch.Generator().manual_seed(9)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in (s, a, b)]
        for p, gr in zip((ref_params[0], ref_params[1], ref_params[3]), grads):
            p.grad = gr.clone()
        opt.zero_grad()
        for p, gr in zip((s, a, b), grads):
            p.grad += gr
        set_lr(ref_opt, step)
        set_lr(opt, step)
        ref_opt.step()
        opt.step()
        assert float(opt.last_grad_norm) == float(ref_opt.last_grad_norm)
        assert math.sqrt(sum(float((gr * gr).sum()) for gr in grads)) == pytest.approx(
            float(opt.last_grad_norm), rel=1e-6)
        for p, q in zip(ref_params, params):
            assert torch.equal(p, q)
        assert all(torch.equal(p.grad, gr) for p, gr in zip((s, a, b), grads))  # never set to None
    sd = opt.state_dict()
    assert_same_state(sd, ref_opt.state_dict(), exact=True)
    assert sd["state"][0]["step"].shape == () and sd["state"][0]["exp_avg"].shape == (1,)
    # a snapshot: later steps and weight changes do not reach it
    kept = copy.deepcopy(sd)
    for p in (s, a, b):
        p.grad += 1.0
    opt.step()
    with torch.no_grad():
        u.add_(1.0)
    assert_same_tensors(sd, kept)
    # and it loads back: into a fresh optimizer, whose model takes the masters
    fresh = small_params(50)
    s2, a2, u2, b2 = fresh
    opt2 = dp.ShardedMasterAdamW(small_groups(*fresh), dp.FlatBuffers([s2, a2, b2], 1, 0), clip=0.3, **KW)
    opt2.load_state_dict(sd)
    assert_same_tensors(sd, kept)
    assert all(torch.equal(p.detach(), m) for p, m in zip(fresh, sd["masters"]))
    assert_same_state(opt2.state_dict(), sd, exact=True)
    assert opt2.state_dict()["state"][0]["step"].shape == ()


def test_a_single_parameter_checkpoints_as_master_weight_adamw():
    ref_w, w = param(6, 5, seed=3), param(6, 5, seed=3)
    ref_opt = MasterWeightAdamW([{"params": [ref_w]}], clip=0.5, **KW)
    opt = dp.ShardedMasterAdamW([{"params": [w]}], dp.FlatBuffers([w], 1, 0), clip=0.5, **KW)
    gr = torch.randn(6, 5, generator=torch.Generator().manual_seed(4))
    ref_w.grad = gr.clone()
    w.grad.copy_(gr)
    ref_opt.step()
    opt.step()
    assert_same_state(opt.state_dict(), ref_opt.state_dict(), exact=True)


def test_a_bf16_checkpoint_restores_the_fp32_masters_not_the_rounded_weights():
    ref_params = [torch.nn.Parameter(p.detach().bfloat16()) for p in small_params(0)]
    ref_opt = MasterWeightAdamW(small_groups(*ref_params), **KW)
    g = torch.Generator().manual_seed(2)
    for p in (ref_params[0], ref_params[1], ref_params[3]):
        p.grad = torch.randn(p.shape, generator=g).bfloat16()
    ref_opt.step()
    sd = copy.deepcopy(ref_opt.state_dict())
    assert not all(torch.equal(m, p.detach().float()) for m, p in zip(sd["masters"], ref_params))  # rounded
    params = [torch.nn.Parameter(p.detach().bfloat16()) for p in small_params(30)]
    s, a, u, b = params
    opt = dp.ShardedMasterAdamW(small_groups(*params), dp.FlatBuffers([s, a, b], 1, 0), **KW)
    opt.load_state_dict(sd)
    assert all(torch.equal(p, q) for p, q in zip(params, ref_params))  # the weights: the masters, rounded
    assert_same_state(opt.state_dict(), sd, exact=True)  # the masters: as saved


def steps_side_by_side(ref, ref_opt, model, opt, batches_, first=0, mine=slice(None)):
    """One step of the reference on each whole batch and of the sharded optimizer on this rank's rows of it (`mine`),
    at the same learning rate; yields the step after each for the caller's checks."""
    for step, (x, y) in enumerate(batches_, start=first):
        set_lr(ref_opt, step)
        set_lr(opt, step)
        ref_step(ref, ref_opt, x, y)
        opt.zero_grad()
        training_loss(model, x[mine], y[mine]).backward()
        opt.step()
        yield step


def test_one_rank_trains_the_model_as_master_weight_adamw():
    ref, model = tiny_model(), tiny_model()
    ref_opt, opt = reference(ref), sharded(model)
    assert (opt.world, opt.rank, opt.flat.shard_len) == (1, 0, SHARD_LEN[1])
    assert_same_state(opt.state_dict(), ref_opt.state_dict(), exact=True)
    for _ in steps_side_by_side(ref, ref_opt, model, opt, batches(3, ROWS)):
        assert float(opt.last_grad_norm) == float(ref_opt.last_grad_norm) > CLIP
        assert_same_params(ref, model, exact=True)
    with default_dtype(torch.float64):
        got = opt.state_dict()
    assert_same_state(got, ref_opt.state_dict(), exact=True)


def test_one_rank_loads_master_weight_adamw_state_and_continues_with_it():
    ref = tiny_model()
    ref_opt = reference(ref)
    for step, (x, y) in enumerate(batches(2, ROWS)):
        set_lr(ref_opt, step)
        ref_step(ref, ref_opt, x, y)
    sd = copy.deepcopy(ref_opt.state_dict())  # torch's state_dict() holds the optimizer's own tensors
    kept = copy.deepcopy(sd)
    model = tiny_model(seed=3)
    opt = sharded(model)
    opt.load_state_dict(sd)
    assert_same_params(ref, model, exact=True)
    assert_same_state(opt.state_dict(), sd, exact=True)
    for _ in steps_side_by_side(ref, ref_opt, model, opt, batches(2, ROWS, seed=1), first=2):
        assert_same_params(ref, model, exact=True)
    assert_same_tensors(sd, kept)  # the caller's dict is not the optimizer's state


def test_a_plain_adamw_state_loads_with_the_weights_as_masters():
    src = tiny_model()
    adamw = torch.optim.AdamW(param_groups(src, 0.1), **KW)
    for x, y in batches(2, ROWS):
        training_loss(src, x, y).backward()
        adamw.step()
        adamw.zero_grad()
    sd = copy.deepcopy(adamw.state_dict())
    kept = copy.deepcopy(sd)
    model = tiny_model(seed=4)
    with torch.no_grad():
        for p, q in zip(model.parameters(), src.parameters()):
            p.copy_(q)
    opt = sharded(model, clip=0.0)
    opt.load_state_dict(sd)
    assert_same_params(src, model, exact=True)  # no masters: the weights stay
    got = opt.state_dict()
    in_groups = [p for g in param_groups(model, 0.1) for p in g["params"]]  # the checkpoint's order
    assert len(got["masters"]) == len(in_groups)
    assert all(torch.equal(m, p.detach()) for m, p in zip(got["masters"], in_groups))
    assert_same_tensors({"state": got["state"], "param_groups": got["param_groups"]}, kept)
    # and it continues as that AdamW would (clip 0: no clipping)
    x, y = batches(1, ROWS, seed=2)[0]
    for o, m in ((adamw, src), (opt, model)):
        o.zero_grad()
        training_loss(m, x, y).backward()
        o.step()
    assert_same_params(src, model)
    assert_same_tensors(sd, kept)


def test_bf16_model_state_keeps_fp32_masters_of_every_parameter():
    ref, model = tiny_model(dtype=torch.bfloat16), tiny_model(dtype=torch.bfloat16)
    got, want = sharded(model).state_dict(), reference(ref).state_dict()
    assert_same_state(got, want, exact=True)
    assert len(got["masters"]) == len(list(model.parameters()))
    assert all(m.dtype == torch.float32 for m in got["masters"])


# ---------------------------------------------------------------------------------------------------------------
# several ranks: the same training as one process on the whole batch, the same checkpoint, resharded


def _train_and_save(rank, world, path, steps):
    ref, model = tiny_model(), tiny_model()
    ref_opt, opt = reference(ref), sharded(model)
    S = SHARD_LEN[world]
    assert (opt.world, opt.rank) == (world, rank) and opt.grad_factor == 1 / world
    assert (opt.flat.shard_len, opt.flat.lo, opt.flat.hi) == (S, rank * S, (rank + 1) * S)
    mine = slice(rank * ROWS, (rank + 1) * ROWS)
    for step in steps_side_by_side(ref, ref_opt, model, opt, batches(steps, world * ROWS), mine=mine):
        assert torch.allclose(opt.last_grad_norm, ref_opt.last_grad_norm, rtol=1e-5), (
            step, opt.last_grad_norm, ref_opt.last_grad_norm)
        assert_same_params(ref, model)
    with default_dtype(torch.float64):
        got = opt.state_dict()
    if rank != 0:
        assert got is None
        return
    assert_same_state(got, ref_opt.state_dict())
    torch.save(got, path)


def _load_and_continue(rank, world, path):
    sd = torch.load(path)
    ref, model = tiny_model(seed=5), tiny_model(seed=6)
    ref_opt, opt = reference(ref), sharded(model)
    ref_opt.load_state_dict(torch.load(path))  # torch's load_state_dict keeps the given tensors: another copy
    opt.load_state_dict(sd)
    assert_same_params(ref, model, exact=True)
    mine = slice(rank * ROWS, (rank + 1) * ROWS)
    for _ in steps_side_by_side(ref, ref_opt, model, opt, batches(2, world * ROWS, seed=7), first=2, mine=mine):
        assert_same_params(ref, model)
    got = opt.state_dict()
    assert_same_tensors(sd, torch.load(path))  # loading copied what it keeps
    if rank == 0:
        assert_same_state(got, ref_opt.state_dict())


def test_three_ranks_train_save_and_resume_on_two_as_one_process(monkeypatch, tmp_path):
    """Odd world: shards end inside parameters and the last is padded. The state is gathered in windows of 10000
    elements (a shard of 45952 takes five, the last one short), as MasterWeightAdamW's own state dict."""
    monkeypatch.setattr(dp, "GATHER_WINDOW", 10000)
    on_ranks(3, _train_and_save, tmp_path / "sd.pt", 2)
    monkeypatch.setattr(dp, "GATHER_WINDOW", 1 << 24)
    on_ranks(2, _load_and_continue, tmp_path / "sd.pt")


def _gather_windows(rank, world, windows):
    model = tiny_model()
    opt = sharded(model)
    S = SHARD_LEN[world]
    shard = torch.arange(rank * S, (rank + 1) * S, dtype=torch.float32) * 0.5
    seen = []
    real = dp._all_gather

    def counting(out, inp):
        seen.append(inp.numel())
        return real(out, inp)

    dp._all_gather = counting
    try:
        got = opt._gather(shard)
    finally:
        dp._all_gather = real
    assert seen == windows
    if rank == 0:
        assert torch.equal(got, torch.arange(world * S, dtype=torch.float32) * 0.5)
    else:
        assert got is None


@pytest.mark.parametrize("window,windows", [(1 << 24, [68928]), (30000, [30000, 30000, 8928]),
                                            (68928, [68928]), (34464, [34464, 34464])])
def test_gather_collects_every_shard_in_windows(monkeypatch, window, windows):
    monkeypatch.setattr(dp, "GATHER_WINDOW", window)
    on_ranks(2, _gather_windows, windows)


# ---------------------------------------------------------------------------------------------------------------
# training_step


class Handle:
    """Lightning's LightningOptimizer: the real optimizer in .optimizer, step() runs it."""

    def __init__(self, opt):
        self.optimizer = opt
        self.steps = 0

    def step(self):
        self.steps += 1
        self.optimizer.step()


class StandIn:
    """What data_parallel.training_step uses of RWKV7Module."""
    SKIPPED = object()

    def __init__(self, model, opt, faults=None, check_now=True):
        self.model, self.handle = model, Handle(opt)
        self.use_graph, self.graphed = False, None
        self.faults, self.run_step, self.check_now = faults or Faults(), 0, check_now
        self.bad = []

    def optimizers(self):
        return self.handle

    def _bad_step(self, what):
        self.bad.append(what)
        return self.SKIPPED


class Scaled(Faults):
    """The loss as training sees it: times `factor` at the steps given (per rank), recorded."""

    def __init__(self, factor=1.0, steps=(), add=0.0):
        self.factor, self.steps, self.add, self.seen = factor, set(steps), add, []

    def loss(self, step, loss):
        self.seen.append((step, float(loss)))
        return loss * self.factor + self.add if step in self.steps else loss


def test_training_step_is_one_sharded_step_on_the_loss():
    ref, model = tiny_model(), tiny_model()
    ref_opt = reference(ref)
    faults = Scaled(steps={7}, add=100.0)
    m = StandIn(model, sharded(model), faults=faults)
    for step, (x, y) in enumerate(batches(2, ROWS)):
        with torch.no_grad():
            want = float(training_loss(ref, x, y))
        ref_step(ref, ref_opt, x, y)
        m.handle.optimizer.flat.grads.fill_(5.0)  # stale gradients: the step zeroes them first
        m.run_step = 6 + step
        got = dp.training_step(m, x, y)
        assert torch.is_tensor(got) and not got.requires_grad and got.shape == ()
        assert float(got) == pytest.approx(want + (100.0 if step == 1 else 0.0), abs=1e-4)
        assert faults.seen[-1] == (6 + step, want)
        assert m.handle.steps == step + 1 and m.bad == []
        assert_same_params(ref, model, exact=True)


@pytest.mark.parametrize("factor,grad,what", [
    (float("nan"), 0.0, "loss is nan"),
    (float("inf"), 0.0, "loss is inf"),
    (1.0, float("inf"), "gradient norm is inf"),
    (1.0, float("nan"), "gradient norm is nan"),
    (float("nan"), float("inf"), "loss is nan"),  # the loss is named first
])
def test_a_non_finite_step_is_skipped_as_a_bad_step(factor, grad, what):
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    m = StandIn(model, sharded(model), faults=Scaled(factor, steps={3}))
    m.run_step = 3
    hook = model.blocks[1].ffn.key.weight.register_hook(lambda g: g + grad)
    x, y = batches(1, ROWS)[0]
    assert dp.training_step(m, x, y) is StandIn.SKIPPED
    hook.remove()
    assert m.bad == [what] and m.handle.steps == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_without_the_early_check_a_non_finite_loss_is_not_looked_at():
    model = tiny_model()
    m = StandIn(model, sharded(model), faults=Scaled(float("nan"), steps={0}), check_now=False)
    x, y = batches(1, ROWS)[0]
    got = dp.training_step(m, x, y)
    assert math.isnan(float(got)) and m.bad == [] and m.handle.steps == 1


class FakeFlatGraph:
    """Stands in for FlatGradGraphedStep (a CUDA graph): records how it is built and called, runs eagerly."""

    def __init__(self, *args):
        self.args, self.calls = args, []
        self.grads, self.model, self.loss_fn = args[0], args[1], args[2]

    def __call__(self, x, y):
        self.calls.append((x, y))
        loss = self.loss_fn(self.model, x, y)
        loss.backward()
        return loss.detach() + 1000.0  # marks the graph's loss


def test_the_graphed_step_is_built_once_on_the_flat_gradients(monkeypatch):
    monkeypatch.setattr(dp, "FlatGradGraphedStep", FakeFlatGraph)
    ref, model = tiny_model(), tiny_model()
    ref_opt, opt = reference(ref), sharded(model)
    m = StandIn(model, opt)
    m.use_graph = True
    (x1, y1), (x2, y2) = batches(2, ROWS)
    outs = []
    for x, y in ((x1, y1), (x2, y2)):
        with torch.no_grad():
            want = float(training_loss(ref, x, y))
        ref_step(ref, ref_opt, x, y)
        outs.append((float(dp.training_step(m, x, y)), want))
        assert_same_params(ref, model, exact=True)
    g = m.graphed
    assert isinstance(g, FakeFlatGraph) and len(g.args) == 5
    assert g.args[0] is opt.flat.grads and g.args[1] is model and g.args[2] is training_loss
    assert g.args[3] is x1 and g.args[4] is y1
    assert g.calls == [(x1, y1), (x2, y2)]
    assert all(got == pytest.approx(want + 1000.0, abs=1e-3) for got, want in outs) and m.handle.steps == 2


def test_flat_grad_graphed_step_zeroes_the_flat_buffer(monkeypatch):
    built = []
    monkeypatch.setattr(graphed.GraphedStep, "__init__", lambda self, *args: built.append(args))
    grads = torch.full((128,), 2.0)
    step = dp.FlatGradGraphedStep(grads, "model", "loss_fn", "x", "y")
    assert built == [("model", "loss_fn", "x", "y")] and step.flat_grads is grads
    step._zero()
    assert step.flat_grads is grads and torch.equal(grads, torch.zeros(128))


def test_any_rank_with_one_rank_is_the_flag():
    assert dp._any_rank(True, 1, "cpu") is True
    assert dp._any_rank(False, 1, "cpu") is False


def _ranks_agree(rank, world, dirs):
    for flags in ((False, False), (True, False), (False, True), (True, True)):
        assert dp._any_rank(flags[rank], world, "cpu") is any(flags), flags
    ref, model = tiny_model(), tiny_model()
    ref_opt = reference(ref)
    faults = Scaled(float("nan"), steps={1} if rank == 1 else set())
    m = StandIn(model, sharded(model), faults=faults)
    mine = slice(rank * ROWS, (rank + 1) * ROWS)
    (x, y), (x2, y2) = batches(2, world * ROWS)
    # step 0: a plain step of the whole batch
    ref_step(ref, ref_opt, x, y)
    got = dp.training_step(m, x[mine], y[mine])
    with torch.no_grad():
        assert float(got) == pytest.approx(float(training_loss(tiny_model(), x[mine], y[mine])), rel=1e-6)
    assert m.bad == [] and m.handle.steps == 1
    assert_same_params(ref, model)
    # step 1: rank 1's loss is NaN, step 2: rank 1's gradient is infinite; both ranks skip both
    m.run_step = 1
    assert dp.training_step(m, x2[mine], y2[mine]) is StandIn.SKIPPED
    m.run_step = 2
    hook = model.emb.weight.register_hook(lambda g: g + (float("inf") if rank == 1 else 0.0))
    assert dp.training_step(m, x2[mine], y2[mine]) is StandIn.SKIPPED
    hook.remove()
    other = "another rank's loss or gradient is not finite"
    assert m.bad == ([other, other] if rank == 0 else ["loss is nan", "gradient norm is inf"])
    assert m.handle.steps == 1
    assert_same_params(ref, model)
    # the checkpoint's state.pt: every rank sends its shard, rank 0 writes
    dp.save_state(dirs[rank], model, m.handle.optimizer, write=rank == 0)
    if rank == 0:
        sd = torch.load(dirs[0] / "state.pt")
        assert sorted(sd) == ["model", "optimizer"]
        assert_same_tensors(sd["model"], dict(model.state_dict()))
        assert_same_state(sd["optimizer"], ref_opt.state_dict())
    else:
        assert list(dirs[1].iterdir()) == []


def test_two_ranks_skip_together_and_save_through_rank_0(tmp_path):
    dirs = [tmp_path / "rank0", tmp_path / "rank1"]
    for d in dirs:
        d.mkdir()
    on_ranks(2, _ranks_agree, dirs)


# ---------------------------------------------------------------------------------------------------------------
# save_state on one rank, lightning_strategy


def test_save_state_writes_the_model_and_the_whole_optimizer_state(tmp_path):
    ref, model = tiny_model(), tiny_model()
    ref_opt, opt = reference(ref), sharded(model)
    x, y = batches(1, ROWS)[0]
    ref_step(ref, ref_opt, x, y)
    opt.zero_grad()
    training_loss(model, x, y).backward()
    opt.step()
    dp.save_state(tmp_path, model, opt, write=True)
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
    sd = torch.load(tmp_path / "state.pt")
    assert sorted(sd) == ["model", "optimizer"]
    assert_same_tensors(sd["model"], dict(ref.state_dict()))
    for k, v in sd["model"].items():  # each its own compact tensor, not a view of the padded flat buffer
        assert v.untyped_storage().nbytes() == v.numel() * v.element_size(), k
    assert_same_state(sd["optimizer"], ref_opt.state_dict(), exact=True)


def test_save_state_without_write_still_takes_part_and_writes_nothing(tmp_path):
    class Recording:
        calls = 0

        def state_dict(self):
            Recording.calls += 1
            return {"state": {}}

    dp.save_state(tmp_path, tiny_model(), Recording(), write=False)
    assert Recording.calls == 1 and list(tmp_path.iterdir()) == []


def test_lightning_strategy_is_ddp_without_the_wrapper():
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import DDPStrategy

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.seen = []
            self.automatic_optimization = False

        def forward(self, *args, **kwargs):
            raise AssertionError("DistributedDataParallel's forward is not the training step")

        def training_step(self, *args, **kwargs):
            self.seen.append((args, kwargs))
            return "loss"

    s = dp.lightning_strategy(datetime.timedelta(seconds=123))
    assert isinstance(s, DDPStrategy) and s._timeout == datetime.timedelta(seconds=123)
    module = Module()
    s.model = module
    s.configure_ddp()
    assert s.model is module  # not wrapped in DistributedDataParallel
    assert s.training_step("batch", 4, extra=1) == "loss"
    assert module.seen == [(("batch", 4), {"extra": 1})]
    s.post_training_step()
    assert not hasattr(module, "require_backward_grad_sync")
