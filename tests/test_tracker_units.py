"""The training run's bookkeeping callback (rwkv7/train/tracker.py) as a unit: its Lightning hooks are called
directly, as Lightning would call them, with stand-ins for the Trainer (ranks, optimizer, strategy), the module
and the heavy collaborators (full checkpoint, weights, optimizer restore, validation), which record what they were
asked and in what order. The real schedule, metrics log, run state, log-line format and throughput are used.
End-to-end runs (test_train.py, test_failures.py) cover the same paths in subprocesses, which mutmut cannot
attribute; these tests pin each decision the tracker makes."""
import json
import math
import signal
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import rwkv7.evaluate
from rwkv7 import fsutil, signals
from rwkv7.data.source import TrainingData
from rwkv7.recipe import load_recipe
from rwkv7.testhooks import Faults
from rwkv7.train import tracker as tracker_module
from rwkv7.train.metrics import MetricsLog, flops_per_token
from rwkv7.train.module import NonFiniteLoss
from rwkv7.train.profiler import StepProfiler
from rwkv7.train.progress import ProgressBar, Throughput
from rwkv7.train.resume import RunState
from rwkv7.train.tracker import RunPlan, RunTracker

# 4 steps per mini-epoch, weights every 2nd mini-epoch; the tiny recipe: 8 x 64 = 512 tokens per step, warmup 10
# steps, lr 2e-3 -> 2e-4, 8192 validation tokens
SHORT = ["train.epoch_steps=4", "train.epoch_save=2"]
TOKENS_PER_STEP = 512


# ---------------------------------------------------------------------------------------------------------------
# stand-ins


class Collectives:
    """trainer.strategy on one of two ranks: records each collective; the other rank's numbers are `other`
    higher (so a mean is this rank's value + other / 2), and its flags for the next shared decisions are
    `others_flags` (then False)."""

    def __init__(self, other=1.0):
        self.other, self.others_flags = other, []
        self.calls = []

    def reduce(self, t, reduce_op):
        self.calls.append(("reduce", t.dtype, t.device.type, None if t.is_meta else t.tolist(), reduce_op))
        if t.is_meta:  # no values on the meta device: answer as if both ranks held 3.0
            return torch.tensor([3.0], dtype=t.dtype)
        return t + self.other / 2

    def reduce_boolean_decision(self, flag, all):
        self.calls.append(("decision", flag, all))
        return flag or (self.others_flags.pop(0) if self.others_flags else False)


class Trainer:
    """The parts of a Lightning Trainer the tracker reads or sets."""

    def __init__(self, optimizer, rank=0, world=1, strategy=None):
        self.global_rank, self.world_size, self.is_global_zero = rank, world, rank == 0
        self.optimizers = [optimizer]
        self.strategy = strategy or Collectives()
        self.should_stop = False


def optimizer():
    """A real optimizer whose groups carry the official per-group lr scale (1x and 2x)."""
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    return torch.optim.SGD([{"params": [a], "my_lr_scale": 1.0}, {"params": [b], "my_lr_scale": 2.0}], lr=0.5)


class Hooks(Faults):
    """The fault-injection points, recorded."""

    def __init__(self, events):
        self.events = events

    def after_step(self, step):
        self.events.append(("after_step", step))

    def before_log_line(self, step):
        self.events.append(("before_log_line", step))


class Profiler:
    def __init__(self, events):
        self.events = events

    def before_step(self, step):
        self.events.append(("profile_before", step))

    def after_step(self, step):
        self.events.append(("profile_after", step))

    def finish(self):
        self.events.append("profile_finish")


class Bar:
    """The progress bar, recorded: each step's arguments and each written line."""

    def __init__(self, events):
        self.events, self.steps = events, []

    def step(self, measured, avg_loss, lr, speed):
        self.steps.append((measured, avg_loss, lr, speed.tok_s))

    def write(self, text):
        self.events.append(("write", text))

    def close(self):
        self.events.append("bar_close")


class Clock:
    """Throughput's clock: each reading is `tick` seconds after the previous one."""

    def __init__(self, tick):
        self.now, self.tick = 1000.0, tick

    def __call__(self):
        self.now += self.tick
        return self.now


def module(check_now=True, device="cpu"):
    """The parts of RWKV7Module the tracker reads or sets (check_now: the CPU default, losses checked at once)."""
    return types.SimpleNamespace(run_step=None, skipped=False, check_now=check_now, last_grad_norm=None,
                                 device=torch.device(device), model=torch.nn.Linear(2, 2))


def out(loss):
    return {"loss": torch.tensor(loss)}


@pytest.fixture(autouse=True)
def signal_handlers(monkeypatch):
    """on_train_start installs the run's signal handlers; give the test process its own back afterwards."""
    previous = {s: signal.getsignal(s) for s in signals.SIGNALS}
    monkeypatch.setattr(signals, "_owner", signals._owner)
    monkeypatch.setattr(signals, "_deferred", signals._deferred)
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


@pytest.fixture
def rig(tmp_path, monkeypatch):
    """make(...) -> a started tracker with recorders; .step(loss) runs one batch through both batch hooks."""

    def make(overrides=SHORT, last_step=100, step=0, first_epoch=0, rank=0, world=1, check_now=True, val=None,
             exit_tokens=TOKENS_PER_STEP * 100, strategy=None, peak=None, tick=2.0, grad_norm=None):
        r = types.SimpleNamespace(events=[], ckpt_args=[], weights=[], evaluated=[])
        r.recipe = load_recipe("tiny", list(overrides))
        r.data = TrainingData(data=None, magic_prime=0, exit_tokens=exit_tokens, val=val)
        r.plan = RunPlan(r.recipe, tmp_path, r.data, last_step, first_epoch, progress=False, faults=Hooks(r.events))
        r.state = RunState(step=step)
        r.opt = optimizer()
        if grad_norm is not None:
            r.opt.last_grad_norm = grad_norm
        r.trainer = Trainer(r.opt, rank, world, strategy or Collectives())
        r.module = module(check_now)
        r.run_dir = tmp_path

        def save_full_checkpoint(trainer, pl_module, recipe, run_dir, state, faults):
            r.ckpt_args.append((trainer, pl_module, recipe, run_dir, state, faults))
            rows = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
            r.events.append(("ckpt", state.step, len(rows)))  # rows on disk when the checkpoint is written

        def save_weights(model, path):
            r.weights.append((model, path))
            r.events.append(("weights", Path(path).name))

        def append_line(path, line):
            r.events.append(("line", Path(path).name))
            fsutil.append_line(path, line)

        def evaluate_loss(model, tokens, ctx_len, max_tokens, batch):
            r.evaluated.append((model, tokens, ctx_len, max_tokens, batch))
            r.events.append("evaluate")
            return r.val_result

        r.val_result = (2.0, 4096)
        monkeypatch.setattr(tracker_module, "save_full_checkpoint", save_full_checkpoint)
        monkeypatch.setattr(tracker_module.ckpt, "save_weights", save_weights)
        monkeypatch.setattr(tracker_module, "append_line", append_line)
        monkeypatch.setattr(rwkv7.evaluate, "evaluate_loss", evaluate_loss)
        r.tracker = RunTracker(r.plan, r.state, types.SimpleNamespace())
        r.tracker.on_train_start(r.trainer, r.module)
        # recorders for the profiler and the bar, and a throughput on its own clock (what on_train_start builds is
        # checked by the tests of "building and starting")
        r.tracker.profiler, r.tracker.bar = Profiler(r.events), Bar(r.events)
        r.tracker.speed = Throughput(TOKENS_PER_STEP, step, last_step, 1e12, peak, world, clock=Clock(tick))
        flush = r.tracker.metrics.flush

        def recorded_flush():
            r.events.append(("flush", len(r.tracker.metrics.buffer)))
            flush()

        r.tracker.metrics.flush = recorded_flush

        def one_step(loss=1.0, outputs=...):
            r.tracker.on_train_batch_start(r.trainer, r.module, None, 0)
            r.tracker.on_train_batch_end(r.trainer, r.module, out(loss) if outputs is ... else outputs, None, 0)

        r.step = one_step
        r.rows = lambda: [json.loads(x) for x in r.tracker.metrics.buffer]
        r.log = lambda name="train_log.txt": (tmp_path / name).read_text().splitlines(keepends=True)
        return r

    return make


def without(events, *kinds):
    """The events not of the given kinds (each event is a tuple whose first item is its kind, or a string)."""
    return [e for e in events if (e[0] if isinstance(e, tuple) else e) not in kinds]


def line_prefix(epoch, loss, lr):
    """The start of an official train_log.txt line, computed by hand (the rest is the time and Lightning's epoch)."""
    return f"{epoch} {loss:.6f} {math.exp(loss):.4f} {lr:.8f} "


# ---------------------------------------------------------------------------------------------------------------
# building and starting


def test_plan_defaults_and_a_new_tracker(tmp_path):
    recipe = load_recipe("tiny", SHORT)
    plan = RunPlan(recipe, tmp_path, None, 10, 0)
    assert (plan.resume_from, plan.progress, plan.wandb_project, plan.profile_step) == (None, True, None, None)
    assert type(plan.faults) is Faults
    plan = RunPlan(recipe, tmp_path, None, 10, 0, profile_step=3)
    t = RunTracker(plan, RunState(), types.SimpleNamespace())
    assert t.stopped is False and t.pending == [] and not t.stop.requested
    assert isinstance(t.profiler, StepProfiler)
    assert (t.profiler.first_step, t.profiler.out) == (3, tmp_path / "profile.txt")


def test_setup_gives_the_dataset_this_ranks_place(tmp_path):
    dataset = types.SimpleNamespace()
    t = RunTracker(RunPlan(load_recipe("tiny"), tmp_path, None, 10, 0), RunState(), dataset)
    t.setup(Trainer(optimizer(), rank=1, world=3), None, "fit")
    assert (dataset.rank, dataset.world) == (1, 3)


@pytest.fixture
def started(tmp_path, monkeypatch):
    """start(plan keywords, trainer keywords) -> (tracker, trainer, wandb calls, restore calls); cuda as given."""
    wandb, restored = [], []
    monkeypatch.setattr(MetricsLog, "start_wandb", lambda self, recipe, project, run_dir:
                        wandb.append((self, recipe, project, run_dir)))
    monkeypatch.setattr(tracker_module, "restore_optimizer", lambda trainer, path: restored.append((trainer, path)))

    def start(overrides=SHORT, step=0, cuda=False, **kw):
        trainer_kw = {k: kw.pop(k) for k in ("rank", "world") if k in kw}
        kw.setdefault("progress", False)
        monkeypatch.setattr(tracker_module.torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(tracker_module.torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
        plan = RunPlan(load_recipe("tiny", list(overrides)), tmp_path, None, kw.pop("last_step", 40), 0, **kw)
        t = RunTracker(plan, RunState(step=step), types.SimpleNamespace())
        trainer = Trainer(optimizer(), strategy=Collectives(), **trainer_kw)
        t.on_train_start(trainer, module())
        return t, trainer, wandb, restored

    return start


def test_train_start_on_rank_zero(started, tmp_path):
    t, trainer, wandb, restored = started(step=7, last_step=40, wandb_project="proj")
    try:
        s = t.speed  # throughput from this run's first step, for the tiny recipe's batch on one CPU rank
        assert (s.tokens_per_step, s.step_last, s.last_step, s.peak, s.world) == (TOKENS_PER_STEP, 7, 40, None, 1)
        assert s.flops == flops_per_token(t.plan.recipe)
        assert t.bar.bar is None  # progress=False
        assert t.metrics.path == tmp_path / "metrics.jsonl" and t.metrics.writer is True
        assert wandb == [(t.metrics, t.plan.recipe, "proj", tmp_path)]
        assert restored == []  # a fresh run has no optimizer state to restore
        assert signals._deferred == t.stop._on_signal  # from here a signal asks for a stop at the step's end
        signals._deferred(signal.SIGTERM, None)
        assert t.stop.requested
    finally:
        t.on_train_end(trainer, None)
    assert signals._deferred is None


def test_progress_bar_only_when_asked_for_and_only_on_rank_zero(started):
    t, trainer, _, _ = started(step=3, last_step=40, progress=True)
    assert isinstance(t.bar, ProgressBar) and t.bar.bar is not None
    assert (t.bar.bar.total, t.bar.bar.n, t.bar.bar.desc) == (40, 3, "tiny")
    t.on_train_end(trainer, None)
    assert t.bar.bar.disable  # closed
    t, trainer, _, _ = started(progress=True, rank=1, world=2)
    assert t.bar.bar is None and t.metrics.writer is False and t.speed.world == 2
    t.on_train_end(trainer, None)


def test_a_resumed_run_restores_the_optimizer_state(started, tmp_path):
    t, trainer, _, restored = started(resume_from=tmp_path / "ckpt" / "step-00000008")
    assert restored == [(trainer, tmp_path / "ckpt" / "step-00000008")]
    t.on_train_end(trainer, None)


@pytest.mark.parametrize("cuda,overrides,peak", [
    (True, ["train.accelerator=gpu", "train.precision=bf16"], 989.0),  # an H100: MFU against its bf16 peak
    (True, [], None),  # a CPU recipe on a GPU host: no MFU
    (False, ["train.accelerator=gpu", "train.precision=bf16"], None)])
def test_peak_flops_only_for_a_gpu_recipe_on_a_gpu(started, cuda, overrides, peak):
    t, trainer, _, _ = started(overrides, cuda=cuda)
    assert t.speed.peak == peak
    t.stop.uninstall()


def test_train_end_writes_buffered_metrics_profile_and_closes_the_bar(rig):
    r = rig(check_now=True)
    r.step(1.5)
    r.step(2.5)
    r.tracker.on_train_end(r.trainer, r.module)
    assert signals._deferred is None  # a signal after training ends the process at once
    assert r.events[-3:] == ["profile_finish", ("flush", 2), "bar_close"]
    assert [json.loads(x)["loss"] for x in r.log("metrics.jsonl")] == [1.5, 2.5]


# ---------------------------------------------------------------------------------------------------------------
# every step


def test_batch_start_sets_the_scheduled_lr_of_the_runs_step(rig):
    # warmup: step 4 of 10, before the cosine starts: 2e-3 x (0.01 + 0.99 x 4 / 10)
    r = rig(step=4)
    r.tracker.on_train_batch_start(r.trainer, r.module, None, 0)
    assert r.tracker.lr == pytest.approx(2e-3 * 0.406, rel=1e-12)
    assert [g["lr"] for g in r.opt.param_groups] == pytest.approx([8.12e-4, 1.624e-3], rel=1e-12)  # x my_lr_scale
    assert r.module.run_step == 4 and r.events == [("profile_before", 4)]
    # after warmup, half-way in tokens from the end of warmup (5120) to my_exit_tokens (15360): the cosine's middle,
    # 2e-3 x (0.5 + 0.1 / 2)
    r = rig(step=20, exit_tokens=15360)
    r.tracker.on_train_batch_start(r.trainer, r.module, None, 0)
    assert r.tracker.lr == pytest.approx(1.1e-3, rel=1e-12)
    assert [g["lr"] for g in r.opt.param_groups] == pytest.approx([1.1e-3, 2.2e-3], rel=1e-12)
    assert r.module.run_step == 20


def test_only_rank_zero_profiles(rig):
    r = rig(rank=1, world=2)
    r.tracker.on_train_batch_start(r.trainer, r.module, None, 0)
    assert r.events == [] and r.module.run_step == 0


def test_each_step_ends_with_the_fault_hook_then_the_profiler(rig):
    r = rig(step=5)
    r.step()
    assert r.events == [("profile_before", 5), ("after_step", 6), ("profile_after", 6)]
    assert r.state.step == 6 and r.trainer.should_stop is False


def test_losses_are_read_back_one_step_late_on_a_gpu(rig):
    """check_now False (a GPU without bad-step skipping): each step's loss is read after the next step is queued,
    and at a mini-epoch's end all of them."""
    r = rig(check_now=False)
    lrs = [2e-3 * (0.01 + 0.99 * s / 10) for s in range(4)]  # warmup: the lr of steps 0..3
    r.step(1.5)
    assert [p[0] for p in r.tracker.pending] == [1] and r.state.loss_count == 0 and r.rows() == []
    r.step(2.5)
    assert [p[0] for p in r.tracker.pending] == [2] and (r.state.loss_sum, r.state.loss_count) == (1.5, 1)
    row, = r.rows()
    assert (row["step"], row["loss"]) == (1, 1.5)
    assert row["lr"] == pytest.approx(lrs[0], rel=1e-12)  # the lr its step ran with, not the current one
    r.step(3.0)
    assert [p[0] for p in r.tracker.pending] == [3] and r.state.loss_count == 2
    r.step(0.5)  # the mini-epoch's last step: everything is read, then the epoch closed
    assert r.tracker.pending == [] and r.state.loss_count == 0
    assert r.state.records[0]["loss"] == pytest.approx((1.5 + 2.5 + 3.0 + 0.5) / 4, rel=1e-12)
    assert [x["step"] for x in r.rows()] == []  # flushed with the epoch's line
    rows = [json.loads(x) for x in r.log("metrics.jsonl")]
    assert [x["loss"] for x in rows] == [1.5, 2.5, 3.0, 0.5]
    assert [x["lr"] for x in rows] == pytest.approx(lrs, rel=1e-12)


def test_a_checked_loss_is_read_at_once(rig):
    r = rig(check_now=True)
    r.step(1.5)
    assert r.tracker.pending == [] and (r.state.loss_sum, r.state.loss_count) == (1.5, 1)
    assert [x["step"] for x in r.rows()] == [1]


def test_pending_entry_holds_step_loss_lr_and_grad_norm(rig):
    r = rig(check_now=False, step=4)
    r.module.last_grad_norm = torch.tensor(0.75)
    r.step(1.5)
    (step, loss, lr, norm), = r.tracker.pending
    assert (step, float(loss), float(norm)) == (5, 1.5, 0.75)
    assert lr == pytest.approx(2e-3 * 0.406, rel=1e-12)


def test_metrics_row_of_a_step(rig):
    # throughput: 512 tokens per step, 2 s per clock reading; MFU: 1e12 FLOPs per token against a 1 TFLOP/s peak
    r = rig(check_now=True, step=12, peak=1.0)
    r.module.last_grad_norm = torch.tensor(0.25)
    r.step(1.5)
    row, = r.rows()
    assert {k: row[k] for k in ("step", "mini_epoch", "loss", "grad_norm", "tokens_per_s", "tokens_per_step",
                                "mfu")} == {"step": 13, "mini_epoch": 3, "loss": 1.5, "grad_norm": 0.25,
                                            "tokens_per_s": 256.0, "tokens_per_step": 512, "mfu": 256.0}
    r.module.last_grad_norm = None  # no norm known (DeepSpeed)
    r.step(1.5)
    assert r.rows()[1]["grad_norm"] is None


def test_progress_bar_step_gets_the_measure_the_running_mean_and_the_lr(rig):
    r = rig(check_now=True, step=12, tick=0.25)  # a quarter of a second per reading: measured once a second
    for loss in (1.0, 2.0, 3.0, 4.0):
        r.step(loss)
    # after warmup: the cosine's progress at step s is (s - 10) x 512 / (51200 - 5120) = (s - 10) / 90
    lrs = [2e-3 * (0.55 + 0.45 * math.cos(math.pi * (s - 10) / 90)) for s in range(12, 16)]
    assert [s[:2] for s in r.tracker.bar.steps] == [(False, 1.0), (False, 1.5), (False, 2.0), (True, 2.5)]
    assert [s[2] for s in r.tracker.bar.steps] == pytest.approx(lrs, rel=1e-12)
    assert r.tracker.bar.steps[-1][3] == 4 * TOKENS_PER_STEP / 1.0  # 4 steps over 1 s


def test_a_skipped_step_has_no_loss(rig):
    """training_step returned None (a skipped bad step), or DeepSpeed's zero loss flagged by the module: no loss is
    summed, the metrics row says NaN, the flag is cleared for the next step."""
    r = rig(check_now=False)
    r.step(outputs=None)
    assert r.tracker.pending[0][1] is None
    r.module.skipped = True
    r.step(9.0)
    assert r.module.skipped is False and r.tracker.pending[0][1] is None
    r.step(1.5)
    r.step(2.5)
    assert [x["loss"] for x in r.rows()] == []
    rows = [json.loads(x) for x in r.log("metrics.jsonl")]
    assert [math.isnan(x["loss"]) for x in rows] == [True, True, False, False]
    assert r.state.records[0]["loss"] == 2.0  # the mean of the two real losses


def test_a_non_finite_loss_the_module_checked_is_not_summed(rig):
    r = rig(check_now=True)
    r.step(float("nan"))
    r.step(float("inf"))
    r.step(1.5)
    assert (r.state.loss_sum, r.state.loss_count) == (1.5, 1)
    assert [x["loss"] for x in r.rows()][2] == 1.5


def test_divergence_is_found_one_step_late_and_names_the_step(rig):
    r = rig(check_now=False)
    r.step(1.5)
    r.step(float("nan"))  # step index 1; read back after the next step
    with pytest.raises(NonFiniteLoss, match=r"^training diverged at step 1: loss is nan \(set train\.max_bad_steps"):
        r.step(1.5)
    assert r.state.step == 3


def test_divergence_at_a_mini_epochs_end_is_found_at_once(rig):
    r = rig(check_now=False, step=2)
    r.step(1.5)
    with pytest.raises(NonFiniteLoss, match=r"^training diverged at step 3: loss is inf "):
        r.step(float("inf"))
    assert not (r.run_dir / "train_log.txt").exists() and r.state.records == [] and r.ckpt_args == []


def test_grad_norm_from_the_optimizer_else_the_module(rig):
    """Optimizers that clip themselves (master weights, sharded) keep the norm; else the module's clipping does."""
    r = rig(grad_norm=torch.tensor(4.0))
    r.module.last_grad_norm = torch.tensor(0.5)
    assert float(RunTracker.grad_norm(r.trainer, r.module)) == 4.0
    r.step(1.5)
    assert r.rows()[0]["grad_norm"] == 4.0
    r.opt.last_grad_norm = None  # none yet: the module's
    assert float(RunTracker.grad_norm(r.trainer, r.module)) == 0.5
    del r.opt.last_grad_norm
    assert float(RunTracker.grad_norm(r.trainer, r.module)) == 0.5


# ---------------------------------------------------------------------------------------------------------------
# mini-epoch ends, checkpoints, stops


def test_a_whole_run_writes_in_order(rig):
    """4 steps per mini-epoch, weights every 2nd, last step 10: epoch 0 checkpointed with rwkv-0.pth, epoch 1 only
    logged, the run's end mid-epoch checkpointed (its partial sums kept for an exact resume)."""
    r = rig(last_step=10)
    losses = [1.0, 2.0, 3.0, 2.0, 1.5, 1.5, 0.5, 0.5, 4.0, 4.0]
    for loss in losses:
        r.step(loss)
    assert without(r.events, "profile_before", "profile_after", "after_step") == [
        ("flush", 4), ("ckpt", 4, 4), ("weights", "rwkv-0.pth"),  # metrics.jsonl first, then the checkpoint
        ("before_log_line", 4), ("line", "train_log.txt"), ("flush", 0), ("write", r.state.records[0]["line"][:-1]),
        ("before_log_line", 8), ("line", "train_log.txt"), ("flush", 4), ("write", r.state.records[1]["line"][:-1]),
        ("flush", 2), ("ckpt", 10, 10)]
    assert [e[1] for e in r.events if e[0] == "after_step"] == list(range(1, 11))
    assert [e for e in r.events if e[0] == "profile_before"] == [("profile_before", s) for s in range(10)]
    assert r.trainer.should_stop is True and r.tracker.stopped is False
    assert (r.state.loss_sum, r.state.loss_count) == (8.0, 2)
    assert r.log() == [r.state.records[0]["line"], r.state.records[1]["line"]]
    assert [(x["epoch"], x["loss"]) for x in r.state.records] == [(0, 2.0), (1, 1.0)]
    for trainer, pl_module, recipe, run_dir, state, faults in r.ckpt_args:
        assert (trainer, pl_module, recipe, run_dir, state, faults) == (r.trainer, r.module, r.recipe, r.run_dir,
                                                                       r.state, r.plan.faults)
    assert [m for m, _ in r.weights] == [r.module.model] and r.weights[0][1] == r.run_dir / "rwkv-0.pth"
    assert [json.loads(x)["step"] for x in r.log("metrics.jsonl")] == list(range(1, 11))


def test_epoch_line_contents(rig):
    """epoch, mean loss, perplexity, the last step's lr, time, epoch within this process (from first_epoch)."""
    r = rig(step=8, first_epoch=1, last_step=100)
    for loss in (1.0, 2.0, 2.5, 2.5):
        r.step(loss)
    lr = r.tracker.lr
    assert lr == pytest.approx(2e-3 * (0.55 + 0.45 * math.cos(math.pi * (11 - 10) / 90)), rel=1e-12)
    line, = r.log()
    assert line.startswith(line_prefix(2, 2.0, lr)) and line.endswith(" 1\n")
    assert r.state.records == [{"epoch": 2, "loss": 2.0, "lr": lr, "line": line}]
    assert ("write", line.rstrip()) in r.events
    assert (r.state.loss_sum, r.state.loss_count) == (0.0, 0)


@pytest.mark.parametrize("last_step,stop_at,saved", [
    (100, None, [0, 2]),  # the cadence: every 2nd mini-epoch
    (8, None, [0, 1]),  # and the last
    (100, 8, [0, 1])])  # and the one a signal stopped
def test_weights_on_the_epoch_save_cadence_the_last_step_and_a_stop(rig, last_step, stop_at, saved):
    r = rig(last_step=last_step)
    while not r.trainer.should_stop and r.state.step < 12:
        if r.state.step + 1 == stop_at:
            r.tracker.stop._on_signal(signal.SIGTERM, None)
        r.step(1.0)
    assert [p.name for _, p in r.weights] == [f"rwkv-{e}.pth" for e in saved]
    assert [e[1] for e in r.events if e[0] == "ckpt"] == [4 * e + 4 for e in saved]
    assert len(r.log()) == min(r.state.step, 12) // 4


def test_a_signal_mid_epoch_stops_at_the_steps_end_with_a_checkpoint(rig):
    r = rig(check_now=False)
    r.step(1.0)
    r.tracker.stop._on_signal(signal.SIGINT, None)
    r.step(2.0)
    assert r.tracker.stopped is True and r.trainer.should_stop is True
    assert r.tracker.pending == [] and (r.state.loss_sum, r.state.loss_count) == (3.0, 2)  # kept for the resume
    assert without(r.events, "profile_before", "profile_after") == [
        ("after_step", 1), ("flush", 2), ("ckpt", 2, 2), ("after_step", 2)]
    assert r.state.records == [] and not (r.run_dir / "train_log.txt").exists()


def test_the_last_step_mid_epoch_checkpoints_and_stops(rig):
    r = rig(step=5, last_step=6, check_now=False)
    r.step(1.0)
    assert r.trainer.should_stop is True and r.tracker.stopped is False and r.tracker.pending == []
    assert [e for e in r.events if e[0] == "ckpt"] == [("ckpt", 6, 1)]
    r = rig(step=5, last_step=7, check_now=False)
    r.step(1.0)  # not yet the last
    assert r.trainer.should_stop is False and r.ckpt_args == [] and len(r.tracker.pending) == 1


def test_no_checkpoint_between_epoch_ends(rig):
    r = rig(step=4)
    for _ in range(3):
        r.step(1.0)
    assert r.ckpt_args == [] and r.trainer.should_stop is False


def test_on_several_ranks_every_rank_checkpoints_and_only_rank_zero_writes(rig):
    """Rank 1 of 2: the checkpoint is collective, but weights, log lines, validation and the bar are rank 0's."""
    val = types.SimpleNamespace(tokens=np.arange(10))
    r = rig(rank=1, world=2, val=val)
    for loss in (1.0, 1.0, 1.0, 1.0):
        r.step(loss)
    assert without(r.events, "profile_before", "profile_after", "after_step") == [
        ("flush", 0), ("ckpt", 4, 0), ("before_log_line", 4)]
    assert r.weights == [] and r.evaluated == [] and not (r.run_dir / "train_log.txt").exists()
    assert not (r.run_dir / "metrics.jsonl").exists()


def test_several_ranks_share_losses_stops_and_the_epoch_mean(rig):
    """Each step's loss is the mean over ranks (here the other rank's is 1.0 higher), the stop is any rank's, and
    the mini-epoch's loss is the mean over ranks in float64 on the module's device."""
    strategy = Collectives(other=1.0)
    r = rig(world=2, strategy=strategy)
    r.module.device = torch.device("meta")  # where NCCL needs the tensor; the stand-in answers 3.0 for it
    r.step(1.5)
    assert strategy.calls == [("reduce", torch.float32, "cpu", 1.5, "mean"), ("decision", False, False),
                              ("decision", False, False)]  # the loss, the stop, the divergence check
    assert (r.state.loss_sum, r.rows()[0]["loss"]) == (2.0, 2.0)
    for _ in range(3):
        r.step(1.5)
    assert strategy.calls[-1] == ("reduce", torch.float64, "meta", None, "mean")
    assert r.state.records[0]["loss"] == 3.0
    strategy.others_flags = [True, False]  # another rank got the signal (its loss is fine)
    r.step(1.5)
    assert r.tracker.stopped is True and r.trainer.should_stop is True
    assert r.events[-4:-1] == [("flush", 1), ("ckpt", 5, 5), ("after_step", 5)]


def test_one_process_needs_no_collectives(rig):
    r = rig(world=1)
    for _ in range(4):
        r.step(1.5)
    assert r.trainer.strategy.calls == [] and r.state.records[0]["loss"] == 1.5


def test_a_divergence_on_another_rank_stops_this_one(rig):
    """Rank 1's loss is fine, another's was not: the shared decision raises on every rank."""
    strategy = Collectives()
    strategy.others_flags = [False, True]  # no stop; then the divergence check
    r = rig(world=2, rank=1, strategy=strategy)
    with pytest.raises(NonFiniteLoss, match="at step 0: loss is 2.0"):
        r.step(1.5)


# ---------------------------------------------------------------------------------------------------------------
# validation


def test_validation_after_the_epoch_line(rig):
    tokens = np.arange(100)
    r = rig(val=types.SimpleNamespace(tokens=tokens), step=4)
    r.val_result = (2.0, 4096)
    for _ in range(4):
        r.step(1.0)
    (model, got, ctx_len, max_tokens, batch), = r.evaluated
    assert (model, got, ctx_len, max_tokens, batch) == (r.module.model, tokens, 64, 8192, 8)
    assert without(r.events, "profile_before", "profile_after", "after_step") == [
        ("before_log_line", 8), ("line", "train_log.txt"), "evaluate", ("line", "val_log.txt"),
        ("write", "validation 1: loss 2.0000 over 4096 tokens"), ("flush", 4), ("write", r.log()[0].rstrip())]
    assert r.log("val_log.txt") == ["1 2.000000 7.3891 4096\n"]  # epoch, loss, perplexity e^2, tokens


def test_validation_of_the_whole_split_and_a_capped_perplexity(rig):
    r = rig(["train.epoch_steps=4", "data.val_tokens=0"], val=types.SimpleNamespace(tokens=np.arange(10)))
    r.val_result = (60.0, 640)  # e^60 is capped at e^50
    for _ in range(4):
        r.step(1.0)
    assert r.evaluated[0][3] is None  # val_tokens=0: all of it
    assert r.log("val_log.txt") == [f"0 60.000000 {math.exp(50):.4f} 640\n"]
    assert ("write", "validation 0: loss 60.0000 over 640 tokens") in r.events
    r.val_result = (50.5, 640)
    for _ in range(4):
        r.step(1.0)
    assert r.log("val_log.txt")[1] == f"1 50.500000 {math.exp(50):.4f} 640\n"
