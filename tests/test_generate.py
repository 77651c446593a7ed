"""Generation (parallel prefill + RNN decoding), held-out loss, compatibility with the `rwkv` package, CLI errors."""
from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rwkv7.cli as cli
from rwkv7.checkpoint import load_weights, save_weights
from rwkv7.data.binidx import write_binidx
from rwkv7.errors import UserError
from rwkv7.evaluate import evaluate_loss
from rwkv7.generate import RNNDecoder, generate, prefill, prefill_chunks, sample
from rwkv7.init import init_model
from rwkv7.model import RWKV7, ModelShape

VOCAB = 300


def perturbed_model(n_layer=3, n_embd=128, vocab=VOCAB, seed=0, scale=0.1) -> RWKV7:
    """Official init, then seeded noise on every parameter (the init zeroes att.output / ffn.value, so an
    unperturbed model ignores most of its mixing paths)."""
    model = init_model(RWKV7(ModelShape(n_layer, n_embd, vocab, 64)), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (and thrash on a busy CI runner)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    return perturbed_model()


@pytest.fixture(scope="module")
def weights(tmp_path_factory, model):
    """The model saved as the trainer saves it (bf16, official names) and reloaded in fp32."""
    path = tmp_path_factory.mktemp("w") / "rwkv-final.pth"
    save_weights(model, path)
    return path, load_weights(path, dtype=torch.float32)


def ids(n, seed=0, vocab=VOCAB):
    return torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---- RNN mode == parallel mode ------------------------------------------------------------------------------------

def test_prefill_then_rnn_decode_matches_parallel_forward(model):
    x = torch.tensor([ids(29, 1), ids(29, 2)])
    with torch.no_grad():
        full = model(x)  # [2, 29, V]
        last, state = prefill(model, x[:, :11])
        steps = [last]
        decoder = RNNDecoder(model, state)
        for t in range(11, 29):
            steps.append(decoder.step(x[:, t]).float())
    assert (full[:, 10] - steps[0]).abs().max() <= 1e-5
    rnn = torch.stack(steps, 1)  # logits at positions 10..28
    assert full.abs().max() > 1.0  # a perturbed model has non-trivial logits
    assert (full[:, 10:] - rnn).abs().max() <= 1e-5


def test_chunked_prefill_equals_one_pass(model):
    """The CUDA path splits the prompt into kernel-sized chunks plus a tail: the state carries exactly."""
    assert prefill_chunks(37, 16, 32) == [32, 5]
    assert prefill_chunks(45, 16, 64) == [32, 13]
    assert prefill_chunks(48, 16, 64) == [48]
    assert prefill_chunks(7, 16, 64) == [7]
    x = torch.tensor([ids(45, 3)])
    with torch.no_grad():
        whole, s1 = prefill(model, x, align=1, chunk=64)
        split, s2 = prefill(model, x, align=16, chunk=16)  # 16 + 16 + 13
        full = model(x)[:, -1]
    assert (whole - full).abs().max() <= 1e-5
    assert (split - full).abs().max() <= 1e-5
    assert (s1[-1][0][1] - s2[-1][0][1]).abs().max() <= 1e-5


# ---- sampling -----------------------------------------------------------------------------------------------------

def test_sampling_greedy_top_p_and_seed():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0], [5.0, 0.0, 0.0, 0.0]])
    assert sample(logits, temperature=0).tolist() == [1, 0]
    # top_p 0.5: only the single most likely token survives in each row
    g = torch.Generator().manual_seed(0)
    assert all(sample(logits, 1.0, 0.5, g).tolist() == [1, 0] for _ in range(50))
    # top_p just above the top token's mass: exactly the top two tokens of row 0 can appear
    p = torch.softmax(logits[0], -1)
    seen = {int(sample(logits[:1], 1.0, float(p[1]) + 1e-3, g)) for _ in range(300)}
    assert seen == {1, 2}
    a = [sample(logits, 1.0, 1.0, torch.Generator().manual_seed(7)).tolist() for _ in range(2)]
    assert a[0] == a[1]
    with pytest.raises(ValueError):
        sample(logits, 1.0, 0.0)


def test_generate_is_seedable_and_stops_at_eod(model):
    prompt = ids(9, 4)
    r1 = generate(model, [prompt] * 2, 12, temperature=1.0, top_p=0.9, seed=3)
    r2 = generate(model, [prompt] * 2, 12, temperature=1.0, top_p=0.9, seed=3)
    assert r1.tokens == r2.tokens and len(r1.tokens[0]) == 12 and r1.decode_steps == 11
    greedy = generate(model, [prompt], 12, temperature=0).tokens[0]
    stop = greedy[4]
    cut = generate(model, [prompt], 12, temperature=0, stop_token=stop).tokens[0]
    assert cut == greedy[:greedy.index(stop) + 1]


# ---- the `rwkv` package (rwkv 0.8.32) loads our checkpoint and generates the same tokens ----------------------------

def rwkv_package_model(path, monkeypatch):
    monkeypatch.setenv("RWKV_V7_ON", "1")  # read when rwkv.model is imported
    monkeypatch.setenv("RWKV_CUDA_ON", "0")
    mod = importlib.import_module("rwkv.model")
    if mod.RWKV.__name__ != "RWKV_x070":  # imported earlier without RWKV_V7_ON
        mod = importlib.reload(mod)
    return mod.RWKV(model=str(path)[:-len(".pth")], strategy="cpu fp32")


def test_greedy_matches_rwkv_package(weights, monkeypatch):
    path, ours = weights
    theirs = rwkv_package_model(path, monkeypatch)
    prompt = ids(21, 5)
    n = 24
    logits, state = theirs.forward(prompt, None)
    their_first = logits.float().clone()
    ref = []
    for _ in range(n):
        tok = int(torch.argmax(logits))
        ref.append(tok)
        logits, state = theirs.forward([tok], state)
    with torch.no_grad():
        our_first, _ = prefill(ours, torch.tensor([prompt]))
    assert (our_first[0] - their_first).abs().max() <= 1e-4
    got = generate(ours, [prompt], n, temperature=0).tokens[0]
    assert len(set(ref)) > 2  # not a degenerate repetition
    assert got == ref


# ---- held-out loss ------------------------------------------------------------------------------------------------

def test_evaluate_loss_equals_direct_computation(model):
    toks = np.asarray(ids(150, 6), dtype=np.uint16)
    loss, n = evaluate_loss(model, toks, ctx_len=16, max_tokens=140, batch=3)
    windows = (140 - 1) // 16  # 8 whole windows
    assert n == windows * 16
    with torch.no_grad():
        t = torch.from_numpy(toks.astype(np.int64))
        ces = []
        for i in range(windows):
            w = t[i * 16:(i + 1) * 16 + 1]
            ces.append(F.cross_entropy(model(w[None, :-1])[0], w[1:], reduction="none"))
        direct = torch.cat(ces).double().mean().item()
    assert math.isclose(loss, direct, rel_tol=1e-6)
    assert model.training is False
    model.train()
    evaluate_loss(model, toks, ctx_len=16, batch=4)
    assert model.training is True  # restored
    model.eval()
    with pytest.raises(UserError):
        evaluate_loss(model, toks, ctx_len=200)
    with pytest.raises(UserError):
        evaluate_loss(model, np.full(40, VOCAB, np.uint16), ctx_len=16)


def test_eval_cli_json(weights, tmp_path, capsys):
    path, ours = weights
    toks = np.asarray(ids(200, 7), dtype=np.uint16)
    write_binidx(tmp_path / "val", [toks[:120], toks[120:]])
    rc = cli.main(["eval", "--model", str(path), "--data", str(tmp_path / "val"), "--ctx-len", "32",
                   "--tokens", "150", "--batch", "2", "--device", "cpu", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    res = json.loads(out)
    loss, n = evaluate_loss(ours, toks, 32, 150, 2)
    assert res["tokens"] == n == 128 and res["windows"] == 4
    assert math.isclose(res["loss"], loss, rel_tol=1e-9)
    assert math.isclose(res["perplexity"], math.exp(loss), rel_tol=1e-9)


# ---- CLI ----------------------------------------------------------------------------------------------------------

def test_generate_cli_ids(weights, capsys):
    path, ours = weights
    prompt = ids(6, 8)
    rc = cli.main(["generate", "--model", str(path), "--prompt", " ".join(map(str, prompt)), "--tokens", "10",
                   "--temperature", "0", "--device", "cpu", "--ignore-eod"])
    cap = capsys.readouterr()
    assert rc == 0
    head, tail = cap.out.split("|")
    assert [int(s) for s in head.split()] == prompt
    assert [int(s) for s in tail.split()] == generate(ours, [prompt], 10, temperature=0).tokens[0]
    assert "tok/s" in cap.err and "prefill" in cap.err and "decode" in cap.err


def test_generate_cli_world_tokenizer(tmp_path, capsys):
    """A vocab-65536 model picks the World tokenizer: prompt text is echoed and continued."""
    model = init_model(RWKV7(ModelShape(2, 64, 65536, 64)), 0)
    save_weights(model, tmp_path / "w.pth")
    rc = cli.main(["generate", "--model", str(tmp_path / "w"), "--prompt", "Hello, world", "--tokens", "3",
                   "--seed", "1", "--device", "cpu", "--ignore-eod"])
    cap = capsys.readouterr()
    assert rc == 0 and cap.out.startswith("Hello, world")
    assert "prefill 3 tokens" in cap.err  # "Hello", ",", " world"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


@pytest.mark.parametrize("extra, needle", [
    (["--prompt", ""], "prompt"),
    (["--prompt", "1 2", "--tokens", "0"], "--tokens"),
    (["--prompt", "1 2", "--tokens", "-5"], "--tokens"),
    (["--prompt", "1 2", "--top-p", "0"], "--top-p"),
    (["--prompt", "1 2", "--top-p", "1.5"], "--top-p"),
    (["--prompt", "1 2", "--temperature", "-1"], "--temperature"),
    (["--prompt", "1 x"], "token ids"),
    (["--prompt", f"1 {VOCAB}"], "vocabulary"),
    (["--prompt", "hi", "--tokenizer", "world"], "65536"),
])
def test_generate_cli_bad_input(weights, capsys, extra, needle):
    path, _ = weights
    assert cli.main(["generate", "--model", str(path), "--device", "cpu", *extra]) == 2
    assert needle in one_error_line(capsys)


def test_cli_bad_model_files(tmp_path, capsys):
    missing = tmp_path / "nope.pth"
    foreign = tmp_path / "foreign.pth"
    torch.save({"layer.weight": torch.zeros(3, 3)}, foreign)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    for f, needle in ((missing, "not found"), (foreign, "not an RWKV-7"), (garbage, "not a readable")):
        assert cli.main(["generate", "--model", str(f), "--prompt", "1 2", "--device", "cpu"]) == 2
        assert needle in one_error_line(capsys)
    write_binidx(tmp_path / "val", [np.arange(1, 50, dtype=np.uint16)])
    assert cli.main(["eval", "--model", str(foreign), "--data", str(tmp_path / "val"), "--device", "cpu"]) == 2
    assert "not an RWKV-7" in one_error_line(capsys)
    assert cli.main(["eval", "--model", str(foreign), "--data", str(tmp_path / "absent"), "--device", "cpu"]) == 2
    assert "not found" in one_error_line(capsys)


def test_checkpoint_with_other_lora_ranks_loads(tmp_path):
    """Released checkpoints (e.g. G1) use LoRA ranks other than the training formula: load_model reads them."""
    import torch

    from rwkv7 import load_model
    from rwkv7.checkpoint import save_weights
    from rwkv7.init import init_model
    from rwkv7.model import ModelShape, RWKV7

    model = init_model(RWKV7(ModelShape(2, 128, 300, lora=(32, 64, 32, 96))), seed=1)
    save_weights(model, tmp_path / "m.pth", dtype=torch.float32)
    loaded = load_model(tmp_path / "m.pth")
    assert loaded.shape.lora == (32, 64, 32, 96)
    assert loaded.blocks[1].att.g1.shape == (128, 96)
    idx = torch.randint(0, 300, (1, 8))
    assert torch.equal(loaded(idx), model.eval()(idx))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_state_layout_dtypes_and_device(dtype):
    """Per layer ((last x of time mixing, wkv state), last x of channel mixing): the x's in the model's dtype, the
    wkv state [B, H, N, N] in fp32 whatever the model's dtype, all zeros, on the model's device unless one is given."""
    from rwkv7.model import ModelShape, RWKV7

    model = RWKV7(ModelShape(n_layer=2, n_embd=128, vocab_size=97, head_size=64)).to(dtype)
    state = model.zero_state(3)
    assert len(state) == 2
    for (att_x, wkv), ffn_x in state:
        assert att_x.shape == ffn_x.shape == (3, 128) and att_x.dtype == ffn_x.dtype == dtype
        assert wkv.shape == (3, 2, 64, 64) and wkv.dtype == torch.float32
        assert not att_x.any() and not wkv.any() and not ffn_x.any()
        assert att_x.device.type == wkv.device.type == ffn_x.device.type == "cpu"
    on_meta = model.to("meta").zero_state(1)
    assert all(t.device.type == "meta" for (a, w), f in on_meta for t in (a, w, f))  # the model's device
    given = model.zero_state(1, device="cpu")
    assert all(t.device.type == "cpu" for (a, w), f in given for t in (a, w, f))
