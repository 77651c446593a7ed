"""One run per run folder: an OS file lock (`<run>/.lock`, flock) held for the life of a training run.

The kernel drops the lock when its process ends, however it ends (crash, SIGKILL, power loss of that host), so a
lock file left by a dead process is simply locked again by the next run: stale locks are taken over without any
guessing. The file holds the holder's pid and host, so a second run into a busy folder exits 2 naming them.
Where the filesystem has no flock (some network or FUSE mounts), the pid and host in the file decide instead: a
live process of this host, or any other host (whose processes cannot be checked from here), holds the folder.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from rwkv7.errors import UserError
from rwkv7.signals import add_cleanup, remove_cleanup, unlink_quietly

LOCK_NAME = ".lock"


def _holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _busy(run_dir: Path, holder: dict) -> UserError:
    who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    since = f" since {holder['started']}" if holder.get("started") else ""
    return UserError(f"run folder {run_dir} is in use by another training run ({who}{since}): wait for it to "
                     "finish or stop it, or choose another --out")


def _alive_here(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return bool(holder)  # another host's process: cannot be checked from here, so it counts as alive
    try:
        os.kill(int(holder.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return int(holder["pid"]) > 0


class RunLock:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        from rwkv7.fsutil import folder_problem

        _, problem = folder_problem(self.run_dir, "run folder")
        if problem:
            raise UserError(f"{problem}: choose another --out")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the run folder {self.run_dir} ({e.strerror or e}): choose another "
                            "--out") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"cannot create {self.path} ({e.strerror or e}): make the run folder writable or "
                                "choose another --out") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _holder(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise _busy(self.run_dir, holder) from None
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    raise UserError(f"cannot lock {self.path} ({e.strerror or e}): choose another --out") from None
                if _alive_here(holder) and holder.get("pid") != os.getpid():  # no flock here: trust the pid
                    raise _busy(self.run_dir, holder) from None
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            # a run that just finished may have removed the file we opened: lock the file that is there now
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        add_cleanup(self._on_signal)  # a signal ends the process without release(): remove the file then
        return self

    def _on_signal(self) -> None:
        unlink_quietly(self.path)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()  # while still locked, so no one else holds the file we remove
        except OSError:
            pass
        os.close(self.fd)  # drops the lock
        self.fd = None
        remove_cleanup(self._on_signal)


@contextmanager
def hold(run_dir: Path):
    """Hold the run folder's lock for the block; released (and its file removed) however the block ends."""
    lock = RunLock(run_dir).acquire()
    try:
        yield lock
    finally:
        lock.release()
