"""Compressed downloads unpacked into the cache: xz, gzip, zstd and bzip2 around a qcow2 or raw image.

The compression is recognized by its magic bytes (xz: FD 37 7A 58 5A 00, the .xz file format §2.1.1.1; gzip:
1F 8B, RFC 1952 §2.3.1; zstd: 28 B5 2F FD, RFC 8878 §3.1.1; bzip2: "BZh" and a block size digit), never by the
file name alone. Decompression streams in bounded pieces: memory stays bounded whatever the stream declares
(xz's dictionary by `XZ_MEMLIMIT`; zstd's window by the library's default 128 MiB limit, and the output of one
step by feeding it `ZSTD_STEP` bytes at a time), the output by `limit`. Concatenated streams (pxz, pigz, pzstd,
pbzip2) are read to their end; xz stream padding (zero bytes) is allowed. Runs of zero bytes become holes in the
output file, so an unpacked raw image takes the space its data needs. A corrupt or truncated stream is one
`CloudkvmError` and leaves no output file behind."""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
import zlib
from pathlib import Path
from typing import BinaryIO

from ..errors import CloudkvmError

MAGICS = ((b"\xfd7zXZ\x00", "xz"), (b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"))
SNIFF_BYTES = 6
CHUNK = 1 << 20
XZ_MEMLIMIT = 256 << 20      # xz -9 needs 65 MiB to decompress; a stream asking for more is refused
ZSTD_STEP = 2048             # compressed bytes per step: at most 2048/4 RLE blocks of 128 KiB come out of it
_ZEROS = bytes(CHUNK)


def sniff(head: bytes) -> str | None:
    """'xz', 'gzip', 'zstd' or 'bzip2' when `head` (a file's first bytes) starts that stream; None otherwise."""
    for magic, kind in MAGICS:
        if head.startswith(magic):
            return kind
    if head[:3] == b"BZh" and head[3:4].isdigit() and head[3:4] != b"0":
        return "bzip2"
    return None


class _SparseWriter:
    """Writes whole CHUNK blocks, seeking over the ones that are all zeros; refuses output past `limit`."""

    def __init__(self, f: BinaryIO, limit: int, where: str):
        self.f, self.limit, self.where = f, limit, where
        self.buffer = bytearray()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise CloudkvmError(f"{self.where}: unpacks to more than {self.limit} bytes, the most cloudkvm accepts",
                                "is this a disk image?")
        self.buffer += data
        if len(self.buffer) >= CHUNK:
            whole = len(self.buffer) - len(self.buffer) % CHUNK
            view = memoryview(self.buffer)
            for start in range(0, whole, CHUNK):
                self._block(view[start:start + CHUNK])
            view.release()
            del self.buffer[:whole]

    def _block(self, block) -> None:
        if block == _ZEROS[:len(block)]:
            self.f.seek(len(block), os.SEEK_CUR)
        else:
            self.f.write(block)

    def finish(self) -> int:
        if self.buffer:
            self._block(memoryview(self.buffer))
        self.f.truncate(self.size)  # the holes at the end count too
        self.f.flush()
        os.fsync(self.f.fileno())
        return self.size


def _copy(reader, out: _SparseWriter) -> None:
    while chunk := reader.read(CHUNK):
        out.write(chunk)


def _xz(src: BinaryIO, out: _SparseWriter) -> None:
    """Every xz stream of `src`, with the zero padding the format allows between and after streams."""
    pending = b""
    while True:
        while not pending.strip(b"\0"):  # between streams: skip padding, stop at the end of the file
            pending = src.read(CHUNK)
            if not pending:
                return
        pending = pending.lstrip(b"\0")
        decompressor = lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=XZ_MEMLIMIT)
        while not decompressor.eof:
            if decompressor.needs_input:
                data = pending or src.read(CHUNK)
                pending = b""
                if not data:
                    raise EOFError("the stream ends before its end marker")
            else:
                data = b""
            out.write(decompressor.decompress(data, CHUNK))
        pending = decompressor.unused_data


def _zstd(src: BinaryIO, out: _SparseWriter) -> None:
    """Every zstd frame of `src` (skippable frames included), ZSTD_STEP input bytes at a time."""
    import zstandard

    context = zstandard.ZstdDecompressor()
    frame, pending = None, b""
    while True:
        if not pending:
            pending = src.read(ZSTD_STEP)
            if not pending:
                break
        if frame is None:
            frame = context.decompressobj()
        data, pending = pending[:ZSTD_STEP], pending[ZSTD_STEP:]
        out.write(frame.decompress(data))
        if frame.eof:
            pending, frame = frame.unused_data + pending, None
    if frame is not None:
        raise EOFError("the stream ends inside a frame")


def _gzip(src: BinaryIO, out: _SparseWriter) -> None:
    _copy(gzip.GzipFile(fileobj=src, mode="rb"), out)


def _bzip2(src: BinaryIO, out: _SparseWriter) -> None:
    _copy(bz2.BZ2File(src, mode="rb"), out)


_DECODERS = {"xz": _xz, "zstd": _zstd, "gzip": _gzip, "bzip2": _bzip2, None: _copy}


def _stream_errors() -> tuple[type[BaseException], ...]:
    import zstandard

    return (lzma.LZMAError, zlib.error, gzip.BadGzipFile, EOFError, zstandard.ZstdError, ValueError)


def unpack(src: BinaryIO, dest: Path, kind: str | None, *, limit: int, where: str) -> int:
    """Write what the `kind` stream `src` holds (or `src` itself for None) to the new file `dest`; its size.

    `dest` must not exist; on any error it is removed and the error is one line naming `where`."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            out = _SparseWriter(f, limit, where)
            try:
                _DECODERS[kind](src, out)
                return out.finish()
            except _stream_errors() as err:
                raise CloudkvmError(f"{where}: corrupt {kind} data after {out.size} unpacked bytes: "
                                    f"{str(err)[:120] or type(err).__name__}",
                                    "the file is damaged; delete it or download it again") from None
            except OSError as err:
                if err.filename is None and err.errno is None:  # bz2 reports bad data as a bare OSError
                    raise CloudkvmError(f"{where}: corrupt {kind} data after {out.size} unpacked bytes: {err}",
                                        "the file is damaged; delete it or download it again") from None
                raise CloudkvmError(f"{dest}: cannot write the unpacked image: {err.strerror or err}",
                                    "free space in the cache folder, or set CLOUDKVM_CACHE to another folder") \
                    from None
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
