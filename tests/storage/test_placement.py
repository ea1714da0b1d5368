"""`Disk.runs` and `locate` (storage/placement.py), what virtio-blk's C path reads and writes by: a Place holds
the bytes the disk reads (checked with os.pread against qemu-img's view of the image), ZEROS only where qemu-img
reads zeros, a Deflated cluster only where its bytes inflate (Python's zlib) to what qemu-img reads, and `writable`
only where a write in place is what the disk itself would do."""
import os
import random
import zlib

import pytest

from cloudkvm.storage import open_disk
from cloudkvm.storage.placement import ZEROS, Deflated, Place, locate

MiB = 1 << 20
CLUSTER = 65536


def bytes_at(place: Place, length: int) -> bytes:
    data = os.pread(place.fd, length, place.offset)
    return data + bytes(length - len(data))   # a cluster allocated at the end of the file may be written in part


def inflated(cluster: Deflated) -> bytes:
    """The bytes of a Deflated cluster: its data read from its file and inflated as raw deflate (RFC 1951)."""
    return zlib.decompressobj(-15).decompress(os.pread(cluster.fd, cluster.length, cluster.offset), CLUSTER)


@pytest.fixture
def overlay(tmp_path, qemu):
    """A 4 MiB qcow2 over a compressed qcow2 base, with every kind of cluster qemu-io can make."""
    raw = tmp_path / "source.raw"
    raw.write_bytes(bytes(range(256)) * 4096 + bytes(MiB) + os.urandom(2 * MiB))  # compressible, zeros, not
    qemu.img("convert", "-q", "-c", "-O", "qcow2", raw, tmp_path / "base.qcow2")
    top = qemu.create(tmp_path / "top.qcow2", None, backing="base.qcow2")
    qemu.io(top, "write -P 0x61 0 64k",                  # allocated in the overlay
            "write -P 0x62 192k 128k",                      # two clusters
            "write -z 512k 64k",                            # a zero cluster over the base
            "write -z -u 3m 64k")                           # unmapped zeros over data
    return top, qemu.to_raw(top, tmp_path)


def test_runs_cover_any_range_with_pieces_holding_the_bytes_qemu_img_reads(overlay):
    top, expected = overlay
    rng = random.Random(3)
    with open_disk(top) as disk:
        ranges = [(0, disk.size)] + [(o, rng.randrange(1, disk.size - o + 1)) for o in
                                     (rng.randrange(disk.size) for _ in range(40))]
        for offset, length in ranges:
            pieces = disk.runs(offset, length)
            assert [p[0] for p in pieces] == [offset] + [p[0] + p[1] for p in pieces[:-1]]   # consecutive
            assert pieces[-1][0] + pieces[-1][1] == offset + length and all(p[1] > 0 for p in pieces)
            for start, size, answer in pieces:
                want = expected[start:start + size]
                if isinstance(answer, Place):
                    assert bytes_at(answer, size) == want, start
                    assert answer.writable == (answer.fd == disk._fd)   # owned here, or the base's
                elif isinstance(answer, Deflated):
                    assert size == CLUSTER and start % CLUSTER == 0 and inflated(answer) == want, start
                    assert answer.fd != disk._fd                        # the base's
                elif answer == ZEROS:
                    assert want == bytes(size), start
                else:
                    assert answer is None
        whole = disk.runs(0, disk.size)
        assert {type(a).__name__ if a is not None else "None" for _, _, a in whole} >= {"Place", "str", "Deflated"}
        # part of a compressed cluster: only the disk's own code reads it
        assert [a for _, _, a in disk.runs(2 * CLUSTER + 512, 4096)] == [None]


def test_every_granule_of_a_qcow2_chain_is_located_where_its_bytes_are(overlay):
    top, expected = overlay
    kinds = set()
    with open_disk(top) as disk:
        for offset in range(0, disk.size, CLUSTER):
            place = locate(disk, offset, CLUSTER)
            want = expected[offset:offset + CLUSTER]
            if isinstance(place, Place):
                assert bytes_at(place, CLUSTER) == want, offset
                owned = offset in (0, 192 * 1024, 256 * 1024)
                assert place.writable == owned and (place.fd == disk._fd) == owned, offset
                kinds.add("overlay" if owned else "base")
            elif isinstance(place, Deflated):
                assert inflated(place) == want, offset
                kinds.add("compressed")
            elif place == ZEROS:
                assert want == bytes(CLUSTER), offset
                kinds.add("zeros")
            else:
                assert place is None
                kinds.add("other")
        assert locate(disk, 192 * 1024, 2 * CLUSTER) == Place(disk._fd, locate(disk, 192 * 1024, CLUSTER).offset, True)
        assert locate(disk, 0, 2 * CLUSTER) is None        # overlay then base: two places
        assert locate(disk, disk.size - 512, 1024) is None  # past the end
    # the base's compressed clusters are Deflated, the ones qemu-img left uncompressed (random bytes) have a place;
    # its all-zero clusters are unallocated (zeros); nothing else
    assert kinds == {"overlay", "base", "zeros", "compressed"}


def test_an_uncompressed_base_is_located_but_never_writable(tmp_path, qemu):
    base = tmp_path / "base.raw"
    base.write_bytes(os.urandom(MiB))
    top = qemu.create(tmp_path / "top.qcow2", None, backing="base.raw", backing_fmt="raw")
    with open_disk(top) as disk:
        place = locate(disk, CLUSTER, CLUSTER)
        assert not place.writable and place.fd != disk._fd
        assert bytes_at(place, CLUSTER) == base.read_bytes()[CLUSTER:2 * CLUSTER]
    with open_disk(top, read_only=True) as disk:
        disk_place = locate(disk, 0, 512)
        assert not disk_place.writable


def test_raw_is_the_file_itself_except_a_probed_first_sector(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(MiB))
    with open_disk(path, format="raw") as disk:
        assert locate(disk, 4096, 8192) == Place(disk._fd, 4096, True)
        assert disk.runs(0, MiB) == [(0, MiB, Place(disk._fd, 0, True))]
    with open_disk(path) as probed:                       # probed raw: the first sector keeps its guard
        assert locate(probed, 0, 512).writable is False
        assert locate(probed, 0, 4096) is None             # the guarded sector and the rest: two pieces
        assert locate(probed, 65536, 4096).writable is True
        fd = probed._fd
        assert probed.runs(0, 8192) == [(0, 512, Place(fd, 0, False)), (512, 7680, Place(fd, 512, True))]
    with open_disk(path, format="raw", read_only=True) as disk:
        assert locate(disk, 4096, 512).writable is False
        assert locate(disk, MiB - 512, 1024) is None


def test_zstd_clusters_are_left_to_the_disk(tmp_path, qemu):
    """Only raw deflate is Deflated: a zstd-compressed image's clusters have no answer (the disk inflates them)."""
    raw = tmp_path / "source.raw"
    raw.write_bytes(bytes(range(256)) * 1024)
    qemu.img("convert", "-q", "-c", "-O", "qcow2", "-o", "compression_type=zstd", raw, tmp_path / "zstd.qcow2")
    with open_disk(tmp_path / "zstd.qcow2") as disk:
        assert [a for _, _, a in disk.runs(0, disk.size)] == [None] * (disk.size // CLUSTER)
        assert disk.pread(disk.size, 0) == raw.read_bytes()
