"""Official initialisation of every RWKV-7 parameter (RWKV-LM train_temp: module __init__ + generate_init_weight).

`init_model(model, seed)` sets every parameter; `parameter_table(model)` describes each one (shape, init rule,
weight-decay group, lr scale, count). Formulas and their sources: docs/ALIGNMENT.md, "Initialisation".
Small per-channel vectors are computed in float64 and then stored in the parameter dtype; matrices are drawn in
state-dict order from one seeded generator, so an init is reproducible bit for bit (the official one is unseeded).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from rwkv7.model import RWKV7

MU_EXPONENTS = {"x_r": 0.2, "x_w": 0.9, "x_k": 0.7, "x_v": 0.7, "x_a": 0.9, "x_g": 0.2}


def channel_vectors(n_embd: int, head_size: int, layer_id: int, n_layer: int) -> dict[str, torch.Tensor]:
    """The per-channel init vectors of one layer, in float64 (names as in the state dict, without prefixes)."""
    C, N = n_embd, head_size
    n = torch.arange(C, dtype=torch.float64)
    ratio_0_to_1 = layer_id / (n_layer - 1)
    ratio_1_to_almost0 = 1.0 - layer_id / n_layer
    ddd = n / C
    linear = n / (C - 1) - 0.5
    z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = z * z.abs()
    www = -6 + 6 * (n / (C - 1)) ** (1 + ratio_0_to_1 ** 0.3)
    v = {f"att.{name}": 1.0 - ddd ** (e * ratio_1_to_almost0) for name, e in MU_EXPONENTS.items()}
    v["att.w0"] = www + 0.5 + zigzag * 2.5
    v["att.a0"] = -0.19 + zigzag * 0.3 + linear * 0.4
    v["att.v0"] = 0.73 - linear * 0.4
    v["att.k_k"] = 0.71 - linear * 0.1
    v["att.k_a"] = torch.full((C,), 1.02, dtype=torch.float64)
    v["att.r_k"] = torch.full((C,), -0.04, dtype=torch.float64)
    v["att.ln_x.weight"] = torch.full((C,), ((1 + layer_id) / n_layer) ** 0.7, dtype=torch.float64)
    v["att.ln_x.bias"] = torch.zeros(C, dtype=torch.float64)
    v["ffn.x_k"] = 1.0 - ddd ** (ratio_1_to_almost0 ** 4)
    return v


def _orthogonal(p: torch.Tensor, gain: float, gen: torch.Generator) -> None:
    # drawn in fp32 on the CPU, so the values do not depend on the device the model lives on
    tmp = torch.empty(p.shape, dtype=torch.float32)
    nn.init.orthogonal_(tmp, gain=gain, generator=gen)
    p.copy_(tmp)


def matrix_rule(name: str, shape: tuple, vocab: int, n_embd: int) -> tuple[str, float]:
    """(rule, gain) for a matrix: 'zeros', 'uniform' (±gain), or 'orthogonal' with that gain."""
    rows, cols = shape
    if name == "emb.weight":
        return "uniform", 1e-4
    if name == "head.weight":
        return "orthogonal", 0.5 * (vocab / n_embd) ** 0.5 if vocab > n_embd else 0.5
    if name.endswith((".w1", ".a1", ".v1", ".g1")):
        return "zeros", 0.0
    if name.endswith((".w2", ".a2", ".v2", ".g2")):  # official ortho_init(x, 0.1): gain 0.1*sqrt(r/c) if r > c
        return "orthogonal", 0.1 * ((rows / cols) ** 0.5 if rows > cols else 1.0)
    if ".att.output." in name or ".ffn.value." in name:
        return "zeros", 0.0
    if ".att.key." in name:
        return "orthogonal", 0.1
    return "orthogonal", 1.0  # receptance, value, ffn.key: plain orthogonal_, no sqrt(r/c) factor


@torch.no_grad()
def init_model(model: RWKV7, seed: int = 0, bf16_round: bool = True) -> RWKV7:
    """Set every parameter as the official trainer does; with bf16_round, values are rounded through bf16 as the
    official rwkv-init.pth (saved in bf16) is before training starts."""
    s = model.shape
    gen = torch.Generator().manual_seed(seed)
    vectors = [channel_vectors(s.n_embd, s.head_size, layer, s.n_layer) for layer in range(s.n_layer)]
    for name, p in model.named_parameters():
        parts = name.split(".")
        if name.startswith("blocks."):
            vec = vectors[int(parts[1])].get(".".join(parts[2:]))
            if vec is not None:
                p.copy_(vec.view(p.shape).to(p.dtype))
                continue
        if p.dim() == 1:  # LayerNorm weight/bias (ln0, ln1, ln2, ln_out): PyTorch defaults
            p.fill_(1.0 if name.endswith(".weight") else 0.0)
            continue
        rule, gain = matrix_rule(name, tuple(p.shape), s.vocab_size, s.n_embd)
        if rule == "zeros":
            p.zero_()
        elif rule == "uniform":
            p.copy_(torch.empty(p.shape, dtype=torch.float32).uniform_(-gain, gain, generator=gen))
        else:
            _orthogonal(p, gain, gen)
    if bf16_round:
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(p.dtype))
    return model


def optimizer_group(name: str, p: torch.Tensor, weight_decay: float) -> str:
    """Official configure_optimizers: att.w0 gets 2x lr; wd only on >=2-D `.weight` tensors when wd > 0."""
    if "att.w0" in name:
        return "lr_2x"
    if len(p.squeeze().shape) >= 2 and weight_decay > 0 and ".weight" in name:
        return "lr_decay"
    return "lr_1x"


GROUP_LR_SCALE = {"lr_1x": 1.0, "lr_2x": 2.0, "lr_decay": 1.0}


def describe_rule(name: str, p: torch.Tensor, model: RWKV7) -> str:
    local = ".".join(name.split(".")[2:]) if name.startswith("blocks.") else name
    if name.startswith("blocks.") and local in channel_vectors(64, 64, 0, 2):
        return {"att.w0": "www+0.5+2.5*zigzag", "att.a0": "-0.19+0.3*zigzag+0.4*linear", "att.v0": "0.73-0.4*linear",
                "att.k_k": "0.71-0.1*linear", "att.k_a": "1.02", "att.r_k": "-0.04",
                "att.ln_x.weight": "((l+1)/L)^0.7", "att.ln_x.bias": "0",
                "ffn.x_k": "1-ddd^(r1^4)"}.get(local, f"1-ddd^({MU_EXPONENTS.get(local.split('.')[-1], 0)}*r1)")
    if p.dim() == 1:
        return "1" if name.endswith(".weight") else "0"
    rule, gain = matrix_rule(name, tuple(p.shape), model.shape.vocab_size, model.shape.n_embd)
    return {"zeros": "0", "uniform": f"U(±{gain:g})"}.get(rule, f"orthogonal({gain:.4g})")


def parameter_table(model: RWKV7, weight_decay: float) -> list[dict]:
    rows = []
    for name, p in model.named_parameters():
        group = optimizer_group(name, p, weight_decay)
        rows.append({"name": name, "shape": tuple(p.shape), "group": group, "lr_scale": GROUP_LR_SCALE[group],
                     "wd": weight_decay if group == "lr_decay" else 0.0, "init": describe_rule(name, p, model),
                     "count": p.numel()})
    return rows
