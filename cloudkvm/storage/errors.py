"""The storage error family.

- `DiskError`: a request the disk cannot serve (a device model turns it into an I/O error status for the guest).
- `OutOfRange` (also a `ValueError`): offset/length outside the virtual disk.
- `ReadOnlyDisk` (also a `PermissionError`): a write, discard or flush-with-changes on a disk opened read-only.
- `FormatChangeRefused` (also a `PermissionError`): a write to a probed raw image's first sector that would
  make it probe as another format.
- `CorruptImage` (also a `CloudkvmError`): image metadata found broken while serving I/O (an L2 entry past the end
  of the file, into metadata, ...). It names the file and offset and hints at `qemu-img check`.

Problems found while *opening* (missing file, bad header, unsupported feature) are plain `CloudkvmError`s.
"""
from ..errors import CloudkvmError

CHECK_HINT = "the image is damaged; inspect it with `qemu-img check FILE` (repair a copy with `qemu-img check -r all`)"


class DiskError(Exception):
    """An I/O request on a disk image failed (not a user error: the request or the image is wrong)."""


class OutOfRange(DiskError, ValueError):
    """offset/length fall outside the virtual disk."""


class ReadOnlyDisk(DiskError, PermissionError):
    """A modifying request on a disk opened read-only."""


class FormatChangeRefused(DiskError, PermissionError):
    """A write that would make a probed raw image probe as another format (a guest must not pick its format)."""


class CorruptImage(CloudkvmError, DiskError):
    """Image metadata is inconsistent (found while serving I/O); the request fails, nothing is written."""

    def __init__(self, message: str, hint: str = CHECK_HINT):
        super().__init__(message, hint)
