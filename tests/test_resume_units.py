"""rwkv7/train/resume.py's branches that a one-process CPU run never takes, as units: the DeepSpeed engine's
checkpoint files, strategy ddp's sharded optimizer state, several ranks (the epoch sum stored as the mean over ranks,
a rank that could not write), a failed commit, and the refusal to resume ZeRO shards on another GPU count. The
Trainer, its strategy and the DeepSpeed engine are recording stand-ins; the checkpoint files are real.
Written against the mutants mutmut found alive in resume.py (docs/TESTING.md)."""
import datetime
import errno
import json

import pytest
import torch

from rwkv7 import checkpoint as ckpt
from rwkv7.errors import UserError
from rwkv7.fsutil import gib
from rwkv7.init import init_model
from rwkv7.model import ModelShape, RWKV7
from rwkv7.recipe import load_recipe
from rwkv7.testhooks import Faults
from rwkv7.train import resume

ZERO2 = ["train.accelerator=gpu", "train.precision=bf16", "train.strategy=deepspeed_stage_2"]


class Engine:
    """DeepSpeed's engine as the checkpoint code uses it: records the calls."""

    def __init__(self):
        self.calls = []

    def save_checkpoint(self, *args, **kwargs):
        self.calls.append(("save", args, kwargs))

    def load_checkpoint(self, *args, **kwargs):
        self.calls.append(("load", args, kwargs))


class Strategy:
    def __init__(self, engine=None, others_failed=False, mean=None):
        if engine is not None:
            self.deepspeed_engine = engine
        self.others_failed, self.mean = others_failed, mean
        self.calls = []

    def barrier(self):
        self.calls.append("barrier")

    def reduce_boolean_decision(self, flag, all=True):
        self.calls.append(("any", flag))
        return flag or self.others_failed

    def reduce(self, t, reduce_op):
        self.calls.append(("reduce", float(t), t.dtype, reduce_op))
        return torch.tensor([self.mean], dtype=t.dtype)


class Trainer:
    def __init__(self, optimizer, rank=0, world=1, strategy=None):
        self.optimizers = [optimizer]
        self.global_rank, self.world_size, self.is_global_zero = rank, world, rank == 0
        self.strategy = strategy or Strategy()


class Module:
    def __init__(self, model):
        self.model, self.bad_steps, self.device = model, 0, torch.device("cpu")


def small_model(seed=0):
    model = RWKV7(ModelShape(n_layer=2, n_embd=64, vocab_size=16, head_size=64))
    init_model(model, seed=seed)  # every parameter set (the constructor leaves some uninitialised)
    return model


def same_weights(saved: dict, model: dict) -> bool:
    """saved: weights as rwkv7.checkpoint writes them (the official bf16 format), model: the model's own."""
    return saved.keys() == model.keys() and all(torch.equal(saved[k], model[k].to(saved[k].dtype)) for k in saved)


# ---- the files a checkpoint holds, per strategy -------------------------------------------------------------------

@pytest.mark.parametrize("rank", [0, 1])
def test_deepspeed_every_rank_writes_its_shard_and_rank_zero_the_weights(tmp_path, rank):
    engine, model = Engine(), small_model()
    trainer = Trainer(torch.optim.SGD(model.parameters(), lr=0.1), rank, 2, Strategy(engine))
    resume.write_checkpoint_files(trainer, Module(model), tmp_path)
    assert engine.calls == [("save", (str(tmp_path),), {"tag": "ds"})]
    if rank == 0:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.pth"]
        assert same_weights(resume.checkpoint_weights(tmp_path), model.state_dict())  # no state.pt: the weights
    else:
        assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("rank", [0, 1])
def test_ddp_every_rank_sends_its_optimizer_shard(tmp_path, monkeypatch, rank):
    from rwkv7.train import data_parallel

    calls = []
    monkeypatch.setattr(data_parallel, "save_state", lambda *a, **kw: calls.append((a, kw)))
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.sharded = True
    trainer = Trainer(opt, rank, 2)
    resume.write_checkpoint_files(trainer, Module(model), tmp_path)
    assert calls == [((tmp_path, model, opt), {"write": rank == 0})]
    assert not list(tmp_path.iterdir())


def test_a_plain_optimizer_is_saved_by_rank_zero_alone(tmp_path):
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    resume.write_checkpoint_files(Trainer(opt, 1, 2), Module(model), tmp_path)
    assert not list(tmp_path.iterdir())
    resume.write_checkpoint_files(Trainer(opt, 0, 2), Module(model), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_deepspeed_restores_the_optimizer_shards_but_not_the_scheduler(tmp_path):
    engine = Engine()
    trainer = Trainer(None, 0, 2, Strategy(engine))
    resume.restore_optimizer(trainer, tmp_path / "step-00000004")
    assert engine.calls == [("load", (str(tmp_path / "step-00000004"),),
                             {"tag": "ds", "load_optimizer_states": True, "load_lr_scheduler_states": False})]


def test_checkpoint_meta_says_when_it_was_written():
    recipe = load_recipe("tiny")
    before = datetime.datetime.now()
    meta = resume.checkpoint_meta(Trainer(None, 0, 3), recipe, resume.RunState(step=7))
    assert before <= datetime.datetime.fromisoformat(meta["time"]) <= datetime.datetime.now()
    assert (meta["world_size"], meta["state"]["step"], meta["fingerprint"]) == (3, 7, recipe.fingerprint())


# ---- save_full_checkpoint on several ranks and when writing fails -------------------------------------------------

def save(tmp_path, trainer, state):
    model = trainer._model
    resume.save_full_checkpoint(trainer, Module(model), load_recipe("tiny"), tmp_path, state, Faults())


def trainer_of(model, **kw):
    t = Trainer(torch.optim.SGD(model.parameters(), lr=0.1), **kw)
    t._model = model
    return t


@pytest.mark.parametrize("world,count,reduced", [(2, 3, True), (1, 3, False), (2, 0, False), (3, 1, True)])
def test_meta_stores_the_mean_over_ranks_of_the_epoch_sum(tmp_path, world, count, reduced):
    strategy = Strategy(mean=10.5)
    trainer = trainer_of(small_model(), world=world, strategy=strategy)
    state = resume.RunState(step=4, loss_sum=6.0, loss_count=count)
    save(tmp_path, trainer, state)
    saved = ckpt.read_meta(tmp_path / "ckpt" / "step-00000004")["state"]
    assert saved["loss_sum"] == (10.5 if reduced else 6.0)
    assert [c for c in strategy.calls if c[0] == "reduce"] == ([("reduce", 6.0, torch.float64, "mean")] if reduced
                                                               else [])


def test_a_rank_above_zero_writes_into_rank_zeros_folder(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(resume, "write_checkpoint_files", lambda trainer, module, tmp: seen.append(tmp))
    save(tmp_path, trainer_of(small_model(), rank=1, world=2), resume.RunState(step=12))
    assert seen == [tmp_path / "ckpt" / ".tmp-step-00000012"]
    assert not (tmp_path / "ckpt").exists()  # rank 1 neither creates nor commits it


def test_another_ranks_failure_fails_every_rank_and_keeps_the_last_checkpoint(tmp_path):
    model = small_model()
    save(tmp_path, trainer_of(model), resume.RunState(step=3))
    with pytest.raises(UserError) as e:
        save(tmp_path, trainer_of(model, world=2, strategy=Strategy(others_failed=True)), resume.RunState(step=6))
    assert str(e.value).startswith("could not write the checkpoint of step 6: another rank could not write its part "
                                   "(kept step-00000003)")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000003"]  # the half-written one gone


@pytest.mark.parametrize("remove_first", [False, True])
def test_a_failed_commit_is_an_error_naming_the_space_needed(tmp_path, monkeypatch, remove_first):
    """commit_checkpoint fails (full disk while writing meta.json, or after the folder was already moved: then
    there is nothing left to remove, which must not hide the error)."""
    import shutil

    def failing_commit(tmp, meta, keep):
        if remove_first:
            shutil.rmtree(tmp)
        raise OSError(errno.ENOSPC, "No space left on device")

    model = small_model()
    monkeypatch.setattr(ckpt, "commit_checkpoint", failing_commit)
    with pytest.raises(UserError) as e:
        save(tmp_path, trainer_of(model), resume.RunState(step=5))
    msg = str(e.value)
    assert msg.startswith("could not write the checkpoint of step 5 in ") and "No space left on device" in msg
    assert f"about {gib(ckpt.checkpoint_bytes(tmp_path, model))} needed" in msg
    assert not list((tmp_path / "ckpt").iterdir())


# ---- resuming DeepSpeed ZeRO shards ----------------------------------------------------------------------------

def checkpoint_with(run_dir, recipe, meta_extra):
    model = small_model()
    tmp = ckpt.begin_checkpoint(run_dir, 8)
    ckpt.save_plain_state(tmp, model, torch.optim.SGD(model.parameters(), lr=0.1))
    meta = {"state": {"step": 8}, "fingerprint": recipe.fingerprint(), **meta_extra}
    return ckpt.commit_checkpoint(tmp, meta, keep=2)


def test_zero_shards_resume_only_on_the_gpu_count_that_wrote_them(tmp_path):
    recipe = load_recipe("tiny", ZERO2 + ["train.devices=2"])
    latest = checkpoint_with(tmp_path, recipe, {"world_size": 4})
    with pytest.raises(UserError) as e:
        resume.find_resume(tmp_path, recipe, force=False)
    assert str(e.value) == (
        "checkpoint step-00000008 holds DeepSpeed ZeRO shards of 4 GPU(s) and this run has 2: resume on 4 GPU(s), "
        f"or continue from its weights with --load-model {tmp_path / 'rwkv-<N>.pth'} in a fresh --out "
        "(new optimizer state)")
    assert resume.find_resume(tmp_path, load_recipe("tiny", ZERO2 + ["train.devices=4"]), force=True)[0] == latest


@pytest.mark.parametrize("meta_extra", [{"world_size": 2}, {}])
def test_zero_shards_of_the_same_count_or_of_an_unknown_one_resume(tmp_path, meta_extra):
    recipe = load_recipe("tiny", ZERO2 + ["train.devices=2"])
    latest = checkpoint_with(tmp_path, recipe, meta_extra)
    path, state = resume.find_resume(tmp_path, recipe, force=False)
    assert (path, state.step) == (latest, 8)


def test_other_strategies_resume_on_any_count(tmp_path):
    recipe = load_recipe("tiny", ["train.devices=2"])
    latest = checkpoint_with(tmp_path, recipe, {"world_size": 4})
    assert resume.find_resume(tmp_path, recipe, force=False)[0] == latest


def test_another_recipe_is_refused_with_the_fix(tmp_path):
    latest = checkpoint_with(tmp_path, load_recipe("tiny"), {"world_size": 1})
    with pytest.raises(UserError) as e:
        resume.find_resume(tmp_path, load_recipe("tiny", ["train.seed=9"]), force=False)
    assert str(e.value) == (f"{tmp_path} holds a run of a different recipe (checkpoint {latest.name}): use another "
                            "--out, or --force-resume to continue it with the new settings")
