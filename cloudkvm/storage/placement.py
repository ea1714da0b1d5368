"""Where a range of a virtual disk lies on the host, for a data path that moves the bytes itself (virtio-blk's C
path, kvm/virtio_blk.c): `Disk.runs(offset, length)` cuts the range into consecutive (start, length, answer) pieces,
each answer a `Place`, a `Deflated` cluster, `ZEROS`, or None; `locate(disk, offset, length)` is the answer for a
whole range.

A Place is one contiguous run of one open file: `fd`, the byte `offset` there of the range's first byte, and
`writable`: a write of the range may go there in place without the disk's own code (no allocation, no copy-on-write,
no guard). A Deflated answer is for a range that is exactly one whole cluster of a qcow2 image stored compressed as
raw deflate (RFC 1951; qcow2 spec "Compressed Clusters Descriptor"): `length` bytes at `offset` of `fd` inflate to
the range's bytes (never writable). ZEROS: the range reads as zeros (a write needs the disk's code). None: anything
else (split over several places, part of a compressed cluster, zstd, past a backing file's end): only the disk's own
methods handle it. An answer holds until the disk is next written, discarded or zeroed through its methods over that
range.
"""
from __future__ import annotations

from typing import NamedTuple


class Place(NamedTuple):
    fd: int
    offset: int
    writable: bool


class Deflated(NamedTuple):
    fd: int
    offset: int
    length: int


ZEROS = "zeros"


def locate(disk, offset: int, length: int):
    """The answer for all of [offset, offset+length) when one piece holds it, else None."""
    pieces = disk.runs(offset, length)
    return pieces[0][2] if len(pieces) == 1 else None
