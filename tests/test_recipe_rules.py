"""Recipe rules one by one: each check at its boundary (the last value accepted, the first refused) with the full
text of its message, how `--set` and TOML values are parsed and which key they touch, what the fingerprint hashes,
and plan.py's figures against numbers worked out by hand. Fast: no model is trained, no process started."""
import math
import os
import tomllib
from pathlib import Path

import pytest

from rwkv7.errors import UserError
from rwkv7.plan import MEASURED_H200, Estimate, count_parameters, plan, recommend, state_bytes
from rwkv7.recipe import (RECIPES_DIR, TrainConfig, _coerce, available, load_recipe, parse_override, validate)
from rwkv7.strategy import Strategy

GIB = 2 ** 30
INT64_MAX = 9223372036854775807
ALL_STRATEGIES = ("auto, single, ddp, deepspeed_stage_2, deepspeed_stage_2_offload, deepspeed_stage_3, "
                  "deepspeed_stage_3_offload")
CPU_RUN = ("a CPU run needs train.precision=fp32 and train.strategy=auto or ddp (DeepSpeed and bf16 training are GPU "
           "paths; train.devices=N on a CPU runs N processes over gloo)")


def refused(overrides, name="tiny"):
    """The message load_recipe(name, overrides) stops with."""
    with pytest.raises(UserError) as excinfo:
        load_recipe(name, overrides)
    return str(excinfo.value)


def tiny_with(**changes):
    """`tiny` with attributes set directly (train__seed=3 -> r.train.seed = 3), to check validate() alone."""
    r = load_recipe("tiny")
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        setattr(getattr(r, section), key, value)
    return r


def refused_when(**changes):
    with pytest.raises(UserError) as excinfo:
        validate(tiny_with(**changes))
    return str(excinfo.value)


def write_recipe(tmp_path, text, name="mine.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


SMALL_CPU = """
description = "a test recipe"
[model]
n_layer = 2
n_embd = 64
vocab_size = 256
head_size = 64
[data]
source = "synthetic"
[train]
accelerator = "cpu"
precision = "fp32"
strategy = "auto"
ctx_len = 16
micro_bsz = 8
epoch_steps = 5
"""


# ---- _check_numbers -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("train.lr_init=inf", "train.lr_init must be a finite number, got inf"),
    ("train.beta1=nan", "train.beta1 must be a finite number, got nan"),
    ("check.tolerance=-inf", "check.tolerance must be a finite number, got -inf"),
])
def test_floats_must_be_finite(override, message):
    assert refused([override]) == message


def test_integers_stay_inside_int64():
    """The int64 range is checked on every integer field, both ends: -2^63 and 2^63 - 1 pass this check (then meet
    the field's own rule), -2^63 - 1 and 2^63 do not."""
    validate(tiny_with(data__my_exit_tokens=INT64_MAX))
    assert refused_when(data__my_exit_tokens=INT64_MAX + 1) == \
        "data.my_exit_tokens = 9223372036854775808 is out of range (at least -9223372036854775808, at most " \
        "9223372036854775807)"
    assert refused(["data.my_exit_tokens=9223372036854775808"]) == \
        "data.my_exit_tokens = 9223372036854775808 is out of range (at least -9223372036854775808, at most " \
        "9223372036854775807)"
    # --set parses integers exactly, past float's 2^53 (the TOML file does too)
    assert load_recipe("tiny", ["data.my_exit_tokens=9007199254740993"]).data.my_exit_tokens == 9007199254740993
    assert load_recipe("tiny", [f"data.my_exit_tokens={INT64_MAX}"]).data.my_exit_tokens == INT64_MAX
    assert load_recipe("tiny", ["data.my_exit_tokens=1e9"]).data.my_exit_tokens == 10 ** 9
    # -2^63 is inside int64, so the message is warmup_steps' own rule, not the range
    assert refused_when(train__warmup_steps=-INT64_MAX - 1) == \
        "train.warmup_steps, data.val_tokens and data.synthetic_tokens must be >= 0"
    assert refused_when(train__warmup_steps=-INT64_MAX - 2) == \
        "train.warmup_steps = -9223372036854775809 is out of range (at least -9223372036854775808, at most " \
        "9223372036854775807)"


LIMIT_CASES = {  # key: (its upper limit, overrides that make the limit itself an otherwise valid recipe)
    "model.n_layer": (4096, []),
    "model.n_embd": (1 << 16, []),
    "model.head_size": (4096, ["model.n_embd=4096"]),
    "train.ctx_len": (1 << 20, ["data.source=binidx"]),
    "train.micro_bsz": (1 << 16, []),
    "train.devices": (4096, []),
    "train.num_nodes": (4096, []),
    "data.synthetic_tokens": (1 << 31, []),
    "train.ds_bucket_mb": (1 << 20, []),
    "train.dist_timeout_min": (100_000, []),
}


@pytest.mark.parametrize("key", list(LIMIT_CASES))
def test_size_limits_at_their_boundary(key):
    limit, extra = LIMIT_CASES[key]
    r = load_recipe("tiny", extra + [f"{key}={limit}"])
    section, field = key.split(".")
    assert getattr(getattr(r, section), field) == limit
    assert refused(extra + [f"{key}={limit + 1}"]) == f"{key} = {limit + 1} is too large (at most {limit})"


@pytest.mark.parametrize("key", ["train.seed", "data.synthetic_seed"])
def test_seeds_lie_in_0_to_2_pow_32(key):
    for ok in (0, 2 ** 32 - 1):
        r = load_recipe("tiny", [f"{key}={ok}"])
        section, field = key.split(".")
        assert getattr(getattr(r, section), field) == ok
    assert refused([f"{key}=4294967296"]) == f"{key} must be in [0, 2^32), got 4294967296"
    assert refused([f"{key}=-1"]) == f"{key} must be in [0, 2^32), got -1"


@pytest.mark.parametrize("key", ["train.cpu_threads", "train.num_workers"])
@pytest.mark.parametrize("cpus, shown, last_ok", [
    (32, 32, 128),   # 4 x 32 CPUs
    (2, 2, 64),      # a small machine: 64 is always allowed
    (None, 1, 64),   # os.cpu_count() unknown: counted as 1
])
def test_thread_counts_against_the_machine(monkeypatch, key, cpus, shown, last_ok):
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    load_recipe("tiny", [f"{key}={last_ok}"])
    assert refused([f"{key}={last_ok + 1}"]) == \
        f"{key} = {last_ok + 1} is far more than the {shown} CPUs here (more than {last_ok} is refused): use at " \
        f"most {shown}"


@pytest.mark.parametrize("override", ["train.warmup_steps=-1", "data.val_tokens=-1", "data.synthetic_tokens=-1"])
def test_counts_that_must_not_be_negative(override):
    assert refused([override]) == "train.warmup_steps, data.val_tokens and data.synthetic_tokens must be >= 0"


def test_zero_warmup_val_tokens_and_synthetic_tokens_are_accepted():
    r = load_recipe("tiny", ["train.warmup_steps=0", "data.val_tokens=0"])
    assert (r.train.warmup_steps, r.data.val_tokens) == (0, 0)
    assert load_recipe("tiny", ["data.source=binidx", "data.synthetic_tokens=0"]).data.synthetic_tokens == 0


def test_vocab_size_at_least_2():
    assert load_recipe("tiny", ["model.vocab_size=2"]).model.vocab_size == 2
    for v in (1, 0):
        assert refused([f"model.vocab_size={v}"]) == \
            f"model.vocab_size must be >= 2 (token 0 ends a document), got {v}"


# ---- validate_ranges ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, shown", [
    ("model.n_layer", "0"), ("model.n_embd", "0"), ("model.head_size", "0"), ("train.ctx_len", "0"),
    ("train.micro_bsz", "0"), ("train.devices", "0"), ("train.num_nodes", "0"), ("train.epoch_save", "0"),
    ("train.lr_init", "0.0"), ("train.adam_eps", "0.0"), ("train.keep_checkpoints", "0"),
    ("train.dist_timeout_min", "0"),
])
def test_positive_values_refuse_zero(key, shown):
    overrides = [f"{key}=0"] + (["train.lr_final=0"] if key == "train.lr_init" else [])
    assert refused(overrides) == f"{key} must be > 0, got {shown}"


def test_smallest_positive_values_are_accepted():
    r = load_recipe("tiny", ["train.epoch_save=1", "train.keep_checkpoints=1", "train.dist_timeout_min=1",
                             "train.adam_eps=1e-300", "train.lr_init=1e-300", "train.lr_final=0"])
    assert (r.train.epoch_save, r.train.keep_checkpoints, r.train.dist_timeout_min) == (1, 1, 1)


@pytest.mark.parametrize("key, value, shown", [
    ("train.lr_final", "-1", "-1.0"), ("train.weight_decay", "-0.5", "-0.5"), ("train.grad_clip", "-1", "-1.0"),
    ("train.epoch_count", "-1", "-1"), ("train.epoch_steps", "-1", "-1"), ("train.max_bad_steps", "-1", "-1"),
    ("data.magic_prime", "-1", "-1"), ("data.my_exit_tokens", "-1", "-1"), ("check.tolerance", "-0.5", "-0.5"),
    ("check.rel_tolerance", "-0.5", "-0.5"), ("check.max_outliers", "-1", "-1"), ("train.num_workers", "-1", "-1"),
    ("train.cpu_threads", "-1", "-1"),
])
def test_non_negative_values_refuse_negatives(key, value, shown):
    assert refused([f"{key}={value}"]) == f"{key} must be >= 0, got {shown}"


def test_non_negative_values_accept_zero():
    r = load_recipe("tiny", [f"{k}=0" for k in (
        "train.lr_final", "train.weight_decay", "train.grad_clip", "train.epoch_count", "train.epoch_steps",
        "train.max_bad_steps", "data.magic_prime", "data.my_exit_tokens", "check.tolerance", "check.rel_tolerance",
        "check.max_outliers", "train.num_workers", "train.cpu_threads")])
    assert (r.train.lr_final, r.train.grad_clip, r.check.tolerance, r.train.epoch_steps) == (0.0, 0.0, 0.0, 0)


# ---- validate_model -----------------------------------------------------------------------------------------------

def test_model_shape_rules():
    assert refused(["model.n_embd=96"]) == "model.n_embd (96) must be a multiple of model.head_size (64)"
    assert refused(["model.n_embd=48", "model.head_size=16"]) == \
        "model.n_embd (48) must be a multiple of 32 (the official LoRA ranks assume it)"
    assert load_recipe("tiny", ["model.n_embd=96", "model.head_size=32"]).model.n_embd == 96
    assert refused(["model.n_layer=1"]) == "model.n_layer must be >= 2 (the official init divides by n_layer - 1)"
    assert load_recipe("tiny", ["model.n_layer=2"]).model.n_layer == 2
    assert load_recipe("tiny", ["model.vocab_size=65536"]).model.vocab_size == 65536
    assert refused(["model.vocab_size=65537"]) == \
        "model.vocab_size 65537 > 65536 cannot be stored in uint16 binidx data"


# ---- validate_train -----------------------------------------------------------------------------------------------

def test_lr_final_may_equal_lr_init_but_not_exceed_it():
    r = load_recipe("tiny", ["train.lr_init=0.5", "train.lr_final=0.5"])
    assert r.train.lr_final == r.train.lr_init == 0.5
    assert refused(["train.lr_init=0.5", "train.lr_final=0.75"]) == \
        "train.lr_final (0.75) must be <= train.lr_init (0.5)"


def test_betas_lie_in_0_to_1():
    r = load_recipe("tiny", ["train.beta1=0", "train.beta2=0"])
    assert (r.train.beta1, r.train.beta2) == (0.0, 0.0)
    msg = "train.beta1/beta2 must lie in [0, 1), got {}"
    assert refused(["train.beta1=1"]) == msg.format("1.0/0.99")
    assert refused(["train.beta2=1"]) == msg.format("0.9/1.0")
    assert refused(["train.beta1=-0.5"]) == msg.format("-0.5/0.99")
    assert refused(["train.beta2=-0.5"]) == msg.format("0.9/-0.5")


def test_precision_accelerator_and_recompute_names():
    assert refused(["train.precision=fp16"]) == "train.precision must be bf16 or fp32, got 'fp16'"
    assert refused(["train.accelerator=tpu"]) == "train.accelerator must be gpu or cpu, got 'tpu'"
    assert load_recipe("tiny", ["train.recompute=full"]).train.recompute == "full"
    assert load_recipe("tiny", ["train.recompute=selective"]).train.recompute == "selective"
    assert refused(["train.recompute=none"]) == (
        "train.recompute 'none' unknown; choose full (least memory) or selective (keeps the matmul outputs: faster, "
        "more memory)")


@pytest.mark.parametrize("strategy", [s.value for s in Strategy])
def test_cpu_runs_take_auto_or_ddp_only(strategy):
    if strategy in ("auto", "ddp"):
        assert load_recipe("tiny", [f"train.strategy={strategy}"]).train.strategy == strategy
    else:
        assert refused([f"train.strategy={strategy}"]) == CPU_RUN


def test_cpu_runs_are_fp32():
    assert refused(["train.precision=bf16"]) == CPU_RUN


@pytest.mark.parametrize("strategy", ["deepspeed_stage_3", "deepspeed_stage_3_offload"])
def test_stage_3_is_refused(strategy):
    assert refused([f"train.strategy={strategy}"], "0.1b") == (
        f"train.strategy={strategy} is not supported yet (its sharded weights are not gathered into rwkv-N.pth); "
        "use deepspeed_stage_2 or deepspeed_stage_2_offload")


def test_skipping_bad_steps_needs_one_process():
    assert load_recipe("tiny", ["train.max_bad_steps=1"]).train.max_bad_steps == 1
    msg = ("train.max_bad_steps > 0 (skipping bad steps) needs a single process: with several ranks a bad step "
           "stops the run (the last good checkpoint is kept)")
    assert refused(["train.max_bad_steps=1", "train.devices=2", "train.micro_bsz=4"]) == msg
    assert refused(["train.max_bad_steps=1", "train.num_nodes=2", "train.micro_bsz=4"]) == msg
    assert load_recipe("tiny", ["train.max_bad_steps=0", "train.num_nodes=2"]).train.num_nodes == 2


def test_single_is_one_gpu():
    msg = ("train.strategy=single is one GPU (pure bf16 + fp32 master weights); use ddp (the same step, data "
           "parallel) for several GPUs")
    assert load_recipe("0.1b", ["train.strategy=single"]).train.strategy is Strategy.SINGLE
    assert refused(["train.strategy=single", "train.devices=2", "train.micro_bsz=8"], "0.1b") == msg
    assert refused(["train.strategy=single", "train.num_nodes=2", "train.micro_bsz=8"], "0.1b") == msg


def test_ctx_len_multiple_of_16_on_gpu_only():
    assert load_recipe("0.1b", ["train.ctx_len=528"]).train.ctx_len == 528
    assert refused(["train.ctx_len=520"], "0.1b") == \
        "train.ctx_len (520) must be a multiple of 16 for the CUDA wkv7 kernel"
    assert load_recipe("tiny", ["train.ctx_len=72"]).train.ctx_len == 72  # CPU: any length


def test_global_batch_must_divide_the_mini_epoch():
    msg = ("micro_bsz x devices x num_nodes = {} must divide 40320 (the official mini-epoch size), or set "
           "train.epoch_steps explicitly")
    assert refused(["train.epoch_steps=0", "train.micro_bsz=11"]) == msg.format(11)
    # each factor divides 40320 = 2^7 3^2 5 7, their product 2^8 does not
    assert refused(["train.epoch_steps=0", "train.micro_bsz=128", "train.devices=2"]) == msg.format(256)
    assert load_recipe("tiny", ["train.epoch_steps=0", "train.micro_bsz=128", "train.devices=3"]).epoch_steps == 105
    assert load_recipe("tiny", ["train.epoch_steps=7", "train.micro_bsz=11"]).epoch_steps == 7


# ---- validate_data ------------------------------------------------------------------------------------------------

def test_magic_prime_is_a_prime_2_mod_3():
    assert load_recipe("tiny", ["data.magic_prime=5"]).data.magic_prime == 5
    msg = "data.magic_prime {} must be a prime with p % 3 == 2; leave it 0 to compute it from the data"
    assert refused(["data.magic_prime=7"]) == msg.format(7)   # prime, 7 % 3 == 1
    assert refused(["data.magic_prime=8"]) == msg.format(8)   # 8 % 3 == 2, not prime


def test_data_source_rules():
    assert refused(["data.source=local"]) == "data.source must be binidx, hub or synthetic, got 'local'"
    hub = "data.source=hub needs data.hub_repo and data.hub_files = [idx path, bin path]"
    assert refused(["data.source=hub"]) == hub                      # no repo, no files
    assert refused(["data.hub_repo="], "0.1b") == hub               # files but no repo
    assert refused(['data.hub_files=["a.idx"]'], "0.1b") == hub     # repo but one file
    assert refused(['data.hub_files=["a.idx", "a.bin", "c"]'], "0.1b") == hub
    assert load_recipe("0.1b", ['data.hub_files=["a.idx", "a.bin"]']).data.hub_files == ["a.idx", "a.bin"]


def test_synthetic_corpus_holds_228_contexts():
    r = load_recipe("tiny", [f"data.synthetic_tokens={228 * 64}"])  # tiny: ctx_len 64
    assert r.data.synthetic_tokens == 14592
    assert refused(["data.synthetic_tokens=14591"]) == "data.synthetic_tokens (14591) must be at least 228 x ctx_len"


def test_first_failing_rule_is_reported():
    """validate runs numbers, ranges, model, train, data in that order."""
    assert refused(["model.vocab_size=1", "model.n_layer=0"]).startswith("model.vocab_size must be >= 2")
    assert refused(["model.n_layer=0", "model.n_embd=96"]) == "model.n_layer must be > 0, got 0"
    assert refused(["model.n_embd=96", "train.precision=fp16"]).startswith("model.n_embd (96)")
    assert refused(["train.precision=fp16", "data.source=local"]).startswith("train.precision")


# ---- parse_override and _apply ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, parts", [
    ("train.micro_bsz=8", ("train", "micro_bsz", "8")),
    (" train.micro_bsz = 8 ", ("train", "micro_bsz", "8")),
    ("data.path=a=b.c", ("data", "path", "a=b.c")),      # only the first = splits
    ("train.a.b=1", ("train", "a.b", "1")),               # only the first . splits
    ("check.expected=", ("check", "expected", "")),
])
def test_override_parts(text, parts):
    assert parse_override(text) == parts


@pytest.mark.parametrize("text", ["train.micro_bsz", "micro_bsz=8", "train_lr=0.5", "lr=a.b=1", ""])
def test_override_needs_section_dot_key_equals(text):
    with pytest.raises(UserError) as excinfo:
        parse_override(text)
    assert str(excinfo.value) == f"--set {text!r}: write it as section.key=value, e.g. --set train.micro_bsz=8"


def test_unknown_sections_and_keys_list_the_valid_ones():
    assert refused(["optim.lr=1"]) == \
        "--set optim.lr=1: unknown section [optim]; sections are model, data, train, check"
    assert refused(["model.nope=1"]) == \
        "--set model.nope=1: unknown key model.nope; valid keys: head_size, n_embd, n_layer, vocab_size"
    assert refused(["check.a.b=1"]) == \
        "--set check.a.b=1: unknown key check.a.b; valid keys: expected, max_outliers, rel_tolerance, tolerance"
    assert refused(["description.x=1"]) == \
        "--set description.x=1: unknown section [description]; sections are model, data, train, check"


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "sha256":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


@pytest.mark.parametrize("override, key, value", [
    ("model.n_layer=3", "model.n_layer", 3),
    ("data.val_tokens=0", "data.val_tokens", 0),
    ("data.hub_revision=main", "data.hub_revision", "main"),
    ("train.seed=7", "train.seed", 7),
    ("train.compile=false", "train.compile", False),
    ("check.tolerance=0.5", "check.tolerance", 0.5),
])
def test_an_override_changes_exactly_its_key(override, key, value):
    before, after = _flat(load_recipe("tiny").to_dict()), _flat(load_recipe("tiny", [override]).to_dict())
    assert {k for k in before if before[k] != after[k]} == {key}
    assert after[key] == value and type(after[key]) is type(value)


def test_later_overrides_win():
    assert load_recipe("tiny", ["train.seed=1", "train.seed=2"]).train.seed == 2


def test_data_path_switches_only_a_hub_recipe_whose_source_is_not_set():
    assert load_recipe("0.1b", ["data.path=/p"]).data.source == "binidx"
    assert load_recipe("0.1b", ["data.path=/p", "data.source=hub"]).data.source == "hub"
    assert load_recipe("0.1b", ["data.source=hub", "data.path=/p"]).data.source == "hub"
    assert load_recipe("tiny", ["data.path=/p"]).data.source == "synthetic"


# ---- _coerce: --set values are parsed to the key's type ------------------------------------------------------------

@pytest.mark.parametrize("text, value", [("1", True), ("true", True), ("YES", True), ("On", True),
                                         ("0", False), ("False", False), ("no", False), ("OFF", False)])
def test_bool_words(text, value):
    assert load_recipe("tiny", [f"train.compile={text}"]).train.compile is value


@pytest.mark.parametrize("key, text, value", [
    ("train.micro_bsz", "4", 4), ("train.epoch_steps", "1e3", 1000), ("train.epoch_steps", "1_000", 1000),
    ("train.micro_bsz", "4.0", 4), ("train.lr_init", "3", 3.0), ("train.lr_init", "1e-3", 0.001),
    ("data.path", "x y", "x y"), ("data.sha256", '{"a.bin": "00"}', {"a.bin": "00"}),
])
def test_typed_values(key, text, value):
    r = load_recipe("tiny", [f"{key}={text}"] + (["train.lr_final=0"] if key == "train.lr_init" else []))
    section, field = key.split(".")
    got = getattr(getattr(r, section), field)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("key, text", [
    ("train.compile", "maybe"), ("train.compile", "2"), ("train.micro_bsz", "2.5"), ("train.micro_bsz", "abc"),
    ("train.micro_bsz", "inf"), ("train.micro_bsz", "0x10"), ("train.micro_bsz", ""), ("train.lr_init", "abc"),
    ("train.lr_init", "true"), ("data.hub_files", '{"a": 1}'), ("data.hub_files", "nope"), ("data.sha256", "[1]"),
])
def test_values_that_do_not_parse(key, text):
    typ = {"compile": "bool", "micro_bsz": "int", "lr_init": "float", "hub_files": "list", "sha256": "dict"}
    assert refused([f"{key}={text}"]) == f"{key} must be a {typ[key.split('.')[1]]}, got {text!r}"


@pytest.mark.parametrize("value, typ, result", [
    (3, "int", 3), (3.0, "int", 3), (2, "float", 2.0), (True, "bool", True), (False, "bool", False),
    ("s", "str", "s"), ([1], "list", [1]), ({"a": 1}, "dict", {"a": 1}),
])
def test_coerce_takes_python_values_of_the_right_kind(value, typ, result):
    got = _coerce("s", "k", value, typ)
    assert got == result and type(got) is type(result)


@pytest.mark.parametrize("value, typ", [(True, "int"), (3.5, "int"), (True, "float"), (5, "str"), ("x", "bool"),
                                        (1, "bool"), ((1,), "list")])
def test_coerce_refuses_python_values_of_another_kind(value, typ):
    with pytest.raises(UserError) as excinfo:
        _coerce("s", "k", value, typ)
    assert str(excinfo.value) == f"s.k must be a {typ}, got {value!r}"


def test_strategy_values():
    assert load_recipe("tiny", ["train.strategy=ddp"]).train.strategy is Strategy.DDP
    assert refused(["train.strategy=DDP"]) == f"train.strategy 'DDP' unknown; choose one of {ALL_STRATEGIES}"


# ---- load_recipe and the TOML file (values must already have the key's type) --------------------------------------

def test_a_toml_path_loads_with_its_stem_as_name(tmp_path):
    r = load_recipe(str(write_recipe(tmp_path, SMALL_CPU)))
    assert (r.name, r.description, r.model.n_embd, r.train.ctx_len) == ("mine", "a test recipe", 64, 16)
    r = load_recipe(str(write_recipe(tmp_path, SMALL_CPU.replace('description = "a test recipe"', ""), "b.toml")))
    assert (r.name, r.description) == ("b", "")


def test_a_name_is_looked_up_in_recipes_even_if_a_file_has_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").write_text("not toml [")
    assert load_recipe("tiny").model.vocab_size == 512
    write_recipe(tmp_path, SMALL_CPU, "notes.txt")
    assert refused([], "notes.txt").startswith("unknown recipe 'notes.txt'")


def test_unknown_recipe_lists_the_shipped_ones(tmp_path):
    names = ", ".join(available())
    assert "0.1b, 0.1b-short" in names and "tiny" in names
    for name in ("no-such", str(tmp_path / "gone.toml")):
        assert refused([], name) == (f"unknown recipe {name!r}: choose one of {names} (`rwkv7 recipes` lists them) "
                                     "or give a path to a .toml file")


def test_unreadable_recipe_files(tmp_path, monkeypatch):
    bad = write_recipe(tmp_path, "[model\n")
    with pytest.raises(tomllib.TOMLDecodeError) as toml_error:
        tomllib.loads("[model\n")
    assert refused([], str(bad)) == f"{bad}: not valid TOML ({toml_error.value})"
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"[model]\nn_layer = 2 # \xff\xfe\n")
    msg = refused([], str(binary))
    assert msg.startswith(f"{binary}: not valid TOML (") and "can't decode byte 0xff" in msg
    good = write_recipe(tmp_path, SMALL_CPU, "locked.toml")
    for error, shown in ((PermissionError(13, "Permission denied"), "Permission denied"),
                         (OSError("odd failure"), "odd failure")):  # no strerror: the exception's text
        def fail(self, *args, error=error, **kwargs):
            raise error
        monkeypatch.setattr(Path, "read_text", fail)
        assert refused([], str(good)) == f"cannot read recipe {good} ({shown}): make it readable (chmod +r)"


def test_toml_structure_errors(tmp_path):
    p = write_recipe(tmp_path, "n_layer = 2\n" + SMALL_CPU)
    assert refused([], str(p)) == f"{p}: top-level key 'n_layer' must be a [section]"
    p = write_recipe(tmp_path, SMALL_CPU + "[optim]\nlr = 1\n")
    assert refused([], str(p)) == f"{p}: unknown section [optim]; sections are model, data, train, check"
    p = write_recipe(tmp_path, SMALL_CPU + "seeed = 1\n")
    assert refused([], str(p)).startswith(f"{p}: unknown key train.seeed; valid keys: accelerator, adam_eps, ")


@pytest.mark.parametrize("line, message", [
    ("lr_init = true", "train.lr_init must be a float, got True (a bool)"),
    ("seed = 2.0", "train.seed must be a int, got 2.0 (a float)"),
    ("seed = true", "train.seed must be a int, got True (a bool)"),
    ('seed = "2"', "train.seed must be a int, got '2' (a str): write it without quotes"),
    ('compile = "true"', "train.compile must be a bool, got 'true' (a str): write it without quotes"),
    ("compile = 1", "train.compile must be a bool, got 1 (a int)"),
    ("strategy = 2", f"train.strategy 2 unknown; choose one of {ALL_STRATEGIES}"),
])
def test_toml_values_need_the_exact_type(tmp_path, line, message):
    p = write_recipe(tmp_path, SMALL_CPU.replace('strategy = "auto"\n', "") + line + "\n")
    assert refused([], str(p)) == message


def test_a_list_written_as_a_string_gets_no_quoting_hint(tmp_path):
    p = write_recipe(tmp_path, SMALL_CPU.replace('source = "synthetic"', 'source = "synthetic"\nhub_files = "a.idx"'))
    assert refused([], str(p)) == "data.hub_files must be a list, got 'a.idx' (a str)"


def test_toml_ints_are_fine_for_floats_and_strategy_strings_parse(tmp_path):
    r = load_recipe(str(write_recipe(tmp_path, SMALL_CPU + "lr_init = 1\nlr_final = 0\n")))
    assert (r.train.lr_init, r.train.lr_final) == (1.0, 0.0) and type(r.train.lr_init) is float
    r = load_recipe(str(write_recipe(tmp_path, SMALL_CPU.replace('strategy = "auto"', 'strategy = "ddp"'))))
    assert r.train.strategy is Strategy.DDP
    # the same text through --set is parsed, not refused
    assert load_recipe(str(write_recipe(tmp_path, SMALL_CPU)), ["train.seed=2.0"]).train.seed == 2


# ---- fingerprint and expected_log ----------------------------------------------------------------------------------

@pytest.mark.parametrize("override", [
    "train.epoch_save=2", "train.keep_checkpoints=5", "train.num_workers=2",
    "train.max_bad_steps=3", "train.dist_timeout_min=5", "train.cuda_graph=false", "train.compile=false",
    "train.recompute=full", "check.tolerance=0.5", "check.expected=other.log", "check.max_outliers=2",
])
def test_fingerprint_ignores_length_saving_and_step_mechanics(override):
    assert load_recipe("tiny", [override]).fingerprint() == load_recipe("tiny").fingerprint()


def test_fingerprint_keeps_the_global_batch_not_its_split():
    base = load_recipe("tiny").fingerprint()  # micro_bsz 8 on one process
    assert load_recipe("tiny", ["train.micro_bsz=4", "train.devices=2"]).fingerprint() == base
    assert load_recipe("tiny", ["train.micro_bsz=2", "train.devices=2", "train.num_nodes=2"]).fingerprint() == base
    assert load_recipe("tiny", ["train.micro_bsz=4"]).fingerprint() != base
    assert load_recipe("tiny", ["train.micro_bsz=4", "train.num_nodes=4"]).fingerprint() != base


@pytest.mark.parametrize("override", [
    "train.lr_final=1e-4", "train.seed=1", "train.ctx_len=32", "train.warmup_steps=3",
    "train.grad_clip=0.5", "train.init_bf16_round=false", "model.n_layer=3", "data.synthetic_seed=1",
    "data.magic_prime=5",
])
def test_fingerprint_changes_with_what_changes_the_numbers(override):
    assert load_recipe("tiny", [override]).fingerprint() != load_recipe("tiny").fingerprint()


def test_fingerprint_does_not_depend_on_key_order():
    """data.sha256 is a mapping: the same entries in another order are the same data."""
    ab = load_recipe("tiny", ['data.sha256={"a.idx": "11", "a.bin": "22"}']).fingerprint()
    assert load_recipe("tiny", ['data.sha256={"a.bin": "22", "a.idx": "11"}']).fingerprint() == ab
    assert load_recipe("tiny", ['data.sha256={"a.bin": "33", "a.idx": "11"}']).fingerprint() != ab


def test_expected_log_path():
    assert load_recipe("tiny").expected_log() == RECIPES_DIR / "expected" / "tiny.log"
    assert load_recipe("tiny", ["check.expected="]).expected_log() is None
    assert load_recipe("tiny", ["check.expected=/srv/gold.log"]).expected_log() == Path("/srv/gold.log")


# ---- Strategy and TrainConfig -------------------------------------------------------------------------------------

def test_explicit_strategies_are_never_resolved():
    for s in Strategy:
        if s is not Strategy.AUTO:
            for acc, gpus, prec in (("gpu", 1, "bf16"), ("gpu", 4, "fp32"), ("cpu", 2, "fp32")):
                assert s.resolved_for(acc, gpus, prec) is s


@pytest.mark.parametrize("acc, gpus, prec, want", [
    ("gpu", 1, "bf16", Strategy.SINGLE), ("gpu", 2, "bf16", Strategy.DDP), ("gpu", 16, "bf16", Strategy.DDP),
    ("gpu", 1, "fp32", Strategy.DEEPSPEED_STAGE_2), ("gpu", 4, "fp32", Strategy.DEEPSPEED_STAGE_2),
    ("cpu", 1, "bf16", Strategy.AUTO), ("cpu", 2, "fp32", Strategy.AUTO),
])
def test_auto_resolution(acc, gpus, prec, want):
    assert Strategy.AUTO.resolved_for(acc, gpus, prec) is want


def test_strategy_parse_and_trainconfig():
    assert Strategy.parse("ddp") is Strategy.DDP and Strategy.parse(Strategy.SINGLE) is Strategy.SINGLE
    for bad in ("DDP", "", 3):
        with pytest.raises(UserError) as excinfo:
            Strategy.parse(bad)
        assert str(excinfo.value) == f"train.strategy {bad!r} unknown; choose one of {ALL_STRATEGIES}"
    assert TrainConfig().strategy is Strategy.DEEPSPEED_STAGE_2
    assert TrainConfig(strategy="ddp").strategy is Strategy.DDP
    with pytest.raises(UserError, match="train.strategy 'fsdp' unknown"):
        TrainConfig(strategy="fsdp")
    assert TrainConfig(devices=3, num_nodes=2).gpus == 6


def test_clipping_follows_the_optimizer():
    """The optimizer clips when it owns fp32 masters (single, ddp) or is DeepSpeed's; else Lightning does."""
    assert [s.value for s in Strategy if s.clips_in_optimizer] == [
        "single", "ddp", "deepspeed_stage_2", "deepspeed_stage_2_offload", "deepspeed_stage_3",
        "deepspeed_stage_3_offload"]


def test_batch_properties():
    r = load_recipe("tiny", ["train.micro_bsz=4", "train.devices=3", "train.num_nodes=2", "train.epoch_steps=0"])
    assert (r.real_bsz, r.epoch_steps, r.tokens_per_step) == (24, 40320 // 24, 24 * 64)


# ---- plan.py -------------------------------------------------------------------------------------------------------

def test_parameter_count_by_hand():
    """Per layer: time mix 4 C^2 (r, k, v, output) + 2 C (dw + da + dv + dg) LoRA + 11 C (x_r..x_g, w0, a0, v0,
    k_k, k_a) + C (r_k, H x N) + 2 C (ln_x); channel mix 8 C^2 + C; ln1, ln2 4 C. Once: emb and head 2 V C, ln0 and
    ln_out 4 C. LoRA ranks max(32, round(m sqrt(C) / 32) 32), m = 2.5, 2.5, 1.7, 5."""
    # C 96, L 2, V 512, head 32: ranks 32, 32, 32, 64 (sum 160)
    per_layer = 12 * 96 ** 2 + 19 * 96 + 2 * 96 * 160
    r = load_recipe("tiny", ["model.n_embd=96", "model.head_size=32"])
    assert count_parameters(r) == 2 * 512 * 96 + 4 * 96 + 2 * per_layer == 384_960
    # 0.1b, C 768, L 12, V 65536: ranks 64, 64, 32, 128 (sum 288)
    per_layer = 12 * 768 ** 2 + 19 * 768 + 2 * 768 * 288
    assert count_parameters(load_recipe("0.1b")) == 2 * 65536 * 768 + 4 * 768 + 12 * per_layer == 191_084_544


@pytest.mark.parametrize("strategy, N, want", [
    # single / ddp: 2 bf16 weights + 2 bf16 grads + 12/N fp32 master and Adam (+ 2/N reduced grad shard if N > 1);
    # inside the step 4/N fp32 grads; no host memory
    (Strategy.SINGLE, 1, (16 * 1200, 4 * 1200, 0.0)),
    (Strategy.DDP, 1, (16 * 1200, 4 * 1200, 0.0)),
    (Strategy.DDP, 2, (4 * 1200 + 6 * 1200 + 1200, 2 * 1200, 0.0)),
    (Strategy.DDP, 4, (4 * 1200 + 3 * 1200 + 600, 1200, 0.0)),
    # ZeRO-2: 4 resident + 12/N sharded + one bucket; offload sends the 12/N to the host
    (Strategy.DEEPSPEED_STAGE_2, 4, (4 * 1200 + 3 * 1200 + 5000, 0.0, 0.0)),
    (Strategy.DEEPSPEED_STAGE_2_OFFLOAD, 4, (4 * 1200 + 5000, 0.0, 3 * 1200)),
    # ZeRO-3: 16/N + a bucket; offload keeps the 4/N bf16 weights on the GPU and sends 12/N to the host
    (Strategy.DEEPSPEED_STAGE_3, 4, (4 * 1200 + 5000, 0.0, 0.0)),
    (Strategy.DEEPSPEED_STAGE_3_OFFLOAD, 4, (1200 + 5000, 0.0, 3 * 1200)),
])
def test_state_bytes_by_hand(strategy, N, want):
    assert state_bytes(strategy, 1200, N, 5000.0) == want


def test_plan_figures_and_the_fit_boundary():
    """tiny at C 96, head 32 (P = 384,960): n = 8 x 64 = 512 tokens, V 512, L 2, grad_cp 0, 200 MB buckets.
    head 512*512*2 + 1024*512*4 = 2,621,440; block 80*512*96 = 3,932,160; work 2 block + head = 10,485,760."""
    r = load_recipe("tiny", ["model.n_embd=96", "model.head_size=32"])
    P, work, bucket = 384_960, 10_485_760, 200e6
    want = {  # strategy: (GPU bytes, host bytes)
        "single": (16 * P + work, 0),
        "deepspeed_stage_2": (16 * P + bucket + work, 0),
        "deepspeed_stage_2_offload": (4 * P + bucket + work, 12 * P),
        "deepspeed_stage_3": (16 * P + bucket + work, 0),
        "deepspeed_stage_3_offload": (4 * P + bucket + work, 12 * P),
    }
    single_gib = (16 * P + work) / GIB
    est = {e.strategy.value: e for e in plan(r, 1, single_gib)}
    assert list(est) == list(want)
    for name, (gpu, host) in want.items():
        assert est[name].gpu_gib * GIB == pytest.approx(gpu, rel=1e-12)
        assert est[name].host_gib * GIB == pytest.approx(host, rel=1e-12)
        assert est[name].tokens_per_s is None  # not a measured shape
    # exactly the estimate fits; a hair less does not
    assert [n for n, e in est.items() if e.fits] == ["single"]
    assert not plan(r, 1, math.nextafter(single_gib, 0))[0].fits
    # host memory: exactly the offloaded state fits, a hair less does not (single needs none)
    host = 12 * P / GIB
    fits = {e.strategy.value: e.fits for e in plan(r, 1, 1.0, host)}
    assert fits == {"single": True, "deepspeed_stage_2": True, "deepspeed_stage_2_offload": True,
                    "deepspeed_stage_3": False, "deepspeed_stage_3_offload": False}
    fits = {e.strategy.value: e.fits for e in plan(r, 1, 1.0, math.nextafter(host, 0))}
    assert fits["deepspeed_stage_2_offload"] is False and fits["deepspeed_stage_2"] is True
    assert [e.strategy.value for e in plan(r, 2, 1.0)][0] == "ddp"


def test_plan_notes_unsupported_strategies():
    for e in plan(load_recipe("tiny"), 1, 1e6, 1e6):
        if e.strategy in ("deepspeed_stage_3", "deepspeed_stage_3_offload"):
            assert (e.note, e.fits) == ("not supported yet (recipe validation refuses it)", False)
        else:
            assert (e.note, e.fits) == ("", True)


@pytest.mark.parametrize("overrides, grad_cp", [([], 1), (["train.grad_cp=0"], 0)])
def test_plan_reports_measured_throughput_for_the_measured_shape_only(overrides, grad_cp):
    tokens = {e.strategy.value: e.tokens_per_s for e in plan(load_recipe("0.1b", overrides), 1, 80.0)}
    for name, tok in tokens.items():
        measured = MEASURED_H200.get((12, 768, name, grad_cp))
        assert tok == (measured[0] if measured else None), name
    assert tokens["single"] is not None and tokens["deepspeed_stage_2"] is not None
    for other in (["train.micro_bsz=8"], ["train.ctx_len=1024"]):
        assert {e.tokens_per_s for e in plan(load_recipe("0.1b", overrides + other), 1, 80.0)} == {None}


def test_recommend_prefers_the_fastest_measured_fit():
    def est(strategy, tok, fits):
        return Estimate(Strategy(strategy), 1.0, 0.0, tok, fits)

    unmeasured = est("single", None, True)
    slow, fast = est("deepspeed_stage_2", 100.0, True), est("deepspeed_stage_3", 200.0, True)
    fastest_but_too_big = est("deepspeed_stage_2_offload", 300.0, False)
    assert recommend([unmeasured, slow, fastest_but_too_big, fast]) is fast
    assert recommend([unmeasured, est("deepspeed_stage_2", None, True)]) is unmeasured
    assert recommend([est("deepspeed_stage_2", None, False), unmeasured]) is unmeasured
    assert recommend([fastest_but_too_big]) is None and recommend([]) is None



@pytest.mark.parametrize("value", ["-3", "2"])
def test_grad_cp_is_on_or_off(value):
    assert refused([f"train.grad_cp={value}"]) == \
        f"train.grad_cp must be 0 (keep activations) or 1 (recompute them), got {value}"


@pytest.mark.parametrize("value", ["0", "-5"])
def test_deepspeed_buckets_are_positive(value):
    assert refused([f"train.ds_bucket_mb={value}"]) == f"train.ds_bucket_mb must be > 0, got {value}"
