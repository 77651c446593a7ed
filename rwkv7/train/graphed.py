"""Forward, loss and backward of one micro-batch as a single CUDA graph (strategy `single`, `train.cuda_graph`).

An eager 0.1b step issues about 2,800 small kernel launches (more with grad_cp, which replays the forward in the
backward), so the host, not the GPU, sets the pace. The shapes never change within a run (micro_bsz x ctx_len), so
the step is captured once and replayed: one launch per step. The gradients land in fixed buffers (each parameter's
.grad, allocated during capture) that the optimizer reads after every replay; they must never be set to None.
"""
from __future__ import annotations

import torch


class GraphedStep:
    WARMUP = 2  # eager passes on a side stream before capture: autograd, cuBLAS and kernel set-up happen there

    def __init__(self, model: torch.nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor):
        """loss_fn(model, x, y) -> scalar loss (e.g. rwkv7.train.loss.training_loss)."""
        self.x, self.y = x.clone(), y.clone()
        self.params = [p for p in model.parameters() if p.requires_grad]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):  # no optimizer step: the weights stay as they are
                self._zero()
                loss_fn(model, self.x, self.y).backward()
        torch.cuda.current_stream().wait_stream(side)
        self._zero()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = loss_fn(model, self.x, self.y)
            self.loss.backward()
        # parameters the loss does not reach (layer 0's value-residual LoRA) keep grad None, as in eager mode

    def _zero(self) -> None:
        for p in self.params:
            p.grad = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Run the step on (x, y); returns the loss (a new tensor: the next replay overwrites the graph's own)."""
        self.x.copy_(x, non_blocking=True)
        self.y.copy_(y, non_blocking=True)
        self.graph.replay()
        return self.loss.detach().clone()
