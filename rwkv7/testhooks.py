"""Fault injection for the reliability tests: a `Faults` object the run calls at fixed points.

Production runs get `Faults()`, whose hooks do nothing. The `train` command builds `EnvFaults` from RWKV7_TEST_FAULT
(read once, at the command line):
RWKV7_TEST_FAULT="kill@7"        SIGKILL this process right after step 7
RWKV7_TEST_FAULT="kill-ckpt@10"  SIGKILL while the checkpoint of step 10 is half written
RWKV7_TEST_FAULT="kill-log@10"   SIGKILL after the checkpoint of step 10 is committed, before its train_log.txt line
RWKV7_TEST_FAULT="sigterm@7"     send this process SIGTERM right after step 7 (sigint@7: SIGINT)
RWKV7_TEST_FAULT="kill@7:SIGINT" the kill points with another signal (SIGINT, SIGTERM): a Ctrl-C mid-run or mid-write
RWKV7_TEST_FAULT="nan@7"         make the loss of step 7 NaN
"""
from __future__ import annotations

import os
import signal


class Faults:
    """The injection points; the base class injects nothing."""

    def after_step(self, step: int) -> None:
        """Called once step `step` is done and logged."""

    def checkpoint_half_written(self, step: int) -> None:
        """Called after the checkpoint files of `step` are written, before the checkpoint is committed."""

    def before_log_line(self, step: int) -> None:
        """Called when a mini-epoch ends at `step`, after its checkpoint (if any), before its log line."""

    def loss(self, step: int, loss):
        """The loss of `step` as training should see it."""
        return loss


class EnvFaults(Faults):
    """One fault `kind@step` (the RWKV7_TEST_FAULT syntax)."""

    def __init__(self, spec: str):
        kind, _, rest = spec.partition("@")
        at, _, sig = rest.partition(":")
        self.kind, self.step = kind, int(at) if at.isdigit() else None
        self.signal = getattr(signal, sig or "SIGKILL")  # what the kill points send

    def _hit(self, kind: str, step: int) -> bool:
        return self.kind == kind and self.step == step

    def after_step(self, step: int) -> None:
        for kind, sig in (("kill", self.signal), ("sigterm", signal.SIGTERM), ("sigint", signal.SIGINT)):
            if self._hit(kind, step):
                os.kill(os.getpid(), sig)

    def checkpoint_half_written(self, step: int) -> None:
        if self._hit("kill-ckpt", step):
            os.kill(os.getpid(), self.signal)

    def before_log_line(self, step: int) -> None:
        if self._hit("kill-log", step):
            os.kill(os.getpid(), signal.SIGKILL)

    def loss(self, step: int, loss):
        return loss * float("nan") if self._hit("nan", step) else loss


def faults_from_env(environ=os.environ) -> Faults:
    spec = environ.get("RWKV7_TEST_FAULT")
    return EnvFaults(spec) if spec else Faults()
