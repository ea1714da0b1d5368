"""Raw disk images: the virtual disk is the file, byte for byte.

pread/pwrite are os.pread/os.pwrite; flush is fdatasync; discard punches a hole (fallocate PUNCH_HOLE|KEEP_SIZE,
skipped where the file system cannot); write_zeroes uses fallocate ZERO_RANGE (or PUNCH_HOLE when unmapping is
allowed: holes read as zeros), falling back to writing zeros. Block devices work too (their size comes from seeking to the end).
"""
from __future__ import annotations

import os
import stat
import threading
from contextlib import contextmanager, nullcontext

from ..errors import CloudkvmError
from .backing import open_image
from .placement import Place
from .probe import PROBE_BYTES, write_keeps_raw
from . import vectored
from ._util import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, check_range, fallocate,
                    lock_image, pread_full, pwrite_full)
from .errors import FormatChangeRefused, ReadOnlyDisk

_ZERO_CHUNK = 1 << 20
_UNGUARDED = nullcontext()


class RawDisk:
    format = "raw"

    def __init__(self, path: str | os.PathLike, read_only: bool = False, *, devices: bool = True,
                 keep_raw: bool = False):
        """`devices`: a block device is acceptable; `keep_raw`: the format was probed, so refuse writes that would
        make the image probe as another format (see probe.py)."""
        self.path = os.fspath(path)
        self.read_only = read_only
        fd, st = open_image(self.path, read_only, devices)
        try:
            self._is_block = stat.S_ISBLK(st.st_mode)
            self.size = os.lseek(fd, 0, os.SEEK_END) if self._is_block else st.st_size
            lock_image(fd, self.path, read_only)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._lock = threading.Lock()
        self._can_punch = True
        self._can_zero_range = True
        self.keep_raw = keep_raw
        self._first_sector_lock = threading.Lock()

    def _first_sector(self, data, offset: int):
        """The context around a write of `data` at `offset`: it refuses a write that would turn a probed raw image
        into another format for the next probe (a no-op context for every other write)."""
        return self._guarded(data, offset) if self.keep_raw and offset < PROBE_BYTES else _UNGUARDED

    @contextmanager
    def _guarded(self, data, offset: int):
        """Check and write under one lock, so two writes that each keep the image raw cannot together assemble a
        signature."""
        with self._first_sector_lock:
            head = pread_full(self._fd, min(PROBE_BYTES, self.size), 0)
            if not write_keeps_raw(head, data, offset):
                raise FormatChangeRefused(f"{self.path}: refused a write to the first sector that would make this "
                                          f"probed raw image look like another format (set format: raw to allow)")
            yield

    # -- the Disk protocol -------------------------------------------------------------------------------------
    def pread(self, length: int, offset: int) -> bytes:
        check_range(self, length, offset)
        return pread_full(self._fd, length, offset)

    def pwrite(self, data, offset: int) -> None:
        if self.read_only:
            raise ReadOnlyDisk(f"{self.path}: disk opened read-only")
        check_range(self, memoryview(data).nbytes, offset)
        with self._first_sector(data, offset):
            pwrite_full(self._fd, data, offset)

    def preadv(self, buffers: list, offset: int) -> None:
        check_range(self, vectored.total(buffers), offset)
        vectored.preadv_full(self._fd, buffers, offset)

    def pwritev(self, buffers: list, offset: int) -> None:
        if self.read_only:
            raise ReadOnlyDisk(f"{self.path}: disk opened read-only")
        check_range(self, vectored.total(buffers), offset)
        if self.keep_raw and offset < PROBE_BYTES:  # the first-sector guard looks at the bytes: one buffer
            self.pwrite(b"".join(buffers), offset)
            return
        vectored.pwritev_full(self._fd, buffers, offset)

    def runs(self, offset: int, length: int) -> list:
        """storage/placement.py: the file itself, the probed first sector's part apart (not writable in place)."""
        end = offset + length
        if length <= 0:
            return []
        if offset < 0 or end > self.size or self._fd < 0:
            return [(offset, length, None)]
        cut = min(max(offset, PROBE_BYTES if self.keep_raw else 0), end)
        pieces = [(offset, cut - offset, False), (cut, end - cut, not self.read_only)]
        return [(start, n, Place(self._fd, start, writable)) for start, n, writable in pieces if n]

    def flush(self) -> None:
        if not self.read_only:
            os.fdatasync(self._fd)

    def discard(self, length: int, offset: int) -> None:
        if self.read_only:
            raise ReadOnlyDisk(f"{self.path}: disk opened read-only")
        check_range(self, length, offset)
        if self._can_punch and not self._is_block:
            with self._first_sector(bytes(min(length, PROBE_BYTES)), offset), self._lock:
                self._can_punch = fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    write_zeroes_may_unmap = True  # write_zeroes(..., unmap=True) may punch a hole

    def write_zeroes(self, length: int, offset: int, unmap: bool = False) -> None:
        """Make the range read as zeros: fallocate ZERO_RANGE (keeps the blocks allocated), or with `unmap`
        PUNCH_HOLE first; writing zeros where the file system supports neither."""
        if self.read_only:
            raise ReadOnlyDisk(f"{self.path}: disk opened read-only")
        check_range(self, length, offset)
        if length == 0:
            return
        with self._first_sector(bytes(min(length, PROBE_BYTES)), offset):
            self._zero(length, offset, unmap)

    def _zero(self, length: int, offset: int, unmap: bool) -> None:
        if not self._is_block:
            with self._lock:
                if unmap and self._can_punch:
                    self._can_punch = fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                                offset, length)
                    if self._can_punch:
                        return
                if self._can_zero_range:
                    self._can_zero_range = fallocate(self._fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                                                      offset, length)
                    if self._can_zero_range:
                        return
        zeros = bytes(min(length, _ZERO_CHUNK))
        end = offset + length
        while offset < end:
            n = min(len(zeros), end - offset)
            pwrite_full(self._fd, zeros[:n] if n < len(zeros) else zeros, offset)
            offset += n

    def grow(self, new_size: int) -> None:
        """Make the virtual disk `new_size` bytes (growing only; the new space reads as zeros)."""
        if self.read_only:
            raise ReadOnlyDisk(f"{self.path}: disk opened read-only")
        if new_size < self.size:
            raise CloudkvmError(f"{self.path}: cannot shrink the disk from {self.size} to {new_size} bytes",
                                "only growing is supported")
        if self._is_block:
            raise CloudkvmError(f"{self.path}: cannot resize a block device", "resize the device itself")
        with self._lock:
            os.ftruncate(self._fd, new_size)
            self.size = new_size

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            try:
                if not self.read_only:
                    os.fdatasync(fd)
            finally:
                os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RawDisk({self.path!r}, size={self.size}, read_only={self.read_only})"
