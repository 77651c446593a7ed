"""Resolve a recipe's [data] section to token data ready for the sampler: open, validate, size the schedule.

Everything here runs before a model is built, so bad data fails fast with a UserError.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rwkv7.data.binidx import BinIdx, check_vocab, open_binidx, write_binidx
from rwkv7.data.magic import is_prime, magic_prime as largest_magic_prime
from rwkv7.errors import UserError
from rwkv7.recipe import Recipe


@dataclass
class TrainingData:
    data: BinIdx
    magic_prime: int
    exit_tokens: int          # the schedule's my_exit_tokens
    val: BinIdx | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.data)


def synthetic_prefix(recipe: Recipe) -> Path:
    d = recipe.data
    name = f"synthetic-v{recipe.model.vocab_size}-n{d.synthetic_tokens}-s{d.synthetic_seed}"
    return Path(d.path or "data") / name


VAL_SEED_OFFSET = 1_000_003  # the held-out split: same "language", other documents


def ensure_synthetic(recipe: Recipe) -> Path:
    """Generate the recipe's synthetic corpus and its held-out split (`<prefix>-val`, 5% of the size) once,
    atomically; returns the training prefix."""
    from rwkv7.data.synthetic import generate_documents

    prefix = synthetic_prefix(recipe)
    d = recipe.data
    splits = ((prefix, d.synthetic_tokens, d.synthetic_seed),
              (Path(f"{prefix}-val"), max(d.synthetic_tokens // 20, 4096), d.synthetic_seed + VAL_SEED_OFFSET))
    for path, n, seed in splits:
        if not (path.with_suffix(".bin").is_file() and path.with_suffix(".idx").is_file()):
            write_binidx(path, generate_documents(n, recipe.model.vocab_size, seed, lexicon_seed=d.synthetic_seed),
                         dtype=np.uint16)
    return prefix


@dataclass
class DataLocation:
    """Where a recipe's training data is, or will be once generated or downloaded (nothing is made here)."""

    prefix: Path                    # the binidx prefix (without .bin/.idx)
    present: bool                   # the files are there (a local binidx source is always taken as present)
    folder: Path                    # where the files go when they are not there yet
    download_bytes: int = 0         # hub: the known size of the download (0: unknown or nothing to download)


def data_location(recipe: Recipe) -> DataLocation:
    """The one switch over data.source; used by prepare_data (via locate), the preflight and the doctor."""
    from rwkv7.data.binidx import paths

    d = recipe.data
    if d.source == "synthetic":
        prefix = synthetic_prefix(recipe)
        return DataLocation(prefix, all(p.is_file() for p in paths(prefix)), prefix.parent)
    if d.source == "hub":
        from rwkv7.data.fetch import KNOWN_SIZES, hub_prefix

        data_dir = Path(d.data_dir).expanduser()
        size = sum(KNOWN_SIZES.get((d.hub_repo, f), 0) for f in d.hub_files)
        return DataLocation(data_dir / hub_prefix(d.hub_files), all((data_dir / f).is_file() for f in d.hub_files),
                            data_dir, size)
    if not d.path:
        raise UserError(f"recipe {recipe.name!r} reads local binidx data: add --set data.path=PREFIX (the files "
                        "without .bin/.idx); make them from text with `rwkv7 prepare`")
    return DataLocation(Path(d.path), True, Path(d.path).parent)


def locate(recipe: Recipe) -> Path:
    """The binidx prefix for the recipe, downloading or generating it when needed."""
    d = recipe.data
    if d.source == "synthetic":
        return ensure_synthetic(recipe)
    if d.source == "hub":
        from rwkv7.data.fetch import fetch_dataset

        return Path(fetch_dataset(d.hub_repo, d.hub_files, d.data_dir, revision=d.hub_revision or None,
                                  sha256=d.sha256 or None))
    return data_location(recipe).prefix


def check_magic_prime(p: int, n_tokens: int, ctx_len: int, computed: bool = False) -> None:
    """Official asserts: p prime, p % 3 == 2, 0.9 < p / (n_tokens // ctx_len) <= 1 (and the last window fits)."""
    chunks = n_tokens // ctx_len
    if computed and not (0.9 < p / chunks <= 1):
        raise UserError(f"{n_tokens} tokens are too few for ctx_len {ctx_len}: no magic prime within the official "
                        "0.9 ratio; use more data or a smaller train.ctx_len")
    if not is_prime(p) or p % 3 != 2:
        raise UserError(f"data.magic_prime {p} must be a prime with p % 3 == 2; leave it 0 to compute it")
    if not (0.9 < p / chunks <= 1) or (p - 1) * ctx_len + ctx_len + 1 > n_tokens:
        raise UserError(f"data.magic_prime {p} does not fit {n_tokens} tokens at ctx_len {ctx_len} "
                        f"({chunks} chunks): leave it 0 to compute it")


def open_training_binidx(prefix, recipe: Recipe) -> tuple[BinIdx, int]:
    """Open and validate training data for a recipe: structure, token ids, size; returns (data, magic_prime)."""
    data = open_binidx(prefix)
    check_vocab(data, recipe.model.vocab_size)
    ctx = recipe.train.ctx_len
    if len(data) < 2 * (ctx + 1):
        raise UserError(f"{data.prefix}: {len(data)} tokens is too few for ctx_len {ctx}")
    p = recipe.data.magic_prime or largest_magic_prime(len(data), ctx)
    check_magic_prime(p, len(data), ctx, computed=not recipe.data.magic_prime)
    return data, p


def prepare_data(recipe: Recipe) -> TrainingData:
    prefix = locate(recipe)
    data, p = open_training_binidx(prefix, recipe)
    exit_tokens = recipe.data.my_exit_tokens or len(data)
    val = None
    val_path = recipe.data.val_path or (f"{prefix}-val" if recipe.data.source == "synthetic" else "")
    if val_path:
        val = open_binidx(val_path)
        check_vocab(val, recipe.model.vocab_size)
    return TrainingData(data, p, exit_tokens, val)
