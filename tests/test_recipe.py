"""Recipes load into typed, validated dataclasses; overrides are typed; every shipped recipe is valid."""
import pytest

from rwkv7.errors import UserError
from rwkv7.recipe import MINI_EPOCH_SAMPLES, available, load_recipe


def test_every_shipped_recipe_loads():
    names = available()
    assert {"tiny", "0.1b", "0.1b-short", "0.4b", "1.5b", "3b"} <= set(names)
    for name in names:
        r = load_recipe(name)
        assert r.model.n_embd % r.model.head_size == 0
        assert r.train.epoch_steps or MINI_EPOCH_SAMPLES % r.real_bsz == 0


def test_official_demo_values():
    r = load_recipe("0.1b")
    m, t, d = r.model, r.train, r.data
    assert (m.n_layer, m.n_embd, m.vocab_size, m.head_size) == (12, 768, 65536, 64)
    assert (t.ctx_len, t.micro_bsz, t.lr_init, t.lr_final, t.warmup_steps) == (512, 16, 6e-4, 6e-5, 10)
    assert (t.beta1, t.beta2, t.adam_eps, t.weight_decay, t.grad_cp) == (0.9, 0.99, 1e-18, 0.001, 1)
    assert (t.precision, t.strategy, d.magic_prime, d.my_exit_tokens) == ("bf16", "single", 2926181, 1498226207)
    assert r.epoch_steps == 2520 and r.tokens_per_step == 8192


def test_auto_strategy_resolves_by_gpu_count():
    """strategy auto: one GPU in bf16 -> single (the fast path), several GPUs or nodes -> ddp (the same step on every
    rank, sharded optimizer); fp32 -> DeepSpeed stage 2; CPU runs keep auto. An explicit strategy is never changed."""
    assert load_recipe("0.1b").train.strategy == "single"
    assert load_recipe("0.1b", ["train.devices=2", "train.micro_bsz=8"]).train.strategy == "ddp"
    assert load_recipe("0.1b", ["train.num_nodes=2", "train.micro_bsz=8"]).train.strategy == "ddp"
    assert load_recipe("0.1b", ["train.devices=2", "train.micro_bsz=8", "train.precision=fp32"]).train.strategy \
        == "deepspeed_stage_2"
    assert load_recipe("0.1b", ["train.strategy=deepspeed_stage_2"]).train.strategy == "deepspeed_stage_2"
    assert load_recipe("0.1b-short").train.strategy == "deepspeed_stage_2"
    assert load_recipe("tiny").train.strategy == "auto"


def test_overrides_are_typed():
    r = load_recipe("tiny", ["train.micro_bsz=4", "train.lr_init=1e-3", "train.grad_cp=1", "train.compile=true"])
    assert r.train.micro_bsz == 4 and isinstance(r.train.micro_bsz, int)
    assert r.train.lr_init == 1e-3 and r.train.compile is True


def test_data_path_override_switches_a_hub_recipe_to_local_data():
    r = load_recipe("0.1b", ["data.path=/some/prefix"])
    assert r.data.source == "binidx" and r.data.path == "/some/prefix"
    assert load_recipe("0.1b").data.source == "hub"


def test_single_and_ddp_share_a_fingerprint():
    """ddp is single's arithmetic on several ranks: a run may move between one GPU and several at the same global
    batch (the optimizer state has one format); DeepSpeed's numbers differ."""
    single = load_recipe("0.1b")
    ddp = load_recipe("0.1b", ["train.devices=2", "train.micro_bsz=8"])
    assert (single.train.strategy, ddp.train.strategy) == ("single", "ddp")
    assert single.fingerprint() == ddp.fingerprint()
    assert load_recipe("0.1b", ["train.strategy=deepspeed_stage_2"]).fingerprint() != single.fingerprint()


def test_fingerprint_ignores_run_length_but_not_numbers():
    base = load_recipe("tiny").fingerprint()
    assert load_recipe("tiny", ["train.epoch_count=20"]).fingerprint() == base
    assert load_recipe("tiny", ["train.lr_init=1e-3"]).fingerprint() != base


@pytest.mark.parametrize("override, words", [
    ("model.n_embd=100", "multiple of"),
    ("train.micro_bsz=11 train.epoch_steps=0", "40320"),
    ("train.lr_final=1", "lr_final"),
    ("train.precision=fp16", "bf16 or fp32"),
    ("train.strategy=fsdp", "unknown"),
    ("train.strategy=ddp train.precision=bf16", "CPU run needs train.precision=fp32"),
    ("model.nope=1", "unknown key"),
    ("train.warmup_steps=x", "must be a int"),
    ("train.strategy=deepspeed_stage_3 train.accelerator=gpu train.precision=bf16", "not supported yet"),
    ("train.max_bad_steps=2 train.devices=2", "single process"),
    ("data.synthetic_tokens=10000", "at least 228"),
])
def test_bad_values_are_rejected_with_a_clear_message(override, words):
    with pytest.raises(UserError, match=words):
        load_recipe("tiny", override.split())
