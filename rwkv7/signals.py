"""Ctrl-C and SIGTERM at any moment: exit 130, one line, no traceback, and a run folder the same command resumes.

The handlers are installed before any work (entrypoint.py, then `handled()` around the CLI). What a signal does
depends on where the program is:
- training (`defer(callback)`): the first signal only calls back; the run stops at the end of the step with a
  checkpoint and returns 130. A second signal acts as below.
- a cleanup region (`cleanup_on_interrupt()`: atomic writes, binidx writers, the tokenizer pool): it raises
  `Interrupted`, which unwinds through the region's cleanup (temp files removed, workers stopped) to the CLI.
- anywhere else (imports, setup, reading): the process prints one line and exits 130 at once. Raising there is not
  safe: library code run during imports and setup catches broad exceptions (seen: numpy left half-imported), and
  Lightning 1.9.5 swallows KeyboardInterrupt in Trainer.fit and returns as if training had finished (which wrote an
  untrained rwkv-final.pth). Nothing outside a cleanup region leaves a file half-written: weights, checkpoints and
  logs rewrites are atomic, appended lines are repaired on resume, and the run-folder lock dies with the process.

Interrupted is a BaseException but not a KeyboardInterrupt, so that Lightning re-raises it after its teardown.
"""
from __future__ import annotations

import os
import signal
import sys
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
_cleanup = 0                           # depth of cleanup regions


def _handler(signum, frame):
    global _deferred
    if os.getpid() != _owner:
        # a forked worker (DataLoader, prepare's pool) inherited this: Ctrl-C is the parent's to handle; SIGTERM
        # ends the worker quietly (no traceback) and the parent reports the interruption
        if signum == signal.SIGTERM:
            os._exit(128 + signum)
        return
    if _deferred is not None:
        callback, _deferred = _deferred, None  # a second signal acts at once: the user insists
        callback(signum, frame)
        return
    if _cleanup:
        raise Interrupted(signum)
    exit_now(signum)


def message(signum: int) -> str:
    return f"interrupted ({signal.Signals(signum).name}): run the same command to resume or start again"


def exit_now(signum: int) -> None:
    try:
        sys.stdout.flush()
    except BaseException:  # noqa: BLE001 - stdout may be mid-write in the code this signal interrupted
        pass
    os.write(2, (message(signum) + "\n").encode())
    os._exit(EXIT_INTERRUPTED)


@contextmanager
def cleanup_on_interrupt():
    """Inside this block a signal raises Interrupted, so the block's own cleanup (finally/except) runs."""
    global _cleanup
    _cleanup += 1
    try:
        yield
    finally:
        _cleanup -= 1


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
