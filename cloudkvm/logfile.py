"""Log files a VM writes (serial console, VMM log): private, never through a symlink, and bounded in size."""
from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import CloudkvmError
from .fsutil import open_regular

CONSOLE_LOG_LIMIT = 64 << 20  # bytes before console.log is rotated to console.log.1 (one old file kept)


def open_log(path) -> int:
    """An append fd on `path`, created 0600 (an existing file is made 0600), refusing a symlink, FIFO or device."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o600)
    except OSError as err:
        why = "it is a symlink" if err.errno == errno.ELOOP else (err.strerror or str(err))
        raise CloudkvmError(f"{path}: cannot open the log file: {why}",
                            "name a regular file in a folder you own") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CloudkvmError(f"{path}: the log file is not a regular file", "name a regular file")
    os.set_blocking(fd, True)
    os.fchmod(fd, 0o600)
    return fd


class CappedLog:
    """An append-only log file that starts over at `limit` bytes, keeping the previous one as NAME.1."""

    def __init__(self, path, limit: int = CONSOLE_LOG_LIMIT):
        self.path = Path(path)
        self.limit = limit
        self.fd: int | None = open_log(self.path)
        self.size = os.fstat(self.fd).st_size

    def write(self, data: bytes) -> None:
        if self.fd is None:
            return
        if self.size and self.size + len(data) > self.limit:
            self._rotate()
            if self.fd is None:
                return
        try:
            os.write(self.fd, data)
        except OSError as err:
            logging.warning("%s: console logging stopped: %s", self.path, err.strerror or err)
            self.close()
            return
        self.size += len(data)

    def _rotate(self) -> None:
        self.close()
        try:
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            self.fd = open_log(self.path)
            self.size = 0
        except (OSError, CloudkvmError) as err:
            logging.warning("%s: console logging stopped, cannot rotate: %s", self.path, err)

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


def follow(path, running: Callable[[], bool], interval: float = 0.2) -> Iterator[bytes]:
    """The log at `path` from its start, then, while `running()`, what is appended to it, across rotations
    (CappedLog renames it to NAME.1 and starts a new file: reopened by name, as `tail -F` does). Raises OSError
    at once when `path` is not a regular file (open_regular)."""
    return _following(path, open_regular(path), running, interval)


def _following(path, log, running: Callable[[], bool], interval: float) -> Iterator[bytes]:
    try:
        while True:
            if data := log.read():
                yield data
                continue
            if not running():
                return
            if _replaced(path, log.fileno()):
                if data := log.read():  # written to the old file just before it was renamed
                    yield data
                try:
                    fresh = open_regular(path)
                except OSError:  # between the rename and the new file's creation
                    time.sleep(interval)
                    continue
                log.close()
                log = fresh
                continue
            time.sleep(interval)
    finally:
        log.close()


def _replaced(path, fd: int) -> bool:
    """Whether `path` now names another file than the one open on `fd` (renamed away, or gone)."""
    try:
        now = os.stat(path, follow_symlinks=False)
    except OSError:
        return True
    was = os.fstat(fd)
    return (now.st_dev, now.st_ino) != (was.st_dev, was.st_ino)
