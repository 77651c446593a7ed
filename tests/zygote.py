"""`python entrypoint.py ARGS` for the tests, without paying torch's and Lightning's imports (~5 s) every time.

A zygote process imports the training stack once, then forks a fresh process for every run a test asks for. The
run is a real process of its own: its own pid (a test sends it SIGKILL, SIGTERM or SIGINT), its own exit status (a
signal's death is -signum, as with subprocess), stdout and stderr on pipes, and it executes entrypoint.py as
`__main__` with the test's argv, environment and working directory. What differs from a fresh interpreter is only
what happened before the fork, and the very end: the imports (and what they read from the environment at import
time: nothing of ours; warnings they raised are not raised again), and at exit atexit handlers run but the
interpreter's finalization does not (non-daemon threads are not joined). Tests of start-up or exit themselves (a
signal while Python imports, a crash at interpreter exit, the warnings `make train` prints) use real subprocesses.

    p = zygote.run([sys.executable, "entrypoint.py", "train", ...], cwd=ROOT, env=env)    # like subprocess.run
    p = zygote.Run(cmd, cwd=ROOT, env=env); p.send_signal(...); out, err = p.communicate()  # like Popen

The zygote answers on a Unix socket. For each request it forks a waiter, which forks the run and reports its pid,
then its exit status; the test side's `Run` reads both. One zygote per pytest process, started on first use.
"""
from __future__ import annotations

import atexit
import io
import json
import shutil
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRELOAD = ("rwkv7.cli", "rwkv7.commands.train", "rwkv7.train.run", "rwkv7.trajectory")


# ---- the zygote ---------------------------------------------------------------------------------------------------

def serve(path: str, parent: int) -> None:
    import importlib

    sys.path[0] = str(ROOT)  # not tests/: the runs see the path `python entrypoint.py` would
    from rwkv7 import quiet
    from rwkv7.signals import die_with_parent

    die_with_parent(parent)  # the zygote ends with the pytest process that started it
    quiet.install()  # as the CLI does before the libraries load: their notices stay silent here too
    for name in PRELOAD:
        importlib.import_module(name)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # one request, one packet
    server.bind(path)
    server.listen(16)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # waiters are reaped by the kernel
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        if os.fork() == 0:
            server.close()
            _waiter(conn, json.loads(message), fds)
        conn.close()
        for fd in fds:
            os.close(fd)


def _waiter(conn: socket.socket, request: dict, fds: list[int]) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:
        conn.close()
        _run(request, fds)
    for fd in fds:  # the run's pipes reach their end when the run ends
        os.close(fd)
    conn.send(f"pid {pid}".encode())
    _, status = os.waitpid(pid, 0)
    conn.send(f"exit {os.waitstatus_to_exitcode(status)}".encode())
    os._exit(0)


def _fresh_stdio(unbuffered: bool) -> None:
    """stdout/stderr on fds 1/2 as a new interpreter opens them on pipes: stdout block-buffered unless
    PYTHONUNBUFFERED, stderr written through."""
    raw = io.FileIO(1, "w", closefd=False)
    sys.stdout = io.TextIOWrapper(raw if unbuffered else io.BufferedWriter(raw), encoding="utf-8",
                                  write_through=unbuffered)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                                  write_through=True)


def _run(request: dict, fds: list[int]) -> None:
    import runpy
    import traceback

    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        _fresh_stdio(unbuffered=bool(os.environ.get("PYTHONUNBUFFERED")))
        sys.argv = list(request["argv"])
        sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as `python SCRIPT` sets it
        runpy.run_path(sys.argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - as the interpreter would: the traceback on stderr, exit 1
        traceback.print_exc()
    finally:
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed pipe: nothing left to say
                pass
        os._exit(code)


# ---- the tests' side ----------------------------------------------------------------------------------------------

_zygote: dict = {}


def _socket_path() -> str:
    if not _zygote or _zygote["proc"].poll() is not None:
        folder = tempfile.mkdtemp(prefix="r7z")
        path = os.path.join(folder, "s")
        env = {**os.environ, "WANDB_MODE": "disabled"}
        proc = subprocess.Popen([sys.executable, __file__, path, str(os.getpid())], stdout=subprocess.PIPE, env=env,
                                text=True)
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the test zygote did not start")
        atexit.register(shutil.rmtree, folder, True)
        atexit.register(proc.kill)
        _zygote.update(proc=proc, path=path)
    return _zygote["path"]


class Run:
    """The part of subprocess.Popen the tests use: pid, send_signal, poll, wait, communicate, stdout/stderr.
    `cmd` is a subprocess command line: the interpreter, then a script and its arguments."""

    def __init__(self, cmd: list, cwd, env: dict):
        assert cmd[0] == sys.executable and str(cmd[1]).endswith(".py"), cmd
        self.args, self.returncode = cmd, None
        self._ctl = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._ctl.connect(_socket_path())
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        stdin = os.open(os.devnull, os.O_RDONLY)
        try:
            request = {"argv": [str(a) for a in cmd[1:]], "cwd": str(cwd), "env": dict(env)}
            socket.send_fds(self._ctl, [json.dumps(request).encode()], [stdin, out_w, err_w])
        finally:
            for fd in (stdin, out_w, err_w):  # the run holds the only write ends now
                os.close(fd)
        self.stdout = open(out_r, encoding="utf-8", errors="replace")
        self.stderr = open(err_r, encoding="utf-8", errors="replace")
        self.pid = int(self._status("pid"))

    def _status(self, kind: str) -> str:
        message = self._ctl.recv(64).decode().split()
        if len(message) != 2 or message[0] != kind:
            raise RuntimeError(f"the test zygote's waiter ended without reporting the run's {kind}")
        return message[1]

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # the waiter reaps an ended run at once: its pid may no longer be ours
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._ctl.settimeout(timeout)
            try:
                self.returncode = int(self._status("exit"))
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            self._ctl.close()
        return self.returncode

    def poll(self) -> int | None:
        try:
            return self.wait(timeout=0.001)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Both streams to their end, read side by side (neither pipe fills), then the exit status; past the
        timeout the run is killed and TimeoutExpired raised, as subprocess.run does."""
        deadline = None if timeout is None else time.monotonic() + timeout
        texts: dict = {}
        readers = [threading.Thread(target=lambda n=n, f=f: texts.__setitem__(n, f.read()), daemon=True)
                   for n, f in (("out", self.stdout), ("err", self.stderr))]
        for r in readers:
            r.start()
        try:
            for r in readers:
                r.join(None if deadline is None else max(deadline - time.monotonic(), 0))
                if r.is_alive():
                    raise subprocess.TimeoutExpired(self.args, timeout)
            self.wait(None if deadline is None else max(deadline - time.monotonic(), 0.001))
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        return texts["out"], texts["err"]


def run(cmd: list, cwd, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True, timeout=timeout), through the zygote."""
    proc = Run(cmd, cwd, env)
    out, err = proc.communicate(timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
