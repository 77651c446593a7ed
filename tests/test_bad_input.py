"""Bad input, catalogued: every kind fails before training starts with exit 2, exactly one `error:` line on stderr
naming the problem, no traceback, and nothing half-written where an output path was given. Plus the secrets check:
HF_TOKEN / WANDB_API_KEY never reach run.json, train_log.txt or metrics.jsonl, and every torch.load is weights_only.
"""
import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rwkv7.data.binidx import write_binidx

ROOT = Path(__file__).resolve().parent.parent


def assert_clean_error(result, *words):
    code, out, err = result
    assert code == 2, (code, out[-2000:], err[-2000:])
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and len(lines[0]) > len("error: ")
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    assert "Traceback" not in out + err
    return lines[0]


def no_files(path: Path) -> bool:
    return not path.exists() or not any(p.is_file() for p in path.rglob("*"))


def binidx(prefix):
    return ["data.source=binidx", f"data.path={prefix}"]


# ---- recipe and --set --------------------------------------------------------------------------------------------

def test_unknown_recipe(cli, tmp_path):
    assert_clean_error(cli("train", "--recipe", "no-such-recipe", "--out", tmp_path / "run"), "unknown recipe",
                       "no-such-recipe")
    assert no_files(tmp_path / "run")


def test_malformed_toml_recipe(cli, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nn_layer = \n")
    assert_clean_error(cli("train", "--recipe", bad, "--out", tmp_path / "run"), "not valid TOML", "bad.toml")
    assert no_files(tmp_path / "run")


def test_unknown_section(cli):
    assert_clean_error(cli("init", "--set", "optim.lr=1"), "unknown section [optim]")


def test_unknown_key(cli):
    assert_clean_error(cli("train", "--set", "train.learning_rate=1"), "unknown key train.learning_rate")


def test_set_without_equals(cli):
    assert_clean_error(cli("train", "--set", "train.micro_bsz"), "section.key=value")


def test_set_wrong_type(cli):
    assert_clean_error(cli("train", "--set", "train.micro_bsz=abc"), "train.micro_bsz must be a int", "'abc'")


def test_n_embd_not_multiple_of_head_size(cli):
    assert_clean_error(cli("train", "--set", "model.n_embd=96"), "model.n_embd (96)", "multiple of model.head_size")


def test_batch_not_dividing_mini_epoch(cli):
    assert_clean_error(cli("train", "--set", "train.epoch_steps=0", "train.micro_bsz=11"), "must divide 40320")


def test_lr_final_above_lr_init(cli):
    assert_clean_error(cli("train", "--set", "train.lr_init=1e-3", "train.lr_final=1e-2"),
                       "train.lr_final (0.01) must be <= train.lr_init")


def test_magic_prime_not_prime(cli, tmp_path, small_binidx):
    out = tmp_path / "run"
    assert_clean_error(cli("train", "--out", out, "--set", *binidx(small_binidx), "data.magic_prime=100"),
                       "data.magic_prime 100", "prime")
    assert no_files(out)


# ---- hardware ----------------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_recipe_on_cpu_machine(cli, tmp_path):
    out = tmp_path / "run"
    line = assert_clean_error(cli("train", "--recipe", "0.1b", "--out", out), "needs a CUDA GPU")
    assert "tiny" in line
    assert no_files(out)


# ---- data --------------------------------------------------------------------------------------------------------

def test_binidx_path_missing(cli, tmp_path):
    out = tmp_path / "run"
    assert_clean_error(cli("train", "--out", out, "--set", *binidx("/nonexistent/corpus")), "/nonexistent/corpus",
                       "not found")
    assert no_files(out)


def test_truncated_bin(cli, tmp_path):
    prefix = tmp_path / "cut"
    write_binidx(prefix, [np.arange(1, 400) % 500 for _ in range(10)])
    bin_path = prefix.with_suffix(".bin")
    bin_path.write_bytes(bin_path.read_bytes()[:-100])
    out = tmp_path / "run"
    assert_clean_error(cli("train", "--out", out, "--set", *binidx(prefix)), "cut.bin", "shorter than its index")
    assert no_files(out)


def test_token_id_beyond_vocab(cli, tmp_path):
    prefix = tmp_path / "wide"
    docs = [np.arange(1, 400) for _ in range(10)]
    docs[5][7] = 600  # the tiny recipe's vocab_size is 512
    write_binidx(prefix, docs)
    out = tmp_path / "run"
    assert_clean_error(cli("train", "--out", out, "--set", *binidx(prefix)), "token id 600 >= vocab_size 512")
    assert no_files(out)


# ---- weights and checkpoints -------------------------------------------------------------------------------------

def test_load_model_garbage(cli, tmp_path, small_binidx):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(np.random.default_rng(1).bytes(4096))
    out = tmp_path / "run"
    assert_clean_error(cli("train", "--out", out, "--load-model", junk, "--set", *binidx(small_binidx)),
                       "junk.pth", "not a readable PyTorch weights file")
    assert no_files(out)


def test_load_model_missing(cli, tmp_path, small_binidx):
    out = tmp_path / "run"
    assert_clean_error(cli("train", "--out", out, "--load-model", tmp_path / "gone.pth",
                           "--set", *binidx(small_binidx)), "gone.pth", "not found")
    assert no_files(out)


@pytest.mark.parametrize("meta", ["{not json", "[1, 2]", '{"fingerprint": "x"}'])
def test_corrupt_checkpoint_meta(cli, tmp_path, small_binidx, meta):
    out = tmp_path / "run"
    step = out / "ckpt" / "step-00000005"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(meta)
    assert_clean_error(cli("train", "--out", out, "--force-resume", "--set", *binidx(small_binidx)),
                       "step-00000005", "unreadable")
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["meta.json"]


# ---- other commands ----------------------------------------------------------------------------------------------

def test_check_missing_log(cli, tmp_path):
    expected = tmp_path / "expected.log"
    expected.write_text("0 5.0 148.4 0.00200000 2026-01-01 00:00:00.000000 0\n")
    assert_clean_error(cli("check", "--log", tmp_path / "nope" / "train_log.txt", "--expected", expected),
                       "log file not found", "train_log.txt")
    assert not (tmp_path / "nope").exists()


def test_init_out_under_a_regular_file(cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert_clean_error(cli("init", "--out", blocker / "sub" / "rwkv-init.pth"), str(blocker), "not a folder")
    assert blocker.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_train_out_under_a_regular_file(cli, tmp_path, small_binidx):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_clean_error(cli("train", "--out", blocker / "run", "--set", *binidx(small_binidx)), "run folder",
                       "not a folder")


def test_doctor_fails_on_missing_data(cli, tmp_path):
    code, out, err = result = cli("doctor", "--out", tmp_path / "run", "--set", *binidx("/nonexistent/corpus"))
    assert_clean_error(result, "doctor", "data")
    fails = [line for line in out.splitlines() if line.startswith("fail")]
    assert len(fails) == 1 and "data" in fails[0] and "/nonexistent/corpus" in fails[0], out
    assert no_files(tmp_path / "run")


def test_doctor_passes_on_good_input(cli, tmp_path, small_binidx):
    code, out, err = cli("doctor", "--out", tmp_path / "run", "--set", *binidx(small_binidx))
    assert code == 0, out + err
    rows = {line.split()[1]: line.split()[0] for line in out.splitlines() if line.split()[:1] in (["ok"], ["warn"])}
    assert {"gpu", "deepspeed", "data", "disk"} <= set(rows), out
    assert rows["data"] == "ok" and "estimate" in out
    assert no_files(tmp_path / "run")


# ---- secrets -----------------------------------------------------------------------------------------------------

def test_secrets_stay_out_of_run_files(cli, tmp_path, small_binidx, monkeypatch):
    secrets = {"HF_TOKEN": "hf_FAKEtoken1234567890abcdef", "WANDB_API_KEY": "0123456789abcdefFAKEwandbKEY"}
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "run"
    code, stdout, stderr = cli("train", "--out", out, "--set", *binidx(small_binidx), "train.epoch_steps=3",
                               "train.epoch_count=1", "--no-progress", "--no-check")
    assert code == 0, stdout[-2000:] + stderr[-2000:]
    texts = {name: (out / name).read_text() for name in ("run.json", "train_log.txt", "metrics.jsonl")}
    texts["doctor"] = cli("doctor", "--out", out, "--set", *binidx(small_binidx))[1]
    texts["output"] = stdout + stderr
    for name, text in texts.items():
        for k, v in secrets.items():
            assert v not in text, f"{k} leaked into {name}"
    assert "WANDB_API_KEY set" in texts["doctor"]
    info = json.loads(texts["run.json"])
    assert set(info) <= {"recipe", "fingerprint", "data", "n_tokens", "magic_prime", "my_exit_tokens", "python",
                         "torch", "numpy", "cuda", "time", "gpu"}, sorted(info)


def test_every_torch_load_is_weights_only():
    """No pickle code runs on load: each torch.load call in the package passes weights_only=True."""
    calls = 0
    for path in (ROOT / "rwkv7").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                calls += 1
                kw = {k.arg: k.value for k in node.keywords}
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                    f"{path.relative_to(ROOT)}:{node.lineno}"
    assert calls >= 2
