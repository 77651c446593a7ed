"""Fault injection for the reliability tests, off unless RWKV7_TEST_FAULT is set.

RWKV7_TEST_FAULT="kill@7"        SIGKILL this process right after step 7
RWKV7_TEST_FAULT="kill-ckpt@10"  SIGKILL while the checkpoint of step 10 is half written
RWKV7_TEST_FAULT="nan@7"         make the loss of step 7 NaN
"""
from __future__ import annotations

import os
import signal


def fault(kind: str, step: int) -> bool:
    spec = os.environ.get("RWKV7_TEST_FAULT")
    if not spec:
        return False
    name, _, at = spec.partition("@")
    return name == kind and at.isdigit() and int(at) == step


def kill_if(kind: str, step: int) -> None:
    if fault(kind, step):
        os.kill(os.getpid(), signal.SIGKILL)
