"""The Lightning Trainer each recipe gets (rwkv7/train/trainer.py) and the decisions ranks share
(rwkv7/train/ranks.py), as units: pl.Trainer is replaced by a recorder of its arguments (a GPU Trainer cannot be
built on a CPU host), and the ranks' strategy by a recorder of the collectives asked for. The runs themselves are
tested end to end by test_train.py, test_data_parallel.py and the GPU tests."""
import datetime
import os
import types

import pytest
import pytorch_lightning as pl
import torch

from rwkv7.recipe import load_recipe
from rwkv7.strategy import Strategy
from rwkv7.train import ranks, trainer as trainer_module

GPU = ["train.accelerator=gpu", "train.precision=bf16"]


@pytest.fixture
def built(monkeypatch):
    """build_trainer(recipe overrides) -> the keyword arguments pl.Trainer was given."""
    calls = []
    monkeypatch.setattr(pl, "Trainer", lambda **kwargs: calls.append(kwargs) or kwargs)
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)

    def build(*overrides, callbacks=("cb",), steps=7):
        kwargs = trainer_module.build_trainer(load_recipe("tiny", list(overrides)), list(callbacks), steps)
        assert calls[-1] is kwargs
        return kwargs

    return build


def test_every_trainer_runs_our_steps_only_with_our_sampler(built):
    """Common to every recipe: the step count, one Lightning epoch, no Lightning checkpoints, logs, progress bar,
    summary or sanity validation (the run does its own), each rank's own sampler, the callbacks and the layout."""
    for overrides in ([], ["train.devices=2"], GPU + ["train.strategy=single"], GPU + ["train.strategy=ddp"],
                      GPU + ["train.strategy=deepspeed_stage_2"], GPU + ["train.devices=2", "train.num_nodes=3"]):
        kwargs = built(*overrides)
        recipe = load_recipe("tiny", overrides)
        assert {k: kwargs[k] for k in ("max_steps", "max_epochs", "enable_checkpointing", "logger",
                                       "replace_sampler_ddp", "enable_progress_bar", "enable_model_summary",
                                       "num_sanity_val_steps", "callbacks", "num_nodes", "devices")} == {
            "max_steps": 7, "max_epochs": 1, "enable_checkpointing": False, "logger": False,
            "replace_sampler_ddp": False, "enable_progress_bar": False, "enable_model_summary": False,
            "num_sanity_val_steps": 0, "callbacks": ["cb"], "num_nodes": recipe.train.num_nodes,
            "devices": recipe.train.devices}, overrides


def test_cpu_trainer_one_process_clips_in_lightning(built):
    kwargs = built("train.grad_clip=0.5")
    assert (kwargs["accelerator"], kwargs["precision"], kwargs["gradient_clip_val"], kwargs["strategy"]) == \
        ("cpu", 32, 0.5, None)
    assert built("train.grad_clip=0")["gradient_clip_val"] is None  # 0: no clipping (Lightning's None)


def test_cpu_trainer_several_processes_is_ddp_over_gloo_with_the_recipes_timeout(built):
    from pytorch_lightning.strategies import DDPStrategy

    kwargs = built("train.devices=2", "train.dist_timeout_min=3")
    assert isinstance(kwargs["strategy"], DDPStrategy)
    assert kwargs["strategy"]._timeout == datetime.timedelta(minutes=3)
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in os.environ  # NCCL's watchdog is a GPU matter


def test_data_parallel_trainer_uses_our_strategy_and_the_nccl_watchdog(built, monkeypatch):
    from rwkv7.train import data_parallel

    seen = []
    monkeypatch.setattr(data_parallel, "lightning_strategy", lambda timeout: seen.append(timeout) or "ours")
    kwargs = built(*GPU, "train.strategy=ddp", "train.dist_timeout_min=4")
    assert (kwargs["accelerator"], kwargs["precision"], kwargs["strategy"]) == ("gpu", 32, "ours")
    assert "gradient_clip_val" not in kwargs  # the sharded optimizer clips the fp32 master gradients
    assert seen == [datetime.timedelta(minutes=4)]
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    cpu = built("train.strategy=ddp", "train.devices=2")
    assert (cpu["accelerator"], cpu["strategy"]) == ("cpu", "ours")


def test_single_gpu_trainer_leaves_precision_and_clipping_to_the_master_weight_optimizer(built):
    kwargs = built(*GPU, "train.strategy=single")
    assert (kwargs["accelerator"], kwargs["precision"]) == ("gpu", 32)
    assert "gradient_clip_val" not in kwargs and "strategy" not in kwargs
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in os.environ


@pytest.mark.parametrize("overrides,precision", [(["train.precision=bf16", "train.strategy=deepspeed_stage_2"], "bf16"),
                                                 (["train.precision=fp32", "train.strategy=auto"], 32)])
def test_deepspeed_trainer(built, monkeypatch, overrides, precision):
    """DeepSpeed (and auto in fp32, which resolves to deepspeed_stage_2): Lightning's precision plugin and clipping,
    the DeepSpeed strategy with the recipe's timeout, and NCCL's watchdog on."""
    seen = []
    monkeypatch.setattr(trainer_module, "deepspeed_strategy", lambda t, timeout: seen.append((t, timeout)) or "ds")
    kwargs = built("train.accelerator=gpu", *overrides, "train.grad_clip=2.0", "train.dist_timeout_min=9")
    assert (kwargs["accelerator"], kwargs["precision"], kwargs["strategy"], kwargs["gradient_clip_val"]) == \
        ("gpu", precision, "ds", 2.0)
    (t, timeout), = seen
    assert t.strategy == "deepspeed_stage_2" and timeout == datetime.timedelta(minutes=9)
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"


@pytest.mark.parametrize("strategy,stage,offload", [("deepspeed_stage_2", 2, False),
                                                    ("deepspeed_stage_2_offload", 2, True),
                                                    ("deepspeed_stage_3", 3, False),
                                                    ("deepspeed_stage_3_offload", 3, True)])
def test_deepspeed_settings_from_the_recipe(monkeypatch, strategy, stage, offload):
    """ZeRO stage and offload from the strategy, both buckets from ds_bucket_mb (in bytes, 1 MB = 1e6), parameters
    offloaded only at stage 3, the micro-batch for DeepSpeed's logging."""
    import pytorch_lightning.strategies as strategies

    seen = []

    class Recorder:
        def __init__(self, **kwargs):
            seen.append(kwargs)

    monkeypatch.setattr(strategies, "DeepSpeedStrategy", Recorder)
    overrides = GPU + ["train.strategy=deepspeed_stage_2", "train.ds_bucket_mb=3", "train.micro_bsz=5"]
    t = load_recipe("tiny", overrides).train
    t.strategy = Strategy(strategy)  # set after validation: recipes refuse stage 3 for now (rwkv7.strategy)
    made = trainer_module.deepspeed_strategy(t, datetime.timedelta(minutes=1))
    assert isinstance(made, Recorder)
    assert seen == [dict(stage=stage, offload_optimizer=offload, offload_parameters=offload and stage == 3,
                         allgather_bucket_size=3_000_000, reduce_bucket_size=3_000_000,
                         logging_batch_size_per_gpu=5)]


def test_deepspeed_starts_its_process_group_with_the_recipes_timeout(monkeypatch):
    """Lightning 1.9.5 gives DeepSpeed no timeout: ours passes the recipe's, with Lightning's backend and port."""
    import sys

    import pytorch_lightning.strategies as strategies

    class Base:
        def __init__(self, **kwargs):
            self.cluster_environment = types.SimpleNamespace(main_port=29511)
            self.events = []

        def _set_node_environment_variables(self):
            self.events.append("env")

        def _get_process_group_backend(self):
            return "nccl"

    calls = []
    fake = types.SimpleNamespace(init_distributed=lambda backend, **kw: calls.append((backend, kw)))
    monkeypatch.setattr(strategies, "DeepSpeedStrategy", Base)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    t = load_recipe("tiny", GPU + ["train.strategy=deepspeed_stage_2"]).train
    made = trainer_module.deepspeed_strategy(t, datetime.timedelta(minutes=6))
    made._init_deepspeed_distributed()
    assert made.events == ["env"] and made._process_group_backend == "nccl"
    assert calls == [("nccl", {"timeout": datetime.timedelta(minutes=6), "distributed_port": 29511})]


class FakeStrategy:
    def __init__(self):
        self.calls = []

    def reduce_boolean_decision(self, flag, all):
        self.calls.append(("decision", flag, all))
        return True

    def reduce(self, t, reduce_op):
        value = t.tolist() if t.device.type != "meta" else None
        self.calls.append(("reduce", t.dtype, t.device.type, value, reduce_op))
        return torch.tensor([2.5], dtype=t.dtype)


def fake_trainer(world):
    return types.SimpleNamespace(world_size=world, strategy=FakeStrategy())


def test_one_process_decides_and_averages_alone():
    t = fake_trainer(1)
    assert ranks.any_rank(t, False) is False and ranks.any_rank(t, True) is True
    assert ranks.mean_over_ranks(t, 0.1, "cpu") == 0.1
    assert t.strategy.calls == []


def test_several_ranks_share_any_flag_and_average_in_float64():
    t = fake_trainer(2)
    assert ranks.any_rank(t, False) is True  # another rank's flag
    assert ranks.mean_over_ranks(t, 0.1, "cpu") == 2.5
    assert t.strategy.calls == [("decision", False, False), ("reduce", torch.float64, "cpu", [0.1], "mean")]
    ranks.mean_over_ranks(t, 0.1, "meta")  # the collective runs on the device given (NCCL needs CUDA tensors)
    assert t.strategy.calls[-1] == ("reduce", torch.float64, "meta", None, "mean")
