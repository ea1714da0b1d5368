"""An image's backing chain as names and formats, read from headers alone (no locks, no tables): what
`validate` and `show` print, under the same backing-file policy that opening the image applies."""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from ..errors import CloudkvmError
from . import FORMATS, MAX_BACKING_CHAIN
from . import qcow2_header as hdr
from .backing import BackingPolicy, open_image
from .probe import readable_format


@dataclass(frozen=True)
class Link:
    """One image of a chain: the path opened, its format, and whether that format was probed."""

    path: str
    format: str
    probed: bool

    def describe(self) -> str:
        return f"{self.path} ({self.format}{', probed' if self.probed else ''})"


def backing_chain(path, format: str | None = None, policy: BackingPolicy = BackingPolicy()) -> list[Link]:
    """The image and every backing file below it, top first; CloudkvmError for what opening would refuse."""
    links: list[Link] = []
    seen: set[tuple[int, int]] = set()
    path, fmt, probed = os.fspath(path), format, format is None
    while True:
        if len(links) >= MAX_BACKING_CHAIN:
            raise CloudkvmError(f"{path}: backing chain deeper than {MAX_BACKING_CHAIN} images",
                                "flatten the chain with `qemu-img convert`")
        fd, st = open_image(path, True, devices=not links or policy.allows_devices(path))
        try:
            if (st.st_dev, st.st_ino) in seen:
                raise CloudkvmError(f"{path}: backing file loop: this image is already in the backing chain above it",
                                    "point the backing file at a different image (`qemu-img rebase -u -b BASE IMAGE`)")
            seen.add((st.st_dev, st.st_ino))
            if fmt is None:
                fmt = readable_format(path, fd, FORMATS)
            links.append(Link(path, fmt, probed))
            if fmt != "qcow2":
                return links
            size = os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size
            header = hdr.parse(path, fd, size)
        finally:
            os.close(fd)
        if not header.backing_file:
            return links
        if header.backing_format is not None and header.backing_format not in FORMATS:
            raise CloudkvmError(f"{path}: backing file {header.backing_file!r} has format "
                                f"{header.backing_format!r} (only raw and qcow2)",
                                "convert the backing file to qcow2 and rebase onto it")
        path = policy.resolve(path, header.backing_file)
        fmt, probed = header.backing_format, header.backing_format is None
