"""Alignment with the official RWKV-7 trainer (BlinkDL/RWKV-LM RWKV-v7/train_temp) and the `rwkv` pip package.

Every fact checked here is listed, with its source, in docs/ALIGNMENT.md. CPU only; the whole file runs in well
under a minute. The `rwkv` package is run in a subprocess (it must see RWKV_V7_ON=1 at import time and it changes
process-wide torch JIT settings), so this process never imports it.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rwkv7
from rwkv7.checkpoint import save_weights
from rwkv7.data.binidx import open_binidx, write_binidx
from rwkv7.data.magic import is_prime, magic_prime
from rwkv7.data.sampler import MagicPrimeWindows, chunk_index, global_position, golden_factor
from rwkv7.init import channel_vectors, init_model, optimizer_group
from rwkv7.model import ModelShape, RWKV7, lora_rank
from rwkv7.train.module import lm_loss, param_groups
from rwkv7.train.schedule import learning_rate, total_steps
from rwkv7.trajectory import parse_log
from rwkv7.wkv import decay_from_logit, wkv7_reference

REPO = Path(__file__).resolve().parents[1]
EXPECTED_01B = REPO / "recipes" / "expected" / "0.1b-minipile.log"

# ---------------------------------------------------------------------------------------------------------------
# (a) our checkpoints load in the `rwkv` pip package (0.8.32) and give the same logits

PIP_SHAPES = [ModelShape(n_layer=2, n_embd=128, vocab_size=512), ModelShape(n_layer=3, n_embd=256, vocab_size=1000)]
PIP_T = 24
PIP_TOL = 1e-5  # max|Δ| / std(ref), as RWKV-v7/rwkv_v7_numpy.py reports it
# fp32 round-off alone (our fp32 vs our fp64) is ~5e-6 on these perturbed models: ln_x (eps 64e-5) can amplify a
# head whose wkv output is tiny by up to 1/sqrt(64e-5) = 40x. The seeds below measure 3.6e-6 and 4.1e-6 against the
# pip package; any real formula difference moves the logits by > 2e-4 (test_every_parameter_reaches_the_logits).

# Runs in a fresh interpreter: RWKV_V7_ON must be set before `rwkv.model` is imported.
PIP_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["RWKV_V7_ON"] = "1"
    os.environ["RWKV_CUDA_ON"] = "0"
    import torch
    from rwkv.model import RWKV
    out = {}
    for prefix, tokens in zip(sys.argv[2::2], sys.argv[3::2]):
        model = RWKV(model=prefix, strategy="cpu fp32")
        logits, state = model.forward([int(t) for t in tokens.split(",")], None, full_output=True)
        out[prefix] = logits.float().clone()
    torch.save(out, sys.argv[1])
""")


@torch.no_grad()
def perturbed_model(shape: ModelShape, seed: int) -> RWKV7:
    """Official init, then seeded noise on every parameter, so that no component is trivial at the logits.

    The official init zeroes att.output, ffn.value and the LoRA first matrices (w1, a1, v1, g1), and sets constant
    vectors (k_a, r_k, LayerNorms); left like that, most of the block would not reach the logits at all.
    """
    model = init_model(RWKV7(shape), seed=seed, bf16_round=False)
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if p.dim() == 2 and not p.any():  # zero-init matrices: a real random matrix of unit-ish gain
            p.copy_(noise / math.sqrt(p.shape[0]))
        elif name.endswith("att.r_k"):  # -0.04 everywhere: give the bonus term a visible size and sign mix
            p.add_(0.3 * noise)
        elif name.endswith((".w2", ".a2", ".v2", ".g2")):  # ortho 0.1: make the LoRAs move decay, a, v, g a lot
            p.mul_(5.0).add_(0.1 * float(p.std()) * noise)
        else:
            std = float(p.std()) if p.numel() > 1 else 0.0
            scale = std if std > 0 else max(float(p.abs().mean()), 0.1)
            p.add_(0.1 * scale * noise)
    return model


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).abs().max() / ref.double().std())


@pytest.fixture(scope="module")
def pip_case(tmp_path_factory):
    """Two checkpoints of different shapes, saved by us in fp32, and the pip package's logits for each."""
    d = tmp_path_factory.mktemp("pip")
    cases, args = [], []
    for i, shape in enumerate(PIP_SHAPES):
        model = perturbed_model(shape, seed=10 + i)
        path = d / f"L{shape.n_layer}-D{shape.n_embd}-V{shape.vocab_size}.pth"
        save_weights(model, path, dtype=torch.float32)
        tokens = torch.randint(0, shape.vocab_size, (PIP_T,), generator=torch.Generator().manual_seed(i)).tolist()
        cases.append((shape, path, tokens))
        args += [str(path)[:-len(".pth")], ",".join(map(str, tokens))]
    out = d / "pip_logits.pt"
    env = dict(os.environ, RWKV_V7_ON="1", RWKV_CUDA_ON="0")
    proc = subprocess.run([sys.executable, "-c", PIP_SCRIPT, str(out), *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"rwkv pip package failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    ref = torch.load(out, weights_only=True)
    return [(shape, path, tokens, ref[str(path)[:-len(".pth")]]) for shape, path, tokens in cases]


def test_pip_package_version():
    from importlib.metadata import version

    assert version("rwkv") == "0.8.32"


@pytest.mark.parametrize("case", range(len(PIP_SHAPES)), ids=[f"L{s.n_layer}-D{s.n_embd}-V{s.vocab_size}"
                                                              for s in PIP_SHAPES])
def test_checkpoint_logits_match_rwkv_pip(pip_case, case):
    shape, path, tokens, ref = pip_case[case]
    model = rwkv7.load_model(path)
    assert model.emb.weight.dtype == torch.float32
    with torch.no_grad():
        ours = model(torch.tensor([tokens]))[0]
    assert ours.shape == ref.shape == (PIP_T, shape.vocab_size)
    assert float(ref.std()) > 0.1  # the logits are not trivial
    err = rel_err(ours, ref)
    assert err <= PIP_TOL, f"max|Δ|/std = {err:.3g} > {PIP_TOL}"


def test_checkpoint_comparison_detects_a_wrong_parameter(pip_case):
    """The comparison above can fail: change one parameter (k_a of the last layer) after saving."""
    shape, path, tokens, ref = pip_case[1]
    model = rwkv7.load_model(path)
    with torch.no_grad():
        model.blocks[-1].att.k_a.add_(0.5)
        ours = model(torch.tensor([tokens]))[0]
    assert rel_err(ours, ref) > 1e-3


def test_every_parameter_reaches_the_logits():
    """With the perturbed init, changing any parameter tensor moves the logits far beyond PIP_TOL, so the pip
    comparison covers every component; only blocks.0.att.v0/v1/v2 are unused (officially too)."""
    shape = PIP_SHAPES[0]
    model = perturbed_model(shape, seed=10)
    idx = torch.randint(0, shape.vocab_size, (1, PIP_T), generator=torch.Generator().manual_seed(0))
    unused = {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}
    with torch.no_grad():
        base = model(idx)
        for name, p in model.named_parameters():
            saved = p.clone()
            p.add_(0.05 * (p.abs().mean() + 0.1) * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
            err = rel_err(model(idx), base)
            p.copy_(saved)
            if name in unused:
                assert err == 0.0, name
            else:
                assert err > 20 * PIP_TOL, f"{name} barely changes the logits ({err:.2g})"


# ---------------------------------------------------------------------------------------------------------------
# (b) the wkv7 recurrence and the decay formula


def naive_wkv7(r, w, k, v, a, b, state):
    """The official kernel's loop, scalar by scalar, in float64, with the classic decay exp(-exp(w')),
    w' = -softplus(-z) - 0.5. State row i = value channel, column j = key channel."""
    B, T, H, N = r.shape
    S = state.double().clone()
    y = torch.zeros(B, T, H, N, dtype=torch.float64)
    wc = -F.softplus(-w.double()) - 0.5
    for bb in range(B):
        for h in range(H):
            for t in range(T):
                decay = [math.exp(-math.exp(float(wc[bb, t, h, j]))) for j in range(N)]
                for i in range(N):
                    sa = sum(float(S[bb, h, i, j]) * float(a[bb, t, h, j]) for j in range(N))
                    for j in range(N):
                        S[bb, h, i, j] = (S[bb, h, i, j] * decay[j] + sa * float(b[bb, t, h, j])
                                          + float(v[bb, t, h, i]) * float(k[bb, t, h, j]))
                for i in range(N):
                    y[bb, t, h, i] = sum(float(S[bb, h, i, j]) * float(r[bb, t, h, j]) for j in range(N))
    return y, S


def wkv_inputs(B=2, T=6, H=2, N=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda: torch.randn(B, T, H, N, generator=g, dtype=torch.float64)  # noqa: E731
    r, k, v, z = rnd(), rnd(), rnd(), 2 * rnd()
    kk = F.normalize(rnd(), dim=-1)
    icl = torch.sigmoid(rnd())
    state = torch.randn(B, H, N, N, generator=g, dtype=torch.float64)
    return r, z, k, v, -kk, kk * icl, state


def test_wkv7_reference_matches_naive_loop_with_state():
    r, z, k, v, a, b, s0 = wkv_inputs()
    y_ref, s_ref = naive_wkv7(r, z, k, v, a, b, s0)
    y, s = wkv7_reference(r, z, k, v, a, b, state=s0, return_state=True)
    # the state is fp32 for bf16/fp32 inputs, as in the kernels (fp64 inputs keep fp64: the tests' ground truth)
    for dtype in (torch.bfloat16, torch.float32):
        low = [t.to(dtype) for t in (r, z, k, v, a, b)]
        assert wkv7_reference(*low, state=s0.float(), return_state=True)[1].dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5
    # without a state argument: zero initial state, and y alone is returned
    y0_ref, _ = naive_wkv7(r, z, k, v, a, b, torch.zeros_like(s0))
    y0 = wkv7_reference(r, z, k, v, a, b)
    assert isinstance(y0, torch.Tensor) and rel_err(y0, y0_ref) < 1e-5
    assert rel_err(y0, y_ref) > 1e-2  # the initial state matters, so the check above can fail


def test_wkv7_state_carries_across_chunks():
    r, z, k, v, a, b, s0 = wkv_inputs(T=8, seed=1)
    y_full, s_full = wkv7_reference(r, z, k, v, a, b, state=s0, return_state=True)
    y1, s1 = wkv7_reference(r[:, :3], z[:, :3], k[:, :3], v[:, :3], a[:, :3], b[:, :3], state=s0, return_state=True)
    y2, s2 = wkv7_reference(r[:, 3:], z[:, 3:], k[:, 3:], v[:, 3:], a[:, 3:], b[:, 3:], state=s1, return_state=True)
    assert torch.allclose(torch.cat([y1, y2], 1), y_full, atol=1e-6)
    assert torch.allclose(s2, s_full, atol=1e-6)


def test_decay_formula_equals_official_classic_form():
    z = torch.linspace(-30, 30, 20001, dtype=torch.float64)
    ours = torch.exp(-math.exp(-0.5) * torch.sigmoid(z))
    classic = torch.exp(-torch.exp(-F.softplus(-z) - 0.5))
    assert torch.allclose(ours, classic, rtol=0, atol=1e-14)
    assert torch.allclose(decay_from_logit(z).double(), classic, rtol=0, atol=1e-6)
    assert float(classic.min()) > math.exp(-math.exp(-0.5)) - 1e-12 > 0.5452  # decay in (0.5452, 1)
    # the pip package's rounded constant 0.606531 agrees with exp(-0.5) to 4e-7
    assert abs(0.606531 - math.exp(-0.5)) < 4e-7


# ---------------------------------------------------------------------------------------------------------------
# (c) the learning-rate schedule

MINIPILE = dict(lr_init=6e-4, lr_final=6e-5, warmup_steps=10, tokens_per_step=16 * 512, exit_tokens=1498226207)


def test_lr_matches_official_minipile_log():
    records = parse_log(EXPECTED_01B)
    assert [r.epoch for r in records] == list(range(12))
    for rec in records:
        lr = learning_rate(2520 * (rec.epoch + 1) - 1, **MINIPILE)  # the lr of each mini-epoch's last step
        assert f"{lr:.8f}" == f"{rec.lr:.8f}", rec.epoch
    assert f"{records[0].lr:.8f}" == "0.00059975" and f"{records[2].lr:.8f}" == "0.00059773"


@pytest.mark.parametrize("step,lr,digits", [(0, 6.0e-6, 2), (1, 6.54e-5, 3), (9, 5.406e-4, 4), (10, 6.0e-4, 2),
                                            (2519, 5.99749e-4, 6), (5039, 5.98993e-4, 6), (90000, 3.36722e-4, 6),
                                            (182885, 6.0000e-5, 5)])
def test_lr_reference_vectors(step, lr, digits):
    got = learning_rate(step, **MINIPILE)
    assert float(f"{got:.{digits - 1}e}") == pytest.approx(lr, rel=1e-12), got


def test_lr_schedule_shape():
    assert total_steps(1498226207, 8192) == 182889
    assert 182889 * 8192 >= 1498226207 > 182888 * 8192
    assert learning_rate(10 ** 7, **MINIPILE) == pytest.approx(6e-5, rel=1e-12)  # clamped after the exit
    # warmup is keyed on the step passed in (the run's global step): a resume at step 5000 does not re-warm, so its
    # lr lies between the official vectors of steps 2519 and 5039 (re-warming would give about 1% of that)
    assert 5.98993e-4 < learning_rate(5000, **MINIPILE) < 5.99749e-4
    # hand-computed: half way through the cosine (progress 0.5) the lr is the mean of lr_init and lr_final
    half = dict(lr_init=1.0, lr_final=0.5, warmup_steps=0, tokens_per_step=1, exit_tokens=100)
    assert learning_rate(50, **half) == pytest.approx(0.75, abs=1e-15)
    assert learning_rate(0, **half) == 1.0 and learning_rate(100, **half) == 0.5 and learning_rate(150, **half) == 0.5
    # a tiny cosine length (exit_tokens - warmup tokens = 1): progress is whole steps, not halves
    assert learning_rate(1, 1.0, 0.5, 0, 1, 1) == 0.5
    # warmup by hand: step 5 of 10 scales by 0.01 + 0.99 * 0.5 = 0.505; at step 10 the factor is gone
    assert learning_rate(5, **{**half, "warmup_steps": 10, "exit_tokens": 10 ** 9}) == pytest.approx(0.505, rel=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# (d) the data order: the magic-prime sampler

SMALL_PRIMES = [p for p in range(2, 400) if is_prime(p) and p % 3 == 2]


def official_offset(epoch: int, idx: int, world: int, rank: int, p: int, ctx: int) -> int:
    """RWKV-LM src/dataset.py, written out from the formula (exact integers)."""
    ii = 1 + epoch * 40320 + idx * world + rank
    return ((int(p * (math.sqrt(5) - 1) / 2) * ii ** 3) % p) * ctx


@pytest.mark.parametrize("p", SMALL_PRIMES)
def test_one_pass_visits_every_chunk_once(p):
    assert sorted(chunk_index(pos, p) for pos in range(p)) == list(range(p))


def test_non_magic_prime_would_repeat_chunks():
    """The permutation property needs p % 3 == 2: with p % 3 == 1 cubing is 3-to-1, so the check above can fail."""
    for p in (7, 13, 31, 97):
        assert len({chunk_index(pos, p) for pos in range(p)}) < p


def test_official_sampler_vectors():
    p, ctx = 2926181, 512
    assert is_prime(p) and p % 3 == 2 and golden_factor(p) == 1808479
    world1 = [925941248, 1414711296, 1029138944, 830257664]
    assert [chunk_index(global_position(0, j, 4, 1, 0), p) * ctx for j in range(4)] == world1
    assert [official_offset(0, idx, 1, 0, p, ctx) for idx in range(4)] == world1
    # world 8, rank 1: sample idx 0 and 1 of that rank, for micro_bsz 1 (two steps) and 2 (one step)
    assert [official_offset(0, idx, 8, 1, p, ctx) for idx in range(2)] == [1414711296, 50760704]
    assert [chunk_index(global_position(s, 0, 8, 8, 1), p) * ctx for s in range(2)] == [1414711296, 50760704]
    assert [chunk_index(global_position(0, j, 16, 8, 1), p) * ctx for j in range(2)] == [1414711296, 50760704]


@pytest.mark.parametrize("micro_bsz,world", [(1, 1), (4, 1), (1, 8), (2, 8), (3, 4), (16, 1)])
def test_global_position_is_official_counter(micro_bsz, world):
    """ii = 1 + epoch*40320 + idx*world + rank, idx = local step*micro_bsz + j, with 40320/real_bsz steps per
    mini-epoch, equals 1 + global_position(step, j, real_bsz, world, rank)."""
    p, ctx = 2926181, 512
    real_bsz = micro_bsz * world
    epoch_steps = 40320 // real_bsz
    assert epoch_steps * real_bsz == 40320
    for epoch in (0, 1, 71):
        for local_step in (0, 1, epoch_steps - 1):
            for j in range(micro_bsz):
                for rank in range(world):
                    step = epoch * epoch_steps + local_step
                    ours = chunk_index(global_position(step, j, real_bsz, world, rank), p) * ctx
                    assert ours == official_offset(epoch, local_step * micro_bsz + j, world, rank, p, ctx)


@pytest.fixture(scope="module")
def tiny_binidx(tmp_path_factory):
    """A binidx whose token at offset i is i, written as several documents (the trainer ignores boundaries)."""
    prefix = tmp_path_factory.mktemp("binidx") / "tiny"
    n = 3000
    cuts = [0, 5, 700, 701, 1999, n]
    write_binidx(prefix, [np.arange(lo, hi) for lo, hi in zip(cuts, cuts[1:])])
    return open_binidx(prefix)


def windows(data, ctx, p, micro_bsz, real_bsz, start_step, n_steps, world=1, rank=0):
    ds = MagicPrimeWindows(data.tokens, ctx, p, micro_bsz, real_bsz, start_step, n_steps)
    ds.world, ds.rank = world, rank
    return [ds[i] for i in range(len(ds))]


def test_magic_prime_windows_cover_the_data_once(tiny_binidx):
    ctx = 16
    p = magic_prime(len(tiny_binidx), ctx)
    assert p == 179 and len(tiny_binidx) == 3000
    n_steps = -(-p // 4)
    items = windows(tiny_binidx, ctx, p, 4, 4, 0, n_steps)[:p]
    starts = []
    for x, y in items:
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (ctx,)
        assert torch.equal(x, torch.arange(int(x[0]), int(x[0]) + ctx))  # a contiguous slice of the flat stream
        assert torch.equal(y, x + 1)
        starts.append(int(x[0]))
    assert all(s % ctx == 0 for s in starts)
    assert sorted(starts) == [c * ctx for c in range(p)]


def test_ranks_interleave_into_the_single_rank_order(tiny_binidx):
    ctx, p, micro, world = 16, 179, 2, 3
    single = [int(x[0]) for x, _ in windows(tiny_binidx, ctx, p, micro * world, micro * world, 0, 5)]
    per_rank = [[int(x[0]) for x, _ in windows(tiny_binidx, ctx, p, micro, micro * world, 0, 5, world, rank)]
                for rank in range(world)]
    # step s of rank r holds global positions s*real_bsz + j*world + r
    merged = [per_rank[r][s * micro + j] for s in range(5) for j in range(micro) for r in range(world)]
    assert merged == single


def test_short_mini_epochs_keep_the_global_order(tiny_binidx):
    """train.epoch_steps only regroups steps: mini-epochs of 3 steps read exactly what one long pass reads."""
    ctx, p, micro = 16, 179, 4
    one_pass = windows(tiny_binidx, ctx, p, micro, micro, 0, 12)
    short = [w for e in range(4) for w in windows(tiny_binidx, ctx, p, micro, micro, 3 * e, 3)]
    assert len(short) == len(one_pass) == 48
    assert all(torch.equal(a[0], b[0]) for a, b in zip(short, one_pass))
    # and a resumed dataset (start_step 7) continues where the pass was
    resumed = windows(tiny_binidx, ctx, p, micro, micro, 7, 5)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, one_pass[7 * micro:]))


# ---------------------------------------------------------------------------------------------------------------
# (e) parameter counts, LoRA ranks, initialisation, optimiser groups


def n_params(n_layer, n_embd, vocab=65536) -> int:
    with torch.device("meta"):
        model = RWKV7(ModelShape(n_layer, n_embd, vocab))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("n_layer,n_embd,count", [(12, 768, 191_084_544), (24, 1024, 453_980_160),
                                                  (24, 2048, 1_530_814_464), (32, 2560, 2_953_308_160)])
def test_parameter_count(n_layer, n_embd, count):
    assert n_params(n_layer, n_embd) == count


@pytest.mark.parametrize("C,ranks", [(768, (64, 64, 32, 128)), (1024, (64, 64, 64, 160)),
                                     (2048, (128, 128, 64, 224)), (2560, (128, 128, 96, 256))])
def test_lora_ranks(C, ranks):
    assert tuple(lora_rank(C, k) for k in "wavg") == ranks
    with torch.device("meta"):
        att = RWKV7(ModelShape(1, C, 64)).blocks[0].att
    assert (att.w1.shape[1], att.a1.shape[1], att.v1.shape[1], att.g1.shape[1]) == ranks
    assert (att.w2.shape[0], att.a2.shape[0], att.v2.shape[0], att.g2.shape[0]) == ranks


IDX = [0, 1, 63, 64, 383, 767]
VECTORS_L0 = {
    "att.w0": [-8.0, -7.835967, -2.507171, -7.499348, -0.003911, 3.0],
    "att.a0": [-0.69, -0.670733, -0.057145, -0.656623, 0.109739, 0.31],
    "att.v0": [0.93, 0.929478, 0.897145, 0.896623, 0.730261, 0.53],
    "att.k_k": [0.76, 0.75987, 0.751786, 0.751656, 0.710065, 0.66],
    "att.x_r": [1.0, 0.735194, 0.393549, 0.391636, 0.129903, 0.000261],
    "ffn.x_k": [1.0, 0.998698, 0.917969, 0.916667, 0.501302, 0.001302],
}
VECTORS_L11 = {
    "att.w0": [-8.0, -7.843779, -2.95952, -7.958225, -1.503909, 3.0],
    "att.a0": VECTORS_L0["att.a0"],
    "att.x_k": [1.0, 0.321285, 0.135731, 0.134937, 0.039773, 7.6e-05],
}


def test_init_reference_vectors():
    v0, v11 = channel_vectors(768, 64, 0, 12), channel_vectors(768, 64, 11, 12)
    for vecs, table in ((v0, VECTORS_L0), (v11, VECTORS_L11)):
        for name, want in table.items():
            assert vecs[name].dtype == torch.float64
            got = vecs[name][IDX].tolist()
            assert got == pytest.approx(want, abs=1e-5), name
    assert float(v0["att.ln_x.weight"][0]) == pytest.approx(0.1756197, abs=1e-6)
    assert float(v11["att.ln_x.weight"][0]) == pytest.approx(1.0, abs=1e-12)
    assert torch.all(v0["att.k_a"] == 1.02) and torch.all(v0["att.r_k"] == -0.04) and not v0["att.ln_x.bias"].any()
    decay = torch.exp(-math.exp(-0.5) * torch.sigmoid(v0["att.w0"][IDX]))
    assert decay.tolist() == pytest.approx([0.999797, 0.99976, 0.955322, 0.999665, 0.738841, 0.561151], abs=1e-6)
    assert decay_from_logit(v0["att.w0"][IDX]).tolist() == pytest.approx(decay.tolist(), abs=1e-6)


SMALL = ModelShape(n_layer=3, n_embd=128, vocab_size=1000)


@pytest.fixture(scope="module")
def small_init():
    return init_model(RWKV7(SMALL), seed=123, bf16_round=False)


def gram_smaller_side(w: torch.Tensor) -> torch.Tensor:
    w = w.double()
    return w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w


def assert_orthogonal(w: torch.Tensor, gain: float, name: str):
    g = gram_smaller_side(w)
    eye = torch.eye(g.shape[0], dtype=torch.float64)
    assert torch.allclose(g, gain ** 2 * eye, atol=1e-5 * max(gain ** 2, 1e-2)), f"{name}: not {gain}-orthogonal"


def test_init_every_parameter_follows_its_rule(small_init):
    s = SMALL
    sd = dict(small_init.named_parameters())
    vectors = [channel_vectors(s.n_embd, s.head_size, layer, s.n_layer) for layer in range(s.n_layer)]
    checked = set()
    for layer in range(s.n_layer):
        pre = f"blocks.{layer}."
        for local, vec in vectors[layer].items():
            p = sd[pre + local]
            assert torch.equal(p.detach().reshape(-1), vec.float()), pre + local
            checked.add(pre + local)
        for m in ("w1", "a1", "v1", "g1"):
            assert not sd[pre + "att." + m].any(), m
            checked.add(pre + "att." + m)
        for m in ("w2", "a2", "v2", "g2"):
            assert_orthogonal(sd[pre + "att." + m], 0.1, pre + m)
            checked.add(pre + "att." + m)
        for m, gain in (("att.receptance", 1.0), ("att.key", 0.1), ("att.value", 1.0), ("ffn.key", 1.0)):
            assert_orthogonal(sd[pre + m + ".weight"], gain, pre + m)
            checked.add(pre + m + ".weight")
        for m in ("att.output", "ffn.value"):
            assert not sd[pre + m + ".weight"].any(), m
            checked.add(pre + m + ".weight")
        for ln in ("ln0", "ln1", "ln2") if layer == 0 else ("ln1", "ln2"):
            assert torch.all(sd[f"{pre}{ln}.weight"] == 1) and not sd[f"{pre}{ln}.bias"].any()
            checked |= {f"{pre}{ln}.weight", f"{pre}{ln}.bias"}
    emb = sd["emb.weight"]
    assert float(emb.abs().max()) <= 1e-4 and float(emb.std()) == pytest.approx(1e-4 / math.sqrt(3), rel=0.05)
    assert_orthogonal(sd["head.weight"], 0.5 * math.sqrt(s.vocab_size / s.n_embd), "head")
    assert torch.all(sd["ln_out.weight"] == 1) and not sd["ln_out.bias"].any()
    checked |= {"emb.weight", "head.weight", "ln_out.weight", "ln_out.bias"}
    assert checked == set(sd), set(sd) - checked  # every parameter has been checked


def test_init_gains_of_official_shapes():
    """head gain 0.5*sqrt(V/C) = 4.6188 at V=65536, C=768; ffn.key [4C, C] has no sqrt(4) factor; ortho_init(0.1)
    of a tall matrix would get 0.1*sqrt(r/c) (all official LoRA second matrices are wide, so plain 0.1)."""
    from rwkv7.init import matrix_rule

    assert matrix_rule("head.weight", (65536, 768), 65536, 768) == ("orthogonal", pytest.approx(4.6188, abs=1e-4))
    assert matrix_rule("blocks.0.ffn.key.weight", (3072, 768), 65536, 768) == ("orthogonal", 1.0)
    assert matrix_rule("blocks.0.att.w2", (64, 768), 65536, 768) == ("orthogonal", 0.1)
    assert matrix_rule("blocks.0.att.w2", (256, 64), 65536, 64)[1] == pytest.approx(0.2)


def test_init_bf16_round_and_seeding():
    tiny = ModelShape(n_layer=3, n_embd=64, vocab_size=300)
    a = init_model(RWKV7(tiny), seed=5)
    b = init_model(RWKV7(tiny), seed=5)
    c = init_model(RWKV7(tiny), seed=6)
    unrounded = init_model(RWKV7(tiny), seed=5, bf16_round=False)
    sa, sb, sc, su = a.state_dict(), b.state_dict(), c.state_dict(), unrounded.state_dict()
    for k, v in sa.items():
        assert v.dtype == torch.float32
        assert torch.equal(v, v.to(torch.bfloat16).float()), f"{k} is not bf16-exact"
        assert torch.equal(v, sb[k]), f"{k}: same seed, different values"
        assert torch.equal(v, su[k].to(torch.bfloat16).float()), k
    assert any(not torch.equal(su[k], su[k].to(torch.bfloat16).float()) for k in su)  # rounding did something
    drawn = ["emb.weight", "head.weight", "blocks.0.att.receptance.weight", "blocks.1.ffn.key.weight",
             "blocks.2.att.g2"]
    assert all(not torch.equal(sa[k], sc[k]) for k in drawn)
    assert torch.equal(sa["blocks.1.att.w0"], sc["blocks.1.att.w0"])  # formula vectors do not depend on the seed


EXPECTED_DECAY = {"emb.weight", "head.weight"} | {
    f"blocks.{i}.{m}.weight" for i in range(SMALL.n_layer)
    for m in ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")}


def test_parameter_groups_with_weight_decay(small_init):
    names = {n: optimizer_group(n, p, 0.001) for n, p in small_init.named_parameters()}
    assert {n for n, g in names.items() if g == "lr_2x"} == {f"blocks.{i}.att.w0" for i in range(SMALL.n_layer)}
    assert {n for n, g in names.items() if g == "lr_decay"} == EXPECTED_DECAY
    for n in ("blocks.0.att.w1", "blocks.1.att.a2", "blocks.2.att.g1", "blocks.1.att.r_k", "blocks.0.ln0.weight",
              "blocks.1.att.ln_x.weight", "blocks.0.att.k_k"):
        assert names[n] == "lr_1x", n
    groups = {g["name"]: g for g in param_groups(small_init, 0.001)}
    assert set(groups) == {"lr_1x", "lr_2x", "lr_decay"}
    assert (groups["lr_1x"]["weight_decay"], groups["lr_2x"]["weight_decay"], groups["lr_decay"]["weight_decay"]) \
        == (0.0, 0.0, 0.001)
    assert (groups["lr_1x"]["my_lr_scale"], groups["lr_2x"]["my_lr_scale"], groups["lr_decay"]["my_lr_scale"]) \
        == (1.0, 2.0, 1.0)
    ids = {id(p): n for n, p in small_init.named_parameters()}
    assert {ids[id(p)] for p in groups["lr_decay"]["params"]} == EXPECTED_DECAY
    assert sum(len(g["params"]) for g in groups.values()) == len(ids)


def test_parameter_groups_without_weight_decay(small_init):
    assert all(optimizer_group(n, p, 0.0) != "lr_decay" for n, p in small_init.named_parameters())
    groups = param_groups(small_init, 0.0)
    assert [g["name"] for g in groups] == ["lr_1x", "lr_2x"]
    assert all(g["weight_decay"] == 0.0 for g in groups)


# ---------------------------------------------------------------------------------------------------------------
# loss: cross-entropy + L2Wrap


def test_l2wrap_forward_and_gradient():
    B, T, V = 2, 5, 11
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(B, T, V, generator=g, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)
    loss = lm_loss(logits, targets)
    ce = F.cross_entropy(logits.detach().view(-1, V), targets.view(-1))
    assert float(loss) == pytest.approx(float(ce), rel=1e-7)  # the forward value is plain CE (fp32)
    loss.backward()

    with torch.no_grad():
        ce_grad = (torch.softmax(logits, -1) - F.one_hot(targets, V).double()) / (B * T)
        extra = torch.zeros(B, T, V, dtype=torch.float64)
        for bb in range(B):
            for t in range(T):
                j = int(logits[bb, t].argmax())
                extra[bb, t, j] = float(logits[bb, t, j]) * 1e-4 / (B * T)
    assert torch.allclose(logits.grad, ce_grad + extra, rtol=1e-6, atol=1e-9)
    assert float(extra.abs().max()) > 1e-5  # the L2Wrap term is large enough to be seen by the check

    # HEAD's form: the L2Wrap gradient is scaled by the incoming gradient (classic passed it unscaled)
    logits2 = logits.detach().clone().requires_grad_()
    (2.5 * lm_loss(logits2, targets)).backward()
    assert torch.allclose(logits2.grad, 2.5 * (ce_grad + extra), rtol=1e-6, atol=1e-9)


def test_fused_loss_chunks_and_logit_reuse_give_the_same_gradient():
    """Several row chunks (the last one partial), bf16 logits; reuse_logits (training) writes the gradient into the
    logits' storage and must give exactly the gradient of the copying path."""
    from rwkv7.train.loss import CHUNK_ROWS

    n, V = 2 * CHUNK_ROWS + 5, 16
    g = torch.Generator().manual_seed(1)
    base = (3 * torch.randn(n, V, generator=g)).to(torch.bfloat16)
    targets = torch.randint(0, V, (n,), generator=g)
    grads, losses = [], []
    for reuse in (False, True):
        leaf = base.clone().requires_grad_()
        logits = leaf * 1  # a non-leaf, as the head's output is
        loss = lm_loss(logits, targets, reuse_logits=reuse)
        loss.backward()
        grads.append(leaf.grad)
        losses.append(float(loss))
    ce = F.cross_entropy(base.float(), targets)
    assert losses[0] == losses[1] == pytest.approx(float(ce), rel=1e-6)
    assert torch.equal(grads[0], grads[1])
    ref = (torch.softmax(base.float(), -1) - F.one_hot(targets, V).float()) / n
    assert torch.allclose(grads[0].float(), ref, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_head_fused_loss_equals_head_then_loss(dtype, monkeypatch):
    """head_loss(hidden, W, y) (training on GPUs: the head inside the loss, logits never whole) gives the loss and
    the gradients of lm_loss(hidden @ W^T, y), over several row chunks (the last partial) and with an incoming
    gradient other than 1 (it is applied in backward). In float64 it accumulates in float64 (equal to 1e-12);
    uninitialised memory is filled with NaN, so a row chunk left unwritten shows."""
    from rwkv7.train.loss import CHUNK_ROWS, head_loss

    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", True)

    n, C, V = 2 * CHUNK_ROWS + 7, 24, 40
    g = torch.Generator().manual_seed(3)
    hidden0 = torch.randn(n, C, generator=g).to(dtype)
    weight0 = (0.5 * torch.randn(V, C, generator=g)).to(dtype)
    targets = torch.randint(0, V, (n,), generator=g)
    results = []
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # with fill_uninitialized_memory: torch.empty gives NaN
    try:
        for fused in (False, True):
            h, w = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
            loss = head_loss(h, w, targets) if fused else lm_loss(h @ w.t(), targets)
            (2.5 * loss).backward()
            results.append((float(loss), h.grad.double(), w.grad.double()))
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    (l0, h0, w0), (l1, h1, w1) = results
    # bf16: the per-chunk d(W) partials are rounded once each
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    assert l1 == pytest.approx(l0, rel=1e-12 if dtype == torch.float64 else 1e-6)
    assert float((h1 - h0).norm() / h0.norm()) < tol
    assert float((w1 - w0).norm() / w0.norm()) < tol
    assert h1.abs().max() > 0 and w1.abs().max() > 0


def test_lm_loss_by_hand():
    """Two rows over 3 tokens whose softmax is exact: [0, ln 3, 0] -> [1/5, 3/5, 1/5] (target 0) and [0, 0, ln 8] ->
    [1/10, 1/10, 8/10] (target 2). Loss: mean of ln 5 and ln 1.25 = ln 2.5. Gradient: (softmax - onehot) / 2, plus
    L2Wrap's 1e-4 * max_logit / 2 at each row's argmax (ln 3 at column 1, ln 8 at column 2)."""
    logits = torch.tensor([[0.0, math.log(3), 0.0], [0.0, 0.0, math.log(8)]], dtype=torch.float64,
                          requires_grad=True)
    loss = lm_loss(logits, torch.tensor([0, 2]))
    assert float(loss) == pytest.approx(math.log(2.5), rel=1e-12)
    loss.backward()
    want = torch.tensor([[-0.8, 0.6 + 1e-4 * math.log(3), 0.2], [0.1, 0.1, -0.2 + 1e-4 * math.log(8)]],
                        dtype=torch.float64) / 2
    assert torch.allclose(logits.grad, want, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# checkpoint format: official key names, order and shapes (RWKV-v7/rwkv_v7_numpy.py unpacks by key order)

ATT_KEYS = ["x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w1", "w2", "w0", "a1", "a2", "a0", "v1", "v2", "v0", "g1", "g2",
            "k_k", "k_a", "r_k", "receptance.weight", "key.weight", "value.weight", "output.weight", "ln_x.weight",
            "ln_x.bias"]


def official_keys(n_layer: int) -> list[str]:
    keys = ["emb.weight"]
    for i in range(n_layer):
        keys += [f"blocks.{i}.{k}" for k in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias")]
        if i == 0:
            keys += ["blocks.0.ln0.weight", "blocks.0.ln0.bias"]
        keys += [f"blocks.{i}.att.{k}" for k in ATT_KEYS]
        keys += [f"blocks.{i}.ffn.{k}" for k in ("x_k", "key.weight", "value.weight")]
    return keys + ["ln_out.weight", "ln_out.bias", "head.weight"]


def test_checkpoint_keys_order_shapes_and_dtype(tmp_path):
    shape = ModelShape(n_layer=2, n_embd=128, vocab_size=300)
    model = init_model(RWKV7(shape), seed=0)
    path = tmp_path / "rwkv-0.pth"
    save_weights(model, path)  # default: bf16, as the official trainer's files
    sd = torch.load(path, weights_only=True)
    assert list(sd) == official_keys(2)
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    C, V, H = 128, 300, 2
    assert sd["emb.weight"].shape == (V, C) and sd["head.weight"].shape == (V, C)
    assert sd["blocks.1.att.x_r"].shape == (1, 1, C) and sd["blocks.1.att.r_k"].shape == (H, 64)
    assert sd["blocks.1.att.w1"].shape == (C, 32) and sd["blocks.1.att.w2"].shape == (32, C)
    assert sd["blocks.1.ffn.key.weight"].shape == (4 * C, C) and sd["blocks.1.ffn.value.weight"].shape == (C, 4 * C)
    assert sd["blocks.1.att.ln_x.weight"].shape == (C,)
    # every key's shape, from the official model's definitions (C 128: LoRA ranks w, a, v 32 and g 64)
    layer = {**{f"att.{k}": (1, 1, C) for k in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k",
                                                 "k_a")},
             "att.w1": (C, 32), "att.w2": (32, C), "att.a1": (C, 32), "att.a2": (32, C), "att.v1": (C, 32),
             "att.v2": (32, C), "att.g1": (C, 64), "att.g2": (64, C), "att.r_k": (H, 64),
             **{f"att.{k}.weight": (C, C) for k in ("receptance", "key", "value", "output")},
             "att.ln_x.weight": (C,), "att.ln_x.bias": (C,), "ffn.x_k": (1, 1, C), "ffn.key.weight": (4 * C, C),
             "ffn.value.weight": (C, 4 * C), **{f"ln{i}.{k}": (C,) for i in (1, 2) for k in ("weight", "bias")}}
    want = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,), "ln_out.weight": (C,),
            "ln_out.bias": (C,), "head.weight": (V, C),
            **{f"blocks.{i}.{k}": s for i in (0, 1) for k, s in layer.items()}}
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    # a checkpoint wrapped by Lightning/DeepSpeed ("_forward_module." prefix) loads the same
    torch.save({"_forward_module." + k: v for k, v in sd.items()}, tmp_path / "wrapped.pth")
    again = rwkv7.load_model(tmp_path / "wrapped.pth")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in sd.items())


# ---------------------------------------------------------------------------------------------------------------
# training variants that must not change the numbers


def test_master_weight_adamw_is_fp32_adamw_on_masters():
    """strategy single's optimizer: bf16 model weights, fp32 masters; one step equals torch's AdamW on fp32 copies
    with global-norm clipping, rounded to bf16; fp32 gradients are freed after the step; keep_model_grads (the CUDA
    graph path) leaves the bf16 gradient buffers in place."""
    from rwkv7.train.bf16_optim import MasterWeightAdamW

    g = torch.Generator().manual_seed(0)
    w = [torch.randn(8, 4, generator=g), torch.randn(4, generator=g)]
    grads = [torch.randn(8, 4, generator=g) * 3, torch.randn(4, generator=g) * 3]
    for keep in (False, True):
        params = [torch.nn.Parameter(x.to(torch.bfloat16)) for x in w]
        groups = [{"params": [params[0]], "weight_decay": 0.1}, {"params": [params[1]], "weight_decay": 0.0}]
        opt = MasterWeightAdamW(groups, clip=1.0, lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
        opt.keep_model_grads = keep
        for p, gr in zip(params, grads):
            p.grad = gr.to(torch.bfloat16)
        opt.step()

        ref = [torch.nn.Parameter(x.to(torch.bfloat16).float()) for x in w]
        for p, gr in zip(ref, grads):
            p.grad = gr.to(torch.bfloat16).float()
        norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        torch.optim.AdamW([{"params": [ref[0]], "weight_decay": 0.1}, {"params": [ref[1]], "weight_decay": 0.0}],
                          lr=1e-2, betas=(0.9, 0.99), eps=1e-8).step()
        assert float(opt.last_grad_norm) == pytest.approx(float(norm), rel=1e-6) and float(norm) > 1.0
        for p, r in zip(params, ref):
            assert torch.equal(p.detach(), r.detach().to(torch.bfloat16))
        assert all(m.grad is None for group in opt.param_groups for m in group["params"])
        assert all((p.grad is not None) == keep for p in params)
