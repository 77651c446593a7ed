"""RWKV-7 ("x070") as the official RWKV-LM trainer builds it: a plain nn.Module (no Lightning, no DeepSpeed).

Parameter names and shapes are the official state-dict's, so `rwkv-*.pth` files load unchanged in the `rwkv` package
and the official demos. Every formula is listed with its source in docs/ALIGNMENT.md; the initial values are set by
rwkv7.init.init_model (module constructors only allocate).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rwkv7.wkv import wkv7

LN_X_EPS = 64e-5  # official ln_x GroupNorm eps ("!!! notice eps value !!!")
LORA_MULTIPLIERS = {"w": 2.5, "a": 2.5, "v": 1.7, "g": 5.0}  # official since RWKV-LM 1f5d52a (2025-07)


def lora_rank(n_embd: int, kind: str) -> int:
    """Official rank: max(32, round(m * sqrt(C) / 32) * 32) with Python's (banker's) round."""
    return max(32, int(round(LORA_MULTIPLIERS[kind] * math.sqrt(n_embd) / 32) * 32))


@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    n_embd: int
    vocab_size: int
    head_size: int = 64
    lora: tuple | None = None  # (w, a, v, g) ranks; None: the official formula (released checkpoints may differ)

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size


def time_shift(x: torch.Tensor) -> torch.Tensor:
    """shift(x)[t] = x[t-1], shift(x)[0] = 0 (official nn.ZeroPad2d((0, 0, 1, -1)))."""
    return F.pad(x, (0, 0, 1, -1))


class TimeMix(nn.Module):
    def __init__(self, shape: ModelShape, layer_id: int):
        super().__init__()
        C, H, N = shape.n_embd, shape.n_head, shape.head_size
        self.layer_id, self.n_head, self.head_size = layer_id, H, N
        mu = lambda: nn.Parameter(torch.empty(1, 1, C))  # noqa: E731
        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = mu(), mu(), mu(), mu(), mu(), mu()
        dw, da, dv, dg = shape.lora or tuple(lora_rank(C, k) for k in "wavg")
        self.w1, self.w2, self.w0 = nn.Parameter(torch.empty(C, dw)), nn.Parameter(torch.empty(dw, C)), mu()
        self.a1, self.a2, self.a0 = nn.Parameter(torch.empty(C, da)), nn.Parameter(torch.empty(da, C)), mu()
        self.v1, self.v2, self.v0 = nn.Parameter(torch.empty(C, dv)), nn.Parameter(torch.empty(dv, C)), mu()
        self.g1, self.g2 = nn.Parameter(torch.empty(C, dg)), nn.Parameter(torch.empty(dg, C))
        self.k_k, self.k_a = mu(), mu()
        self.r_k = nn.Parameter(torch.empty(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=LN_X_EPS)
        self.wkv_recompute = False  # set on compiled, checkpointed copies (rwkv7.model.compiled_block)

    def forward(self, x, v_first, state=None):
        """x: [B, T, C]. `state` (generation only) = (last token of the previous chunk [B, C], wkv state)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        prev = time_shift(x) if state is None else torch.cat([state[0][:, None], x[:, :-1]], 1)
        xx = prev - x
        xr, xw, xk = x + xx * self.x_r, x + xx * self.x_w, x + xx * self.x_k
        xv, xa, xg = x + xx * self.x_v, x + xx * self.x_a, x + xx * self.x_g

        r = self.receptance(xr)
        w = self.w0 + torch.tanh(xw @ self.w1) @ self.w2  # decay logit z; the wkv computes exp(-e^-0.5 sigmoid(z))
        k = self.key(xk)
        v = self.value(xv)
        if self.layer_id == 0:
            v_first = v
        else:  # value residual: layers >= 1 mix in layer 0's value
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0)
        k = k * (1 + (a - 1) * self.k_a)
        heads = lambda t: t.view(B, T, H, N)  # noqa: E731
        out = wkv7(heads(r), heads(w), heads(k), heads(v), -kk, kk * heads(a),
                   state=None if state is None else state[1], return_state=state is not None,
                   recompute=self.wkv_recompute)
        y, wkv_state = out if state is not None else (out, None)
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        bonus = (heads(r) * heads(k) * self.r_k).sum(dim=-1, keepdim=True) * heads(v)
        y = self.output((y + bonus.view(B, T, C)) * g)
        new_state = None if state is None else (x[:, -1], wkv_state)
        return y, v_first, new_state


class ChannelMix(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        C = shape.n_embd
        self.x_k = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, 4 * C, bias=False)  # official v7 hard-codes 4C (dim_ffn is ignored)
        self.value = nn.Linear(4 * C, C, bias=False)

    def forward(self, x, state=None):
        prev = time_shift(x) if state is None else torch.cat([state[:, None], x[:, :-1]], 1)
        k = torch.relu(self.key(x + (prev - x) * self.x_k)) ** 2
        return self.value(k), (None if state is None else x[:, -1])


class Block(nn.Module):
    def __init__(self, shape: ModelShape, layer_id: int):
        super().__init__()
        C = shape.n_embd
        self.layer_id = layer_id
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)  # applied once, right after the embedding
        self.att = TimeMix(shape, layer_id)
        self.ffn = ChannelMix(shape)

    def forward(self, x, v_first, state=None):
        if self.layer_id == 0:
            x = self.ln0(x)
        att_state, ffn_state = (None, None) if state is None else state
        dx, v_first, att_state = self.att(self.ln1(x), v_first, att_state)
        x = x + dx
        dx, ffn_state = self.ffn(self.ln2(x), ffn_state)
        x = x + dx
        return x, v_first, (None if state is None else (att_state, ffn_state))


RECOMPUTE_MODES = ("full", "selective")
# Ops whose outputs selective recomputation keeps: the matmuls (recomputing them would cost a third more matmul work)
_MATMUL_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
               torch.ops.aten.linear.default, torch.ops.aten.matmul.default}


class _DropInPlaceNotice(logging.Filter):
    """torch warns once that a checkpointed region with a policy must not hold in-place ops; ours holds none (the
    CPU test compares the compiled gradients with the eager ones exactly), so the notice is not the user's business."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "context_fn is passed to torch.utils.checkpoint" not in record.getMessage()


def _keep_matmuls(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _MATMUL_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def compiled_block(template: "Block", recompute: str | None, backend: str):
    """f(block, x, v_first) -> (x, v_first): `template`'s forward compiled as a function of the parameters, so one
    compiled graph serves every block of the template's kind (layer 0, which has ln0 and sets v_first, and the rest),
    whichever block's parameters are passed. recompute None: keep what the compiler's partitioner keeps; "full" or
    "selective": see RWKV7.compile_blocks. The parameters enter the graph flattened to 1-D where they are [1, 1, C]:
    torch 2.11's compiled backward returned their gradients as [C] and failed autograd's shape check ("got [768] but
    expected shape compatible with [1, 1, 768]"); the eager view outside the graph reshapes the gradient."""
    import copy
    import functools

    from torch.func import functional_call
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    template = copy.deepcopy(template).to("meta")  # structure only: every call supplies the parameters
    template.att.wkv_recompute = recompute is not None
    names = [n for n, _ in template.named_parameters()]
    shapes = [p.shape for _, p in template.named_parameters()]

    def run(flat, x, v_first):
        params = {n: t.view(shape) for n, t, shape in zip(names, flat, shapes)}
        y, v, _ = functional_call(template, params, (x, v_first))
        return y, v

    if recompute == "full":
        body = lambda flat, x, v: checkpoint(run, flat, x, v, use_reentrant=False)  # noqa: E731
    elif recompute == "selective":
        logging.getLogger("torch._higher_order_ops.wrap").addFilter(_DropInPlaceNotice())
        context = functools.partial(create_selective_checkpoint_contexts, _keep_matmuls)
        body = lambda flat, x, v: checkpoint(run, flat, x, v, use_reentrant=False, context_fn=context)  # noqa: E731
    else:
        body = run
    fn = torch.compile(body, backend=backend)

    def call(block, x, v_first):
        flat = [p.view(-1) if p.dim() == 3 else p for p in block.parameters()]
        return fn(flat, x, v_first)

    return call


class RWKV7(nn.Module):
    """model(idx [B, T] long) -> logits [B, T, V]."""

    def __init__(self, shape: ModelShape, grad_cp: bool = False):
        super().__init__()
        self.shape = shape
        self.grad_cp = grad_cp
        self.emb = nn.Embedding(shape.vocab_size, shape.n_embd)
        self.blocks = nn.ModuleList(Block(shape, i) for i in range(shape.n_layer))
        self.ln_out = nn.LayerNorm(shape.n_embd)
        self.head = nn.Linear(shape.n_embd, shape.vocab_size, bias=False)

    def compile_blocks(self, recompute: str = "selective", backend: str = "inductor") -> None:
        """torch.compile the blocks: the per-layer elementwise chains (token shift and mixes, LoRA activations, kk
        normalisation, ln_x GroupNorm with the bonus and gate, channel mix, LayerNorms and residuals) become a few
        fused kernels forward and backward; matmuls stay on cuBLAS and the wkv7 custom op stays opaque.

        recompute (used when grad_cp is on): "full" reruns each block's forward in the backward, as eager grad_cp;
        "selective" keeps the matmul outputs and reruns only the cheap work (elementwise, norms, and the wkv7
        forward, whose per-chunk state checkpoints would cost more memory than the matmul outputs). The compiled
        wrappers are kept outside the module tree, so parameter names do not change."""
        if recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
        if torch.cuda.is_available():  # decide the wkv backend (loads the kernel) before tracing, not inside it
            from rwkv7 import wkv_cuda

            wkv_cuda.available()
        kinds = list(self.blocks[:2])  # layer 0, and the template of every later layer (compiled when first called)
        plain = [compiled_block(b, None, backend) for b in kinds]
        cp = [compiled_block(b, recompute, backend) for b in kinds]
        self.__dict__["_compiled"] = [plain[min(i, 1)] for i in range(len(self.blocks))]
        self.__dict__["_compiled_cp"] = [cp[min(i, 1)] for i in range(len(self.blocks))]

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """The last hidden state after ln_out, [B, T, C]: forward() without the head (training fuses the head into
        the loss, rwkv7.train.loss.head_loss)."""
        x = self.emb(idx)
        v_first = torch.empty_like(x)
        compiled, compiled_cp = self.__dict__.get("_compiled"), self.__dict__.get("_compiled_cp")
        training = self.training and torch.is_grad_enabled()  # evaluation runs eager (other shapes, no backward)
        cp = self.grad_cp and training
        for i, block in enumerate(self.blocks):
            if compiled and training:
                x, v_first = (compiled_cp if cp else compiled)[i](block, x, v_first)
            elif cp:
                x, v_first, _ = checkpoint(block, x, v_first, use_reentrant=False)
            else:
                x, v_first, _ = block(x, v_first)
        return self.ln_out(x)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(idx))

    def zero_state(self, batch: int, device=None) -> list:
        """RNN state per layer: ((att last x, wkv state fp32), ffn last x)."""
        s = self.shape
        dtype = self.emb.weight.dtype
        device = device or self.emb.weight.device
        return [((torch.zeros(batch, s.n_embd, dtype=dtype, device=device),
                  torch.zeros(batch, s.n_head, s.head_size, s.head_size, device=device)),
                 torch.zeros(batch, s.n_embd, dtype=dtype, device=device)) for _ in range(s.n_layer)]

    def forward_with_state(self, idx: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        """Continue from `state` over idx [B, T]; returns (logits [B, T, V], new state). Used by generation."""
        x = self.emb(idx)
        v_first = torch.empty_like(x)
        new_state = []
        for block, st in zip(self.blocks, state):
            x, v_first, st = block(x, v_first, st)
            new_state.append(st)
        return self.head(self.ln_out(x)), new_state


def shape_from_state_dict(sd: dict) -> ModelShape:
    """Read the architecture off an official-format state dict, LoRA ranks included."""
    vocab, C = sd["emb.weight"].shape
    H, N = sd["blocks.0.att.r_k"].shape
    L = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    lora = tuple(int(sd[f"blocks.0.att.{k}1"].shape[1]) for k in "wavg")
    formula = tuple(lora_rank(int(C), k) for k in "wavg")
    return ModelShape(n_layer=L, n_embd=C, vocab_size=vocab, head_size=N, lora=None if lora == formula else lora)
