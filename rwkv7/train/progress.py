"""Throughput and the progress bar: tokens/s over about a second, MFU and peak memory on GPUs."""
from __future__ import annotations

import sys
import time

import torch

PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, for MFU


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS_BF16.items() if k in device_name), None)


class Throughput:
    """Tokens/s measured over windows of at least a second (and at the last step); MFU against a peak."""

    def __init__(self, tokens_per_step: int, first_step: int, last_step: int, flops_per_token: float,
                 peak_tflops: float | None, world: int, clock=time.time):
        self.tokens_per_step, self.last_step = tokens_per_step, last_step
        self.flops, self.peak, self.world, self.clock = flops_per_token, peak_tflops, world, clock
        self.t_last, self.step_last = clock(), first_step
        self.tok_s = 0.0

    def update(self, step: int) -> bool:
        """Count step `step` as done; True when tok_s was measured anew."""
        now = self.clock()
        if now - self.t_last < 1.0 and step != self.last_step:
            return False
        self.tok_s = (step - self.step_last) * self.tokens_per_step / max(now - self.t_last, 1e-9)
        self.t_last, self.step_last = now, step
        return True

    def mfu(self) -> float | None:
        """Model FLOPs utilisation over all ranks (None without a known peak)."""
        return self.tok_s * self.flops / (self.peak * 1e12 * self.world) if self.peak else None


class ProgressBar:
    """tqdm on the writing rank when asked for; every method is a no-op otherwise."""

    def __init__(self, enabled: bool, name: str, first_step: int, last_step: int):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=last_step, initial=first_step, unit="step", dynamic_ncols=True, desc=name,
                            mininterval=0.5 if sys.stderr.isatty() else 10.0)

    def step(self, measured: bool, avg_loss: float, lr: float, speed: Throughput) -> None:
        if self.bar is None:
            return
        if measured:
            text = f"loss {avg_loss:.4f} lr {lr:.3g} {speed.tok_s / 1e3:.1f} kt/s"
            mfu = speed.mfu()
            if mfu is not None:  # GPU: model FLOPs utilisation and peak memory, as in metrics.jsonl
                text += f" MFU {mfu:.1%} {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB"
            self.bar.set_postfix_str(text, False)
        self.bar.update(1)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
