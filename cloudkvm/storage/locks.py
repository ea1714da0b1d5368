"""QEMU-compatible image locks: QEMU's file-posix permission bytes (QEMU docs/system/qemu-block-drivers "Disk image
file locking"; block/file-posix.c RAW_LOCK_PERM_BASE/RAW_LOCK_SHARED_BASE; include/block/block-common.h BLK_PERM_*),
taken as Linux open-file-description locks (fcntl(2) F_OFD_SETLK/F_OFD_GETLK, Linux >= 3.15).

The scheme: every user of an image holds a shared (read) lock on byte PERM_BASE + i for each permission bit i it
holds, and on byte SHARED_BASE + i for each permission bit it does not let others hold. A new user conflicts when
someone else locks SHARED_BASE + i for a permission i it wants, or PERM_BASE + i for a permission i it refuses to
share; it finds out by asking whether an exclusive lock on that byte could be taken (F_OFD_GETLK). Locks belong to
the open file description, so they go away with the last descriptor of it: closing the image releases them.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct

from ..errors import CloudkvmError

# block/file-posix.c: "Posix file locking bytes. Libvirt takes byte 0, we start from higher bytes"
PERM_BASE = 100    # byte PERM_BASE + i: this user holds permission bit i
SHARED_BASE = 200  # byte SHARED_BASE + i: this user does not share permission bit i
# include/block/block-common.h, enum BLK_PERM_*
CONSISTENT_READ = 0x01
WRITE = 0x02
WRITE_UNCHANGED = 0x04
RESIZE = 0x08
PERM_NAMES = {CONSISTENT_READ: "consistent read", WRITE: "write", WRITE_UNCHANGED: "write unchanged",
              RESIZE: "resize"}
ALL_PERMS = CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE

# What QEMU's qcow2 driver asks of the image file (block.c bdrv_default_perms_for_storage: metadata children are
# read consistently and never shared for write or resize; a writable one also writes and resizes). The same for
# raw images: a disk the VM writes must not be written or resized by anyone else, nor one it reads.
WRITER = (CONSISTENT_READ | WRITE | RESIZE, WRITE | RESIZE)  # (held, not shared)
READER = (CONSISTENT_READ, WRITE | RESIZE)

F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)  # <asm-generic/fcntl.h>
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = struct.Struct("hhqqi0q")  # struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid, padding


class LocksUnsupported(Exception):
    """The file system (or kernel) has no OFD locks; the image is used unlocked."""


def _fcntl(fd: int, cmd: int, l_type: int, offset: int) -> int:
    """One fcntl on the single byte at `offset`; the l_type the kernel answers (F_OFD_GETLK: F_UNLCK = free)."""
    try:
        out = fcntl.fcntl(fd, cmd, _FLOCK.pack(l_type, os.SEEK_SET, offset, 1, 0))
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES):
            raise BlockingIOError(err.errno, err.strerror) from None
        raise LocksUnsupported(err.strerror) from None  # ENOLCK, EINVAL, EOPNOTSUPP, ...: no OFD locks here
    return _FLOCK.unpack(out)[0]


def _bits(mask: int):
    return [1 << i for i in range(ALL_PERMS.bit_length()) if mask & (1 << i)]


def _conflict(fd: int, held: int, unshared: int) -> str | None:
    """What another user of the file holds that clashes with holding `held` and not sharing `unshared`, in words;
    None when nothing does. Our own locks (this open file description's) never count."""
    for bit in _bits(unshared):
        if _fcntl(fd, F_OFD_GETLK, fcntl.F_WRLCK, PERM_BASE + bit.bit_length() - 1) != fcntl.F_UNLCK:
            return f"another program has it open with the \"{PERM_NAMES[bit]}\" permission"
    for bit in _bits(held):
        if _fcntl(fd, F_OFD_GETLK, fcntl.F_WRLCK, SHARED_BASE + bit.bit_length() - 1) != fcntl.F_UNLCK:
            return f"another program has it open and does not share the \"{PERM_NAMES[bit]}\" permission"
    return None


def _lock_bytes(fd: int, held: int, unshared: int, l_type: int) -> None:
    for base, mask in ((PERM_BASE, held), (SHARED_BASE, unshared)):
        for bit in _bits(mask):
            _fcntl(fd, F_OFD_SETLK, l_type, base + bit.bit_length() - 1)


def lock(fd: int, path: str, writer: bool) -> None:
    """Take QEMU's locks for a writer or a reader of the image open (readable) on `fd`, then check that no other
    program's locks clash (taking first, then checking, so two programs racing cannot both win). A clash is a
    CloudkvmError naming `path`, with the bytes released again; a file system without OFD locks runs unlocked."""
    held, unshared = WRITER if writer else READER
    try:
        try:
            _lock_bytes(fd, held, unshared, fcntl.F_RDLCK)
            clash = _conflict(fd, held, unshared)
        except BlockingIOError:  # EAGAIN/EACCES: an exclusive lock on a permission byte (QEMU takes none)
            clash = "another program holds an exclusive lock on it"
    except LocksUnsupported:
        return
    if clash is None:
        return
    try:
        _lock_bytes(fd, held, unshared, fcntl.F_UNLCK)
    except (LocksUnsupported, BlockingIOError):
        pass  # closing `fd` releases them anyway
    raise CloudkvmError(f"{path}: the disk image is in use: {clash} (QEMU's image lock)",
                        "stop the VM or qemu-img/qemu-io using it first "
                        "(readers share an image; a writer needs it alone)")
