"""rwkv7/train/run.py as units, in one process: how a run is set up (options, ranks, the step count, the model it
starts from, the files it writes first), how the Trainer is driven and how the run's end becomes an exit code.
The expensive or environment-bound collaborators (preflight, data preparation, the Lightning Trainer, the trajectory
check) are replaced by recorders; the end-to-end runs of test_train.py cover the same paths in subprocesses, which
mutation testing cannot attribute."""
import dataclasses
import datetime
import json
import platform
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rwkv7 import checkpoint as ckpt
from rwkv7.data.binidx import open_binidx, write_binidx
from rwkv7.data.source import TrainingData
from rwkv7.errors import UserError
from rwkv7.init import init_model
from rwkv7.model import ModelShape, RWKV7
from rwkv7.recipe import load_recipe
from rwkv7.testhooks import Faults
from rwkv7.train import run
from rwkv7.train.module import NonFiniteLoss
from rwkv7.train.resume import RunState
from rwkv7.trajectory import format_epoch_line

# a model of 2 layers, 64 wide, 2 heads of 32 (head_size differs from its default 64 on purpose), 32 tokens;
# 3 steps of 2 x 16 tokens a mini-epoch, 2 mini-epochs: last_step 6
SMALL = ["model.n_layer=2", "model.n_embd=64", "model.vocab_size=32", "model.head_size=32", "train.ctx_len=16",
         "train.micro_bsz=2", "train.epoch_steps=3", "train.epoch_count=2", "train.seed=5"]
GPU = ["train.accelerator=gpu", "train.precision=bf16"]
N_TOKENS = 2000          # 40 documents of 50 tokens
MAGIC = 113              # the one prime p % 3 == 2 in (0.9, 1] x 2000 // 16 = 125 chunks


def small(*extra):
    return load_recipe("tiny", SMALL + list(extra))


@pytest.fixture(autouse=True)
def rank_zero(monkeypatch):
    """Every test starts as a single process: no rank variables from the environment pytest runs in."""
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A real binidx of 2000 tokens (ids 1..31) and a schedule exit of 5000 tokens."""
    rng = np.random.default_rng(0)
    prefix = tmp_path_factory.mktemp("data") / "toks"
    write_binidx(prefix, [rng.integers(1, 32, 50) for _ in range(40)])
    return TrainingData(open_binidx(prefix), MAGIC, 5000)


def weights_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)


def bf16(sd: dict) -> dict:
    return {k: v.to(torch.bfloat16) for k, v in sd.items()}


def random_model(recipe, seed):
    """A model whose weights differ from the official init (and from every other seed's)."""
    m = recipe.model
    model = RWKV7(ModelShape(m.n_layer, m.n_embd, m.vocab_size, m.head_size))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


def official_init(recipe, seed, bf16_round):
    m = recipe.model
    model = RWKV7(ModelShape(m.n_layer, m.n_embd, m.vocab_size, m.head_size))
    init_model(model, seed=seed, bf16_round=bf16_round)
    return weights_of(model)


def make_checkpoint(run_dir, recipe, model, step, epochs=(), fingerprint=None):
    """A complete CPU checkpoint ckpt/step-N as the tracker writes it: state.pt (model, optimizer) and meta.json."""
    state = RunState(step=step)
    for e in epochs:
        state.records.append({"epoch": e, "loss": 4.0 - e, "lr": 1e-3, "line": format_epoch_line(e, 4.0 - e, 1e-3, e)})
    tmp = ckpt.begin_checkpoint(run_dir, step)
    ckpt.save_plain_state(tmp, model, torch.optim.SGD(model.parameters(), lr=0.1))
    meta = {"state": dataclasses.asdict(state), "fingerprint": fingerprint or recipe.fingerprint(), "world_size": 1}
    return ckpt.commit_checkpoint(tmp, meta, keep=2)


@pytest.fixture
def setup(monkeypatch, data):
    """run_training with preflight, prepare_data, fit and finish replaced by recorders: returns the list of their
    calls in order, each (name, *arguments); fit returns 42 and finish 7, so the exit code says which one ended it."""
    import rwkv7.preflight

    calls = []
    monkeypatch.setattr(rwkv7.preflight, "preflight", lambda recipe, run_dir: calls.append(
        ("preflight", recipe, run_dir, run_dir.exists())))
    monkeypatch.setattr(run, "prepare_data", lambda recipe: calls.append(("data", recipe)) or data)

    def fit(plan, state, model, check):
        calls.append(("fit", plan, state, model, check))
        return 42

    monkeypatch.setattr(run, "fit", fit)

    def finish(recipe, run_dir, check):
        calls.append(("finish", recipe, run_dir, check))
        return 7

    monkeypatch.setattr(run, "finish", finish)
    return calls


def only(calls, kind):
    found = [c for c in calls if c[0] == kind]
    assert len(found) == 1, calls
    return found[0]


# ---------------------------------------------------------------------------------------------------------------
# RunOptions and ranks


def test_run_options_defaults():
    o = run.RunOptions()
    assert (o.resume, o.force_resume, o.load_model, o.progress, o.check, o.wandb_project, o.profile_step) == \
        (True, False, None, True, True, None, None)
    assert type(o.faults) is Faults and o.faults is not run.RunOptions().faults  # one injector per run


@pytest.mark.parametrize("env, zero", [
    ({}, True),
    ({"RANK": "0", "LOCAL_RANK": "0", "NODE_RANK": "0"}, True),
    ({"RANK": "1"}, False),                          # torchrun's global rank
    ({"SLURM_PROCID": "2"}, False),                  # srun's
    ({"SLURM_PROCID": "0"}, True),
    ({"RANK": "0", "SLURM_PROCID": "3"}, True),      # RANK wins over SLURM_PROCID
    ({"RANK": "3", "SLURM_PROCID": "0"}, False),
    ({"LOCAL_RANK": "1"}, False),                    # Lightning's copies of the command on one node
    ({"NODE_RANK": "1"}, False),                     # rank 0 of another node
    ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True),
])
def test_launched_as_rank_zero(monkeypatch, env, zero):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert run.launched_as_rank_zero() is zero


# ---------------------------------------------------------------------------------------------------------------
# run_training


def test_fresh_run_checks_first_then_starts_from_the_official_init(setup, data, tmp_path, monkeypatch):
    calls = setup
    seeds, threads = [], []
    monkeypatch.setattr(torch, "manual_seed", seeds.append)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    recipe = small("train.cpu_threads=3", "train.init_bf16_round=false")
    run_dir = tmp_path / "a" / "b"  # made with its parents, after the preflight
    faults = Faults()
    code = run.run_training(recipe, run_dir, run.RunOptions(progress=False, wandb_project="proj", profile_step=4,
                                                            faults=faults, check=False))
    assert code == 42  # fit's
    assert [c[0] for c in calls] == ["preflight", "data", "fit"]
    assert calls[0] == ("preflight", recipe, run_dir, False) and calls[1] == ("data", recipe)
    assert seeds == [5] and threads == [3]
    _, plan, state, model, check = calls[2]
    assert check is False and state == RunState()
    assert (plan.recipe, plan.run_dir, plan.data, plan.last_step, plan.first_epoch, plan.resume_from) == \
        (recipe, run_dir, data, 6, 0, None)
    assert (plan.progress, plan.wandb_project, plan.profile_step, plan.faults) == (False, "proj", 4, faults)
    assert plan.faults is faults
    assert same(weights_of(model), official_init(recipe, 5, False))
    assert same(ckpt.read_state_dict(run_dir / "rwkv-init.pth"), bf16(official_init(recipe, 5, False)))
    log = (run_dir / "train_log.txt").read_text().splitlines()
    assert len(log) == 2 and log[0].startswith("NEW RUN ") and json.loads(log[1])["train"]["seed"] == 5
    assert json.loads((run_dir / "run.json").read_text())["n_tokens"] == N_TOKENS


def test_keyword_options_and_a_fresh_init_removes_the_old_logs(setup, tmp_path, capsys):
    calls = setup
    recipe = small()
    (tmp_path / "train_log.txt").write_text("NEW RUN old\n{}\n" + format_epoch_line(0, 3.0, 1e-3, 0))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "val_log.txt").write_text("0 3.0\n")
    (tmp_path / "notes.txt").write_text("mine")
    # a checkpoint is there, but resume=False: a fresh run in the same folder
    make_checkpoint(tmp_path, recipe, random_model(recipe, 1), 3, epochs=[0])
    assert run.run_training(recipe, tmp_path, resume=False, check=False, wandb_project="w") == 42
    _, plan, state, model, check = only(calls, "fit")
    assert (plan.resume_from, state.step, check, plan.wandb_project, plan.progress) == (None, 0, False, "w", True)
    assert same(weights_of(model), official_init(recipe, 5, True))
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "val_log.txt").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"
    log = (tmp_path / "train_log.txt").read_text()
    assert log.startswith("NEW RUN ") and "old" not in log and log.count("\n") == 2
    assert "resuming" not in capsys.readouterr().out


def test_no_thread_count_set_without_cpu_threads_or_on_a_gpu(setup, tmp_path, monkeypatch):
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    run.run_training(small("train.cpu_threads=0"), tmp_path / "cpu", check=False)
    run.run_training(small(*GPU, "train.cpu_threads=2"), tmp_path / "gpu", check=False)
    assert threads == []


def test_resume_continues_from_the_checkpoint_and_repairs_the_log(setup, tmp_path, capsys):
    calls = setup
    recipe = small()
    saved = random_model(recipe, 1)
    path = make_checkpoint(tmp_path, recipe, saved, 5, epochs=[0])
    lines = [format_epoch_line(e, 4.0 - e, 1e-3, e) for e in range(3)]
    (tmp_path / "train_log.txt").write_text("NEW RUN 1\n{}\n" + "".join(lines))  # epochs 1 and 2 are redone
    (tmp_path / "metrics.jsonl").write_text("".join(f'{{"step": {s}}}\n' for s in range(1, 8)))
    assert run.run_training(recipe, tmp_path, check=True) == 42
    _, plan, state, model, check = only(calls, "fit")
    assert (plan.resume_from, plan.first_epoch, plan.last_step, state.step, check) == (path, 1, 6, 5, True)
    assert same(weights_of(model), weights_of(saved))
    assert capsys.readouterr().out == f"resuming {tmp_path} from step-00000005 (step 5 of 6)\n"
    log = (tmp_path / "train_log.txt").read_text().splitlines(keepends=True)
    assert log[:3] == ["NEW RUN 1\n", "{}\n", lines[0]] and log[3].startswith("NEW RUN ") and len(log) == 5
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert not (tmp_path / "rwkv-init.pth").exists()


def test_a_rank_above_zero_resumes_without_writing_anything(setup, tmp_path, capsys, monkeypatch):
    calls = setup
    monkeypatch.setenv("LOCAL_RANK", "1")
    recipe = small()
    saved = random_model(recipe, 1)
    make_checkpoint(tmp_path, recipe, saved, 4, epochs=[0])
    text = "NEW RUN 1\n{}\n" + "".join(format_epoch_line(e, 4.0 - e, 1e-3, e) for e in range(3))
    (tmp_path / "train_log.txt").write_text(text)
    assert run.run_training(recipe, tmp_path, check=False) == 42
    assert same(weights_of(only(calls, "fit")[3]), weights_of(saved))
    assert (tmp_path / "train_log.txt").read_text() == text  # rank 0 repairs and appends, not this one
    assert not (tmp_path / "run.json").exists() and capsys.readouterr().out == ""


def test_a_rank_above_zero_starting_fresh_writes_no_init_and_keeps_the_logs(setup, tmp_path, monkeypatch):
    calls = setup
    monkeypatch.setenv("NODE_RANK", "1")
    recipe = small()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    assert run.run_training(recipe, tmp_path) == 42
    assert same(weights_of(only(calls, "fit")[3]), official_init(recipe, 5, True))  # every rank starts the same
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_resume_of_another_recipe_needs_force(setup, tmp_path):
    calls = setup
    recipe = small()
    make_checkpoint(tmp_path, recipe, random_model(recipe, 1), 3, epochs=[0], fingerprint="0123456789abcdef")
    with pytest.raises(UserError, match="different recipe"):
        run.run_training(recipe, tmp_path)
    assert run.run_training(recipe, tmp_path, force_resume=True) == 42
    assert only(calls, "fit")[2].step == 3


def test_steps_until_the_exit_tokens_without_epoch_count(setup, data, tmp_path):
    calls = setup
    # 5000 exit tokens / (2 x 16 tokens a step) = 156.25: 157 steps
    run.run_training(small("train.epoch_count=0"), tmp_path / "a")
    # 4 devices: 4 x 2 x 16 = 128 tokens a step, 5000 / 128 = 39.06: 40 steps; epoch_steps stays 3
    run.run_training(small("train.epoch_count=0", "train.devices=4"), tmp_path / "b")
    assert [c[1].last_step for c in calls if c[0] == "fit"] == [157, 40]


def test_load_model_starts_from_its_weights(setup, tmp_path):
    calls = setup
    recipe = small()
    source = random_model(recipe, 2)
    ckpt.save_weights(source, tmp_path / "start.pth")
    assert run.run_training(recipe, tmp_path / "run", load_model=str(tmp_path / "start.pth")) == 42
    _, plan, state, model, _ = only(calls, "fit")
    assert same(weights_of(model), bf16(weights_of(source))) and plan.resume_from is None
    assert not (tmp_path / "run" / "rwkv-init.pth").exists()
    assert (tmp_path / "run" / "train_log.txt").read_text().startswith("NEW RUN ")


def test_load_model_of_another_shape_names_the_file(setup, tmp_path):
    wide = small("model.n_embd=128", "model.head_size=64")
    ckpt.save_weights(random_model(wide, 2), tmp_path / "wide.pth")
    with pytest.raises(UserError, match=f"^{re.escape(str(tmp_path / 'wide.pth'))} does not match this model"):
        run.run_training(small(), tmp_path / "run", load_model=str(tmp_path / "wide.pth"))


def test_load_model_fails_before_anything_is_made(setup, tmp_path):
    with pytest.raises(UserError, match="not found"):
        run.run_training(small(), tmp_path / "run", load_model=str(tmp_path / "missing.pth"))
    assert setup == [] and not (tmp_path / "run").exists()


def test_load_model_refuses_a_folder_with_checkpoints(setup, tmp_path):
    recipe = small()
    ckpt.save_weights(random_model(recipe, 2), tmp_path / "start.pth")
    run_dir = tmp_path / "run"
    make_checkpoint(run_dir, recipe, random_model(recipe, 1), 3)
    with pytest.raises(UserError) as e:
        run.run_training(recipe, run_dir, load_model=str(tmp_path / "start.pth"))
    assert str(e.value) == f"--load-model given but {run_dir} already holds checkpoints: use a fresh --out"
    # without resuming the checkpoints are not looked at: the weights are loaded into a fresh run
    assert run.run_training(recipe, run_dir, resume=False, load_model=str(tmp_path / "start.pth")) == 42


def test_already_trained_writes_the_missing_final_weights_and_finishes(setup, tmp_path, capsys):
    calls = setup
    recipe = small()
    saved = random_model(recipe, 3)
    make_checkpoint(tmp_path, recipe, saved, 6, epochs=[0, 1])
    assert run.run_training(recipe, tmp_path, check=False) == 7  # finish's
    assert [c[0] for c in calls] == ["preflight", "data", "finish"]
    assert calls[-1] == ("finish", recipe, tmp_path, False)
    assert capsys.readouterr().out == f"{tmp_path}: already trained 6 of 6 steps; nothing to do\n"
    assert same(ckpt.read_state_dict(tmp_path / "rwkv-final.pth"), bf16(weights_of(saved)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "rwkv-final.pth"]  # no header, no init


def test_already_trained_keeps_an_existing_final(setup, tmp_path):
    recipe = small()
    make_checkpoint(tmp_path, recipe, random_model(recipe, 3), 7)
    (tmp_path / "rwkv-final.pth").write_bytes(b"kept")
    assert run.run_training(recipe, tmp_path) == 7
    assert (tmp_path / "rwkv-final.pth").read_bytes() == b"kept"
    assert setup[-1] == ("finish", recipe, tmp_path, True)


def test_already_trained_on_another_rank_writes_nothing(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "2")
    recipe = small()
    make_checkpoint(tmp_path, recipe, random_model(recipe, 3), 6)
    assert run.run_training(recipe, tmp_path) == 7
    assert not (tmp_path / "rwkv-final.pth").exists()


def test_nothing_to_train_without_a_checkpoint_writes_no_final(setup, tmp_path, monkeypatch, data, capsys):
    # exit tokens 0: zero steps, and nothing to take final weights from
    monkeypatch.setattr(run, "prepare_data", lambda recipe: TrainingData(data.data, MAGIC, 0))
    assert run.run_training(small("train.epoch_count=0"), tmp_path) == 7
    assert capsys.readouterr().out == f"{tmp_path}: already trained 0 of 0 steps; nothing to do\n"
    assert list(tmp_path.iterdir()) == []


def test_one_step_short_trains(setup, tmp_path):
    recipe = small()
    make_checkpoint(tmp_path, recipe, random_model(recipe, 3), 5)
    assert run.run_training(recipe, tmp_path) == 42


# ---------------------------------------------------------------------------------------------------------------
# starting_model


def test_starting_model_shape_and_gradient_checkpointing(tmp_path):
    recipe = small("train.grad_cp=1")
    model = run.starting_model(recipe, tmp_path, RunState(), None, None, None, False)
    assert model.shape == ModelShape(2, 64, 32, 32) and model.grad_cp is True
    assert run.starting_model(small("train.grad_cp=0"), tmp_path, RunState(), None, None, None, False).grad_cp is False


def test_starting_model_fresh_is_the_official_init_saved_as_rwkv_init(tmp_path):
    recipe = small("train.seed=9", "train.init_bf16_round=true")
    (tmp_path / "train_log.txt").write_text("old\n")  # metrics.jsonl and val_log.txt absent: fine
    model = run.starting_model(recipe, tmp_path, RunState(), None, None, None, True)
    expected = official_init(recipe, 9, True)
    assert same(weights_of(model), expected)
    assert not same(expected, official_init(recipe, 9, False)) and not same(expected, official_init(recipe, 0, True))
    assert same(ckpt.read_state_dict(tmp_path / "rwkv-init.pth"), bf16(expected))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rwkv-init.pth"]


def test_starting_model_load_model_names_the_file_on_a_mismatch(tmp_path):
    recipe = small()
    other = random_model(small("model.n_embd=128", "model.head_size=64"), 0).state_dict()
    with pytest.raises(UserError, match="^given.pth does not match this model"):
        run.starting_model(recipe, tmp_path, RunState(), None, other, "given.pth", True)
    weights = weights_of(random_model(recipe, 4))
    model = run.starting_model(recipe, tmp_path, RunState(), None, weights, "given.pth", True)
    assert same(weights_of(model), weights) and list(tmp_path.iterdir()) == []


def test_starting_model_resume_names_the_checkpoint_on_a_mismatch(tmp_path):
    wide = small("model.n_embd=128", "model.head_size=64")
    path = make_checkpoint(tmp_path, wide, random_model(wide, 0), 3)
    with pytest.raises(UserError, match=f"^{re.escape(str(path))} does not match this model"):
        run.starting_model(small(), tmp_path, RunState(step=3), path, None, None, True)


# ---------------------------------------------------------------------------------------------------------------
# write_run_header, run_info


def test_run_header_is_appended_and_run_json_written(tmp_path, data):
    recipe = small()
    (tmp_path / "train_log.txt").write_text("earlier\n")
    before = datetime.datetime.now().replace(microsecond=0)
    run.write_run_header(recipe, tmp_path, data)
    after = datetime.datetime.now()
    lines = (tmp_path / "train_log.txt").read_text().split("\n")
    assert lines[0] == "earlier" and lines[-1] == "" and len(lines) == 4
    m = re.fullmatch(r"NEW RUN (\d{4}-\d\d-\d\d-\d\d-\d\d-\d\d)", lines[1])
    assert m and before <= datetime.datetime.strptime(m[1], "%Y-%m-%d-%H-%M-%S") <= after
    header = json.loads(lines[2])
    assert header == recipe.to_dict() and header["model"]["head_size"] == 32 and header["name"] == "tiny"
    text = (tmp_path / "run.json").read_text()
    assert text.startswith('{\n "recipe": {\n  "name": "tiny",')  # indented by one space
    assert json.loads(text)["magic_prime"] == MAGIC


def test_run_info_on_a_cpu_host(data, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = small()
    before = datetime.datetime.now()
    info = run.run_info(recipe, data)
    after = datetime.datetime.now()
    assert set(info) == {"recipe", "fingerprint", "data", "n_tokens", "magic_prime", "my_exit_tokens", "python",
                         "torch", "numpy", "cuda", "time"}
    assert info["recipe"] == recipe.to_dict() and info["recipe"]["train"]["epoch_steps"] == 3
    assert info["fingerprint"] == recipe.fingerprint() and re.fullmatch(r"[0-9a-f]{16}", info["fingerprint"])
    assert info["data"] == data.data.prefix and info["data"].endswith("/toks")
    assert (info["n_tokens"], info["magic_prime"], info["my_exit_tokens"]) == (N_TOKENS, MAGIC, 5000)
    assert info["python"] == "{}.{}.{}".format(*sys.version_info[:3]) == platform.python_version()
    assert (info["torch"], info["numpy"], info["cuda"]) == (torch.__version__, np.__version__, torch.version.cuda)
    assert before <= datetime.datetime.fromisoformat(info["time"]) <= after
    json.dumps(info)  # it goes to run.json


def test_run_info_names_the_gpu(data, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA Test GPU")
    assert run.run_info(small(), data)["gpu"] == "NVIDIA Test GPU"


# ---------------------------------------------------------------------------------------------------------------
# data_loader


def test_data_loader_draws_the_run_s_steps_in_order(data):
    recipe = small("train.devices=2", "train.num_workers=2")  # real_bsz 4, micro_bsz 2
    dataset, loader = run.data_loader(recipe, data, 4, 10)
    assert dataset.tokens is data.data.tokens
    assert (dataset.ctx_len, dataset.magic_prime, dataset.micro_bsz, dataset.real_bsz) == (16, MAGIC, 2, 4)
    assert (dataset.start_step, dataset.n_steps, len(dataset)) == (4, 6, 12)
    assert loader.dataset is dataset
    assert (loader.batch_size, loader.num_workers, loader.drop_last, loader.pin_memory,
            loader.persistent_workers) == (2, 2, True, False, False)
    assert isinstance(loader.sampler, torch.utils.data.SequentialSampler)


def test_data_loader_batches_and_pinning(data):
    _, loader = run.data_loader(small("train.num_workers=0"), data, 0, 3)
    assert loader.num_workers == 0
    x, y = next(iter(loader))
    assert x.shape == (2, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert run.data_loader(small(*GPU), data, 0, 3)[1].pin_memory is True


# ---------------------------------------------------------------------------------------------------------------
# fit


class FakeTrainer:
    """The Trainer's part fit() sees: fit(module, loader) runs `during` (the training stand-in), is_global_zero."""

    def __init__(self, is_global_zero=True, during=None):
        self.is_global_zero, self.during, self.fitted = is_global_zero, during, []

    def fit(self, module, loader):
        self.fitted.append((module, loader))
        if self.during:
            self.during(self, module, loader)


@pytest.fixture
def fitting(monkeypatch, data):
    """fit() of a plan ending at step 6, with build_trainer and finish replaced by recorders: returns (exit code,
    the fake trainer, build_trainer's calls, finish's calls, the plan)."""
    from rwkv7.train import trainer as trainer_module
    from rwkv7.train.tracker import RunPlan

    def go(recipe, run_dir, model=None, state=None, check=True, is_global_zero=True, during=None, faults=None):
        built, finished = [], []
        trainer = FakeTrainer(is_global_zero, during)

        def build(recipe, callbacks, steps):
            built.append((recipe, callbacks, steps))
            trainer.callbacks = callbacks  # as Lightning's: the tracker is reachable from the trainer
            return trainer

        monkeypatch.setattr(trainer_module, "build_trainer", build)
        monkeypatch.setattr(run, "finish", lambda r, d, c: finished.append((r, d, c)) or 5)
        plan = RunPlan(recipe, run_dir, data, 6, 0, faults=faults or Faults())
        model = model if model is not None else random_model(recipe, 0)
        code = run.fit(plan, state or RunState(step=2, bad_steps=1), model, check)
        return code, trainer, built, finished, plan

    return go


def test_fit_drives_the_trainer_and_saves_the_final_weights(fitting, tmp_path):
    recipe = small()
    model = random_model(recipe, 0)
    state = RunState(step=2, bad_steps=1)

    def train(trainer, module, loader):  # training changes the weights: the final file holds the trained ones
        with torch.no_grad():
            module.model.emb.weight.add_(1.0)

    faults = Faults()
    code, trainer, built, finished, plan = fitting(recipe, tmp_path, model, state, check=False, during=train,
                                                   faults=faults)
    assert code == 5 and finished == [(recipe, tmp_path, False)]
    [(r, [tracker], steps)] = built
    assert r is recipe and steps == 4  # 6 - 2 steps left
    assert tracker.plan is plan and tracker.state is state
    [(module, loader)] = trainer.fitted
    assert tracker.dataset is loader.dataset and (loader.dataset.start_step, loader.dataset.n_steps) == (2, 4)
    assert module.model is model and module.recipe is recipe and module.bad_steps == 1 and module.faults is faults
    assert model.emb.weight.dtype == torch.float32  # fp32 on the CPU
    assert same(ckpt.read_state_dict(tmp_path / "rwkv-final.pth"), bf16(weights_of(model)))


def test_fit_on_another_rank_neither_saves_nor_checks(fitting, tmp_path):
    code, _, _, finished, _ = fitting(small(), tmp_path, is_global_zero=False)
    assert code == 0 and finished == [] and list(tmp_path.iterdir()) == []


def test_fit_diverged_is_exit_3_and_keeps_the_checkpoint(fitting, tmp_path, capsys):
    def diverge(trainer, module, loader):
        raise NonFiniteLoss("loss is nan at step 3")

    code, _, _, finished, _ = fitting(small(), tmp_path, during=diverge)
    assert code == 3 and finished == [] and list(tmp_path.iterdir()) == []
    assert capsys.readouterr().out == f"error: loss is nan at step 3; the last good checkpoint is kept in " \
                                      f"{tmp_path / 'ckpt'}\n"


def test_fit_stopped_by_a_signal_is_exit_130(fitting, tmp_path, capsys):
    def signal_at_4(trainer, module, loader):  # the tracker saw SIGTERM and stopped after checkpointing step 4
        tracker = trainer.callbacks[0]
        tracker.stopped, tracker.state.step = True, 4

    code, _, _, finished, _ = fitting(small(), tmp_path, state=RunState(step=2), during=signal_at_4)
    assert code == 130 and finished == [] and list(tmp_path.iterdir()) == []
    assert capsys.readouterr().out == "stopped by a signal at step 4; run the same command to resume\n"


def test_fit_a_signal_during_the_last_step_finishes_the_run(fitting, tmp_path, capsys):
    def signal_at_6(trainer, module, loader):
        tracker = trainer.callbacks[0]
        tracker.stopped, tracker.state.step = True, 6

    code, _, _, finished, _ = fitting(small(), tmp_path, during=signal_at_6)
    assert code == 5 and len(finished) == 1 and (tmp_path / "rwkv-final.pth").is_file()
    assert capsys.readouterr().out == ""


def test_fit_without_a_signal_finishes_even_short_of_the_last_step(fitting, tmp_path):
    # the Trainer ran its max_steps; only the tracker's stop flag makes an early end an interruption
    code, _, _, finished, _ = fitting(small(), tmp_path, state=RunState(step=2))
    assert code == 5 and len(finished) == 1


@pytest.mark.parametrize("overrides, dtype", [
    (GPU, torch.bfloat16),                                           # auto on one GPU: single, pure bf16
    (GPU + ["train.devices=2", "train.strategy=ddp"], torch.bfloat16),
    (GPU + ["train.strategy=deepspeed_stage_2"], torch.float32),     # DeepSpeed casts it itself
    (["train.accelerator=gpu", "train.precision=fp32", "train.strategy=ddp", "train.devices=2"], torch.float32),
    (["train.strategy=ddp", "train.devices=2"], torch.float32),      # CPU ranks: fp32
])
def test_fit_model_dtype_follows_master_weights_in_bf16(fitting, tmp_path, overrides, dtype):
    recipe = small(*overrides, "train.compile=false")
    model = random_model(recipe, 0)
    fitting(recipe, tmp_path, model)
    assert {p.dtype for p in model.parameters()} == {dtype}


@pytest.mark.parametrize("overrides, compiled", [
    (GPU + ["train.recompute=full"], [((), {"recompute": "full"})]),
    (GPU + ["train.recompute=selective"], [((), {"recompute": "selective"})]),
    (GPU + ["train.compile=false"], []),
    (["train.compile=true"], []),                                    # CPU runs stay eager
])
def test_fit_compiles_the_blocks_on_gpus_only(fitting, tmp_path, overrides, compiled):
    recipe = small(*overrides)
    model = random_model(recipe, 0)
    calls = []
    model.compile_blocks = lambda *args, **kwargs: calls.append((args, kwargs))
    fitting(recipe, tmp_path, model)
    assert calls == compiled


# ---------------------------------------------------------------------------------------------------------------
# finish


@pytest.fixture
def checked(monkeypatch):
    import rwkv7.trajectory

    calls = []

    def run_check(log, expected, **kwargs):
        calls.append((log, expected, kwargs))
        return 1  # the check failed

    monkeypatch.setattr(rwkv7.trajectory, "run_check", run_check)
    return calls


def test_finish_checks_against_the_expected_log_with_the_recipe_s_tolerances(checked, tmp_path):
    expected = tmp_path / "expected.log"
    expected.write_text("0 3.0\n")
    recipe = small(f"check.expected={expected}", "check.tolerance=0.03", "check.rel_tolerance=0.25",
                   "check.max_outliers=2")
    assert run.finish(recipe, tmp_path / "run", True) == 1
    assert checked == [(tmp_path / "run" / "train_log.txt", expected,
                        {"tolerance": 0.03, "rel_tolerance": 0.25, "max_outliers": 2})]


def test_finish_of_a_named_recipe_finds_its_expected_log_in_recipes(checked, tmp_path):
    assert run.finish(small(), tmp_path, True) == 1
    [(log, expected, kwargs)] = checked
    assert expected == Path(__file__).resolve().parent.parent / "recipes" / "expected" / "tiny.log"
    assert kwargs == {"tolerance": 0.005, "rel_tolerance": 0.0, "max_outliers": 0}  # recipes/tiny.toml


def test_finish_without_checking(checked, tmp_path, capsys):
    assert run.finish(small(), tmp_path, False) == 0  # --no-check
    assert run.finish(small("check.expected="), tmp_path, True) == 0  # nothing to check against
    assert checked == [] and capsys.readouterr().out == ""


def test_finish_before_an_expected_log_exists(checked, tmp_path, capsys):
    missing = tmp_path / "none.log"
    assert run.finish(small(f"check.expected={missing}"), tmp_path, True) == 0
    assert checked == []
    assert capsys.readouterr().out == f"no expected log at {missing} yet: nothing to check against (make one with " \
                                      "`make golden`)\n"
