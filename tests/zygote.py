"""`python entrypoint.py ARGS` for the tests, without paying torch's and Lightning's imports (~5 s) every time.

A zygote process imports the training stack once, then forks a fresh process for every run a test asks for. The
run is a real process of its own: its own pid (a test sends it SIGKILL, SIGTERM or SIGINT), its own exit status (a
signal's death is -signum, as with subprocess), stdout and stderr on pipes, and it executes entrypoint.py as
`__main__` with the test's argv, environment and working directory. What differs from a fresh interpreter is only
what happened before the fork: the imports (and what they read from the environment at import time: nothing of
ours). Tests of start-up itself (a signal while Python imports, the exit of the interpreter) keep using real
subprocesses.

    p = zygote.run([sys.executable, "entrypoint.py", "train", ...], cwd=ROOT, env=env)    # like subprocess.run
    p = zygote.Run(cmd, cwd=ROOT, env=env); p.send_signal(...); out, err = p.communicate()  # like Popen

The zygote answers on a Unix socket. For each request it forks a waiter, which forks the run and reports its pid,
then its exit status; the test side's `Run` reads both. One zygote per pytest process, started on first use.
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRELOAD = ("rwkv7.cli", "rwkv7.commands.train", "rwkv7.train.run", "rwkv7.trajectory")


# ---- the zygote ---------------------------------------------------------------------------------------------------

def serve(path: str) -> None:
    import importlib

    sys.path.insert(0, str(ROOT))
    from rwkv7.signals import die_with_parent

    from rwkv7 import quiet

    die_with_parent(os.getppid())  # the zygote ends with the pytest process that started it
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


def _run(request: dict, fds: list[int]) -> None:
    import runpy
    import traceback

    code = 1
    try:
        if request["new_session"]:
            os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        if os.environ.get("PYTHONUNBUFFERED"):
            sys.stdout.reconfigure(write_through=True)
        sys.argv = list(request["argv"])
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
        proc = subprocess.Popen([sys.executable, __file__, path], stdout=subprocess.PIPE, env=env, text=True)
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the test zygote did not start")
        atexit.register(proc.kill)
        _zygote.update(proc=proc, path=path)
    return _zygote["path"]


class Run:
    """The part of subprocess.Popen the tests use: pid, send_signal, poll, wait, communicate, stdout/stderr.
    `cmd` is a subprocess command line: the interpreter, then entrypoint.py and its arguments."""

    def __init__(self, cmd: list, cwd, env: dict, new_session: bool = False):
        assert cmd[0] == sys.executable and str(cmd[1]).endswith(".py"), cmd
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        stdin = os.open(os.devnull, os.O_RDONLY)
        self._ctl = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._ctl.connect(_socket_path())
        request = {"argv": [str(a) for a in cmd[1:]], "cwd": str(cwd), "env": dict(env), "new_session": new_session}
        socket.send_fds(self._ctl, [json.dumps(request).encode()], [stdin, out_w, err_w])
        for fd in (stdin, out_w, err_w):
            os.close(fd)
        self.args = cmd
        self.stdout = open(out_r, encoding="utf-8", errors="replace")
        self.stderr = open(err_r, encoding="utf-8", errors="replace")
        self.pid = int(self._ctl.recv(64).split()[1])
        self.returncode: int | None = None

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._ctl.settimeout(timeout)
            try:
                message = self._ctl.recv(64)
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            self.returncode = int(message.split()[1])
            self._ctl.close()
        return self.returncode

    def poll(self) -> int | None:
        try:
            return self.wait(timeout=0.001)
        except subprocess.TimeoutExpired:
            return None

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Both streams to their end, read side by side (neither pipe fills), then the exit status."""
        texts: dict = {}
        readers = [threading.Thread(target=lambda n=n, f=f: texts.__setitem__(n, f.read()), daemon=True)
                   for n, f in (("out", self.stdout), ("err", self.stderr))]
        for r in readers:
            r.start()
        for r in readers:
            r.join(timeout)
            if r.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.stdout.close()
        self.stderr.close()
        self.wait(timeout)
        return texts["out"], texts["err"]


def run(cmd: list, cwd, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True, timeout=timeout), through the zygote."""
    proc = Run(cmd, cwd, env)
    out, err = proc.communicate(timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


if __name__ == "__main__":
    serve(sys.argv[1])
