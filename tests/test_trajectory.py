"""The loss-trajectory check (rwkv7.trajectory, `rwkv7 check`)."""
from __future__ import annotations

import datetime
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import rwkv7.cli as cli
from rwkv7.errors import UserError
from rwkv7.trajectory import (EpochRecord, check_trajectory, format_epoch_line, parse_log, parse_log_text,
                              run_check)

REPO = Path(__file__).resolve().parents[1]
EXPECTED_01B = REPO / "recipes" / "expected" / "0.1b-minipile.log"
OFFICIAL_LOSSES = [4.875856, 4.028621, 3.801625, 3.663070, 3.578974, 3.510906,
                   3.462345, 3.412196, 3.376724, 3.336911, 3.313411, 3.295895]

HEADER = ("NEW RUN 2025-04-24-02-19-07\n"
          "{'load_model': '0', 'wandb': 'Test', 'proj_dir': 'out/L12-D768-x070', 'ctx_len': 512, 'lr_init': 0.0006}\n"
          "{'train_batch_size': 16, 'train_micro_batch_size_per_gpu': 16, 'zero_optimization': {'stage': 2}}\n")


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """rwkv7.cli.main with only the check command registered (the other commands may need heavy imports)."""
    monkeypatch.setattr(cli, "COMMANDS", ["check"])

    def run(*argv):
        rc = cli.main(["check", *map(str, argv)])
        out, err = capsys.readouterr()
        return rc, out, err
    return run


def write_log(path: Path, losses: dict[int, float], header: str = HEADER, lr: float = 6e-4) -> Path:
    t0 = datetime.datetime(2026, 1, 2, 3, 4, 5, 678901)
    with open(path, "w") as f:
        f.write(header)
        for e, loss in losses.items():
            f.write(format_epoch_line(e, loss, lr * (1 - 0.01 * e), e, t0 + datetime.timedelta(minutes=4.5 * e)))
    return path


def official(shift=None) -> dict[int, float]:
    shift = shift or {}
    return {e: v + shift.get(e, 0.0) for e, v in enumerate(OFFICIAL_LOSSES)}


# --- parsing -----------------------------------------------------------------------------------------------------

def test_parse_official_lines_with_headers(tmp_path):
    p = tmp_path / "train_log.txt"
    p.write_text(HEADER + "\n# a comment\n"
                 "0 4.875856 131.0863 0.00059975 2025-04-24 02:23:42.481256 0\n"
                 "1 4.028621 56.1834 0.00059899 2025-04-24 02:28:16 1\n")  # str(datetime) drops .000000
    recs = parse_log(p)
    assert recs == [
        EpochRecord(0, 4.875856, 131.0863, 0.00059975, "2025-04-24 02:23:42.481256", 0),
        EpochRecord(1, 4.028621, 56.1834, 0.00059899, "2025-04-24 02:28:16", 1),
    ]


def test_last_occurrence_of_an_epoch_wins(tmp_path):
    text = (HEADER
            + "0 5.000000 148.4132 0.00059975 2025-04-24 02:23:42.481256 0\n"
            + "1 4.100000 60.3403 0.00059899 2025-04-24 02:28:16.674463 1\n"
            + "2 3.900000 49.4024 0.00059773 2025-04-24 02:32:51.059568 2\n"
            + HEADER  # resumed from the epoch-1 checkpoint: epoch 2 is written again
            + "2 3.800000 44.7012 0.00059773 2025-04-24 05:00:00.000001 0\n"
            + "3 3.700000 40.4473 0.00059597 2025-04-24 05:04:30.000001 1\n")
    recs = parse_log_text(text, "log")
    assert [r.epoch for r in recs] == [0, 1, 2, 3]
    assert recs[2].loss == 3.8 and recs[2].lightning_epoch == 0 and recs[2].timestamp.startswith("2025-04-24 05")


def test_out_of_order_epochs_come_back_sorted():
    text = ("3 3.7 40.4 0.0005 2025-04-24 05:04:30.1 1\n"
            "1 4.1 60.3 0.0006 2025-04-24 02:28:16.6 1\n")
    assert [r.epoch for r in parse_log_text(text)] == [1, 3]


@pytest.mark.parametrize("bad", [
    "0 4.875856 131.0863 0.00059975 2025-04-24 02:23:42.481256",       # no lightning epoch
    "0 4.87x856 131.0863 0.00059975 2025-04-24 02:23:42.481256 0",     # bad float
    "0 4.875856 131.0863 0.00059975 2025-04-24T02:23:42.481256 0 0",   # ISO timestamp: wrong field count
    "-1 4.875856 131.0863 0.00059975 2025-04-24 02:23:42.481256 0",    # negative epoch
    "0 4.875856 131.0863 0.00059975 24/04/2025 02:23:42 0",            # not str(datetime)
    "epoch loss ppl lr",
])
def test_malformed_line_is_a_user_error_naming_file_and_line(bad):
    text = HEADER + "0 4.875856 131.0863 0.00059975 2025-04-24 02:23:42.481256 0\n" + bad + "\n"
    with pytest.raises(UserError, match=r"^mylog\.txt:5: "):
        parse_log_text(text, "mylog.txt")


def test_format_epoch_line_is_the_official_format():
    now = datetime.datetime(2025, 4, 24, 2, 23, 42, 481256)
    # the first line of the official README, rebuilt from its numbers
    assert (format_epoch_line(0, 4.875856, 0.00059975, 0, now)
            == "0 4.875856 131.0863 0.00059975 2025-04-24 02:23:42.481256 0\n")
    line = format_epoch_line(11, 3.2958951234, 0.000564408, 3)  # README epoch 11: lr 0.00056441
    assert line.endswith(" 3\n") and line.startswith("11 3.295895 27.0016 0.00056441 ")


def test_format_epoch_line_round_trips_through_parse_log(tmp_path):
    t = datetime.datetime(2026, 3, 1, 12, 0, 0, 5)
    values = [(0, 10.987654321, 6e-6, 0), (7, 3.5, 5.9e-4, 2), (8, 2.0000004, 1.23456789e-5, 3)]
    p = tmp_path / "train_log.txt"
    p.write_text(HEADER + "".join(format_epoch_line(e, l, lr, le, t) for e, l, lr, le in values))
    recs = parse_log(p)
    assert [(r.epoch, r.lightning_epoch, r.timestamp) for r in recs] == [(e, le, str(t)) for e, _, _, le in values]
    for r, (_, loss, lr, _) in zip(recs, values):
        assert r.loss == pytest.approx(loss, abs=5e-7)
        assert r.lr == pytest.approx(lr, abs=5e-9)
        assert r.ppl == pytest.approx(math.exp(r.loss), rel=1e-5)
    # writing a parsed record again gives the same line
    again = format_epoch_line(recs[1].epoch, recs[1].loss, recs[1].lr, recs[1].lightning_epoch, t)
    assert again == format_epoch_line(7, 3.5, 5.9e-4, 2, t)


def test_format_epoch_line_survives_huge_and_nan_loss():
    t = datetime.datetime(2026, 1, 1)
    assert parse_log_text(format_epoch_line(0, 1000.0, 1e-4, 0, t))[0].ppl == math.inf
    assert math.isnan(parse_log_text(format_epoch_line(1, math.nan, 1e-4, 1, t))[0].loss)


# --- comparison ----------------------------------------------------------------------------------------------------

def test_rel_tolerance_widens_the_band():
    exp = official()
    act = official({5: 0.1})  # 0.1 off at loss ~3.51
    assert not check_trajectory(act, exp, 0.02).passed
    assert check_trajectory(act, exp, 0.02, rel_tolerance=0.05).passed       # limit 0.176
    res = check_trajectory(act, exp, 0.02, rel_tolerance=0.01)              # limit 0.0351
    assert not res.passed and res.failed_epochs == [5]
    assert res.rows[5].limit == pytest.approx(0.01 * 3.510906)
    assert res.rows[0].limit == pytest.approx(0.02 * 0 + 0.04875856)        # rel wins at 4.88 too
    # a point exactly at the limit is ok
    assert check_trajectory({0: 3.25}, {0: 3.0}, 0.25).passed


def test_max_outliers():
    act = official({2: 0.2, 9: -0.3})
    assert check_trajectory(act, official(), 0.05, max_outliers=1).passed is False
    res = check_trajectory(act, official(), 0.05, max_outliers=2)
    assert res.passed and res.failed_epochs == [2, 9] and res.verdict.startswith("PASS")


def test_nan_and_inf_always_fail_even_with_outliers_allowed():
    for bad in (math.nan, math.inf):
        act = official()
        act[4] = bad
        res = check_trajectory(act, official(), 10.0, max_outliers=12)
        assert not res.passed and res.nonfinite_epochs == [4] and res.verdict.startswith("FAIL: non-finite")


@pytest.mark.parametrize("kwargs", [dict(tolerance=-0.1), dict(tolerance=math.nan), dict(rel_tolerance=-1.0),
                                    dict(max_outliers=-1), dict(min_epochs=0)])
def test_invalid_check_arguments(kwargs):
    args = dict(tolerance=0.05) | kwargs
    with pytest.raises(UserError):
        check_trajectory(official(), official(), **args)


def test_no_common_epochs_is_a_user_error():
    with pytest.raises(UserError, match="no common mini-epochs"):
        check_trajectory({20: 3.0, 21: 2.9}, official(), 0.05)


# --- CLI -----------------------------------------------------------------------------------------------------------

def test_check_is_registered():
    assert "check" in cli.COMMANDS


def test_passing_run(tmp_path, run_cli):
    log = write_log(tmp_path / "train_log.txt", official({0: 0.03, 3: -0.049, 11: 0.01}))
    rc, out, err = run_cli("--log", log, "--expected", EXPECTED_01B, "--tolerance", "0.05")
    assert rc == 0, err
    assert "tolerance: 0.05" in out
    lines = out.strip().splitlines()
    assert lines[-1].startswith("PASS: 12/12 mini-epochs within +/-0.05")
    assert sum(1 for l in lines if l.split()[:1] and l.split()[0].isdigit()) == 12  # one table row per epoch
    assert (tmp_path / "check.json").is_file() and (tmp_path / "loss.png").is_file()


def test_default_tolerance_is_printed(tmp_path, run_cli):
    log = write_log(tmp_path / "train_log.txt", official({1: 0.03}))  # outside 0.02
    rc, out, _ = run_cli("--log", log, "--expected", EXPECTED_01B, "--no-plot")
    assert rc == 1 and "tolerance: 0.02 (default" in out


def test_perturbed_run_fails(tmp_path, run_cli):
    log = write_log(tmp_path / "train_log.txt", official({7: 0.06}))
    rc, out, err = run_cli("--log", log, "--expected", EXPECTED_01B, "--tolerance", "0.05")
    assert rc == 1 and err == ""
    assert out.strip().splitlines()[-1].startswith("FAIL: 1/12 mini-epochs outside +/-0.05")
    row7 = next(l for l in out.splitlines() if l.split()[:1] == ["7"])
    assert row7.split()[-1] == "FAIL" and "+0.060000" in row7
    # the same log passes once one outlier is allowed
    rc, _, _ = run_cli("--log", log, "--expected", EXPECTED_01B, "--tolerance", "0.05", "--max-outliers", "1")
    assert rc == 0


def test_nan_run_fails_through_cli(tmp_path, run_cli):
    losses = official()
    losses[3] = math.nan
    log = write_log(tmp_path / "train_log.txt", losses)
    rc, out, _ = run_cli("--log", log, "--expected", EXPECTED_01B, "--tolerance", "1", "--max-outliers", "5")
    assert rc == 1 and "non-finite loss at epoch(s) 3" in out
    data = json.loads((tmp_path / "check.json").read_text(),
                      parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["rows"][3]["actual"] == "nan" and data["nonfinite_epochs"] == [3] and data["passed"] is False
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_missing_epoch_and_short_run(tmp_path, run_cli):
    losses = official()
    del losses[4]
    for e in (9, 10, 11):  # a short run: stopped after epoch 8
        del losses[e]
    log = write_log(tmp_path / "train_log.txt", losses)
    rc, out, err = run_cli("--log", log, "--expected", EXPECTED_01B, "--tolerance", "0.05", "--epochs", "8")
    assert rc == 0, err
    data = json.loads((tmp_path / "check.json").read_text())
    assert [r["epoch"] for r in data["rows"]] == [0, 1, 2, 3, 5, 6, 7, 8]
    assert data["only_in_expected"] == [4, 9, 10, 11] and data["only_in_actual"] == []
    assert "run lacks epoch(s) 4" in data["verdict"]
    # demanding more compared epochs than there are is mismatched input, not a failed check
    rc, out, err = run_cli("--log", log, "--expected", EXPECTED_01B, "--tolerance", "0.05", "--epochs", "9")
    assert rc == 2 and err.startswith("error: only 8 mini-epoch(s)") and err.count("\n") == 1


def test_malformed_line_exits_2_with_one_error_line(tmp_path, run_cli):
    log = write_log(tmp_path / "train_log.txt", official())
    with open(log, "a") as f:
        f.write("12 3.28")  # truncated by a crash
    rc, out, err = run_cli("--log", log, "--expected", EXPECTED_01B)
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert f"{log}:16:" in err  # 3 header lines + 12 epochs + the bad one
    assert not (tmp_path / "check.json").exists()


@pytest.mark.parametrize("case", ["missing", "empty", "headers_only", "no_common", "binary"])
def test_unreadable_or_mismatched_input_exits_2(tmp_path, run_cli, case):
    log = tmp_path / "train_log.txt"
    if case == "empty":
        log.write_text("")
    elif case == "headers_only":
        log.write_text(HEADER)
    elif case == "no_common":
        write_log(log, {30: 2.9, 31: 2.8})
    elif case == "binary":
        log.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    rc, out, err = run_cli("--log", log, "--expected", EXPECTED_01B)
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_missing_expected_file_exits_2(tmp_path, run_cli):
    log = write_log(tmp_path / "train_log.txt", official())
    rc, _, err = run_cli("--log", log, "--expected", tmp_path / "nope.log")
    assert rc == 2 and "nope.log" in err


def test_bad_option_values_exit_2(tmp_path, run_cli):
    log = write_log(tmp_path / "train_log.txt", official())
    for opt in (["--tolerance", "-1"], ["--tolerance", "nan"], ["--max-outliers", "x"], ["--epochs", "0"]):
        rc, _, _ = run_cli("--log", log, "--expected", EXPECTED_01B, *opt)
        assert rc == 2, opt


def test_check_json_content(tmp_path, run_cli):
    log = write_log(tmp_path / "train_log.txt", official({0: 0.045, 2: 0.25, 5: -0.01}))
    out_dir = tmp_path / "report"
    rc, _, _ = run_cli("--log", log, "--expected", EXPECTED_01B, "--tolerance", "0.04", "--rel-tolerance", "0.01",
                       "--out-dir", out_dir)
    assert rc == 1
    data = json.loads((out_dir / "check.json").read_text())
    assert data["passed"] is False and data["verdict"].startswith("FAIL")
    assert data["tolerance"] == 0.04 and data["rel_tolerance"] == 0.01 and data["max_outliers"] == 0
    assert data["compared_epochs"] == 12 and data["failed_epochs"] == [2]
    assert data["max_abs_delta"] == pytest.approx(0.25)
    assert data["log"] == str(log.resolve()) and data["expected"] == str(EXPECTED_01B.resolve())
    r0, r2, r5 = data["rows"][0], data["rows"][2], data["rows"][5]
    assert r2 == {"epoch": 2, "expected": 3.801625, "actual": pytest.approx(4.051625), "delta": pytest.approx(0.25),
                  "limit": 0.04, "ok": False}
    assert r0["ok"] is True and r0["limit"] == pytest.approx(0.04875856)  # 0.045 > 0.04, but rel gives 0.0488
    assert r5["ok"] is True and r5["delta"] == pytest.approx(-0.01) and r5["limit"] == 0.04
    assert not (tmp_path / "check.json").exists()  # --out-dir moved the files
    assert sorted(os.listdir(out_dir)) == ["check.json", "loss.png"]  # no temp files left behind


def test_loss_png_is_a_valid_png_and_no_plot_skips_it(tmp_path, run_cli):
    log = write_log(tmp_path / "train_log.txt", official())
    rc, _, _ = run_cli("--log", log, "--expected", EXPECTED_01B)
    assert rc == 0
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 600 and height >= 400
    assert png.rstrip(b"\x00")[-8:-4] == b"IEND"

    other = tmp_path / "other"
    other.mkdir()
    log2 = write_log(other / "train_log.txt", official())
    rc, _, _ = run_cli("--log", log2, "--expected", EXPECTED_01B, "--no-plot")
    assert rc == 0 and (other / "check.json").exists() and not (other / "loss.png").exists()


def test_loss_png_draws_the_runs_the_band_the_failures_and_the_lr(tmp_path, monkeypatch):
    """What loss.png shows, read off the figure before it is closed: both loss curves with their data, the band
    expected +/- limit, a red x on each finite failed epoch, a red line at each non-finite one, both lr curves on a
    second axis from 0, the verdict's head as the title (red on FAIL)."""
    import matplotlib.pyplot as plt

    from rwkv7.trajectory import plot_check

    figures = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), real_close(fig)))
    def rec(epoch, loss, lr):
        return EpochRecord(epoch, loss, math.exp(min(loss, 50)), lr, "2026-01-02 03:04:05", epoch)

    expected = [rec(e, v, 1e-3 * (e + 1)) for e, v in enumerate([4.0, 3.5, 3.2, 3.0])]
    actual = [rec(0, 4.01, 1e-3), rec(1, 3.9, 2e-3), rec(2, math.nan, 3e-3)]
    result = check_trajectory({r.epoch: r.loss for r in actual}, {r.epoch: r.loss for r in expected}, 0.05)
    path = tmp_path / "loss.png"
    plot_check(result, actual, expected, str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"
    (fig,) = figures
    ax, ax2 = fig.axes
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(lines["expected loss"].get_xdata()) == [0, 1, 2, 3]
    assert list(lines["expected loss"].get_ydata()) == [4.0, 3.5, 3.2, 3.0]
    assert list(lines["actual loss"].get_xdata()) == [0, 1, 2]
    assert list(lines["actual loss"].get_ydata())[:2] == [4.01, 3.9] and math.isnan(lines["actual loss"].get_ydata()[2])
    assert list(lines["outside tolerance"].get_xdata()) == [1] and list(lines["outside tolerance"].get_ydata()) == [3.9]
    assert list(lines["non-finite loss"].get_xdata()) == [2, 2]  # a vertical line at epoch 2
    (band,) = ax.collections
    ys = sorted({round(float(y), 6) for y in band.get_paths()[0].vertices[:, 1]})
    assert {3.95, 4.05, 2.95, 3.05} <= set(ys)  # expected +/- 0.05 at both ends
    lr = {ln.get_label(): ln for ln in ax2.get_lines()}
    assert list(lr["expected lr (right axis)"].get_ydata()) == pytest.approx([1e-3, 2e-3, 3e-3, 4e-3])
    assert list(lr["actual lr (right axis)"].get_xdata()) == [0, 1, 2]
    assert ax2.get_ylim()[0] == 0 and ax2.get_ylim()[1] == pytest.approx(4e-3 * 1.08)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:3] == ["tolerance band", "expected loss", "actual loss"] and "actual lr (right axis)" in legend
    assert fig._suptitle.get_text() == "FAIL" and fig._suptitle.get_color() == "red"
    assert ax.get_title().startswith("non-finite loss at epoch(s) 2")
    assert ax.get_zorder() > ax2.get_zorder()  # the loss curves are drawn over the lr lines


def test_failed_epochs_are_named_as_ranges():
    from rwkv7.trajectory import _ranges

    assert _ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert _ranges([3]) == "3" and _ranges([]) == ""
    assert _ranges([1, 3, 4, 5, 6, 9]) == "1,3-6,9"
    exp = {e: 3.0 for e in range(10)}
    act = {**exp, 0: math.nan, 1: math.inf, 2: math.nan, 6: math.nan}
    assert check_trajectory(act, exp, 0.05).verdict.startswith("FAIL: non-finite loss at epoch(s) 0-2,6 (6/10")


def test_run_check_api_returns_exit_code(tmp_path, capsys):
    log = write_log(tmp_path / "train_log.txt", official({0: 0.5}))
    assert run_check(log, EXPECTED_01B, 0.05, plot=False) == 1
    assert run_check(log, EXPECTED_01B, 0.05, max_outliers=1, plot=False) == 0
    assert "PASS" in capsys.readouterr().out


def test_importing_trajectory_does_not_import_matplotlib():
    code = "import sys, rwkv7.trajectory; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


# --- the shipped expected curve ------------------------------------------------------------------------------------

def test_expected_01b_minipile_matches_the_official_readme():
    recs = parse_log(EXPECTED_01B)
    assert [r.epoch for r in recs] == list(range(12)) == [r.lightning_epoch for r in recs]
    assert [r.loss for r in recs] == OFFICIAL_LOSSES
    assert [r.lr for r in recs][0:2] == [0.00059975, 0.00059899] and recs[11].lr == 0.00056441
    for r in recs:
        assert f"{math.exp(r.loss):.4f}" == f"{r.ppl:.4f}"
    # the lr column against our schedule: test_alignment.py::test_lr_matches_official_minipile_log
    assert recs[0].timestamp == "2025-04-24 02:23:42.481256"
    assert EXPECTED_01B.read_text().startswith("#")
