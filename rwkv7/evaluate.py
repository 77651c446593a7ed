"""Held-out loss: mean next-token cross-entropy over contiguous, non-overlapping windows of a token stream.

    evaluate_loss(model, tokens, ctx_len=512, max_tokens=None, batch=8) -> (mean loss, n predicted tokens)

The first `max_tokens` tokens (all when None) are cut into windows in order: window i reads tokens
[i*ctx_len, (i+1)*ctx_len] inclusive, i.e. ctx_len inputs and the ctx_len next tokens as targets, so consecutive
windows share one boundary token and every token after the first is predicted exactly once, each window from a fresh
(zero) state, as in training. Only whole windows count: n = ((min(max_tokens, len) - 1) // ctx_len) * ctx_len. The
loss is the sum of per-token cross-entropies (fp32 logits, fp64 accumulation) divided by n; perplexity = exp(loss).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from rwkv7.errors import UserError


def n_windows(n_tokens: int, ctx_len: int) -> int:
    return max(0, (n_tokens - 1) // ctx_len)


@torch.no_grad()
def evaluate_loss(model, tokens: np.ndarray, ctx_len: int = 512, max_tokens: int | None = None,
                  batch: int = 8) -> tuple[float, int]:
    """(mean cross-entropy per predicted token, number of predicted tokens); see the module docstring.

    `model` maps idx [B, T] -> logits [B, T, V] and is run in eval mode (its training flag is restored after).
    Raises UserError when the tokens do not fill one window or hold ids outside the model's vocabulary.
    """
    if ctx_len < 1 or batch < 1:
        raise UserError(f"ctx_len and batch must be >= 1 (got {ctx_len}, {batch})")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"the number of evaluation tokens must be >= 1 (got {max_tokens})")
    n = len(tokens) if max_tokens is None else min(int(max_tokens), len(tokens))
    windows = n_windows(n, ctx_len)
    if windows == 0:
        raise UserError(f"{n} evaluation tokens do not fill one window of ctx_len {ctx_len} (+1 target): "
                        "use more tokens or a smaller ctx_len")
    param = next(model.parameters())
    device = param.device
    vocab = getattr(getattr(model, "shape", None), "vocab_size", None)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for first in range(0, windows, batch):
            nb = min(batch, windows - first)
            start, stop = first * ctx_len, (first + nb) * ctx_len + 1
            flat = np.array(tokens[start:stop], dtype=np.int64)  # a writable copy
            if vocab is not None and int(flat.max()) >= vocab:
                raise UserError(f"evaluation data holds token id {int(flat.max())} >= the model's vocab_size "
                                f"{vocab}: it was made with another tokenizer")
            # windows [nb, ctx_len + 1] as strided views of the contiguous run (neighbours share one token)
            win = np.lib.stride_tricks.sliding_window_view(flat, ctx_len + 1)[::ctx_len]
            win = torch.from_numpy(np.array(win)).to(device)  # np.array: a contiguous, writable copy
            logits = model(win[:, :-1])
            for row in range(nb):  # fp32 cross-entropy one window at a time bounds the fp32 copy of the logits
                total += float(F.cross_entropy(logits[row].float(), win[row, 1:], reduction="sum"))
            count += nb * ctx_len
    finally:
        model.train(was_training)
    return total / count, count


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")
