"""The CPU loss regression: `tiny` trained end to end matches recipes/expected/tiny.log, and a broken model fails."""
import json

import pytest

from rwkv7 import init as rwkv_init
from rwkv7.recipe import load_recipe
from rwkv7.trajectory import parse_log


def test_tiny_end_to_end_matches_expected_log(tmp_path, cli):
    out = tmp_path / "run"
    code, stdout, _ = cli("train", "--recipe", "tiny", "--out", out, "--no-progress")
    assert code == 0, stdout[-2000:]
    result = json.loads((out / "check.json").read_text())
    assert result["passed"] and len(result["rows"]) == 8
    assert (out / "loss.png").stat().st_size > 10_000
    val = (out / "val_log.txt").read_text().split("\n")
    assert float(val[-2].split()[1]) < float(val[0].split()[1])  # held-out loss falls too
    logged = parse_log(out / "train_log.txt")
    assert logged[-1].loss < logged[0].loss - 1.5


def test_expected_tiny_log_is_from_the_current_recipe():
    text = load_recipe("tiny").expected_log().read_text()
    assert f"fingerprint {load_recipe('tiny').fingerprint()}" in text, "recipe changed: run `make golden`"


@pytest.mark.parametrize("broken", ["emb", "head"])
def test_a_wrong_init_constant_fails_the_regression(tmp_path, cli, monkeypatch, broken):
    """One wrong constant in the official init (the embedding's U(±1e-4) range as ±1e-2, or the head's
    0.5*sqrt(V/C) gain doubled) must make the loss check fail over the first mini-epoch."""
    real = rwkv_init.matrix_rule

    def wrong(name, shape, vocab, n_embd):
        rule, gain = real(name, shape, vocab, n_embd)
        if broken == "emb" and name == "emb.weight":
            gain = 1e-2
        if broken == "head" and name == "head.weight":
            gain *= 2
        return rule, gain

    monkeypatch.setattr(rwkv_init, "matrix_rule", wrong)
    out = tmp_path / "run"
    code, stdout, _ = cli("train", "--recipe", "tiny", "--out", out, "--no-progress",
                          "--set", "train.epoch_count=1")
    assert code == 1, stdout[-2000:]
    check = json.loads((out / "check.json").read_text())
    assert not check["passed"] and [row["ok"] for row in check["rows"]] == [False]  # the loss itself, not the length
