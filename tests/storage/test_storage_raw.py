"""Raw images and open_disk() itself: probing, errors, the Disk protocol."""
import os
import random

import pytest

from cloudkvm.errors import CloudkvmError
from cloudkvm.storage import Disk, OutOfRange, ReadOnlyDisk, open_disk, probe_format
from cloudkvm.storage.raw import RawDisk

MiB = 1 << 20


@pytest.fixture
def raw_file(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(random.Random(1).randbytes(3 * MiB + 512))
    return p


def test_read_write_flush(raw_file):
    ref = bytearray(raw_file.read_bytes())
    rng = random.Random(2)
    with open_disk(raw_file) as d:
        assert isinstance(d, RawDisk) and isinstance(d, Disk)
        assert d.format == "raw" and d.size == len(ref) and not d.read_only
        for _ in range(200):
            off = rng.randrange(d.size)
            n = rng.randrange(min(100_000, d.size - off) + 1)
            if rng.random() < 0.5:
                data = rng.randbytes(n)
                d.pwrite(data, off)
                ref[off:off + n] = data
            assert d.pread(n, off) == ref[off:off + n]
        d.pwrite(memoryview(b"abcdef")[1:4], 7)  # any buffer
        ref[7:10] = b"bcd"
        d.flush()
    assert raw_file.read_bytes() == ref


def test_vectored_reads_and_writes_go_to_the_right_places(raw_file):
    """preadv/pwritev (storage/vectored.py) with buffers split at random places, more of them than IOV_MAX too,
    against the file's own bytes; a probed raw image's first sector keeps its guard."""
    from cloudkvm.storage import vectored
    from cloudkvm.storage.errors import FormatChangeRefused
    from test_qcow2_read import split_sizes

    ref = bytearray(raw_file.read_bytes())
    rng = random.Random(3)
    with open_disk(raw_file, format="raw") as d:
        for _ in range(120):
            off = rng.randrange(d.size)
            n = rng.randrange(min(100_000, d.size - off) + 1)
            data = rng.randbytes(n)
            pieces, pos = [], 0
            for k in split_sizes(n, rng):
                pieces.append(memoryview(data)[pos:pos + k])
                pos += k
            d.pwritev(pieces, off)
            ref[off:off + n] = data
            buffers = [bytearray(k) for k in split_sizes(n, rng)]
            d.preadv([memoryview(b) for b in buffers], off)
            assert b"".join(buffers) == ref[off:off + n]
        many = [bytearray(3) for _ in range(vectored.IOV_MAX + 5)]
        d.preadv([memoryview(b) for b in many], 1000)
        assert b"".join(many) == ref[1000:1000 + 3 * len(many)]
        with pytest.raises(OutOfRange):
            d.preadv([memoryview(bytearray(10))], d.size - 5)
    assert raw_file.read_bytes() == ref
    with open_disk(raw_file) as probed:  # probed as raw: a write making it look like qcow2 is refused
        with pytest.raises(FormatChangeRefused, match="first sector"):
            probed.pwritev([memoryview(b"QFI"), memoryview(b"\xfb")], 0)


def test_discard_and_write_zeroes(raw_file):
    with open_disk(raw_file) as d:
        d.write_zeroes(100_000, 12345)
        assert d.pread(100_000, 12345) == bytes(100_000)
        d.write_zeroes(1000, 2 * MiB, unmap=True)
        assert d.pread(1000, 2 * MiB) == bytes(1000) and d.write_zeroes_may_unmap
        d.discard(MiB, MiB)  # punched: reads as zeros where supported, and never changes the size
        assert d.size == 3 * MiB + 512
        d.write_zeroes(0, 0)
    assert os.path.getsize(raw_file) == 3 * MiB + 512


def test_write_zeroes_falls_back_to_writing(raw_file):
    with open_disk(raw_file) as d:
        d._can_zero_range = d._can_punch = False
        d.write_zeroes(3 * MiB, 100)
        assert d.pread(3 * MiB, 100) == bytes(3 * MiB)


def test_errors(raw_file, tmp_path):
    with open_disk(raw_file, read_only=True) as d:
        assert d.read_only
        for call in (lambda: d.pwrite(b"x", 0), lambda: d.discard(1, 0), lambda: d.write_zeroes(1, 0),
                     lambda: d.grow(10 * MiB)):
            with pytest.raises(ReadOnlyDisk):
                call()
        for length, offset in ((1, d.size), (-1, 0), (0, -1), (d.size + 1, 0)):
            with pytest.raises(ValueError):
                d.pread(length, offset)
        assert d.pread(0, d.size) == b""
    with open_disk(raw_file) as d:
        with pytest.raises(OutOfRange):
            d.pwrite(b"xy", d.size - 1)
        d.grow(4 * MiB)
        assert d.size == 4 * MiB and d.pread(10, 4 * MiB - 10) == bytes(10)
        with pytest.raises(CloudkvmError, match="shrink"):
            d.grow(MiB)
    with pytest.raises(CloudkvmError, match="no such disk image") as e:
        open_disk(tmp_path / "nope.img")
    assert "nope.img" in e.value.message and e.value.hint
    with pytest.raises(CloudkvmError, match="folder"):
        open_disk(tmp_path)
    with pytest.raises(CloudkvmError, match="unsupported disk image format 'vmdk'"):
        open_disk(raw_file, format="vmdk")


def test_open_errors_name_the_file(tmp_path):
    from cloudkvm.storage import open_error
    for err, words in ((PermissionError(13, "Permission denied"), "permission denied"),
                       (IsADirectoryError(21, "Is a directory"), "folder"),
                       (OSError(5, "Input/output error"), "Input/output error")):
        e = open_error("/x/disk.img", err, False)
        assert e.message.startswith("/x/disk.img: ") and words in e.message and e.hint


def test_probe(raw_file, tmp_path):
    assert probe_format(raw_file) == "raw"
    q = tmp_path / "q"
    q.write_bytes(b"QFI\xfb" + bytes(100))
    assert probe_format(q) == "qcow2"
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert probe_format(empty) == "raw"
    with open_disk(empty) as d:
        assert d.size == 0 and d.pread(0, 0) == b""


def test_writer_lock(raw_file):
    with open_disk(raw_file):
        with pytest.raises(CloudkvmError, match="in use"):
            open_disk(raw_file)
    with open_disk(raw_file, read_only=True), open_disk(raw_file, read_only=True):
        pass


def test_close_is_idempotent(raw_file):
    d = open_disk(raw_file)
    d.close()
    d.close()
