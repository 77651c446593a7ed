"""One training run: recipe → data → model → Lightning Trainer → train_log.txt, checkpoints, verdict.

Run folder (default out/<recipe>/): train_log.txt (official format), metrics.jsonl (one line per step), run.json,
rwkv-init.pth, rwkv-N.pth / rwkv-final.pth (official weights), ckpt/step-N/ (full checkpoints), check.json, loss.png.
A run started again with the same folder resumes from the newest complete checkpoint; the data order, schedule and
optimizer state continue exactly where they were.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rwkv7 import checkpoint as ckpt, testhooks
from rwkv7.data.source import TrainingData, prepare_data
from rwkv7.errors import UserError
from rwkv7.fsutil import append_line, atomic_write_text
from rwkv7.recipe import Recipe
from rwkv7.train.module import NonFiniteLoss
from rwkv7.train.schedule import learning_rate, total_steps

EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, for MFU


@dataclass
class RunState:
    """What a checkpoint carries besides weights and optimizer: enough to continue exactly."""

    step: int = 0                                  # optimizer steps done
    records: list = field(default_factory=list)    # finished mini-epochs: epoch, loss, lr, lightning_epoch, line
    loss_sum: float = 0.0                          # the unfinished mini-epoch so far
    loss_count: int = 0
    bad_steps: int = 0


def flops_per_token(recipe: Recipe) -> float:
    """6 x non-embedding parameters + the wkv recurrence (about 24 * head_size FLOPs per channel per layer,
    forward and backward), for MFU."""
    from rwkv7.model import lora_rank

    m = recipe.model
    C, L = m.n_embd, m.n_layer
    lora = sum(2 * C * lora_rank(C, k) for k in "wavg")
    per_layer = 4 * C * C + 8 * C * C + lora
    return 6.0 * (L * per_layer + C * m.vocab_size) + L * 24.0 * m.head_size * C


def make_tracker(recipe: Recipe, run_dir: Path, data: TrainingData, state: RunState, dataset, last_step: int,
                 resume_from: Path | None, first_epoch: int, progress: bool, wandb_project: str | None = None):
    """The Lightning callback that owns the run's bookkeeping (built here so importing this module stays light)."""
    import pytorch_lightning as pl

    class _Tracker(pl.Callback):
        def __init__(self):
            self.stop_signal = None
            self.stopped = False
            self.metrics_buffer: list[str] = []
            self.wandb = None
            self.pending: list = []  # (step, loss tensor, lr, grad norm) not yet read back from the device
            self.bar = None
            self.t_last = time.time()
            self.step_last = state.step
            self.tok_s = 0.0
            self.lr = 0.0
            self.flops = flops_per_token(recipe)
            self.peak = None

        # -- lifecycle --
        def setup(self, trainer, pl_module, stage=None):
            dataset.rank, dataset.world = trainer.global_rank, trainer.world_size

        def on_train_start(self, trainer, pl_module):
            self.world = trainer.world_size
            if resume_from is not None:
                restore_optimizer(trainer, pl_module, resume_from)
            if torch.cuda.is_available() and recipe.train.accelerator == "gpu":
                name = torch.cuda.get_device_name()
                self.peak = next((v for k, v in PEAK_TFLOPS_BF16.items() if k in name), None)
            if progress and trainer.is_global_zero:
                from tqdm import tqdm

                self.bar = tqdm(total=last_step, initial=state.step, unit="step", dynamic_ncols=True,
                                desc=f"{recipe.name}", mininterval=0.5 if sys.stderr.isatty() else 10.0)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
            if wandb_project and trainer.is_global_zero:  # off unless asked for; WANDB_MODE is honoured by wandb
                import wandb

                m = recipe.model
                self.wandb = wandb.init(project=wandb_project, config=recipe.to_dict(), resume="allow",
                                        name=f"{recipe.name} L{m.n_layer} D{m.n_embd} ctx{recipe.train.ctx_len}",
                                        dir=str(run_dir))

        def _on_signal(self, signum, frame):
            self.stop_signal = signum

        def on_train_end(self, trainer, pl_module):
            self._flush_metrics(trainer)
            if self.wandb is not None:
                self.wandb.finish()
            if self.bar is not None:
                self.bar.close()

        # -- every step --
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            t = recipe.train
            self.lr = learning_rate(state.step, t.lr_init, t.lr_final, t.warmup_steps, recipe.tokens_per_step,
                                    data.exit_tokens)
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = self.lr * group["my_lr_scale"]
            pl_module.run_step = state.step
            if os.environ.get("RWKV7_PROFILE_STEP") == str(state.step) and trainer.is_global_zero:
                acts = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                self.profiler = torch.profiler.profile(activities=acts)
                self.profiler.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            # a skipped bad step: training_step returned None, or (DeepSpeed) a zero loss flagged by the module
            skipped = not isinstance(outputs, dict) or pl_module.skipped
            pl_module.skipped = False
            loss = None if skipped else outputs["loss"].detach()
            if loss is not None and trainer.world_size > 1:
                # the global batch's loss (mean over ranks) for metrics.jsonl; on GPUs the all-reduce is queued on
                # the device and read one step late like the loss itself, so the host does not wait for it
                loss = trainer.strategy.reduce(loss.clone(), reduce_op="mean")
            state.step += 1
            norm = getattr(trainer.optimizers[0], "last_grad_norm", None)
            self.pending.append((state.step, loss, self.lr, pl_module.last_grad_norm if norm is None else norm))
            stop = self._agree(trainer, self.stop_signal is not None)  # every rank stops at the same step
            boundary = state.step % recipe.epoch_steps == 0 or state.step >= last_step or stop
            # GPU: read the previous step's loss, which is done by now, so the host never waits for the current one
            self._drain(trainer, pl_module, keep=0 if boundary or pl_module.check_now else 1)
            if state.step % recipe.epoch_steps == 0:
                self._end_mini_epoch(trainer, pl_module, stop)
            elif stop or state.step >= last_step:  # mid mini-epoch: keep the partial sums for an exact resume
                save_full_checkpoint(trainer, pl_module, recipe, run_dir, state)
            if stop:
                self.stopped = True
                trainer.should_stop = True
            if state.step >= last_step:
                trainer.should_stop = True
            testhooks.kill_if("kill", state.step)
            if getattr(self, "profiler", None) is not None and state.step >= int(os.environ["RWKV7_PROFILE_STEP"]) + 3:
                self._write_profile()

        @staticmethod
        def _agree(trainer, flag: bool) -> bool:
            """True on every rank if it is true on any (a decision all ranks must act on together)."""
            return trainer.strategy.reduce_boolean_decision(flag, all=False) if trainer.world_size > 1 else flag

        def _validate(self, pl_module, epoch):
            """Held-out loss on data.val_path (first data.val_tokens tokens), in val_log.txt: the official
            train_log.txt keeps its format."""
            from rwkv7.evaluate import evaluate_loss

            loss, n = evaluate_loss(pl_module.model, data.val.tokens, ctx_len=recipe.train.ctx_len,
                                    max_tokens=recipe.data.val_tokens or None, batch=recipe.train.micro_bsz)
            append_line(run_dir / "val_log.txt", f"{epoch} {loss:.6f} {math.exp(min(loss, 50)):.4f} {n}")
            if self.bar is not None:
                self.bar.write(f"validation {epoch}: loss {loss:.4f} over {n} tokens")

        def _write_profile(self):
            """RWKV7_PROFILE_STEP=N: profile steps N..N+2 into profile.txt (where host and GPU time go)."""
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.profiler.__exit__(None, None, None)
            events = self.profiler.key_averages()
            text = "\n\n".join(events.table(sort_by=key, row_limit=25) for key in ("self_cuda_time_total",
                                                                                  "self_cpu_time_total"))
            (run_dir / "profile.txt").write_text(text)
            self.profiler = None

        def _drain(self, trainer, pl_module, keep: int):
            while len(self.pending) > keep:
                step, loss_t, lr, norm = self.pending.pop(0)
                loss = float("nan") if loss_t is None else float(loss_t)
                diverged = loss_t is not None and not math.isfinite(loss) and not pl_module.check_now
                if self._agree(trainer, diverged):  # found one step late: the update is done, so all ranks stop
                    raise NonFiniteLoss(f"training diverged at step {step - 1}: loss is {loss} "
                                        "(set train.max_bad_steps to skip bad steps)")
                if math.isfinite(loss):
                    state.loss_sum += loss
                    state.loss_count += 1
                self._progress(step, lr)
                self._metric(trainer, step, loss, lr, None if norm is None else float(norm))

        def _progress(self, step, lr):
            now = time.time()
            if now - self.t_last >= 1.0 or step == last_step:
                self.tok_s = (step - self.step_last) * recipe.tokens_per_step / max(now - self.t_last, 1e-9)
                self.t_last, self.step_last = now, step
                if self.bar is not None:
                    avg = state.loss_sum / max(state.loss_count, 1)
                    text = f"loss {avg:.4f} lr {lr:.3g} {self.tok_s / 1e3:.1f} kt/s"
                    if self.peak:  # GPU: model FLOPs utilisation and peak memory, as in metrics.jsonl
                        mfu = self.tok_s * self.flops / (self.peak * 1e12 * self.world)
                        text += f" MFU {mfu:.1%} {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB"
                    self.bar.set_postfix_str(text, False)
            if self.bar is not None:
                self.bar.update(1)

        def _metric(self, trainer, step, loss, lr, norm):
            if not trainer.is_global_zero:
                return
            row = {"step": step, "mini_epoch": (step - 1) // recipe.epoch_steps, "loss": loss, "lr": lr,
                   "grad_norm": norm, "tokens_per_s": round(self.tok_s, 1), "tokens_per_step": recipe.tokens_per_step,
                   "time": round(time.time(), 3)}  # when the row was read back (one step late on GPUs)
            if self.peak:
                row["mfu"] = round(self.tok_s * self.flops / (self.peak * 1e12 * trainer.world_size), 4)
            if torch.cuda.is_available() and recipe.train.accelerator == "gpu":
                row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
                row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2 ** 30, 3)  # + allocator cache
            self.metrics_buffer.append(json.dumps(row))
            if self.wandb is not None:
                self.wandb.log(row, step=step)
            if len(self.metrics_buffer) >= 200:
                self._flush_metrics(trainer)

        def _flush_metrics(self, trainer):
            if self.metrics_buffer and trainer.is_global_zero:
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write("\n".join(self.metrics_buffer) + "\n")
            self.metrics_buffer = []

        def _end_mini_epoch(self, trainer, pl_module, stop: bool):
            from rwkv7.trajectory import format_epoch_line

            mean = torch.tensor([state.loss_sum / max(state.loss_count, 1)], dtype=torch.float64,
                                device=pl_module.device)
            avg = float(trainer.strategy.reduce(mean, reduce_op="mean")) if trainer.world_size > 1 else float(mean)
            epoch = state.step // recipe.epoch_steps - 1
            line = format_epoch_line(epoch, avg, self.lr, epoch - first_epoch)
            state.records.append({"epoch": epoch, "loss": avg, "lr": self.lr, "line": line})
            state.loss_sum, state.loss_count = 0.0, 0
            last = state.step >= last_step
            save = epoch % recipe.train.epoch_save == 0 or last or stop
            if save:
                # checkpoint first, log line second: a crash in between is repaired from the checkpoint on resume
                save_full_checkpoint(trainer, pl_module, recipe, run_dir, state)
                if trainer.is_global_zero:
                    ckpt.save_weights(pl_module.model, run_dir / f"rwkv-{epoch}.pth")
            if trainer.is_global_zero:
                append_line(run_dir / "train_log.txt", line)
                if data.val is not None:
                    self._validate(pl_module, epoch)
                self._flush_metrics(trainer)
                if self.bar is not None:
                    self.bar.write(line.rstrip())

    return _Tracker()


def save_full_checkpoint(trainer, pl_module, recipe: Recipe, run_dir: Path, state: RunState) -> None:
    state.bad_steps = pl_module.bad_steps
    if trainer.world_size > 1 and state.loss_count:  # rank 0 writes meta.json: store the mean over ranks
        local = torch.tensor(state.loss_sum, dtype=torch.float64, device=pl_module.device)
        state.loss_sum = float(trainer.strategy.reduce(local, reduce_op="mean"))
    meta = {"state": asdict(state), "fingerprint": recipe.fingerprint(), "recipe": recipe.to_dict(),
            "world_size": trainer.world_size, "time": datetime.datetime.now().isoformat()}
    engine = getattr(trainer.strategy, "deepspeed_engine", None)
    tmp = run_dir / ckpt.CKPT_DIR / f".tmp-step-{state.step:08d}"
    if trainer.is_global_zero:
        tmp = ckpt.begin_checkpoint(run_dir, state.step)
    trainer.strategy.barrier()
    error = None
    try:
        if engine is not None:
            engine.save_checkpoint(str(tmp), tag="ds")  # every rank writes its own shard
            if trainer.is_global_zero:
                ckpt.save_weights(pl_module.model, tmp / "weights.pth")
        elif getattr(trainer.optimizers[0], "sharded", False):  # strategy ddp: every rank sends its optimizer shard
            from rwkv7.train.data_parallel import save_state

            save_state(tmp, pl_module.model, trainer.optimizers[0], write=trainer.is_global_zero)
        elif trainer.is_global_zero:
            ckpt.save_plain_state(tmp, pl_module.model, trainer.optimizers[0])
        testhooks.kill_if("kill-ckpt", state.step)
    except OSError as e:
        error = e
    # all ranks learn whether any write failed, so none waits for a rank that gave up
    failed = trainer.strategy.reduce_boolean_decision(error is not None, all=False) if trainer.world_size > 1 \
        else error is not None
    if not failed and trainer.is_global_zero:
        try:
            ckpt.commit_checkpoint(tmp, meta, recipe.train.keep_checkpoints)
        except OSError as e:
            error = e
    if error is not None or (failed and trainer.world_size > 1):
        if trainer.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = ckpt.checkpoint_dirs(run_dir)
        why = (error.strerror or str(error)) if error is not None else "another rank could not write its part"
        raise UserError(f"could not write the checkpoint of step {state.step} ({why}); "
                        f"{'kept ' + kept[-1].name if kept else 'no earlier checkpoint exists'}: free disk space "
                        "in " + str(run_dir) + " and run the same command to resume")
    trainer.strategy.barrier()


def restore_optimizer(trainer, pl_module, path: Path) -> None:
    engine = getattr(trainer.strategy, "deepspeed_engine", None)
    if engine is not None:
        engine.load_checkpoint(str(path), tag="ds", load_optimizer_states=True, load_lr_scheduler_states=False)
    else:
        trainer.optimizers[0].load_state_dict(ckpt.load_plain_state(path)["optimizer"])


def repair_log(log: Path, state: RunState) -> None:
    """Make train_log.txt agree with a checkpoint: drop epoch lines after it (and a torn last line), add any of its
    lines a crash kept from being written."""
    from rwkv7.trajectory import parse_log_text

    known = {r["epoch"]: r["line"] for r in state.records}
    lines = log.read_text(errors="replace").splitlines(keepends=True) if log.is_file() else []
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    kept, seen = [], set()
    for line in lines:
        rec = parse_log_text(line) if line.strip() else []
        if rec:
            if rec[0].epoch not in known:
                continue
            seen.add(rec[0].epoch)
        kept.append(line)
    kept += [known[e] for e in sorted(known) if e not in seen]
    atomic_write_text(log, "".join(kept))


def trim_after(path: Path, keep) -> None:
    """Drop the lines of a per-step/per-epoch log written after the checkpoint we resume from (they are redone)."""
    if path.is_file():
        lines = path.read_text(errors="replace").splitlines(keepends=True)
        atomic_write_text(path, "".join(ln for ln in lines if ln.endswith("\n") and keep(ln)))


def repair_run_files(run_dir: Path, state: RunState) -> None:
    repair_log(run_dir / "train_log.txt", state)
    epochs = {r["epoch"] for r in state.records}
    trim_after(run_dir / "metrics.jsonl", lambda ln: json.loads(ln)["step"] <= state.step)
    trim_after(run_dir / "val_log.txt", lambda ln: int(ln.split()[0]) in epochs)


def find_resume(run_dir: Path, recipe: Recipe, force: bool) -> tuple[Path | None, RunState]:
    dirs = ckpt.checkpoint_dirs(run_dir)
    if not dirs:
        return None, RunState()
    latest = dirs[-1]
    meta = ckpt.read_meta(latest)
    if meta.get("fingerprint") != recipe.fingerprint() and not force:
        raise UserError(f"{run_dir} holds a run of a different recipe (checkpoint {latest.name}): use another --out, "
                        "or --force-resume to continue it with the new settings")
    world = recipe.train.devices * recipe.train.num_nodes
    if recipe.train.strategy.startswith("deepspeed") and meta.get("world_size", world) != world:
        raise UserError(f"checkpoint {latest.name} holds DeepSpeed ZeRO shards of {meta['world_size']} GPU(s) and "
                        f"this run has {world}: resume on {meta['world_size']} GPU(s), or continue from its weights "
                        f"with --load-model {run_dir / 'rwkv-<N>.pth'} in a fresh --out (new optimizer state)")
    return latest, RunState(**meta["state"])


def build_trainer(recipe: Recipe, callbacks: list, steps: int):
    import pytorch_lightning as pl

    t = recipe.train
    # replace_sampler_ddp=False: every rank draws its own samples of the official global order (as RWKV-LM does)
    kwargs = dict(max_steps=steps, max_epochs=1, enable_checkpointing=False, logger=False, replace_sampler_ddp=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                  callbacks=callbacks, num_nodes=t.num_nodes, devices=t.devices)
    timeout = datetime.timedelta(minutes=t.dist_timeout_min)
    several = t.devices * t.num_nodes > 1
    if t.strategy == "ddp":  # Lightning launches the ranks; rwkv7/train/data_parallel.py reduces and shards
        from rwkv7.train.data_parallel import lightning_strategy

        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        return pl.Trainer(accelerator=t.accelerator, precision=32, strategy=lightning_strategy(timeout), **kwargs)
    if t.accelerator == "cpu":  # several CPU processes: DDP over gloo (tests the multi-rank logic without GPUs)
        from pytorch_lightning.strategies import DDPStrategy

        return pl.Trainer(accelerator="cpu", precision=32, gradient_clip_val=t.grad_clip or None,
                          strategy=DDPStrategy(timeout=timeout) if several else None, **kwargs)
    if t.strategy == "single":  # pure bf16 weights + fp32 masters in MasterWeightAdamW; no precision plugin
        return pl.Trainer(accelerator="gpu", precision=32, **kwargs)
    # a hung or dead rank must end the job, not hang it: NCCL's watchdog aborts a collective after the timeout
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    strategy = None
    if t.strategy.startswith("deepspeed"):
        from pytorch_lightning.strategies import DeepSpeedStrategy

        class _DeepSpeed(DeepSpeedStrategy):
            def _init_deepspeed_distributed(self):  # Lightning 1.9.5 passes no timeout to DeepSpeed: add ours
                import deepspeed

                self._set_node_environment_variables()
                self._process_group_backend = self._get_process_group_backend()
                deepspeed.init_distributed(self._process_group_backend, timeout=timeout,
                                           distributed_port=self.cluster_environment.main_port)

        bucket = int(t.ds_bucket_mb * 1e6)
        stage = 3 if "stage_3" in t.strategy else 2
        offload = t.strategy.endswith("offload")
        strategy = _DeepSpeed(stage=stage, offload_optimizer=offload, offload_parameters=offload and stage == 3,
                              allgather_bucket_size=bucket, reduce_bucket_size=bucket,
                              logging_batch_size_per_gpu=t.micro_bsz)
    elif several:
        from pytorch_lightning.strategies import DDPStrategy

        strategy = DDPStrategy(timeout=timeout)
    precision = "bf16" if t.precision == "bf16" else 32
    return pl.Trainer(accelerator="gpu", strategy=strategy, precision=precision,
                      gradient_clip_val=t.grad_clip or None, **kwargs)


def launched_as_rank_zero() -> bool:
    """Lightning starts ranks > 0 as copies of this command with LOCAL_RANK/NODE_RANK set; only rank 0 writes the
    run folder's shared files before the Trainer (and its process group) exists."""
    global_rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))  # torchrun / srun set these
    return (int(global_rank) == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0
            and int(os.environ.get("NODE_RANK", 0)) == 0)


def run_training(recipe: Recipe, run_dir: Path, *, resume: bool = True, force_resume: bool = False,
                 load_model: str | None = None, progress: bool = True, check: bool = True,
                 wandb_project: str | None = None) -> int:
    """Train `recipe` into run_dir; returns the exit code (0 ok, 1 check failed, 3 diverged, 130 interrupted)."""
    from rwkv7.init import init_model
    from rwkv7.model import ModelShape, RWKV7
    from rwkv7.train.module import RWKV7Module
    from rwkv7.data.sampler import MagicPrimeWindows

    from rwkv7.doctor import preflight

    start_weights = ckpt.read_state_dict(load_model) if load_model else None  # fails before anything is created
    preflight(recipe, run_dir)  # GPU, DeepSpeed, data, run folder and disk: a UserError before any work
    data = prepare_data(recipe)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_from, state = find_resume(run_dir, recipe, force_resume) if resume else (None, RunState())
    if load_model and resume_from is not None:
        raise UserError(f"--load-model given but {run_dir} already holds checkpoints: use a fresh --out")

    epoch_steps = recipe.epoch_steps
    last_step = (recipe.train.epoch_count * epoch_steps if recipe.train.epoch_count
                 else total_steps(data.exit_tokens, recipe.tokens_per_step))
    if state.step >= last_step:
        print(f"{run_dir}: already trained {state.step} of {last_step} steps; nothing to do")
        return finish(recipe, run_dir, check)

    torch.manual_seed(recipe.train.seed)
    if recipe.train.accelerator == "cpu" and recipe.train.cpu_threads:
        torch.set_num_threads(recipe.train.cpu_threads)
    m = recipe.model
    model = RWKV7(ModelShape(m.n_layer, m.n_embd, m.vocab_size, m.head_size), grad_cp=bool(recipe.train.grad_cp))
    log = run_dir / "train_log.txt"
    writer = launched_as_rank_zero()
    if resume_from is not None:
        ckpt.load_into(model, _checkpoint_weights(resume_from), str(resume_from))
        if writer:
            repair_run_files(run_dir, state)
            print(f"resuming {run_dir} from {resume_from.name} (step {state.step} of {last_step})")
    elif start_weights is not None:
        ckpt.load_into(model, start_weights, load_model)
        del start_weights
    else:
        init_model(model, seed=recipe.train.seed, bf16_round=recipe.train.init_bf16_round)
        if writer:
            ckpt.save_weights(model, run_dir / "rwkv-init.pth")
            for name in ("train_log.txt", "metrics.jsonl", "val_log.txt"):
                (run_dir / name).unlink(missing_ok=True)
    first_epoch = state.step // epoch_steps
    if writer:
        append_line(log, f"NEW RUN {datetime.datetime.now().strftime('%Y-%m-%d-%H-%M-%S')}\n"
                         f"{json.dumps(recipe.to_dict())}")
        atomic_write_text(run_dir / "run.json", json.dumps(run_info(recipe, data), indent=1))

    dataset = MagicPrimeWindows(data.data.tokens, recipe.train.ctx_len, data.magic_prime, recipe.train.micro_bsz,
                                recipe.real_bsz, state.step, last_step - state.step)
    loader = torch.utils.data.DataLoader(dataset, batch_size=recipe.train.micro_bsz, shuffle=False,
                                         num_workers=recipe.train.num_workers, drop_last=True,
                                         pin_memory=recipe.train.accelerator == "gpu",
                                         persistent_workers=False)
    if recipe.train.strategy in ("single", "ddp") and recipe.train.precision == "bf16":
        model = model.to(torch.bfloat16)  # as DeepSpeed's bf16 mode: the whole module in bf16
    if recipe.train.compile:
        model.compile_blocks()
    module = RWKV7Module(model, recipe, bad_steps=state.bad_steps)
    tracker = make_tracker(recipe, run_dir, data, state, dataset, last_step, resume_from, first_epoch, progress,
                           wandb_project)
    trainer = build_trainer(recipe, [tracker], last_step - state.step)
    try:
        trainer.fit(module, loader)
    except NonFiniteLoss as e:
        print(f"error: {e}; the last good checkpoint is kept in {run_dir / ckpt.CKPT_DIR}")
        return EXIT_DIVERGED
    if tracker.stopped:
        print(f"stopped by a signal at step {state.step}; run the same command to resume")
        return EXIT_INTERRUPTED
    if trainer.is_global_zero:
        ckpt.save_weights(model, run_dir / "rwkv-final.pth")
    return finish(recipe, run_dir, check) if trainer.is_global_zero else 0


def _checkpoint_weights(path: Path) -> dict:
    if (path / "state.pt").is_file():
        return ckpt.load_plain_state(path)["model"]
    return ckpt.read_state_dict(path / "weights.pth")


def finish(recipe: Recipe, run_dir: Path, check: bool) -> int:
    expected = recipe.expected_log()
    if not check or expected is None:
        return 0
    if not expected.is_file():
        print(f"no expected log at {expected} yet: nothing to check against (make one with `make golden`)")
        return 0
    from rwkv7.trajectory import run_check

    c = recipe.check
    return run_check(run_dir / "train_log.txt", expected, tolerance=c.tolerance, rel_tolerance=c.rel_tolerance,
                     max_outliers=c.max_outliers)


def run_info(recipe: Recipe, data: TrainingData) -> dict:
    import numpy as np

    info = {"recipe": recipe.to_dict(), "fingerprint": recipe.fingerprint(), "data": data.data.prefix,
            "n_tokens": data.n_tokens, "magic_prime": data.magic_prime, "my_exit_tokens": data.exit_tokens,
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "cuda": torch.version.cuda, "time": datetime.datetime.now().isoformat()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
