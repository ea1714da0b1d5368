"""Small helpers shared by the backends: range checks, full pread/pwrite, fallocate, image locks."""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os

from ..errors import CloudkvmError
from . import locks
from .errors import OutOfRange

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV}

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _fallocate = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
except OSError:  # pragma: no cover - no libc symbols (not Linux)
    _fallocate = None
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2); False when the file system or kernel does not support `mode`, OSError on real errors."""
    if _fallocate is None or length <= 0:
        return False
    if _fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err))


def check_range(disk, length: int, offset: int) -> None:
    if offset < 0 or length < 0 or offset + length > disk.size:
        raise OutOfRange(f"{disk.path}: request [{offset:#x}, +{length:#x}) outside the virtual disk "
                         f"(size {disk.size:#x})")


def pread_full(fd: int, length: int, offset: int) -> bytes:
    """os.pread that retries short reads and pads with zeros past the end of the file."""
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            parts.append(bytes(length - got))
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def pwrite_full(fd: int, data, offset: int) -> None:
    n = os.pwrite(fd, data, offset)
    if n == len(data):
        return
    view = memoryview(data).cast("B")
    while n < len(view):
        w = os.pwrite(fd, view[n:], offset + n)
        if w <= 0:  # pragma: no cover - pwrite never returns 0 for regular files
            raise OSError(errno.EIO, "short write")
        n += w


def lock_image(fd: int, path: str, read_only: bool) -> None:
    """Lock the image against other users: flock (shared for readers, exclusive for a writer) against other
    cloudkvm processes, and QEMU's own byte-range locks (storage/locks.py) so that QEMU and qemu-img refuse an
    image cloudkvm writes, and cloudkvm one they write. Both go away when `fd` is closed."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        raise CloudkvmError(f"{path}: the disk image is in use by another cloudkvm process",
                            "stop the VM or program using it first "
                            "(readers share an image; a writer needs it alone)") from None
    except OSError:  # file systems without flock: run unlocked
        pass
    locks.lock(fd, path, writer=not read_only)
