"""Vectored disk I/O: a request's bytes go straight between the image file and the caller's buffers (for virtio-blk,
views of guest RAM) by preadv(2)/pwritev(2), one system call for many buffers, no copy through Python bytes.

A disk offers `preadv(buffers, offset)` / `pwritev(buffers, offset)` (buffers: writable / readable byte
memoryviews, filled or written in order); `read_into` / `write_from` use them when a disk has them and fall back to
`pread` / `pwrite` otherwise (any object with the plain Disk protocol)."""
from __future__ import annotations

import errno
import os

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


class Cursor:
    """Consecutive byte ranges of a list of buffers: `take(n)` returns views of the next `n` bytes."""

    def __init__(self, buffers: list[memoryview]):
        self._buffers, self._index, self._pos = buffers, 0, 0
        self.remaining = total(buffers)

    def take(self, n: int) -> list[memoryview]:
        if n > self.remaining:
            raise ValueError(f"{n} bytes asked of {self.remaining} left")
        if n == self.remaining and self._index == 0 and self._pos == 0:  # all of it, as most requests are
            self.remaining = 0
            self._index = len(self._buffers)
            return self._buffers
        self.remaining -= n
        out = []
        buffers = self._buffers
        while n > 0:
            buf = buffers[self._index]
            left = len(buf) - self._pos
            if left > n:
                out.append(buf[self._pos:self._pos + n])
                self._pos += n
                return out
            out.append(buf[self._pos:] if self._pos else buf)
            n -= left
            self._index += 1
            self._pos = 0
        return out


def total(buffers: list[memoryview]) -> int:
    return sum(len(b) for b in buffers)


def preadv_full(fd: int, buffers: list[memoryview], offset: int) -> None:
    """Fill `buffers` from `fd` at `offset`, retrying short reads; bytes past the end of the file read as zeros
    (as `pread_full`)."""
    pending = [b for b in buffers if len(b)]
    while pending:
        batch = pending[:IOV_MAX]
        got = os.preadv(fd, batch, offset)
        if got == total(batch):
            pending = pending[IOV_MAX:]
            offset += got
            continue
        if got == 0:  # end of file: the rest is zeros
            zero_fill(pending)
            return
        rest = Cursor(pending)
        rest.take(got)
        pending = rest.take(total(pending) - got)
        offset += got


def pwritev_full(fd: int, buffers: list[memoryview], offset: int) -> None:
    """Write `buffers` to `fd` at `offset` whole, retrying short writes."""
    pending = [b for b in buffers if len(b)]
    while pending:
        batch = pending[:IOV_MAX]
        done = os.pwritev(fd, batch, offset)
        if done <= 0:  # pragma: no cover - pwritev never returns 0 for regular files
            raise OSError(errno.EIO, "short write")
        rest = Cursor(pending)
        rest.take(done)
        pending = rest.take(total(pending) - done)
        offset += done


def zero_fill(buffers: list[memoryview]) -> None:
    for b in buffers:
        b[:] = bytes(len(b))


def scatter(data, buffers: list[memoryview]) -> None:
    """Copy `data` (exactly the buffers' total length) into `buffers`."""
    view, pos = memoryview(data), 0
    for b in buffers:
        b[:] = view[pos:pos + len(b)]
        pos += len(b)


def read_into(disk, buffers: list[memoryview], offset: int) -> None:
    """Fill `buffers` with the disk's bytes at `offset` (its `preadv`, or `pread` and a copy)."""
    if hasattr(disk, "preadv"):
        disk.preadv(buffers, offset)
        return
    n = total(buffers)
    data = disk.pread(n, offset)
    if len(data) != n:
        raise OSError(errno.EIO, f"short read: {len(data)} of {n} bytes at {offset}")
    scatter(data, buffers)


def write_from(disk, buffers: list[memoryview], offset: int) -> None:
    """Write `buffers` to the disk at `offset` (its `pwritev`, or `pwrite` of each buffer in turn)."""
    if hasattr(disk, "pwritev"):
        disk.pwritev(buffers, offset)
        return
    for b in buffers:
        disk.pwrite(b, offset)
        offset += len(b)
