"""bench/vs_official.py (the side-by-side benchmark against the official trainer): its timing and trajectory maths,
its input checks, and bench/official_launcher.py driving a stand-in official folder (the real one needs a GPU)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import vs_official as vs  # noqa: E402


def rows_at(times, **extra):
    return [{"step": i + 1, "time": t, **extra} for i, t in enumerate(times)]


def test_window_means_use_full_windows_only():
    losses = [float(i) for i in range(1, 121)]  # 2 full windows of 50, 20 left over
    assert vs.window_means(losses) == [25.5, 75.5]
    assert vs.window_means(losses[:49]) == []


def test_warmup_is_20_steps_or_a_third():
    assert vs.warmup_steps(400) == 20
    assert vs.warmup_steps(40) == 13
    assert vs.warmup_steps(3) == 1


def test_timing_is_the_median_of_steady_step_durations():
    # 40 steps: 13 warm-up steps of 2 s (compile), then 0.1 s steps, with one slow outlier
    durations = [2.0] * 13 + [0.1] * 26
    durations[20] = 0.5
    times = [100.0]
    for d in durations:
        times.append(times[-1] + d)
    rows = rows_at(times, peak_mem_gib=1.0)
    rows[5]["peak_mem_gib"] = 1.5
    t = vs.timing(rows)
    assert t["steps"] == 40 and t["timed_steps"] == 27
    assert t["step_ms"] == pytest.approx(100.0)
    assert t["tokens_per_s"] == 81920  # 8192 tokens per step / 0.1 s
    assert t["mean_step_ms"] > 100.0  # the mean sees the outlier (and the last warm-up step), the median does not
    assert t["peak_mem_gib"] == 1.5


def test_timing_can_leave_out_the_last_readback():
    times = [float(i) for i in range(30)] + [29.01]  # our last two rows come back together at the end
    assert vs.timing(rows_at(times))["step_ms"] == pytest.approx(1000.0)
    assert vs.timing(rows_at(times), drop_last=True)["timed_steps"] == len(times) - 1 - vs.warmup_steps(len(times))
    assert min(vs.step_durations(times, 10, drop_last=True)) == pytest.approx(1.0)
    assert min(vs.step_durations(times, 10)) == pytest.approx(0.01)


def test_timing_needs_steady_steps():
    with pytest.raises(ValueError):
        vs.timing(rows_at([1.0]))


def test_trajectory_windows_and_limit():
    official = [5.0 - 0.005 * i for i in range(400)]
    ours = list(official)
    for i in range(100, 150):  # the third window sits 0.016 higher: above the 0.015 limit
        ours[i] += 0.016
    ours[7] += 0.2  # one step far off: per-step max, hardly moves its window (0.2 / 50 = 0.004)
    t = vs.trajectory(official, ours)
    assert t["steps"] == 400 and len(t["official_window_means"]) == 8
    assert t["max_abs_delta"] == pytest.approx(0.2) and t["at_step"] == 8 and t["first_differing_step"] == 8
    assert t["window_abs_deltas"][0] == pytest.approx(0.004)
    assert t["max_window_delta"] == pytest.approx(0.016)
    assert t["within_limit"] is False
    for i in range(100, 150):
        ours[i] -= 0.002  # 0.014 now
    assert vs.trajectory(official, ours)["within_limit"] is True


def test_trajectory_compares_the_common_steps_and_flags_non_finite():
    official = [3.0] * 100
    ours = [3.0] * 60
    t = vs.trajectory(official, ours)
    assert t["steps"] == 60 and t["first_differing_step"] is None and len(t["window_abs_deltas"]) == 1
    ours[30] = math.nan
    t = vs.trajectory(official, ours)
    assert t["non_finite_steps"] == 1 and t["within_limit"] is False and t["max_abs_delta"] == 0.0
    assert vs.trajectory([3.0] * 10, [3.0] * 10)["within_limit"] is None  # no full window: no verdict


def test_ratio_and_mfu_per_token():
    assert vs.ratio({"tokens_per_s": 120_000}, {"tokens_per_s": 40_000}) == 3.0
    assert vs.ratio({"error": "exit 1"}, {"tokens_per_s": 40_000}) is None
    rows = [{"mfu": 0.1, "tokens_per_s": 50_000.0}, {"mfu": 0.2, "tokens_per_s": 100_000.0}, {"tokens_per_s": 0.0}]
    assert vs.mfu_per_token_s(rows) == pytest.approx(2e-6)
    assert vs.mfu_per_token_s([{"tokens_per_s": 5.0}]) is None


def test_table_shows_ratio_memory_and_mfu():
    off = {"steps": 400, "step_ms": 200.0, "tokens_per_s": 40_960, "peak_mem_gib": 4.74}
    ours = {"steps": 400, "step_ms": 50.0, "tokens_per_s": 163_840, "peak_mem_gib": 3.7, "mfu_per_token_s": 2e-6}
    report = {"shapes": {"0.1b": {"official": off, "ours": {"default": ours, "train.compile=1": {"error": "exit 1"}}}}}
    lines = vs.table(report).splitlines()
    assert "4.00x" in lines[2] and "3.70" in lines[2] and "32.8%" in lines[2]
    assert "1.00x" in lines[1] and "8.2%" in lines[1]  # the official side at the same FLOPs per token
    assert lines[3].endswith("exit 1")


def test_official_and_our_commands_agree_on_shape_and_data_order():
    args = vs.official_args("1.5b", "/d/p", Path("/w"), stage=3)
    flag = {args[i]: args[i + 1] for i in range(0, len(args) - 1) if args[i].startswith("--")}
    assert (flag["--n_layer"], flag["--n_embd"], flag["--micro_bsz"], flag["--ctx_len"]) == ("24", "2048", "16", "512")
    assert flag["--magic_prime"] == "18671" and flag["--grad_cp"] == "1" and flag["--kernel"] == "@rwkv3"
    sets = vs.ours_sets("1.5b", ["train.compile=1"])
    assert "model.n_embd=2048" in sets and "data.magic_prime=18671" in sets and sets[-1] == "train.compile=1"
    stage1 = vs.official_args("0.1b", "/d/p", Path("/w"), stage=1)
    assert stage1[stage1.index("--random_seed") + 1] == "42" and "--load_model" not in stage1


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(official="nowhere"), "train_temp"),
    (lambda a: a.update(data="nodata"), "nodata.bin not found"),
    (lambda a: a.update(shapes="0.1b,7b"), "unknown 7b"),
    (lambda a: a.update(ours=["train.compile=1,train.grad_cp"]), "'train.grad_cp' is not SECTION.KEY=VALUE"),
    (lambda a: a.update(steps="2"), "--steps must be at least 3"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, change, message):
    official = tmp_path / "train_temp"
    (official / "src").mkdir(parents=True)
    (official / "train.py").write_text("")
    (official / "src" / "model.py").write_text("")
    for ext in (".bin", ".idx"):
        (tmp_path / f"data{ext}").write_bytes(b"")
    a = {"official": str(official), "data": str(tmp_path / "data"), "shapes": "0.1b", "ours": [], "steps": "400"}
    change(a)
    if not Path(a["data"]).is_absolute():
        a["data"] = str(tmp_path / a["data"])
    argv = ["--official", a["official"], "--data", a["data"], "--shapes", a["shapes"], "--steps", a["steps"],
            "--out", str(tmp_path / "out"), "--dry-run"] + [x for s in a["ours"] for x in ("--ours-set", s)]
    assert vs.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


# --------------------------------------------------------------------- the launcher on a stand-in official folder

def launcher(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "official_launcher.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def fake_official(tmp_path):
    """The shape of train_temp that the launcher relies on: train.py runs a per-step callback from src/trainer.py
    whose own on_train_batch_end sets trainer.my_loss; src/model.py JIT-builds extensions at import."""
    root = tmp_path / "train_temp"
    (root / "src").mkdir(parents=True)
    (root / "src" / "__init__.py").write_text("")
    (root / "src" / "trainer.py").write_text(textwrap.dedent("""
        class train_callback:
            def __init__(self, args):
                self.args = args
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                trainer.my_loss = 10.0 - 0.5 * batch_idx
    """))
    (root / "train.py").write_text(textwrap.dedent("""
        import os, sys
        if __name__ == "__main__":
            argv = sys.argv[1:]
            opt = dict(zip(argv[::2], argv[1::2])) if "--proj_dir" in argv else {}  # the official flags, or: STEPS
            if opt.get("--train_stage") == "1":  # stage 1 writes the initial weights and exits
                open(os.path.join(opt["--proj_dir"], "rwkv-init.pth"), "wb").write(b"init")
                sys.exit(0)
            from src.trainer import train_callback
            class Trainer:
                is_global_zero = True
                my_lr = 1e-3
            cb, trainer = train_callback(argv), Trainer()
            for i in range(int(argv[0]) if not opt else 1000):
                cb.on_train_batch_end(trainer, None, None, None, i)
            print("finished by itself")
    """))
    (root / "src" / "model.py").write_text(textwrap.dedent("""
        import os
        import torch
        from torch.utils.cpp_extension import load
        if "@rwkv3" in os.environ["RWKV_KERNEL"]:
            load(name="wkv_v3", sources=["cuda/v3.cu", "cuda/v3.cpp"], verbose=True,
                 extra_cuda_cflags=[f"-D_N_={os.environ['RWKV_HEAD_SIZE']}"])
        else:
            load(name="wkv", sources=["cuda/w.cu"])
        CE = load("ce", ["cuda/ce.cpp", "cuda/ce.cu"], extra_cflags=["-O3"])
        torch.library.register_autograd("ce::forward", lambda ctx, g: g)
        @torch.jit.script
        def f(x):
            return torch.ops.ce.forward(x)
    """))
    return root


def test_launcher_records_each_step_after_the_official_callback_and_stops(fake_official, tmp_path):
    record = tmp_path / "rec.json"
    p = launcher(fake_official, "train", "--record", str(record), "--steps", "5", "--", "100")
    assert p.returncode == 0, p.stderr
    assert "finished by itself" not in p.stdout  # stopped after 5 of 100 steps
    rec = json.loads(record.read_text())
    assert [r["step"] for r in rec["rows"]] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in rec["rows"]] == [10.0, 9.5, 9.0, 8.5, 8.0]  # set by the official callback first
    times = [r["time"] for r in rec["rows"]]
    assert times == sorted(times) and rec["process_start"] <= times[0] and rec["args"] == ["100"]


def test_launcher_fails_when_train_py_stops_early(fake_official, tmp_path):
    p = launcher(fake_official, "train", "--record", str(tmp_path / "rec.json"), "--steps", "5", "--", "3")
    assert p.returncode != 0 and "after 3 of 5 steps" in p.stderr
    assert not (tmp_path / "rec.json").exists()


def test_launcher_records_the_extension_builds_of_the_import(fake_official, tmp_path):
    out = tmp_path / "ext.json"
    p = launcher(fake_official, "extensions", "--json", str(out), "--kernel", "@rwkv3", "--head-size", "64")
    assert p.returncode == 0, p.stderr
    assert json.loads(out.read_text()) == [
        {"name": "wkv_v3", "sources": ["cuda/v3.cu", "cuda/v3.cpp"], "extra_cuda_cflags": ["-D_N_=64"]},
        {"name": "ce", "sources": ["cuda/ce.cpp", "cuda/ce.cu"], "extra_cflags": ["-O3"]}]
    p = launcher(fake_official, "extensions", "--json", str(out), "--kernel", "")
    assert p.returncode == 0 and json.loads(out.read_text())[0]["name"] == "wkv"


def test_launcher_refuses_a_folder_that_is_not_train_temp(tmp_path):
    p = launcher(tmp_path, "extensions", "--json", str(tmp_path / "x.json"))
    assert p.returncode == 2 and "not RWKV-LM's RWKV-v7/train_temp" in p.stderr


def test_one_failing_side_does_not_stop_the_benchmark(fake_official, tmp_path, capsys, monkeypatch):
    """End to end on the stand-in: the official side is timed, ours fails (as `entrypoint.py train` does without a
    GPU: exit 2); the run still ends with the JSON and the table, the failure named in both."""
    calls = []

    def failing_train(out, *sets, **kwargs):
        calls.append((sets, kwargs))
        return subprocess.CompletedProcess([], 2, "", "error: no CUDA GPU\n")

    monkeypatch.setattr(vs, "train", failing_train)
    for ext in (".bin", ".idx"):
        (tmp_path / f"data{ext}").write_bytes(b"")
    out, work = tmp_path / "out", tmp_path / "work"
    rc = vs.main(["--official", str(fake_official), "--data", str(tmp_path / "data"), "--shapes", "0.1b",
                  "--steps", "4", "--skip-build", "--out", str(out), "--work", str(work)])
    assert rc == 0
    report = json.loads((out / "vs_official.json").read_text())
    off = report["shapes"]["0.1b"]["official"]
    assert off["steps"] == 4 and off["timed_steps"] == 3 and off["losses"] == [10.0, 9.5, 9.0, 8.5]
    assert off["tokens_per_s"] > 0
    assert report["init"]["0.1b"]["sha256"] == hashlib.sha256(b"init").hexdigest()
    ours = report["shapes"]["0.1b"]["ours"]["default"]
    assert ours["error"] == "exit 2" and "no CUDA GPU" in ours["log_tail"]
    assert calls[0][1]["load_model"] == str(work / "0.1b" / "init" / "rwkv-init.pth") and calls[0][1]["steps"] == 4
    assert report["shapes"]["0.1b"]["trajectory"] == {}
    last = capsys.readouterr().out.rstrip().splitlines()
    assert "official train_temp" in last[-2] and last[-1].endswith("exit 2")


def test_stage_1_weights_are_made_once_and_then_reused(fake_official, tmp_path):
    work = tmp_path / "work"
    env = dict(os.environ)
    first = vs.init_weights(fake_official, env, ["0.1b", "0.4b"], "/nowhere", work, timeout=60)
    assert {k: (r["rc"], r["sha256"]) for k, r in first.items()} == {
        k: (0, hashlib.sha256(b"init").hexdigest()) for k in ("0.1b", "0.4b")}
    (work / "0.4b" / "init" / "rwkv-init.pth").write_bytes(b"changed")  # a reused file is not rebuilt
    again = vs.init_weights(fake_official, env, ["0.4b"], "/nowhere", work, timeout=60)
    assert again["0.4b"]["reused"] and again["0.4b"]["sha256"] == first["0.4b"]["sha256"]
    assert (work / "0.4b" / "init" / "rwkv-init.pth").read_bytes() == b"changed"
