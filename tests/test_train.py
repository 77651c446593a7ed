"""End-to-end CPU training: the tiny recipe trains, resumes exactly after SIGKILL, and guards against NaN/disk faults."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkv7.trajectory import parse_log

from tests import zygote
from tests.tinyrun import ROOT, SHORT, SMALLER, run_train, train_cmd



def losses(out):
    return {r.epoch: r.loss for r in parse_log(Path(out) / "train_log.txt")}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    run_train(out, "--no-check")
    return out


def test_short_run_writes_official_artifacts(reference_run):
    out = reference_run
    log = losses(out)
    assert sorted(log) == [0, 1, 2, 3]
    assert log[3] < log[0] - 0.5, log  # the loss clearly falls
    lines = (out / "train_log.txt").read_text().splitlines()
    assert lines[0].startswith("NEW RUN ")
    for name in ("rwkv-init.pth", "rwkv-0.pth", "rwkv-3.pth", "rwkv-final.pth", "metrics.jsonl", "run.json"):
        assert (out / name).is_file(), name
    sd = torch.load(out / "rwkv-final.pth", weights_only=True)
    assert sd["emb.weight"].dtype == torch.bfloat16 and "blocks.1.att.r_k" in sd
    metrics = (out / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 20


def test_finished_run_is_not_retrained(reference_run):
    before = (reference_run / "train_log.txt").read_text()
    p = run_train(reference_run, "--no-check")
    assert "nothing to do" in p.stdout
    assert (reference_run / "train_log.txt").read_text() == before


def test_run_ending_mid_mini_epoch_is_finished_on_rerun(tmp_path):
    """The official stop (my_exit_tokens) rarely falls on a mini-epoch boundary: the last step is checkpointed too,
    so running the same command again finds nothing to do instead of retraining from the last boundary."""
    out = tmp_path / "run"
    args = ["--no-check", "--set", "train.epoch_count=0", "data.my_exit_tokens=5632"]  # 22 steps of 256 tokens
    run_train(out, *args)
    assert len(json.loads((out / "run.json").read_text())) and sorted(losses(out)) == [0, 1, 2, 3]
    before = (out / "train_log.txt").read_text()
    p = run_train(out, *args)
    assert "already trained 22 of 22 steps" in p.stdout
    assert (out / "train_log.txt").read_text() == before


@pytest.mark.parametrize("fault", ["kill@7", "kill-ckpt@10", "kill@13"])
def test_sigkill_then_resume_gives_the_same_log(reference_run, tmp_path, fault):
    out = tmp_path / "run"
    p = run_train(out, "--no-check", env={"RWKV7_TEST_FAULT": fault}, check=False)
    assert p.returncode == -signal.SIGKILL
    assert not (out / "rwkv-final.pth").exists()
    p = run_train(out, "--no-check")
    assert "resuming" in p.stdout
    ref, got = losses(reference_run), losses(out)
    assert sorted(got) == sorted(ref)
    for e in ref:
        assert abs(got[e] - ref[e]) <= 1e-6, (e, got[e], ref[e])
    epoch_lines = [ln for ln in (out / "train_log.txt").read_text().splitlines() if not ln.startswith(("NEW", "{"))]
    assert len(epoch_lines) == 4  # no duplicated or torn lines
    assert not list((out / "ckpt").glob(".tmp-*"))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))  # rows after the checkpoint were dropped and redone, not duplicated


@pytest.mark.parametrize("fault", ["kill@7:SIGINT", "kill-ckpt@10:SIGTERM"])
def test_signal_mid_step_or_mid_checkpoint_stops_with_130_and_resumes_exactly(reference_run, tmp_path, fault):
    """Ctrl-C mid-run / SIGTERM while a checkpoint is written: the step finishes, a checkpoint is written, exit 130,
    no final weights; the same command then resumes to the reference log."""
    out = tmp_path / "run"
    p = run_train(out, "--no-check", env={"RWKV7_TEST_FAULT": fault}, check=False)
    assert p.returncode == 130, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Traceback" not in p.stdout + p.stderr and "stopped by a signal" in p.stdout
    assert not (out / "rwkv-final.pth").exists()
    assert not list((out / "ckpt").glob(".tmp-*"))
    p = run_train(out, "--no-check")
    assert "resuming" in p.stdout
    ref, got = losses(reference_run), losses(out)
    assert sorted(got) == sorted(ref) and all(abs(got[e] - ref[e]) <= 1e-6 for e in ref), (got, ref)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))


def test_final_weights_are_written_when_a_finished_run_lacks_them(reference_run, tmp_path):
    """Stopped after the last checkpoint but before rwkv-final.pth: the rerun writes it from that checkpoint."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    (out / "rwkv-final.pth").unlink()
    p = run_train(out, "--no-check")
    assert "nothing to do" in p.stdout
    a = torch.load(out / "rwkv-final.pth", weights_only=True)
    b = torch.load(reference_run / "rwkv-final.pth", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    p = run_train(out, "--no-check", env={"RWKV7_TEST_FAULT": "nan@7"}, check=False)
    assert p.returncode == 3, p.stdout + p.stderr
    assert "diverged at step 7" in p.stdout
    assert [d.name for d in (out / "ckpt").iterdir()] == ["step-00000005"]


def test_nan_step_can_be_skipped(reference_run, tmp_path):
    out = tmp_path / "run"
    p = run_train(out, "--no-check", "--set", "train.max_bad_steps=1", env={"RWKV7_TEST_FAULT": "nan@7"})
    assert "skipped" in p.stdout
    got, ref = losses(out), losses(reference_run)
    assert sorted(got) == [0, 1, 2, 3]
    assert abs(got[0] - ref[0]) <= 1e-6  # before the bad step: the same run
    assert all(abs(got[e] - ref[e]) < 0.15 for e in (1, 2, 3))  # one update fewer (early, when it matters most)
    assert got[3] < got[0] - 1.0  # and it goes on learning
    weights = torch.load(out / "rwkv-final.pth", weights_only=True)
    assert all(torch.isfinite(t.float()).all() for t in weights.values())


def test_changed_recipe_is_refused_on_resume(reference_run, tmp_path):
    out = tmp_path / "run"
    run_train(out, "--no-check", env={"RWKV7_TEST_FAULT": "kill@7"}, check=False)
    p = run_train(out, "--no-check", "--set", "train.lr_init=1e-3", check=False)
    assert p.returncode == 2
    assert "different recipe" in p.stderr and "Traceback" not in p.stderr


def test_disk_full_during_checkpoint_keeps_previous(tmp_path, monkeypatch, cli):
    """ENOSPC while the second checkpoint is written: clear error, the first checkpoint stays whole."""
    import errno

    from rwkv7 import checkpoint

    real, calls = checkpoint.save_plain_state, []

    def failing(tmp, model, optimizer):
        calls.append(tmp)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tmp, model, optimizer)

    monkeypatch.setattr(checkpoint, "save_plain_state", failing)
    out = tmp_path / "run"
    code, _, err = cli("train", "--recipe", "tiny", "--out", out, *SHORT, "--no-check")
    assert code == 2
    assert "No space left" in err and "kept step-00000005" in err
    assert [d.name for d in (out / "ckpt").iterdir()] == ["step-00000005"]
    assert (out / "ckpt" / "step-00000005" / "state.pt").stat().st_size > 0


def test_wandb_logs_every_step_when_asked(tmp_path):
    """--wandb PROJECT with WANDB_MODE=offline writes a local wandb run holding the per-step metrics."""
    out = tmp_path / "run"
    run_train(out, "--no-check", "--set", "train.epoch_count=1", "--wandb", "rwkv7-test",
              env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "no wandb event file"


def test_load_model_starts_from_given_weights(reference_run, tmp_path):
    """--load-model: a fresh run (new optimizer, schedule from step 0) that starts from trained weights."""
    out = tmp_path / "run"
    run_train(out, "--no-check", "--set", "train.epoch_count=1", "--load-model",
              str(reference_run / "rwkv-final.pth"))
    assert losses(out)[0] < losses(reference_run)[0] - 0.5
    assert not (out / "rwkv-init.pth").exists()


def test_two_processes_match_one_at_the_same_global_batch(tmp_path):
    """devices=2 x micro_bsz 4 (DDP over gloo on the CPU) trains like devices=1 x micro_bsz 8: the ranks interleave
    the official global sample order, gradients average, and the mini-epoch loss is the mean over ranks."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--no-check", "--set", "train.epoch_count=2"]
    run_train(one, *common, "train.micro_bsz=8")
    run_train(two, *common, "train.micro_bsz=4", "train.devices=2")
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [0, 1]
    for e in a:
        assert abs(a[e] - b[e]) < 1e-4, (e, a[e], b[e])
    # metrics.jsonl holds the global batch's loss every step (the mean over ranks), not rank 0's half batch
    per_step = [[json.loads(ln)["loss"] for ln in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
    assert len(per_step[0]) == len(per_step[1]) == 10
    assert max(abs(x - y) for x, y in zip(*per_step)) < 1e-4, per_step
    header_lines = [ln for ln in (two / "train_log.txt").read_text().splitlines() if ln.startswith("NEW RUN")]
    assert len(header_lines) == 1  # only rank 0 writes the run folder


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_match_one_process(tmp_path):
    """The plain multi-host launch (scripts/multihost.sh: MASTER_ADDR/MASTER_PORT/NODE_RANK, one command per host),
    as two "nodes" of one CPU process each on 127.0.0.1: same losses as one process at the same global batch."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--no-check", "--set", "train.epoch_count=2"]
    run_train(one, *common, "train.micro_bsz=8")
    env = {**os.environ, "WANDB_MODE": "disabled", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHON": sys.executable, "RECIPE": "tiny", "NODES": "2", "DEVICES": "1"}
    cmd = ["bash", str(ROOT / "scripts" / "multihost.sh"), "--out", str(two), *SHORT, *common, "train.micro_bsz=4"]
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env={**env, "NODE_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outputs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [0, 1]
    for e in a:
        assert abs(a[e] - b[e]) < 1e-4, (e, a[e], b[e])


def test_resume_on_a_different_number_of_processes(reference_run, tmp_path):
    """A run checkpointed by one process resumes on two (same global batch) and ends with the same losses."""
    out = tmp_path / "run"
    run_train(out, "--no-check", env={"RWKV7_TEST_FAULT": "kill@10"}, check=False)
    p = run_train(out, "--no-check", "--set", "train.micro_bsz=4", "train.devices=2")
    assert "resuming" in p.stdout
    ref, got = losses(reference_run), losses(out)
    assert sorted(got) == sorted(ref)
    for e in ref:
        assert abs(got[e] - ref[e]) < 1e-4, (e, got[e], ref[e])


def test_deepspeed_checkpoint_on_another_gpu_count_is_refused_clearly(tmp_path):
    import json as _json

    from rwkv7.errors import UserError
    from rwkv7.recipe import load_recipe
    from rwkv7.train.resume import find_resume

    ds = "train.strategy=deepspeed_stage_2"
    recipe = load_recipe("0.1b", ["train.devices=4", "train.micro_bsz=4", ds])
    ck = tmp_path / "ckpt" / "step-00000010"
    ck.mkdir(parents=True)
    meta = {"state": {"step": 10}, "fingerprint": recipe.fingerprint(), "world_size": 2}
    (ck / "meta.json").write_text(_json.dumps(meta))
    with pytest.raises(UserError, match="ZeRO shards of 2 GPU"):
        find_resume(tmp_path, recipe, force=False)
    assert find_resume(tmp_path, load_recipe("0.1b", ["train.devices=2", "train.micro_bsz=8", ds]), False)[1].step == 10
    # ddp (what auto picks on several GPUs) gathers its optimizer shards into one state: any GPU count resumes
    ddp = load_recipe("0.1b", ["train.devices=4", "train.micro_bsz=4"])
    assert ddp.train.strategy == "ddp"
    (ck / "meta.json").write_text(_json.dumps({**meta, "fingerprint": ddp.fingerprint()}))
    assert find_resume(tmp_path, ddp, force=False)[1].step == 10


def assert_same_run_as_reference(out, reference_run):
    ref, got = losses(reference_run), losses(out)
    assert sorted(got) == sorted(ref) == [0, 1, 2, 3]
    for e in ref:
        assert abs(got[e] - ref[e]) <= 1e-6, (e, got[e], ref[e])
    epoch_lines = [ln for ln in (out / "train_log.txt").read_text().splitlines() if not ln.startswith(("NEW", "{"))]
    assert len(epoch_lines) == 4  # no duplicated, lost or torn lines
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))


def test_sigterm_130_resume_kill_before_log_line_and_signal_at_the_end(reference_run, tmp_path):
    """One run interrupted three ways, ending exactly as the uninterrupted run did:
    1. SIGTERM (what a scheduler sends) after step 7: step 8 finishes, is checkpointed mid mini-epoch, exit 130;
    2. resumed from step 8, SIGKILL after the checkpoint of step 10 is committed but before mini-epoch 1's line is
       in train_log.txt: the next resume writes that line from the checkpoint's records;
    3. resumed from step 10, SIGINT after step 19: the run stops at step 20, its last, so it is finished (exit 0,
       rwkv-final.pth), not interrupted."""
    out = tmp_path / "run"
    p = run_train(out, "--no-check", env={"RWKV7_TEST_FAULT": "sigterm@7"}, check=False)
    assert p.returncode == 130, p.stdout[-2000:] + p.stderr[-2000:]
    assert "stopped by a signal at step 8" in p.stdout and "Traceback" not in p.stderr
    assert ckpt_steps(out) == [5, 8] and not (out / "rwkv-final.pth").exists()

    p = run_train(out, "--no-check", env={"RWKV7_TEST_FAULT": "kill-log@10"}, check=False)
    assert p.returncode == -signal.SIGKILL and "from step-00000008" in p.stdout
    assert sorted(losses(out)) == [0] and ckpt_steps(out) == [8, 10]

    p = run_train(out, "--no-check", env={"RWKV7_TEST_FAULT": "sigint@19"}, check=False)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "from step-00000010" in p.stdout and (out / "rwkv-final.pth").is_file()
    assert_same_run_as_reference(out, reference_run)


def test_sigint_from_outside_stops_cleanly_with_130_and_resumes_exactly(reference_run, tmp_path):
    """Ctrl-C (SIGINT to the process) once the first mini-epoch is logged: exit 130 at the end of the current step,
    then an exact resume."""
    import time

    out = tmp_path / "run"
    # a long validation after mini-epochs 1 and 2 (train losses unchanged) keeps the run going for seconds after
    # mini-epoch 0's line: the signal lands mid-run even when this test process is slow to notice that line
    slow_val = ["--set", "data.val_tokens=16384"]
    proc = zygote.Run(train_cmd(out, "--no-check", *slow_val), cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"})
    log = out / "train_log.txt"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not (
            log.is_file() and any(ln.startswith("0 ") for ln in log.read_text().splitlines())):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert "stopped by a signal" in stdout and "Traceback" not in stderr
    stopped_at = int(stdout.split("stopped by a signal at step ")[1].split(";")[0])
    assert 5 < stopped_at < 20 and ckpt_steps(out)[-1] == stopped_at
    p = run_train(out, "--no-check", *slow_val)
    assert "resuming" in p.stdout
    assert_same_run_as_reference(out, reference_run)


def ckpt_steps(out):
    return [int(d.name.split("-")[1]) for d in sorted((out / "ckpt").iterdir())]


def test_fresh_ignores_existing_checkpoints_and_starts_over(reference_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    (out / "rwkv-final.pth").unlink()
    p = run_train(out, "--no-check", "--fresh")
    assert "resuming" not in p.stdout and "nothing to do" not in p.stdout
    assert (out / "train_log.txt").read_text().count("NEW RUN") == 1  # a new run's log, not an appended one
    assert (out / "rwkv-final.pth").is_file()
    assert_same_run_as_reference(out, reference_run)


def test_rotation_keeps_exactly_keep_checkpoints(reference_run):
    """epoch_save=1 checkpoints steps 5, 10, 15, 20; train.keep_checkpoints (2) newest stay, every rwkv-N.pth too."""
    assert ckpt_steps(reference_run) == [15, 20]
    assert all((reference_run / f"rwkv-{e}.pth").is_file() for e in range(4))


def test_each_parameter_group_trained_with_its_official_lr(reference_run):
    """The optimizer state of the last checkpoint: every group's lr is the schedule's lr of the last step times its
    my_lr_scale (official-rwkv7-trainer.md §3.3: lr_2x twice, the others once), weight decay only on lr_decay
    (§3.1)."""
    from rwkv7 import checkpoint
    from rwkv7.recipe import load_recipe
    from rwkv7.train.schedule import learning_rate

    recipe = load_recipe("tiny", SMALLER)
    meta = json.loads((reference_run / "run.json").read_text())
    lr = learning_rate(19, recipe.train.lr_init, recipe.train.lr_final, recipe.train.warmup_steps,
                       recipe.tokens_per_step, meta["my_exit_tokens"])  # step 20 ran with the lr of 19 steps done
    groups = {g["name"]: g for g in checkpoint.load_plain_state(reference_run / "ckpt" / "step-00000020")
              ["optimizer"]["param_groups"]}
    assert {k: g["lr"] for k, g in groups.items()} == {"lr_1x": lr, "lr_2x": 2 * lr, "lr_decay": lr}
    assert {k: g["weight_decay"] for k, g in groups.items()} == {"lr_1x": 0.0, "lr_2x": 0.0,
                                                                  "lr_decay": recipe.train.weight_decay}
    assert f"{lr:.8f}" == losses_lr(reference_run)[3]  # and the log's lr column is the same number


def losses_lr(out):
    return {r.epoch: f"{r.lr:.8f}" for r in parse_log(Path(out) / "train_log.txt")}
