"""Megatron binidx (`.bin` + `.idx`) reader and writer, the format of the official RWKV-LM data.

`.idx`: magic b"MMIDIDX\\x00\\x00", <Q version 1, <B dtype code, <Q n sequences, <Q n doc_idx entries, then int32
sizes[n], int64 pointers[n] (byte offsets into .bin), int64 doc_idx[...]. `.bin`: token ids back to back.
The trainer ignores document boundaries and reads the .bin as one flat token stream (docs/ALIGNMENT.md).
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from rwkv7.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float32, 7: np.float64, 8: np.uint16}
DTYPE_CODES = {np.dtype(v): k for k, v in DTYPES.items()}


@dataclass
class BinIdx:
    """An opened binidx pair. `tokens` is the memory-mapped flat token stream."""

    prefix: str
    dtype: np.dtype
    sizes: np.ndarray
    pointers: np.ndarray
    doc_idx: np.ndarray
    tokens: np.ndarray

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_docs(self) -> int:
        return int(self.sizes.shape[0])

    def document(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.sizes[i])]


def paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    p = str(prefix)
    for ext in (".bin", ".idx"):
        if p.endswith(ext):
            p = p[: -len(ext)]
    return Path(p + ".bin"), Path(p + ".idx")


def open_binidx(prefix: str | os.PathLike) -> BinIdx:
    """Open and structurally check a binidx pair; any defect is a UserError naming the file."""
    bin_path, idx_path = paths(prefix)
    for f in (idx_path, bin_path):
        if not f.is_file():
            raise UserError(f"data file {f} not found: give the binidx prefix (path without .bin/.idx) "
                            "with --set data.path=PREFIX, or make one with `rwkv7 prepare`")
    raw = idx_path.read_bytes()
    head = len(MAGIC) + 8 + 1 + 8 + 8
    if len(raw) < head or raw[: len(MAGIC)] != MAGIC:
        raise UserError(f"{idx_path} is not a binidx index (bad magic): re-create it with `rwkv7 prepare`")
    version, code, n, n_doc = struct.unpack("<QBQQ", raw[len(MAGIC):head])
    if version != 1:
        raise UserError(f"{idx_path}: unsupported binidx version {version} (only 1 exists)")
    if code not in DTYPES:
        raise UserError(f"{idx_path}: unknown dtype code {code}")
    dtype = np.dtype(DTYPES[code])
    need = head + 4 * n + 8 * n + 8 * n_doc
    if len(raw) != need:
        raise UserError(f"{idx_path} is truncated or padded ({len(raw)} bytes, expected {need} for {n} documents): "
                        "download or prepare it again")
    sizes = np.frombuffer(raw, np.int32, n, head)
    pointers = np.frombuffer(raw, np.int64, n, head + 4 * n)
    doc_idx = np.frombuffer(raw, np.int64, n_doc, head + 12 * n)
    bin_bytes = bin_path.stat().st_size
    if bin_bytes == 0 or bin_bytes % dtype.itemsize:
        raise UserError(f"{bin_path} has {bin_bytes} bytes, not a whole number of {dtype} tokens: "
                        "download or prepare it again")
    if n and (int(pointers[-1]) + int(sizes[-1]) * dtype.itemsize > bin_bytes or (sizes < 0).any()):
        raise UserError(f"{bin_path} is shorter than its index says (truncated download?): "
                        "delete it and download or prepare it again")
    tokens = np.memmap(bin_path, dtype=dtype, mode="r")
    return BinIdx(str(bin_path)[:-4], dtype, sizes, pointers, doc_idx, tokens)


def check_vocab(data: BinIdx, vocab_size: int, sample: int = 1 << 20) -> None:
    """Token ids must be < vocab_size; checks the whole file when small, else evenly spaced windows."""
    n = len(data)
    if n <= sample:
        top = int(data.tokens.max())
    else:
        step = 1 << 14
        starts = np.linspace(0, n - step, sample // step).astype(np.int64)
        top = max(int(data.tokens[s:s + step].max()) for s in starts)
    if top >= vocab_size:
        raise UserError(f"{data.prefix}.bin holds token id {top} >= vocab_size {vocab_size}: the data was made with "
                        "another tokenizer, or set model.vocab_size to match it")


def write_binidx(prefix: str | os.PathLike, docs: Iterable[np.ndarray], dtype=np.uint16) -> tuple[int, int]:
    """Write documents (1-D int arrays) as binidx; atomic: both files appear complete or not at all.

    Returns (documents, tokens).
    """
    dtype = np.dtype(dtype)
    bin_path, idx_path = paths(prefix)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin, tmp_idx = bin_path.with_name(bin_path.name + ".tmp"), idx_path.with_name(idx_path.name + ".tmp")
    sizes: list[int] = []
    try:
        with open(tmp_bin, "wb") as f:
            for d in docs:
                arr = np.asarray(d)
                if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(dtype).max):
                    raise UserError(f"token id out of range for {dtype} while writing {bin_path}")
                f.write(arr.astype(dtype).tobytes())
                sizes.append(int(arr.size))
            f.flush()
            os.fsync(f.fileno())
        n = len(sizes)
        size_arr = np.asarray(sizes, np.int32)
        pointers = np.zeros(n, np.int64)
        if n:
            pointers[1:] = np.cumsum(size_arr[:-1].astype(np.int64)) * dtype.itemsize
        with open(tmp_idx, "wb") as f:
            f.write(MAGIC + struct.pack("<QBQQ", 1, DTYPE_CODES[dtype], n, n + 1))
            f.write(size_arr.tobytes() + pointers.tobytes() + np.arange(n + 1, dtype=np.int64).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    finally:
        for t in (tmp_bin, tmp_idx):
            if t.exists():
                t.unlink()
    return len(sizes), int(sum(sizes))
