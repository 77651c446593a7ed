"""Units of the training run that need a Trainer in a real run, driven here with small stand-ins (one process):
writing, finding and restoring a full checkpoint; the loss module's bad-step handling and clipping; the progress bar;
the fault hooks. Written to kill the mutants mutmut found alive (docs/TESTING.md)."""
import errno
import json
import math
import signal

import pytest
import torch

from rwkv7 import checkpoint as ckpt
from rwkv7.errors import UserError
from rwkv7.model import ModelShape, RWKV7
from rwkv7.recipe import load_recipe
from rwkv7.testhooks import EnvFaults, Faults
from rwkv7.train import resume
from rwkv7.train.module import NonFiniteLoss, RWKV7Module, lm_loss

SHAPE = ModelShape(n_layer=2, n_embd=64, vocab_size=32, head_size=64)
SMALL = ["model.n_layer=2", "model.n_embd=64", "model.vocab_size=32"]


class OneProcess:
    """The parts of a Lightning Trainer (and its strategy) the checkpoint code uses, for a single process."""

    world_size, is_global_zero, global_rank = 1, True, 0

    def __init__(self, optimizer):
        self.optimizers = [optimizer]
        self.strategy = self
        self.barriers = 0

    def barrier(self):
        self.barriers += 1


class Holder:
    def __init__(self, model, bad_steps=0):
        self.model, self.bad_steps, self.device = model, bad_steps, torch.device("cpu")


class Recorder(Faults):
    def __init__(self):
        self.calls = []

    def checkpoint_half_written(self, step):
        self.calls.append(("ckpt", step))


def initialised():
    from rwkv7.init import init_model

    model = RWKV7(SHAPE)
    init_model(model, seed=0)
    return model


def trained_pair():
    model = initialised()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()
    return model, opt


def test_full_checkpoint_round_trip(tmp_path):
    recipe = load_recipe("tiny", SMALL)
    model, opt = trained_pair()
    state = resume.RunState(step=7, loss_sum=3.5, loss_count=2)
    state.close_mini_epoch(0, 1.5, 1e-3, "0 1.5\n")
    state.loss_sum, state.loss_count = 3.5, 2
    trainer, faults = OneProcess(opt), Recorder()
    resume.save_full_checkpoint(trainer, Holder(model, bad_steps=1), recipe, tmp_path, state, faults)
    assert faults.calls == [("ckpt", 7)] and trainer.barriers == 2
    meta = json.loads((tmp_path / "ckpt" / "step-00000007" / "meta.json").read_text())
    assert meta["world_size"] == 1 and meta["fingerprint"] == recipe.fingerprint()
    assert meta["recipe"]["train"]["strategy"] == "auto"
    path, got = resume.find_resume(tmp_path, recipe, force=False)
    assert path.name == "step-00000007"
    assert got == resume.RunState(step=7, records=state.records, loss_sum=3.5, loss_count=2, bad_steps=1)
    weights = resume.checkpoint_weights(path)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    fresh = torch.optim.AdamW(initialised().parameters(), lr=1e-3)
    resume.restore_optimizer(OneProcess(fresh), path)
    a, b = fresh.state_dict()["state"], opt.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)
    assert resume.find_resume(tmp_path / "elsewhere", recipe, False) == (None, resume.RunState())


def test_resume_refuses_another_recipe_unless_forced(tmp_path):
    recipe = load_recipe("tiny", SMALL)
    model, opt = trained_pair()
    resume.save_full_checkpoint(OneProcess(opt), Holder(model), recipe, tmp_path, resume.RunState(step=3), Faults())
    other = load_recipe("tiny", SMALL + ["train.lr_init=1e-3"])
    with pytest.raises(UserError, match="different recipe.*step-00000003.*--force-resume"):
        resume.find_resume(tmp_path, other, force=False)
    assert resume.find_resume(tmp_path, other, force=True)[1].step == 3
    # not the fingerprint: how many processes share the batch may change between runs
    assert resume.find_resume(tmp_path, load_recipe("tiny", SMALL + ["train.devices=2", "train.micro_bsz=4"]),
                              force=False)[1].step == 3


def test_failed_checkpoint_write_names_the_kept_one_and_leaves_no_temp(tmp_path, monkeypatch):
    recipe = load_recipe("tiny", SMALL)
    model, opt = trained_pair()
    resume.save_full_checkpoint(OneProcess(opt), Holder(model), recipe, tmp_path, resume.RunState(step=5), Faults())

    def full(tmp, model, optimizer):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_plain_state", full)
    with pytest.raises(UserError) as e:
        resume.save_full_checkpoint(OneProcess(opt), Holder(model), recipe, tmp_path, resume.RunState(step=10),
                                    Faults())
    msg = str(e.value)
    assert msg.startswith(f"could not write the checkpoint of step 10 in {tmp_path / 'ckpt'} (No space left on device")
    assert msg.endswith("then run the same command to resume (kept step-00000005)"), msg
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000005"]
    assert "no earlier checkpoint exists" in str(ckpt.write_error(tmp_path / "none", 3, None, None))
    assert "another rank could not write its part" in str(ckpt.write_error(tmp_path / "none", 3, None, None))


def test_checkpoint_files_are_validated_on_load(tmp_path):
    bad = tmp_path / "step-00000001"
    bad.mkdir()
    (bad / "meta.json").write_text("{")
    with pytest.raises(UserError, match="unreadable"):
        ckpt.read_meta(bad)
    (bad / "meta.json").write_text(json.dumps({"state": {"step": "3"}, "fingerprint": "f"}))
    with pytest.raises(UserError, match="lacks a valid state"):
        ckpt.read_meta(bad)
    (bad / "meta.json").write_text(json.dumps({"state": {"step": 3, "records": []}, "fingerprint": "f"}))
    assert ckpt.read_meta(bad)["state"]["step"] == 3
    (bad / "state.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="state.pt is unreadable"):
        ckpt.load_plain_state(bad)
    torch.save({"module.emb.weight": torch.zeros(2)}, tmp_path / "wrapped.pth")
    assert list(ckpt.read_state_dict(tmp_path / "wrapped.pth")) == ["emb.weight"]  # a wrapper's prefix is dropped
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(UserError, match="flat state dict"):
        ckpt.read_state_dict(tmp_path / "list.pth")


# ---------------------------------------------------------------------------------------------------------------
# the loss module


class NanAt(Faults):
    def __init__(self, step):
        self.step = step

    def loss(self, step, loss):
        return loss * float("nan") if step == self.step else loss


def module(max_bad_steps=0, faults=None, extra=()):
    torch.manual_seed(0)
    recipe = load_recipe("tiny", SMALL + [f"train.max_bad_steps={max_bad_steps}", *extra])
    return RWKV7Module(initialised(), recipe, bad_steps=0, faults=faults)


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 32, (2, 8), generator=g), torch.randint(0, 32, (2, 8), generator=g)


def test_training_step_is_the_lm_loss_and_bad_steps_are_counted(capsys):
    m = module(max_bad_steps=1, faults=NanAt(3))
    assert m.check_now and not m.use_graph and m.automatic_optimization  # CPU: checked before backward
    x, y = batch()
    with torch.no_grad():
        want = float(lm_loss(m.model(x), y))
    m.run_step = 2
    assert float(m.training_step((x, y), 0)) == pytest.approx(want, rel=1e-6)
    m.run_step = 3
    assert m.training_step((x, y), 0) is None and m.bad_steps == 1 and not m.skipped  # skipped: no backward
    assert "step 3: loss is nan; skipped (1/1 allowed)" in capsys.readouterr().out
    with pytest.raises(NonFiniteLoss, match=r"step 3: loss is nan \(2 bad step\(s\), train.max_bad_steps=1\)"):
        m.training_step((x, y), 0)


def test_a_non_finite_loss_stops_at_once_without_max_bad_steps():
    m = module(faults=NanAt(0))
    with pytest.raises(NonFiniteLoss, match="diverged at step 0"):
        m.training_step(batch(), 0)


def test_deepspeed_bad_step_is_a_zero_loss_flagged_skipped():
    m = module(max_bad_steps=1, extra=["train.accelerator=gpu", "train.precision=bf16",
                                       "train.strategy=deepspeed_stage_2"])
    zero = m._bad_step("loss is nan")
    assert m.skipped and float(zero) == 0.0 and zero.requires_grad


def test_clipping_keeps_the_norm_and_drops_non_finite_gradients(capsys):
    m = module(max_bad_steps=1)
    x, y = batch()
    lm_loss(m.model(x), y).backward()
    grads = [p.grad for p in m.model.parameters() if p.grad is not None]
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    m.configure_gradient_clipping(None, gradient_clip_val=norm / 2)
    assert float(m.last_grad_norm) == pytest.approx(norm, rel=1e-5)
    clipped = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in
                                                          m.model.parameters() if p.grad is not None])))
    assert clipped == pytest.approx(norm / 2, rel=1e-4)
    next(m.model.parameters()).grad[0] = math.inf
    m.configure_gradient_clipping(None, gradient_clip_val=1.0)
    assert all(p.grad is None for p in m.model.parameters()) and m.bad_steps == 1
    assert "gradient norm is" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# progress bar and fault hooks


def test_progress_bar_counts_steps_and_shows_speed(capsys):
    from rwkv7.train.progress import ProgressBar, Throughput

    bar = ProgressBar(True, "tiny", 3, 10)
    speed = Throughput(512, 3, 10, 1.0, None, 1)
    speed.tok_s = 2048.0
    bar.step(True, 2.25, 1e-3, speed)
    bar.step(False, 9.0, 1e-3, speed)
    assert bar.bar.n == 5 and bar.bar.total == 10 and bar.bar.desc.startswith("tiny")
    assert bar.bar.postfix == "loss 2.2500 lr 0.001 2.0 kt/s"  # the second step did not measure
    bar.write("line")
    bar.close()
    assert "line" in capsys.readouterr().out
    off = ProgressBar(False, "tiny", 0, 10)
    off.step(True, 1.0, 1e-3, speed)
    off.write("x")
    off.close()
    assert off.bar is None and "x" not in capsys.readouterr().out


@pytest.mark.parametrize("spec,hook,step,sig", [("kill@7", "after_step", 7, signal.SIGKILL),
                                                ("sigterm@7", "after_step", 7, signal.SIGTERM),
                                                ("sigint@2", "after_step", 2, signal.SIGINT),
                                                ("kill-ckpt@10", "checkpoint_half_written", 10, signal.SIGKILL),
                                                ("kill-log@10", "before_log_line", 10, signal.SIGKILL)])
def test_fault_hooks_send_their_signal_at_their_step_only(monkeypatch, spec, hook, step, sig):
    import os

    sent = []
    monkeypatch.setattr(os, "kill", lambda pid, s: sent.append((pid, s)))
    f = EnvFaults(spec)
    for name in ("after_step", "checkpoint_half_written", "before_log_line"):
        for s in (step - 1, step, step + 1):
            getattr(f, name)(s)
    assert sent == [(os.getpid(), sig)], (hook, sent)
    base = Faults()
    assert base.after_step(step) is None and base.checkpoint_half_written(step) is None
    assert base.before_log_line(step) is None


def test_module_flags_follow_the_recipe():
    """check_now: CPU runs, or bad steps to skip (the answer is needed before the update); otherwise GPUs check one
    step late. The CUDA graph needs strategy single, train.cuda_graph, no early check and a GPU."""
    gpu = ["train.accelerator=gpu", "train.precision=bf16", "train.strategy=single"]
    cpu = module()
    assert (cpu.check_now, cpu.bad_steps, cpu.run_step, cpu.skipped, cpu.last_grad_norm, cpu.graphed) == \
        (True, 0, 0, False, None, None)
    assert type(cpu.faults) is Faults and cpu.automatic_optimization
    late = module(extra=gpu)
    assert not late.check_now and late.use_graph == torch.cuda.is_available()
    assert late.automatic_optimization is not late.use_graph
    assert module(max_bad_steps=1, extra=gpu).check_now and not module(max_bad_steps=1, extra=gpu).use_graph
    assert not module(extra=gpu + ["train.cuda_graph=false"]).use_graph
    assert not module(extra=["train.accelerator=gpu", "train.precision=bf16",
                             "train.strategy=deepspeed_stage_2"]).use_graph


def test_optimizer_per_strategy():
    """AdamW with the recipe's lr, betas, eps (fused kernels on GPUs); strategy single: MasterWeightAdamW over fp32
    masters with the recipe's clip. (DeepSpeedCPUAdam, for *_offload, builds a C++ op: left to the GPU suite.)"""
    from rwkv7.train.bf16_optim import MasterWeightAdamW

    opt = module(extra=["train.lr_init=3e-4", "train.lr_final=1e-5", "train.beta1=0.8", "train.adam_eps=1e-9"]) \
        .configure_optimizers()
    assert type(opt) is torch.optim.AdamW and not opt.defaults["fused"]
    assert (opt.defaults["lr"], opt.defaults["betas"], opt.defaults["eps"]) == (3e-4, (0.8, 0.99), 1e-9)
    gpu = module(extra=["train.accelerator=gpu", "train.precision=bf16", "train.strategy=deepspeed_stage_2"])
    assert gpu.configure_optimizers().defaults["fused"] is True
    single = module(extra=["train.accelerator=gpu", "train.precision=bf16", "train.strategy=single",
                           "train.grad_clip=0.5", "train.lr_init=2e-4", "train.lr_final=1e-5"])
    mw = single.configure_optimizers()
    assert type(mw) is MasterWeightAdamW and mw.clip == 0.5 and mw.defaults["lr"] == 2e-4
    assert [g["name"] for g in mw.param_groups] == ["lr_1x", "lr_2x", "lr_decay"]
    assert sum(len(g) for g in mw.model_params) == len(list(single.model.parameters()))


# ---------------------------------------------------------------------------------------------------------------
# metrics on a GPU run, wandb, the divergence message, the sampler before the trainer sets the rank


def test_metrics_row_on_a_gpu_run_has_peak_memory(monkeypatch):
    import time

    from rwkv7.train.metrics import metrics_row

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: int(1.23456 * 2 ** 30))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: int(2.34567 * 2 ** 30))
    monkeypatch.setattr(time, "time", lambda: 1234.56789)
    gpu = load_recipe("0.1b")
    row = metrics_row(gpu, 1, 2.0, 1e-3, None, 0.0, None)
    assert (row["peak_mem_gib"], row["peak_reserved_gib"], row["time"]) == (1.235, 2.346, 1234.568)
    assert "peak_mem_gib" not in metrics_row(load_recipe("tiny"), 1, 2.0, 1e-3, None, 0.0, None)  # a CPU recipe


def test_wandb_gets_the_recipe_and_every_row_on_the_writing_rank_only(tmp_path, monkeypatch):
    import sys
    import types

    from rwkv7.train.metrics import MetricsLog

    calls = []

    class Run:
        def log(self, row, step):
            calls.append(("log", row, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    recipe = load_recipe("tiny")
    for project, writer in ((None, True), ("p", False)):
        MetricsLog(tmp_path, writer).start_wandb(recipe, project, tmp_path)
    assert calls == []
    log = MetricsLog(tmp_path, True)
    log.start_wandb(recipe, "proj", tmp_path)
    log.add({"step": 3, "loss": 1.0})
    log.close()
    assert calls[0] == ("init", {"project": "proj", "config": recipe.to_dict(), "resume": "allow",
                                 "name": "tiny L2 D128 ctx64", "dir": str(tmp_path)})
    assert calls[1:] == [("log", {"step": 3, "loss": 1.0}, 3), ("finish",)]
    assert log.path == tmp_path / "metrics.jsonl" and json.loads(log.path.read_text()) == {"step": 3, "loss": 1.0}


def test_metrics_file_holds_one_json_row_per_line_and_nothing_when_empty(tmp_path):
    from rwkv7.train.metrics import MetricsLog

    log = MetricsLog(tmp_path, True)
    log.flush()
    assert not log.path.exists()  # an empty flush writes nothing (not even a blank line)
    for s in (1, 2, 3):
        log.add({"step": s})
    log.flush()
    assert [json.loads(x) for x in log.path.read_text().splitlines()] == [{"step": 1}, {"step": 2}, {"step": 3}]


def test_divergence_message_names_the_step_of_the_bad_update():
    from rwkv7.train.guards import diverged

    assert str(diverged(8, math.nan)) == ("training diverged at step 7: loss is nan "
                                          "(set train.max_bad_steps to skip bad steps)")


def test_sampler_is_the_single_rank_order_until_the_trainer_sets_rank_and_world():
    import numpy as np

    from rwkv7.data.sampler import MagicPrimeWindows

    tokens = np.arange(2000, dtype=np.uint16)
    ds = MagicPrimeWindows(tokens, 8, 239, 2, 2, 0, 3)
    assert (ds.rank, ds.world) == (0, 1)
    explicit = MagicPrimeWindows(tokens, 8, 239, 2, 2, 0, 3)
    explicit.rank, explicit.world = 0, 1
    assert all(torch.equal(ds[i][0], explicit[i][0]) for i in range(len(ds)))
    explicit.rank, explicit.world = 1, 2
    assert not torch.equal(ds[0][0], explicit[0][0])


def test_log_repair_without_a_log_and_with_later_runs_headers(tmp_path):
    import datetime

    from rwkv7.trajectory import format_epoch_line

    def line(e):
        return format_epoch_line(e, 5.0 - e, 1e-3, e, datetime.datetime(2026, 1, 1))

    state = resume.RunState(step=5, records=[{"epoch": 0, "loss": 5.0, "lr": 1e-3, "line": line(0)}])
    log = tmp_path / "train_log.txt"
    resume.repair_log(log, state)  # the kill came before the log existed: it is rebuilt from the checkpoint
    assert log.read_text() == line(0)
    log.write_bytes(b"NEW RUN 1 \xff\n" + line(0).encode() + line(1).encode() + b"NEW RUN 2\n{}\n")
    resume.repair_log(log, state)
    assert log.read_text() == "NEW RUN 1 \ufffd\n" + line(0) + "NEW RUN 2\n{}\n"  # only the epoch-1 line goes


def test_progress_bar_settings_and_gpu_postfix(monkeypatch, capsys):
    """Under a pipe (not a TTY, as here) the bar redraws at most every 10 s; on GPUs the postfix adds MFU and the
    peak memory, as metrics.jsonl has them."""
    from rwkv7.train.progress import ProgressBar, Throughput

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: int(1.5 * 2 ** 30))
    bar = ProgressBar(True, "0.1b", 0, 100)
    assert (bar.bar.unit, bar.bar.mininterval, bool(bar.bar.dynamic_ncols)) == ("step", 10.0, True)
    speed = Throughput(8192, 0, 100, 1e7, 100.0, 2)
    speed.tok_s = 2_000_000.0
    bar.step(True, 3.0, 6e-4, speed)
    assert bar.bar.postfix == "loss 3.0000 lr 0.0006 2000.0 kt/s MFU 10.0% 1.5 GiB"  # 2e13 / 2e14 FLOP/s
    bar.close()
    capsys.readouterr()


def test_progress_bar_on_a_terminal_redraws_twice_a_second(monkeypatch):
    import sys

    from rwkv7.train.progress import ProgressBar

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = ProgressBar(True, "tiny", 0, 10)
    assert bar.bar.mininterval == 0.5
    bar.close()
