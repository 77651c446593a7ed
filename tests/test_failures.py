"""Every failure ends cleanly (issue 17): signals at start-up, a locked run folder, a full disk, unreadable files,
bad token files, resource limits, strict recipe values. Each test fails on the code before its fix.
"""
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rwkv7.data.binidx import DTYPE_CODES, write_binidx
from tests import tinyrun, zygote
from tests.test_bad_input import assert_clean_error, binidx, no_files

ROOT = Path(__file__).resolve().parent.parent
SHORT = [*tinyrun.SHORT, "--no-check"]
ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
ZIP_ERROR = "[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 2048"


def train_cmd(out, *extra):
    return tinyrun.train_cmd(out, "--no-check", *extra)


def start(cmd, fresh_interpreter=False):
    """A training process forked from the test zygote, or (fresh_interpreter) one that starts Python itself."""
    if fresh_interpreter:
        return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return zygote.Run(cmd, cwd=ROOT, env=ENV)


def wait_for(p, text, timeout=300):
    """Read p's stderr (where Lightning logs) until a line containing `text`; returns what was read."""
    seen, t0 = [], time.time()
    for line in p.stderr:
        seen.append(line)
        if text in line or time.time() - t0 > timeout:
            break
    return "".join(seen)


def finish(p, timeout=600):
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


# ---- 1. signals at start-up ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig,delay", [(signal.SIGINT, 0.4), (signal.SIGTERM, 1.2), (signal.SIGINT, 2.5)])
def test_signal_during_startup_exits_130_without_traceback(tmp_path, sig, delay):
    """While the CLI imports and sets up: 130 and one line (was: a KeyboardInterrupt traceback, or 143 silently)."""
    out = tmp_path / "run"
    p = start(train_cmd(out), fresh_interpreter=True)  # a signal while Python imports
    time.sleep(delay)
    p.send_signal(sig)
    code, stdout, stderr = finish(p)
    assert code == 130, (code, stdout[-2000:], stderr[-2000:])
    assert "Traceback" not in stdout + stderr
    assert [ln for ln in stderr.splitlines() if ln.strip()][-1].startswith("interrupted (")
    assert not (out / "rwkv-final.pth").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_after_lightning_starts_never_writes_an_untrained_final_model(tmp_path, sig):
    """Lightning 1.9.5 swallows KeyboardInterrupt in fit: the run used to go on to write rwkv-final.pth equal to
    rwkv-init.pth and exit 0. Now: 130, no final weights, and the same command trains the run to the end."""
    out = tmp_path / "run"
    p = start(train_cmd(out))
    wait_for(p, "HPU available")  # Lightning's start-up lines: the Trainer exists, training has not started
    p.send_signal(sig)
    code, stdout, stderr = finish(p)
    assert code == 130, (code, stdout[-2000:], stderr[-2000:])
    assert "Traceback" not in stdout + stderr and "Detected KeyboardInterrupt" not in stdout + stderr
    assert not (out / "rwkv-final.pth").exists()
    p = zygote.run(train_cmd(out), cwd=ROOT, env=ENV)
    assert p.returncode == 0, p.stderr[-2000:]
    final = torch.load(out / "rwkv-final.pth", weights_only=True)
    init = torch.load(out / "rwkv-init.pth", weights_only=True)
    assert not torch.equal(final["emb.weight"], init["emb.weight"])


def test_interrupt_inside_an_atomic_write_removes_the_temp_file(tmp_path):
    code = f"""if True:
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from rwkv7 import signals
        from rwkv7.fsutil import atomic_write
        signals.install()
        def write(f):
            f.write(b"x" * 100)
            os.kill(os.getpid(), signal.SIGTERM)
            f.write(b"never")
        atomic_write({str(tmp_path / "w.bin")!r}, write)
    """
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 130 and p.stderr.startswith("interrupted (SIGTERM)"), p.stderr
    assert list(tmp_path.iterdir()) == []


# ---- 2. one run per run folder -------------------------------------------------------------------------------------

def test_second_run_into_a_locked_folder_exits_2_naming_the_holder(cli, tmp_path, small_binidx):
    from rwkv7.runlock import RunLock

    out = tmp_path / "run"
    holder = RunLock(out).acquire()  # flock is per open file: this process's own CLI run conflicts with it
    try:
        line = assert_clean_error(cli("train", "--out", out, *SHORT, "--set", *binidx(small_binidx)),
                                  "in use", f"pid {os.getpid()}", socket.gethostname())
        assert "another --out" in line
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing else written
    finally:
        holder.release()
    assert not (out / ".lock").exists()


def test_two_concurrent_trainings_into_one_folder(tmp_path):
    """Both used to succeed and every log line ended up twice."""
    out = tmp_path / "run"
    first = start(train_cmd(out))
    wait_for(first, "HPU available")  # it holds the lock now; stopped, it keeps holding it while the second starts
    first.send_signal(signal.SIGSTOP)
    try:
        code, stdout, stderr = finish(start(train_cmd(out)))
    finally:
        first.send_signal(signal.SIGCONT)
    assert code == 2 and f"pid {first.pid}" in stderr and "Traceback" not in stderr, stderr
    code, stdout, stderr = finish(first)
    assert code == 0, stderr[-2000:]
    epochs = [ln.split()[0] for ln in (out / "train_log.txt").read_text().splitlines()
              if not ln.startswith(("NEW RUN", "{"))]
    assert epochs == ["0", "1", "2", "3"]
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    from rwkv7.runlock import RunLock

    out = tmp_path / "run"
    code = ("import sys, os, signal; sys.path.insert(0, %r); from rwkv7.runlock import RunLock; "
            "RunLock(%r).acquire(); os.kill(os.getpid(), signal.SIGKILL)" % (str(ROOT), str(out)))
    p = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert (out / ".lock").is_file()  # left behind by the dead process
    lock = RunLock(out).acquire()  # the kernel dropped the dead process's lock: taken over
    try:
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    finally:
        lock.release()


# ---- 3. a full disk ------------------------------------------------------------------------------------------------

def _zip_writer_fails_on_call(monkeypatch, module, n):
    """torch.save as called from `module` raises the zip writer's RuntimeError on its n-th call."""
    real, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == n:
            f.write(b"partial")
            raise RuntimeError(ZIP_ERROR)
        return real(obj, f, *a, **k)

    monkeypatch.setattr(module.torch, "save", save)


def test_zip_writer_failure_mid_run_is_exit_2_and_keeps_the_last_checkpoint(cli, tmp_path, monkeypatch):
    """Was: exit 1 with the RuntimeError traceback and an empty ckpt/.tmp-step-... folder."""
    from rwkv7 import checkpoint

    out = tmp_path / "run"
    # torch.save calls in checkpoint.py: rwkv-init, state.pt (step 5), rwkv-0, then state.pt of step 10 fails
    _zip_writer_fails_on_call(monkeypatch, checkpoint, 4)
    line = assert_clean_error(cli("train", "--out", out, *SHORT), "checkpoint of step 10", "free", "needed",
                              "kept step-00000005", str(out / "ckpt"))
    assert "resume" in line
    assert [d.name for d in (out / "ckpt").iterdir()] == ["step-00000005"]
    assert not list(out.rglob("*.tmp")) and not (out / "rwkv-final.pth").exists()


def test_full_disk_writing_weights_mid_run_is_exit_2(cli, tmp_path, monkeypatch):
    from rwkv7 import fsutil

    real, calls = fsutil._atomic_write, []

    def fail_second_weights(path, write, mode):
        if path.name.startswith("rwkv-") and path.name != "rwkv-init.pth":
            calls.append(path)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, write, mode)

    monkeypatch.setattr(fsutil, "_atomic_write", fail_second_weights)
    out = tmp_path / "run"
    assert_clean_error(cli("train", "--out", out, *SHORT), "rwkv-1.pth", "No space left", "free")
    assert (out / "rwkv-0.pth").is_file() and not (out / "rwkv-1.pth").exists()
    assert [d.name for d in (out / "ckpt").iterdir()] == ["step-00000005", "step-00000010"]


def test_init_on_a_full_disk_is_exit_2(cli, tmp_path, monkeypatch):
    """Was: only OSError was caught, so the zip writer's RuntimeError was a traceback."""
    from rwkv7 import checkpoint

    _zip_writer_fails_on_call(monkeypatch, checkpoint, 1)
    out = tmp_path / "w" / "rwkv-init.pth"
    assert_clean_error(cli("init", "--out", out), "rwkv-init.pth", "disk is full", "free")
    assert list((tmp_path / "w").iterdir()) == []


@pytest.fixture
def small_fs(tmp_path):
    """A real small filesystem (tmpfs with a size limit) where this machine allows mounting (root); else skip
    (the simulated tests above cover the same paths everywhere)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small filesystem needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=14m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("this machine does not allow mounting a tmpfs")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_real_small_filesystem_fills_mid_run_then_resumes_after_freeing_space(small_fs):
    """14 MiB: the run starts (one checkpoint fits), a later full checkpoint does not. Exit 2 with one line, the
    newest complete checkpoint kept, no temp files; after the filesystem grows, the same command resumes.
    The model is tiny's own size (the size the 14 MiB were chosen for), not the smaller one of tinyrun."""
    out = small_fs / "run"
    full_size = ["--set", "model.n_embd=128"]
    code, stdout, stderr = finish(start(train_cmd(out, *full_size)))
    assert code == 2, (stdout[-2000:], stderr[-2000:])
    errors = [ln for ln in stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and errors[0].startswith("error:") and "Traceback" not in stderr, stderr
    assert "needed" in errors[0] and "free" in errors[0] and "kept step-" in errors[0]
    kept = [d.name for d in (out / "ckpt").iterdir()]
    assert kept and all(d.startswith("step-") for d in kept) and not list(out.rglob("*.tmp"))
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
    code, stdout, stderr = finish(start(train_cmd(out, *full_size)))
    assert code == 0 and "resuming" in stdout, stderr[-2000:]
    assert (out / "rwkv-final.pth").is_file()


def test_init_on_a_real_full_filesystem(small_fs, cli):
    (small_fs / "filler").write_bytes(b"\0" * (13 << 20))
    assert_clean_error(cli("init", "--out", small_fs / "rwkv-init.pth"), "rwkv-init.pth", "free")
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler"]


# ---- 4. unreadable files -------------------------------------------------------------------------------------------

def _unreadable(monkeypatch, path: Path):
    """Reading `path` raises PermissionError (as chmod 000 does for a non-root user; root reads anything)."""
    real_open = open
    target = str(path)

    def guarded(file, *a, **k):
        if str(file) == target:
            raise PermissionError(errno.EACCES, "Permission denied", target)
        return real_open(file, *a, **k)

    monkeypatch.setattr("builtins.open", guarded)
    real_read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: guarded(self, "rb").read() if str(self) == target
                        else real_read(self))
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: guarded(self).read())


def test_unreadable_recipe_is_exit_2(cli, tmp_path, monkeypatch):
    recipe = tmp_path / "mine.toml"
    recipe.write_text((ROOT / "recipes" / "tiny.toml").read_text())
    _unreadable(monkeypatch, recipe)
    assert_clean_error(cli("train", "--recipe", recipe, "--out", tmp_path / "run"), "cannot read", "mine.toml",
                       "Permission denied")
    assert no_files(tmp_path / "run")


@pytest.mark.parametrize("command", ["train", "doctor", "prepare"])
def test_unreadable_idx_is_exit_2(cli, tmp_path, monkeypatch, small_binidx, command):
    prefix = tmp_path / "d"
    shutil.copy(f"{small_binidx}.bin", f"{prefix}.bin")
    shutil.copy(f"{small_binidx}.idx", f"{prefix}.idx")
    _unreadable(monkeypatch, Path(f"{prefix}.idx"))
    args = {"train": ["train", "--out", tmp_path / "run", *SHORT, "--set", *binidx(prefix)],
            "doctor": ["doctor", "--out", tmp_path / "run", "--set", *binidx(prefix)],
            "prepare": ["prepare", "--check", prefix, "--vocab-size", "512"]}[command]
    assert_clean_error(cli(*args), "d.idx", "Permission denied") if command != "doctor" else \
        assert_clean_error(cli(*args), "doctor", "data")  # doctor: a fail line (was: warn), exit 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without read permission")
def test_chmod_000_recipe_is_exit_2(cli, tmp_path):
    recipe = tmp_path / "mine.toml"
    recipe.write_text((ROOT / "recipes" / "tiny.toml").read_text())
    recipe.chmod(0)
    assert_clean_error(cli("init", "--recipe", recipe, "--out", tmp_path / "i.pth"), "cannot read", "mine.toml")


# ---- 5. token ids --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,ids,words", [
    (np.float32, [1.0, 2.5, 3.0], ["float32", "integer"]),
    (np.int8, [1, -5, 3], ["negative token id (-5)"]),
    (np.int64, [1, 2, -7], ["negative token id (-7)"]),
])
def test_bad_token_files_are_refused_by_check_and_train(cli, tmp_path, dtype, ids, words):
    prefix = tmp_path / "bad"
    rng = np.random.default_rng(0)
    docs = [np.asarray(ids, dtype)] + [rng.integers(1, 100, 600).astype(dtype) for _ in range(40)]
    # write_binidx refuses such ids: write a valid pair of the same item size, then put the bad tokens and dtype in
    same_size = {1: np.uint8, 4: np.int32, 8: np.int64}[np.dtype(dtype).itemsize]
    write_binidx(prefix, [np.abs(d).astype(same_size) for d in docs], dtype=same_size)
    Path(f"{prefix}.bin").write_bytes(np.concatenate(docs).astype(dtype).tobytes())
    idx = bytearray(Path(f"{prefix}.idx").read_bytes())
    idx[17] = DTYPE_CODES[np.dtype(dtype)]  # the dtype code follows the 9-byte magic and the 8-byte version
    Path(f"{prefix}.idx").write_bytes(bytes(idx))
    assert_clean_error(cli("prepare", "--check", prefix, "--vocab-size", "512"), *words)
    out = tmp_path / "run"
    assert_clean_error(cli("train", "--out", out, *SHORT, "--set", *binidx(prefix)), *words)
    assert no_files(out)


# ---- 6. SIGTERM during prepare -------------------------------------------------------------------------------------

@pytest.mark.parametrize("group", [False, True])
def test_sigterm_during_prepare_exits_130_and_leaves_no_temp_files(tmp_path, group):
    """Was: 143, a BrokenPipeError traceback from the workers, and tens of MB of *.PID.tmp files."""
    src = tmp_path / "in.jsonl"
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    with open(src, "w") as f:
        for _ in range(60000):
            f.write(json.dumps({"text": " ".join(rng.choice(words, 60))}) + "\n")
    cmd = [sys.executable, str(ROOT / "entrypoint.py"), "prepare", "--input", str(src), "--out",
           str(tmp_path / "out" / "data"), "--workers", "2"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    deadline = time.time() + 120
    while not list((tmp_path / "out").glob("*.tmp")) and time.time() < deadline:  # writing has begun
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGTERM) if group else p.send_signal(signal.SIGTERM)
    code, stdout, stderr = finish(p)
    assert code == 130, (code, stderr[-3000:])
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    assert list((tmp_path / "out").iterdir()) == []


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
@pytest.mark.parametrize("dead_worker", [0, 1])
def test_prepare_pool_workers_never_outlive_their_parent(dead_worker):
    """Was: after SIGTERM to the process group, now and then one tokenizer worker lived on, keeping the parent's
    stdout open, so the caller of `prepare` waited forever (multiprocessing.Pool's workers shared a task queue
    lock, and a waiter for a lock whose holder had died never saw the parent go). Killing one idle worker, then
    the parent (SIGKILL, no cleanup), must leave no worker behind."""
    code = f"""if True:
        import os, signal, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from rwkv7.data import prepare
        pool = prepare.WorkerPool(2, prepare.EncodeConfig())
        time.sleep(1.0)  # both workers are waiting for a task
        pids = [p.pid for p in pool.procs]
        print(" ".join(map(str, pids)), flush=True)
        os.kill(pids[{dead_worker}], signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    """
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    workers = [int(pid) for pid in p.stdout.readline().split()]
    assert p.wait(timeout=60) == -signal.SIGKILL and len(workers) == 2
    p.stdout.close()  # (a worker that lives on holds this pipe open: reading it to the end would wait forever)
    deadline = time.time() + 10
    while any(_alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.05)
    left = [pid for pid in workers if _alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"workers {left} outlived their parent"


# ---- 7. resource limits --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting,words", [
    ("train.cpu_threads=100000", ["train.cpu_threads", "CPUs"]),
    ("train.num_workers=100000", ["train.num_workers", "CPUs"]),
    ("model.n_embd=1048576", ["model.n_embd", "too large"]),
    ("train.micro_bsz=99999999999999999999", ["train.micro_bsz", "out of range"]),
])
def test_resource_settings_out_of_range_are_exit_2(cli, tmp_path, setting, words):
    assert_clean_error(cli("train", "--out", tmp_path / "run", "--set", setting), *words)
    assert no_files(tmp_path / "run")


@pytest.mark.parametrize("exc", [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: "
                                                           "can't allocate memory: you tried to allocate 1 bytes")])
def test_out_of_memory_is_exit_2_with_what_to_change(cli, tmp_path, monkeypatch, exc):
    import rwkv7.init

    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(rwkv7.init, "init_model", boom)
    assert_clean_error(cli("init", "--out", tmp_path / "i.pth"), "out of memory", "micro_bsz", "grad_cp=1")


def test_profiling_a_run_shorter_than_the_profile_window_does_not_crash(tmp_path):
    """RWKV7_PROFILE_STEP=1 on a 3-step run: the profiler was never closed and the process segfaulted at exit."""
    out = tmp_path / "run"
    cmd = train_cmd(out, "--set", "train.epoch_steps=3", "train.epoch_count=1")
    p = subprocess.run(cmd, cwd=ROOT, env={**ENV, "RWKV7_PROFILE_STEP": "1"}, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "self_cpu_time_total" in (out / "profile.txt").read_text() or (out / "profile.txt").stat().st_size


# ---- 8. smaller ones -----------------------------------------------------------------------------------------------

def test_string_where_an_int_is_meant_in_a_toml_recipe(cli, tmp_path):
    recipe = tmp_path / "mine.toml"
    recipe.write_text((ROOT / "recipes" / "tiny.toml").read_text().replace("ctx_len = 64", 'ctx_len = "64"'))
    assert_clean_error(cli("init", "--recipe", recipe, "--out", tmp_path / "i.pth"), "train.ctx_len must be a int",
                       "without quotes")


@pytest.mark.parametrize("setting", ["train.lr_init=nan", "train.lr_final=inf", "check.tolerance=nan",
                                     "train.seed=-1", "train.beta1=nan", "train.warmup_steps=-3"])
def test_non_finite_or_out_of_range_numbers(cli, setting):
    assert_clean_error(cli("init", "--set", setting), setting.split("=")[0])


def test_vocab_size_1_is_refused_before_any_data_is_written(cli, tmp_path):
    data = tmp_path / "data"
    assert_clean_error(cli("train", "--out", tmp_path / "run", "--set", "model.vocab_size=1", f"data.path={data}"),
                       "model.vocab_size", ">= 2")
    assert not data.exists()


def test_missing_expected_log_is_exit_2_before_training(cli, tmp_path):
    out = tmp_path / "run"
    assert_clean_error(cli("train", "--out", out, "--set", "check.expected=/nonexistent/expected.log"),
                       "check.expected", "--no-check")
    assert not out.exists()


def test_fresh_removes_the_old_runs_weights(cli, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "rwkv-7.pth").write_bytes(b"old")
    (out / "check.json").write_text("{}")
    code, _, err = cli("train", "--out", out, "--fresh", *SHORT, "--set", "train.epoch_count=1")
    assert code == 0, err
    assert not (out / "rwkv-7.pth").exists() and not (out / "check.json").exists()
    assert (out / "rwkv-0.pth").is_file() and (out / "rwkv-final.pth").is_file()


def test_prepare_out_under_a_regular_file(cli, tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("hello world")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_clean_error(cli("prepare", "--input", src, "--out", blocker / "x", "--workers", "1"), "not a folder",
                       str(blocker))
