"""A loopback stand-in for the Hugging Face Hub's file endpoint, for tests without network.

Answers what huggingface_hub (checked with 2.4.0; the resolve protocol is the same since 0.2x) asks when it
downloads one file of a dataset repo:

- HEAD /datasets/{org}/{name}/resolve/{revision}/{path}: 200 with X-Repo-Commit (40 hex), a quoted ETag (the file's
  sha256, as the Hub gives for LFS files), Content-Length, Accept-Ranges; no X-Xet-* headers, so the client uses
  plain HTTP GET instead of the Xet protocol.
- GET of the same URL, honouring `Range: bytes=N-` (206 + Content-Range).
- 404 + X-Error-Code EntryNotFound (with X-Repo-Commit) for a missing file, RevisionNotFound for an unknown
  revision, 401 + RepoNotFound for an unknown repo (as the Hub answers anonymous requests).

Fault injection: `cut_gets=K, cut_after=N` (optionally `cut_file`) makes the next K GETs send the headers and only N body bytes, then
drop the connection. `serve_bytes={path: data}` serves other bytes than the ones the ETag describes (corruption).
Binds 127.0.0.1 on a free port, serves on daemon threads, and stops itself on `stop()`, on leaving `with`, or
after `lifetime_s` at the latest.
"""
from __future__ import annotations

import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubServer:
    def __init__(self, files: dict[str, bytes], repo: str = "org/tiny-tokenized", commit: str = COMMIT,
                 lifetime_s: float = 120.0):
        self.files = dict(files)
        self.repo = repo
        self.commit = commit
        self.serve_bytes: dict[str, bytes] = {}
        self.cut_gets = 0
        self.cut_after = 0
        self.cut_file: str | None = None  # None: any file
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, headers)
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def do_HEAD(self):
                server._handle(self, head=True)

            def do_GET(self):
                server._handle(self, head=False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True
        self._stopped = False

    # -- lifecycle
    def start(self) -> "HubServer":
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        with self.lock:
            if self._stopped:
                return
            self._stopped = True
        self._timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- inspection
    def count(self, method: str, path: str | None = None) -> int:
        with self.lock:
            return sum(1 for m, p, _ in self.requests if m == method and (path is None or p.endswith("/" + path)))

    def headers_of(self, method: str) -> list[dict]:
        with self.lock:
            return [h for m, _, h in self.requests if m == method]

    @staticmethod
    def etag_of(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    # -- protocol
    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        method = "HEAD" if head else "GET"
        path = unquote(urlsplit(h.path).path)
        with self.lock:
            self.requests.append((method, path, {k.lower(): v for k, v in h.headers.items()}))
        prefix = "/datasets/"
        parts = path[len(prefix):].split("/", 4) if path.startswith(prefix) else []
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(h, 404, None, "not a resolve URL")
        repo, revision, file = f"{parts[0]}/{parts[1]}", parts[3], parts[4]
        if repo != self.repo:
            return self._error(h, 401, "RepoNotFound", "Repository not found")
        if revision not in ("main", self.commit):
            return self._error(h, 404, "RevisionNotFound", "Invalid rev id")
        if file not in self.files:
            return self._error(h, 404, "EntryNotFound", "Entry not found", commit=True)
        described = self.files[file]
        data = self.serve_bytes.get(file, described)
        total = len(data)
        start = 0
        rng = h.headers.get("Range")
        if not head and rng and rng.startswith("bytes="):
            first, _, last = rng[len("bytes="):].partition("-")
            start = int(first or 0)
            end = int(last) if last else total - 1
        else:
            end = total - 1
        status = 206 if (not head and rng) else 200
        body = data[start:end + 1]
        h.send_response(status)
        h.send_header("X-Repo-Commit", self.commit)
        h.send_header("ETag", f'"{self.etag_of(described)}"')
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(body) if not head else total))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{total}")
        h.end_headers()
        if head:
            return
        with self.lock:
            cut = self.cut_gets > 0 and self.cut_file in (None, file)
            if cut:
                self.cut_gets -= 1
        if cut:
            h.wfile.write(body[:self.cut_after])
            h.wfile.flush()
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        h.wfile.write(body)

    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str | None, msg: str, commit: bool = False):
        body = ('{"error": "%s"}' % msg).encode()
        h.send_response(status)
        if code:
            h.send_header("X-Error-Code", code)
            h.send_header("X-Error-Message", msg)
        if commit:
            h.send_header("X-Repo-Commit", self.commit)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)
