"""LightningModule around RWKV7: loss (cross-entropy + L2Wrap), official parameter groups and optimiser.

The model stays a plain nn.Module; this wrapper only adds what training needs.
"""
from __future__ import annotations

import math

import pytorch_lightning as pl
import torch

from rwkv7.init import GROUP_LR_SCALE, optimizer_group
from rwkv7.model import RWKV7
from rwkv7.recipe import Recipe
from rwkv7.testhooks import Faults
from rwkv7.train.loss import L2WRAP_FACTOR, lm_loss, training_loss  # noqa: F401 (re-exported)


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
    def __init__(self, model: RWKV7, recipe: Recipe, bad_steps: int = 0, faults: Faults | None = None):
        super().__init__()
        self.faults = faults or Faults()
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
        self.use_graph = (recipe.train.strategy.supports_cuda_graph and recipe.train.cuda_graph and not self.check_now
                          and torch.cuda.is_available())
        # strategy ddp: the same step, then gradient reduction and a sharded optimizer (rwkv7/train/data_parallel.py)
        self.data_parallel = recipe.train.strategy.data_parallel
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
        loss = training_loss(self.model, x, y)
        loss = self.faults.loss(self.run_step, loss)
        if self.check_now and not torch.isfinite(loss.detach()):
            return self._bad_step(f"loss is {float(loss.detach())}")
        return loss

    def _graphed_step(self, x, y):
        if self.graphed is None:
            from rwkv7.train.graphed import GraphedStep

            self.optimizers().optimizer.keep_model_grads = True  # the graph's gradient buffers are fixed
            self.graphed = GraphedStep(self.model, training_loss, x, y)
        loss = self.graphed(x, y)
        loss = self.faults.loss(self.run_step, loss)
        self.optimizers().step()  # MasterWeightAdamW: copy, clip, AdamW on the fp32 masters, copy back
        return loss

    def _bad_step(self, what: str):
        self.bad_steps += 1
        limit = self.recipe.train.max_bad_steps
        if self.bad_steps > limit:
            raise NonFiniteLoss(f"training diverged at step {self.run_step}: {what} "
                                f"({self.bad_steps} bad step(s), train.max_bad_steps={limit})")
        print(f"warning: step {self.run_step}: {what}; skipped ({self.bad_steps}/{limit} allowed)")
        if self.recipe.train.strategy.uses_deepspeed:
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
        if strategy.clips_in_optimizer:
            # MasterWeightAdamW and DeepSpeed clip the fp32 master gradients themselves; when bad steps are to be
            # skipped, look at the gradients first (single: MasterWeightAdamW then skips a step without gradients)
            if self.check_now and strategy.master_weights and params:
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
        if t.strategy.offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, adamw_mode=t.weight_decay > 0, **kwargs)
        if t.strategy.data_parallel:  # this rank's shard of the fp32 masters and AdamW state
            from rwkv7.train.data_parallel import sharded_optimizer

            return sharded_optimizer(self.model, groups, (t.micro_bsz, t.ctx_len), clip=t.grad_clip, **kwargs)
        if t.strategy.master_weights:
            from rwkv7.train.bf16_optim import MasterWeightAdamW

            return MasterWeightAdamW(groups, clip=t.grad_clip, **kwargs)
        # torch's AdamW with per-group weight_decay is the official FusedAdam(adam_w_mode=wd>0) update: decoupled
        # decay on the lr_decay group only, and plain Adam when wd == 0. The fused CUDA version needs no JIT build.
        return torch.optim.AdamW(groups, fused=t.accelerator == "gpu", **kwargs)
