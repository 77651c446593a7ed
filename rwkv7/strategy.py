"""How a run is spread over devices: one `Strategy` member per `train.strategy` value, with what it implies.

Every place that depends on the strategy (recipe validation, the planner, the Trainer, the optimizer, the loss
module, the doctor) asks a property here instead of comparing names, so a new strategy is one member and its traits.
The recipe TOML keeps the plain string values; `Strategy` is a StrEnum, so it prints and serialises as that string.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from rwkv7.errors import UserError


@dataclass(frozen=True)
class Traits:
    uses_deepspeed: bool = False   # the Trainer wraps the model in DeepSpeed (its engine saves checkpoints)
    zero_stage: int = 0            # DeepSpeed ZeRO stage: 2 shards optimizer state, 3 also the weights; 0 none
    offload: bool = False          # optimizer state (stage 3: also weights) lives in host memory
    master_weights: bool = False   # pure bf16 module + fp32 masters in MasterWeightAdamW (no precision plugin)
    supports_cuda_graph: bool = False  # forward + backward can be replayed as one CUDA graph (train.cuda_graph)
    one_gpu: bool = False          # runs on exactly one GPU
    data_parallel: bool = False    # several ranks: our gradient reduction + sharded optimizer (train/data_parallel.py)
    gpu_only: bool = True          # no CPU run uses it
    planned: bool = True           # `rwkv7 plan` estimates it
    unsupported: str = ""          # why recipe validation refuses it (empty: supported)


class Strategy(StrEnum):
    traits: Traits

    def __new__(cls, value: str, traits: Traits):
        obj = str.__new__(cls, value)
        obj._value_ = value
        obj.traits = traits
        return obj

    # CPU runs (plain Lightning, DDP over gloo for several processes); on GPUs resolved by `resolved_for`
    AUTO = "auto", Traits(gpu_only=False, planned=False)
    SINGLE = "single", Traits(master_weights=True, supports_cuda_graph=True, one_gpu=True)
    # single's step on every rank, gradients reduce-scattered, masters and AdamW state sharded; CPU ranks over gloo
    DDP = "ddp", Traits(master_weights=True, supports_cuda_graph=True, data_parallel=True, gpu_only=False)
    DEEPSPEED_STAGE_2 = "deepspeed_stage_2", Traits(uses_deepspeed=True, zero_stage=2)
    DEEPSPEED_STAGE_2_OFFLOAD = "deepspeed_stage_2_offload", Traits(uses_deepspeed=True, zero_stage=2, offload=True)
    DEEPSPEED_STAGE_3 = "deepspeed_stage_3", Traits(
        uses_deepspeed=True, zero_stage=3, unsupported="its sharded weights are not gathered into rwkv-N.pth")
    DEEPSPEED_STAGE_3_OFFLOAD = "deepspeed_stage_3_offload", Traits(
        uses_deepspeed=True, zero_stage=3, offload=True,
        unsupported="its sharded weights are not gathered into rwkv-N.pth")

    # one property per trait, so call sites read `strategy.uses_deepspeed`
    uses_deepspeed = property(lambda self: self.traits.uses_deepspeed)
    zero_stage = property(lambda self: self.traits.zero_stage)
    offload = property(lambda self: self.traits.offload)
    master_weights = property(lambda self: self.traits.master_weights)
    supports_cuda_graph = property(lambda self: self.traits.supports_cuda_graph)
    one_gpu = property(lambda self: self.traits.one_gpu)
    data_parallel = property(lambda self: self.traits.data_parallel)
    gpu_only = property(lambda self: self.traits.gpu_only)
    planned = property(lambda self: self.traits.planned)
    unsupported = property(lambda self: self.traits.unsupported)

    @property
    def clips_in_optimizer(self) -> bool:
        """The optimizer clips the fp32 master gradients itself (MasterWeightAdamW, DeepSpeed); else Lightning's
        clip_grad_norm_ on the module's gradients."""
        return self.master_weights or self.uses_deepspeed

    @classmethod
    def parse(cls, value) -> "Strategy":
        try:
            return cls(value)
        except ValueError:
            raise UserError(f"train.strategy {value!r} unknown; choose one of "
                            f"{', '.join(s.value for s in cls)}") from None

    def resolved_for(self, accelerator: str, gpus: int, precision: str) -> "Strategy":
        """auto on GPUs in bf16: single on one GPU (pure bf16 + fp32 masters, one CUDA graph per step), ddp on several
        (the same step on every rank, a sharded optimizer); DeepSpeed stage 2 in fp32. On CPUs auto stays auto."""
        if self is not Strategy.AUTO or accelerator != "gpu":
            return self
        if precision != "bf16":
            return Strategy.DEEPSPEED_STAGE_2
        return Strategy.SINGLE if gpus == 1 else Strategy.DDP
