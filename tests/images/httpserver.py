"""A local HTTP server for image-download tests: serves a folder on 127.0.0.1 (an ephemeral port) from a thread.

Switches (attributes; change them any time):
- `ranges`: answer `Range: bytes=N-` / `bytes=N-M` with 206 and `Content-Range` (True), or ignore it with 200.
- `cut_at`, `cut_times`: the next `cut_times` file answers announce the full Content-Length but end the connection
  after `cut_at` body bytes (a transfer cut in the middle; `cut_times` counts down to 0).
- `content_range_shift`: add this to the start a 206 announces (a server answering a range it was not asked for).
- `delay`: seconds to sleep before each body piece of `piece` bytes (a slow server).
- `redirects`: {path: Location} answered with 302.
- `endless`: {path: announced Content-Length or None}: an endless body of zeros (a server streaming forever).
- `etag`: send a strong ETag ("size-mtime"); `If-Range` with another value gets the whole file (200).
Counters: `requests` (one dict per request: path, range, if_range, status, sent), `bytes_sent` (body bytes, all
requests). `python3 tests/images/httpserver.py FOLDER` serves FOLDER until interrupted and prints its URL."""
from __future__ import annotations

import os
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format, *args):  # quiet: tests read the counters instead
        pass

    def do_GET(self):
        owner = self.server.owner
        record = {"path": self.path, "range": self.headers.get("Range"), "if_range": self.headers.get("If-Range"),
                  "status": None, "sent": 0}
        with owner.lock:
            owner.requests.append(record)
        self.close_connection = True
        path = unquote(urlsplit(self.path).path)
        if path in owner.redirects:
            return self._answer(record, 302, {"Location": owner.redirects[path], "Content-Length": "0"})
        if path in owner.endless:
            length = owner.endless[path]
            headers = {"Content-Length": str(length)} if length is not None else {}
            self._answer(record, 200, headers)
            return self._send(record, None, 0, None)
        file = (owner.root / path.lstrip("/")).resolve()
        if not file.is_file() or not file.is_relative_to(owner.root):
            return self._answer(record, 404, {"Content-Length": "0"})
        size = file.stat().st_size
        etag = f'"{size}-{file.stat().st_mtime_ns}"'
        start, end, status = 0, size - 1, 200
        wanted = _RANGE.fullmatch(self.headers.get("Range", "").strip())
        if_range = self.headers.get("If-Range")
        if wanted and owner.ranges and (if_range is None or not owner.etag or if_range == etag):
            start = int(wanted[1])
            end = min(int(wanted[2]), size - 1) if wanted[2] else size - 1
            if start >= size:
                return self._answer(record, 416, {"Content-Range": f"bytes */{size}", "Content-Length": "0"})
            status = 206
        headers = {"Content-Length": str(end - start + 1), "Content-Type": "application/octet-stream"}
        if owner.etag:
            headers["ETag"] = etag
        if status == 206:
            headers["Content-Range"] = f"bytes {start + owner.content_range_shift}-{end}/{size}"
        self._answer(record, status, headers)
        cut = None
        with owner.lock:
            if owner.cut_times > 0 and owner.cut_at is not None:
                owner.cut_times -= 1
                cut = owner.cut_at
        self._send(record, file, start, end - start + 1 if cut is None else min(cut, end - start + 1))

    def _answer(self, record, status, headers):
        record["status"] = status
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.end_headers()

    def _send(self, record, file, start, count):
        """`count` bytes of `file` from `start` (zeros forever for `file` None and `count` None)."""
        owner = self.server.owner
        f = open(file, "rb") if file else None
        try:
            if f:
                f.seek(start)
            left = count
            while left is None or left > 0:
                piece = owner.piece if left is None else min(owner.piece, left)
                data = f.read(piece) if f else bytes(piece)
                if not data:
                    break
                if owner.delay:
                    time.sleep(owner.delay)
                try:
                    self.wfile.write(data)
                    self.wfile.flush()
                except OSError:
                    break
                with owner.lock:
                    record["sent"] += len(data)
                    owner.bytes_sent += len(data)
                if left is not None:
                    left -= len(data)
        finally:
            if f:
                f.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: "HttpServer"


class HttpServer:
    """`with HttpServer(folder) as server: server.url("a.qcow2")` — serves `folder` until the block ends."""

    def __init__(self, root, *, ranges: bool = True, etag: bool = True):
        self.root = Path(root).resolve()
        self.ranges, self.etag = ranges, etag
        self.cut_at: int | None = None
        self.cut_times = 0
        self.content_range_shift = 0
        self.delay = 0.0
        self.piece = 64 << 10
        self.redirects: dict[str, str] = {}
        self.endless: dict[str, int | None] = {}
        self.requests: list[dict] = []
        self.bytes_sent = 0
        self.lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def cut_next(self, at: int, times: int = 1) -> None:
        """The next `times` file answers end after `at` body bytes."""
        with self.lock:
            self.cut_at, self.cut_times = at, times

    def reset_counters(self) -> None:
        with self.lock:
            self.requests.clear()
            self.bytes_sent = 0

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, name: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{name.lstrip('/')}"

    def start(self) -> "HttpServer":
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="test-http",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None

    def __enter__(self) -> "HttpServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    folder = sys.argv[1] if len(sys.argv) > 1 else os.getcwd()
    with HttpServer(folder) as running:
        print(running.url(), flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
