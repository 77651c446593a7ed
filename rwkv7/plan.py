"""What fits, and how fast: memory per GPU for each strategy, measured throughput, time to finish a recipe.

Memory model (bytes; P parameters, n = micro_bsz x ctx_len tokens per GPU, C, L, V):
  weights and optimizer, per parameter: single 2 (bf16) + 2 (bf16 grad) + 4 (fp32 master) + 8 (Adam m, v) during
    forward/backward, and 4 more (fp32 master grads) only inside the optimizer step, when activations are gone;
    ddp: 2 (bf16) + 2 (bf16 grads, one flat buffer) + 12/N (fp32 master + Adam shard) + 2/N (the reduced gradient
    shard, N > 1), and 4/N (fp32 shard grads) inside the step;
    ZeRO-2: 4 + 12/N (+ one bucket), fitted to the measured peaks; ZeRO-3: 16/N (+ buckets); *_offload moves the
    12/N (stage 3: 16/N, keeping 4/N on the GPU) to host memory.
  loss head: the bf16 logits (their gradient is written into them: n V 2) + one fp32 chunk of the fused loss
    (1024 V 4).
  activations: grad_cp 1 keeps each block's inputs (x, v_first: 4 n C per layer) and rebuilds one block at a time
    (A n C, not at the same time as the head); grad_cp 0 keeps every block's (L A n C). A = 80 bytes per channel per
    token, fitted to the 0.1b H200 measurements in MEASURED (docs/PERFORMANCE.md); tests/test_plan.py checks the
    model against them.
These are estimates: allocator fragmentation, CUDA context (~0.5 GiB) and DeepSpeed's own buffers come on top.
"""
from __future__ import annotations

from dataclasses import dataclass

from rwkv7.recipe import Recipe
from rwkv7.strategy import Strategy

GIB = 2 ** 30
ACT_BYTES_PER_CHANNEL = 80
LOSS_CHUNK_ROWS = 1024  # rwkv7.train.loss.CHUNK_ROWS
STRATEGIES = tuple(s for s in Strategy if s.planned)

# Measured on one H200 with bench/train_bench.py (docs/PERFORMANCE.md): (L, C, strategy, grad_cp) -> (tokens/s,
# peak allocated GiB). single cp1: 2026-11-29 (bench/vs_official.py: compiled blocks, selective recomputation, the
# head inside the loss; the model above, written for the logits path, estimates both peaks within 10%). Other 0.1b
# rows: 2026-11-27 (run 3; single cp0: the CUDA graph). DeepSpeed 0.4b/1.5b: 2026-11-26, before the fused loss.
MEASURED_H200 = {
    (12, 768, "single", 1): (154_566, 4.01),
    (24, 2048, "single", 1): (32_768, 28.67),
    (12, 768, "single", 0): (118_340, 9.50),
    (12, 768, "deepspeed_stage_2", 1): (25_752, 4.24),
    (12, 768, "deepspeed_stage_2", 0): (46_020, None),
    (24, 1024, "deepspeed_stage_2", 1): (14_685, None),
    (24, 2048, "deepspeed_stage_2", 1): (14_046, None),
}
# Peaks on several GPUs (2 H200s, 2026-11-27, bench/multi_gpu.py; grad_cp 1, ctx 512):
# (L, C, strategy, gpus, micro_bsz) -> peak allocated GiB per GPU.
MEASURED_PEAKS_MULTI_GPU = {
    (12, 768, "deepspeed_stage_2", 2, 8): 2.669,
    (12, 768, "deepspeed_stage_2", 2, 16): 3.174,
    (24, 2048, "deepspeed_stage_2", 2, 16): 17.019,
}


@dataclass
class Estimate:
    strategy: Strategy
    gpu_gib: float
    host_gib: float
    tokens_per_s: float | None   # per GPU, measured (None when not measured for this shape and strategy)
    fits: bool
    note: str = ""


def count_parameters(recipe: Recipe) -> int:
    import torch

    from rwkv7.model import ModelShape, RWKV7

    m = recipe.model
    with torch.device("meta"):
        return sum(p.numel() for p in RWKV7(ModelShape(m.n_layer, m.n_embd, m.vocab_size, m.head_size)).parameters())


def state_bytes(strategy: Strategy, P: int, N: int, buckets: float) -> tuple[float, float, float]:
    """(GPU bytes during forward/backward, extra GPU bytes inside the optimizer step, host bytes) for weights,
    gradients and optimizer state."""
    if strategy.data_parallel:  # ddp: bf16 weights + grads (one flat buffer), fp32 master + Adam shard, reduced
        return 4 * P + 12 * P / N + (2 * P / N if N > 1 else 0), 4 * P / N, 0.0  # gradient shard; shard grads
    if not strategy.uses_deepspeed:  # single: bf16 weights + bf16 grads + fp32 masters + Adam m, v; fp32 master grads
        return 16 * P, 4 * P, 0.0
    if strategy.zero_stage == 2:  # bf16 weights and grads replicated, fp32 masters and Adam sharded
        resident, sharded = 4 * P, 12 * P / N
    else:  # stage 3: everything sharded; with offload the bf16 weights' shard (4/N) stays on the GPU
        resident, sharded = (4 * P / N, 12 * P / N) if strategy.offload else (0.0, 16 * P / N)
    if strategy.offload:
        return resident + buckets, 0.0, sharded
    return resident + sharded + buckets, 0.0, 0.0


def memory(recipe: Recipe, strategy: Strategy, gpus: int, grad_cp: int, params: int) -> tuple[float, float]:
    """(GPU GiB, host GiB) per GPU for one strategy."""
    m, t = recipe.model, recipe.train
    P, N, C, L, V = params, gpus, m.n_embd, m.n_layer, m.vocab_size
    n = t.micro_bsz * t.ctx_len
    buckets = t.ds_bucket_mb * 1e6  # fitted: the measured peaks show about one bucket's worth
    weights, step, host = state_bytes(Strategy(strategy), P, N, buckets)  # step: only inside the optimizer step
    head = n * V * 2 + LOSS_CHUNK_ROWS * V * 4
    block = ACT_BYTES_PER_CHANNEL * n * C
    work = L * 4 * n * C + max(head, block) if grad_cp else L * block + head
    return max(weights + work, weights + step) / GIB, host / GIB


def plan(recipe: Recipe, gpus: int, gpu_gib: float, host_gib: float | None = None) -> list[Estimate]:
    params = count_parameters(recipe)
    m, t = recipe.model, recipe.train
    out = []
    for strategy in STRATEGIES:
        if (strategy.one_gpu and gpus != 1) or (strategy.data_parallel and gpus == 1):  # one GPU: single
            continue
        g, h = memory(recipe, strategy, gpus, t.grad_cp, params)
        fits = g <= gpu_gib and (host_gib is None or h <= host_gib)
        measured = MEASURED_H200.get((m.n_layer, m.n_embd, strategy, t.grad_cp))
        tok = measured[0] if measured and (t.micro_bsz, t.ctx_len) == (16, 512) else None
        note = "not supported yet (recipe validation refuses it)" if strategy.unsupported else ""
        out.append(Estimate(strategy, g, h, tok, fits and not note, note))
    return out


def recommend(estimates: list[Estimate]) -> Estimate | None:
    """The fastest measured strategy that fits; else the first that fits, in order of expected speed."""
    fitting = [e for e in estimates if e.fits]
    measured = [e for e in fitting if e.tokens_per_s]
    if measured:
        return max(measured, key=lambda e: e.tokens_per_s)
    return fitting[0] if fitting else None
