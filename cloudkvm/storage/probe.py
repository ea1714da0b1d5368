"""Image format probing by signature, and the guard that keeps a probed-raw image raw.

Probing trusts bytes the guest may write: a guest that puts a qcow2 header into sector 0 of a raw disk would, on
the next start, be opened as qcow2 with a backing file of its choosing. So a raw image whose format was probed
refuses guest writes that would make it probe as anything else (QEMU does the same for its probed raw images), and
launchers record the probed format so a restart does not probe again. Signatures are from each format's own
specification: qcow2 and qcow 1 (docs/interop/qcow2.txt; the header says which version), QED, VMDK (sparse extent and descriptor), VHDX, VHD ("conectix"),
VDI (signature 0xbeda107f at 0x40), LUKS1/2, Parallels, Bochs and cloop."""
from __future__ import annotations

import os

from ..errors import CloudkvmError

PROBE_BYTES = 512  # every signature below lies in the first sector

_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"QFI\xfb", "qcow2"),
    (0, b"QED\x00", "qed"),
    (0, b"KDMV", "vmdk"),
    (0, b"COWD", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc"),
    (0x40, b"\x7f\x10\xda\xbe", "vdi"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0, b"Bochs Virtual HD Image", "bochs"),
    (0, b"#!/bin/sh\n#V2.0 Format\n", "cloop"),
)


def probe_bytes(head: bytes) -> str:
    """The format the first sector `head` announces: 'qcow2', another format's name, or 'raw' for none."""
    for offset, magic, name in _SIGNATURES:
        if head[offset:offset + len(magic)] == magic:
            return name
    return "raw"


def probe_fd(fd: int) -> str:
    return probe_bytes(os.pread(fd, PROBE_BYTES, 0))


def write_keeps_raw(head: bytes, data, offset: int) -> bool:
    """Whether writing `data` at `offset` over a disk whose first sector is `head` leaves it probing as raw."""
    if offset >= PROBE_BYTES:
        return True
    view = memoryview(data)
    new = bytearray(head.ljust(PROBE_BYTES, b"\0"))
    n = min(len(view), PROBE_BYTES - offset)
    new[offset:offset + n] = view[:n]
    return probe_bytes(bytes(new)) == "raw"


def readable_format(path: str, fd: int, formats) -> str:
    """The probed format of the open image `fd` if it is one of `formats`; else a CloudkvmError naming it."""
    fmt = probe_fd(fd)
    if fmt not in formats:
        raise CloudkvmError(f"{path}: looks like a {fmt} image, which cloudkvm cannot read",
                            "convert it: `qemu-img convert -O qcow2 IMAGE NEW.qcow2` (or set format: raw if the "
                            "guest's disk really starts with those bytes)")
    return fmt
