"""Fuzz qcow2 images (cloudkvm/storage/qcow2_header.py and qcow2.py, QEMU's docs/interop/qcow2.txt): opening,
reads, small writes, discard, write-zeroes, flush and close of a fuzzed image file.

Input: 16 bytes of operations, then the image file. Each operation is 4 bytes: kind (byte 0 % 6: read, write,
discard, write-zeroes, write-zeroes with unmap, flush), where (bytes 1 and 3: a 16-bit fraction of the virtual
size) and length (byte 2: (n + 1) * 256 bytes, at most the rest of the disk). The image is written to a file in a
private folder (on /dev/shm when there is one) that also holds the backing files the seeds name (`base.raw`, a
64 KiB raw file, and `base.qcow2`); the image is opened read-only (a read at each operation's place, and one of
the first 256 KiB), then read-write (the operations in order, each write read back), then read-only again.

Documented outcomes: `CloudkvmError` (a refused header or table, or `CorruptImage` while serving a request) and
`DiskError`. Crashes: any other exception; a read answering the wrong number of bytes; a write or write-zeroes
that does not read back at once as written; the image file growing by more than 64 MiB from a few small writes; a
backing file opened outside the image's folder (the default backing-file policy, storage/backing.py).
"""
import atexit
import os
import shutil
import struct

import cloudkvm.storage.qcow2  # noqa: F401  (open_disk imports it lazily: here, so that atheris instruments it)
import cloudkvm.storage.raw  # noqa: F401  (backing files)
from cloudkvm.errors import CloudkvmError
from cloudkvm.storage import DiskError, open_disk

from .oracle import Crash, private_folder

OPS = 4
OP = struct.Struct("<BBBB")
PROGRAM = OP.size * OPS
MAX_LEN = PROGRAM + 128 * 1024
TIMEOUT = 20
INSTRUMENT = ["cloudkvm"]
FIRST_READ = 256 * 1024
GROWTH_LIMIT = 64 << 20
KINDS = ("read", "write", "discard", "write_zeroes", "write_zeroes_unmap", "flush")

_folder: str | None = None


def folder() -> str:
    """The private folder with the backing files (made once per process, removed at exit)."""
    global _folder
    if _folder is None:
        _folder = private_folder("cloudkvm-fuzz-qcow2-")
        atexit.register(shutil.rmtree, _folder, True)
        with open(os.path.join(_folder, "base.raw"), "wb") as f:
            f.write(bytes(range(256)) * 256)
        from cloudkvm.storage.qcow2 import create
        base = os.path.join(_folder, "base.qcow2")
        create(base, 64 * 1024, cluster_size=512)
        with open_disk(base) as disk:
            disk.pwrite(b"B" * 4096, 8192)
    return _folder


def operations(program: bytes, size: int) -> list[tuple[str, int, int]]:
    """(kind, offset, length) of each operation, inside a virtual disk of `size` bytes."""
    out = []
    for k in range(OPS):
        kind, where_hi, length, where_lo = OP.unpack_from(program, k * OP.size)
        offset = ((where_hi << 8 | where_lo) * size) >> 16
        out.append((KINDS[kind % len(KINDS)], offset, min((length + 1) * 256, size - offset)))
    return out


def _check_backing_chain(disk) -> None:
    """The backing-file policy (storage/backing.py): without trust, an image's backing files lie in its folder."""
    top = os.path.realpath(folder())
    backing = getattr(disk, "backing", None)
    while backing is not None:
        real = os.path.realpath(backing.path)
        if os.path.commonpath([real, top]) != top:
            raise Crash(f"the image's backing chain opened {real}, outside the image's folder")
        backing = getattr(backing, "backing", None)


def _read_only_pass(path: str, program: bytes) -> bool:
    try:
        disk = open_disk(path, read_only=True, format="qcow2")
    except (CloudkvmError, DiskError):
        return False
    try:
        _check_backing_chain(disk)
        places = [(0, FIRST_READ)] + [(offset, length) for _, offset, length in operations(program, disk.size)]
        for offset, length in places:
            length = min(length, disk.size - offset)
            try:
                data = disk.pread(length, offset)
            except (CloudkvmError, DiskError):
                continue
            if len(data) != length:
                raise Crash(f"pread({length}, {offset}) returned {len(data)} bytes")
    finally:
        disk.close()
    return True


def _write_pass(path: str, program: bytes) -> str:
    try:
        disk = open_disk(path, format="qcow2")
    except (CloudkvmError, DiskError):
        return "refused-for-writing"
    outcome = "written"
    try:
        _check_backing_chain(disk)
        for n, (kind, offset, length) in enumerate(operations(program, disk.size)):
            try:
                if kind == "read":
                    disk.pread(length, offset)
                elif kind == "write":
                    payload = bytes([0xA0 + n]) * length
                    disk.pwrite(payload, offset)
                    back = disk.pread(length, offset)
                    if back != payload:
                        first = next(i for i in range(length) if back[i] != payload[i])
                        raise Crash(f"wrote {length} bytes at {offset}, byte {first} reads back as {back[first]:#x}")
                elif kind == "discard":
                    disk.discard(length, offset)
                elif kind == "flush":
                    disk.flush()
                else:
                    disk.write_zeroes(length, offset, unmap=kind == "write_zeroes_unmap")
                    back = disk.pread(length, offset)
                    if back.count(0) != length:
                        raise Crash(f"write_zeroes({length}, {offset}) does not read back as zeros")
            except (CloudkvmError, DiskError):
                outcome = "request-failed"
    finally:
        try:
            disk.close()
        except (CloudkvmError, DiskError):
            outcome = "close-failed"
    return outcome


def one_input(data: bytes) -> str:
    if len(data) < PROGRAM + 4:
        return "short"
    program, image = data[:PROGRAM], data[PROGRAM:]
    path = os.path.join(folder(), "image.qcow2")
    with open(path, "wb") as f:
        f.write(image)
    try:
        if not _read_only_pass(path, program):
            return "refused"
        outcome = _write_pass(path, program)
        grown = os.path.getsize(path) - len(image)
        if grown > GROWTH_LIMIT:
            raise Crash(f"the image file grew by {grown} bytes from {OPS} small operations")
        _read_only_pass(path, program)
        return outcome
    finally:
        os.unlink(path)
