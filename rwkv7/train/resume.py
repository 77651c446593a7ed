"""Checkpoint and resume: what a checkpoint carries, writing it, finding the newest one, and making the run's logs
agree with it again after a crash."""
from __future__ import annotations

import datetime
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rwkv7 import checkpoint as ckpt
from rwkv7.errors import UserError
from rwkv7.fsutil import atomic_write_text, ensure_space, is_write_failure
from rwkv7.recipe import Recipe
from rwkv7.testhooks import Faults
from rwkv7.train.ranks import any_rank, mean_over_ranks


@dataclass
class RunState:
    """What a checkpoint carries besides weights and optimizer: enough to continue exactly."""

    step: int = 0                                  # optimizer steps done
    records: list = field(default_factory=list)    # finished mini-epochs: epoch, loss, lr, line
    loss_sum: float = 0.0                          # the unfinished mini-epoch so far
    loss_count: int = 0
    bad_steps: int = 0

    def add_loss(self, loss: float) -> None:
        self.loss_sum += loss
        self.loss_count += 1

    def mean_loss(self) -> float:
        return self.loss_sum / max(self.loss_count, 1)

    def close_mini_epoch(self, epoch: int, loss: float, lr: float, line: str) -> None:
        self.records.append({"epoch": epoch, "loss": loss, "lr": lr, "line": line})
        self.loss_sum, self.loss_count = 0.0, 0


def checkpoint_meta(trainer, recipe: Recipe, state: RunState) -> dict:
    return {"state": asdict(state), "fingerprint": recipe.fingerprint(), "recipe": recipe.to_dict(),
            "world_size": trainer.world_size, "time": datetime.datetime.now().isoformat()}


def write_checkpoint_files(trainer, pl_module, tmp: Path) -> None:
    engine = getattr(trainer.strategy, "deepspeed_engine", None)
    if engine is not None:
        engine.save_checkpoint(str(tmp), tag="ds")  # every rank writes its own shard
        if trainer.is_global_zero:
            ckpt.save_weights(pl_module.model, tmp / "weights.pth")
    elif getattr(trainer.optimizers[0], "sharded", False):  # strategy ddp: every rank sends its optimizer shard
        from rwkv7.train.data_parallel import save_state

        save_state(tmp, pl_module.model, trainer.optimizers[0], write=trainer.is_global_zero)
    elif trainer.is_global_zero:
        ckpt.save_plain_state(tmp, pl_module.model, trainer.optimizers[0])


def save_full_checkpoint(trainer, pl_module, recipe: Recipe, run_dir: Path, state: RunState,
                         faults: Faults) -> None:
    """Write ckpt/step-N atomically on every rank together; a failed write is a UserError naming the kept one."""
    state.bad_steps = pl_module.bad_steps
    if trainer.world_size > 1 and state.loss_count:  # rank 0 writes meta.json: store the mean over ranks
        state.loss_sum = mean_over_ranks(trainer, state.loss_sum, pl_module.device)
    meta = checkpoint_meta(trainer, recipe, state)
    tmp = run_dir / ckpt.CKPT_DIR / f".tmp-step-{state.step:08d}"
    if trainer.is_global_zero:
        tmp = ckpt.begin_checkpoint(run_dir, state.step)
    trainer.strategy.barrier()
    error, need = None, ckpt.checkpoint_bytes(run_dir, pl_module.model)
    try:
        ensure_space(tmp.parent, need)  # refuse early, keep the newest
        write_checkpoint_files(trainer, pl_module, tmp)
        faults.checkpoint_half_written(state.step)
    except Exception as e:  # a full disk, no permission, the zip writer's RuntimeError: exit 2 below
        if not is_write_failure(e):
            raise
        error = e
    failed = any_rank(trainer, error is not None)  # so no rank waits for one that gave up
    if not failed and trainer.is_global_zero:
        try:
            ckpt.commit_checkpoint(tmp, meta, recipe.train.keep_checkpoints)
        except OSError as e:
            error = e
    if error is not None or failed:
        if trainer.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
        raise ckpt.write_error(run_dir, state.step, error, need)
    trainer.strategy.barrier()


def restore_optimizer(trainer, path: Path) -> None:
    engine = getattr(trainer.strategy, "deepspeed_engine", None)
    if engine is not None:
        engine.load_checkpoint(str(path), tag="ds", load_optimizer_states=True, load_lr_scheduler_states=False)
    else:
        trainer.optimizers[0].load_state_dict(ckpt.load_plain_state(path)["optimizer"])


def checkpoint_weights(path: Path) -> dict:
    if (path / "state.pt").is_file():
        return ckpt.load_plain_state(path)["model"]
    return ckpt.read_state_dict(path / "weights.pth")


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
    world = recipe.train.gpus
    if recipe.train.strategy.zero_stage and meta.get("world_size", world) != world:
        raise UserError(f"checkpoint {latest.name} holds DeepSpeed ZeRO shards of {meta['world_size']} GPU(s) and "
                        f"this run has {world}: resume on {meta['world_size']} GPU(s), or continue from its weights "
                        f"with --load-model {run_dir / 'rwkv-<N>.pth'} in a fresh --out (new optimizer state)")
    return latest, RunState(**meta["state"])
