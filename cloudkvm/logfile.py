"""Log files a VM writes (serial console, VMM log): private, never through a symlink, and bounded in size."""
from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

from .errors import CloudkvmError

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
