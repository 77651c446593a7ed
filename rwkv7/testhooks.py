"""Fault injection for the reliability tests, off unless RWKV7_TEST_FAULT is set.

RWKV7_TEST_FAULT="kill@7"          SIGKILL this process right after step 7
RWKV7_TEST_FAULT="kill-ckpt@10"    SIGKILL while the checkpoint of step 10 is half written
RWKV7_TEST_FAULT="kill@7:SIGINT"   the same moments with another signal (SIGINT, SIGTERM): a Ctrl-C mid-run
RWKV7_TEST_FAULT="nan@7"           make the loss of step 7 NaN
"""
from __future__ import annotations

import os
import signal


def _parse(spec: str) -> tuple[str, str, str]:
    name, _, rest = spec.partition("@")
    at, _, sig = rest.partition(":")
    return name, at, sig or "SIGKILL"


def fault(kind: str, step: int) -> bool:
    spec = os.environ.get("RWKV7_TEST_FAULT")
    if not spec:
        return False
    name, at, _ = _parse(spec)
    return name == kind and at.isdigit() and int(at) == step


def kill_if(kind: str, step: int) -> None:
    if fault(kind, step):
        os.kill(os.getpid(), getattr(signal, _parse(os.environ["RWKV7_TEST_FAULT"])[2]))
