"""Ctrl-C and SIGTERM at any moment: exit 130, one line, no traceback, and a run folder the same command resumes.

`handled()` wraps the whole CLI (installed before any work). Outside training a signal raises `Interrupted`, which
unwinds through every `finally`/cleanup (atomic writes remove their temp files) up to the CLI, which prints one
line and returns 130. During training the loop asks for the signal with `defer(callback)`: the first signal only
calls back(signum, frame) (the run stops at the end of the step, checkpointed); a second one raises as usual.

Interrupted is a BaseException but not a KeyboardInterrupt on purpose: Lightning 1.9.5 swallows KeyboardInterrupt
inside Trainer.fit and returns as if training had finished (which wrote an untrained rwkv-final.pth); any other
BaseException it re-raises after its own teardown.
"""
from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from typing import Callable

EXIT_INTERRUPTED = 130
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A SIGINT/SIGTERM arrived: the CLI exits 130."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_owner = None                          # pid of the process that installed the handlers
_deferred: Callable | None = None      # set while a training loop stops by itself at a step boundary


def _handler(signum, frame):
    global _deferred
    if os.getpid() != _owner:
        # a forked worker (DataLoader, prepare's pool) inherited this: Ctrl-C is the parent's to handle; SIGTERM
        # ends the worker quietly (no traceback) and the parent reports the interruption
        if signum == signal.SIGTERM:
            os._exit(128 + signum)
        return
    if _deferred is not None:
        callback, _deferred = _deferred, None  # a second signal raises: the user insists
        callback(signum, frame)
        return
    raise Interrupted(signum)


def install() -> None:
    global _owner
    _owner = os.getpid()
    for sig in SIGNALS:
        signal.signal(sig, _handler)


@contextmanager
def handled():
    """Install the handlers for the life of the block (restoring the previous ones after, for in-process callers)."""
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    install()
    try:
        yield
    finally:
        defer(None)
        for sig, h in previous.items():
            signal.signal(sig, h if h is not None else signal.SIG_DFL)


def defer(callback: Callable | None) -> None:
    """While set, the next signal calls `callback(signum, frame)` instead of raising (None: raise again)."""
    global _deferred
    if callback is not None and _owner != os.getpid():  # run outside the CLI (tests, `make golden`)
        install()
    _deferred = callback
