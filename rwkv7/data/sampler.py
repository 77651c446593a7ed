"""The official "magic prime" data order (RWKV-LM train_temp src/dataset.py), keyed on a global sample counter.

Sample number `pos` (0, 1, 2, ... over the whole run, all ranks interleaved) reads the ctx_len+1 tokens starting at
token ((factor * (pos+1)^3) mod p) * ctx_len, factor = int(p * (sqrt(5)-1)/2). With p prime and p % 3 == 2, cubing is
a bijection mod p, so positions 0..p-1 visit every ctx-aligned chunk exactly once. The official counter is
ii = 1 + epoch*40320 + idx*world + rank; with step-major batches that is 1 + step*real_bsz + j*world + rank, which is
what `global_position` computes, so short mini-epochs (train.epoch_steps) keep the official order.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset


def golden_factor(magic_prime: int) -> int:
    return int(magic_prime * (math.sqrt(5) - 1) / 2)


def chunk_index(pos: int, magic_prime: int) -> int:
    """Which ctx-aligned chunk the pos-th sample (0-based, global) reads; exact Python integers."""
    ii = pos + 1
    return (golden_factor(magic_prime) * ii ** 3) % magic_prime


def global_position(step: int, j: int, real_bsz: int, world: int, rank: int) -> int:
    """Global sample counter of row j of `step`'s micro-batch on `rank`."""
    return step * real_bsz + j * world + rank


class MagicPrimeWindows(Dataset):
    """Map-style dataset: item i is row i % micro_bsz of step start_step + i // micro_bsz on this rank.

    Returns (x, y) int64 tensors of ctx_len tokens, y shifted by one. `rank`/`world` are set by the trainer once the
    process group exists (before the first batch is drawn).
    """

    def __init__(self, tokens: np.ndarray, ctx_len: int, magic_prime: int, micro_bsz: int, real_bsz: int,
                 start_step: int, n_steps: int):
        self.tokens, self.ctx_len, self.magic_prime = tokens, ctx_len, magic_prime
        self.micro_bsz, self.real_bsz = micro_bsz, real_bsz
        self.start_step, self.n_steps = start_step, n_steps
        self.rank, self.world = 0, 1

    def __len__(self) -> int:
        return self.n_steps * self.micro_bsz

    def __getitem__(self, i: int):
        step, j = self.start_step + i // self.micro_bsz, i % self.micro_bsz
        pos = global_position(step, j, self.real_bsz, self.world, self.rank)
        start = chunk_index(pos, self.magic_prime) * self.ctx_len
        window = torch.from_numpy(np.asarray(self.tokens[start:start + self.ctx_len + 1], dtype=np.int64))
        return window[:-1], window[1:]
