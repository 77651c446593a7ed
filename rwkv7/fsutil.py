"""Durable file writes: a file is complete or absent, never half written; appended lines are never torn.

Every checkpoint, log rewrite, JSON and plot goes through here.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[object], None], mode: str = "wb") -> None:
    """Call write(file) on a temp file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line with a single write and fsync (a crash can cut it only at the very end of the file,
    which a resumed run repairs)."""
    if not line.endswith("\n"):
        line += "\n"
    with open(path, "ab") as f:
        f.write(line.encode())
        f.flush()
        os.fsync(f.fileno())


# ---- where files can go: shared by fetch, doctor, the preflight and init -------------------------------------------

def existing_ancestor(path: str | os.PathLike) -> Path:
    """`path` itself or the nearest folder above it that exists."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def folder_problem(path: str | os.PathLike, what: str) -> tuple[Path, str | None]:
    """The folder that exists nearest `path` and, if `path` cannot be created or written there, why not."""
    base = existing_ancestor(path)
    if not base.is_dir():
        return base, f"cannot create {what} {path}: {base} exists and is not a folder"
    if not os.access(base, os.W_OK | os.X_OK):
        return base, f"cannot write {what} {path}: {base} is not writable"
    return base, None


def free_bytes(path: str | os.PathLike) -> int:
    """Free space on the file system that holds (or will hold) `path`."""
    import shutil

    return shutil.disk_usage(existing_ancestor(path)).free


def gib(n: float) -> str:
    """Bytes for a message: GiB from 1 GiB up, MiB below."""
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"
