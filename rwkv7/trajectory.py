"""The loss-trajectory check: the appliance's verdict on a run.

A run's `train_log.txt` (official RWKV-LM format, see below) is compared with a reference log of the same format,
one point per mini-epoch, and the result is a table, a one-line verdict, `check.json` and `loss.png`.

Log format (what the official trainer writes, and what `format_epoch_line` writes for ours):

    NEW RUN 2025-04-24-02-19-07                         <- header, skipped
    {'load_model': '0', 'wandb': 'Test', ...}           <- str(vars(args)), skipped
    {'train_batch_size': 16, ...}                       <- str(DeepSpeed config), skipped
    0 4.875856 131.0863 0.00059975 2025-04-24 02:23:42.481256 0
    ^ epoch  ^ mean loss ^ exp(loss) ^ lr of the last step ^ datetime.now() ^ Lightning epoch

Also skipped: blank lines, lines starting with `#` (comments in reference logs), and a bare `None` (what
`str(strategy.config)` gives without DeepSpeed). Every other line must be an epoch line; anything else is a
UserError naming the file and line (a log truncated by a crash therefore needs its last line removed).

Duplicates: a resumed run may write the same mini-epoch again. The LAST occurrence in the file wins, because it
belongs to the run that carried on from there.

Check semantics: avg loss per mini-epoch is compared over the epochs that both logs have (a short run is checked
over its prefix; epochs only one side has are listed in the result, not compared). A point is ok when
|actual - expected| <= max(tolerance, rel_tolerance * |expected|). The check passes when at most `max_outliers`
points are not ok AND every compared actual loss is finite: a NaN/inf loss is never forgiven as an outlier.
Mismatched input (no epoch lines, no common epochs, fewer than `min_epochs` compared) is a UserError (exit 2),
not a failed check (exit 1).

Importing this module is cheap: matplotlib is imported only inside `plot_check`.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import IO, Union

from rwkv7.errors import UserError
from rwkv7.fsutil import atomic_write_bytes

__all__ = [
    "EpochRecord", "CheckRow", "CheckResult", "parse_log", "parse_log_text", "format_epoch_line",
    "check_trajectory", "run_check", "format_table", "plot_check", "DEFAULT_TOLERANCE",
]

DEFAULT_TOLERANCE = 0.02  # absolute, per mini-epoch; recipes normally supply their own (docs/RECIPES.md)

# `str(datetime.datetime.now())`: microseconds are omitted when they happen to be exactly 0
_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?")  # ASCII digits only


@dataclasses.dataclass(frozen=True)
class EpochRecord:
    """One mini-epoch line of train_log.txt."""
    epoch: int            # absolute mini-epoch (epoch_begin + Lightning epoch)
    loss: float           # mean loss over the mini-epoch's steps (6 decimals in the file)
    ppl: float            # exp(loss) (4 decimals in the file)
    lr: float             # lr of the mini-epoch's last step (8 decimals in the file)
    timestamp: str        # wall clock when the line was written, as written
    lightning_epoch: int  # Lightning's epoch index (restarts at 0 on resume)


# ---------------------------------------------------------------------------------------------------------------
# reading and writing log lines

def _is_skipped(stripped: str) -> bool:
    return (not stripped or stripped.startswith("#") or stripped.startswith("NEW RUN")
            or stripped.startswith("{") or stripped == "None")


def _parse_epoch_line(stripped: str) -> EpochRecord | None:
    parts = stripped.split()
    if len(parts) != 7:
        return None
    epoch_s, loss_s, ppl_s, lr_s, date_s, time_s, lep_s = parts
    if not (epoch_s.isascii() and epoch_s.isdigit() and lep_s.isascii() and lep_s.isdigit()):  # not "²" or "٣"
        return None
    timestamp = f"{date_s} {time_s}"
    if not _TIMESTAMP.fullmatch(timestamp):
        return None
    try:
        loss, ppl, lr = float(loss_s), float(ppl_s), float(lr_s)
    except ValueError:
        return None
    return EpochRecord(int(epoch_s), loss, ppl, lr, timestamp, int(lep_s))


def parse_log_text(text: str, name: str = "<log>") -> list[EpochRecord]:
    """Parse the text of a train_log.txt; `name` is used in error messages. See the module docstring."""
    by_epoch: dict[int, EpochRecord] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if _is_skipped(stripped):
            continue
        rec = _parse_epoch_line(stripped)
        if rec is None:
            shown = stripped if len(stripped) <= 80 else stripped[:77] + "..."
            raise UserError(
                f"{name}:{lineno}: not a train_log.txt epoch line (want 'EPOCH LOSS PPL LR YYYY-MM-DD HH:MM:SS.ffffff "
                f"LIGHTNING_EPOCH'): {shown!r}")
        by_epoch[rec.epoch] = rec  # last occurrence wins (a resumed run repeats epochs)
    return [by_epoch[e] for e in sorted(by_epoch)]


def parse_log(path: str | os.PathLike) -> list[EpochRecord]:
    """Parse an official-format train_log.txt into epoch records sorted by epoch.

    Header lines are skipped; if an epoch appears more than once the last occurrence wins. Returns [] for a log
    with no epoch lines. A missing/unreadable file or a malformed line is a UserError naming the file (and line).
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"log file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"log path is a directory, not a train_log.txt: {path}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text train_log.txt (not valid UTF-8)") from None
    except OSError as e:
        raise UserError(f"cannot read log {path}: {e.strerror or e}") from None
    return parse_log_text(text, path)


def format_epoch_line(epoch: int, loss: float, lr: float, lightning_epoch: int,
                      now: datetime.datetime | None = None) -> str:
    """One train_log.txt epoch line, newline included, exactly as the official trainer writes it.

    Deviation: the official `math.exp(avg_loss)` raises OverflowError for loss > ~709; here ppl is written as inf.
    """
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    if isinstance(lightning_epoch, bool) or not isinstance(lightning_epoch, int) or lightning_epoch < 0:
        raise ValueError(f"lightning_epoch must be an int >= 0, got {lightning_epoch!r}")
    loss, lr = float(loss), float(lr)
    try:
        ppl = math.exp(loss)
    except OverflowError:
        ppl = math.inf
    if now is None:
        now = datetime.datetime.now()
    return f"{epoch} {loss:.6f} {ppl:.4f} {lr:.8f} {now} {lightning_epoch}\n"


# ---------------------------------------------------------------------------------------------------------------
# the comparison

@dataclasses.dataclass(frozen=True)
class CheckRow:
    epoch: int
    expected: float
    actual: float
    delta: float   # actual - expected (nan when actual is not finite)
    limit: float   # the allowed |delta| at this point: max(tolerance, rel_tolerance*|expected|)
    ok: bool


def _json_num(x: float):
    """JSON has no NaN/inf: write those as the strings 'nan', 'inf', '-inf'."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


@dataclasses.dataclass(frozen=True)
class CheckResult:
    rows: list[CheckRow]
    passed: bool
    verdict: str                 # one line, starts with PASS or FAIL
    tolerance: float
    rel_tolerance: float
    max_outliers: int
    min_epochs: int | None
    only_in_actual: list[int]    # epochs the run has and the reference does not (not compared)
    only_in_expected: list[int]  # epochs the reference has and the run does not (not compared)

    @property
    def failed_epochs(self) -> list[int]:
        return [r.epoch for r in self.rows if not r.ok]

    @property
    def nonfinite_epochs(self) -> list[int]:
        return [r.epoch for r in self.rows if not math.isfinite(r.actual)]

    def to_dict(self) -> dict:
        finite = [abs(r.delta) for r in self.rows if math.isfinite(r.delta)]
        return {
            "schema": "rwkv7-check/1",
            "passed": self.passed,
            "verdict": self.verdict,
            "tolerance": self.tolerance,
            "rel_tolerance": self.rel_tolerance,
            "max_outliers": self.max_outliers,
            "min_epochs": self.min_epochs,
            "compared_epochs": len(self.rows),
            "failed_epochs": self.failed_epochs,
            "nonfinite_epochs": self.nonfinite_epochs,
            "max_abs_delta": round(max(finite), 6) if finite else None,
            "only_in_actual": list(self.only_in_actual),
            "only_in_expected": list(self.only_in_expected),
            "rows": [{"epoch": r.epoch, "expected": r.expected, "actual": _json_num(r.actual),
                      "delta": _json_num(round(r.delta, 6)), "limit": r.limit, "ok": r.ok} for r in self.rows],
        }

    def to_json(self, **extra) -> str:
        """Strict JSON (no NaN literals); `extra` keys (e.g. log paths) are added at the top level."""
        d = self.to_dict()
        d.update(extra)
        return json.dumps(d, indent=2, allow_nan=False) + "\n"


LossSeries = Union[Sequence[EpochRecord], Mapping[int, float]]


def _as_losses(series: LossSeries) -> dict[int, float]:
    if isinstance(series, Mapping):
        return {int(e): float(v) for e, v in series.items()}
    return {r.epoch: float(r.loss) for r in series}


def _fmt_tol(tolerance: float, rel_tolerance: float) -> str:
    if rel_tolerance > 0:
        return f"+/-max({tolerance:g}, {rel_tolerance:g}*|expected|)"
    return f"+/-{tolerance:g}"


def check_trajectory(actual: LossSeries, expected: LossSeries, tolerance: float, rel_tolerance: float = 0.0,
                     max_outliers: int = 0, min_epochs: int | None = None) -> CheckResult:
    """Compare avg loss per mini-epoch of `actual` with `expected` (records from parse_log, or {epoch: loss}).

    See the module docstring for the rules. Raises UserError on mismatched input: either side empty, no common
    epochs, fewer than `min_epochs` compared, a non-finite expected loss, or invalid tolerance arguments.
    """
    _check_limits(tolerance, rel_tolerance, max_outliers, min_epochs)
    tolerance, rel_tolerance = float(tolerance), float(rel_tolerance)
    act = _as_losses(actual)
    exp = _as_losses(expected)
    common = _common_epochs(act, exp, min_epochs)
    rows = []
    for e in common:
        a, x = act[e], exp[e]
        limit = max(tolerance, rel_tolerance * abs(x))
        if math.isfinite(a):
            delta = a - x
            ok = abs(delta) <= limit
        else:
            delta, ok = math.nan, False
        rows.append(CheckRow(e, x, a, delta, limit, ok))
    nonfinite = [r.epoch for r in rows if not math.isfinite(r.actual)]
    failed = [r for r in rows if not r.ok]
    passed = not nonfinite and len(failed) <= max_outliers
    only_act = sorted(set(act) - set(exp))
    only_exp = sorted(set(exp) - set(act))
    verdict = _verdict(rows, nonfinite, failed, passed, _fmt_tol(tolerance, rel_tolerance), max_outliers)
    if only_exp and only_exp[0] < common[-1]:
        verdict += f"; run lacks epoch(s) {_ranges([e for e in only_exp if e < common[-1]])}"
    return CheckResult(rows, passed, verdict, tolerance, rel_tolerance, max_outliers, min_epochs, only_act, only_exp)


def _check_limits(tolerance, rel_tolerance, max_outliers, min_epochs) -> None:
    for name, v in (("tolerance", tolerance), ("rel_tolerance", rel_tolerance)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise UserError(f"{name} must be a finite number >= 0, got {v!r}")
    if isinstance(max_outliers, bool) or not isinstance(max_outliers, int) or max_outliers < 0:
        raise UserError(f"max_outliers must be an integer >= 0, got {max_outliers!r}")
    if min_epochs is not None and (isinstance(min_epochs, bool) or not isinstance(min_epochs, int) or min_epochs < 1):
        raise UserError(f"min_epochs must be an integer >= 1, got {min_epochs!r}")


def _common_epochs(act: dict, exp: dict, min_epochs: int | None) -> list[int]:
    """The epochs both logs have, or a UserError when they cannot be compared."""
    if not act:
        raise UserError("the run's log has no mini-epoch lines yet: nothing to check")
    if not exp:
        raise UserError("the expected log has no mini-epoch lines")
    common = sorted(set(act) & set(exp))
    if not common:
        raise UserError(f"no common mini-epochs: the run has epochs {_ranges(sorted(act))}, "
                        f"the expected log has {_ranges(sorted(exp))}")
    if min_epochs is not None and len(common) < min_epochs:
        raise UserError(f"only {len(common)} mini-epoch(s) can be compared ({_ranges(common)}), "
                        f"but at least {min_epochs} are required")
    bad_expected = [e for e in common if not math.isfinite(exp[e])]
    if bad_expected:
        raise UserError(f"the expected log has a non-finite loss at epoch {bad_expected[0]}")
    return common


def _verdict(rows: list, nonfinite: list, failed: list, passed: bool, tol: str, max_outliers: int) -> str:
    n = len(rows)
    finite_rows = [r for r in rows if math.isfinite(r.delta)]
    worst = max(finite_rows, key=lambda r: abs(r.delta)) if finite_rows else None
    worst_s = f"worst epoch {worst.epoch} delta {worst.delta:+.4f}" if worst else "no finite loss"
    if nonfinite:
        verdict = (f"FAIL: non-finite loss at epoch(s) {_ranges(nonfinite)} "
                   f"({n - len(failed)}/{n} mini-epochs within {tol})")
    elif not passed:
        verdict = (f"FAIL: {len(failed)}/{n} mini-epochs outside {tol} (at most {max_outliers} allowed); "
                   f"{worst_s}")
    else:
        extra = f", {len(failed)} outlier(s) allowed of {max_outliers}" if failed else ""
        verdict = f"PASS: {n - len(failed)}/{n} mini-epochs within {tol}{extra}; {worst_s}"
    return verdict


def _ranges(epochs: Sequence[int]) -> str:
    """[0,1,2,5,7,8] -> '0-2,5,7-8'."""
    out, i = [], 0
    while i < len(epochs):
        j = i
        while j + 1 < len(epochs) and epochs[j + 1] == epochs[j] + 1:
            j += 1
        out.append(str(epochs[i]) if i == j else f"{epochs[i]}-{epochs[j]}")
        i = j + 1
    return ",".join(out)


# ---------------------------------------------------------------------------------------------------------------
# output: table, check.json, loss.png

def format_table(result: CheckResult, delta_symbol: str = "\u0394") -> str:
    lines = [f"{'epoch':>5}  {'expected':>9}  {'actual':>9}  {delta_symbol:>9}  {'limit':>7}  ok"]
    for r in result.rows:
        a = f"{r.actual:9.6f}" if math.isfinite(r.actual) else f"{r.actual!s:>9}"
        d = f"{r.delta:+9.6f}" if math.isfinite(r.delta) else f"{'-':>9}"
        lines.append(f"{r.epoch:>5}  {r.expected:9.6f}  {a}  {d}  {r.limit:7.4f}  {'ok' if r.ok else 'FAIL'}")
    return "\n".join(lines)


def _can_encode(stream: IO[str], text: str) -> bool:
    try:
        text.encode(getattr(stream, "encoding", None) or "utf-8")
        return True
    except (UnicodeEncodeError, LookupError):
        return False


def plot_check(result: CheckResult, actual: Sequence[EpochRecord], expected: Sequence[EpochRecord],
               path: str) -> None:
    """Write loss.png: actual vs expected loss with the tolerance band, lr on a second axis. Atomic."""
    import io

    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    exp_ep = [r.epoch for r in expected]
    exp_loss = [r.loss for r in expected]
    limits = [max(result.tolerance, result.rel_tolerance * abs(v)) for v in exp_loss]
    act_ep = [r.epoch for r in actual]
    act_loss = [r.loss if math.isfinite(r.loss) else math.nan for r in actual]

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    try:
        _plot_losses(ax, result, exp_ep, exp_loss, limits, act_ep, act_loss)
        ax2 = _plot_lr(ax, actual, expected)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=4, fontsize=8.5,
                  frameon=False)
        head, _, tail = result.verdict.partition(": ")
        fig.suptitle(head, color="tab:green" if result.passed else "red", fontsize=15, fontweight="bold", y=0.985)
        ax.set_title(_wrap(tail, 95), fontsize=9)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _plot_losses(ax, result: CheckResult, exp_ep, exp_loss, limits, act_ep, act_loss) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.fill_between(exp_ep, [v - t for v, t in zip(exp_loss, limits)], [v + t for v, t in zip(exp_loss, limits)],
                    color="tab:blue", alpha=0.18, linewidth=0, label="tolerance band")
    ax.plot(exp_ep, exp_loss, "--", color="tab:blue", marker="o", markersize=3.5, linewidth=1.3,
            label="expected loss")
    ax.plot(act_ep, act_loss, "-", color="tab:orange", marker="o", markersize=4, linewidth=1.8,
            label="actual loss")
    bad = [r for r in result.rows if not r.ok and math.isfinite(r.actual)]
    if bad:
        ax.plot([r.epoch for r in bad], [r.actual for r in bad], "x", color="red", markersize=10,
                markeredgewidth=2.2, label="outside tolerance", zorder=5)
    for i, e in enumerate(result.nonfinite_epochs):
        ax.axvline(e, color="red", linewidth=1.5, alpha=0.7, label="non-finite loss" if i == 0 else None)
    ax.set_xlabel("mini-epoch")
    ax.set_ylabel("avg loss per mini-epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)


def _plot_lr(ax, actual: Sequence[EpochRecord], expected: Sequence[EpochRecord]):
    """The lr of both runs on a second y axis, from 0, drawn under the loss curves; returns that axis."""
    ax2 = ax.twinx()
    lr_e = [(r.epoch, r.lr) for r in expected if math.isfinite(r.lr)]
    lr_a = [(r.epoch, r.lr) for r in actual if math.isfinite(r.lr)]
    if lr_e:
        ax2.plot(*zip(*lr_e), ":", color="tab:gray", linewidth=1.3, label="expected lr (right axis)")
    if lr_a:
        ax2.plot(*zip(*lr_a), "-", color="tab:green", marker=".", markersize=4, linewidth=1.0, alpha=0.6,
                 label="actual lr (right axis)")
    # lr axis from 0, so a slow cosine looks slow and the lr lines stay out of the way of the loss curves
    lr_max = max([v for _, v in lr_e + lr_a] or [1.0])
    ax2.set_ylim(0, lr_max * 1.08 if lr_max > 0 else 1.0)
    ax2.set_ylabel("lr (last step of mini-epoch)", color="dimgray")
    ax2.tick_params(axis="y", colors="dimgray")
    ax2.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.set_zorder(ax2.get_zorder() + 1)  # loss curves drawn over the lr lines
    ax.patch.set_visible(False)
    return ax2


def _wrap(text: str, width: int) -> str:
    import textwrap
    return "\n".join(textwrap.wrap(text, width)) or text


def run_check(log: str | os.PathLike, expected: str | os.PathLike, tolerance: float = DEFAULT_TOLERANCE,
              rel_tolerance: float = 0.0, max_outliers: int = 0, min_epochs: int | None = None,
              out_dir: str | os.PathLike | None = None, plot: bool = True, stream: IO[str] | None = None) -> int:
    """Check a run's log against an expected log; print the table and verdict, write check.json (+ loss.png).

    Files go to `out_dir`, default the log's directory, each written atomically. Returns 0 on pass, 1 on fail;
    raises UserError (exit 2 in the CLI) for unreadable or mismatched input, before writing anything.
    A plotting problem is reported as a warning on stderr and does not change the verdict.
    """
    stream = stream if stream is not None else sys.stdout
    log, expected = os.fspath(log), os.fspath(expected)
    actual_recs = parse_log(log)
    if not actual_recs:
        raise UserError(f"{log}: no mini-epoch lines yet: nothing to check")
    expected_recs = parse_log(expected)
    if not expected_recs:
        raise UserError(f"{expected}: no mini-epoch lines in the expected log")
    result = check_trajectory(actual_recs, expected_recs, tolerance, rel_tolerance, max_outliers, min_epochs)

    out = os.fspath(out_dir) if out_dir is not None else (os.path.dirname(os.path.abspath(log)))
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {out}: {e.strerror or e}") from None

    delta_symbol = "\u0394" if _can_encode(stream, "\u0394") else "delta"
    print(format_table(result, delta_symbol), file=stream)
    json_path = os.path.join(out, "check.json")
    try:
        text = result.to_json(log=os.path.abspath(log), expected=os.path.abspath(expected))
        atomic_write_bytes(json_path, text.encode())
    except OSError as e:
        raise UserError(f"cannot write {json_path}: {e.strerror or e}") from None
    if plot:
        png_path = os.path.join(out, "loss.png")
        try:
            plot_check(result, actual_recs, expected_recs, png_path)
        except Exception as e:  # the plot is a convenience; the verdict stands without it
            print(f"warning: could not write {png_path}: {type(e).__name__}: {e}", file=sys.stderr)
    print(result.verdict, file=stream)
    return 0 if result.passed else 1
