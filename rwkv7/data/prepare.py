"""Private text -> binidx with the RWKV World tokenizer, as the official make_data.py does it, at scale.

Inputs: `.jsonl` (one JSON object per line, text under `text_key`; blank lines are skipped) and `.txt` (the whole
file is one document, or with `split_blank_lines` every run of lines between blank lines is one). Every document
becomes its token ids followed by the end-of-document token 0, stored as uint16.

Differences from make_data.py (docs/ALIGNMENT.md, "Data"): no shuffling or N-epoch repetition (the trainer's
magic-prime sampler already visits the data in a pseudo-random order), and no in-memory list of all lines.

Streaming: the main process reads the inputs in ~4 MB chunks and hands them to a process pool with at most
2 * workers chunks in flight; results are written in input order, so memory stays constant whatever the input
size (except one whole `.txt` file in one-document-per-file mode, which is one document). Output goes to temp
files that are renamed at the end; on any error or Ctrl-C they are removed.
"""
from __future__ import annotations

import array
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from rwkv7.data.binidx import BinIdxWriter, paths
from rwkv7.data.magic import magic_prime
from rwkv7.data.tokenizer import EOD, get_tokenizer
from rwkv7.errors import UserError
from rwkv7.signals import add_cleanup, remove_cleanup, unlink_quietly

CHUNK_BYTES = 4 << 20
SUFFIXES = (".jsonl", ".txt")


@dataclass
class PrepareResult:
    prefix: str
    docs: int = 0
    tokens: int = 0
    bad: int = 0  # malformed lines / documents skipped with skip_bad
    first_bad: str | None = None  # "FILE:LINE: reason" of the first skipped one
    empty: int = 0  # empty .txt documents (not written)
    val_prefix: str | None = None
    val_docs: int = 0
    val_tokens: int = 0
    bytes_in: int = 0
    seconds: float = 0.0
    workers: int = 1
    backend: str = ""
    magic_prime: int | None = None
    magic_note: str | None = None
    ctx_len: int = 512
    notes: list = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        return self.bytes_in / 1e6 / max(self.seconds, 1e-9)


# ---------------------------------------------------------------------------------------------- reading (main)

# A task: (kind, file_no, payload). kind "jsonl": payload = (first_line_no, raw bytes of whole lines).
# kind "docs": payload = [(line_no, raw bytes of one document), ...].

def _jsonl_tasks(file_no: int, path: Path) -> Iterator[tuple]:
    line_no = 1
    rest = b""
    with open(path, "rb") as f:
        while True:
            block = f.read(CHUNK_BYTES)
            if not block:
                break
            buf = rest + block
            cut = buf.rfind(b"\n")
            if cut < 0:  # one very long line: keep reading
                rest = buf
                continue
            body, rest = buf[:cut + 1], buf[cut + 1:]
            yield ("jsonl", file_no, (line_no, body))
            line_no += body.count(b"\n")
    if rest:
        yield ("jsonl", file_no, (line_no, rest))


def _txt_tasks(file_no: int, path: Path, split_blank_lines: bool) -> Iterator[tuple]:
    if not split_blank_lines:
        yield ("docs", file_no, [(1, path.read_bytes())])
        return
    batch, size = [], 0
    cur, start = [], 0
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                if not cur:
                    start = line_no
                cur.append(line)
                continue
            if cur:
                doc = b"".join(cur)
                batch.append((start, doc[:-2] if doc.endswith(b"\r\n") else doc.rstrip(b"\n")))
                size += len(doc)
                cur = []
                if size >= CHUNK_BYTES:
                    yield ("docs", file_no, batch)
                    batch, size = [], 0
    if cur:
        doc = b"".join(cur)
        batch.append((start, doc[:-2] if doc.endswith(b"\r\n") else doc.rstrip(b"\n")))
    if batch:
        yield ("docs", file_no, batch)


def _task_bytes(task) -> int:
    kind, _, payload = task
    return len(payload[1]) if kind == "jsonl" else sum(len(d) for _, d in payload)


# ----------------------------------------------------------------------------------------- tokenizing (workers)

_CFG: dict = {}


def _init_worker(text_key: str, skip_bad: bool, backend: str | None, in_pool: bool = True) -> None:
    if in_pool:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    _CFG.update(text_key=text_key, skip_bad=skip_bad, backend=backend)


def _encode_task(task):
    """-> (uint16 tokens, int64 sizes, errors [(line, reason)], empty count, input bytes)."""
    kind, _, payload = task
    enc = get_tokenizer(_CFG.get("backend")).encode
    key, skip_bad = _CFG["text_key"], _CFG["skip_bad"]
    flat = array.array("H")  # uint16, filled from the tokenizer's lists in C (fromlist)
    sizes: list[int] = []
    errors: list[tuple[int, str]] = []
    empty = 0

    def add(text: str, line_no: int) -> bool:
        try:
            ids = enc(text)
        except UnicodeEncodeError:
            errors.append((line_no, "text is not valid Unicode (lone surrogate)"))
            return False
        flat.fromlist(ids)
        flat.append(EOD)
        sizes.append(len(ids) + 1)
        return True

    if kind == "jsonl":
        first, raw = payload
        for i, line in enumerate(raw.split(b"\n")):
            if not line.strip():
                continue
            line_no = first + i
            try:
                obj = json.loads(line)
            except UnicodeDecodeError:
                errors.append((line_no, "not valid UTF-8"))
            except ValueError as e:
                errors.append((line_no, f"invalid JSON ({getattr(e, 'msg', e)} at column {getattr(e, 'colno', '?')})"))
            else:
                if not isinstance(obj, dict):
                    errors.append((line_no, f"expected a JSON object with a \"{key}\" key, got {type(obj).__name__}"))
                elif key not in obj:
                    keys = ", ".join(list(obj)[:5]) or "none"
                    errors.append((line_no, f"no \"{key}\" key (keys: {keys}); choose the key with --text-key"))
                elif not isinstance(obj[key], str):
                    errors.append((line_no, f"\"{key}\" is a {type(obj[key]).__name__}, not a string"))
                else:
                    add(obj[key], line_no)
            if errors and not skip_bad:
                break
    else:
        for line_no, raw in payload:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                line = line_no + raw[:e.start].count(b"\n")
                errors.append((line, "not valid UTF-8 (give UTF-8 text)"))
            else:
                if not text.strip():
                    empty += 1
                else:
                    add(text, line_no)
            if errors and not skip_bad:
                break
    return np.frombuffer(flat, dtype=np.uint16), np.array(sizes, dtype=np.int64), errors, empty, _task_bytes(task)


# ------------------------------------------------------------------------------------------------- driver

def _check_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    if not inputs:
        raise UserError("no input: give one or more .jsonl / .txt files with --input")
    out = []
    for p in map(Path, inputs):
        if not p.exists():
            raise UserError(f"input {p} not found")
        if not p.is_file():
            raise UserError(f"input {p} is not a file (give .jsonl or .txt files)")
        if p.suffix.lower() not in SUFFIXES:
            raise UserError(f"input {p}: unknown type {p.suffix or '(no suffix)'}; give .jsonl (one JSON object per "
                            "line) or .txt files")
        if not os.access(p, os.R_OK):
            raise UserError(f"input {p} is not readable")
        out.append(p)
    return out


def _val_mask(first: int, n: int, fraction: float) -> np.ndarray:
    """Evenly spaced held-out documents: global doc g is held out when floor((g+1)F) > floor(gF)."""
    if fraction <= 0 or n == 0:
        return np.zeros(n, bool)
    g = np.arange(first, first + n, dtype=np.float64)
    return np.floor((g + 1) * fraction) > np.floor(g * fraction)


def _pool_context():
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods and sys.platform.startswith("linux") else None)


def prepare(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *, text_key: str = "text",
            split_blank_lines: bool = False, val_fraction: float = 0.0, workers: int | None = None,
            skip_bad: bool = False, ctx_len: int = 512, progress: bool | None = None,
            backend: str | None = None) -> PrepareResult:
    """Tokenize `inputs` into the binidx `out` (and `out`-val when val_fraction > 0). See the module docstring."""
    files = _check_inputs(inputs)
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if ctx_len <= 0:
        raise UserError(f"--ctx-len must be positive, got {ctx_len}")
    workers = int(workers or os.cpu_count() or 1)
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    prefix = str(paths(out)[0])[:-4]
    if Path(prefix).is_dir() or not Path(prefix).name:
        raise UserError(f"--out {out} is a directory: give a file prefix such as {Path(out) / 'mydata'}")
    from rwkv7.doctor import folder_problem

    _, problem = folder_problem(Path(prefix).parent, "the folder of --out")
    if problem:
        raise UserError(f"{problem}: give --out a prefix in a writable folder")
    val_prefix = prefix + "-val" if val_fraction > 0 else None
    names = [str(p) for p in files]
    total_bytes = sum(p.stat().st_size for p in files)
    tok = get_tokenizer(backend)  # load once here: forked workers inherit it; also fails early if missing
    res = PrepareResult(prefix=prefix, val_prefix=val_prefix, workers=workers, backend=tok.backend, ctx_len=ctx_len)

    def tasks():
        for i, p in enumerate(files):
            if p.suffix.lower() == ".jsonl":
                yield from _jsonl_tasks(i, p)
            else:
                yield from _txt_tasks(i, p, split_blank_lines)

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    writers = [BinIdxWriter(prefix)]
    pool = None

    def on_signal():  # runs in the signal handler before the process exits: stop the workers, remove temp files
        for proc in getattr(pool, "_pool", None) or []:
            if proc.pid:
                os.kill(proc.pid, signal.SIGKILL)
        for w in writers:
            unlink_quietly(*w.temp_paths())

    add_cleanup(on_signal)
    try:
        if val_prefix:
            writers.append(BinIdxWriter(val_prefix))
        train_w = writers[0]
        val_w = writers[1] if val_prefix else None
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="tokenizing",
                   disable=(None if progress is None else not progress), dynamic_ncols=True)
        with bar:
            def handle(task, result):
                tokens, sizes, errors, empty, nbytes = result
                file_no = task[1]
                if errors:
                    line, why = errors[0]
                    if not skip_bad:
                        raise UserError(f"{names[file_no]}, line {line}: {why} (fix it, or pass --skip-bad to skip "
                                        "malformed lines)")
                    if res.first_bad is None:
                        res.first_bad = f"{names[file_no]}:{line}: {why}"
                    res.bad += len(errors)
                res.empty += empty
                if sizes.size:
                    held = _val_mask(res.docs + res.val_docs, sizes.size, val_fraction)
                    if held.any():
                        per_token = np.repeat(held, sizes)
                        val_w.add(tokens[per_token], sizes[held])
                        res.val_docs += int(held.sum())
                        res.val_tokens += int(sizes[held].sum())
                        tokens, sizes = tokens[~per_token], sizes[~held]
                    train_w.add(tokens, sizes)
                    res.docs += int(sizes.size)
                    res.tokens += int(tokens.size)
                res.bytes_in += nbytes
                bar.update(nbytes)

            if workers == 1:
                _init_worker(text_key, skip_bad, backend, in_pool=False)
                for task in tasks():
                    handle(task, _encode_task(task))
            else:
                pool = _pool_context().Pool(workers, initializer=_init_worker,
                                            initargs=(text_key, skip_bad, backend))
                pending: deque = deque()
                for task in tasks():
                    pending.append((task, pool.apply_async(_encode_task, (task,))))
                    while len(pending) >= 2 * workers:
                        t, r = pending.popleft()
                        handle(t, r.get())
                while pending:
                    t, r = pending.popleft()
                    handle(t, r.get())
                pool.close()
                pool.join()
                pool = None

        if res.docs + res.val_docs == 0:
            what = f"{res.bad} malformed lines skipped" if res.bad else "no documents"
            raise UserError(f"nothing to write: {what} in {', '.join(names)}")
        if res.docs == 0:
            raise UserError("every document went to the validation split: lower --val-fraction")
        if val_w is not None and res.val_docs == 0:
            raise UserError(f"--val-fraction {val_fraction} held out no document of {res.docs}: raise it or "
                            "add documents")
        for w in writers:
            w.commit()
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool.join()
        for w in writers:
            w.abort()
        raise
    finally:
        remove_cleanup(on_signal)
    res.seconds = time.perf_counter() - t0
    try:
        res.magic_prime = magic_prime(res.tokens, ctx_len)
    except UserError as e:
        res.magic_note = str(e)
    return res


def summary(res: PrepareResult) -> str:
    lines = [f"wrote {res.prefix}.bin/.idx: {res.docs:,} documents, {res.tokens:,} tokens (uint16, vocab 65536)"]
    if res.val_prefix:
        lines.append(f"wrote {res.val_prefix}.bin/.idx: {res.val_docs:,} documents, {res.val_tokens:,} tokens "
                     "(held out)")
    if res.bad:
        lines.append(f"skipped {res.bad:,} malformed lines/documents (first: {res.first_bad})")
    if res.empty:
        lines.append(f"skipped {res.empty:,} empty documents")
    lines.append(f"{res.bytes_in / 1e6:,.1f} MB in {res.seconds:.1f} s = {res.mb_per_s:.1f} MB/s "
                 f"({res.workers} worker{'s' if res.workers > 1 else ''}, {res.backend} tokenizer)")
    if res.magic_prime:
        lines.append(f"magic_prime for ctx_len {res.ctx_len}: {res.magic_prime} "
                     f"(train with --set data.path={res.prefix})")
    else:
        lines.append(f"no magic_prime: {res.magic_note}")
    return "\n".join(lines)
