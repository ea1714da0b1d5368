"""Which files an image may open: the backing-file policy, and opening an image file without surprises.

An image names its backing file itself, so a downloaded or guest-influenced image could name any host file. Unless
its user trusts it, a backing file must be named relative to the image, resolve (symlinks included) inside the
image's own folder, and be a regular file. Files the user named themselves (`allowed`: a profile's own disk files,
which cloudkvm's per-instance overlays name by absolute path) are always fine. A FIFO, socket or character device is
never an image; a block device is one only where the user trusts it."""
from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass

from ..errors import CloudkvmError
from ..fsutil import file_kind, is_within

TRUST_HINT = ("cloudkvm follows backing files only inside the image's own folder; if you trust this image, set "
              "trust_backing: true on its disk (or rebase it: `qemu-img rebase -u -b NAME IMAGE`)")


@dataclass(frozen=True)
class BackingPolicy:
    """What an image's backing chain may name. The default trusts nothing the image says."""

    trusted: bool = False
    allowed: frozenset[str] = frozenset()  # real paths the user named, always acceptable as backing files

    def resolve(self, image: str, name: str) -> str:
        """The path to open for backing name `name` of `image`; CloudkvmError naming both when refused."""
        if name.startswith("json:") or "://" in name:
            raise CloudkvmError(f"{image}: backing file {name!r} is not a local file",
                                "rebase onto a local file: `qemu-img rebase -b BASE IMAGE`")
        folder = os.path.dirname(os.path.abspath(image))
        path = name if os.path.isabs(name) else os.path.join(folder, name)
        if self.trusted or os.path.realpath(path) in self.allowed:
            return path
        if os.path.isabs(name):
            raise CloudkvmError(f"{image}: backing file {name!r} is an absolute path", TRUST_HINT)
        if not is_within(path, folder):
            raise CloudkvmError(f"{image}: backing file {name!r} lies outside the image's folder "
                                f"({os.path.realpath(path)})", TRUST_HINT)
        return path

    def allows_devices(self, path: str) -> bool:
        return self.trusted or os.path.realpath(path) in self.allowed


def open_image(path: str, read_only: bool, devices: bool) -> tuple[int, os.stat_result]:
    """Open an image file (never blocking on a FIFO) and check what it is: a regular file, or a block device where
    `devices` allows one. Returns (fd, stat); CloudkvmError naming the file otherwise."""
    from . import open_error

    try:
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        if err.errno == errno.ENXIO:  # a FIFO without a writer, a device without a driver
            raise CloudkvmError(f"{path}: not a disk image (a FIFO or a device without a driver)",
                                "name a regular image file") from None
        raise open_error(path, err, read_only) from None
    try:
        st = os.fstat(fd)
        kind = file_kind(st.st_mode)
        if kind == "a folder":
            raise CloudkvmError(f"{path}: is a folder, not a disk image", "name the image file")
        if kind == "a block device" and not devices:
            raise CloudkvmError(f"{path}: a block device as a backing file", TRUST_HINT)
        if kind not in ("a file", "a block device"):
            raise CloudkvmError(f"{path}: is {kind}, not a disk image", "name a regular image file")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd, st
