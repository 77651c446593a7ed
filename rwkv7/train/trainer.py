"""The Lightning Trainer for a recipe: accelerator, precision and the distributed strategy (rwkv7.strategy)."""
from __future__ import annotations

import datetime
import os

from rwkv7.recipe import Recipe


def deepspeed_strategy(t, timeout: datetime.timedelta):
    from pytorch_lightning.strategies import DeepSpeedStrategy

    class _DeepSpeed(DeepSpeedStrategy):
        def _init_deepspeed_distributed(self):  # Lightning 1.9.5 passes no timeout to DeepSpeed: add ours
            import deepspeed

            self._set_node_environment_variables()
            self._process_group_backend = self._get_process_group_backend()
            deepspeed.init_distributed(self._process_group_backend, timeout=timeout,
                                       distributed_port=self.cluster_environment.main_port)

    s = t.strategy
    bucket = int(t.ds_bucket_mb * 1e6)
    return _DeepSpeed(stage=s.zero_stage, offload_optimizer=s.offload,
                      offload_parameters=s.offload and s.zero_stage == 3, allgather_bucket_size=bucket,
                      reduce_bucket_size=bucket, logging_batch_size_per_gpu=t.micro_bsz)


def build_trainer(recipe: Recipe, callbacks: list, steps: int):
    import pytorch_lightning as pl

    t = recipe.train
    # replace_sampler_ddp=False: every rank draws its own samples of the official global order (as RWKV-LM does)
    kwargs = dict(max_steps=steps, max_epochs=1, enable_checkpointing=False, logger=False, replace_sampler_ddp=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                  callbacks=callbacks, num_nodes=t.num_nodes, devices=t.devices)
    timeout = datetime.timedelta(minutes=t.dist_timeout_min)
    if t.strategy.data_parallel:  # Lightning launches the ranks; rwkv7/train/data_parallel.py reduces and shards
        from rwkv7.train.data_parallel import lightning_strategy

        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        return pl.Trainer(accelerator=t.accelerator, precision=32, strategy=lightning_strategy(timeout), **kwargs)
    if t.accelerator == "cpu":  # several CPU processes: DDP over gloo (tests the multi-rank logic without GPUs)
        from pytorch_lightning.strategies import DDPStrategy

        return pl.Trainer(accelerator="cpu", precision=32, gradient_clip_val=t.grad_clip or None,
                          strategy=DDPStrategy(timeout=timeout) if t.gpus > 1 else None, **kwargs)
    if t.strategy.master_weights:  # pure bf16 weights + fp32 masters in MasterWeightAdamW; no precision plugin
        return pl.Trainer(accelerator="gpu", precision=32, **kwargs)
    # what is left on GPUs is DeepSpeed (a validated recipe's auto is single, ddp or deepspeed_stage_2 there)
    assert t.strategy.uses_deepspeed, t.strategy
    # a hung or dead rank must end the job, not hang it: NCCL's watchdog aborts a collective after the timeout
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    precision = "bf16" if t.precision == "bf16" else 32
    return pl.Trainer(accelerator="gpu", strategy=deepspeed_strategy(t, timeout), precision=precision,
                      gradient_clip_val=t.grad_clip or None, **kwargs)
