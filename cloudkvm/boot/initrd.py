"""Host-side expansion of a compressed initramfs (Linux Documentation/driver-api/early-userspace/buffer-format.rst).

An initramfs is cpio "newc" archives, each optionally compressed, concatenated. Linux accepts them
uncompressed, so cloudkvm decompresses on the host what the guest would otherwise inflate in its own (on a
software KVM: interpreted) kernel code, and caches the result. Anything it does not fully understand is passed
through unchanged: the kernel then does what it always does."""
import hashlib
import logging
from pathlib import Path

from ..cache import cache_dir
from ..fsutil import atomic_write
from . import linux_x86

log = logging.getLogger("cloudkvm.initrd")
NEWC_MAGICS = (b"070701", b"070702")  # buffer-format.rst: newc and newc with checksums
TRAILER = b"TRAILER!!!"
MAX_EXPANDED = 1 << 31


def _cpio_end(data: bytes, pos: int) -> int | None:
    """Offset just past the newc archive starting at `pos` (after TRAILER!!!), or None if it is malformed."""
    while pos + 110 <= len(data):
        if data[pos:pos + 6] not in NEWC_MAGICS:
            return None
        try:
            namesize = int(data[pos + 94:pos + 102], 16)
            filesize = int(data[pos + 54:pos + 62], 16)
        except ValueError:
            return None
        name_end = pos + 110 + namesize
        data_start = (name_end + 3) & ~3
        end = (data_start + filesize + 3) & ~3
        if end > len(data) + 3:
            return None
        if data[pos + 110:name_end - 1] == TRAILER:
            return min(end, len(data))
        pos = end
    return None


def expand(data: bytes) -> bytes | None:
    """The initramfs with every compressed member decompressed, or None when it cannot be fully expanded."""
    out, pos = [], 0
    while pos < len(data):
        while pos < len(data) and data[pos] == 0:  # zero padding between members
            pos += 1
        if pos >= len(data):
            break
        if data[pos:pos + 6] in NEWC_MAGICS:
            end = _cpio_end(data, pos)
            if end is None:
                return None
            out.append(data[pos:end])
            pos = end
            continue
        fmt = linux_x86.payload_format(data[pos:])
        if fmt not in ("gzip", "bzip2", "lzma", "xz", "zstd", "lz4"):
            return None  # e.g. an old-style initrd disk image: not ours to change
        try:
            inner = linux_x86._DECODERS[fmt](data[pos:], MAX_EXPANDED)
        except Exception:  # noqa: BLE001  (anything odd: let the kernel handle the original)
            return None
        if _cpio_end(inner, 0) is None:
            return None
        out.append(inner)
        break  # a compressed member runs to the end of the image (its decoder consumed the rest)
    return b"".join(out) if out else None


def expanded_initrd(data: bytes, name: str) -> bytes:
    """The initrd the guest should get: a host-side expansion of `data` (cached by its hash), or `data` itself.
    The cache is only a speed-up: when it cannot be written, the expansion is used uncached."""
    if data[:6] in NEWC_MAGICS:
        return data  # already uncompressed
    cached = cache_dir() / "initrd" / f"{hashlib.sha256(data).hexdigest()[:24]}.cpio"
    try:
        return cached.read_bytes()
    except OSError:
        pass
    inner = expand(data)
    if inner is None:
        log.info("%s: left compressed (not a plain compressed initramfs)", name)
        return data
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cached, inner)
    except OSError as exc:
        log.info("%s: expansion not cached (%s: %s)", name, cached.parent, exc.strerror)
    return inner
