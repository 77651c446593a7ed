"""Decisions and numbers every rank must share (no-ops in a single process)."""
from __future__ import annotations

import torch


def any_rank(trainer, flag: bool) -> bool:
    """True on every rank if it is true on any (a decision all ranks must act on together)."""
    return trainer.strategy.reduce_boolean_decision(flag, all=False) if trainer.world_size > 1 else flag


def mean_over_ranks(trainer, value: float, device) -> float:
    """The mean of a float over ranks, in float64."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    return float(trainer.strategy.reduce(t, reduce_op="mean")) if trainer.world_size > 1 else float(t)
