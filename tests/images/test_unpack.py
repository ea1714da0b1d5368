"""Unpacking compressed images: streams made by the real `xz`, `gzip`, `zstd` and `bzip2` tools around a qcow2
made by `qemu-img convert`, recognized by magic bytes, checked with `qemu-img compare` and `cmp`; corrupt and
truncated streams are one-line errors that leave no file behind; the output bound holds."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cloudkvm.errors import CloudkvmError
from cloudkvm.images import unpack

TOOLS = {"xz": ["xz", "-T1", "-c"], "gzip": ["gzip", "-c"], "zstd": ["zstd", "-q", "-c"], "bzip2": ["bzip2", "-c"]}
NEEDED = ("qemu-img", "cmp", *{argv[0] for argv in TOOLS.values()})
pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in NEEDED),
                                reason=f"needs {', '.join(NEEDED)} (Debian: qemu-utils xz-utils gzip zstd bzip2)")


def run(*argv, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, **kwargs)


def compress(kind: str, src: Path, dest: Path) -> Path:
    with open(dest, "wb") as out:
        subprocess.run([*TOOLS[kind], str(src)], check=True, stdout=out)
    return dest


@pytest.fixture(scope="module")
def qcow2(tmp_path_factory) -> Path:
    """A qcow2 of 16 MiB with 1.5 MiB of random data in two places, the rest unallocated."""
    folder = tmp_path_factory.mktemp("qcow2")
    raw = folder / "disk.raw"
    with open(raw, "wb") as f:
        f.write(os.urandom(1 << 20))
        f.seek(9 << 20)
        f.write(os.urandom(512 << 10))
        f.truncate(16 << 20)
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, folder / "disk.qcow2")
    return folder / "disk.qcow2"


def unpack_file(src: Path, dest: Path, limit: int = 1 << 30) -> str | None:
    with open(src, "rb") as f:
        kind = unpack.sniff(f.read(unpack.SNIFF_BYTES))
        f.seek(0)
        unpack.unpack(f, dest, kind, limit=limit, where=str(src))
    return kind


@pytest.mark.parametrize("kind", sorted(TOOLS))
def test_each_compression_around_a_qcow2_is_recognized_by_magic_and_unpacked(kind, qcow2, tmp_path):
    packed = compress(kind, qcow2, tmp_path / "download.bin")  # no telling extension: the magic decides
    out = tmp_path / "unpacked.qcow2"
    assert unpack_file(packed, out) == kind
    run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", qcow2, out)  # same guest-visible contents
    run("cmp", qcow2, out)  # and the very same file
    assert oct(out.stat().st_mode & 0o777) == oct(0o600)


def test_an_uncompressed_image_is_not_taken_for_a_stream(qcow2):
    assert unpack.sniff(qcow2.read_bytes()[:unpack.SNIFF_BYTES]) is None
    assert unpack.sniff(b"") is None and unpack.sniff(b"BZh0") is None


@pytest.mark.parametrize("kind", ["xz", "gzip", "zstd", "bzip2"])
def test_concatenated_streams_are_read_to_the_end(kind, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.write_bytes(os.urandom(300_000))
    second.write_bytes(b"\0" * 200_000 + os.urandom(5000))
    joined = tmp_path / "joined"
    joined.write_bytes(compress(kind, first, tmp_path / "a.c").read_bytes() +
                       compress(kind, second, tmp_path / "b.c").read_bytes())
    oracle = tmp_path / "oracle"
    with open(oracle, "wb") as out:  # the tool itself reads concatenated streams
        subprocess.run([TOOLS[kind][0], "-dc", str(joined)], check=True, stdout=out)
    out = tmp_path / "out"
    unpack_file(joined, out)
    run("cmp", oracle, out)
    assert out.read_bytes() == first.read_bytes() + second.read_bytes()


def test_zeros_become_holes(tmp_path):
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.write(os.urandom(4096))
        f.truncate(64 << 20)
    packed = compress("zstd", raw, tmp_path / "disk.raw.zst")
    out = tmp_path / "out.raw"
    unpack_file(packed, out)
    run("cmp", raw, out)
    assert out.stat().st_size == 64 << 20
    assert out.stat().st_blocks * 512 < 4 << 20  # the 64 MiB of zeros were not written


def corrupt_middle(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0x55 for b in data[middle:middle + 64]) + data[middle + 64:]


@pytest.mark.parametrize("kind", sorted(TOOLS))
@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_a_corrupt_stream_is_one_line_and_leaves_no_file(kind, damage, tmp_path):
    src = tmp_path / "src"
    src.write_bytes(os.urandom(400_000) + bytes(400_000))
    good = compress(kind, src, tmp_path / "good").read_bytes()
    bad = tmp_path / "bad"
    bad.write_bytes(corrupt_middle(good) if damage == "flipped" else good[:len(good) * 2 // 3])
    # the tool agrees the stream is broken
    assert subprocess.run([TOOLS[kind][0], "-t", str(bad)], capture_output=True).returncode != 0
    out = tmp_path / "out"
    with pytest.raises(CloudkvmError) as err:
        unpack_file(bad, out)
    assert err.value.message.startswith(f"{bad}: corrupt {kind} data")
    assert "\n" not in err.value.message and err.value.hint
    assert not out.exists()


def test_output_beyond_the_limit_is_refused_and_removed(tmp_path):
    src = tmp_path / "zeros"
    with open(src, "wb") as f:
        f.truncate(32 << 20)
    packed = compress("xz", src, tmp_path / "zeros.xz")
    assert packed.stat().st_size < 64 << 10  # a small download ...
    out = tmp_path / "out"
    with pytest.raises(CloudkvmError) as err:
        unpack_file(packed, out, limit=8 << 20)  # ... that would unpack to more than allowed
    assert "unpacks to more than 8388608 bytes" in err.value.message
    assert not out.exists()


def test_an_existing_destination_is_never_overwritten(qcow2, tmp_path):
    out = tmp_path / "there"
    out.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        unpack_file(qcow2, out)
    assert out.read_bytes() == b"keep"
