"""qcow2 writes: after random writes through cloudkvm, `qemu-img check` is clean (no errors, no leaks) and
`qemu-img compare` against a raw file that got the same writes says identical."""
import json
import os
import random
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudkvm.errors import CloudkvmError
from cloudkvm.storage import OutOfRange, ReadOnlyDisk, open_disk
from cloudkvm.storage import qcow2
from test_qcow2_read import split_sizes

MiB = 1 << 20


class Model:
    """The image opened through cloudkvm plus a raw twin that receives the same operations."""

    def __init__(self, qemu, tmp_path, img):
        self.qemu, self.img = qemu, img
        self.raw = tmp_path / (img.name + ".twin.raw")
        self.raw.write_bytes(qemu.to_raw(img, tmp_path))
        self.data = bytearray(self.raw.read_bytes())
        self.disk = open_disk(img)

    def write(self, off, data):
        """Every other write by pwritev of the bytes split at random places (storage/vectored.py)."""
        rng = random.Random(off * 31 + len(data))
        if rng.random() < 0.5:
            self.disk.pwrite(data, off)
        else:
            pieces, pos = [], 0
            for n in split_sizes(len(data), rng):
                pieces.append(memoryview(data)[pos:pos + n])
                pos += n
            self.disk.pwritev(pieces, off)
        self.data[off:off + len(data)] = data

    def zero(self, off, n, unmap=False):
        self.disk.write_zeroes(n, off, unmap=unmap)
        self.data[off:off + n] = bytes(n)

    def verify(self, sample=True):
        if sample:
            rng = random.Random(len(self.data))
            for _ in range(40):
                off = rng.randrange(len(self.data))
                n = rng.randrange(min(200_000, len(self.data) - off) + 1)
                assert self.disk.pread(n, off) == bytes(self.data[off:off + n]), (off, n)
        self.disk.close()
        self.raw.write_bytes(self.data)
        self.qemu.check(self.img)
        self.qemu.compare(self.img, self.raw)


def random_writes(model, rng, count, max_len=200_000):
    size = len(model.data)
    for k in range(count):
        kind = rng.random()
        if kind < 0.15:  # small unaligned
            n = rng.randrange(1, 700)
        elif kind < 0.3:  # exactly one aligned 4 KiB block
            n = 4096
        else:
            n = rng.randrange(1, max_len)
        off = rng.randrange(size - n + 1) if kind >= 0.15 or rng.random() < 0.5 else rng.randrange(size // 4096) * 4096
        off = min(off, size - n)
        if kind >= 0.15 and kind < 0.3:
            off -= off % 4096
        model.write(off, rng.randbytes(n))
        if k % 17 == 16:
            model.disk.flush()


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 * MiB])
def test_random_writes_fresh_image(qemu, tmp_path, cluster_size):
    img = qemu.create(tmp_path / "w.qcow2", "24M", cluster_size=cluster_size)
    m = Model(qemu, tmp_path, img)
    random_writes(m, random.Random(cluster_size), 120)
    m.verify()


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_random_writes_over_backing_chain(qemu, tmp_path, compat):
    base = qemu.create(tmp_path / "base.qcow2", "12M", f"compat={compat}", cluster_size=4096)
    qemu.io(base, "write -P 0x5a 0 12M")
    mid = qemu.create(tmp_path / "mid.qcow2", "16M", f"compat={compat}", backing="base.qcow2")
    qemu.io(mid, "write -P 0x11 1M 300k", "write -z 5M 64k", "write -P 0x12 100k 7")
    top = qemu.create(tmp_path / "top.qcow2", "20M", f"compat={compat}", backing="mid.qcow2", cluster_size=65536)
    qemu.io(top, "write -P 0x13 2M 100k")
    m = Model(qemu, tmp_path, top)
    random_writes(m, random.Random(7), 100, max_len=150_000)
    m.verify()
    qemu.check(mid)
    qemu.check(base)


def test_writes_rewrite_compressed_clusters(qemu, tmp_path):
    src = tmp_path / "src.raw"
    rng = random.Random(5)
    src.write_bytes(b"".join(rng.choice([b"A" * 4096, rng.randbytes(4096), bytes(4096)]) for _ in range(1024)))
    for compression in ("zlib", "zstd"):
        img = tmp_path / f"c-{compression}.qcow2"
        qemu.img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={compression},cluster_size=4096",
                 str(src), str(img))
        m = Model(qemu, tmp_path, img)
        random_writes(m, random.Random(11), 80, max_len=20_000)
        m.verify()


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 32, 64])
def test_refcount_widths_write(qemu, tmp_path, bits):
    img = qemu.create(tmp_path / "r.qcow2", "6M", f"refcount_bits={bits}", cluster_size=512)
    qemu.io(img, "write -P 0x21 10k 300k")
    m = Model(qemu, tmp_path, img)
    random_writes(m, random.Random(bits), 40, max_len=100_000)
    m.verify()


def test_refcount_table_growth_small_clusters(qemu, tmp_path):
    """512-byte clusters: one refcount block covers 128 KiB and the 1-cluster table 8 MiB, so writing ~20 MiB
    creates many refcount blocks and moves the refcount table more than once."""
    img = qemu.create(tmp_path / "g.qcow2", "40M", cluster_size=512)
    m = Model(qemu, tmp_path, img)
    chunk = random.Random(1).randbytes(MiB)
    for off in range(0, 20 * MiB, MiB):
        m.write(off, chunk)
    random_writes(m, random.Random(2), 30, max_len=300_000)
    assert m.disk._rt_clusters > 1 and m.disk._rt_offset > MiB  # the table moved and grew
    m.verify()
    info = qemu.check(img)
    assert info["image-end-offset"] > 20 * MiB


@pytest.mark.parametrize("cluster_size", [4096, 65536])
def test_preallocated_zero_clusters_are_filled_in_place(qemu, tmp_path, cluster_size):
    img = qemu.create(tmp_path / "p.qcow2", "8M", "preallocation=metadata", cluster_size=cluster_size)
    size = os.path.getsize(img)
    m = Model(qemu, tmp_path, img)
    random_writes(m, random.Random(3), 30)
    m.verify()
    assert os.path.getsize(img) == size  # no new clusters: the preallocated ones took the data


@pytest.mark.parametrize("backing", [False, True])
@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_discard_and_write_zeroes(qemu, tmp_path, backing, compat):
    if backing:
        b = qemu.create(tmp_path / "b.qcow2", "8M")
        qemu.io(b, "write -P 0x66 0 8M")
    img = qemu.create(tmp_path / "z.qcow2", "8M", f"compat={compat}", backing="b.qcow2" if backing else None,
                      cluster_size=4096)
    m = Model(qemu, tmp_path, img)
    rng = random.Random(9)
    m.write(0, rng.randbytes(8 * MiB))
    m.disk.flush()
    blocks_full = os.stat(img).st_blocks
    for k in range(30):
        off, n = rng.randrange(8 * MiB - 100_000), rng.randrange(1, 100_000)
        m.zero(off, n, unmap=k % 2 == 0)
    m.zero(8 * MiB - 5000, 5000, unmap=True)
    m.disk.discard(64 * 1024, 2 * MiB)  # whole clusters: they read as zeros afterwards (never the backing file)
    if not (backing and compat == "0.10"):
        m.data[2 * MiB:2 * MiB + 65536] = bytes(65536)
    m.disk.discard(100, 7 * MiB + 7)  # partial clusters: left alone
    m.verify()
    if not (backing and compat == "0.10"):  # released clusters were punched out of the file
        assert os.stat(img).st_blocks < blocks_full - 1000


def test_write_zeroes_without_unmap_keeps_clusters(qemu, tmp_path):
    img = qemu.create(tmp_path / "k.qcow2", "4M", cluster_size=65536)
    m = Model(qemu, tmp_path, img)
    m.write(0, b"\xff" * (4 * MiB))
    m.zero(MiB - 100, MiB + 200)             # keeps [1M, 2M) allocated, as zero clusters
    m.zero(3 * MiB, 512 * 1024, unmap=True)  # releases [3M, 3.5M)
    m.verify()
    extents = json.loads(qemu.img("map", "--output=json", str(img)).stdout)

    def at(offset):
        return next(e for e in extents if e["start"] <= offset < e["start"] + e["length"])
    kept, released = at(MiB + 70_000), at(3 * MiB + 70_000)
    assert kept["zero"] and "offset" in kept, kept
    assert released["zero"] and "offset" not in released, released
    with open_disk(img) as d:  # a kept zero cluster takes data in place
        d.pwrite(b"data", MiB + 65536)
    qemu.check(img)
    assert qemu.to_raw(img, tmp_path)[MiB + 65536 - 1:MiB + 65536 + 5] == b"\0data\0"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["write", "write", "write", "zero", "unmap", "discard", "flush", "reopen"]),
                              st.integers(0, 2 * MiB - 1), st.integers(1, 200_000), st.integers(0, 255)),
                    min_size=1, max_size=25))
def test_hypothesis_operations(qemu, tmp_path_factory, ops):
    tmp = tmp_path_factory.mktemp("hyp")
    base = qemu.create(tmp / "base.qcow2", "2M", cluster_size=4096)
    qemu.io(base, "write -P 0x77 0 1M")
    img = qemu.create(tmp / "h.qcow2", "2M", backing="base.qcow2", cluster_size=4096)
    m = Model(qemu, tmp, img)
    for op, off, n, byte in ops:
        n = min(n, 2 * MiB - off)
        if op == "write":
            m.write(off, bytes([byte]) * n)
        elif op in ("zero", "unmap"):
            m.zero(off, n, unmap=op == "unmap")
        elif op == "discard":
            fa, fb = (off + 4095) // 4096 * 4096, (off + n) // 4096 * 4096
            if off + n == 2 * MiB:
                fb = 2 * MiB
            m.disk.discard(n, off)
            if fa < fb:
                m.data[fa:fb] = bytes(fb - fa)
        elif op == "flush":
            m.disk.flush()
        else:
            m.disk.close()
            m.disk = open_disk(img)
        assert m.disk.pread(n, off) == bytes(m.data[off:off + n])
    m.verify()


def test_create_and_info(qemu, tmp_path):
    img = tmp_path / "new.qcow2"
    qcow2.create(img, 10 * MiB + 1)
    info = qemu.info(img)
    assert info["virtual-size"] == 10 * MiB + 512 and info["cluster-size"] == 65536
    assert info["format-specific"]["data"]["compat"] == "1.1"
    assert info["format-specific"]["data"]["refcount-bits"] == 16
    qemu.check(img)
    with open_disk(img) as d:
        assert d.pread(d.size, 0) == bytes(d.size)
        d.pwrite(b"hello", 10 * MiB)
    qemu.check(img)
    assert qemu.to_raw(img, tmp_path)[10 * MiB:10 * MiB + 5] == b"hello"


@pytest.mark.parametrize("cluster_size", [512, 4096, 2 * MiB])
def test_create_cluster_sizes_and_backing(qemu, tmp_path, cluster_size):
    (tmp_path / "b").mkdir()
    base = tmp_path / "b" / "base.raw"
    base.write_bytes(random.Random(4).randbytes(3 * MiB))
    img = tmp_path / "top.qcow2"
    qcow2.create(img, None, backing="b/base.raw", cluster_size=cluster_size)
    info = qemu.info(img)
    assert info["virtual-size"] == 3 * MiB and info["cluster-size"] == cluster_size
    assert info["backing-filename"] == "b/base.raw" and info["backing-filename-format"] == "raw"
    qemu.check(img)
    m = Model(qemu, tmp_path, img)
    assert m.data == base.read_bytes()
    random_writes(m, random.Random(6), 30, max_len=50_000)
    m.verify()


def test_create_big_sizes(qemu, tmp_path):
    img = tmp_path / "big.qcow2"
    qcow2.create(img, 4 << 40)  # 4 TiB: L1 of 8192 entries
    assert qemu.info(img)["virtual-size"] == 4 << 40
    qemu.check(img)
    small = tmp_path / "small512.qcow2"
    qcow2.create(small, 16 << 30, cluster_size=512)  # 16 GiB at 512 B: 4 MiB L1 needs many refcount blocks
    qemu.check(small)
    with open_disk(small) as d:
        d.pwrite(b"x" * 5000, (16 << 30) - 5000)
    qemu.check(small)


def test_create_empty_then_grow(qemu, tmp_path):
    img = tmp_path / "zero.qcow2"
    qcow2.create(img, 0)
    qemu.check(img)
    assert qemu.info(img)["virtual-size"] == 0
    with open_disk(img) as d:
        assert d.size == 0 and d.pread(0, 0) == b""
        d.grow(3 * MiB)
        d.pwrite(b"q" * 70_000, MiB)
    qemu.check(img)
    assert qemu.to_raw(img, tmp_path)[MiB - 1:MiB + 70_001] == b"\0" + b"q" * 70_000 + b"\0"


def test_create_refuses_bad_input_and_open_images(tmp_path):
    img = tmp_path / "c.qcow2"
    for kw, match in ((dict(cluster_size=1000), "power of two"), (dict(cluster_size=4 * MiB), "power of two"),
                      (dict(size=None), "no size"), (dict(size=-1), "negative"),
                      (dict(backing="missing.qcow2"), "no such disk image"),
                      (dict(backing="x" * 1024), "backing file name"),
                      (dict(size=1 << 60, cluster_size=512), "L1 table")):
        args = dict(size=MiB)
        args.update(kw)
        with pytest.raises(CloudkvmError, match=match):
            qcow2.create(img, **args)
    qcow2.create(img, MiB)
    with open_disk(img):
        with pytest.raises(CloudkvmError, match="in use"):
            qcow2.create(img, MiB)


def test_grow(qemu, tmp_path):
    img = qemu.create(tmp_path / "g.qcow2", "1M", cluster_size=512)
    qemu.io(img, "write -P 0x31 0 1M")
    qcow2.grow(img, 2 * MiB)  # fits the L1 table's cluster
    assert qemu.info(img)["virtual-size"] == 2 * MiB
    qemu.check(img)
    with open_disk(img) as d:
        qcow2.grow(d, 64 * MiB)  # the L1 table moves
        d.pwrite(b"z" * 100_000, 64 * MiB - 100_000)
        assert d.pread(10, 0) == b"\x31" * 10
    assert qemu.info(img)["virtual-size"] == 64 * MiB
    qemu.check(img)
    raw = qemu.to_raw(img, tmp_path)
    assert raw[:MiB] == b"\x31" * MiB and raw[MiB:64 * MiB - 100_000] == bytes(63 * MiB - 100_000)
    assert raw[-100_000:] == b"z" * 100_000
    qcow2.grow(img, 64 * MiB)  # no-op
    with pytest.raises(CloudkvmError, match="shrink"):
        qcow2.grow(img, MiB)


def test_grow_with_backing_and_64k_clusters(qemu, tmp_path):
    base = qemu.create(tmp_path / "b.qcow2", "1M")
    qemu.io(base, "write -P 0x41 0 1M")
    img = qemu.create(tmp_path / "t.qcow2", "1M", backing="b.qcow2")
    qcow2.grow(img, 5 << 40)  # past what one L1 cluster holds for 64 KiB clusters (4 TiB)
    qemu.check(img)
    with open_disk(img) as d:
        assert d.pread(MiB + 10, 0) == b"\x41" * MiB + bytes(10)
        d.pwrite(b"end", (5 << 40) - 3)
    qemu.check(img)
    assert qemu.info(img)["virtual-size"] == 5 << 40


def test_read_only_and_range_errors(qemu, tmp_path):
    img = qemu.create(tmp_path / "ro.qcow2", "1M")
    with open_disk(img, read_only=True) as d:
        for call in (lambda: d.pwrite(b"x", 0), lambda: d.discard(512, 0), lambda: d.write_zeroes(512, 0)):
            with pytest.raises(ReadOnlyDisk):
                call()
        with pytest.raises(PermissionError):
            d.pwrite(b"x", 0)
        d.flush()
    with open_disk(img) as d:
        for args in ((10, MiB - 5), (1, -1), (-1, 0)):
            with pytest.raises(ValueError):
                d.pread(*args)
        with pytest.raises(OutOfRange):
            d.pwrite(b"ab", MiB - 1)
        assert d.pread(0, MiB) == b""
        d.pwrite(b"", MiB)
    qemu.check(img)


def test_refusals_for_writing(qemu, tmp_path):
    snap = qemu.create(tmp_path / "s.qcow2", "1M")
    qemu.img("snapshot", "-c", "s1", str(snap))
    with pytest.raises(CloudkvmError, match="snapshots"):
        open_disk(snap)
    open_disk(snap, read_only=True).close()
    ext = qemu.create(tmp_path / "x.qcow2", "1M", "extended_l2=on")
    with pytest.raises(CloudkvmError, match="extended L2"):
        open_disk(ext)
    for bit, word in ((1, "corrupt"), (0, "dirty")):
        img = qemu.create(tmp_path / f"{word}.qcow2", "1M")
        with open(img, "r+b") as f:
            f.seek(72 + 7)
            f.write(bytes([1 << bit]))
        with pytest.raises(CloudkvmError, match=word) as e:
            open_disk(img)
        assert str(img) in e.value.message and "qemu-img check" in e.value.hint
        with open_disk(img, read_only=True) as d:
            assert d.pread(512, 0) == bytes(512)


def test_exclusive_writer_lock(qemu, tmp_path):
    img = qemu.create(tmp_path / "l.qcow2", "1M")
    with open_disk(img):
        with pytest.raises(CloudkvmError, match="in use"):
            open_disk(img)
        with pytest.raises(CloudkvmError, match="in use"):
            open_disk(img, read_only=True)
    with open_disk(img, read_only=True), open_disk(img, read_only=True):
        pass


def test_bitmaps_autoclear_is_cleared(qemu, tmp_path):
    img = qemu.create(tmp_path / "bm.qcow2", "1M")
    qemu.img("bitmap", "--add", str(img), "b0")
    with open_disk(img) as d:
        d.pwrite(b"x" * 4096, 0)
    r = qemu.img("check", str(img), ok=(0, 2, 3))
    assert "Leaked" not in r.stdout and "ERROR" not in r.stdout, r.stdout


def test_copy_of_image_with_many_l2_tables_evicts_cache(qemu, tmp_path):
    """More L2 tables than the cache holds (512-byte clusters: 32 KiB per table), dirty evictions included."""
    img = qemu.create(tmp_path / "e.qcow2", "8M", cluster_size=512)
    m = Model(qemu, tmp_path, img)
    rng = random.Random(12)
    for _ in range(400):
        off = rng.randrange(8 * MiB - 600)
        m.write(off, rng.randbytes(rng.randrange(1, 600)))
    m.verify()
    shutil.rmtree(tmp_path, ignore_errors=True)
