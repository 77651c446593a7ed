"""Durable file writes: a file is complete or absent, never half written; appended lines are never torn.

Every checkpoint, log rewrite, JSON and plot goes through here.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from rwkv7.signals import on_interrupt, unlink_quietly


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
    _atomic_write(path, write, mode)


def _atomic_write(path: Path, write: Callable[[object], None], mode: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with on_interrupt(lambda: unlink_quietly(tmp)):  # a signal mid-write exits without leaving the temp file
        _write_and_rename(fd, tmp, path, write, mode)


def _write_and_rename(fd: int, tmp: str, path: Path, write: Callable[[object], None], mode: str) -> None:
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
    return shutil.disk_usage(existing_ancestor(path)).free


def gib(n: float) -> str:
    """Bytes for a message: GiB from 1 GiB up, MiB below."""
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


# ---- failures to write: mapped to one clear line (exit 2) instead of a traceback ---------------------------------

# torch.save's zip writer reports a failed write as a RuntimeError, e.g. "[enforce fail at inline_container.cc:672]
# . unexpected pos ..." or "PytorchStreamWriter failed writing file ..."
ZIP_WRITER_ERRORS = ("inline_container", "PytorchStreamWriter", "unexpected pos", "file write failed")


def is_write_failure(e: BaseException) -> bool:
    """Raised while writing a file: any OSError (a full disk, a quota, a read-only or failing disk, no permission,
    a folder that vanished), or the zip writer's RuntimeError."""
    if isinstance(e, OSError):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in ZIP_WRITER_ERRORS)


def _free_or_none(folder: str | os.PathLike) -> int | None:
    try:
        return free_bytes(folder)
    except OSError:
        return None


def ensure_space(folder: str | os.PathLike, need: int) -> None:
    """OSError(ENOSPC) before writing `need` bytes into a folder that has less free (1 MiB of slack)."""
    free = _free_or_none(folder)
    if free is not None and free < need + (1 << 20):
        raise OSError(errno.ENOSPC, "not enough free space")


def write_failure_message(what: str, folder: str | os.PathLike, e: BaseException, need: int | None = None,
                          then: str = "") -> str:
    """One line: what could not be written where, why, space needed and free, and what to do."""
    if isinstance(e, OSError):
        reason = e.strerror or str(e)
    else:
        reason = "the write failed; usually the disk is full"
    free = _free_or_none(folder)
    space = []
    if need:
        space.append(f"about {gib(need)} needed")
    if free is not None:
        space.append(f"{gib(free)} free")
    space_text = f"; {', '.join(space)}" if space else ""
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make the folder writable or choose another one"
    elif isinstance(e, OSError) and e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ESTALE):
        fix = "the folder disappeared while writing: check the storage it is on"
    else:
        fix = "free disk space there" + ("" if then else " or choose another folder")
    return f"could not write {what} in {folder} ({reason}{space_text}): {fix}{then}"
