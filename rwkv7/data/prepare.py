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
import queue
import signal
import sys
import threading
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
from rwkv7.fsutil import folder_problem
from rwkv7.signals import add_cleanup, die_with_parent, on_interrupt, remove_cleanup, unlink_quietly

CHUNK_BYTES = 4 << 20
STOP_SECONDS = 30  # for a worker to leave after its last task
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

@dataclass(frozen=True)
class EncodeConfig:
    """What every tokenizing task needs besides its text (given to each worker when it starts)."""

    text_key: str = "text"
    skip_bad: bool = False
    backend: str | None = None


def _jsonl_text(line: bytes, key: str) -> tuple[str | None, str | None]:
    """One JSONL line -> (its text, None) or (None, why it is malformed)."""
    try:
        obj = json.loads(line)
    except UnicodeDecodeError:
        return None, "not valid UTF-8"
    except ValueError as e:
        return None, f"invalid JSON ({getattr(e, 'msg', e)} at column {getattr(e, 'colno', '?')})"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object with a \"{key}\" key, got {type(obj).__name__}"
    if key not in obj:
        keys = ", ".join(list(obj)[:5]) or "none"
        return None, f"no \"{key}\" key (keys: {keys}); choose the key with --text-key"
    if not isinstance(obj[key], str):
        return None, f"\"{key}\" is a {type(obj[key]).__name__}, not a string"
    return obj[key], None


def _task_texts(task, key: str) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text or None, error or None) for every document of a task; blank text means an empty one."""
    kind, _, payload = task
    if kind == "jsonl":
        first, raw = payload
        for i, line in enumerate(raw.split(b"\n")):
            if line.strip():
                yield (first + i, *_jsonl_text(line, key))
        return
    for line_no, raw in payload:
        try:
            yield line_no, raw.decode("utf-8"), None
        except UnicodeDecodeError as e:
            yield line_no + raw[:e.start].count(b"\n"), None, "not valid UTF-8 (give UTF-8 text)"


def encode_task(cfg: EncodeConfig, task):
    """-> (uint16 tokens, int64 sizes, errors [(line, reason)], empty count, input bytes)."""
    enc = get_tokenizer(cfg.backend).encode
    flat = array.array("H")  # uint16, filled from the tokenizer's lists in C (fromlist)
    sizes: list[int] = []
    errors: list[tuple[int, str]] = []
    empty = 0
    for line_no, text, error in _task_texts(task, cfg.text_key):
        if error is not None:
            errors.append((line_no, error))
        elif task[0] != "jsonl" and not text.strip():
            empty += 1
        else:
            try:
                ids = enc(text)
            except UnicodeEncodeError:
                errors.append((line_no, "text is not valid Unicode (lone surrogate)"))
            else:
                flat.fromlist(ids)
                flat.append(EOD)
                sizes.append(len(ids) + 1)
        if errors and not cfg.skip_bad:
            break
    return np.frombuffer(flat, dtype=np.uint16), np.array(sizes, dtype=np.int64), errors, empty, _task_bytes(task)


# -------------------------------------------------------------------------------------- the worker processes

class WorkerPool:
    """`workers` tokenizer processes, each with pipes of its own: task k goes to worker k % workers and the results
    come back in task order.

    Why not multiprocessing.Pool: its workers share one task queue and the queue's lock, and its terminate() stops
    them with SIGTERM and then waits. A worker that did not die of SIGTERM came back for a task and waited for the
    lock, which terminate() holds, so a bad line hung the run (seen once in CI); and a worker killed mid-task (the
    OOM killer) lost its result, for which get() waited forever. Here no lock is shared: stopping is SIGKILL and
    reap, and a worker that dies is an error that names it.

    Each worker has a sending thread here (started after the forks: a fork copies no thread). A task is larger than
    a pipe holds, so sending waits until the worker reads it: in a thread of its own, that wait holds up neither the
    main thread, which reads the results, nor the other workers. (The worker itself stays single-threaded: a reader
    thread there would need the GIL for every 64 KB of a task while the tokenizer holds it: about a quarter of the
    throughput lost, docs/PERFORMANCE.md section 4.)"""

    def __init__(self, workers: int, cfg: EncodeConfig):
        ctx = _process_context()
        self.procs, self.inboxes, self.outboxes = [], [], []
        self.sent = self.received = 0
        for _ in range(workers):
            inbox_r, inbox_w = ctx.Pipe(duplex=False)
            outbox_r, outbox_w = ctx.Pipe(duplex=False)
            # the main process's pipe ends, the new worker's and the others': the worker closes its copies, so that
            # it sees its inbox end when the main process closes it or dies
            inherited = [*self.inboxes, *self.outboxes, inbox_w, outbox_r]
            proc = ctx.Process(target=_serve, args=(cfg, os.getpid(), inbox_r, outbox_w, inherited), daemon=True)
            proc.start()
            inbox_r.close()  # only the worker holds its ends: when it dies, this side sees EOF or a broken pipe
            outbox_w.close()
            self.procs.append(proc)
            self.inboxes.append(inbox_w)
            self.outboxes.append(outbox_r)
        self.feeds = [queue.SimpleQueue() for _ in range(workers)]
        self.senders = [threading.Thread(target=_send_all, args=(feed, conn), daemon=True)
                        for feed, conn in zip(self.feeds, self.inboxes)]
        for t in self.senders:
            t.start()

    def submit(self, task) -> None:
        """Queue the next task for its worker's sending thread (never waits)."""
        self.feeds[self.sent % len(self.procs)].put(task)
        self.sent += 1

    def result(self):
        """The result of the oldest task not yet returned (its exception, re-raised, if it failed)."""
        k = self.received % len(self.procs)
        try:
            ok, value = self.outboxes[k].recv()
        except (EOFError, OSError):
            raise self._died(k) from None
        self.received += 1
        if not ok:
            raise value
        return value

    def _died(self, k: int) -> UserError:
        proc = self.procs[k]
        proc.join(5)
        how = f"exit status {proc.exitcode}"
        if proc.exitcode == -signal.SIGKILL:
            how = "killed by SIGKILL, as the kernel's out-of-memory killer does"
        elif proc.exitcode is not None and proc.exitcode < 0:
            how = f"killed by signal {-proc.exitcode}"
        return UserError(f"tokenizer worker {proc.pid} died ({how}): run again with fewer --workers, or on a "
                         "machine with more memory")

    def kill(self) -> None:
        """SIGKILL every worker (safe in a signal handler: system calls only)."""
        for proc in self.procs:
            if proc.pid and proc.exitcode is None:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def stop(self, now: bool) -> None:
        """End the workers and reap them: `now` kills them, otherwise they leave after their last task (every
        result has been read by then, so one that does not leave within STOP_SECONDS is killed: nothing is lost)."""
        if now:
            self.kill()  # a sender waiting on a killed worker's pipe gets a broken pipe and ends
        for feed in self.feeds:
            feed.put(None)  # each sender closes its pipe: the worker sees the end and leaves its loop
        for t in self.senders:
            t.join()
        for proc in self.procs:
            proc.join(None if now else STOP_SECONDS)
        self.kill()
        for proc in self.procs:
            proc.join()
        for conn in self.outboxes:
            conn.close()


def _send_all(feed: queue.SimpleQueue, conn) -> None:
    """A sending thread: each task of `feed` to one worker, until None; then close the pipe. A dead worker (broken
    pipe) ends it early; the main thread learns of the death from the worker's results pipe."""
    try:
        for task in iter(feed.get, None):
            conn.send(task)
    except OSError:
        pass
    finally:
        conn.close()


def _serve(cfg: EncodeConfig, parent: int, inbox, outbox, inherited) -> None:
    """A worker's life: encode each task from `inbox`, in order, and send each result (or the exception) back."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    die_with_parent(parent)  # a parent killed with SIGKILL takes its workers along
    for conn in inherited:
        conn.close()
    while True:
        try:
            task = inbox.recv()
        except (EOFError, OSError):  # the main process closed the pipe (or is gone): no more tasks
            return
        try:
            reply = (True, encode_task(cfg, task))
        except Exception as e:  # noqa: BLE001 - any failure goes to the main process, which re-raises it
            reply = (False, e)
        try:
            outbox.send(reply)
        except OSError:  # the main process is gone or stopped reading: nothing left to do
            return
        except Exception:  # noqa: BLE001 - the exception does not pickle: send what it says
            outbox.send((False, RuntimeError(f"tokenizer worker failed: {reply[1]!r}")))


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


def _process_context():
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods and sys.platform.startswith("linux") else None)


def _output_prefixes(out, val_fraction: float) -> tuple[str, str | None]:
    prefix = str(paths(out)[0])[:-4]
    if Path(prefix).is_dir() or not Path(prefix).name:
        raise UserError(f"--out {out} is a directory: give a file prefix such as {Path(out) / 'mydata'}")
    _, problem = folder_problem(Path(prefix).parent, "the folder of --out")
    if problem:
        raise UserError(f"{problem}: give --out a prefix in a writable folder")
    return prefix, prefix + "-val" if val_fraction > 0 else None


def _check_options(val_fraction: float, ctx_len: int, workers: int) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if ctx_len <= 0:
        raise UserError(f"--ctx-len must be positive, got {ctx_len}")
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")


def _tasks(files: list[Path], split_blank_lines: bool) -> Iterator[tuple]:
    for i, p in enumerate(files):
        if p.suffix.lower() == ".jsonl":
            yield from _jsonl_tasks(i, p)
        else:
            yield from _txt_tasks(i, p, split_blank_lines)


class _Collector:
    """Takes each task's tokens in input order: reports or counts bad lines, splits off the held-out documents,
    appends to the writers and counts into the PrepareResult."""

    def __init__(self, res: PrepareResult, names: list[str], train_w: BinIdxWriter, val_w: BinIdxWriter | None,
                 val_fraction: float, skip_bad: bool, bar):
        self.res, self.names, self.train_w, self.val_w = res, names, train_w, val_w
        self.val_fraction, self.skip_bad, self.bar = val_fraction, skip_bad, bar

    def bad_lines(self, file_no: int, errors: list) -> None:
        line, why = errors[0]
        if not self.skip_bad:
            raise UserError(f"{self.names[file_no]}, line {line}: {why} (fix it, or pass --skip-bad to skip "
                            "malformed lines)")
        if self.res.first_bad is None:
            self.res.first_bad = f"{self.names[file_no]}:{line}: {why}"
        self.res.bad += len(errors)

    def __call__(self, task, result) -> None:
        tokens, sizes, errors, empty, nbytes = result
        res = self.res
        if errors:
            self.bad_lines(task[1], errors)
        res.empty += empty
        if sizes.size:
            held = _val_mask(res.docs + res.val_docs, sizes.size, self.val_fraction)
            if held.any():
                per_token = np.repeat(held, sizes)
                self.val_w.add(tokens[per_token], sizes[held])
                res.val_docs += int(held.sum())
                res.val_tokens += int(sizes[held].sum())
                tokens, sizes = tokens[~per_token], sizes[~held]
            self.train_w.add(tokens, sizes)
            res.docs += int(sizes.size)
            res.tokens += int(tokens.size)
        res.bytes_in += nbytes
        self.bar.update(nbytes)


def _encode_all(tasks: Iterator[tuple], cfg: EncodeConfig, workers: int, collect) -> None:
    """Tokenize every task (in a WorkerPool of `workers` processes when more than one) and hand the results to
    `collect` in input order, with at most 2 x workers tasks in flight."""
    if workers == 1:
        for task in tasks:
            collect(task, encode_task(cfg, task))
        return
    pool = WorkerPool(workers, cfg)
    add_cleanup(pool.kill)  # a signal ends this process: the workers go first (rwkv7.signals)
    try:
        pending: deque = deque()
        for task in tasks:
            pool.submit(task)
            pending.append(task)
            if len(pending) >= 2 * workers:
                collect(pending.popleft(), pool.result())
        while pending:
            collect(pending.popleft(), pool.result())
    except BaseException:
        pool.stop(now=True)
        raise
    else:
        pool.stop(now=False)
    finally:
        remove_cleanup(pool.kill)


def _check_counts(res: PrepareResult, names: list[str], val_fraction: float) -> None:
    if res.docs + res.val_docs == 0:
        what = f"{res.bad} malformed lines skipped" if res.bad else "no documents"
        raise UserError(f"nothing to write: {what} in {', '.join(names)}")
    if res.docs == 0:
        raise UserError("every document went to the validation split: lower --val-fraction")
    if res.val_prefix and res.val_docs == 0:
        raise UserError(f"--val-fraction {val_fraction} held out no document of {res.docs}: raise it or "
                        "add documents")


def prepare(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *, text_key: str = "text",
            split_blank_lines: bool = False, val_fraction: float = 0.0, workers: int | None = None,
            skip_bad: bool = False, ctx_len: int = 512, progress: bool | None = None,
            backend: str | None = None) -> PrepareResult:
    """Tokenize `inputs` into the binidx `out` (and `out`-val when val_fraction > 0). See the module docstring."""
    from tqdm.auto import tqdm

    files = _check_inputs(inputs)
    workers = int(workers or os.cpu_count() or 1)
    _check_options(val_fraction, ctx_len, workers)
    prefix, val_prefix = _output_prefixes(out, val_fraction)
    names = [str(p) for p in files]
    total_bytes = sum(p.stat().st_size for p in files)
    tok = get_tokenizer(backend)  # load once here: forked workers inherit it; also fails early if missing
    res = PrepareResult(prefix=prefix, val_prefix=val_prefix, workers=workers, backend=tok.backend, ctx_len=ctx_len)
    t0 = time.perf_counter()
    writers = [BinIdxWriter(prefix)]
    remove_temps = lambda: [unlink_quietly(*w.temp_paths()) for w in writers]  # noqa: E731 (a signal mid-write)
    with on_interrupt(remove_temps):
        try:
            if val_prefix:
                writers.append(BinIdxWriter(val_prefix))
            with tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="tokenizing",
                      disable=(None if progress is None else not progress), dynamic_ncols=True) as bar:
                collect = _Collector(res, names, writers[0], writers[1] if val_prefix else None, val_fraction,
                                     skip_bad, bar)
                _encode_all(_tasks(files, split_blank_lines), EncodeConfig(text_key, skip_bad, backend), workers,
                            collect)
            _check_counts(res, names, val_fraction)
            for w in writers:
                w.commit()
        except BaseException:
            for w in writers:
                w.abort()
            raise
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
