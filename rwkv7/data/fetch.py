"""Download a tokenized binidx dataset from the Hugging Face Hub (default: MiniPile, as the official demo uses it).

Everything goes through huggingface_hub (`get_hf_file_metadata` for the size, `hf_hub_download(local_dir=...)` for
the transfer, its progress bars, its resume-on-drop and its temp-file-then-rename). Files land in
`data_dir/<path in repo>`; the returned prefix is `data_dir/<bin path without .bin>`.

Environment, read at call time (huggingface_hub reads some of these only at import):
- HF_ENDPOINT: the Hub or a mirror (default https://huggingface.co);
- HF_HUB_OFFLINE=1: no network, use the local copy or fail with a clear error;
- HF_TOKEN: for private/gated repos; sent by huggingface_hub, never printed or logged here;
- HF_HUB_CACHE / HF_HOME: the shared cache, reused (copied from) when it already holds the file.

After the transfer each file is checked: size against the Hub's metadata (and the known MiniPile size), sha256
against the Hub's LFS ETag on a fresh download and against `sha256=` when given, then the pair is opened with
open_binidx and check_vocab. Checks that passed are remembered in data_dir/.rwkv7-verified.json (keyed by size and
mtime) so re-runs don't re-hash gigabytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Mapping, Sequence

from rwkv7.errors import UserError
from rwkv7.fsutil import free_bytes

DEFAULT_REPO = "BlinkDL/minipile-tokenized"
DEFAULT_FILES = ("rwkv_vocab_v20230424/minipile.idx", "rwkv_vocab_v20230424/minipile.bin")
DEFAULT_ENDPOINT = "https://huggingface.co"
REPO_TYPE = "dataset"
MINIPILE_TOKENS = 1_498_226_207  # docs/ALIGNMENT.md, "Data"
KNOWN_SIZES = {(DEFAULT_REPO, DEFAULT_FILES[1]): 2 * MINIPILE_TOKENS}  # uint16 .bin
MANIFEST = ".rwkv7-verified.json"
DISK_MARGIN = 256 << 20  # leave this much free after the download
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE set to a true value: no network, local copies only (read at call time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def endpoint_from_env(endpoint: str | None = None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _cache_dir() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(home, "hub")


def _scrub(msg: str) -> str:
    """Error text without the token (defence in depth: huggingface_hub's messages don't carry it)."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        tok = os.environ.get(name)
        if tok and len(tok) >= 4:
            msg = msg.replace(tok, "***")
    return " ".join(str(msg).split())


def _first_line(e: BaseException) -> str:
    text = _scrub(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    return text[:300]


def parse_sha256(items: Sequence[str] | Mapping[str, str] | None) -> dict[str, str]:
    """`FILE=HEX` strings (or a mapping) -> {file: lowercase hex}; FILE is the path in the repo or its base name."""
    if not items:
        return {}
    pairs = items.items() if isinstance(items, Mapping) else []
    if not isinstance(items, Mapping):
        pairs = []
        for it in items:
            if "=" not in it:
                raise UserError(f"--sha256 {it!r}: use FILE=HEX (e.g. minipile.bin=<64 hex digits>)")
            pairs.append(tuple(it.split("=", 1)))
    out = {}
    for k, v in pairs:
        v = str(v).strip().lower()
        if not _SHA256.match(v):
            raise UserError(f"sha256 for {k}: {v!r} is not 64 hex digits")
        out[str(k).strip()] = v
    return out


def _sha_for(filename: str, sha: Mapping[str, str]) -> str | None:
    return sha.get(filename) or sha.get(Path(filename).name)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def hub_prefix(files: Sequence[str]) -> str:
    """The binidx prefix (path in the repo without .bin) of a [idx, bin] pair."""
    bins = [f for f in files if f.endswith(".bin")]
    idxs = [f for f in files if f.endswith(".idx")]
    if len(bins) != 1 or len(idxs) != 1 or bins[0][:-4] != idxs[0][:-4]:
        raise UserError(f"files {list(files)} must be one binidx pair: PREFIX.idx and PREFIX.bin")
    return bins[0][:-4]


class _Manifest:
    def __init__(self, data_dir: Path):
        self.path = data_dir / MANIFEST
        try:
            self.data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}

    def get(self, rel: str, local: Path) -> dict | None:
        e = self.data.get(rel)
        try:
            st = local.stat()
        except OSError:
            return None
        if e and e.get("size") == st.st_size and e.get("mtime_ns") == st.st_mtime_ns:
            return e
        return None

    def put(self, rel: str, local: Path, **info) -> None:
        st = local.stat()
        self.data[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, **info}
        try:
            tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError:
            pass  # only a cache of checks already done

    def drop(self, rel: str) -> None:
        if self.data.pop(rel, None) is not None:
            self.put_all()

    def put_all(self) -> None:
        try:
            self.path.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        except OSError:
            pass


def _network_error(endpoint: str, what: str, e: BaseException) -> UserError:
    return UserError(f"cannot download {what} from {endpoint} ({_first_line(e)}): check the network, set HF_ENDPOINT "
                     "to a reachable mirror, or use a local copy with HF_HUB_OFFLINE=1 or --set data.path=PREFIX")


def _translate(e: BaseException, endpoint: str, repo_id: str, filename: str, revision: str | None,
               offline: bool, data_dir: Path) -> UserError:
    """huggingface_hub / httpx errors -> one clear UserError."""
    from huggingface_hub import errors as hf_errors

    what = f"{repo_id}/{filename}"
    if isinstance(e, hf_errors.HFValidationError):
        return UserError(f"invalid dataset repo or file name {what!r}: {_first_line(e)}")
    if isinstance(e, (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled)):
        if not offline:  # network trouble and no local copy (LocalEntryNotFoundError is an EntryNotFoundError)
            return _network_error(endpoint, what, e.__cause__ or e)
        return UserError(f"HF_HUB_OFFLINE is set and {data_dir / filename} is not there: run `rwkv7 fetch` once "
                         "with network (or copy the files there), or point --set data.path=PREFIX at a local binidx")
    if isinstance(e, hf_errors.GatedRepoError):
        return UserError(f"dataset {repo_id} on {endpoint} is gated: accept its terms on the Hub and set HF_TOKEN")
    if isinstance(e, hf_errors.RepositoryNotFoundError):
        return UserError(f"dataset repo {repo_id} not found on {endpoint} (or private: set HF_TOKEN); check --repo")
    if isinstance(e, hf_errors.RevisionNotFoundError):
        return UserError(f"revision {revision!r} not found in dataset {repo_id} on {endpoint}; check --revision")
    if isinstance(e, hf_errors.EntryNotFoundError):
        return UserError(f"file {filename} not found in dataset {repo_id}"
                         f"{'@' + revision if revision else ''} on {endpoint}; check --file")
    if isinstance(e, hf_errors.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            return UserError(f"{endpoint} refused access to {repo_id} (401): set a valid HF_TOKEN")
        return _network_error(endpoint, what, e)
    return _network_error(endpoint, what, e)


def _transport_errors() -> tuple[type, ...]:
    """The HTTP client's error base classes: huggingface_hub 2.x uses httpx2, 1.x httpx, 0.x requests."""
    out = []
    for mod, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            out.append(getattr(__import__(mod), name))
        except (ImportError, AttributeError):
            pass
    return tuple(out)


def _remote_missing() -> type:
    from huggingface_hub import errors as hf_errors

    return getattr(hf_errors, "RemoteEntryNotFoundError", hf_errors.EntryNotFoundError)


def _is_network_error(e: BaseException) -> bool:
    from huggingface_hub import errors as hf_errors

    if isinstance(e, _transport_errors() + (hf_errors.HfHubHTTPError, hf_errors.LocalEntryNotFoundError,
                                            hf_errors.FileMetadataError, hf_errors.OfflineModeIsEnabled)):
        return True
    return isinstance(e, OSError) and "Consistency check failed" in str(e)


def _remote_metadata(repo_id: str, filename: str, revision: str | None, endpoint: str):
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(repo_id, filename, repo_type=REPO_TYPE, revision=revision, endpoint=endpoint)
    return get_hf_file_metadata(url, endpoint=endpoint)


def _clean_stale_incomplete(data_dir: Path, filename: str, max_age_s: float = 60.0) -> None:
    """huggingface_hub removes its temp file on errors, but not after a kill -9: drop old ones for this file."""
    d = data_dir / ".cache" / "huggingface" / "download" / Path(filename).parent
    if not d.is_dir():
        return
    now = time.time()
    for p in d.glob(f"{Path(filename).name}.*.incomplete"):
        try:
            if now - p.stat().st_mtime > max_age_s:
                p.unlink()
        except OSError:
            pass


def _check_disk(data_dir: Path, need: int) -> None:
    if need <= 0:
        return
    free = free_bytes(data_dir)
    if free < need + DISK_MARGIN:
        raise UserError(f"not enough disk space in {data_dir}: the download needs {need / 1e9:.2f} GB "
                        f"(+{DISK_MARGIN >> 20} MB margin), {free / 1e9:.2f} GB free; free space or pick another "
                        "--data-dir")


def _remove_local(data_dir: Path, filename: str) -> None:
    """Forget a bad download so the next run fetches it again (file and huggingface_hub's metadata for it)."""
    for p in (data_dir / filename,
              data_dir / ".cache" / "huggingface" / "download" / (filename + ".metadata")):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _writable_dir(data_dir: Path) -> Path:
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --data-dir {data_dir}: {e.strerror or e}") from None
    if not os.access(data_dir, os.W_OK):
        raise UserError(f"--data-dir {data_dir} is not writable")
    return data_dir


def _head(repo_id: str, f: str, revision: str | None, endpoint: str, data_dir: Path, quiet: bool):
    """The Hub's metadata for one file; None when the Hub is unreachable but a local copy exists."""
    from huggingface_hub import errors as hf_errors

    try:
        meta = _remote_metadata(repo_id, f, revision, endpoint)
    except Exception as e:  # noqa: BLE001 - narrowed by _is_network_error / translated below
        if isinstance(e, (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError, _remote_missing(),
                          hf_errors.GatedRepoError, hf_errors.HFValidationError)):
            raise _translate(e, endpoint, repo_id, f, revision, False, data_dir) from None
        if not _is_network_error(e):
            raise
        if not (data_dir / f).is_file():
            raise _translate(e, endpoint, repo_id, f, revision, False, data_dir) from None
        if not quiet:  # huggingface_hub will fall back to the local copy
            print(f"warning: {endpoint} unreachable ({_first_line(e)}); using local {data_dir / f}")
        return None
    if meta.commit_hash is None or meta.etag is None:
        raise UserError(f"{endpoint} did not answer like a Hugging Face Hub (no X-Repo-Commit/ETag for "
                        f"{f}): check HF_ENDPOINT")
    return meta


def _head_all(repo_id: str, files: list[str], revision: str | None, endpoint: str, data_dir: Path, force: bool,
              quiet: bool) -> dict:
    """HEAD each file first: fail fast on network/repo errors, learn sizes for the disk check."""
    metas, need = {}, 0
    for f in files:
        metas[f] = meta = _head(repo_id, f, revision, endpoint, data_dir, quiet)
        local = data_dir / f
        if meta is not None and (force or not local.is_file()
                                 or (meta.size is not None and local.stat().st_size != meta.size)):
            need += meta.size or 0
            _clean_stale_incomplete(data_dir, f)
    _check_disk(data_dir, need)
    return metas


def _download(repo_id: str, f: str, revision: str | None, endpoint: str, data_dir: Path, offline: bool,
              force: bool) -> Path:
    from huggingface_hub import errors as hf_errors, hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, f, repo_type=REPO_TYPE, revision=revision, local_dir=data_dir,
                                    cache_dir=_cache_dir(), endpoint=endpoint, local_files_only=offline,
                                    force_download=force))
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001
        if force and isinstance(e, ValueError) and "Force download failed" in str(e):
            e = e.__cause__ or e
        elif not (_is_network_error(e) or isinstance(e, (OSError, hf_errors.HFValidationError))):
            raise
        raise _translate(e, endpoint, repo_id, f, revision, offline, data_dir) from None


def _expected_size(repo_id: str, f: str, meta, quiet: bool) -> int | None:
    remote_size = getattr(meta, "size", None)
    known = KNOWN_SIZES.get((repo_id, f))
    if known is not None and remote_size is not None and remote_size != known and not quiet:
        # the Hub changed the file; trust its metadata but say so
        print(f"note: {f} on the Hub is {remote_size} bytes, not the documented {known}")
    return remote_size if remote_size is not None else known


def _verify(local: Path, f: str, meta, want: str | None, manifest: _Manifest, repo_id: str, endpoint: str,
            data_dir: Path, quiet: bool) -> None:
    """Size, then sha256 (against the Hub's LFS ETag and the expected value), remembered in the manifest."""
    size = local.stat().st_size
    expected = _expected_size(repo_id, f, meta, quiet)
    if expected is not None and size != expected:
        manifest.drop(f)
        raise UserError(f"{local} is {size} bytes, expected {expected} (incomplete or changed download): "
                        "run `rwkv7 fetch --force` to download it again")
    etag = getattr(meta, "etag", None)
    lfs_sha = etag if etag and _SHA256.match(etag) else None
    known = manifest.get(f, local)
    have = known.get("sha256") if known else None
    if (want and want != have) or (lfs_sha and lfs_sha != have):
        if not quiet and size > (256 << 20):
            print(f"checking sha256 of {local} ({size / 1e9:.2f} GB) ...")
        have = _sha256_file(local)
    if lfs_sha and have and have != lfs_sha:
        _remove_local(data_dir, f)
        manifest.drop(f)
        raise UserError(f"{f} from {endpoint} is corrupt: sha256 {have[:16]}... does not match the Hub's "
                        f"{lfs_sha[:16]}...; removed it, run the command again to re-download")
    if want and have != want:
        manifest.drop(f)
        raise UserError(f"{local}: sha256 {have} does not match the expected {want} (--sha256/data.sha256): "
                        "check the value, or delete the file and fetch again")
    manifest.put(f, local, sha256=have, etag=etag, repo=repo_id)


def fetch_dataset(repo_id: str = DEFAULT_REPO, files: Sequence[str] = DEFAULT_FILES, data_dir: str | os.PathLike = "data",
                  revision: str | None = None, sha256: Mapping[str, str] | Sequence[str] | None = None,
                  endpoint: str | None = None, *, vocab_size: int = 65536, force: bool = False,
                  quiet: bool = False) -> Path:
    """Download (or find locally) a binidx pair from a Hub dataset repo, verify it, return its prefix path."""
    from rwkv7.data.binidx import check_vocab, open_binidx
    from rwkv7.quiet import quiet_hub_retries

    quiet_hub_retries()
    repo_id = repo_id or DEFAULT_REPO
    files = list(files or DEFAULT_FILES)
    rel_prefix = hub_prefix(files)
    sha = parse_sha256(sha256)
    endpoint = endpoint_from_env(endpoint)
    offline = hub_offline()
    data_dir = Path(data_dir).expanduser().resolve()
    if offline and force:
        raise UserError("--force needs the network, but HF_HUB_OFFLINE is set")
    _writable_dir(data_dir)
    manifest = _Manifest(data_dir)
    metas = {} if offline else _head_all(repo_id, files, revision, endpoint, data_dir, force, quiet)
    for f in files:
        local = _download(repo_id, f, revision, endpoint, data_dir, offline, force)
        _verify(local, f, metas.get(f), _sha_for(f, sha), manifest, repo_id, endpoint, data_dir, quiet)
    prefix = data_dir / rel_prefix
    data = open_binidx(prefix)
    check_vocab(data, vocab_size)
    if not quiet:
        print(f"{prefix}.bin/.idx: {data.n_docs:,} documents, {len(data):,} tokens ({data.dtype}), verified")
    return prefix
