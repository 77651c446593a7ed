"""Per-step metrics: the rows of metrics.jsonl (buffered, appended in blocks) and, when asked for, wandb."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from rwkv7.recipe import Recipe

FLUSH_ROWS = 200  # rows buffered before metrics.jsonl is appended to


def flops_per_token(recipe: Recipe) -> float:
    """6 x non-embedding parameters + the wkv recurrence (about 24 * head_size FLOPs per channel per layer,
    forward and backward), for MFU."""
    from rwkv7.model import lora_rank

    m = recipe.model
    C, L = m.n_embd, m.n_layer
    lora = sum(2 * C * lora_rank(C, k) for k in "wavg")
    per_layer = 4 * C * C + 8 * C * C + lora
    return 6.0 * (L * per_layer + C * m.vocab_size) + L * 24.0 * m.head_size * C


def metrics_row(recipe: Recipe, step: int, loss: float, lr: float, norm: float | None, tok_s: float,
                mfu: float | None) -> dict:
    row = {"step": step, "mini_epoch": (step - 1) // recipe.epoch_steps, "loss": loss, "lr": lr,
           "grad_norm": norm, "tokens_per_s": round(tok_s, 1), "tokens_per_step": recipe.tokens_per_step,
           "time": round(time.time(), 3)}  # when the row was read back (one step late on GPUs)
    if mfu is not None:
        row["mfu"] = round(mfu, 4)
    if torch.cuda.is_available() and recipe.train.accelerator == "gpu":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2 ** 30, 3)  # + allocator cache
    return row


class MetricsLog:
    """metrics.jsonl (and wandb) on the writing rank; a no-op on the others."""

    def __init__(self, run_dir: Path, writer: bool):
        self.path = run_dir / "metrics.jsonl"
        self.writer = writer
        self.buffer: list[str] = []
        self.wandb = None

    def start_wandb(self, recipe: Recipe, project: str | None, run_dir: Path) -> None:
        if not project or not self.writer:  # off unless asked for; WANDB_MODE is honoured by wandb
            return
        import wandb

        m = recipe.model
        self.wandb = wandb.init(project=project, config=recipe.to_dict(), resume="allow",
                                name=f"{recipe.name} L{m.n_layer} D{m.n_embd} ctx{recipe.train.ctx_len}",
                                dir=str(run_dir))

    def add(self, row: dict) -> None:
        if not self.writer:
            return
        self.buffer.append(json.dumps(row))
        if self.wandb is not None:
            self.wandb.log(row, step=row["step"])
        if len(self.buffer) >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.buffer and self.writer:
            with open(self.path, "a") as f:
                f.write("\n".join(self.buffer) + "\n")
        self.buffer = []

    def close(self) -> None:
        self.flush()
        if self.wandb is not None:
            self.wandb.finish()
