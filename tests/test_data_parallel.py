"""Strategy ddp on CPU processes over gloo: the sharded optimizer is MasterWeightAdamW's arithmetic, N processes train
like one at the same global batch, a killed run resumes exactly, and a checkpoint resumes on another process count."""
import json
import os
import shutil
import signal
import socket
import sys
from pathlib import Path

import pytest
import torch

from tests import zygote


ROOT = Path(__file__).resolve().parent.parent
WORLD = 3  # odd: shards end inside parameters, the last one is padded


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model():
    from rwkv7.init import init_model
    from rwkv7.model import ModelShape, RWKV7

    model = RWKV7(ModelShape(2, 64, 64, 64))
    init_model(model, seed=0, bf16_round=False)
    return model


def _optimizer_worker(rank: int, world: int, port: int) -> None:
    """Every rank: the unsharded MasterWeightAdamW on the whole global batch, and this rank's ShardedMasterAdamW
    on its own rows of it; weights, gradient norms and the gathered state must agree after every step."""
    import torch.distributed as dist

    from rwkv7.train.bf16_optim import MasterWeightAdamW
    from rwkv7.train.data_parallel import sharded_optimizer
    from rwkv7.train.loss import training_loss
    from rwkv7.train.module import param_groups

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ref, model = _tiny_model(), _tiny_model()
        # weight decay on, a clip that bites, the 2x-lr group: everything the per-element groups must keep
        kwargs = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-18)
        ref_opt = MasterWeightAdamW(param_groups(ref, 0.1), clip=0.5, **kwargs)
        opt = sharded_optimizer(model, param_groups(model, 0.1), (1, 16), clip=0.5, **kwargs)
        g = torch.Generator().manual_seed(0)
        rows = 2
        for step in range(4):
            batch = torch.randint(0, 64, (world * rows, 17), generator=g)
            x, y = batch[:, :-1], batch[:, 1:]
            for o in (ref_opt, opt):
                for group in o.param_groups:
                    group["lr"] = (1e-2 - 2e-3 * step) * group["my_lr_scale"]
            training_loss(ref, x, y).backward()
            ref_opt.step()
            ref_opt.zero_grad()
            opt.zero_grad()
            mine = slice(rank * rows, (rank + 1) * rows)
            training_loss(model, x[mine], y[mine]).backward()
            opt.step()
            assert torch.allclose(opt.last_grad_norm, ref_opt.last_grad_norm, rtol=1e-5), (
                step, opt.last_grad_norm, ref_opt.last_grad_norm)
            for (name, a), b in zip(ref.named_parameters(), model.parameters()):
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (step, name, (a - b).abs().max())
        # the gathered state is MasterWeightAdamW's own (the checkpoint format), to fp32 rounding
        full, want = opt.state_dict(), ref_opt.state_dict()
        if rank == 0:
            assert sorted(full["state"]) == sorted(want["state"])  # the same parameters (the unreached have none)
            assert [gr["params"] for gr in full["param_groups"]] == [gr["params"] for gr in want["param_groups"]]
            for i, st in want["state"].items():
                assert float(full["state"][i]["step"]) == float(st["step"]) == 4
                for k in ("exp_avg", "exp_avg_sq"):
                    assert torch.allclose(full["state"][i][k], st[k], rtol=1e-4, atol=1e-9), (i, k)
            for a, b in zip(full["masters"], want["masters"]):
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert full is None
        # a fresh 3-rank optimizer loads the 1-process state (resharding) and continues in step with it
        model2 = _tiny_model()
        opt2 = sharded_optimizer(model2, param_groups(model2, 0.1), (1, 16), clip=0.5, **kwargs)
        opt2.load_state_dict(ref_opt.state_dict())
        for a, b in zip(ref.parameters(), model2.parameters()):
            assert torch.equal(a, b)
        batch = torch.randint(0, 64, (world * rows, 17), generator=g)
        x, y = batch[:, :-1], batch[:, 1:]
        training_loss(ref, x, y).backward()
        ref_opt.step()
        opt2.zero_grad()
        mine = slice(rank * rows, (rank + 1) * rows)
        training_loss(model2, x[mine], y[mine]).backward()
        opt2.step()
        for (name, a), b in zip(ref.named_parameters(), model2.parameters()):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), ("after load", name, (a - b).abs().max())
    finally:
        dist.destroy_process_group()


def test_sharded_optimizer_equals_master_weight_adamw():
    import torch.multiprocessing as mp

    mp.spawn(_optimizer_worker, args=(WORLD, _free_port()), nprocs=WORLD, join=True)


# end to end: the tiny recipe, smaller still (ctx 32, n_embd 64), 4 mini-epochs of 5 steps, strategy ddp on gloo
DDP = ["--set", "train.strategy=ddp", "train.ctx_len=32", "model.n_embd=64", "train.epoch_steps=5",
       "train.epoch_count=4", "train.epoch_save=1"]
GLOBAL_BATCH = 8


def train(out, ranks: int, fault: str | None = None, check: bool = True):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("RWKV7_TEST_FAULT", None)
    if fault:
        env["RWKV7_TEST_FAULT"] = fault
    cmd = [sys.executable, str(ROOT / "entrypoint.py"), "train", "--recipe", "tiny", "--out", str(out), "--no-check",
           "--no-progress", *DDP, f"train.devices={ranks}", f"train.micro_bsz={GLOBAL_BATCH // ranks}"]
    p = zygote.run(cmd, cwd=ROOT, env=env)  # rank 0 forked ready-imported; Lightning starts the other ranks
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def step_losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 20 steps at global batch 8 on 1, 2 and 4 processes."""
    root = tmp_path_factory.mktemp("ddp")
    for ranks in (1, 2, 4):
        train(root / f"ranks{ranks}", ranks)
    return root


def test_two_and_four_processes_match_one(runs):
    one = step_losses(runs / "ranks1")
    assert len(one) == 20 and sum(one[-5:]) < sum(one[:5]) - 1.0  # it learns
    for ranks in (2, 4):
        got = step_losses(runs / f"ranks{ranks}")
        assert len(got) == 20
        assert max(abs(a - b) for a, b in zip(one, got)) < 1e-4, (ranks, one, got)
    # rwkv-N.pth is the official flat bf16 state dict, the same model whatever the number of processes
    a = torch.load(runs / "ranks1" / "rwkv-3.pth", weights_only=True)
    b = torch.load(runs / "ranks4" / "rwkv-3.pth", weights_only=True)
    assert a.keys() == b.keys() and "blocks.1.att.r_k" in a and a["emb.weight"].dtype == torch.bfloat16
    assert all((a[k].float() - b[k].float()).abs().max() <= 0.01 for k in a)


def test_sigkill_then_resume_is_exact(runs, tmp_path):
    out = tmp_path / "run"
    p = train(out, 2, fault="kill@13", check=False)
    assert p.returncode == -signal.SIGKILL
    p = train(out, 2)
    assert "resuming" in p.stdout and "step-00000010" in p.stdout
    ref, got = step_losses(runs / "ranks2"), step_losses(out)
    assert len(got) == 20
    assert max(abs(a - b) for a, b in zip(ref, got)) <= 1e-6, (ref, got)


def test_four_process_checkpoint_resumes_on_two(runs, tmp_path):
    """A checkpoint written by 4 processes (each saving its optimizer shard through rank 0) continues on 2."""
    out = tmp_path / "run"
    shutil.copytree(runs / "ranks4", out)
    shutil.rmtree(out / "ckpt" / "step-00000020")  # as if the run had died after the checkpoint of step 15
    p = train(out, 2)
    assert "resuming" in p.stdout and "step-00000015" in p.stdout
    ref, got = step_losses(runs / "ranks1"), step_losses(out)
    assert len(got) == 20
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-4, (ref, got)


def test_non_finite_loss_stops_every_rank_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    p = train(out, 2, fault="nan@7", check=False)
    assert p.returncode == 3, p.stdout[-3000:] + p.stderr[-3000:]
    assert "diverged at step 7" in p.stdout
    assert [d.name for d in (out / "ckpt").iterdir()] == ["step-00000005"]
