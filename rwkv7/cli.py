"""Command line: `rwkv7 COMMAND ...` and `python entrypoint.py COMMAND ...` are the same.

Parses arguments and hands off; no work happens here. Exit codes: 0 ok, 1 the loss-trajectory check failed,
2 bad input or environment (one line on stderr, no traceback), 3 diverged, 130 stopped by SIGINT/SIGTERM (resumable),
anything else an unexpected failure. Signals are handled from the first moment (rwkv7/signals.py); a full disk, a
permission problem or an out-of-memory is mapped to exit 2 here, whichever command hits it.
Each command lives in its own module, which exposes `register(subparsers)` that adds its parser and sets
`func=handler`; a handler returns the exit code.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import sys
from pathlib import Path

from rwkv7 import quiet, signals
from rwkv7.errors import UserError

# module names under rwkv7.commands, in the order `rwkv7 --help` lists them
COMMANDS = ["train", "init", "recipes", "check", "fetch", "prepare", "generate", "eval", "doctor", "plan"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwkv7", description="Pre-train RWKV-7 (x070) models, aligned with RWKV-LM.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"rwkv7.commands.{name}").register(sub)
    return parser




def main(argv: list[str] | None = None) -> int:
    try:
        with signals.handled():  # before any work: a signal at any moment ends with 130 and one line
            quiet.install()
            try:
                return _run(argv)
            finally:
                quiet.teardown()
    except KeyboardInterrupt:  # only where our handler is not the one installed (an embedding program's choice)
        print(signals.message(2), file=sys.stderr)
        return signals.EXIT_INTERRUPTED


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: 2 on bad usage, 0 on --help
        return int(e.code or 0)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        message = str(e)
    except Exception as e:  # noqa: BLE001 - only the environment's failures are mapped; the rest re-raise
        message = environment_error(e)
        if message is None:
            raise
    print(f"error: {message}", file=sys.stderr)
    return 2


DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}  # never our code's fault
OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory", "DefaultCPUAllocator")


def environment_error(e: BaseException) -> str | None:
    """One line for a failure of the machine rather than of our code (memory, permissions, a full disk)."""
    from rwkv7.fsutil import is_write_failure, write_failure_message

    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(t in str(e) for t in OOM_TEXT)):
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        return (f"out of memory ({first}): lower train.micro_bsz, set train.grad_cp=1, use a smaller model or "
                "fewer train.num_workers / train.cpu_threads, or free memory on this machine")
    if isinstance(e, PermissionError):
        return (f"permission denied: {e.filename or e}: make it readable/writable for this user "
                "(chmod), or choose another path")
    if isinstance(e, RuntimeError) and is_write_failure(e) or getattr(e, "errno", None) in DISK_ERRNOS:
        where = getattr(e, "filename", None)
        folder = Path(where).parent if where else Path.cwd()
        return write_failure_message(Path(where).name if where else "a file", folder, e)
    return None


if __name__ == "__main__":
    sys.exit(main())
