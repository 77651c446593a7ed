"""`rwkv7 init`'s parameter table: every row's init rule, optimizer group, lr scale, weight decay and count, written
out by hand from the official rules (official-rwkv7-trainer.md §2 init, §3.1 groups, §3.3 lr scales), for a 2-layer
model with a vocabulary larger than its width (so the head's gain 0.5*sqrt(V/C) is not 0.5)."""
import pytest
import torch

from rwkv7.init import parameter_table
from rwkv7.model import ModelShape, RWKV7

C, V, LORA_W, LORA_G, WD = 128, 2048, 32, 64, 0.001

# local name -> (shape, init rule as the table prints it, optimizer group)
BLOCK = {
    "ln1.weight": ((C,), "1", "lr_1x"), "ln1.bias": ((C,), "0", "lr_1x"),
    "ln2.weight": ((C,), "1", "lr_1x"), "ln2.bias": ((C,), "0", "lr_1x"),
    "att.x_r": ((1, 1, C), "1-ddd^(0.2*r1)", "lr_1x"), "att.x_w": ((1, 1, C), "1-ddd^(0.9*r1)", "lr_1x"),
    "att.x_k": ((1, 1, C), "1-ddd^(0.7*r1)", "lr_1x"), "att.x_v": ((1, 1, C), "1-ddd^(0.7*r1)", "lr_1x"),
    "att.x_a": ((1, 1, C), "1-ddd^(0.9*r1)", "lr_1x"), "att.x_g": ((1, 1, C), "1-ddd^(0.2*r1)", "lr_1x"),
    "att.w1": ((C, LORA_W), "0", "lr_1x"), "att.w2": ((LORA_W, C), "orthogonal(0.1)", "lr_1x"),
    "att.w0": ((1, 1, C), "www+0.5+2.5*zigzag", "lr_2x"),
    "att.a1": ((C, LORA_W), "0", "lr_1x"), "att.a2": ((LORA_W, C), "orthogonal(0.1)", "lr_1x"),
    "att.a0": ((1, 1, C), "-0.19+0.3*zigzag+0.4*linear", "lr_1x"),
    "att.v1": ((C, LORA_W), "0", "lr_1x"), "att.v2": ((LORA_W, C), "orthogonal(0.1)", "lr_1x"),
    "att.v0": ((1, 1, C), "0.73-0.4*linear", "lr_1x"),
    "att.g1": ((C, LORA_G), "0", "lr_1x"), "att.g2": ((LORA_G, C), "orthogonal(0.1)", "lr_1x"),
    "att.k_k": ((1, 1, C), "0.71-0.1*linear", "lr_1x"), "att.k_a": ((1, 1, C), "1.02", "lr_1x"),
    "att.r_k": ((2, 64), "-0.04", "lr_1x"),
    "att.receptance.weight": ((C, C), "orthogonal(1)", "lr_decay"),
    "att.key.weight": ((C, C), "orthogonal(0.1)", "lr_decay"),
    "att.value.weight": ((C, C), "orthogonal(1)", "lr_decay"),
    "att.output.weight": ((C, C), "0", "lr_decay"),
    "att.ln_x.weight": ((C,), "((l+1)/L)^0.7", "lr_1x"), "att.ln_x.bias": ((C,), "0", "lr_1x"),
    "ffn.x_k": ((1, 1, C), "1-ddd^(r1^4)", "lr_1x"),
    "ffn.key.weight": ((4 * C, C), "orthogonal(1)", "lr_decay"),
    "ffn.value.weight": ((C, 4 * C), "0", "lr_decay"),
}
LAYER0_ONLY = {"ln0.weight": ((C,), "1", "lr_1x"), "ln0.bias": ((C,), "0", "lr_1x")}
OUTSIDE = {"emb.weight": ((V, C), "U(±0.0001)", "lr_decay"), "ln_out.weight": ((C,), "1", "lr_1x"),
           "ln_out.bias": ((C,), "0", "lr_1x"), "head.weight": ((V, C), "orthogonal(2)", "lr_decay")}


def expected_rows(weight_decay: float) -> dict:
    spec = {"emb.weight": OUTSIDE["emb.weight"]}
    for layer in range(2):
        for local, row in ({**BLOCK, **LAYER0_ONLY} if layer == 0 else BLOCK).items():
            spec[f"blocks.{layer}.{local}"] = row
    spec.update({k: v for k, v in OUTSIDE.items() if k != "emb.weight"})
    rows = {}
    for name, (shape, rule, group) in spec.items():
        if group == "lr_decay" and weight_decay == 0:
            group = "lr_1x"  # no decay group at all when wd is 0 (official configure_optimizers)
        count = 1
        for d in shape:
            count *= d
        rows[name] = {"shape": shape, "init": rule, "group": group, "lr_scale": 2.0 if group == "lr_2x" else 1.0,
                      "wd": weight_decay if group == "lr_decay" else 0.0, "count": count}
    return rows


@pytest.mark.parametrize("weight_decay", [WD, 0.0])
def test_every_row_of_the_parameter_table(weight_decay):
    table = parameter_table(RWKV7(ModelShape(2, C, V, 64)), weight_decay)
    got = {row["name"]: {k: v for k, v in row.items() if k != "name"} for row in table}
    want = expected_rows(weight_decay)
    assert len(got) == len(table)  # one row per parameter, no name twice
    assert set(got) == set(want), (set(got) ^ set(want))
    for name in want:
        assert got[name] == want[name], name


def test_head_gain_is_one_half_when_the_vocabulary_is_not_wider_than_the_model():
    rows = {r["name"]: r for r in parameter_table(RWKV7(ModelShape(2, 128, 96, 64)), WD)}
    assert rows["head.weight"]["init"] == "orthogonal(0.5)"


def test_channel_vectors_of_a_middle_layer_follow_the_official_formulas():
    """Layers 0 and L-1 (the reference's test vectors, test_alignment.py) have ratios 0 and 1, where several exponents
    cannot show; layer 5 of 12 has neither. Each formula of official-rwkv7-trainer.md §2, in plain Python floats."""
    from rwkv7.init import channel_vectors

    C, N, layer, L = 768, 64, 5, 12
    r01, r1 = layer / (L - 1), 1 - layer / L
    got = channel_vectors(C, N, layer, L)
    for n in (0, 1, 63, 64, 383, 500, 767):
        ddd, linear = n / C, n / (C - 1) - 0.5
        z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
        zigzag = z * abs(z)
        www = -6 + 6 * (n / (C - 1)) ** (1 + r01 ** 0.3)
        want = {"att.w0": www + 0.5 + zigzag * 2.5, "att.a0": -0.19 + zigzag * 0.3 + linear * 0.4,
                "att.v0": 0.73 - linear * 0.4, "att.k_k": 0.71 - linear * 0.1, "ffn.x_k": 1 - ddd ** (r1 ** 4),
                "att.ln_x.weight": ((1 + layer) / L) ** 0.7, "att.k_a": 1.02, "att.r_k": -0.04, "att.ln_x.bias": 0.0}
        for name, e in {"x_r": 0.2, "x_w": 0.9, "x_k": 0.7, "x_v": 0.7, "x_a": 0.9, "x_g": 0.2}.items():
            want[f"att.{name}"] = 1 - ddd ** (e * r1)
        for name, value in want.items():
            assert float(got[name][n]) == pytest.approx(value, rel=1e-12, abs=1e-12), (name, n)
    assert all(v.dtype == torch.float64 for v in got.values())  # computed in float64, rounded once when stored


def test_init_does_not_depend_on_the_default_dtype():
    """Matrices are drawn in float32 whatever torch's default dtype: a program that sets float64 as the default gets
    the same initial weights."""
    from rwkv7.init import init_model

    shape = ModelShape(2, 64, 97, 64)  # n_layer >= 2: the recipe check refuses 1 (the official init divides by L-1)
    ref = init_model(RWKV7(shape), seed=3).state_dict()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = init_model(RWKV7(shape).float(), seed=3).state_dict()
    finally:
        torch.set_default_dtype(old)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
