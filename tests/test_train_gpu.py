"""GPU training paths (skip without CUDA): the CUDA-graph step of strategy `single` trains exactly like the eager step,
end to end and across a SIGKILL + resume."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# the tiny recipe (generated corpus) moved to the GPU path: bf16, strategy single, grad_cp on
GPU_TINY = ["train.accelerator=gpu", "train.precision=bf16", "train.strategy=single", "train.grad_cp=1",
            "train.epoch_steps=10", "train.epoch_count=3", "train.epoch_save=1", "train.num_workers=0"]


def train(out, *sets, fault=None):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("RWKV7_TEST_FAULT", None)
    if fault:
        env["RWKV7_TEST_FAULT"] = fault
    cmd = [sys.executable, str(ROOT / "entrypoint.py"), "train", "--recipe", "tiny", "--out", str(out), "--no-check",
           "--no-progress", "--set", *GPU_TINY, *sets]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def step_losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_graphed_step_equals_eager_step():
    from rwkv7.init import init_model
    from rwkv7.model import ModelShape, RWKV7
    from rwkv7.train.bf16_optim import MasterWeightAdamW
    from rwkv7.train.graphed import GraphedStep
    from rwkv7.train.loss import training_loss
    from rwkv7.train.module import param_groups

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 512, (4, 65), generator=g).cuda() for _ in range(4)]
    runs = []
    for graphed in (False, True):
        model = RWKV7(ModelShape(2, 128, 512, 64), grad_cp=True)
        init_model(model, seed=0)
        model = model.cuda().to(torch.bfloat16).train()
        opt = MasterWeightAdamW(param_groups(model, 0.001), clip=1.0, lr=1e-3, betas=(0.9, 0.99), eps=1e-18)
        step, losses = None, []
        for b in batches:
            x, y = b[:, :-1].contiguous(), b[:, 1:].contiguous()
            if graphed:
                if step is None:
                    opt.keep_model_grads = True
                    step = GraphedStep(model, training_loss, x, y)
                losses.append(float(step(x, y)))
            else:
                loss = training_loss(model, x, y)
                loss.backward()
                losses.append(float(loss.detach()))
            opt.step()
            if not graphed:
                opt.zero_grad()
        runs.append((losses, [p.detach().float().clone() for p in model.parameters()]))
    (l0, w0), (l1, w1) = runs
    assert l0 == pytest.approx(l1, abs=1e-3), (l0, l1)
    for a, b in zip(w0, w1):
        assert torch.allclose(a, b, rtol=2e-2, atol=1e-3)
    assert len(set(l1)) == len(l1)  # every replay saw its own batch (not the captured one again)


def test_cuda_graph_run_matches_eager_run_and_resumes(tmp_path):
    eager, graphed, resumed = tmp_path / "eager", tmp_path / "graphed", tmp_path / "resumed"
    for out, extra in ((eager, "train.cuda_graph=0"), (graphed, "train.cuda_graph=1")):
        p = train(out, extra)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    a, b = step_losses(eager), step_losses(graphed)
    assert len(a) == len(b) == 30
    assert max(abs(x - y) for x, y in zip(a, b)) <= 0.02, (a, b)
    assert sum(b[-5:]) < sum(b[:5])
    # SIGKILL mid mini-epoch 1, then the same command: continues the graphed run's curve
    p = train(resumed, "train.cuda_graph=1", fault="kill@15")
    assert p.returncode == -9
    p = train(resumed, "train.cuda_graph=1")
    assert p.returncode == 0 and "resuming" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]
    c = step_losses(resumed)
    assert len(c) == 30
    assert max(abs(x - y) for x, y in zip(b, c)) <= 0.02, (b, c)


def test_ddp_on_one_gpu_is_single_and_resumes(tmp_path):
    """strategy ddp with one rank: the same graphed step as single, through the flat gradient buffer and the sharded
    optimizer (one shard); per step the same losses, and a SIGKILL + resume continues the curve."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    for out, strategy in ((single, "single"), (ddp, "ddp")):
        p = train(out, f"train.strategy={strategy}")
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    a, b = step_losses(single), step_losses(ddp)
    assert len(a) == len(b) == 30
    assert max(abs(x - y) for x, y in zip(a, b)) <= 0.02, (a, b)
    resumed = tmp_path / "resumed"
    assert train(resumed, "train.strategy=ddp", fault="kill@15").returncode == -9
    p = train(resumed, "train.strategy=ddp")
    assert p.returncode == 0 and "resuming" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]
    c = step_losses(resumed)
    assert len(c) == 30 and max(abs(x - y) for x, y in zip(b, c)) <= 0.02, (b, c)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ddp_on_two_gpus_matches_one_at_the_same_global_batch(tmp_path):
    """NCCL: reduce-scatter of the graphed step's bf16 gradients, sharded AdamW, all-gather; a checkpoint of two
    ranks resumes on one (under ddp, whose optimizer state is gathered in single's format)."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert train(one, "train.strategy=ddp").returncode == 0
    p = train(two, "train.strategy=ddp", "train.devices=2", "train.micro_bsz=4", fault="kill@15")
    assert p.returncode == -9, p.stdout[-2000:] + p.stderr[-3000:]
    p = train(two, "train.strategy=ddp", "train.devices=1", "train.micro_bsz=8")
    assert p.returncode == 0 and "resuming" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]
    a, b = step_losses(one), step_losses(two)
    assert len(a) == len(b) == 30 and max(abs(x - y) for x, y in zip(a, b)) <= 0.02, (a, b)
