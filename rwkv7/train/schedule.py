"""The official learning-rate schedule (RWKV-LM train_temp src/trainer.py, on_train_batch_start).

Cosine from lr_init to lr_final measured in tokens, from the end of warmup to my_exit_tokens; during the first
warmup_steps steps the lr is scaled by 0.01 + 0.99 * step / warmup_steps. `step` is the run's global step; the
official trainer keys warmup on Lightning's step, which restarts on resume; ours continues, so a resumed run does not
re-warm (docs/ALIGNMENT.md, "deliberate differences").
"""
from __future__ import annotations

import math


def learning_rate(step: int, lr_init: float, lr_final: float, warmup_steps: int, tokens_per_step: int,
                  exit_tokens: int) -> float:
    warm_tokens = warmup_steps * tokens_per_step
    progress = (step * tokens_per_step - warm_tokens) / max(exit_tokens - warm_tokens, 1)
    progress = min(max(progress, 0.0), 1.0)
    f = lr_final / lr_init
    lr = lr_init * ((0.5 + f / 2) + (0.5 - f / 2) * math.cos(math.pi * progress))
    if step < warmup_steps:
        lr *= 0.01 + 0.99 * step / warmup_steps
    return lr


def total_steps(exit_tokens: int, tokens_per_step: int) -> int:
    """Steps until the official exit: the run stops once step * tokens_per_step >= my_exit_tokens."""
    return -(-exit_tokens // tokens_per_step)


def scheduled_lr(recipe, exit_tokens: int, step: int) -> float:
    """The recipe's learning rate for global step `step` (steps done so far)."""
    t = recipe.train
    return learning_rate(step, t.lr_init, t.lr_final, t.warmup_steps, recipe.tokens_per_step, exit_tokens)


def apply_learning_rate(optimizer, lr: float) -> None:
    """Set every parameter group's lr to lr x its my_lr_scale (the official per-group scaling)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["my_lr_scale"]
