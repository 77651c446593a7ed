"""Stopping a run: a signal asks for a clean stop at the next step; a non-finite loss ends it (diverged)."""
from __future__ import annotations

import math

from rwkv7 import signals
from rwkv7.train.module import NonFiniteLoss


class SignalStop:
    """SIGTERM / SIGINT set a flag; the run checkpoints at the end of the step and exits 130."""

    def __init__(self):
        self.signum = None

    def install(self) -> None:
        signals.defer(self._on_signal)  # from here a signal stops the run at the end of the step (rwkv7.signals)

    @staticmethod
    def uninstall() -> None:
        signals.defer(None)  # after training a signal interrupts at once (the final save is atomic)

    def _on_signal(self, signum, frame):
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


def is_divergence(loss: float, had_loss: bool, checked_before_backward: bool) -> bool:
    """A non-finite loss read back after the update, which the module did not already handle (skip or stop)."""
    return had_loss and not math.isfinite(loss) and not checked_before_backward


def diverged(step: int, loss: float) -> NonFiniteLoss:
    return NonFiniteLoss(f"training diverged at step {step - 1}: loss is {loss} "
                         "(set train.max_bad_steps to skip bad steps)")
