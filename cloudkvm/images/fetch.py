"""Getting an image's bytes: http(s) downloads that resume, `file://` URLs and local paths, bounded text fetches.

A download goes to a `.part` file the caller names (the image cache names it after the URL). An interrupted
transfer resumes with an HTTP `Range` request (RFC 9110 §14.2), guarded by `If-Range` with the first response's
strong ETag or Last-Modified (§13.1.5) so a changed file is fetched afresh; a `206` must carry a `Content-Range`
starting where the part ends (§14.4), a `200` means the server sent the whole file again. Within one call a cut
transfer is resumed up to `RESUMES` times; after that the part is kept for the next call.

Everything a server controls is bounded: the size (`MAX_IMAGE_BYTES`; a larger `Content-Length` is refused before
any byte is written), every connect and read (`TIMEOUT`), the pace (like curl's `--speed-limit`: under
`LOW_SPEED_BYTES` a second for `LOW_SPEED_SECONDS`, the transfer is given up), redirects (http and https only, at
most 10). Reads are at most `CHUNK` bytes. Every failure is a one-line `CloudkvmError` naming the URL."""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import CloudkvmError, printable
from ..fsutil import atomic_write, open_regular, read_bounded

MAX_IMAGE_BYTES = 64 << 30      # the largest download or local image accepted
MAX_TEXT_BYTES = 1 << 20        # checksum files (Debian's SHA512SUMS is ~10 KiB)
TIMEOUT = 30.0                  # seconds for a connect or any one read
LOW_SPEED_BYTES = 1024          # bytes a second ...
LOW_SPEED_SECONDS = 60.0        # ... sustained over this long, or the transfer is given up
RESUMES = 3                     # resumptions of a cut transfer within one call
CHUNK = 1 << 20
MAX_REDIRECTS = 10
USER_AGENT = "cloudkvm (image fetch)"
REMOTE_SCHEMES = ("http", "https")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")


@dataclass(frozen=True)
class Source:
    """Where an image comes from: an http(s) URL, or a local file (from a `file://` URL or a path)."""

    location: str       # normalized: the URL as given, or the absolute path of a local file
    path: Path | None   # the local file, or None for a download

    @property
    def remote(self) -> bool:
        return self.path is None

    @property
    def file_name(self) -> str:
        """The last component of the URL's path or of the file's path (what checksum files list)."""
        if self.path is not None:
            return self.path.name
        return urllib.parse.unquote(urllib.parse.urlsplit(self.location).path).rsplit("/", 1)[-1]

    @property
    def key(self) -> str:
        """A file-name-safe name for this location (the partial download's and its lock's name)."""
        return hashlib.sha256(self.location.encode()).hexdigest()[:40]

    def __str__(self) -> str:
        return self.location


def parse_location(location: str, where: str = "location") -> Source:
    """An http(s) URL, a `file://` URL or a local path (absolute, relative, `~`) -> Source; others are refused."""
    text = str(location).strip()
    if not text:
        raise CloudkvmError(f"{where}: empty image location", "name an http(s) URL, a file:// URL or a path")
    scheme, sep, _ = text.partition("://")
    if not sep:
        return Source(os.path.abspath(os.path.expanduser(text)), Path(os.path.abspath(os.path.expanduser(text))))
    scheme = scheme.lower()
    parts = urllib.parse.urlsplit(text)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise CloudkvmError(f"{where}: {printable(text[:200])} names another host", "write file:///PATH")
        path = os.path.abspath(urllib.parse.unquote(parts.path))
        return Source(path, Path(path))
    if scheme not in REMOTE_SCHEMES:
        raise CloudkvmError(f"{where}: {printable(text[:200])} is not an http, https or file URL",
                            "name an http(s) URL, a file:// URL or a local path")
    if not parts.hostname:
        raise CloudkvmError(f"{where}: {printable(text[:200])} names no host", "write http(s)://HOST/PATH")
    return Source(text, None)


class _RedirectsToHttpOnly(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http and https URLs only (never ftp, file or data), at most MAX_REDIRECTS."""

    max_redirections = MAX_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in REMOTE_SCHEMES:
            raise CloudkvmError(f"{req.full_url}: redirected to {printable(newurl[:200])}, which is not an http(s) "
                                f"URL", "name the image's final http(s) URL")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_RedirectsToHttpOnly)


def _request(url: str, headers: dict[str, str] | None = None) -> urllib.request.Request:
    return urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity",
                                                **(headers or {})})


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError):
        err = err.reason if isinstance(err.reason, BaseException) else err
    if isinstance(err, (socket.timeout, TimeoutError)):
        return f"no answer within {TIMEOUT:g} s"
    if isinstance(err, socket.gaierror):
        return f"cannot resolve the host name ({err.strerror or err})"
    if isinstance(err, ssl.SSLError):
        return f"TLS failed ({err.reason or err})"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return printable(str(err))[:200] or type(err).__name__


def _open(url: str, headers: dict[str, str] | None = None):
    """The response to a GET of `url` (any status urllib does not raise for); CloudkvmError when none came."""
    try:
        return _opener().open(_request(url, headers), timeout=TIMEOUT)
    except urllib.error.HTTPError:
        raise
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as err:
        raise CloudkvmError(f"{url}: cannot download: {_reason(err)}",
                            "check the URL and the network (a proxy is taken from $https_proxy/$http_proxy)") from None


def _http_error(url: str, err: urllib.error.HTTPError) -> CloudkvmError:
    err.close()
    return CloudkvmError(f"{url}: the server answered HTTP {err.code} {printable(str(err.reason))[:80]}",
                         "check the URL (distributions move old images away)")


class _Pace:
    """curl's low-speed rule: fewer than LOW_SPEED_BYTES a second over LOW_SPEED_SECONDS ends the transfer."""

    def __init__(self):
        self.window_start, self.window_bytes = time.monotonic(), 0

    def add(self, n: int) -> None:
        self.window_bytes += n
        now = time.monotonic()
        if now - self.window_start >= LOW_SPEED_SECONDS:
            if self.window_bytes < LOW_SPEED_BYTES * (now - self.window_start):
                raise _Cut(f"slower than {LOW_SPEED_BYTES} bytes/s for {LOW_SPEED_SECONDS:g} s")
            self.window_start, self.window_bytes = now, 0


def _read_body(response, url: str, limit: int, sink) -> int:
    """Feed the response body to `sink(chunk)` (≤ CHUNK bytes at a time) until its end; bytes read.

    `_Cut` when the connection ends, times out or crawls before the announced length; CloudkvmError past `limit`."""
    pace, received = _Pace(), 0
    while True:
        try:
            chunk = response.read1(CHUNK)
        except http.client.IncompleteRead as err:
            raise _Cut(f"the connection ended after {received + len(err.partial)} bytes") from None
        except (OSError, http.client.HTTPException) as err:
            raise _Cut(_reason(err)) from None
        if not chunk:
            break
        received += len(chunk)
        if received > limit:
            raise CloudkvmError(f"{url}: more than {limit} bytes, the most cloudkvm accepts here",
                                "is this the right URL?")
        sink(chunk)
        pace.add(len(chunk))
    if response.length:  # http.client counts down what the Content-Length announced: bytes still missing
        raise _Cut(f"the connection ended {response.length} bytes early")
    return received


class _Cut(Exception):
    """A transfer that stopped before its end (resumable)."""


class _StartOver(Exception):
    """The part on disk cannot be continued: discard it and fetch from the start."""


class Progress:
    """One redrawn line on a terminal: name, percent, MiB done of total, speed. Silent when not enabled."""

    def __init__(self, label: str, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.enabled, self.label = enabled, printable(label)[:60]
        self.start, self.last_draw, self.base, self.drawn = time.monotonic(), 0.0, None, False

    def update(self, done: int, total: int | None, final: bool = False) -> None:
        """Redraw at most ten times a second (always when `final`)."""
        if not self.enabled:
            return
        now = time.monotonic()
        if self.base is None:
            self.base = done
        if not final and now - self.last_draw < 0.1:
            return
        self.last_draw = now
        speed = (done - self.base) / max(now - self.start, 1e-3) / (1 << 20)
        mib = done / (1 << 20)
        if total:
            text = f"{self.label} {100 * done // total:3d}% {mib:8.1f}/{total / (1 << 20):.1f} MiB {speed:6.1f} MiB/s"
        else:
            text = f"{self.label} {mib:8.1f} MiB {speed:6.1f} MiB/s"
        self.stream.write(f"\rcloudkvm: {text}\x1b[K")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def _meta_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _validators(part: Path, url: str) -> dict:
    """What the response that began `part` said about the file (ETag, Last-Modified), if it was this URL's."""
    try:
        meta = json.loads(read_bounded(_meta_path(part), 64 << 10))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) and meta.get("url") == url else {}


def _if_range(meta: dict) -> dict[str, str]:
    etag, modified = meta.get("etag"), meta.get("last_modified")
    if isinstance(etag, str) and etag.startswith('"'):  # a strong validator (a weak one, W/"..", may not be used)
        return {"If-Range": etag}
    if isinstance(modified, str):
        return {"If-Range": modified}
    return {}


def _open_part(part: Path) -> BinaryIO:
    fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "r+b")


def discard_part(part: Path) -> None:
    """Remove a partial download and what it recorded about its response."""
    part.unlink(missing_ok=True)
    _meta_path(part).unlink(missing_ok=True)


def download(url: str, part: Path, algorithms, *, limit: int = MAX_IMAGE_BYTES,
             progress: bool | None = None) -> tuple[int, dict[str, str]]:
    """Complete the download of `url` into `part` (resuming what it holds); (size, {algorithm: hex digest})."""
    bar = Progress(Source(url, None).file_name or url, progress)
    try:
        with _open_part(part) as f:
            hashers = _hash_existing(f, algorithms)
            cuts = 0
            while True:
                try:
                    _transfer(url, part, f, hashers, limit, bar)
                    break
                except _StartOver:
                    f.seek(0)
                    f.truncate()
                    hashers = {name: hashlib.new(name) for name in algorithms}
                    _meta_path(part).unlink(missing_ok=True)
                except _Cut as cut:
                    cuts += 1
                    if cuts > RESUMES:
                        f.flush()
                        times = f"{cuts} time{'s' if cuts > 1 else ''}"
                        raise CloudkvmError(f"{url}: the transfer stopped {times}, last: {cut} ({f.tell()} bytes "
                                            f"kept)",
                                            "run the command again: the download resumes where it stopped") from None
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
    except OSError as err:
        raise CloudkvmError(f"{part}: cannot write the download: {err.strerror or err}",
                            "free space in the cache folder, or set CLOUDKVM_CACHE to another folder") from None
    finally:
        bar.close()
    return size, {name: h.hexdigest() for name, h in hashers.items()}


def _hash_existing(f: BinaryIO, algorithms) -> dict:
    hashers = {name: hashlib.new(name) for name in algorithms}
    while chunk := f.read(CHUNK):
        for h in hashers.values():
            h.update(chunk)
    return hashers


def _transfer(url: str, part: Path, f: BinaryIO, hashers: dict, limit: int, bar: Progress) -> None:
    """One request: the rest of the file after what `f` holds (`f` is at its end), appended to `f`."""
    offset = f.tell()
    headers = {"Range": f"bytes={offset}-", **_if_range(_validators(part, url))} if offset else {}
    try:
        response = _open(url, headers)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # nothing after `offset`: complete if the file is exactly that long
            match = _UNSATISFIED_RANGE.fullmatch(err.headers.get("Content-Range", "").strip())
            err.close()
            if match and int(match[1]) == offset:
                return
            raise _StartOver() from None
        raise _http_error(url, err) from None
    with response:
        status = response.status
        if status == 206 and offset:
            match = _CONTENT_RANGE.fullmatch((response.headers.get("Content-Range") or "").strip())
            if not match or int(match[1]) != offset or int(match[2]) < offset:
                raise _StartOver()  # a range we did not ask for: fetch the whole file instead
            total = int(match[3]) if match[3] != "*" else None
        elif status == 200:
            if offset:  # the server ignored the Range (or If-Range says the file changed): start over
                f.seek(0)
                f.truncate()
                for name in list(hashers):
                    hashers[name] = hashlib.new(name)
                offset = 0
            total = response.length
            _record_validators(part, url, response)
        else:
            raise CloudkvmError(f"{url}: the server answered HTTP {status} instead of the file",
                                "check the URL")
        if total is not None and total > limit:
            raise CloudkvmError(f"{url}: the server announces {total} bytes, more than the {limit} cloudkvm accepts",
                                "is this the image's URL?")
        done = [offset]

        def sink(chunk: bytes) -> None:
            f.write(chunk)
            for h in hashers.values():
                h.update(chunk)
            done[0] += len(chunk)
            bar.update(done[0], total)

        _read_body(response, url, limit - offset, sink)
        bar.update(done[0], total, final=True)
        if total is not None and done[0] != total:
            raise _Cut(f"got {done[0]} of {total} bytes")


def _record_validators(part: Path, url: str, response) -> None:
    meta = {"url": url, "etag": response.headers.get("ETag"), "last_modified": response.headers.get("Last-Modified")}
    atomic_write(_meta_path(part), json.dumps(meta).encode(), mode=0o600)


def fetch_text(location: str, limit: int = MAX_TEXT_BYTES) -> str:
    """A small text file (a SHA256SUMS) from an http(s) URL, a file:// URL or a path; at most `limit` bytes."""
    source = parse_location(location, "checksum file")
    if source.path is not None:
        try:
            data = read_bounded(source.path, limit, follow_symlinks=True)
        except OSError as err:
            hint = "check the path" if isinstance(err, FileNotFoundError) else \
                f"a checksum file is a regular file of at most {limit} bytes"
            raise CloudkvmError(f"{source.path}: cannot read the checksum file: {err.strerror or err}", hint) from None
        return data.decode("utf-8", "replace")
    try:
        response = _open(source.location)
    except urllib.error.HTTPError as err:
        raise _http_error(source.location, err) from None
    chunks: list[bytes] = []
    with response:
        if response.length is not None and response.length > limit:
            raise CloudkvmError(f"{source.location}: {response.length} bytes, more than the {limit} a checksum file "
                                f"may have", "is this the SHA256SUMS file's URL?")
        try:
            _read_body(response, source.location, limit, chunks.append)
        except _Cut as cut:
            raise CloudkvmError(f"{source.location}: the transfer stopped: {cut}", "try again") from None
    return b"".join(chunks).decode("utf-8", "replace")


class HashingReader:
    """A binary reader that hashes what passes through it (a local image is hashed while it is copied)."""

    def __init__(self, f: BinaryIO, algorithms):
        self.f = f
        self.hashers = {name: hashlib.new(name) for name in algorithms}
        self.count = 0

    def read(self, n: int = CHUNK) -> bytes:
        data = self.f.read(n if n is not None and n >= 0 else CHUNK)
        for h in self.hashers.values():
            h.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        """Read (and hash) to the end: what a decompressor left unread is part of the file too."""
        while self.read(CHUNK):
            pass

    def hexdigests(self) -> dict[str, str]:
        return {name: h.hexdigest() for name, h in self.hashers.items()}


def open_local(path: Path, limit: int = MAX_IMAGE_BYTES) -> tuple[BinaryIO, int]:
    """A local image file opened for reading (a regular file, symlinks followed) and its size."""
    try:
        f = open_regular(path, follow_symlinks=True)
    except FileNotFoundError:
        raise CloudkvmError(f"{path}: no such image file", "check the path (relative paths are from the current "
                                                            "folder)") from None
    except OSError as err:
        raise CloudkvmError(f"{path}: cannot read the image: {err.strerror or err}",
                            "name a regular, readable image file") from None
    size = os.fstat(f.fileno()).st_size
    if size > limit:
        f.close()
        raise CloudkvmError(f"{path}: {size} bytes, more than the {limit} cloudkvm accepts", "is this an image?")
    return f, size
