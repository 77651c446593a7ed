"""The training run's components on their own (no Trainer): checkpoint rotation, log repair, per-group learning
rates and weight decay as the official trainer sets them, the run state, throughput/MFU, the divergence rule, the
strategy table, doctor's verdict on a crashing check, the fault hooks and the prebuilt-kernel lookup."""
import json
import math
import os
import signal

import pytest
import torch

from rwkv7 import checkpoint as ckpt, wkv_cuda
from rwkv7.model import ModelShape, RWKV7
from rwkv7.recipe import load_recipe
from rwkv7.strategy import Strategy
from rwkv7.testhooks import EnvFaults, Faults, faults_from_env
from rwkv7.train.guards import SignalStop, is_divergence
from rwkv7.train.progress import Throughput, peak_tflops
from rwkv7.train.resume import RunState, repair_log, repair_run_files
from rwkv7.train.schedule import apply_learning_rate, scheduled_lr
from rwkv7.trajectory import format_epoch_line, parse_log

# ---------------------------------------------------------------------------------------------------------------
# checkpoint rotation


def commit(run_dir, step, keep):
    tmp = ckpt.begin_checkpoint(run_dir, step)
    (tmp / "state.pt").write_bytes(b"x")
    return ckpt.commit_checkpoint(tmp, {"state": {"step": step}, "fingerprint": "f"}, keep)


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_rotation_keeps_exactly_the_newest_keep_checkpoints(tmp_path, keep):
    for step in (5, 10, 15, 20, 100):  # 100 sorts after 20 only because names are zero-padded
        commit(tmp_path, step, keep)
    names = [d.name for d in ckpt.checkpoint_dirs(tmp_path)]
    assert names == [f"step-{s:08d}" for s in (5, 10, 15, 20, 100)[-keep:]]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == names  # nothing else left behind


def test_half_written_checkpoint_is_not_a_checkpoint(tmp_path):
    commit(tmp_path, 5, 2)
    tmp = ckpt.begin_checkpoint(tmp_path, 10)  # killed before commit: no meta.json, temporary name
    (tmp / "state.pt").write_bytes(b"partial")
    assert [d.name for d in ckpt.checkpoint_dirs(tmp_path)] == ["step-00000005"]


# ---------------------------------------------------------------------------------------------------------------
# log repair on resume: the checkpoint's records are the truth


def line(epoch, loss):
    return format_epoch_line(epoch, loss, 1e-3, epoch)


def state_with(epochs, step):
    s = RunState(step=step)
    for e in epochs:
        s.records.append({"epoch": e, "loss": 5.0 - e, "lr": 1e-3, "line": line(e, 5.0 - e)})
    return s


def test_repair_adds_the_line_a_kill_between_checkpoint_and_log_line_lost(tmp_path):
    log = tmp_path / "train_log.txt"
    log.write_text("NEW RUN 1\n{}\n" + line(0, 5.0))  # the checkpoint knows epochs 0 and 1, the log only 0
    repair_log(log, state_with([0, 1], 10))
    assert [(r.epoch, r.loss) for r in parse_log(log)] == [(0, 5.0), (1, 4.0)]
    assert log.read_text().startswith("NEW RUN 1\n{}\n")


def test_repair_drops_lines_after_the_checkpoint_and_a_torn_last_line(tmp_path):
    log = tmp_path / "train_log.txt"
    log.write_text("NEW RUN 1\n{}\n" + line(0, 5.0) + line(1, 4.0) + line(2, 3.0) + "3 2.5 12.1")  # torn
    repair_log(log, state_with([0, 1], 10))
    text = log.read_text()
    assert [r.epoch for r in parse_log(log)] == [0, 1]
    assert text.endswith("\n") and text.count("NEW RUN") == 1


def test_repair_keeps_a_matching_log_unchanged(tmp_path):
    log = tmp_path / "train_log.txt"
    body = "NEW RUN 1\n{}\n" + line(0, 5.0) + line(1, 4.0)
    log.write_text(body)
    repair_log(log, state_with([0, 1], 10))
    assert log.read_text() == body


def test_repair_trims_metrics_and_validation_rows_after_the_checkpoint(tmp_path):
    (tmp_path / "train_log.txt").write_text(line(0, 5.0) + line(1, 4.0))  # epoch 1 is after the checkpoint
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 9))
                                            + '{"step": 9')  # torn
    (tmp_path / "val_log.txt").write_bytes(b"0 4.9 134.3 100 \xff\n1 3.9 49.4 100\n")  # a stray byte is kept
    repair_run_files(tmp_path, state_with([0], 6))
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))
    assert (tmp_path / "val_log.txt").read_text() == "0 4.9 134.3 100 \ufffd\n"
    assert [r.epoch for r in parse_log(tmp_path / "train_log.txt")] == [0]


def test_run_state_mini_epoch_sums():
    s = RunState()
    assert s.mean_loss() == 0.0  # no division by zero before the first step
    s.add_loss(2.0)
    assert s.mean_loss() == 2.0
    s.add_loss(3.0)
    assert (s.loss_sum, s.loss_count, s.mean_loss()) == (5.0, 2, 2.5)
    s.close_mini_epoch(0, 2.5, 1e-3, "l")
    assert (s.loss_sum, s.loss_count) == (0.0, 0) and s.records == [{"epoch": 0, "loss": 2.5, "lr": 1e-3,
                                                                      "line": "l"}]


# ---------------------------------------------------------------------------------------------------------------
# per-group learning rate and weight decay (shared/reference/official-rwkv7-trainer.md §3.1 and §3.3)

SHAPE = ModelShape(n_layer=2, n_embd=64, vocab_size=32, head_size=64)


@pytest.fixture(scope="module")
def tiny_module():
    from rwkv7.train.module import RWKV7Module

    recipe = load_recipe("tiny", ["model.n_layer=2", "model.n_embd=64", "model.vocab_size=32"])
    return RWKV7Module(RWKV7(SHAPE), recipe)


def test_optimizer_groups_are_the_official_three(tiny_module):
    """§3.1: att.w0 -> lr_2x (wd 0, scale 2); 2-D `.weight` tensors -> lr_decay (wd = weight_decay, scale 1);
    everything else (LoRA w1..g2, r_k, biases, LayerNorms, x_*) -> lr_1x (wd 0, scale 1)."""
    opt = tiny_module.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW)  # §3.2: AdamW when wd > 0 (decoupled decay on the decay group)
    names = {id(p): n for n, p in tiny_module.model.named_parameters()}
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"lr_1x", "lr_2x", "lr_decay"}
    assert {names[id(p)] for p in groups["lr_2x"]["params"]} == {"blocks.0.att.w0", "blocks.1.att.w0"}
    decay = {names[id(p)] for p in groups["lr_decay"]["params"]}
    assert decay == {"emb.weight", "head.weight"} | {
        f"blocks.{i}.{m}.weight" for i in (0, 1)
        for m in ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")}
    assert {"blocks.0.att.w1", "blocks.0.att.g2", "blocks.1.att.r_k", "blocks.0.ln0.weight"} <= \
        {names[id(p)] for p in groups["lr_1x"]["params"]}
    wd = tiny_module.recipe.train.weight_decay
    assert wd == 0.001  # the demo value (§3.2)
    assert [(groups[k]["weight_decay"], groups[k]["my_lr_scale"]) for k in ("lr_1x", "lr_2x", "lr_decay")] == \
        [(0.0, 1.0), (0.0, 2.0), (0.001, 1.0)]
    assert (opt.defaults["betas"], opt.defaults["eps"]) == ((0.9, 0.99), 1e-18)  # §3.2 demo values


def test_each_group_gets_the_scheduled_lr_times_its_scale(tiny_module):
    """§3.3: param_group["lr"] = lr * param_group["my_lr_scale"], every step."""
    opt = tiny_module.configure_optimizers()
    apply_learning_rate(opt, 3e-4)
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {"lr_1x": 3e-4, "lr_2x": 6e-4, "lr_decay": 3e-4}


def test_scheduled_lr_follows_the_official_vectors():
    """§3.3 test vectors (lr_init 6e-4, lr_final 6e-5, ctx 512, real_bsz 16, warmup 10, exit 1498226207)."""
    r = load_recipe("0.1b")
    r.train.lr_init, r.train.lr_final, r.train.warmup_steps = 6e-4, 6e-5, 10
    r.train.ctx_len, r.train.micro_bsz, r.train.devices, r.train.num_nodes = 512, 16, 1, 1
    assert f"{scheduled_lr(r, 1498226207, 0):.1e}" == "6.0e-06"
    assert f"{scheduled_lr(r, 1498226207, 1):.2e}" == "6.54e-05"
    assert f"{scheduled_lr(r, 1498226207, 9):.3e}" == "5.406e-04"
    assert f"{scheduled_lr(r, 1498226207, 2519):.5e}" == "5.99749e-04"
    assert f"{scheduled_lr(r, 1498226207, 90000):.5e}" == "3.36722e-04"


# ---------------------------------------------------------------------------------------------------------------
# progress, divergence, signals, faults


def test_throughput_and_mfu_by_hand():
    t = [100.0]
    speed = Throughput(tokens_per_step=1000, first_step=10, last_step=50, flops_per_token=6e9, peak_tflops=100.0,
                       world=2, clock=lambda: t[0])
    t[0] = 100.5
    assert speed.update(11) is False and speed.tok_s == 0.0  # under a second: not measured yet
    t[0] = 102.0
    assert speed.update(14) is True and speed.tok_s == 2000.0  # 4 steps x 1000 tokens in 2 s
    assert speed.mfu() == 0.06  # 2000 tok/s x 6e9 FLOPs / (100 TFLOP/s x 2 GPUs), exactly
    t[0] = 103.0
    assert speed.update(15) is True and speed.tok_s == 1000.0  # exactly one second is a window
    t[0] = 103.1
    assert speed.update(50) is True and speed.tok_s == pytest.approx(35 * 1000 / 0.1)  # the last step always
    assert Throughput(1, 0, 1, 1.0, None, 1).mfu() is None  # no known peak (CPU): no MFU
    assert peak_tflops("NVIDIA H200") == 989.0 and peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("cpu") is None


def test_divergence_rule():
    assert is_divergence(math.nan, True, False) and is_divergence(math.inf, True, False)
    assert not is_divergence(2.0, True, False)
    assert not is_divergence(math.nan, False, False)  # a step the module skipped has no loss
    assert not is_divergence(math.nan, True, True)  # checked before backward already (skip or stop there)


def test_signal_stop_sets_a_flag_instead_of_dying():
    stop = SignalStop()
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop.install()
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signum == signal.SIGINT
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_signal_stop_works_after_the_cli_restored_its_handlers():
    """In-process CLI calls (tests, golden) leave rwkv7.signals' owner set but restore the previous handlers on the
    way out; a later SignalStop must install its handler again, not leave Python's default (a KeyboardInterrupt)."""
    from rwkv7 import signals

    with signals.handled():
        pass
    test_signal_stop_sets_a_flag_instead_of_dying()


def test_fault_hooks_from_the_environment():
    assert type(faults_from_env({})) is Faults
    f = faults_from_env({"RWKV7_TEST_FAULT": "nan@7"})
    loss = torch.tensor(2.0)
    assert f.loss(6, loss) is loss and math.isnan(float(f.loss(7, loss)))
    assert Faults().loss(7, loss) is loss
    assert EnvFaults("kill@x").step is None  # malformed: never fires


# ---------------------------------------------------------------------------------------------------------------
# the strategy table


def test_strategy_properties_and_recipe_strings():
    assert [s.value for s in Strategy] == ["auto", "single", "ddp", "deepspeed_stage_2", "deepspeed_stage_2_offload",
                                           "deepspeed_stage_3", "deepspeed_stage_3_offload"]
    assert Strategy.SINGLE.master_weights and Strategy.SINGLE.supports_cuda_graph and Strategy.SINGLE.one_gpu
    assert not Strategy.SINGLE.uses_deepspeed and Strategy.SINGLE.clips_in_optimizer
    z2o = Strategy.DEEPSPEED_STAGE_2_OFFLOAD
    assert (z2o.uses_deepspeed, z2o.zero_stage, z2o.offload, z2o.supports_cuda_graph) == (True, 2, True, False)
    assert Strategy.DEEPSPEED_STAGE_3.zero_stage == 3 and Strategy.DEEPSPEED_STAGE_3.unsupported
    assert not Strategy.AUTO.gpu_only and not Strategy.AUTO.clips_in_optimizer and not Strategy.AUTO.planned
    assert Strategy.AUTO.resolved_for("gpu", 1, "bf16") is Strategy.SINGLE
    assert Strategy.AUTO.resolved_for("gpu", 2, "bf16") is Strategy.DDP  # several GPUs: single's step, data parallel
    ddp = Strategy.DDP
    assert ddp.data_parallel and ddp.master_weights and ddp.supports_cuda_graph and not ddp.gpu_only
    assert not ddp.one_gpu and not ddp.uses_deepspeed and ddp.planned
    assert Strategy.AUTO.resolved_for("gpu", 1, "fp32") is Strategy.DEEPSPEED_STAGE_2
    assert Strategy.AUTO.resolved_for("cpu", 4, "fp32") is Strategy.AUTO
    r = load_recipe("0.1b", ["train.strategy=deepspeed_stage_2_offload"])
    assert r.train.strategy is z2o and json.loads(json.dumps(r.to_dict()))["train"]["strategy"] == z2o.value


# ---------------------------------------------------------------------------------------------------------------
# doctor: a check that crashes is a failure with its message


def test_a_crashing_check_is_a_failure_with_its_message(tmp_path, monkeypatch):
    from rwkv7 import doctor, preflight

    def broken(recipe, run_dir, probe):
        raise RuntimeError("statvfs exploded")

    monkeypatch.setattr(preflight, "RUN_CHECKS", [("disk", broken)])
    with pytest.raises(Exception, match="statvfs exploded") as e:
        preflight.preflight(load_recipe("tiny"), tmp_path / "run")
    assert type(e.value).__name__ == "UserError"
    monkeypatch.setattr(doctor, "CHECKS", [("disk", broken)])
    (c,) = list(doctor.iter_checks(load_recipe("tiny"), tmp_path / "run"))
    assert (c.status, c.name) == ("fail", "disk") and "RuntimeError: statvfs exploded" in c.detail


# ---------------------------------------------------------------------------------------------------------------
# prebuilt kernel lookup (kernels/build.py's layout: ROOT/NAME/NAME.so + build.json with the arch list)


def fake_build(root, name, arch):
    d = root / name
    d.mkdir(parents=True)
    (d / f"{name}.so").write_bytes(b"\x7fELF")
    (d / "build.json").write_text(json.dumps({"name": name, "arch": arch}))
    return d / f"{name}.so"


def test_prebuilt_lookup_matches_the_arch_list(tmp_path):
    so = fake_build(tmp_path, "k", "8.0;9.0a")
    assert wkv_cuda.prebuilt_in(tmp_path, "k", (9, 0)) == so
    assert wkv_cuda.prebuilt_in(tmp_path, "k", (8, 6)) == so  # same-major SASS runs on a newer minor
    assert wkv_cuda.prebuilt_in(tmp_path, "k", (10, 0)) is None  # 9.0a is for exactly 9.0
    assert wkv_cuda.prebuilt_in(tmp_path, "other", (9, 0)) is None  # another source hash: stale, never loaded
    (so.parent / "build.json").write_text("{not json")
    assert wkv_cuda.prebuilt_in(tmp_path, "k", (9, 0)) is None
    so.unlink()
    assert wkv_cuda.prebuilt_in(tmp_path, "k", (9, 0)) is None


def test_prebuilt_lookup_prefers_the_aot_dir_over_the_cache(tmp_path, monkeypatch):
    name = wkv_cuda.extension_name()
    monkeypatch.setenv("RWKV7_KERNEL_DIR", str(tmp_path / "aot"))
    monkeypatch.setenv("RWKV7_KERNEL_CACHE", str(tmp_path / "cache"))
    assert wkv_cuda.find_prebuilt((9, 0)) is None
    cached = fake_build(tmp_path / "cache", name, "9.0")
    assert wkv_cuda.find_prebuilt((9, 0)) == cached
    aot = fake_build(tmp_path / "aot", name, "9.0a")
    assert wkv_cuda.find_prebuilt((9, 0)) == aot
    assert wkv_cuda.find_prebuilt((8, 0)) is None  # neither covers sm_80


def test_extension_name_changes_with_the_sources(monkeypatch):
    before = wkv_cuda.extension_name()
    assert before.startswith("rwkv7_wkv7_") and len(before) == len("rwkv7_wkv7_") + 12
    monkeypatch.setattr(wkv_cuda, "CUDA_FLAGS", wkv_cuda.CUDA_FLAGS + ["-DX"])
    assert wkv_cuda.extension_name() != before


def test_lane_config_is_read_from_the_environment_once():
    assert wkv_cuda.LaneConfig.from_env({}) == wkv_cuda.LaneConfig(wkv_cuda.FWD_LANES, wkv_cuda.BWD_LANES)
    assert wkv_cuda.LaneConfig.from_env({"RWKV7_WKV_LANES": "28,2"}) == wkv_cuda.LaneConfig(28, 2)
    with pytest.raises(Exception, match="RWKV7_WKV_LANES"):
        wkv_cuda.LaneConfig.from_env({"RWKV7_WKV_LANES": "3,3"})
    assert wkv_cuda.parse_arch("9.0a+PTX") == (9, 0, "a", True) and wkv_cuda.parse_arch("10.0f") == (10, 0, "f", False)


# ---------------------------------------------------------------------------------------------------------------
# the profiler (RWKV7_PROFILE_STEP=N: steps N..N+2 into profile.txt)


def test_profiler_covers_three_steps_from_the_given_one(tmp_path):
    from rwkv7.train.profiler import StepProfiler

    out = tmp_path / "profile.txt"
    prof = StepProfiler(4, out)
    prof.before_step(3)
    assert prof.profiler is None  # not yet
    prof.before_step(4)
    for done in (5, 6):
        torch.ones(64, 64) @ torch.ones(64, 64)
        prof.after_step(done)
        assert not out.exists()  # steps 4 and 5 done: still profiling
    prof.after_step(7)
    assert prof.profiler is None and "aten::mm" in out.read_text() and "Self CPU" in out.read_text()
    StepProfiler(None, tmp_path / "never.txt").before_step(0)
    assert not (tmp_path / "never.txt").exists()


def test_profile_step_and_faults_are_read_by_the_command_line():
    from rwkv7.commands.train import options_from_env
    from rwkv7.errors import UserError

    assert options_from_env({})["profile_step"] is None and type(options_from_env({})["faults"]) is Faults
    opts = options_from_env({"RWKV7_PROFILE_STEP": "20", "RWKV7_TEST_FAULT": "kill@3"})
    assert opts["profile_step"] == 20 and (opts["faults"].kind, opts["faults"].step) == ("kill", 3)
    with pytest.raises(UserError, match="RWKV7_PROFILE_STEP"):
        options_from_env({"RWKV7_PROFILE_STEP": "soon"})


# ---------------------------------------------------------------------------------------------------------------
# rwkv7 init


def test_init_writes_the_official_initial_weights(cli, tmp_path):
    from rwkv7.checkpoint import read_state_dict
    from rwkv7.init import init_model
    from rwkv7.plan import count_parameters

    out = tmp_path / "sub" / "init.pth"
    code, stdout, err = cli("init", "--recipe", "tiny", "--out", out)
    assert code == 0, err
    recipe = load_recipe("tiny")
    m = recipe.model
    expected = RWKV7(ModelShape(m.n_layer, m.n_embd, m.vocab_size, m.head_size))
    init_model(expected, seed=recipe.train.seed, bf16_round=recipe.train.init_bf16_round)
    got = read_state_dict(out)
    assert list(got) == list(expected.state_dict())  # official names, official order
    for k, v in expected.state_dict().items():
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k].float(), v.bfloat16().float()), k
    assert f"total parameters: {count_parameters(recipe):,}" in stdout
    assert "blocks.0.att.w0" in stdout and f"wrote {out}" in stdout
    code, _, _ = cli("init", "--recipe", "tiny", "--out", tmp_path / "seed1.pth", "--seed", "1")
    assert code == 0 and not torch.equal(read_state_dict(tmp_path / "seed1.pth")["emb.weight"], got["emb.weight"])


# ---------------------------------------------------------------------------------------------------------------
# metrics.jsonl


def test_metrics_rows_and_buffered_writes(tmp_path):
    from rwkv7.train import metrics

    recipe = load_recipe("tiny", ["train.epoch_steps=5"])
    row = metrics.metrics_row(recipe, 6, 2.5, 1e-3, 0.75, 1234.56, None)
    assert {k: row[k] for k in ("step", "mini_epoch", "loss", "lr", "grad_norm", "tokens_per_s")} == \
        {"step": 6, "mini_epoch": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.75, "tokens_per_s": 1234.6}
    assert row["tokens_per_step"] == 8 * 64 and "mfu" not in row and "peak_mem_gib" not in row
    assert metrics.metrics_row(recipe, 5, 2.5, 1e-3, None, 0.0, 0.123456)["mini_epoch"] == 0
    assert metrics.metrics_row(recipe, 5, 2.5, 1e-3, None, 0.0, 0.123456)["mfu"] == 0.1235

    log = metrics.MetricsLog(tmp_path, writer=True)
    for step in range(1, metrics.FLUSH_ROWS):
        log.add({"step": step})
    assert not log.path.exists()  # buffered until FLUSH_ROWS rows
    log.add({"step": metrics.FLUSH_ROWS})
    assert len(log.path.read_text().splitlines()) == metrics.FLUSH_ROWS and log.buffer == []
    log.add({"step": 999})
    log.close()
    assert json.loads(log.path.read_text().splitlines()[-1]) == {"step": 999}
    other = metrics.MetricsLog(tmp_path / "rank1", writer=False)  # ranks > 0 write nothing
    other.add({"step": 1})
    other.close()
    assert not (tmp_path / "rank1").exists() and other.buffer == []


def test_flops_per_token_by_hand():
    """tiny: C=128, L=2, V=512, head 64, LoRA ranks (w, a, v, g) = (32, 32, 32, 64). Per layer 12 C^2 + 2 C x 160 =
    196,608 + 40,960 = 237,568; 6 x (2 x 237,568 + 128 x 512) + 2 x 24 x 64 x 128 = 3,244,032 + 393,216."""
    from rwkv7.model import lora_rank
    from rwkv7.train.metrics import flops_per_token

    assert [lora_rank(128, k) for k in "wavg"] == [32, 32, 32, 64]
    assert flops_per_token(load_recipe("tiny")) == 3_244_032 + 393_216
