"""rwkv7 prepare: text -> binidx with the World tokenizer; magic_prime; bad input -> exit 2 with one line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from rwkv7.cli import main
from rwkv7.data import prepare as prep
from rwkv7.data.binidx import open_binidx, write_binidx
from rwkv7.data.magic import is_prime, magic_prime
from rwkv7.data.tokenizer import EOD, WorldTokenizer, decode, get_tokenizer
from rwkv7.errors import UserError

ROOT = Path(__file__).resolve().parent.parent

MIXED = [
    "Hello, world! The quick brown fox.",
    "中文测试：你好，世界。日本語のテキスト、한국어",
    "emoji 😀🎉👩‍👩‍👧 and\ttabs\tinside\nand new\nlines\r\nCRLF too",
    "  leading and trailing spaces  ",
    "math ∑ ∫ √ ≤ ≥ and ümlauts, café, naïve, \x00 nul byte, \u200b zero width",
    "code:\n    def f(x):\n\t\treturn x ** 2  # comment\n",
]


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("RWKV7_TOKENIZER", raising=False)


def write_jsonl(path: Path, texts, key="text") -> Path:
    path.write_text("".join(json.dumps({key: t, "meta": i}, ensure_ascii=bool(i % 2)) + "\n"
                            for i, t in enumerate(texts)), encoding="utf-8")
    return path


def docs_of(prefix) -> list[np.ndarray]:
    d = open_binidx(prefix)
    return [np.asarray(d.document(i)) for i in range(d.n_docs)]


@pytest.fixture(scope="module")
def trie():
    return WorldTokenizer("trie")


# ------------------------------------------------------------------------------------------ tokenizer / ids


def test_ids_equal_the_reference_trie_tokenizer(trie):
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER  # the reference itself, not our wrapper

    import rwkv
    ref = TRIE_TOKENIZER(str(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"))
    fast = get_tokenizer()
    for t in MIXED:
        assert fast.encode(t) == ref.encode(t)
        assert trie.encode(t) == ref.encode(t)


def test_decode_round_trips_mixed_utf8():
    tok = get_tokenizer()
    for t in MIXED:
        assert decode(tok.encode(t)) == t
    assert decode([*tok.encode("a"), EOD]) == "a"  # end of document decodes to nothing


def test_lone_surrogate_is_rejected_like_the_reference(trie):
    for tok in (get_tokenizer(), trie):
        with pytest.raises(UnicodeEncodeError):
            tok.encode("bad \ud800 surrogate")


# -------------------------------------------------------------------------------------------- prepare


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_jsonl_round_trip_and_format(tmp_path, trie, workers):
    src = write_jsonl(tmp_path / "in.jsonl", MIXED * 3)
    res = prep.prepare([src], tmp_path / "out", workers=workers, progress=False)
    docs = docs_of(tmp_path / "out")
    assert res.docs == len(docs) == len(MIXED) * 3
    assert open_binidx(tmp_path / "out").dtype == np.uint16
    for text, doc in zip(MIXED * 3, docs):
        assert doc[-1] == EOD and EOD not in doc[:-1]
        assert doc[:-1].tolist() == trie.encode(text)  # ids identical to TRIE_TOKENIZER
        assert decode(doc) == text
    assert res.tokens == sum(len(d) for d in docs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.bin", "out.idx"]


def test_order_is_preserved_across_many_chunks_and_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "CHUNK_BYTES", 256)  # many small chunks through the pool
    texts = [f"document number {i} " + "x" * (i % 37) for i in range(400)]
    src = write_jsonl(tmp_path / "many.jsonl", texts)
    prep.prepare([src], tmp_path / "one", workers=1, progress=False)
    prep.prepare([src], tmp_path / "two", workers=2, progress=False)
    assert (tmp_path / "one.bin").read_bytes() == (tmp_path / "two.bin").read_bytes()
    assert (tmp_path / "one.idx").read_bytes() == (tmp_path / "two.idx").read_bytes()
    assert [decode(d) for d in docs_of(tmp_path / "two")] == texts


def test_streaming_writer_matches_write_binidx(tmp_path):
    tok = get_tokenizer()
    src = write_jsonl(tmp_path / "a.jsonl", MIXED)
    prep.prepare([src], tmp_path / "streamed", workers=1, progress=False)
    write_binidx(tmp_path / "ref", [np.array(tok.encode(t) + [0]) for t in MIXED])
    assert (tmp_path / "streamed.idx").read_bytes() == (tmp_path / "ref.idx").read_bytes()
    assert (tmp_path / "streamed.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()


def test_text_key_and_blank_lines(tmp_path):
    src = tmp_path / "k.jsonl"
    src.write_text('{"content": "first"}\n\n   \n{"content": "second"}\r\n', encoding="utf-8")
    prep.prepare([src], tmp_path / "o", text_key="content", workers=1, progress=False)
    assert [decode(d) for d in docs_of(tmp_path / "o")] == ["first", "second"]


def test_txt_one_document_per_file_and_blank_line_split(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("para one\nline two\n\n\npara two 你好\n\n", encoding="utf-8")
    b = tmp_path / "b.txt"
    b.write_text("whole file\n\nstays one\n", encoding="utf-8")
    prep.prepare([a, b], tmp_path / "whole", workers=1, progress=False)
    assert [decode(d) for d in docs_of(tmp_path / "whole")] == [a.read_text(), b.read_text()]
    prep.prepare([a, b], tmp_path / "split", split_blank_lines=True, workers=2, progress=False)
    assert [decode(d) for d in docs_of(tmp_path / "split")] == [
        "para one\nline two", "para two 你好", "whole file", "stays one"]


def test_validation_split(tmp_path):
    texts = [f"doc {i}" for i in range(100)]
    src = write_jsonl(tmp_path / "v.jsonl", texts)
    res = prep.prepare([src], tmp_path / "d", val_fraction=0.1, workers=2, progress=False)
    assert (res.docs, res.val_docs) == (90, 10)
    train = [decode(d) for d in docs_of(tmp_path / "d")]
    val = [decode(d) for d in docs_of(tmp_path / "d-val")]
    assert sorted(train + val, key=lambda s: int(s.split()[1])) == texts
    assert not set(train) & set(val)
    assert val == [f"doc {i}" for i in range(9, 100, 10)]  # evenly spaced, deterministic


def test_skip_bad_counts_malformed_lines(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "ok 1"}\n{"text": broken\n["not", "object"]\n{"other": 1}\n{"text": 5}\n'
                   '{"text": "ok 2"}\n', encoding="utf-8")
    res = prep.prepare([src], tmp_path / "o", skip_bad=True, workers=1, progress=False)
    assert res.bad == 4 and res.docs == 2
    assert res.first_bad.startswith(f"{src}:2:")
    assert [decode(d) for d in docs_of(tmp_path / "o")] == ["ok 1", "ok 2"]


def test_summary_suggests_magic_prime(tmp_path, capsys):
    src = write_jsonl(tmp_path / "big.jsonl", [" ".join(["word"] * 400)] * 40)
    rc = main(["prepare", "--input", str(src), "--out", str(tmp_path / "m"), "--ctx-len", "64", "--workers", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    n = len(open_binidx(tmp_path / "m"))
    assert f"{n:,} tokens" in out
    assert f"magic_prime for ctx_len 64: {magic_prime(n, 64)}" in out
    assert f"data.path={tmp_path / 'm'}" in out
    rc = main(["prepare", "--check", str(tmp_path / "m"), "--ctx-len", "64"])
    assert rc == 0 and f"{n:,} tokens" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- magic prime


def test_magic_prime_matches_official_minipile_values():
    n = 1_498_226_207
    assert [magic_prime(n, c) for c in (512, 1024, 2048, 4096)] == [2926181, 1463027, 731531, 365759]


def test_magic_prime_is_the_largest_qualifying_prime():
    def slow_prime(k):
        return k > 1 and all(k % d for d in range(2, int(k ** 0.5) + 1))

    assert [k for k in range(200) if is_prime(k)] == [k for k in range(200) if slow_prime(k)]
    for n_tokens, ctx in [(10_000, 16), (123_457, 64), (5_000, 100), (3 * 7, 7)]:
        p = magic_prime(n_tokens, ctx)
        limit = n_tokens // ctx - 1
        assert p <= limit and p % 3 == 2 and slow_prime(p)
        assert not any(slow_prime(q) and q % 3 == 2 for q in range(p + 1, limit + 1))
    with pytest.raises(UserError):
        magic_prime(100, 512)


# ------------------------------------------------------------------------------ bad input: exit 2, one line


def run_cli(capsys, *argv) -> tuple[int, list[str]]:
    rc = main(list(map(str, argv)))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err.strip().splitlines()


def assert_one_error(rc, err, *needles):
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error:"), err
    for n in needles:
        assert n in err[0], (n, err[0])


def test_missing_input(tmp_path, capsys):
    rc, err = run_cli(capsys, "prepare", "--input", tmp_path / "nope.jsonl", "--out", tmp_path / "o")
    assert_one_error(rc, err, "nope.jsonl", "not found")


def test_empty_input(tmp_path, capsys):
    (tmp_path / "e.jsonl").write_text("\n\n")
    rc, err = run_cli(capsys, "prepare", "--input", tmp_path / "e.jsonl", "--out", tmp_path / "o")
    assert_one_error(rc, err, "no documents")
    (tmp_path / "e.txt").write_text("")
    rc, err = run_cli(capsys, "prepare", "--input", tmp_path / "e.txt", "--out", tmp_path / "o")
    assert_one_error(rc, err, "no documents")
    assert not list(tmp_path.glob("o*"))


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_json_names_file_and_line_and_leaves_nothing(tmp_path, capsys, workers):
    src = tmp_path / "b.jsonl"
    src.write_text("".join(f'{{"text": "line {i}"}}\n' for i in range(50)) + '{"text": "unterminated\n',
                   encoding="utf-8")
    rc, err = run_cli(capsys, "prepare", "--input", src, "--out", tmp_path / "o", "--workers", workers)
    assert_one_error(rc, err, str(src), "line 51", "invalid JSON", "--skip-bad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.jsonl"]


def test_wrong_key(tmp_path, capsys):
    src = write_jsonl(tmp_path / "k.jsonl", ["a", "b"], key="body")
    rc, err = run_cli(capsys, "prepare", "--input", src, "--out", tmp_path / "o")
    assert_one_error(rc, err, "line 1", 'no "text" key', "body", "--text-key")


def test_invalid_utf8(tmp_path, capsys):
    src = tmp_path / "u.txt"
    src.write_bytes(b"fine\n\nstill fine\nbroken \xff\xfe here\n")
    rc, err = run_cli(capsys, "prepare", "--input", src, "--out", tmp_path / "o", "--split-blank-lines")
    assert_one_error(rc, err, str(src), "line 4", "UTF-8")


def test_unknown_suffix_and_bad_options(tmp_path, capsys):
    (tmp_path / "x.csv").write_text("a,b\n")
    rc, err = run_cli(capsys, "prepare", "--input", tmp_path / "x.csv", "--out", tmp_path / "o")
    assert_one_error(rc, err, "x.csv", ".jsonl")
    src = write_jsonl(tmp_path / "a.jsonl", ["a"])
    rc, err = run_cli(capsys, "prepare", "--input", src, "--out", tmp_path / "o", "--val-fraction", "1.5")
    assert_one_error(rc, err, "--val-fraction")
    rc, err = run_cli(capsys, "prepare", "--input", src)
    assert_one_error(rc, err, "--out")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    src = write_jsonl(tmp_path / "a.jsonl", ["a"])
    try:
        rc, err = run_cli(capsys, "prepare", "--input", src, "--out", ro / "o")
    finally:
        ro.chmod(0o700)
    assert_one_error(rc, err, "cannot write", "--out")


def test_unwritable_output_path(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file, not a folder")
    src = write_jsonl(tmp_path / "a.jsonl", ["a"])
    rc, err = run_cli(capsys, "prepare", "--input", src, "--out", blocker / "sub" / "o")
    assert_one_error(rc, err, "not a folder", "--out")


def test_check_rejects_ids_beyond_vocab(tmp_path, capsys):
    write_binidx(tmp_path / "big", [np.array([1, 2, 65535, 0])], dtype=np.uint16)
    rc, err = run_cli(capsys, "prepare", "--check", tmp_path / "big", "--vocab-size", "1000")
    assert_one_error(rc, err, "65535", "vocab_size 1000")
    write_binidx(tmp_path / "wide", [np.array([1, 2, 70000, 0])], dtype=np.int32)
    rc, err = run_cli(capsys, "prepare", "--check", tmp_path / "wide")
    assert_one_error(rc, err, "70000", "vocab_size 65536")


def test_check_rejects_truncated_bin(tmp_path, capsys):
    write_binidx(tmp_path / "t", [np.arange(1, 100), np.arange(1, 50)])
    data = (tmp_path / "t.bin").read_bytes()
    (tmp_path / "t.bin").write_bytes(data[: len(data) - 20])
    rc, err = run_cli(capsys, "prepare", "--check", tmp_path / "t")
    assert_one_error(rc, err, "t.bin", "shorter than its index")
    rc, err = run_cli(capsys, "prepare", "--check", tmp_path / "missing")
    assert_one_error(rc, err, "not found")


def test_interrupt_leaves_no_partial_output(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "a.jsonl", [f"doc {i}" for i in range(300)])
    monkeypatch.setattr(prep, "CHUNK_BYTES", 128)
    real = prep.encode_task
    calls = {"n": 0}

    def flaky(cfg, task):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # as Ctrl-C would, mid-run in the main process
        return real(cfg, task)

    monkeypatch.setattr(prep, "encode_task", flaky)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare([src], tmp_path / "o", workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]
    assert signal.getsignal(signal.SIGINT) is before  # workers=1 runs in-process and leaves Ctrl-C alone


# ------------------------------------------------------------------------- the worker processes: errors never hang

CHILD = """\
import os, signal, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from rwkv7.data import prepare as prep
from rwkv7.errors import UserError
prep.CHUNK_BYTES = 64  # one task every few lines
real = prep.encode_task
{setup}
prep.encode_task = patched  # the forked workers inherit it
Path("in.jsonl").write_text({text!r})
try:
    prep.prepare(["in.jsonl"], "out", workers=2, progress=False)
except UserError as e:
    print("error:", e)
print(sorted(os.listdir(".")))
"""


def _prepare_in_child(tmp_path, setup: str, text: str, timeout: float = 60) -> str:
    """prepare() with 2 workers on `text`, its encode_task replaced by the `patched` that `setup` defines, in a fresh
    process: a hang fails after `timeout` seconds instead of stopping the test run, and the process group is killed
    either way, so no worker is left behind. Returns the child's stdout: the error line and the folder's files."""
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT), setup=textwrap.dedent(setup), text=text))
    p = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"prepare did not return within {timeout} s")
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert p.returncode == 0, err[-3000:]
    assert "['child.py', 'in.jsonl']" in out, out  # no output, no temp files
    return out


def test_error_path_stops_a_busy_worker_that_ignores_sigterm(tmp_path):
    """Was (seen once in CI): the first task's bad line raised in the main process, and multiprocessing.Pool's
    terminate() then waited forever for a worker. It stops workers with SIGTERM, and a worker that does not die
    of it (here: SIGTERM blocked, and busy with a slow task) comes back for the next task and waits for the task
    queue's lock, which terminate() holds. Stopping must not need the workers' cooperation."""
    out = _prepare_in_child(tmp_path, """
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # the workers inherit the mask

        def patched(cfg, task):
            if task[2][0] > 1:  # every task but the first, whose bad line ends the run
                time.sleep(2)
            return real(cfg, task)
        """, '{"body": "no text key"}\n' + '{"text": "fine"}\n' * 20)
    assert 'error: in.jsonl, line 1: no "text" key' in out


def test_a_worker_killed_mid_task_is_an_error_not_a_hang(tmp_path):
    """Was: a tokenizer worker killed from outside (the kernel's OOM killer) lost its task, and Pool's get() waited
    for that result forever. Now the run stops with one line that names the worker, how it ended and the fix."""
    out = _prepare_in_child(tmp_path, """
        def patched(cfg, task):
            if b"poison" in task[2][1]:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(cfg, task)
        """, '{"text": "fine"}\n' * 20 + '{"text": "poison"}\n' + '{"text": "ok"}\n' * 20)
    assert "error: tokenizer worker" in out and "killed by SIGKILL" in out and "--workers" in out, out


def test_workers_leave_by_themselves_after_the_last_task():
    """Was (while writing WorkerPool): each worker held a copy of its own inbox's sending end, so it never saw the
    end of its tasks and stop() waited for it forever. A worker that leaves by itself exits with 0; one that has to
    be killed after STOP_SECONDS would show -9."""
    pool = prep.WorkerPool(2, prep.EncodeConfig())
    tasks = [("jsonl", 0, (1, json.dumps({"text": f"doc {i}"}).encode() + b"\n")) for i in range(5)]
    for t in tasks:
        pool.submit(t)
    results = [pool.result() for _ in tasks]
    pool.stop(now=False)
    assert [p.exitcode for p in pool.procs] == [0, 0]
    assert [decode(r[0]) for r in results] == [f"doc {i}" for i in range(5)]  # in task order


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("cannot pickle this")


@pytest.mark.parametrize("error,raised,words", [
    (ValueError("boom in the tokenizer"), ValueError, ["boom in the tokenizer"]),
    (Unpicklable("odd"), RuntimeError, ["tokenizer worker failed", "Unpicklable", "odd"])])
def test_a_task_that_fails_in_a_worker_raises_in_the_main_process(tmp_path, monkeypatch, error, raised, words):
    src = write_jsonl(tmp_path / "a.jsonl", ["fine", "fails here", "fine again"])
    monkeypatch.setattr(prep, "CHUNK_BYTES", 16)
    real = prep.encode_task

    def failing(cfg, task):  # runs in the forked workers, which inherit this patch
        if b"fails here" in task[2][1]:
            raise error
        return real(cfg, task)

    monkeypatch.setattr(prep, "encode_task", failing)
    with pytest.raises(raised) as e:
        prep.prepare([src], tmp_path / "o", workers=2, progress=False)
    assert all(w in str(e.value) for w in words), e.value
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]
