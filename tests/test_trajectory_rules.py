"""The trajectory check's rules one by one, on small hand-written inputs with outputs worked out by hand: each
tolerance at its boundary (a point exactly at the limit is ok, one just past it is not), absolute against relative
tolerance, max_outliers, the exact text of the verdict, of every table line and of check.json (every key, its type,
NaN/inf as strings), run_check's exit codes, where it prints and writes, and its messages for missing, empty, short
or unwritable input. Fast: no training, no process started; matplotlib is drawn once (test_plot_*).
tests/test_trajectory.py holds the end-to-end checks through the CLI."""
from __future__ import annotations

import datetime
import io
import json
import math
import os
import sys

import pytest

import rwkv7.trajectory as traj
from rwkv7.errors import UserError
from rwkv7.trajectory import (CheckResult, EpochRecord, check_trajectory, format_epoch_line, format_table, parse_log,
                              parse_log_text, run_check)
from tests.test_trajectory import HEADER

# a reference log as the official trainer writes it (ppl = exp(loss) to 4 places), with the lines that are skipped
EXPECTED_LOG = ("# hand-written reference: losses 3.0, 2.5, 2.0\n"
                + HEADER
                + "None\n"
                + "\n"
                + "0 3.000000 20.0855 0.00060000 2026-01-02 03:04:05.678901 0\n"
                + "1 2.500000 12.1825 0.00059000 2026-01-02 03:08:35.123456 1\n"
                + "2 2.000000 7.3891 0.00058000 2026-01-02 03:13:05 2\n")
# a run within +/-0.25 of it: deltas +0.1, -0.05, 0
GOOD_RUN = (HEADER
            + "0 3.100000 22.1980 0.00060000 2026-02-03 10:00:00.000001 0\n"
            + "1 2.450000 11.5883 0.00059000 2026-02-03 10:04:30.5 1\n"
            + "2 2.000000 7.3891 0.00058000 2026-02-03 10:09:00.25 2\n")
# a run 0.375 below it at epoch 1
BAD_RUN = (HEADER
           + "0 3.100000 22.1980 0.00060000 2026-02-03 10:00:00.000001 0\n"
           + "1 2.125000 8.3729 0.00059000 2026-02-03 10:04:30.5 1\n"
           + "2 2.000000 7.3891 0.00058000 2026-02-03 10:09:00.25 2\n")

TABLE_HEAD = "epoch   expected     actual          \u0394    limit  ok"
GOOD_TABLE = (TABLE_HEAD + "\n"
              "    0   3.000000   3.100000  +0.100000   0.2500  ok\n"
              "    1   2.500000   2.450000  -0.050000   0.2500  ok\n"
              "    2   2.000000   2.000000  +0.000000   0.2500  ok")
GOOD_VERDICT = "PASS: 3/3 mini-epochs within +/-0.25; worst epoch 0 delta +0.1000"
BAD_TABLE_ASCII = ("epoch   expected     actual      delta    limit  ok\n"
                   "    0   3.000000   3.100000  +0.100000   0.2500  ok\n"
                   "    1   2.500000   2.125000  -0.375000   0.2500  FAIL\n"
                   "    2   2.000000   2.000000  +0.000000   0.2500  ok")
BAD_VERDICT = "FAIL: 1/3 mini-epochs outside +/-0.25 (at most 0 allowed); worst epoch 1 delta -0.3750"


def logs(tmp_path, run=GOOD_RUN, expected=EXPECTED_LOG):
    (tmp_path / "run").mkdir(exist_ok=True)
    log = tmp_path / "run" / "train_log.txt"
    log.write_text(run)
    exp = tmp_path / "expected.log"
    exp.write_text(expected)
    return log, exp


def no_plot(*args):
    raise AssertionError("plot_check called")


class Sink:
    """A text stream with only write(): what print() needs; `encoding` only when given."""

    def __init__(self, **attrs):
        self.parts = []
        self.__dict__.update(attrs)

    def write(self, s):
        self.parts.append(s)
        return len(s)

    def text(self):
        return "".join(self.parts)


def refused(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as excinfo:
        fn(*args, **kwargs)
    return str(excinfo.value)


# --- the tolerance rules -------------------------------------------------------------------------------------------

def test_absolute_tolerance_boundary_on_both_sides():
    exp = {e: 3.0 for e in range(4)}
    act = {0: 3.25, 1: 2.75, 2: 3.25 + 1e-9, 3: 2.75 - 1e-9}
    res = check_trajectory(act, exp, 0.25, max_outliers=2)
    assert [r.ok for r in res.rows] == [True, True, False, False]
    assert [r.limit for r in res.rows] == [0.25] * 4
    assert [r.delta for r in res.rows][:2] == [0.25, -0.25]
    assert res.passed and res.failed_epochs == [2, 3]


def test_relative_tolerance_boundary_and_the_larger_limit_wins():
    # 0.0625 * |4.0| = 0.25 exactly, above the absolute 0.125
    res = check_trajectory({0: 4.25, 1: 3.75, 2: 4.25 + 1e-9}, {0: 4.0, 1: 4.0, 2: 4.0}, 0.125, rel_tolerance=0.0625,
                           max_outliers=1)
    assert [(r.limit, r.ok) for r in res.rows] == [(0.25, True), (0.25, True), (0.25, False)]
    assert res.rel_tolerance == 0.0625
    # the absolute tolerance is larger here: 0.5 > 0.0625 * 4
    res = check_trajectory({0: 4.5, 1: 4.5 + 1e-9}, {0: 4.0, 1: 4.0}, 0.5, rel_tolerance=0.0625, max_outliers=1)
    assert [(r.limit, r.ok) for r in res.rows] == [(0.5, True), (0.5, False)]
    # the relative limit scales with |expected|: 0.0625 * 2 = 0.125 < 0.2 at the second point
    res = check_trajectory({0: 4.2, 1: 2.2}, {0: 4.0, 1: 2.0}, 0.1, rel_tolerance=0.0625, max_outliers=1)
    assert [(r.limit, r.ok) for r in res.rows] == [(0.25, True), (0.125, False)]
    # |expected|: a negative expected value gives a positive limit
    res = check_trajectory({0: -3.75}, {0: -4.0}, 0.0, rel_tolerance=0.0625)
    assert res.rows[0].limit == 0.25 and res.passed


def test_defaults_are_absolute_only_and_no_outliers():
    res = check_trajectory({0: 4.2, 1: 3.0}, {0: 4.0, 1: 3.0}, 0.1)
    assert res.rows[0].limit == 0.1 and not res.rows[0].ok
    assert not res.passed and res.rel_tolerance == 0.0 and res.max_outliers == 0 and res.min_epochs is None


def test_max_outliers_boundary():
    exp = {e: 3.0 for e in range(5)}
    act = {**exp, 1: 3.5, 3: 2.5}
    assert check_trajectory(act, exp, 0.1, max_outliers=2).passed
    assert not check_trajectory(act, exp, 0.1, max_outliers=1).passed


def test_a_non_finite_loss_fails_whatever_the_outlier_allowance():
    exp = {0: 3.0, 1: 2.0}
    for bad in (-math.inf, math.inf, math.nan):
        res = check_trajectory({0: 3.0, 1: bad}, exp, 100.0, max_outliers=5)
        assert not res.passed and res.failed_epochs == [1] and res.nonfinite_epochs == [1]
        assert math.isnan(res.rows[1].delta) and res.rows[1].ok is False


def test_zero_tolerance_accepts_only_an_exact_match():
    assert check_trajectory({0: 3.0}, {0: 3.0}, 0).passed
    assert not check_trajectory({0: 3.000001}, {0: 3.0}, 0).passed


# --- the verdict line ----------------------------------------------------------------------------------------------

def test_verdict_pass_without_outliers():
    assert check_trajectory({0: 3.1, 1: 2.45}, {0: 3.0, 1: 2.5}, 0.25).verdict == \
        "PASS: 2/2 mini-epochs within +/-0.25; worst epoch 0 delta +0.1000"


def test_verdict_pass_with_outliers_allowed_and_fail():
    exp = {0: 3.0, 1: 2.5, 2: 2.0}
    act = {0: 3.0, 1: 2.0, 2: 2.0625}  # deltas 0, -0.5 (outside), +0.0625: the worst is the largest |delta|
    assert check_trajectory(act, exp, 0.125, max_outliers=1).verdict == (
        "PASS: 2/3 mini-epochs within +/-0.125, 1 outlier(s) allowed of 1; worst epoch 1 delta -0.5000")
    assert check_trajectory(act, exp, 0.125).verdict == (
        "FAIL: 1/3 mini-epochs outside +/-0.125 (at most 0 allowed); worst epoch 1 delta -0.5000")


def test_verdict_names_the_relative_tolerance():
    res = check_trajectory({0: 3.1}, {0: 3.0}, 0.05, rel_tolerance=0.01)
    assert res.verdict == ("FAIL: 1/1 mini-epochs outside +/-max(0.05, 0.01*|expected|) (at most 0 allowed); "
                           "worst epoch 0 delta +0.1000")


def test_verdict_for_non_finite_losses():
    res = check_trajectory({0: 3.0, 1: math.nan, 2: 2.0, 3: math.inf, 4: 5.0}, {e: 3.0 for e in range(5)}, 0.25)
    assert res.verdict == "FAIL: non-finite loss at epoch(s) 1,3 (1/5 mini-epochs within +/-0.25)"
    # every loss non-finite: no worst epoch to name, and check.json has no max_abs_delta
    res = check_trajectory({0: math.nan, 1: -math.inf}, {0: 3.0, 1: 2.0}, 0.25)
    assert res.verdict == "FAIL: non-finite loss at epoch(s) 0-1 (0/2 mini-epochs within +/-0.25)"
    assert res.to_dict()["max_abs_delta"] is None


def test_verdict_names_epochs_the_run_skipped_but_not_those_after_its_last():
    exp = {e: 3.0 for e in range(5)}
    res = check_trajectory({0: 3.0, 1: 3.0, 3: 3.0, 7: 3.0}, exp, 0.1)
    assert [r.epoch for r in res.rows] == [0, 1, 3]
    assert res.only_in_actual == [7] and res.only_in_expected == [2, 4]
    assert res.verdict == "PASS: 3/3 mini-epochs within +/-0.1; worst epoch 0 delta +0.0000; run lacks epoch(s) 2"
    res = check_trajectory({0: 3.0, 3: 3.0, 4: 3.0, 9: 3.0}, {e: 3.0 for e in range(10)}, 0.1)
    assert res.verdict.endswith("; run lacks epoch(s) 1-2,5-8")
    # a short run (stopped after epoch 2) lacks nothing before its last epoch
    res = check_trajectory({0: 3.0, 1: 3.0, 2: 3.0}, exp, 0.1)
    assert res.only_in_expected == [3, 4] and "lacks" not in res.verdict


# --- mismatched input: UserError with the reason -------------------------------------------------------------------

def test_messages_for_input_that_cannot_be_compared():
    assert refused(check_trajectory, {}, {0: 3.0}, 0.1) == "the run's log has no mini-epoch lines yet: nothing to check"
    assert refused(check_trajectory, {0: 3.0}, {}, 0.1) == "the expected log has no mini-epoch lines"
    assert refused(check_trajectory, {20: 3.0, 21: 2.9, 23: 2.8}, {0: 3.0, 1: 2.9, 2: 2.8, 5: 2.7}, 0.1) == (
        "no common mini-epochs: the run has epochs 20-21,23, the expected log has 0-2,5")
    assert refused(check_trajectory, {0: 3.0, 2: 2.0, 9: 1.0}, {0: 3.0, 1: 2.5, 2: 2.0}, 0.1, min_epochs=3) == (
        "only 2 mini-epoch(s) can be compared (0,2), but at least 3 are required")
    assert refused(check_trajectory, {e: 3.0 for e in range(4)}, {0: 3.0, 1: math.nan, 2: 3.0, 3: math.inf}, 0.1) == (
        "the expected log has a non-finite loss at epoch 1")


def test_min_epochs_boundary_and_non_finite_expected_outside_the_comparison():
    assert check_trajectory({0: 3.0, 2: 2.0}, {0: 3.0, 1: 2.5, 2: 2.0}, 0.1, min_epochs=2).passed
    assert check_trajectory({0: 3.0}, {0: 3.0}, 0.1, min_epochs=1).min_epochs == 1
    # a NaN the run never reached is not compared
    assert check_trajectory({0: 3.0}, {0: 3.0, 5: math.nan}, 0.1).passed


@pytest.mark.parametrize("kwargs, message", [
    (dict(tolerance=-0.1), "tolerance must be a finite number >= 0, got -0.1"),
    (dict(tolerance=True), "tolerance must be a finite number >= 0, got True"),
    (dict(tolerance="0.1"), "tolerance must be a finite number >= 0, got '0.1'"),
    (dict(rel_tolerance=math.inf), "rel_tolerance must be a finite number >= 0, got inf"),
    (dict(rel_tolerance=-0.5), "rel_tolerance must be a finite number >= 0, got -0.5"),
    (dict(rel_tolerance=False), "rel_tolerance must be a finite number >= 0, got False"),
    (dict(max_outliers=-1), "max_outliers must be an integer >= 0, got -1"),
    (dict(max_outliers=True), "max_outliers must be an integer >= 0, got True"),
    (dict(max_outliers=1.0), "max_outliers must be an integer >= 0, got 1.0"),
    (dict(min_epochs=0), "min_epochs must be an integer >= 1, got 0"),
    (dict(min_epochs=True), "min_epochs must be an integer >= 1, got True"),
    (dict(min_epochs=2.0), "min_epochs must be an integer >= 1, got 2.0"),
])
def test_invalid_arguments_are_named(kwargs, message):
    args = dict(tolerance=0.1) | kwargs
    assert refused(check_trajectory, {0: 3.0}, {0: 3.0}, **args) == message


def test_smallest_valid_arguments_are_accepted():
    res = check_trajectory({0: 3.0}, {0: 3.0}, tolerance=0, rel_tolerance=0, max_outliers=0, min_epochs=1)
    assert res.passed and res.tolerance == 0.0
    res = check_trajectory({0: 3.0}, {0: 3.0}, tolerance=0.5, rel_tolerance=0.5, max_outliers=1, min_epochs=1)
    assert res.passed and res.rows[0].limit == 1.5


# --- the table ------------------------------------------------------------------------------------------------------

def mixed_result() -> CheckResult:
    """At the limit, outside it, NaN, inf and -inf: every kind of row."""
    return check_trajectory({0: 3.25, 1: 2.125, 2: math.nan, 12: math.inf, 13: -math.inf},
                            {0: 3.0, 1: 2.5, 2: 2.0, 12: 1.5, 13: 1.25}, 0.25)


def test_format_table_exact_lines():
    assert format_table(mixed_result()).split("\n") == [
        TABLE_HEAD,
        "    0   3.000000   3.250000  +0.250000   0.2500  ok",
        "    1   2.500000   2.125000  -0.375000   0.2500  FAIL",
        "    2   2.000000        nan          -   0.2500  FAIL",
        "   12   1.500000        inf          -   0.2500  FAIL",
        "   13   1.250000       -inf          -   0.2500  FAIL",
    ]
    assert format_table(mixed_result(), "delta").split("\n")[0] == "epoch   expected     actual      delta    limit  ok"


# --- check.json ----------------------------------------------------------------------------------------------------

def test_to_dict_every_key_and_type():
    d = mixed_result().to_dict()
    assert d == {
        "schema": "rwkv7-check/1",
        "passed": False,
        "verdict": "FAIL: non-finite loss at epoch(s) 2,12-13 (1/5 mini-epochs within +/-0.25)",
        "tolerance": 0.25,
        "rel_tolerance": 0.0,
        "max_outliers": 0,
        "min_epochs": None,
        "compared_epochs": 5,
        "failed_epochs": [1, 2, 12, 13],
        "nonfinite_epochs": [2, 12, 13],
        "max_abs_delta": 0.375,
        "only_in_actual": [],
        "only_in_expected": [],
        "rows": [
            {"epoch": 0, "expected": 3.0, "actual": 3.25, "delta": 0.25, "limit": 0.25, "ok": True},
            {"epoch": 1, "expected": 2.5, "actual": 2.125, "delta": -0.375, "limit": 0.25, "ok": False},
            {"epoch": 2, "expected": 2.0, "actual": "nan", "delta": "nan", "limit": 0.25, "ok": False},
            {"epoch": 12, "expected": 1.5, "actual": "inf", "delta": "nan", "limit": 0.25, "ok": False},
            {"epoch": 13, "expected": 1.25, "actual": "-inf", "delta": "nan", "limit": 0.25, "ok": False},
        ],
    }
    assert type(d["passed"]) is bool and all(type(r["ok"]) is bool for r in d["rows"])
    assert all(type(r["epoch"]) is int for r in d["rows"]) and type(d["compared_epochs"]) is int
    assert all(type(r["expected"]) is float and type(r["limit"]) is float for r in d["rows"])


def test_to_dict_lists_min_epochs_and_the_epochs_not_compared():
    d = check_trajectory({0: 3.0, 1: 3.0, 3: 3.0, 7: 3.0}, {e: 3.0 for e in range(5)}, 0.1, min_epochs=3).to_dict()
    assert d["min_epochs"] == 3 and d["only_in_actual"] == [7] and d["only_in_expected"] == [2, 4]
    assert d["compared_epochs"] == 3 and d["failed_epochs"] == [] and d["nonfinite_epochs"] == []


def test_deltas_are_rounded_to_6_places():
    d = check_trajectory({0: 3.1234567, 1: 2.8765433}, {0: 3.0, 1: 3.0}, 0.2).to_dict()
    assert [r["delta"] for r in d["rows"]] == [0.123457, -0.123457]
    assert d["max_abs_delta"] == 0.123457
    assert [r["actual"] for r in d["rows"]] == [3.1234567, 2.8765433]  # the loss itself is not rounded


def test_to_json_exact_text():
    text = check_trajectory({0: 3.125}, {0: 3.0}, 0.25).to_json(log="/r/train_log.txt", expected="/e.log")
    assert text == """{
  "schema": "rwkv7-check/1",
  "passed": true,
  "verdict": "PASS: 1/1 mini-epochs within +/-0.25; worst epoch 0 delta +0.1250",
  "tolerance": 0.25,
  "rel_tolerance": 0.0,
  "max_outliers": 0,
  "min_epochs": null,
  "compared_epochs": 1,
  "failed_epochs": [],
  "nonfinite_epochs": [],
  "max_abs_delta": 0.125,
  "only_in_actual": [],
  "only_in_expected": [],
  "rows": [
    {
      "epoch": 0,
      "expected": 3.0,
      "actual": 3.125,
      "delta": 0.125,
      "limit": 0.25,
      "ok": true
    }
  ],
  "log": "/r/train_log.txt",
  "expected": "/e.log"
}
"""


def test_to_json_is_strict_json():
    text = mixed_result().to_json()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert [r["actual"] for r in data["rows"]][2:] == ["nan", "inf", "-inf"]
    with pytest.raises(ValueError):  # a NaN handed in as an extra key is refused, not written as NaN
        check_trajectory({0: 3.0}, {0: 3.0}, 0.1).to_json(note=math.nan)


# --- run_check -----------------------------------------------------------------------------------------------------

def test_run_check_prints_table_then_verdict_and_writes_beside_the_log(tmp_path, monkeypatch, capsys):
    logs(tmp_path)
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(traj, "plot_check", lambda *args: calls.append(args))
    stream = io.StringIO()  # encoding None: taken as UTF-8, so the header says Δ
    assert run_check("run/train_log.txt", "expected.log", 0.25, stream=stream) == 0
    assert stream.getvalue() == GOOD_TABLE + "\n" + GOOD_VERDICT + "\n"
    assert capsys.readouterr() == ("", "")
    run = tmp_path / "run"
    data = json.loads((run / "check.json").read_text())
    assert data["log"] == str(run / "train_log.txt") and data["expected"] == str(tmp_path / "expected.log")
    assert data["passed"] is True and data["verdict"] == GOOD_VERDICT
    # loss.png is drawn by default, beside the log, from both logs' records
    ((result, actual, expected, png),) = calls
    assert png == str(run / "loss.png")
    assert result.verdict == GOOD_VERDICT
    assert [(r.epoch, r.loss, r.lr) for r in actual] == [(0, 3.1, 6e-4), (1, 2.45, 5.9e-4), (2, 2.0, 5.8e-4)]
    assert [(r.epoch, r.loss, r.timestamp) for r in expected] == [
        (0, 3.0, "2026-01-02 03:04:05.678901"), (1, 2.5, "2026-01-02 03:08:35.123456"), (2, 2.0, "2026-01-02 03:13:05")]
    assert sorted(os.listdir(run)) == ["check.json", "train_log.txt"]


def test_run_check_fails_with_1_and_writes_ascii_to_an_ascii_stream(tmp_path, monkeypatch, capsys):
    log, exp = logs(tmp_path, run=BAD_RUN)
    monkeypatch.setattr(traj, "plot_check", no_plot)
    stream = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    out = tmp_path / "report"
    assert run_check(log, exp, 0.25, out_dir=out, plot=False, stream=stream) == 1
    stream.flush()
    assert stream.buffer.getvalue().decode("ascii") == BAD_TABLE_ASCII + "\n" + BAD_VERDICT + "\n"
    assert capsys.readouterr() == ("", "")
    assert os.listdir(out) == ["check.json"]
    assert json.loads((out / "check.json").read_text())["failed_epochs"] == [1]


@pytest.mark.parametrize("attrs, symbol", [
    ({}, "\u0394"),                          # no encoding attribute at all: UTF-8
    ({"encoding": None}, "\u0394"),
    ({"encoding": "utf-8"}, "\u0394"),
    ({"encoding": "cp1253"}, "\u0394"),      # Greek code page: has Δ
    ({"encoding": "ascii"}, "delta"),
    ({"encoding": "latin-1"}, "delta"),      # no Δ in latin-1
    ({"encoding": "no-such-codec"}, "delta"),
])
def test_delta_column_header_follows_the_streams_encoding(tmp_path, attrs, symbol):
    log, exp = logs(tmp_path)
    sink = Sink(**attrs)
    assert run_check(log, exp, 0.25, plot=False, stream=sink) == 0
    assert sink.text().split("\n")[0] == f"epoch   expected     actual  {symbol:>9}    limit  ok"


def test_run_check_prints_to_sys_stdout_by_default(tmp_path, monkeypatch):
    log, exp = logs(tmp_path)
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert run_check(log, exp, 0.25, plot=False) == 0
    stdout.flush()
    lines = stdout.buffer.getvalue().decode("ascii").split("\n")
    assert lines[0] == "epoch   expected     actual      delta    limit  ok"
    assert lines[-2:] == [GOOD_VERDICT, ""]


def test_a_plot_failure_is_a_warning_and_the_verdict_stands(tmp_path, monkeypatch, capsys):
    log, exp = logs(tmp_path)

    def broken(*args):
        raise RuntimeError("no backend")
    monkeypatch.setattr(traj, "plot_check", broken)
    stream = io.StringIO()
    assert run_check(log, exp, 0.25, stream=stream) == 0
    png = tmp_path / "run" / "loss.png"
    assert capsys.readouterr() == ("", f"warning: could not write {png}: RuntimeError: no backend\n")
    assert stream.getvalue().endswith("\n" + GOOD_VERDICT + "\n")
    assert (tmp_path / "run" / "check.json").is_file()


@pytest.mark.parametrize("which", ["log", "expected"])
def test_run_check_messages_for_a_log_without_epoch_lines(tmp_path, monkeypatch, which):
    log, exp = logs(tmp_path, **{"run" if which == "log" else "expected": HEADER + "None\n# nothing yet\n"})
    monkeypatch.setattr(traj, "plot_check", no_plot)
    stream = io.StringIO()
    message = refused(run_check, log, exp, 0.25, stream=stream)
    assert message == (f"{log}: no mini-epoch lines yet: nothing to check" if which == "log"
                       else f"{exp}: no mini-epoch lines in the expected log")
    assert stream.getvalue() == "" and not (tmp_path / "run" / "check.json").exists()


def test_run_check_messages_for_missing_and_short_logs(tmp_path):
    log, exp = logs(tmp_path)
    stream = io.StringIO()
    missing_log, missing_exp = tmp_path / "nope.txt", tmp_path / "nope.log"
    assert refused(run_check, missing_log, exp, stream=stream) == f"log file not found: {missing_log}"
    assert refused(run_check, log, missing_exp, stream=stream) == f"log file not found: {missing_exp}"
    assert refused(run_check, log, exp, 0.25, min_epochs=4, stream=stream) == (
        "only 3 mini-epoch(s) can be compared (0-2), but at least 4 are required")
    assert stream.getvalue() == "" and not (tmp_path / "run" / "check.json").exists()


def test_run_check_message_when_the_output_folder_cannot_be_made(tmp_path):
    log, exp = logs(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    stream = io.StringIO()
    assert refused(run_check, log, exp, 0.25, out_dir=blocker, plot=False, stream=stream) == (
        f"cannot create output directory {blocker}: File exists")
    assert stream.getvalue() == ""


def test_run_check_message_when_check_json_cannot_be_written(tmp_path, monkeypatch):
    log, exp = logs(tmp_path)
    monkeypatch.setattr(traj, "plot_check", no_plot)
    out = tmp_path / "report"
    (out / "check.json").mkdir(parents=True)  # a folder in the way
    stream = io.StringIO()
    assert refused(run_check, log, exp, 0.25, out_dir=out, stream=stream) == (
        f"cannot write {out / 'check.json'}: Is a directory")
    assert stream.getvalue() == GOOD_TABLE + "\n"  # the table, and no verdict
    assert os.listdir(out) == ["check.json"]  # no temp file left


# --- reading and writing log lines ----------------------------------------------------------------------------------

def test_skipped_lines():
    text = ("\n   \n# comment\n  # indented comment\nNEW RUN 2026-01-02-03-04-05\n{'a': 1}\n  {'b': 2}\n"
            "None\n  None  \n"
            "0 3.000000 20.0855 0.00060000 2026-01-02 03:04:05.678901 0\n")
    assert parse_log_text(text) == [EpochRecord(0, 3.0, 20.0855, 0.0006, "2026-01-02 03:04:05.678901", 0)]


@pytest.mark.parametrize("line", [
    "none",                                                            # only the exact `None` is skipped
    "0 3.000000 20.0855 0.00060000 2026-01-02 03:04:05.678901 -1",    # negative Lightning epoch
    "0 3.000000 20.0855 0.00060000 2026-01-02 03:04:05.678901 0 0",   # 8 fields
    "0 3.000000 20.0855 0.00060000 2026-01-02 03:04:05.6789012 0",    # 7 digits of microseconds
    "0 3.000000 20.0855 0.00060000 2026-01-02 3:04:05 0",             # one-digit hour
    "0 3.000000 20.0855 0.0006x 2026-01-02 03:04:05 0",               # bad lr
    "0 3.000000 20,0855 0.00060000 2026-01-02 03:04:05 0",            # bad ppl
])
def test_lines_that_are_not_epoch_lines(line):
    assert refused(parse_log_text, "# c\n" + line + "\n", "x.log") == (
        "x.log:2: not a train_log.txt epoch line (want 'EPOCH LOSS PPL LR YYYY-MM-DD HH:MM:SS.ffffff "
        f"LIGHTNING_EPOCH'): {line!r}")


def test_long_bad_lines_are_cut_to_80_characters():
    def shown(line):
        return refused(parse_log_text, line).split("LIGHTNING_EPOCH'): ", 1)[1]
    assert shown("y" * 80) == repr("y" * 80)
    assert shown("y" * 81) == repr("y" * 77 + "...")
    assert refused(parse_log_text, "garbage").startswith("<log>:1: ")


def test_timestamps_with_one_to_six_digits_of_microseconds():
    text = "".join(f"{e} 3.0 20.1 0.0006 2026-01-02 03:04:05{frac} {e}\n"
                   for e, frac in enumerate(["", ".1", ".123456"]))
    assert [r.timestamp for r in parse_log_text(text)] == [
        "2026-01-02 03:04:05", "2026-01-02 03:04:05.1", "2026-01-02 03:04:05.123456"]


def test_parse_log_messages(tmp_path):
    assert refused(parse_log, tmp_path / "nope") == f"log file not found: {tmp_path / 'nope'}"
    assert refused(parse_log, tmp_path) == f"log path is a directory, not a train_log.txt: {tmp_path}"
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"0 3.0 20.1 0.0006 2026-01-02 03:04:05 0\n\xff\xfe\n")
    assert refused(parse_log, binary) == f"{binary}: not a text train_log.txt (not valid UTF-8)"
    assert refused(parse_log, binary / "sub") == f"cannot read log {binary / 'sub'}: Not a directory"
    bad = tmp_path / "bad.txt"
    bad.write_text(HEADER + "0 3.0 20.1\n")
    assert refused(parse_log, bad).startswith(f"{bad}:4: not a train_log.txt epoch line")


def test_parse_log_reads_utf8_comments(tmp_path):
    p = tmp_path / "ref.log"
    p.write_bytes("# r\u00e9f\u00e9rence \u0394\n0 3.0 20.1 0.0006 2026-01-02 03:04:05 0\n".encode("utf-8"))
    assert [r.loss for r in parse_log(str(p))] == [3.0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(epoch=-1), "epoch must be an int >= 0, got -1"),
    (dict(epoch=True), "epoch must be an int >= 0, got True"),
    (dict(epoch=1.0), "epoch must be an int >= 0, got 1.0"),
    (dict(lightning_epoch=-1), "lightning_epoch must be an int >= 0, got -1"),
    (dict(lightning_epoch=False), "lightning_epoch must be an int >= 0, got False"),
    (dict(lightning_epoch=2.0), "lightning_epoch must be an int >= 0, got 2.0"),
])
def test_format_epoch_line_refuses_bad_epochs(kwargs, message):
    args = dict(epoch=0, loss=3.0, lr=6e-4, lightning_epoch=0) | kwargs
    with pytest.raises(ValueError) as excinfo:
        format_epoch_line(**args)
    assert str(excinfo.value) == message


def test_format_epoch_line_epoch_0_and_the_current_time():
    before = datetime.datetime.now()
    line = format_epoch_line(0, 3.0, 6e-4, 0)
    after = datetime.datetime.now()
    (rec,) = parse_log_text(line)
    assert (rec.epoch, rec.loss, rec.ppl, rec.lr, rec.lightning_epoch) == (0, 3.0, 20.0855, 6e-4, 0)
    assert before <= datetime.datetime.fromisoformat(rec.timestamp) <= after


# --- loss.png: the title's wrapping and what a relative band, an inf loss and a run without lr look like -------------

def test_title_is_wrapped_at_95_characters():
    words = " ".join(f"w{i:03d}" for i in range(30))  # 30 words of 4 letters: 149 characters
    assert traj._wrap(words, 95) == " ".join(f"w{i:03d}" for i in range(19)) + "\n" + " ".join(
        f"w{i:03d}" for i in range(19, 30))
    assert traj._wrap("", 95) == ""


def test_plot_relative_band_inf_gap_and_no_lr(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), real_close(fig)))

    def rec(epoch, loss):
        return EpochRecord(epoch, loss, math.inf, math.nan, "2026-01-02 03:04:05", epoch)
    expected = [rec(0, 4.0), rec(1, 2.0)]
    actual = [rec(0, 4.1), rec(1, math.inf)]
    result = check_trajectory({0: 4.1, 1: math.inf}, {0: 4.0, 1: 2.0}, 0.1, rel_tolerance=0.05)
    traj.plot_check(result, actual, expected, str(tmp_path / "loss.png"))
    (fig,) = figures
    ax, ax2 = fig.axes
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    ys = list(lines["actual loss"].get_ydata())
    assert ys[0] == 4.1 and math.isnan(ys[1])  # an inf loss is a gap in the curve, marked by a red line
    assert list(lines["non-finite loss"].get_xdata()) == [1, 1]
    (band,) = ax.collections
    assert {3.8, 4.2, 1.9, 2.1} <= {round(float(y), 6) for y in band.get_paths()[0].vertices[:, 1]}  # 0.05*4, 0.1
    assert ax2.get_lines() == [] and ax2.get_ylim() == pytest.approx((0, 1.08))  # no lr known: the axis from 0 to 1


@pytest.mark.parametrize("line", ["\u00b2 3.0 20.1 0.0006 2026-01-02 03:04:05 0",      # superscript two
                                  "\u0663 3.0 20.1 0.0006 2026-01-02 03:04:05 0",      # Arabic-Indic three
                                  "1 3.0 20.1 0.0006 2026-01-02 03:04:05 \u0663",
                                  "1 3.0 20.1 0.0006 2026-01-0\u0663 03:04:05 0"])
def test_only_ascii_digits_make_an_epoch_line(line):
    """str.isdigit() and \\d accept other scripts' digits; int() then crashed or read them as numbers."""
    with pytest.raises(UserError) as excinfo:
        parse_log_text(line, "train_log.txt")
    assert str(excinfo.value) == ("train_log.txt:1: not a train_log.txt epoch line (want 'EPOCH LOSS PPL LR "
                                  f"YYYY-MM-DD HH:MM:SS.ffffff LIGHTNING_EPOCH'): {line!r}")
