"""LightningModule around RWKV7: loss (cross-entropy + L2Wrap), official parameter groups and optimiser.

The model stays a plain nn.Module; this wrapper only adds what training needs.
"""
from __future__ import annotations

import math

import pytorch_lightning as pl
import torch

from rwkv7 import testhooks
from rwkv7.init import GROUP_LR_SCALE, optimizer_group
from rwkv7.model import RWKV7
from rwkv7.recipe import Recipe

L2WRAP_FACTOR = 1e-4  # official L2Wrap strength


class L2Wrap(torch.autograd.Function):
    """Forward: the loss unchanged. Backward: also push down the largest logit of every token.

    Adds max_logit * 1e-4 / (B*T) at each token's argmax, scaled by the incoming gradient (RWKV-LM HEAD's form;
    classic omitted the scaling, which is the same when the gradient is 1, as it is in training).
    """

    @staticmethod
    def forward(ctx, loss, logits):
        ctx.save_for_backward(logits)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (logits,) = ctx.saved_tensors
        factor = L2WRAP_FACTOR / (logits.shape[0] * logits.shape[1])
        maxx, ids = torch.max(logits, -1, keepdim=True)
        gy = torch.zeros_like(logits).scatter_(-1, ids, maxx * (factor * grad_output.to(logits.dtype)))
        return grad_output, gy


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class CrossEntropyL2Wrap(torch.autograd.Function):
    """Mean cross-entropy + L2Wrap in one op, in row chunks with fp32 math (as RWKV-LM HEAD's fused loss kernel).

    Never materialises an fp32 copy of all logits (2 GiB for 0.1b's 8192 x 65536): each chunk is upcast, used and
    dropped, and backward writes the gradient straight in the logits' dtype. Same numbers as L2Wrap + fp32 CE.
    With reuse_logits the gradient is written into the logits' own storage (another 1 GiB saved at 0.1b): only for
    logits nothing else reads afterwards, such as the head's output in training (its backward needs only its input
    and weight).
    """

    CHUNK = 1024  # rows per chunk: one fp32 temporary of CHUNK x vocab (256 MiB at vocab 65536)

    @staticmethod
    def forward(ctx, logits, targets, reuse_logits=False):
        n = logits.shape[0]
        acc = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.empty(n, dtype=acc, device=logits.device)
        total = torch.zeros((), dtype=acc, device=logits.device)
        for i in range(0, n, CrossEntropyL2Wrap.CHUNK):
            lf = _upcast(logits[i:i + CrossEntropyL2Wrap.CHUNK])
            lse[i:i + lf.shape[0]] = torch.logsumexp(lf, -1)
            total += (lse[i:i + lf.shape[0]] - lf.gather(1, targets[i:i + lf.shape[0], None]).squeeze(1)).sum()
        ctx.save_for_backward(logits, targets, lse)
        ctx.reuse_logits = reuse_logits
        return total / n

    @staticmethod
    def backward(ctx, grad_output):
        logits, targets, lse = ctx.saved_tensors
        n = logits.shape[0]
        g = grad_output.to(lse.dtype) / n
        grad = logits if ctx.reuse_logits else torch.empty_like(logits)
        for i in range(0, n, CrossEntropyL2Wrap.CHUNK):
            p = logits[i:i + CrossEntropyL2Wrap.CHUNK].to(lse.dtype, copy=True)  # the chunk's only temporary
            rows = p.shape[0]
            maxx, ids = p.max(-1, keepdim=True)
            p.sub_(lse[i:i + rows, None]).exp_()
            p.scatter_add_(1, targets[i:i + rows, None], torch.full_like(maxx, -1.0))
            p.scatter_add_(1, ids, maxx * L2WRAP_FACTOR)  # L2Wrap: 1e-4 * max_logit / (B*T) at the argmax
            grad[i:i + rows] = p.mul_(g)
        return grad, None, None


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reuse_logits: bool = False) -> torch.Tensor:
    """Mean cross-entropy in fp32 with L2Wrap's extra gradient (L2Wrap(CE(logits), logits), fused).
    reuse_logits: backward overwrites `logits` with its gradient (saves a logits-sized buffer; the caller must not
    read the logits after backward)."""
    return CrossEntropyL2Wrap.apply(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reuse_logits)


def param_groups(model: RWKV7, weight_decay: float) -> list[dict]:
    groups: dict[str, list] = {"lr_1x": [], "lr_2x": [], "lr_decay": []}
    for name, p in model.named_parameters():
        groups[optimizer_group(name, p, weight_decay)].append(p)
    out = []
    for key in ("lr_1x", "lr_2x", "lr_decay"):
        if groups[key]:
            out.append({"params": groups[key], "weight_decay": weight_decay if key == "lr_decay" else 0.0,
                        "my_lr_scale": GROUP_LR_SCALE[key], "name": key})
    return out


class NonFiniteLoss(Exception):
    """The loss or gradient went NaN/inf more often than train.max_bad_steps allows."""


class RWKV7Module(pl.LightningModule):
    def __init__(self, model: RWKV7, recipe: Recipe, bad_steps: int = 0):
        super().__init__()
        self.model = model
        self.recipe = recipe
        self.run_step = 0            # the run's global step, set by the tracker before each batch
        self.bad_steps = bad_steps   # non-finite steps so far (carried across resumes)
        self.last_grad_norm = None
        self.skipped = False         # this step's loss was replaced by a zero (DeepSpeed cannot skip backward)
        # Checking the loss before backward costs a GPU sync per step; on GPUs it is done one step late by the
        # tracker instead, unless bad steps are to be skipped (which needs the answer before the update).
        self.check_now = recipe.train.accelerator == "cpu" or recipe.train.max_bad_steps > 0
        # strategy single on a GPU: forward + backward replayed as one CUDA graph (rwkv7/train/graphed.py); the
        # optimizer step then runs here (manual optimization). Skipping bad steps needs the eager path.
        self.use_graph = (recipe.train.strategy in ("single", "ddp") and recipe.train.cuda_graph
                          and not self.check_now and torch.cuda.is_available())
        # strategy ddp: the same step, then gradient reduction and a sharded optimizer (rwkv7/train/data_parallel.py)
        self.data_parallel = recipe.train.strategy == "ddp"
        self.automatic_optimization = not (self.use_graph or self.data_parallel)
        self.graphed = None

    def forward(self, idx):
        return self.model(idx)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.data_parallel:
            from rwkv7.train import data_parallel

            return data_parallel.training_step(self, x, y)
        if self.use_graph:
            return self._graphed_step(x, y)
        loss = lm_loss(self.model(x), y, reuse_logits=True)
        if testhooks.fault("nan", self.run_step):
            loss = loss * float("nan")
        if self.check_now and not torch.isfinite(loss.detach()):
            return self._bad_step(f"loss is {float(loss)}", loss)
        return loss

    def _graphed_step(self, x, y):
        if self.graphed is None:
            from rwkv7.train.graphed import GraphedStep

            self.optimizers().optimizer.keep_model_grads = True  # the graph's gradient buffers are fixed
            self.graphed = GraphedStep(self.model, lambda out, tgt: lm_loss(out, tgt, reuse_logits=True), x, y)
        loss = self.graphed(x, y)
        if testhooks.fault("nan", self.run_step):
            loss = loss * float("nan")
        self.optimizers().step()  # MasterWeightAdamW: copy, clip, AdamW on the fp32 masters, copy back
        return loss

    def _bad_step(self, what: str, loss=None):
        self.bad_steps += 1
        limit = self.recipe.train.max_bad_steps
        if self.bad_steps > limit:
            raise NonFiniteLoss(f"training diverged at step {self.run_step}: {what} "
                                f"({self.bad_steps} bad step(s), train.max_bad_steps={limit})")
        print(f"warning: step {self.run_step}: {what}; skipped ({self.bad_steps}/{limit} allowed)")
        if self.recipe.train.strategy.startswith("deepspeed"):
            # DeepSpeed cannot skip backward: a zero that does not pass through the (non-finite) logits gives zero
            # gradients (Adam's momentum still moves the weights a little)
            self.skipped = True
            return sum((p * 0.0).sum() for p in self.model.parameters())
        return None  # Lightning skips backward and the optimizer step

    def configure_gradient_clipping(self, optimizer, optimizer_idx=None, gradient_clip_val=None,
                                    gradient_clip_algorithm=None):
        """Clip the global L2 norm (official: 1.0) and keep the norm for metrics.jsonl (non-DeepSpeed runs;
        DeepSpeed clips inside its optimizer)."""
        strategy = self.recipe.train.strategy
        params = [p for p in self.model.parameters() if p.grad is not None]
        if strategy == "single" or strategy.startswith("deepspeed"):
            # MasterWeightAdamW and DeepSpeed clip the fp32 master gradients themselves; when bad steps are to be
            # skipped, look at the gradients first (single: MasterWeightAdamW then skips a step without gradients)
            if self.check_now and strategy == "single" and params:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params])
                if not math.isfinite(float(norm)):
                    for p in params:
                        p.grad = None
                    self._bad_step(f"gradient norm is {float(norm)}")
            return
        norm = torch.nn.utils.clip_grad_norm_(params, gradient_clip_val or float("inf"))
        self.last_grad_norm = norm.detach()
        if self.check_now and not math.isfinite(float(norm)):
            for p in params:  # never let a non-finite gradient reach the weights
                p.grad = None
            self._bad_step(f"gradient norm is {float(norm)}")

    def configure_optimizers(self):
        t = self.recipe.train
        groups = param_groups(self.model, t.weight_decay)
        kwargs = dict(lr=t.lr_init, betas=(t.beta1, t.beta2), eps=t.adam_eps)
        if "offload" in t.strategy:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, adamw_mode=t.weight_decay > 0, **kwargs)
        if t.strategy == "ddp":  # this rank's shard of the fp32 masters and AdamW state
            from rwkv7.train.data_parallel import sharded_optimizer

            return sharded_optimizer(self.model, groups, (t.micro_bsz, t.ctx_len), clip=t.grad_clip, **kwargs)
        if t.strategy == "single":
            from rwkv7.train.bf16_optim import MasterWeightAdamW

            return MasterWeightAdamW(groups, clip=t.grad_clip, **kwargs)
        # torch's AdamW with per-group weight_decay is the official FusedAdam(adam_w_mode=wd>0) update: decoupled
        # decay on the lr_decay group only, and plain Adam when wd == 0. The fused CUDA version needs no JIT build.
        return torch.optim.AdamW(groups, fused=t.accelerator == "gpu", **kwargs)
