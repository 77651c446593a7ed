"""Ctrl-C and SIGTERM at any moment: exit 130, one line, no traceback, and a run folder the same command resumes.

The handlers are installed before any work (entrypoint.py, then `handled()` around the CLI). A signal
- during training (`defer(callback)`): only calls back; the run stops at the end of the step with a checkpoint and
  returns 130. A second signal acts at once, as below.
- anywhere else: runs the cleanups registered with `on_interrupt` (remove temp files, stop worker processes), prints
  one line and exits 130 at once.

Why not raise an exception: a signal arrives between any two bytecodes, also inside library code that catches broad
exceptions or holds locks (seen: numpy left half-imported; logging's lock left held by an at-fork hook, which
deadlocked the tokenizer pool), and Lightning 1.9.5 swallows KeyboardInterrupt in Trainer.fit and returns as if
training had finished (which wrote an untrained rwkv-final.pth). Exiting is safe because nothing is ever left
half-written: weights, checkpoints and log rewrites are atomic (their temp files are registered cleanups), appended
log lines are repaired on resume, and the kernel drops the run-folder lock with the process.
"""
from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from typing import Callable

EXIT_INTERRUPTED = 130
SIGNALS = (signal.SIGINT, signal.SIGTERM)

_owner = None                          # pid of the process that installed the handlers
_deferred: Callable | None = None      # set while a training loop stops by itself at a step boundary
_cleanups: list[Callable[[], None]] = []


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
    exit_now(signum)


def message(signum: int) -> str:
    return f"interrupted ({signal.Signals(signum).name}): run the same command to resume or start again"


def exit_now(signum: int) -> None:
    for cleanup in reversed(_cleanups):
        try:
            cleanup()
        except BaseException:  # noqa: BLE001 - best effort: the next run repairs or ignores what is left
            pass
    try:
        sys.stdout.flush()
    except BaseException:  # noqa: BLE001 - stdout may be mid-write in the code this signal interrupted
        pass
    os.write(2, (message(signum) + "\n").encode())
    os._exit(EXIT_INTERRUPTED)


@contextmanager
def on_interrupt(cleanup: Callable[[], None]):
    """If a signal ends the process inside this block, call cleanup() first. It runs inside a signal handler, so
    keep it to plain system calls: remove files, signal processes."""
    add_cleanup(cleanup)
    try:
        yield
    finally:
        remove_cleanup(cleanup)


def add_cleanup(cleanup: Callable[[], None]) -> None:
    _cleanups.append(cleanup)


def remove_cleanup(cleanup: Callable[[], None]) -> None:
    if cleanup in _cleanups:
        _cleanups.remove(cleanup)


def unlink_quietly(*paths) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except OSError:
            pass


def die_with_parent(parent: int) -> None:
    """Call first thing in a forked worker: the kernel sends it SIGKILL when the thread that forked it ends (for a
    process forked by its main thread: when the parent process ends, however it ends). Linux only; elsewhere, or if
    the kernel refuses, nothing changes. If the parent ended before this call, the worker ends now."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1  # <linux/prctl.h>
        if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
            return
        if os.getppid() != parent:
            os._exit(128 + signal.SIGKILL)


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
    """While set, the next signal calls `callback(signum, frame)` instead of ending the process (None: end it)."""
    global _deferred
    if callback is not None and (_owner != os.getpid() or any(signal.getsignal(s) is not _handler for s in SIGNALS)):
        install()  # run outside the CLI (tests, `make golden`), or after `handled()` restored other handlers
    _deferred = callback
