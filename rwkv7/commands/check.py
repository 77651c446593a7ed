"""`rwkv7 check`: compare a run's train_log.txt with an expected loss curve (exit 0 pass, 1 fail, 2 bad input)."""
from __future__ import annotations

import argparse
import math

from rwkv7.trajectory import DEFAULT_TOLERANCE, run_check


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return v


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v
    return parse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "check", help="check a run's loss trajectory against an expected curve",
        description="Compare avg loss per mini-epoch of a train_log.txt with an expected log (same format) over the "
                    "mini-epochs both have. A point is ok when |actual-expected| <= max(TOL, REL*|expected|); the "
                    "check passes when at most K points are not ok and no loss is NaN/inf. Writes check.json and "
                    "loss.png next to the log. Exit 0 pass, 1 fail, 2 unreadable or mismatched input.")
    p.add_argument("--log", required=True, metavar="RUN/train_log.txt", help="the run's train_log.txt")
    p.add_argument("--expected", required=True, metavar="EXPECTED.log",
                   help="expected curve, e.g. recipes/expected/0.1b-minipile.log")
    p.add_argument("--tolerance", type=_nonneg_float, default=None, metavar="TOL",
                   help=f"absolute tolerance per mini-epoch (default {DEFAULT_TOLERANCE:g}; recipes supply their own)")
    p.add_argument("--rel-tolerance", type=_nonneg_float, default=0.0, metavar="REL",
                   help="relative tolerance, a fraction of the expected loss (default 0)")
    p.add_argument("--max-outliers", type=_int_at_least(0), default=0, metavar="K",
                   help="mini-epochs allowed outside the tolerance (default 0)")
    p.add_argument("--epochs", type=_int_at_least(1), default=None, metavar="N",
                   help="require at least N compared mini-epochs (fewer is exit 2)")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="where check.json and loss.png go (default: the log's directory)")
    p.add_argument("--no-plot", action="store_true", help="do not write loss.png")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    if args.tolerance is None:
        tolerance = DEFAULT_TOLERANCE
        print(f"tolerance: {tolerance:g} (default; pass --tolerance to override)")
    else:
        tolerance = args.tolerance
        print(f"tolerance: {tolerance:g}")
    if args.rel_tolerance:
        print(f"relative tolerance: {args.rel_tolerance:g} of the expected loss")
    if args.max_outliers:
        print(f"allowed outliers: {args.max_outliers}")
    return run_check(args.log, args.expected, tolerance, rel_tolerance=args.rel_tolerance,
                     max_outliers=args.max_outliers, min_epochs=args.epochs, out_dir=args.out_dir,
                     plot=not args.no_plot)
