"""The training loss: mean cross-entropy + L2Wrap, in fp32 math, in row chunks.

Two forms with the same numbers (tests/test_alignment.py compares them):
- `lm_loss(logits, targets)`: from logits [B, T, V] (any caller that has logits).
- `head_loss(hidden, head_weight, targets)`: the head matmul fused in, for training. The full [B*T, V] logits never
  exist: each chunk of rows is projected, its loss and its logits' gradient are computed at once (the loss is the
  last op of the step, so its gradient is known up to the incoming scale), the chunk's share of d(hidden) and
  d(head_weight) is accumulated, and the chunk is dropped. Backward only scales the stored gradients. At 0.1b
  (8192 rows, vocab 65536) that removes the 1 GiB bf16 logits buffer and its fp32 gradient temporaries.

L2Wrap (official, RWKV-LM HEAD's form): the backward also adds 1e-4 * max_logit / (B*T) at each token's argmax,
scaled by the incoming gradient. Cross-entropy gradient per row: softmax - onehot(target), over B*T rows.
"""
from __future__ import annotations

import torch

L2WRAP_FACTOR = 1e-4  # official L2Wrap strength
CHUNK_ROWS = 1024     # rows per chunk: one fp32 temporary of CHUNK_ROWS x vocab (256 MiB at vocab 65536)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor):
    """One chunk of rows: (sum of its CE losses, scale * d(summed loss)/d(logits) with L2Wrap, fp32 [rows, V]).
    scale = d(total)/d(mean loss) / N: the mean over all N rows and the incoming gradient in one factor."""
    p = logits.to(_acc_dtype(logits), copy=True)
    maxx, ids = p.max(-1, keepdim=True)
    lse = torch.logsumexp(p, -1, keepdim=True)
    loss_sum = (lse - p.gather(1, targets[:, None])).sum()
    p.sub_(lse).exp_()                                              # softmax
    p.scatter_add_(1, targets[:, None], torch.full_like(maxx, -1.0))  # - onehot(target)
    p.scatter_add_(1, ids, maxx * L2WRAP_FACTOR)                    # L2Wrap at the argmax
    return loss_sum, p.mul_(scale)


class CrossEntropyL2Wrap(torch.autograd.Function):
    """Mean cross-entropy + L2Wrap from logits [N, V], in row chunks with fp32 math (as RWKV-LM HEAD's fused loss
    kernel). With reuse_logits the gradient is written into the logits' own storage: only for logits nothing else
    reads afterwards."""

    @staticmethod
    def forward(ctx, logits, targets, reuse_logits):
        n = logits.shape[0]
        lse = torch.empty(n, dtype=_acc_dtype(logits), device=logits.device)
        total = torch.zeros((), dtype=lse.dtype, device=logits.device)
        for i in range(0, n, CHUNK_ROWS):
            lf = logits[i:i + CHUNK_ROWS].to(lse.dtype)
            lse[i:i + lf.shape[0]] = torch.logsumexp(lf, -1)
            total += (lse[i:i + lf.shape[0]] - lf.gather(1, targets[i:i + lf.shape[0], None]).squeeze(1)).sum()
        ctx.save_for_backward(logits, targets)
        ctx.reuse_logits = reuse_logits
        return total / n

    @staticmethod
    def backward(ctx, grad_output):
        logits, targets = ctx.saved_tensors
        n = logits.shape[0]
        grad = logits if ctx.reuse_logits else torch.empty_like(logits)
        scale = grad_output.to(_acc_dtype(logits)) / n
        for i in range(0, n, CHUNK_ROWS):
            _, g = _chunk_loss_and_grad(logits[i:i + CHUNK_ROWS], targets[i:i + CHUNK_ROWS], scale)
            grad[i:i + g.shape[0]] = g
        return grad, None, None


class HeadCrossEntropyL2Wrap(torch.autograd.Function):
    """loss = CE+L2Wrap(hidden [N, C] @ weight[V, C]^T, targets), without the full logits (module docstring).

    d(weight): each chunk's product g^T h comes out of the matmul in the inputs' dtype and is summed over chunks in
    fp32, rounded to the weight's dtype once at the end; d(hidden) rows are independent, written in hidden's dtype."""

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        n = hidden.shape[0]
        acc = _acc_dtype(hidden)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        d_hidden = torch.empty_like(hidden) if need_grad else None
        d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_grad else None
        scale = torch.ones((), dtype=acc, device=hidden.device) / n  # the incoming gradient is applied in backward
        for i in range(0, n, CHUNK_ROWS):
            h = hidden[i:i + CHUNK_ROWS]
            loss_sum, g = _chunk_loss_and_grad(h @ weight.t(), targets[i:i + CHUNK_ROWS], scale)
            total += loss_sum
            if need_grad:
                g = g.to(hidden.dtype)
                torch.mm(g, weight, out=d_hidden[i:i + h.shape[0]])
                d_weight += g.t() @ h
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.weight_dtype = weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_output):
        d_hidden, d_weight = ctx.saved_tensors
        scale = grad_output.to(d_weight.dtype)
        d_h = d_hidden * scale.to(d_hidden.dtype) if ctx.needs_input_grad[0] else None
        d_w = (d_weight * scale).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return d_h, d_w, None


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reuse_logits: bool = False) -> torch.Tensor:
    """Mean cross-entropy in fp32 with L2Wrap's extra gradient, from logits [..., V].
    reuse_logits: backward overwrites `logits` with its gradient (the caller must not read them afterwards)."""
    return CrossEntropyL2Wrap.apply(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reuse_logits)


def head_loss(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """lm_loss(hidden @ head_weight^T, targets) without materialising the logits; hidden [..., C]."""
    if not torch.is_grad_enabled():  # the Function sees requires_grad, not grad mode: skip the gradient work
        hidden, head_weight = hidden.detach(), head_weight.detach()
    return HeadCrossEntropyL2Wrap.apply(hidden.reshape(-1, hidden.size(-1)), head_weight, targets.reshape(-1))


def training_loss(model, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One micro-batch's loss for training: on GPUs the head is fused into the loss (head_loss); elsewhere logits
    then lm_loss (the eager reference, which CPU runs keep bit for bit)."""
    if idx.is_cuda:
        return head_loss(model.hidden(idx), model.head.weight, targets)
    return lm_loss(model(idx), targets, reuse_logits=True)
