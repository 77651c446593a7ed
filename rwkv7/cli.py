"""Command line: `rwkv7 COMMAND ...` and `python entrypoint.py COMMAND ...` are the same.

Parses arguments and hands off; no work happens here. Exit codes: 0 ok, 1 the loss-trajectory check failed,
2 bad input or environment (one line on stderr, no traceback), anything else an unexpected failure.
Each command lives in its own module, which exposes `register(subparsers)` that adds its parser and sets
`func=handler`; a handler returns the exit code.
"""
from __future__ import annotations

import argparse
import importlib
import sys

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
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: 2 on bad usage, 0 on --help
        return int(e.code or 0)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
