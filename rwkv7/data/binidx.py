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
from rwkv7.signals import on_interrupt, unlink_quietly

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
    try:
        raw = idx_path.read_bytes()
        with open(bin_path, "rb"):
            pass
    except OSError as e:
        raise UserError(f"cannot read {e.filename or idx_path} ({e.strerror or e}): make it readable "
                        "(chmod +r)") from None
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
    if n and ((sizes < 0).any() or (pointers < 0).any() or (pointers % dtype.itemsize).any()):
        raise UserError(f"{idx_path} is corrupt (negative sizes or misaligned pointers): "
                        "download or prepare it again")
    if n and int((pointers + sizes.astype(np.int64) * dtype.itemsize).max()) > bin_bytes:
        raise UserError(f"{bin_path} is shorter than its index says (truncated download?): "
                        "delete it and download or prepare it again")
    if n_doc and (int(doc_idx.min()) < 0 or int(doc_idx.max()) > n or (np.diff(doc_idx) < 0).any()):
        raise UserError(f"{idx_path} is corrupt (document index outside 0..{n}): download or prepare it again")
    tokens = np.memmap(bin_path, dtype=dtype, mode="r")
    return BinIdx(str(bin_path)[:-4], dtype, sizes, pointers, doc_idx, tokens)


def check_vocab(data: BinIdx, vocab_size: int, block: int = 1 << 24) -> None:
    """Token ids must be integers in [0, vocab_size). Checks every token, in blocks (uint16 data with vocab 65536,
    the official case, cannot be out of range and costs nothing)."""
    if data.dtype.kind not in "iu":
        raise UserError(f"{data.prefix}.bin holds {data.dtype} values, not token ids: binidx token data must be an "
                        "integer type (uint16 as written by `rwkv7 prepare`); re-create it")
    info = np.iinfo(data.dtype)
    if info.min >= 0 and info.max < vocab_size:
        return
    low, high = 0, 0
    for start in range(0, len(data), block):
        part = data.tokens[start:start + block]
        low, high = min(low, int(part.min())), max(high, int(part.max()))
    if low < 0:
        raise UserError(f"{data.prefix}.bin holds a negative token id ({low}): token ids must lie in "
                        f"[0, {vocab_size}); re-create the data")
    if high >= vocab_size:
        raise UserError(f"{data.prefix}.bin holds token id {high} >= vocab_size {vocab_size}: the data was made with "
                        "another tokenizer, or set model.vocab_size to match it")


class BinIdxWriter:
    """Streaming binidx writer with constant memory: tokens and sizes go to temp files next to the target,
    `commit()` writes the index and renames (the .idx last, so a pair is complete once the .idx is there),
    `abort()` (also on any exception inside `with`) removes every temp file.
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.uint16):
        self.dtype = np.dtype(dtype)
        self.bin_path, self.idx_path = paths(prefix)
        tag = f".{os.getpid()}.tmp"
        self._tmp_bin = self.bin_path.with_name(self.bin_path.name + tag)
        self._tmp_idx = self.idx_path.with_name(self.idx_path.name + tag)
        self._tmp_sizes = self.idx_path.with_name(self.idx_path.name + ".sizes" + tag)
        self.n_docs = 0
        self.n_tokens = 0
        self._files = []
        try:
            self.bin_path.parent.mkdir(parents=True, exist_ok=True)
            self._bin = open(self._tmp_bin, "wb")
            self._files.append(self._bin)
            self._sizes = open(self._tmp_sizes, "wb")
            self._files.append(self._sizes)
        except OSError as e:
            self.abort()
            raise UserError(f"cannot write {self.bin_path}: {e.strerror or e}: choose a writable --out") from None

    def add(self, tokens: np.ndarray, sizes: np.ndarray) -> None:
        """Append documents: `tokens` is their ids back to back, `sizes` the length of each."""
        tokens = np.asarray(tokens)
        sizes = np.asarray(sizes, np.int64)
        if int(sizes.sum()) != tokens.size:
            raise ValueError("sizes do not add up to the number of tokens")
        if sizes.size and int(sizes.max()) > np.iinfo(np.int32).max:
            raise UserError(f"a document of {int(sizes.max())} tokens does not fit binidx (int32 sizes): split it")
        if tokens.dtype != self.dtype:
            if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > np.iinfo(self.dtype).max):
                raise UserError(f"token id out of range for {self.dtype} while writing {self.bin_path}")
            tokens = tokens.astype(self.dtype)
        try:
            self._bin.write(tokens.tobytes())
            self._sizes.write(sizes.astype(np.int32).tobytes())
        except OSError as e:
            raise UserError(f"cannot write {self.bin_path}: {e.strerror or e} (disk full?)") from None
        self.n_docs += int(sizes.size)
        self.n_tokens += int(tokens.size)

    def commit(self) -> tuple[int, int]:
        """Finish: write the index, fsync, rename into place. Returns (documents, tokens)."""
        try:
            for f in (self._bin, self._sizes):
                f.flush()
                os.fsync(f.fileno())
                f.close()
            n, block = self.n_docs, 1 << 20
            with open(self._tmp_idx, "wb") as out, open(self._tmp_sizes, "rb") as sz:
                out.write(MAGIC + struct.pack("<QBQQ", 1, DTYPE_CODES[self.dtype], n, n + 1))
                while chunk := sz.read(4 * block):  # sizes
                    out.write(chunk)
                sz.seek(0)
                offset = 0
                while chunk := sz.read(4 * block):  # pointers: running byte offsets
                    s = np.frombuffer(chunk, np.int32).astype(np.int64) * self.dtype.itemsize
                    ptr = np.cumsum(s) - s + offset
                    offset += int(s.sum())
                    out.write(ptr.tobytes())
                for start in range(0, n + 1, block):  # doc_idx 0..n, one document per sequence
                    out.write(np.arange(start, min(start + block, n + 1), dtype=np.int64).tobytes())
                out.flush()
                os.fsync(out.fileno())
            if self.idx_path.exists():
                self.idx_path.unlink()  # never leave a new .bin next to a stale .idx
            os.replace(self._tmp_bin, self.bin_path)
            os.replace(self._tmp_idx, self.idx_path)
        except OSError as e:
            self.abort()
            raise UserError(f"cannot write {self.idx_path}: {e.strerror or e} (disk full?)") from None
        self.abort()  # removes the sizes side file
        return self.n_docs, self.n_tokens

    def temp_paths(self) -> tuple[Path, ...]:
        return self._tmp_bin, self._tmp_idx, self._tmp_sizes

    def abort(self) -> None:
        for f in self._files:
            try:
                f.close()
            except OSError:
                pass
        for t in (self._tmp_bin, self._tmp_idx, self._tmp_sizes):
            try:
                t.unlink()
            except OSError:  # not there (or its folder never was)
                pass

    def __enter__(self) -> "BinIdxWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def write_binidx(prefix: str | os.PathLike, docs: Iterable[np.ndarray], dtype=np.uint16) -> tuple[int, int]:
    """Write documents (1-D int arrays) as binidx; atomic: both files appear complete or not at all.

    Returns (documents, tokens).
    """
    with BinIdxWriter(prefix, dtype) as w, on_interrupt(w.abort):  # a signal mid-write leaves no temp files
        for d in docs:
            arr = np.asarray(d).reshape(-1)
            w.add(arr, np.asarray([arr.size]))
        return w.commit()
