"""Pure-bf16 training on one GPU without DeepSpeed: bf16 weights in the model, fp32 master weights and Adam state here.

This is the arithmetic of the official setup (DeepSpeed bf16: the whole module in bf16, fp32 masters and moments in
the ZeRO optimizer, global-norm clipping on the fp32 gradients), in a handful of fused multi-tensor kernels per step
instead of DeepSpeed's per-parameter gradient hooks.
"""
from __future__ import annotations

import torch


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW over fp32 copies of the model's (bf16) parameters.

    step(): copy the bf16 gradients into the masters, clip their global L2 norm, AdamW on the masters, copy back.
    `last_grad_norm` holds the norm before clipping (a 0-d tensor; reading it syncs).
    """

    def __init__(self, groups: list[dict], clip: float = 1.0, **kwargs):
        self.model_params = [list(g["params"]) for g in groups]
        masters = [{**g, "params": [p.detach().float().clone() for p in g["params"]]} for g in groups]
        super().__init__(masters, fused=torch.cuda.is_available(), **kwargs)
        self.clip = clip
        self.last_grad_norm = None
        self.keep_model_grads = False  # True under a CUDA graph: the bf16 gradients live in the graph's buffers
        self.grad_factor = 1.0  # applied to the fp32 gradients first (strategy ddp: 1 / ranks, the mean over ranks)

    def _pairs(self):
        for group, params in zip(self.param_groups, self.model_params):
            yield from zip(params, group["params"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        model, master = [], []
        for p, m in self._pairs():
            if p.grad is not None:
                m.grad = torch.empty_like(m) if m.grad is None else m.grad
                model.append(p.grad)
                master.append(m.grad)
        if not master:  # a skipped step (no gradients)
            self.last_grad_norm = None
            return loss
        torch._foreach_copy_(master, model)
        if not self.keep_model_grads:
            for p, _ in self._pairs():
                p.grad = None  # free the bf16 gradients before Adam's temporaries are allocated
        if self.grad_factor != 1.0:
            torch._foreach_mul_(master, self.grad_factor)
        with_grad = [m for _, m in self._pairs() if m.grad is not None]
        self.last_grad_norm = self._grad_norm([m.grad for m in with_grad])
        torch.nn.utils.clip_grads_with_norm_(with_grad, self.clip or float("inf"), self.last_grad_norm, foreach=True)
        super().step()
        pairs = [(p, m) for p, m in self._pairs()]
        torch._foreach_copy_([p for p, _ in pairs], [m for _, m in pairs])
        for _, m in pairs:
            m.grad = None  # fp32 gradients live only within the step (0.7 GiB at 0.1b)
        return loss

    def _grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The global L2 norm of the fp32 gradients (clip_grad_norm_'s; a sharded optimizer adds the other ranks')."""
        return torch.nn.utils.get_total_norm(grads, foreach=True)

    def zero_grad(self, set_to_none: bool = True):
        for p, m in self._pairs():
            p.grad = None
        super().zero_grad(set_to_none)

    def state_dict(self):
        sd = super().state_dict()
        sd["masters"] = [m.detach().clone() for _, m in self._pairs()]
        return sd

    def load_state_dict(self, sd):
        sd = dict(sd)  # the caller's dict keeps its masters (it may be loaded again)
        masters = sd.pop("masters", None)
        super().load_state_dict(sd)
        if masters is not None:
            with torch.no_grad():
                pairs = list(self._pairs())
                for (p, m), saved in zip(pairs, masters):
                    m.copy_(saved)
                    p.copy_(saved)
