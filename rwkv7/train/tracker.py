"""The Lightning callback that runs the bookkeeping of a training run: a thin coordinator of the components in
rwkv7/train (schedule, metrics, progress, checkpoint and resume, signal stop, divergence guard, profiler).

Importing this module imports Lightning; rwkv7.train.run builds it only when a run starts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch

from rwkv7 import checkpoint as ckpt
from rwkv7.data.source import TrainingData
from rwkv7.fsutil import append_line
from rwkv7.recipe import Recipe
from rwkv7.testhooks import Faults
from rwkv7.train.guards import SignalStop, diverged, is_divergence
from rwkv7.train.metrics import MetricsLog, flops_per_token, metrics_row
from rwkv7.train.profiler import StepProfiler
from rwkv7.train.progress import ProgressBar, Throughput, peak_tflops
from rwkv7.train.ranks import any_rank, mean_over_ranks
from rwkv7.train.resume import RunState, restore_optimizer, save_full_checkpoint
from rwkv7.train.schedule import apply_learning_rate, scheduled_lr


@dataclass
class RunPlan:
    """What the tracker needs to know about the run, fixed before it starts."""

    recipe: Recipe
    run_dir: Path
    data: TrainingData
    last_step: int
    first_epoch: int                 # the mini-epoch this process started in (for the log's epoch-in-run column)
    resume_from: Path | None = None
    progress: bool = True
    wandb_project: str | None = None
    profile_step: int | None = None  # RWKV7_PROFILE_STEP, read at the command line
    faults: Faults = field(default_factory=Faults)


class RunTracker(pl.Callback):
    def __init__(self, plan: RunPlan, state: RunState, dataset):
        self.plan, self.state, self.dataset = plan, state, dataset
        self.stop = SignalStop()
        self.stopped = False
        self.pending: list = []  # (step, loss tensor, lr, grad norm) not yet read back from the device
        self.lr = 0.0
        self.profiler = StepProfiler(plan.profile_step, plan.run_dir / "profile.txt")
        self.metrics = self.bar = self.speed = None

    # -- lifecycle --
    def setup(self, trainer, pl_module, stage=None):
        self.dataset.rank, self.dataset.world = trainer.global_rank, trainer.world_size

    def on_train_start(self, trainer, pl_module):
        p = self.plan
        if p.resume_from is not None:
            restore_optimizer(trainer, p.resume_from)
        gpu = torch.cuda.is_available() and p.recipe.train.accelerator == "gpu"
        peak = peak_tflops(torch.cuda.get_device_name()) if gpu else None
        self.speed = Throughput(p.recipe.tokens_per_step, self.state.step, p.last_step, flops_per_token(p.recipe),
                                peak, trainer.world_size)
        self.bar = ProgressBar(p.progress and trainer.is_global_zero, p.recipe.name, self.state.step, p.last_step)
        self.stop.install()
        self.metrics = MetricsLog(p.run_dir, trainer.is_global_zero)
        self.metrics.start_wandb(p.recipe, p.wandb_project, p.run_dir)

    def on_train_end(self, trainer, pl_module):
        self.stop.uninstall()
        self.profiler.finish()  # a run shorter than the profiled steps still writes its profile
        self.metrics.close()
        self.bar.close()

    # -- every step --
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        p = self.plan
        self.lr = scheduled_lr(p.recipe, p.data.exit_tokens, self.state.step)
        apply_learning_rate(trainer.optimizers[0], self.lr)
        pl_module.run_step = self.state.step
        if trainer.is_global_zero:
            self.profiler.before_step(self.state.step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        state, p = self.state, self.plan
        loss = self.step_loss(trainer, pl_module, outputs)
        state.step += 1
        self.pending.append((state.step, loss, self.lr, self.grad_norm(trainer, pl_module)))
        stop = any_rank(trainer, self.stop.requested)  # every rank stops at the same step
        boundary = state.step % p.recipe.epoch_steps == 0 or state.step >= p.last_step or stop
        # GPU: read the previous step's loss, which is done by now, so the host never waits for the current one
        self.drain(trainer, pl_module, keep=0 if boundary or pl_module.check_now else 1)
        if state.step % p.recipe.epoch_steps == 0:
            self.end_mini_epoch(trainer, pl_module, stop)
        elif stop or state.step >= p.last_step:  # mid mini-epoch: keep the partial sums for an exact resume
            self.checkpoint(trainer, pl_module)
        if stop:
            self.stopped = True
            trainer.should_stop = True
        if state.step >= p.last_step:
            trainer.should_stop = True
        p.faults.after_step(state.step)
        self.profiler.after_step(state.step)

    @staticmethod
    def step_loss(trainer, pl_module, outputs):
        """This step's loss tensor (on several ranks their mean), or None for a skipped bad step."""
        # skipped: training_step returned None, or (DeepSpeed) a zero loss flagged by the module
        skipped = not isinstance(outputs, dict) or pl_module.skipped
        pl_module.skipped = False
        if skipped:
            return None
        loss = outputs["loss"].detach()
        if trainer.world_size > 1:
            # the global batch's loss for metrics.jsonl; on GPUs the all-reduce is queued on the device and read
            # one step late like the loss itself, so the host does not wait for it
            loss = trainer.strategy.reduce(loss.clone(), reduce_op="mean")
        return loss

    @staticmethod
    def grad_norm(trainer, pl_module):
        norm = getattr(trainer.optimizers[0], "last_grad_norm", None)
        return pl_module.last_grad_norm if norm is None else norm

    def drain(self, trainer, pl_module, keep: int) -> None:
        """Read back the queued steps' losses (all but the last `keep`): divergence, sums, progress, metrics."""
        while len(self.pending) > keep:
            step, loss_t, lr, norm = self.pending.pop(0)
            loss = float("nan") if loss_t is None else float(loss_t)
            if any_rank(trainer, is_divergence(loss, loss_t is not None, pl_module.check_now)):
                raise diverged(step, loss)  # found one step late: the update is done, so all ranks stop
            if math.isfinite(loss):
                self.state.add_loss(loss)
            measured = self.speed.update(step)
            self.bar.step(measured, self.state.mean_loss(), lr, self.speed)
            self.metrics.add(metrics_row(self.plan.recipe, step, loss, lr, None if norm is None else float(norm),
                                         self.speed.tok_s, self.speed.mfu()))

    def end_mini_epoch(self, trainer, pl_module, stop: bool) -> None:
        """The mini-epoch's line in train_log.txt, after its checkpoint when one is due."""
        from rwkv7.trajectory import format_epoch_line

        state, p = self.state, self.plan
        avg = mean_over_ranks(trainer, state.mean_loss(), pl_module.device)
        epoch = state.step // p.recipe.epoch_steps - 1
        line = format_epoch_line(epoch, avg, self.lr, epoch - p.first_epoch)
        state.close_mini_epoch(epoch, avg, self.lr, line)
        if epoch % p.recipe.train.epoch_save == 0 or state.step >= p.last_step or stop:
            # checkpoint first, log line second: a crash in between is repaired from the checkpoint on resume
            self.checkpoint(trainer, pl_module)
            if trainer.is_global_zero:
                ckpt.save_weights(pl_module.model, p.run_dir / f"rwkv-{epoch}.pth")
        p.faults.before_log_line(state.step)
        if trainer.is_global_zero:
            append_line(p.run_dir / "train_log.txt", line)
            if p.data.val is not None:
                self.validate(pl_module, epoch)
            self.metrics.flush()
            self.bar.write(line.rstrip())

    def checkpoint(self, trainer, pl_module) -> None:
        """metrics.jsonl first (rows after the checkpoint are trimmed on resume, rows before it are never redone),
        then the full checkpoint of state.step."""
        self.metrics.flush()
        save_full_checkpoint(trainer, pl_module, self.plan.recipe, self.plan.run_dir, self.state, self.plan.faults)

    def validate(self, pl_module, epoch: int) -> None:
        """Held-out loss on data.val_path (first data.val_tokens tokens), in val_log.txt: the official
        train_log.txt keeps its format."""
        from rwkv7.evaluate import evaluate_loss

        r = self.plan.recipe
        loss, n = evaluate_loss(pl_module.model, self.plan.data.val.tokens, ctx_len=r.train.ctx_len,
                                max_tokens=r.data.val_tokens or None, batch=r.train.micro_bsz)
        append_line(self.plan.run_dir / "val_log.txt", f"{epoch} {loss:.6f} {math.exp(min(loss, 50)):.4f} {n}")
        self.bar.write(f"validation {epoch}: loss {loss:.4f} over {n} tokens")
