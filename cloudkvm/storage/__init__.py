"""Disk image backends: `open_disk(path)` gives a `Disk` (raw file or qcow2 v2/v3 image).

Pure Python, no KVM: device models (virtio-blk) call `pread`/`pwrite`/`flush`/`discard`/`write_zeroes` with byte
offsets into the *virtual* disk. Every method is thread-safe (one lock per disk). See `qcow2.py` for the on-disk
format support, the metadata write ordering and what is not supported.
"""
from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

from ..errors import CloudkvmError
from .backing import BackingPolicy, open_image
from .errors import CorruptImage, DiskError, OutOfRange, ReadOnlyDisk
from .probe import readable_format

__all__ = ["Disk", "open_disk", "probe_format", "FORMATS", "BackingPolicy", "DiskError", "OutOfRange",
           "ReadOnlyDisk", "CorruptImage"]

FORMATS = ("raw", "qcow2")
MAX_BACKING_CHAIN = 64  # deeper chains are refused (and stop runaway recursion)


@runtime_checkable
class Disk(Protocol):
    """What a block device model needs from a disk image. Offsets and lengths are bytes of the virtual disk.

    `write_zeroes(..., unmap=True)` may release the space (both backends say so with `write_zeroes_may_unmap`);
    without it the range stays allocated where the format can express that."""

    format: str
    size: int
    read_only: bool

    def pread(self, length: int, offset: int) -> bytes: ...

    def pwrite(self, data, offset: int) -> None: ...

    def flush(self) -> None: ...

    def discard(self, length: int, offset: int) -> None: ...

    def write_zeroes(self, length: int, offset: int, unmap: bool = False) -> None: ...

    def close(self) -> None: ...


def open_error(path: str, err: OSError, read_only: bool) -> CloudkvmError:
    """The user error for a disk image that cannot be opened."""
    if isinstance(err, FileNotFoundError):
        return CloudkvmError(f"{path}: no such disk image", "check the path (relative paths are from the current "
                                                            "folder; backing files from the image's folder)")
    if isinstance(err, PermissionError):
        mode = "read-only" if read_only else "for writing"
        return CloudkvmError(f"{path}: permission denied opening the disk image {mode}",
                             "fix the file's permissions" + ("" if read_only else ", or open the disk read-only"))
    if isinstance(err, IsADirectoryError):
        return CloudkvmError(f"{path}: is a folder, not a disk image", "name the image file")
    return CloudkvmError(f"{path}: cannot open the disk image: {err.strerror or err}", "check the path")


def probe_format(path: str | os.PathLike) -> str:
    """'qcow2' or 'raw' from the image's first sector; CloudkvmError for a format cloudkvm cannot read."""
    path = os.fspath(path)
    fd, _ = open_image(path, True, devices=True)
    try:
        return readable_format(path, fd, FORMATS)
    except OSError as err:
        raise open_error(path, err, True) from None
    finally:
        os.close(fd)


def open_disk(path: str | os.PathLike, read_only: bool = False, format: str | None = None, *,
              policy: BackingPolicy = BackingPolicy(), probed: bool = False) -> Disk:
    """Open a disk image; `format` ('raw' or 'qcow2') is probed from the header when not given.

    A raw image whose format was probed (`format` omitted, or `probed=True` for a format recorded from an earlier
    probe) refuses writes that would make it probe as another format. Backing files follow `policy`.
    User errors (missing file, corrupt header, unsupported feature, refused backing file) raise `CloudkvmError`
    naming the file."""
    return _open(path, read_only, format, probed or format is None, policy, ())


def _open(path, read_only: bool, format: str | None, probed: bool, policy: BackingPolicy, chain: tuple) -> Disk:
    path = os.fspath(path)
    if len(chain) >= MAX_BACKING_CHAIN:
        raise CloudkvmError(f"{path}: backing chain deeper than {MAX_BACKING_CHAIN} images",
                            "flatten the chain with `qemu-img convert`")
    fmt = format if format is not None else probe_format(path)
    devices = not chain or policy.allows_devices(path)
    if fmt == "raw":
        from .raw import RawDisk
        return RawDisk(path, read_only=read_only, devices=devices, keep_raw=probed)
    if fmt == "qcow2":
        from .qcow2 import Qcow2Disk
        return Qcow2Disk(path, read_only=read_only, devices=devices, policy=policy, _chain=chain)
    raise CloudkvmError(f"{path}: unsupported disk image format {fmt!r}",
                        f"use one of {', '.join(FORMATS)} (convert with `qemu-img convert -O qcow2`)")
