"""qcow2 reads against the oracle: every image qemu-img/qemu-io make reads back equal to `qemu-img convert -O raw`."""
import os
import random

import pytest

from cloudkvm.storage import open_disk
from cloudkvm.storage.qcow2 import Qcow2Disk

MiB = 1 << 20


def assert_reads_like(path, ref: bytes, seed=0, n=150, **kw):
    """Whole-disk read plus random (unaligned, cross-cluster) sub-range reads equal the oracle's bytes, by pread
    and by preadv into buffers split at random places (storage/vectored.py)."""
    rng = random.Random(seed)
    with open_disk(path, read_only=True, **kw) as d:
        assert d.size == len(ref)
        whole = d.pread(d.size, 0)
        assert whole == ref, f"{path}: whole-disk read differs at byte {first_diff(whole, ref)}"
        assert preadv_split(d, d.size, 0, rng) == ref, f"{path}: whole-disk preadv differs"
        for _ in range(n):
            off = rng.randrange(d.size)
            ln = rng.randrange(min(d.size - off, 300_000) + 1)
            assert d.pread(ln, off) == ref[off:off + ln], (off, ln)
            assert preadv_split(d, ln, off, rng) == ref[off:off + ln], ("preadv", off, ln)


def split_sizes(length: int, rng) -> list[int]:
    """`length` as up to 40 pieces at random places (empty ones too), as a driver's scattered pages are."""
    cuts = sorted(rng.randrange(length + 1) for _ in range(rng.randrange(40)))
    return [b - a for a, b in zip([0, *cuts], [*cuts, length])]


def preadv_split(disk, length: int, offset: int, rng) -> bytes:
    buffers = [bytearray(b"\xee" * n) for n in split_sizes(length, rng)]
    disk.preadv([memoryview(b) for b in buffers], offset)
    return b"".join(buffers)


def first_diff(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def mixed_raw(path, size, seed=1):
    """Random, repetitive (compressible) and zero stretches."""
    rng = random.Random(seed)
    out = bytearray(size)
    pos = 0
    while pos < size:
        n = min(size - pos, rng.choice([512, 3000, 65536, 200_000]))
        kind = rng.randrange(3)
        if kind == 0:
            out[pos:pos + n] = rng.randbytes(n)
        elif kind == 1:
            out[pos:pos + n] = (b"cloudkvm qcow2 %d " % pos * (n // 10 + 1))[:n]
        pos += n
    path.write_bytes(bytes(out))
    return bytes(out)


QEMU_IO_PATTERN = [
    "write -P 0x11 0 1M",
    "write -P 0x22 3M 70k",
    "write -z 0 64k",
    "write -P 0x33 100000 5000",
    "write -P 0x44 5M 4M",
    "write -z 6M 1M",
    "write -P 0x55 15M 1M",
    "discard 15M 64k",
]


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 * MiB])
def test_cluster_sizes(qemu, tmp_path, cluster_size):
    img = qemu.create(tmp_path / "c.qcow2", "16M", cluster_size=cluster_size)
    qemu.io(img, *QEMU_IO_PATTERN)
    assert_reads_like(img, qemu.to_raw(img, tmp_path))


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
@pytest.mark.parametrize("cluster_size", [4096, 65536])
def test_compressed(qemu, tmp_path, compression, cluster_size):
    raw = mixed_raw(tmp_path / "src.raw", 6 * MiB + 4096)
    img = tmp_path / "c.qcow2"
    qemu.img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={compression},cluster_size={cluster_size}",
             str(tmp_path / "src.raw"), str(img))
    assert f"compression-type\": \"{compression}" in qemu.img("info", "--output=json", str(img)).stdout
    assert_reads_like(img, raw)


def test_backing_chain_of_three_relative_names(qemu, tmp_path, monkeypatch):
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    base = qemu.create(d / "sub" / "base.qcow2", "8M", cluster_size=4096)
    qemu.io(base, "write -P 0x01 0 8M")
    mid = d / "mid.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-b", "sub/base.qcow2", "-F", "qcow2", str(mid), "12M")
    qemu.io(mid, "write -P 0x02 1M 1M", "write -P 0x03 9M 64k", "write -P 0x04 100k 3")
    top = d / "top.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", "-b", "mid.qcow2", "-F", "qcow2",
             str(top), "16M")
    qemu.io(top, "write -P 0x05 1536k 8k", "write -z 4M 128k", "write -P 0x06 14M 5k", "write -z 7M 1000")
    ref = qemu.to_raw(top, tmp_path)
    monkeypatch.chdir(tmp_path)  # names resolve against each image's folder, not the current one
    assert_reads_like(os.path.relpath(top, tmp_path), ref)
    with open_disk(top, read_only=True) as disk:
        assert disk.backing.format == "qcow2" and disk.backing.backing.format == "qcow2"
        assert disk.backing.backing.backing is None


def test_raw_backing_file_smaller_than_image(qemu, tmp_path):
    raw = tmp_path / "base.raw"
    raw.write_bytes(random.Random(3).randbytes(3 * MiB + 1000))
    top = qemu.create(tmp_path / "top.qcow2", "8M", backing="base.raw", backing_fmt="raw")
    qemu.io(top, "write -P 0x07 3M 100k")
    assert_reads_like(top, qemu.to_raw(top, tmp_path))


@pytest.mark.parametrize("backing", [False, True])
def test_extended_l2_subclusters(qemu, tmp_path, backing):
    b = None
    if backing:
        b = qemu.create(tmp_path / "b.qcow2", "8M")
        qemu.io(b, "write -P 0x61 0 8M")
    img = qemu.create(tmp_path / "x.qcow2", "8M", "extended_l2=on", cluster_size=65536,
                      backing="b.qcow2" if backing else None)
    qemu.io(img, "write -P 0x62 6k 4k", "write -P 0x63 100k 1", "write -z 200k 10k", "write -P 0x64 1M 300k",
            "write -z 2M 64k", "write -P 0x65 3000k 3k")
    ref = qemu.to_raw(img, tmp_path)
    with open_disk(img, read_only=True) as d:
        assert d.header.extended_l2
    assert_reads_like(img, ref)


def test_extended_l2_compressed(qemu, tmp_path):
    raw = mixed_raw(tmp_path / "src.raw", 2 * MiB)
    img = tmp_path / "xc.qcow2"
    qemu.img("convert", "-c", "-O", "qcow2", "-o", "extended_l2=on", str(tmp_path / "src.raw"), str(img))
    assert_reads_like(img, raw)


def test_v2_images(qemu, tmp_path):
    base = qemu.create(tmp_path / "b.qcow2", "4M", "compat=0.10")
    qemu.io(base, "write -P 0x71 0 4M")
    img = qemu.create(tmp_path / "v2.qcow2", "6M", "compat=0.10", backing="b.qcow2")
    qemu.io(img, "write -P 0x72 1M 10k", "write -z 2M 64k", "write -P 0x73 4M 1M")
    plain = qemu.create(tmp_path / "p.qcow2", "3M", "compat=0.10", cluster_size=4096)
    qemu.io(plain, "write -P 0x74 5k 100k", "write -z 50k 8k")
    with open_disk(img, read_only=True) as d:
        assert d.version == 2
    assert_reads_like(img, qemu.to_raw(img, tmp_path))
    assert_reads_like(plain, qemu.to_raw(plain, tmp_path))


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_refcount_widths_read(qemu, tmp_path, bits):
    img = qemu.create(tmp_path / "r.qcow2", "4M", f"refcount_bits={bits}", cluster_size=4096)
    qemu.io(img, "write -P 0x21 10k 300k", "write -z 1M 8k")
    assert_reads_like(img, qemu.to_raw(img, tmp_path), n=30)


@pytest.mark.parametrize("prealloc", ["metadata", "falloc"])
def test_preallocated(qemu, tmp_path, prealloc):
    img = qemu.create(tmp_path / "p.qcow2", "4M", f"preallocation={prealloc}", cluster_size=65536)
    qemu.io(img, "write -P 0x31 70k 5k")
    assert_reads_like(img, qemu.to_raw(img, tmp_path), n=30)


def test_internal_snapshot_reads_active_state(qemu, tmp_path):
    img = qemu.create(tmp_path / "s.qcow2", "2M")
    qemu.io(img, "write -P 0x41 0 1M")
    qemu.img("snapshot", "-c", "snap1", str(img))
    qemu.io(img, "write -P 0x42 512k 1M")
    assert_reads_like(img, qemu.to_raw(img, tmp_path), n=30)


def test_format_probe_and_explicit_raw(qemu, tmp_path):
    img = qemu.create(tmp_path / "f.qcow2", "1M")
    with open_disk(img, read_only=True) as d:
        assert isinstance(d, Qcow2Disk) and d.format == "qcow2"
    with open_disk(img, read_only=True, format="raw") as d:  # the caller's word wins, as with qemu -f raw
        assert d.format == "raw" and d.pread(4, 0) == b"QFI\xfb"
