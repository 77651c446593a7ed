"""rwkv7 fetch against a loopback stand-in for the Hub (tests/hubserver.py): no network needed."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ["NO_PROXY"] = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))

from hubserver import HubServer  # noqa: E402

from rwkv7.cli import main  # noqa: E402
from rwkv7.data.binidx import open_binidx, write_binidx  # noqa: E402
from rwkv7.data.fetch import MANIFEST, fetch_dataset  # noqa: E402
from rwkv7.errors import UserError  # noqa: E402

IDX, BIN = "vocab/tiny.idx", "vocab/tiny.bin"
TOKEN = "hf_testtoken_do_not_print_0123456789"


def make_binidx(tmp: Path, n_docs=200, high=65536, seed=0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(1, high, size=int(rng.integers(5, 2000))), 0) for _ in range(n_docs)]
    write_binidx(tmp / "src" / "tiny", docs)
    return {IDX: (tmp / "src" / "tiny.idx").read_bytes(), BIN: (tmp / "src" / "tiny.bin").read_bytes()}


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for name in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


@pytest.fixture
def hub(env):
    files = make_binidx(env)
    with HubServer(files) as s:
        yield s


def fetch(hub, data_dir, **kw):
    return fetch_dataset(hub.repo, [IDX, BIN], data_dir, endpoint=hub.url, **kw)


def leftovers(data_dir: Path) -> list[Path]:
    return [p for p in data_dir.rglob("*") if p.name.endswith((".incomplete", ".tmp"))]


def test_first_download_verifies_and_returns_prefix(hub, env):
    prefix = fetch(hub, env / "data")
    assert prefix == (env / "data" / "vocab" / "tiny").resolve()
    assert (env / "data" / BIN).read_bytes() == hub.files[BIN]
    assert (env / "data" / IDX).read_bytes() == hub.files[IDX]
    assert hub.count("GET", BIN) == 1 and hub.count("GET", IDX) == 1
    d = open_binidx(prefix)
    assert len(d) == len(hub.files[BIN]) // 2
    assert (env / "data" / MANIFEST).is_file()
    assert leftovers(env / "data") == []


def test_second_run_reuses_local_copy_without_transfer(hub, env):
    fetch(hub, env / "data")
    gets = hub.count("GET")
    prefix = fetch(hub, env / "data")
    assert hub.count("GET") == gets  # metadata (HEAD) only
    assert hub.count("HEAD") > 0
    assert open_binidx(prefix).n_docs == 200


def test_hf_endpoint_is_read_at_call_time(hub, env, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    fetch_dataset(hub.repo, [IDX, BIN], env / "data")  # no endpoint argument
    assert hub.count("GET", BIN) == 1


def test_offline_uses_local_copy(hub, env, monkeypatch):
    fetch(hub, env / "data")
    n = len(hub.requests)
    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prefix = fetch(hub, env / "data")
    assert len(hub.requests) == n
    assert open_binidx(prefix).n_docs == 200


def test_offline_without_local_copy_is_a_clear_error(hub, env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        fetch(hub, env / "data")
    assert hub.requests == []


def test_connection_dropped_mid_file_once_recovers(hub, env):
    hub.cut_file, hub.cut_gets, hub.cut_after = BIN, 1, 1000
    prefix = fetch(hub, env / "data")
    assert hub.count("GET", BIN) == 2  # the cut one, then the retry
    assert (env / "data" / BIN).read_bytes() == hub.files[BIN]
    assert leftovers(env / "data") == []
    assert open_binidx(prefix).n_docs == 200


def test_recovered_drops_log_no_warnings(hub, env, caplog):
    """huggingface_hub logged each retry as a warning ("Error while downloading from ...: ..."), which read like
    our `error:` line although the download recovered."""
    import logging

    hub.cut_file, hub.cut_gets, hub.cut_after = BIN, 1, 1000
    with caplog.at_level(logging.DEBUG):
        fetch(hub, env / "data")
    noisy = [r.getMessage() for r in caplog.records if r.name.startswith("huggingface_hub") and r.levelno >= 30]
    assert noisy == []


def test_interrupted_download_leaves_nothing_and_rerun_succeeds(hub, env, monkeypatch):
    import huggingface_hub.file_download as fd

    class NoSleep:  # huggingface_hub waits 1 s between its 5 resume attempts
        def __getattr__(self, name):
            import time
            return getattr(time, name)

        @staticmethod
        def sleep(_):
            pass

    monkeypatch.setattr(fd, "time", NoSleep())
    hub.cut_file, hub.cut_gets, hub.cut_after = BIN, 100, 0
    with pytest.raises(UserError) as e:
        fetch(hub, env / "data")
    assert hub.url in str(e.value) and "HF_ENDPOINT" in str(e.value)
    assert not (env / "data" / BIN).exists()  # a half-written file is never in place
    assert leftovers(env / "data") == []
    hub.cut_gets = 0
    prefix = fetch(hub, env / "data")
    assert (env / "data" / BIN).read_bytes() == hub.files[BIN]
    assert open_binidx(prefix).n_docs == 200


def test_corrupted_transfer_is_caught_by_sha256_and_removed(hub, env):
    bad = bytearray(hub.files[BIN])
    bad[len(bad) // 2] ^= 0xFF
    hub.serve_bytes[BIN] = bytes(bad)
    with pytest.raises(UserError, match="corrupt.*sha256"):
        fetch(hub, env / "data")
    assert not (env / "data" / BIN).exists()  # removed, so the next run downloads again
    del hub.serve_bytes[BIN]
    fetch(hub, env / "data")
    assert (env / "data" / BIN).read_bytes() == hub.files[BIN]


def test_expected_sha256_option(hub, env):
    import hashlib

    with pytest.raises(UserError, match="does not match the expected"):
        fetch(hub, env / "data", sha256={"tiny.bin": "0" * 64})
    good = hashlib.sha256(hub.files[BIN]).hexdigest()
    assert fetch(hub, env / "data", sha256=[f"{BIN}={good}"]).name == "tiny"
    with pytest.raises(UserError, match="64 hex"):
        fetch(hub, env / "data", sha256=["tiny.bin=xyz"])


def test_truncated_bin_on_the_hub_fails_structure_check(env):
    files = make_binidx(env)
    files[BIN] = files[BIN][: len(files[BIN]) // 4 * 2]  # consistent ETag, broken pair
    with HubServer(files) as s, pytest.raises(UserError, match="shorter than its index"):
        fetch(s, env / "data")


def test_token_ids_beyond_vocab_fail(hub, env):
    with pytest.raises(UserError, match="vocab_size 1000"):
        fetch(hub, env / "data", vocab_size=1000)


def test_missing_file_and_repo_are_clear_errors(hub, env):
    with pytest.raises(UserError, match="not found"):
        fetch_dataset(hub.repo, ["vocab/nope.idx", "vocab/nope.bin"], env / "data", endpoint=hub.url)
    with pytest.raises(UserError, match="not found|HF_TOKEN"):
        fetch_dataset("org/other", [IDX, BIN], env / "data", endpoint=hub.url)
    with pytest.raises(UserError, match="binidx pair"):
        fetch_dataset(hub.repo, [IDX], env / "data", endpoint=hub.url)


def test_server_down_is_a_clear_error_and_falls_back_to_local_copy(hub, env, monkeypatch, capsys):
    url = hub.url
    hub.stop()
    monkeypatch.setenv("HF_ENDPOINT", url)
    rc = main(["fetch", "--repo", hub.repo, "--file", IDX, "--file", BIN, "--data-dir", str(env / "data")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error:") and url in err[0]
    assert "HF_HUB_OFFLINE" in err[0] and "data.path" in err[0]
    # with a local copy, an unreachable endpoint is not fatal
    files = hub.files
    with HubServer(files, repo=hub.repo) as s:
        fetch(s, env / "data")
    prefix = fetch(hub, env / "data")  # hub is down
    assert open_binidx(prefix).n_docs == 200


def test_not_enough_disk_space(hub, env, monkeypatch):
    import rwkv7.data.fetch as f

    monkeypatch.setattr(f, "free_bytes", lambda p: 1000)
    with pytest.raises(UserError, match="not enough disk space"):
        fetch(hub, env / "data")
    assert hub.count("GET") == 0


def test_token_is_sent_but_never_printed(hub, env, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    rc = main(["fetch", "--repo", hub.repo, "--file", IDX, "--file", BIN, "--data-dir", str(env / "data")])
    out, err = capsys.readouterr()
    assert rc == 0
    assert any(h.get("authorization") == f"Bearer {TOKEN}" for h in hub.headers_of("HEAD"))
    assert TOKEN not in out + err
    assert "data.path=" in out
    rc = main(["fetch", "--repo", "org/private", "--file", IDX, "--file", BIN, "--data-dir", str(env / "d2")])
    out, err = capsys.readouterr()
    assert rc == 2 and TOKEN not in out + err


def test_stub_answers_ranges_like_the_hub(hub):
    import urllib.request

    url = f"{hub.url}/datasets/{hub.repo}/resolve/main/{BIN}"
    req = urllib.request.Request(url, headers={"Range": "bytes=10-"})
    with urllib.request.urlopen(req) as r:
        assert r.status == 206
        assert r.headers["Content-Range"] == f"bytes 10-{len(hub.files[BIN]) - 1}/{len(hub.files[BIN])}"
        assert r.read() == hub.files[BIN][10:]
    head = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(head) as r:
        assert len(r.headers["X-Repo-Commit"]) == 40
        assert r.headers["ETag"] == f'"{hub.etag_of(hub.files[BIN])}"'
