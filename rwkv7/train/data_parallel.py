"""Strategy `ddp`: the one-GPU step on every rank, gradients reduced in one flat bucket, a sharded optimizer.

Every rank runs the step of strategy `single` on its own micro-batch of the official global sample order: forward,
loss and backward replayed as one CUDA graph (rwkv7/train/graphed.py) on a GPU, eager on a CPU. What is new here:
- The parameters the loss reaches are views of one flat weight buffer and their .grad views of one flat gradient
  buffer (the graph accumulates into it, so no copy is needed between the graph and the collectives).
- After the backward the gradient buffer is reduce-scattered: rank r receives the sum of its contiguous shard
  [r*S, (r+1)*S) of the flat vector. Its fp32 masters and AdamW moments cover that shard only (ZeRO-1/2 style:
  12/N bytes per parameter instead of 12), updated with MasterWeightAdamW's own arithmetic on the shard's pieces
  of each parameter (per-parameter lr scale and weight decay groups kept), clipped by the global gradient norm
  (sum of squares over all ranks).
- The updated shard is written back into the weight buffer and all-gathered, so every rank holds the whole model.
The collectives run outside the CUDA graph, after it, on the current stream (no host sync).

Checkpoints: state_dict() gathers the whole optimizer state to rank 0 in MasterWeightAdamW's format (per-parameter
fp32 masters and moments, the official parameter order), so a checkpoint resumes on any number of ranks, or under
`single`; load_state_dict() takes that format and keeps this rank's shard.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from rwkv7.fsutil import atomic_write
from rwkv7.train.bf16_optim import MasterWeightAdamW
from rwkv7.train.graphed import GraphedStep
from rwkv7.train.loss import training_loss

# torch 2.13 renamed the flat-tensor collectives (the old names warn); same arguments
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

ALIGN = 64          # shard length is a multiple of this many elements (128-byte aligned bf16 chunks for NCCL)
GATHER_WINDOW = 1 << 24  # elements of each rank's shard gathered per collective when saving (bounds GPU memory)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def reached_parameters(model: torch.nn.Module, batch: tuple[int, int]) -> list[torch.nn.Parameter]:
    """The parameters the loss sends a gradient to (layer 0's value-residual LoRA gets none): one probe backward on
    a batch of the training shape. The others keep .grad None and are never updated, as under `single`."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    idx = torch.zeros(batch, dtype=torch.long, device=device)
    for p in params:
        p.grad = None
    training_loss(model, idx, idx).backward()
    reached = [p for p in params if p.grad is not None]
    for p in params:
        p.grad = None
    return reached


class FlatBuffers:
    """One flat weight buffer and one flat gradient buffer for `params` (in this order); the parameters and their
    .grad become views of them. The length is padded to ranks x S, rank r owning [r*S, (r+1)*S)."""

    def __init__(self, params: list[torch.nn.Parameter], world: int, rank: int):
        if len({(p.dtype, p.device) for p in params}) != 1:
            raise ValueError("strategy ddp flattens the parameters into one buffer: they need one dtype and device")
        n = sum(p.numel() for p in params)
        self.shard_len = -(-n // (world * ALIGN)) * ALIGN  # ceil(n / world), rounded up to ALIGN
        p0 = params[0]
        self.weights = torch.zeros(world * self.shard_len, dtype=p0.dtype, device=p0.device)
        self.grads = torch.zeros_like(self.weights)
        self.lo, self.hi = rank * self.shard_len, (rank + 1) * self.shard_len
        self.offset: dict[int, int] = {}
        off = 0
        with torch.no_grad():
            for p in params:
                self.offset[id(p)] = off
                w = self.weights[off:off + p.numel()]
                w.copy_(p.detach().reshape(-1))
                p.data = w.view_as(p)
                p.grad = self.grads[off:off + p.numel()].view_as(p)
                off += p.numel()


class ShardedMasterAdamW(MasterWeightAdamW):
    """MasterWeightAdamW over this rank's shard of the flat parameter vector (see the module docstring).

    groups: the official parameter groups over the model's parameters. The optimizer's own parameters are the
    pieces (1-D views of the flat weight buffer) of each reached parameter that fall in this rank's shard, in the
    same groups; their gradients are views of the reduced shard. step() = reduce-scatter, MasterWeightAdamW.step
    (mean over ranks, global-norm clip, AdamW, copy back), all-gather. state_dict() is a collective.
    """

    sharded = True  # rwkv7.train.run: checkpoints gather the state from every rank

    def __init__(self, groups: list[dict], flat: FlatBuffers, clip: float = 1.0, **kwargs):
        self.world, self.rank = _world()
        self.flat = flat
        self.full_params = [p for g in groups for p in g["params"]]  # checkpoint order: the official groups'
        self.group_sizes = [len(g["params"]) for g in groups]
        lo, hi = flat.lo, flat.hi
        # the reduced gradients of this shard; with one rank the gradient buffer itself
        self.shard_grads = flat.grads[lo:hi] if self.world == 1 else torch.empty_like(flat.grads[lo:hi])
        self.pieces: list[tuple[int, int, int]] = []  # (index in full_params, start, end within that parameter)
        piece_groups, index = [], 0
        for g in groups:
            views = []
            for p in g["params"]:
                off = flat.offset.get(id(p))
                if off is not None and max(off, lo) < min(off + p.numel(), hi):
                    a, b = max(off, lo), min(off + p.numel(), hi)
                    view = flat.weights[a:b]
                    view.grad = self.shard_grads[a - lo:b - lo]
                    views.append(view)
                    self.pieces.append((index, a - off, b - off))
                index += 1
            piece_groups.append({**g, "params": views})
        if not self.pieces:
            raise ValueError(f"rank {self.rank} holds no parameters: the model is too small for {self.world} ranks")
        super().__init__(piece_groups, clip=clip, **kwargs)
        self.keep_model_grads = True  # the gradient views are fixed; zero_grad() zeroes the buffer instead
        self.grad_factor = 1.0 / self.world

    def zero_grad(self, set_to_none: bool = True):
        """Zero the flat gradient buffer (never None: the CUDA graph and the collectives use its fixed address)."""
        self.flat.grads.zero_()

    def _grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        sq = torch.nn.utils.get_total_norm(grads, foreach=True).float().square()
        if self.world > 1:
            dist.all_reduce(sq)
        return sq.sqrt()

    @torch.no_grad()
    def step(self, closure=None):
        if self.world > 1:
            _reduce_scatter(self.shard_grads, self.flat.grads)  # sums; grad_factor makes it the mean
        loss = super().step(closure)
        if self.world > 1:
            _all_gather(self.flat.weights, self.flat.weights[self.flat.lo:self.flat.hi])
        return loss

    # -- checkpoints: the whole state, in MasterWeightAdamW's format --------------------------------------------
    def _shard_vector(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """This rank's pieces of one quantity (masters, exp_avg, ...) laid out as its shard of the flat vector."""
        vec = torch.zeros(self.flat.shard_len, dtype=torch.float32, device=self.flat.weights.device)
        off = self.flat.offset
        for (i, a, b), t in zip(self.pieces, tensors):
            start = off[id(self.full_params[i])] + a - self.flat.lo
            vec[start:start + b - a] = t.reshape(-1)
        return vec

    def _gather(self, shard: torch.Tensor) -> torch.Tensor | None:
        """The whole flat vector on rank 0 (on the CPU), None elsewhere; gathered in windows to bound memory."""
        if self.world == 1:
            return shard.cpu()
        S = self.flat.shard_len
        full = torch.empty(self.world * S, dtype=shard.dtype) if self.rank == 0 else None
        for k0 in range(0, S, GATHER_WINDOW):
            k1 = min(S, k0 + GATHER_WINDOW)
            buf = torch.empty(self.world * (k1 - k0), dtype=shard.dtype, device=shard.device)
            _all_gather(buf, shard[k0:k1].contiguous())
            if full is not None:
                rows = buf.view(self.world, k1 - k0).cpu()
                for r in range(self.world):
                    full[r * S + k0:r * S + k1] = rows[r]
        return full

    def _unflatten(self, full: torch.Tensor, i: int) -> torch.Tensor:
        p = self.full_params[i]
        start = self.flat.offset[id(p)]
        return full[start:start + p.numel()].view(p.shape)

    def state_dict(self):
        """A collective (every rank must call it): MasterWeightAdamW.state_dict() of the whole model on rank 0,
        None on the other ranks."""
        masters = [m for _, m in self._pairs()]
        keys = sorted({k for m in masters for k, v in self.state.get(m, {}).items()
                       if torch.is_tensor(v) and v.numel() == m.numel() and k != "step"})
        flat_masters = self._gather(self._shard_vector(masters))
        flat_state = {k: self._gather(self._shard_vector([self.state[m][k] for m in masters])) for k in keys}
        if self.rank != 0:
            return None
        step = self.state[masters[0]].get("step") if masters[0] in self.state else None
        state, full_masters = {}, []
        for i, p in enumerate(self.full_params):
            if id(p) in self.flat.offset:
                full_masters.append(self._unflatten(flat_masters, i))
                if keys:
                    state[i] = {"step": step.detach().cpu().clone(),
                                **{k: self._unflatten(flat_state[k], i) for k in keys}}
            else:  # never reached by the loss: never updated, its master is the weight itself
                full_masters.append(p.detach().float().cpu().clone())
        groups, index = [], 0  # the official groups, their parameters numbered in order as torch does
        for g, size in zip(self.param_groups, self.group_sizes):
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": list(range(index, index + size))})
            index += size
        return {"state": state, "param_groups": groups, "masters": full_masters}

    def load_state_dict(self, sd):
        """Take a whole-model MasterWeightAdamW (or plain AdamW, without masters) state dict; keep this shard."""
        masters = sd.get("masters")
        with torch.no_grad():
            if masters is not None:  # every rank holds the whole model: set it from the fp32 masters
                for p, saved in zip(self.full_params, masters):
                    p.copy_(saved)
            piece_state = {}
            for j, ((i, a, b), (_, m)) in enumerate(zip(self.pieces, self._pairs())):
                src = masters[i] if masters is not None else self.full_params[i]
                m.copy_(src.reshape(-1)[a:b])
                saved = sd["state"].get(i)
                if saved:
                    piece_state[j] = {k: (v.reshape(-1)[a:b].clone() if torch.is_tensor(v) and k != "step"
                                          and v.numel() == self.full_params[i].numel() else v.clone())
                                      for k, v in saved.items()}
        groups, j = [], 0
        for saved_g, own in zip(sd["param_groups"], self.param_groups):
            groups.append({**{k: v for k, v in saved_g.items() if k != "params"},
                           "params": list(range(j, j + len(own["params"])))})
            j += len(own["params"])
        torch.optim.AdamW.load_state_dict(self, {"state": piece_state, "param_groups": groups})


def sharded_optimizer(model: torch.nn.Module, groups: list[dict], batch: tuple[int, int], clip: float,
                      **kwargs) -> ShardedMasterAdamW:
    """Flatten the reached parameters (in the official groups' order) and build this rank's optimizer shard.
    Called from configure_optimizers, once the model is on its device (later moves would break the views)."""
    world, rank = _world()
    reached = {id(p) for p in reached_parameters(model, batch)}
    flat = FlatBuffers([p for g in groups for p in g["params"] if id(p) in reached], world, rank)
    return ShardedMasterAdamW(groups, flat, clip=clip, **kwargs)


class FlatGradGraphedStep(GraphedStep):
    """strategy single's graphed step, its gradients accumulated into the flat buffer (zeroed, never set to None)
    so the collectives read them where the graph writes them."""

    def __init__(self, grads: torch.Tensor, *args):
        self.flat_grads = grads
        super().__init__(*args)

    def _zero(self) -> None:
        self.flat_grads.zero_()


def _any_rank(flag: bool, world: int, device) -> bool:
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def training_step(module, x: torch.Tensor, y: torch.Tensor):
    """One step of strategy ddp for RWKV7Module (manual optimization): forward + loss + backward into the flat
    gradient buffer (the CUDA graph, or eager), the non-finite check where the module asks for it (all ranks agree),
    then reduce-scatter, sharded AdamW and all-gather in the optimizer. Returns the local loss, or None if skipped."""
    opt = module.optimizers()
    sharded: ShardedMasterAdamW = opt.optimizer
    sharded.zero_grad()
    if module.use_graph:
        if module.graphed is None:
            module.graphed = FlatGradGraphedStep(sharded.flat.grads, module.model, training_loss, x, y)
        loss = module.graphed(x, y)
    else:
        loss = training_loss(module.model, x, y)
        loss.backward()
        loss = loss.detach()
    loss = module.faults.loss(module.run_step, loss)
    if module.check_now:  # CPU, or bad steps to be skipped: look before the update, every rank decides together
        value = float(loss)
        norm = float(torch.nn.utils.get_total_norm([sharded.flat.grads]))
        if _any_rank(not (math.isfinite(value) and math.isfinite(norm)), sharded.world, loss.device):
            what = (f"loss is {value}" if not math.isfinite(value) else f"gradient norm is {norm}"
                    if not math.isfinite(norm) else "another rank's loss or gradient is not finite")
            return module._bad_step(what)
    opt.step()
    return loss


def lightning_strategy(timeout):
    """Lightning's DDP launch (one process per device, torchrun/SLURM environments) and process group, without
    DistributedDataParallel: the module reduces its own gradients (training_step above)."""
    from pytorch_lightning.strategies import DDPStrategy, Strategy

    class DataParallelStrategy(DDPStrategy):
        def configure_ddp(self) -> None:  # keep the LightningModule unwrapped
            pass

        def training_step(self, *args, **kwargs):
            return Strategy.training_step(self, *args, **kwargs)

        def post_training_step(self) -> None:
            pass

    return DataParallelStrategy(timeout=timeout)


def save_state(tmp, model: torch.nn.Module, optimizer: ShardedMasterAdamW, write: bool) -> None:
    """state.pt of a full checkpoint, as rwkv7.checkpoint.save_plain_state writes it: every rank sends its optimizer
    shard (a collective), rank 0 (write) saves the whole."""
    state = optimizer.state_dict()
    if write:
        sd = {"model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, "optimizer": state}
        atomic_write(tmp / "state.pt", lambda f: torch.save(sd, f))
