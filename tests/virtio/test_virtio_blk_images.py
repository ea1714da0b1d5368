"""virtio-blk over real images (storage/vectored.py: the data goes by preadv/pwritev straight between the image and
guest RAM): requests the way Linux makes them from scattered pages, checked against qemu-img — reads equal
`qemu-img convert -O raw`, and after writes `qemu-img compare` finds the image equal to a raw twin that got the same
bytes, `qemu-img check` finds it clean."""
import os
import random
import shutil
import struct
import subprocess
import zlib

import pytest

from cloudkvm.devices.virtio import VirtioBlk
from cloudkvm.devices.virtio.blk import VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from cloudkvm.storage import open_disk
from virtio_driver import MiB, Rig

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing (apt-get install qemu-utils)")
PAGE = 4096


def qemu_img(*args):
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


def scattered_request(rig, rng, rtype, sector, pages, data=b""):
    """A request whose data lies in `pages` 4 KiB pages at scattered guest addresses (a direct I/O request from a
    user buffer); returns (status, the bytes read)."""
    mark = rig.alloc.mark()
    try:
        hdr = rig.alloc.alloc(16)
        rig.memory.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
        slots = [rig.alloc.alloc(PAGE, PAGE, fill=0xEE) for _ in range(pages * 2)]
        rng.shuffle(slots)
        slots = slots[:pages]
        for i, gpa in enumerate(slots):
            if data:
                rig.memory.write(gpa, data[i * PAGE:(i + 1) * PAGE])
        status = rig.alloc.alloc(1, fill=0xFF)
        bufs = [(hdr, 16, False), *[(gpa, PAGE, rtype == VIRTIO_BLK_T_IN) for gpa in slots], (status, 1, True)]
        rig.queue.submit(bufs, indirect=rng.random() < 0.5)
        assert len(rig.queue.get_used()) == 1
        return rig.memory.read(status, 1)[0], b"".join(rig.memory.read(gpa, PAGE) for gpa in slots)
    finally:
        rig.alloc.release(mark)


@pytest.mark.parametrize("kind", ["raw", "raw-odd-size", "qcow2-over-compressed-base"])
def test_scattered_reads_and_writes_agree_with_qemu_img(memory, tmp_path, kind):
    rng = random.Random(kind)
    source = tmp_path / "source.raw"
    tail = 3 * 512 if kind == "raw-odd-size" else 0   # the disk's last map granule is then short
    source.write_bytes(rng.randbytes(2 * MiB) + bytes(MiB) + rng.randbytes(MiB + tail))
    if kind.startswith("raw"):
        image, fmt = source, "raw"
    else:
        qemu_img("convert", "-c", "-O", "qcow2", source, tmp_path / "base.qcow2")
        image, fmt = tmp_path / "top.qcow2", "qcow2"
        qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", image)
        qemu_img("convert", "-O", "raw", image, tmp_path / "expected.raw")
    twin = bytearray((tmp_path / "expected.raw").read_bytes() if fmt != "raw" else source.read_bytes())
    disk = open_disk(image, format=fmt)
    rig = Rig(memory, VirtioBlk(disk))
    rig.driver.init()
    try:
        for _ in range(40):
            pages = rng.choice([1, 2, 16, 126, 254])           # 254: seg_max, a chain as long as the queue
            sector = rng.randrange((len(twin) - pages * PAGE) // 512)
            if rng.random() < 0.4:
                data = rng.randbytes(pages * PAGE)
                assert scattered_request(rig, rng, VIRTIO_BLK_T_OUT, sector, pages, data)[0] == VIRTIO_BLK_S_OK
                twin[sector * 512:sector * 512 + len(data)] = data
            else:
                status, got = scattered_request(rig, rng, VIRTIO_BLK_T_IN, sector, pages)
                assert status == VIRTIO_BLK_S_OK and got == twin[sector * 512:sector * 512 + pages * PAGE], sector
        last = len(twin) // 512 - 8                        # the disk's last 4 KiB
        before = rig.device.data_path.served_total
        assert rig.blk(VIRTIO_BLK_T_IN, last, in_len=4096)[:2] == (VIRTIO_BLK_S_OK, bytes(twin[last * 512:]))
        assert rig.device.data_path.served_total == before + 1           # by C, the short last granule too
        assert rig.device.data_path.served_total > 20                    # most of the random requests too
    finally:
        rig.device.close()   # closes the disk too
    (tmp_path / "twin.raw").write_bytes(twin)
    qemu_img("compare", "-f", fmt, "-F", "raw", image, tmp_path / "twin.raw")
    if fmt == "qcow2":
        qemu_img("check", image)


def test_reads_follow_the_clusters_that_writes_and_zeroing_move(memory, tmp_path):
    """The C path's map of where disk bytes are is forgotten around every change blk.py makes: a read served from the
    base, then a copy-on-write into the overlay, then a write in place, then write-zeroes keeping the cluster
    allocated (its old bytes stay in the file, the image says zeros): each read sees what qemu-img sees."""
    from cloudkvm.devices.virtio.blk import VIRTIO_BLK_T_WRITE_ZEROES
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x11" * (2 * MiB))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top)
    disk = open_disk(top, format="qcow2")
    rig = Rig(memory, VirtioBlk(disk))
    rig.driver.init()
    try:
        path = rig.device.data_path

        def in_c(result, served=1):
            """`result`, checked to come from a request C served (so a stale map would have shown)."""
            assert path.served_total == in_c.before + served, "not served by the C path"
            in_c.before = path.served_total
            return result
        in_c.before = path.served_total
        read = lambda sector, n: in_c(rig.blk(VIRTIO_BLK_T_IN, sector, in_len=n)[:2])  # noqa: E731
        python = lambda *a, **k: in_c(rig.blk(*a, **k)[0], served=0)                 # noqa: E731
        assert read(8, 4096) == (VIRTIO_BLK_S_OK, b"\x11" * 4096)                    # from the base's place
        assert python(VIRTIO_BLK_T_OUT, 8, out=b"\x22" * 512) == VIRTIO_BLK_S_OK     # copy-on-write
        assert read(8, 1024) == (VIRTIO_BLK_S_OK, b"\x22" * 512 + b"\x11" * 512)
        assert in_c(rig.blk(VIRTIO_BLK_T_OUT, 9, out=b"\x33" * 512)[0]) == VIRTIO_BLK_S_OK   # in place, by C
        assert read(8, 1536) == (VIRTIO_BLK_S_OK, b"\x22" * 512 + b"\x33" * 512 + b"\x11" * 512)
        cluster = struct.pack("<QII", 0, 128, 0)            # the whole first 64 KiB cluster, no unmap
        assert python(VIRTIO_BLK_T_WRITE_ZEROES, out=cluster) == VIRTIO_BLK_S_OK
        assert read(8, 1024) == (VIRTIO_BLK_S_OK, bytes(1024))
        assert python(VIRTIO_BLK_T_OUT, 8, out=b"\x44" * 512) == VIRTIO_BLK_S_OK      # fills the zero cluster
        assert read(8, 1024) == (VIRTIO_BLK_S_OK, b"\x44" * 512 + bytes(512))
    finally:
        rig.device.close()
    expected = bytearray(b"\x11" * (2 * MiB))
    expected[:65536] = bytes(65536)
    expected[4096:4608] = b"\x44" * 512
    (tmp_path / "expected.raw").write_bytes(expected)
    qemu_img("compare", "-f", "qcow2", "-F", "raw", top, tmp_path / "expected.raw")
    qemu_img("check", top)


# ---- compressed clusters, inflated by the C path (kvm/virtio_blk.c, zlib) -------------------------------------------

CLUSTER = 65536


def text_like(rng, size: int) -> bytes:
    """Bytes every 64 KiB cluster of which compresses, and no two clusters alike."""
    return b"".join(f"{i:08d} {rng.random()}\n".encode() for i in range(size // 16))[:size]


def compressed_cluster(image, guest_offset: int) -> tuple[int, int]:
    """(host offset, length) of the compressed data of the cluster at `guest_offset`, read from the image by the
    qcow2 spec (header: cluster_bits at 20, l1_table_offset at 40; "Compressed Clusters Descriptor")."""
    with open(image, "rb") as f:
        raw = f.read()
    cluster_bits, = struct.unpack_from(">I", raw, 20)
    l1_offset, = struct.unpack_from(">Q", raw, 40)
    l2_entries = 1 << (cluster_bits - 3)
    l1e, = struct.unpack_from(">Q", raw, l1_offset + 8 * ((guest_offset >> cluster_bits) // l2_entries))
    l2e, = struct.unpack_from(">Q", raw, (l1e & 0x00FFFFFFFFFFFE00) + 8 * ((guest_offset >> cluster_bits) % l2_entries))
    assert l2e >> 62 & 1, "not a compressed cluster"
    x = 62 - (cluster_bits - 8)
    offset, sectors = l2e & ((1 << x) - 1), ((l2e >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return offset, sectors * 512 - offset % 512


@pytest.fixture
def compressed_chain(tmp_path):
    """A qcow2 overlay over a base qemu-img compressed (4 MiB, every cluster compressed), and qemu-img's raw view."""
    source = tmp_path / "source.raw"
    source.write_bytes(text_like(random.Random(5), 4 * MiB))
    qemu_img("convert", "-c", "-O", "qcow2", source, tmp_path / "base.qcow2")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", tmp_path / "top.qcow2")
    return tmp_path / "top.qcow2", tmp_path / "base.qcow2", source.read_bytes()


@pytest.mark.parametrize("notifier", [False, True], ids=["process", "notifier"])
def test_compressed_clusters_are_inflated_by_the_c_path(memory, compressed_chain, monkeypatch, notifier):
    """Scattered reads across the base's compressed clusters equal qemu-img's bytes, every one served by C with
    Python never inflating a cluster; a cluster read again comes from C's cache."""
    from cloudkvm.storage.qcow2 import Qcow2Disk
    top, _, expected = compressed_chain

    def no_python(*_):
        raise AssertionError("a compressed cluster inflated by the disk's Python code")
    monkeypatch.setattr(Qcow2Disk, "_decompress", no_python)
    rng = random.Random(6)
    rig = Rig(memory, VirtioBlk(open_disk(top, format="qcow2")), notifier=notifier)
    rig.driver.init()
    try:
        path = rig.device.data_path
        for _ in range(30):
            pages = rng.choice([1, 3, 16, 40])
            sector = rng.randrange((len(expected) - pages * PAGE) // 512)
            status, got = scattered_request(rig, rng, VIRTIO_BLK_T_IN, sector, pages)
            assert status == VIRTIO_BLK_S_OK and got == expected[sector * 512:sector * 512 + pages * PAGE], sector
        assert path.served_total == 30 and path.inflated >= 30
        cluster = 7 * CLUSTER // 512
        assert rig.blk(VIRTIO_BLK_T_IN, cluster, in_len=4096)[:2] == (VIRTIO_BLK_S_OK, expected[7 * CLUSTER:][:4096])
        inflated = path.inflated
        for sector in (cluster + 8, cluster + 120, cluster):            # the same cluster: from the cache
            assert rig.blk(VIRTIO_BLK_T_IN, sector, in_len=4096)[:2] == \
                (VIRTIO_BLK_S_OK, expected[sector * 512:sector * 512 + 4096])
        assert path.inflated == inflated and path.served_total == 34
    finally:
        rig.device.close()


@pytest.mark.parametrize("damage", ["garbage", "short-stream"])
def test_a_damaged_compressed_cluster_is_an_io_error_and_its_neighbours_still_read(memory, compressed_chain, damage):
    """A malicious or damaged image: a compressed cluster whose data does not inflate, or inflates to less than a
    cluster, is not served from C; the disk's own code reports it (IOERR), the VMM goes on, and the clusters around
    it still read right, by C."""
    top, base, expected = compressed_chain
    offset, _ = compressed_cluster(base, 5 * CLUSTER)
    length = compressed_cluster(base, 6 * CLUSTER)[0] - offset   # (the next cluster's data may share a sector)
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    bad = os.urandom(length) if damage == "garbage" else (packer.compress(b"x" * 1000) + packer.flush())
    assert len(bad) <= length
    with open(base, "r+b") as f:
        f.seek(offset)
        f.write(bad.ljust(length, b"\0"))
    rig = Rig(memory, VirtioBlk(open_disk(top, format="qcow2")))
    rig.driver.init()
    try:
        path = rig.device.data_path
        assert rig.blk(VIRTIO_BLK_T_IN, 5 * CLUSTER // 512, in_len=4096)[0] == VIRTIO_BLK_S_IOERR
        assert path.served_total == 0
        for cluster in (4, 6):
            sector = cluster * CLUSTER // 512
            assert rig.blk(VIRTIO_BLK_T_IN, sector, in_len=8192)[:2] == \
                (VIRTIO_BLK_S_OK, expected[cluster * CLUSTER:cluster * CLUSTER + 8192])
        assert path.served_total == 2 and not rig.device.needs_reset
    finally:
        rig.device.close()


def test_a_compressed_cluster_that_inflates_past_its_end_reads_as_its_first_cluster_of_bytes(memory, compressed_chain):
    """Deflate data that inflates to more than a cluster: C takes the first cluster of bytes, as the disk's own
    code does (and QEMU); the rest of the stream is never looked at."""
    top, base, _ = compressed_chain
    offset, _ = compressed_cluster(base, 5 * CLUSTER)
    length = compressed_cluster(base, 6 * CLUSTER)[0] - offset
    payload = bytes(range(256)) * (3 * CLUSTER // 256)
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = packer.compress(payload) + packer.flush()
    assert len(stream) <= length
    with open(base, "r+b") as f:
        f.seek(offset)
        f.write(stream)
    with open_disk(top, format="qcow2") as disk:
        by_python = disk.pread(CLUSTER, 5 * CLUSTER)
    rig = Rig(memory, VirtioBlk(open_disk(top, format="qcow2")))
    rig.driver.init()
    try:
        status, got, _ = rig.blk(VIRTIO_BLK_T_IN, 5 * CLUSTER // 512, in_len=CLUSTER)
        assert (status, got) == (VIRTIO_BLK_S_OK, payload[:CLUSTER]) and got == by_python
        assert rig.device.data_path.served_total == 1 and rig.device.data_path.inflated == 1
    finally:
        rig.device.close()


def test_a_sequential_reader_learns_the_map_in_growing_windows_a_random_one_in_small_ones(memory, tmp_path):
    """Each map miss is a round trip to Python: a reader going straight on gets twice the window each time (64 MiB
    of 1 MiB reads in 4 misses, not 8), a read elsewhere starts again at FILL_WINDOW; every read equals the base."""
    from cloudkvm.devices.virtio.blk_native import FILL_WINDOW
    base, rng, far = tmp_path / "base.raw", random.Random(9), 400 * MiB
    with open(base, "wb") as f:
        f.write(rng.randbytes(64 * MiB))
        f.seek(far)
        f.write(rng.randbytes(4096))
        f.truncate(512 * MiB)
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", tmp_path / "top.qcow2")
    expected = base.read_bytes()
    rig = Rig(memory, VirtioBlk(open_disk(tmp_path / "top.qcow2", format="qcow2")))
    rig.driver.init()
    try:
        path = rig.device.data_path
        misses = []
        learn = path.fill
        path.fill = lambda offset, length: misses.append(offset) or learn(offset, length)
        for mib in range(64):
            status, got, _ = rig.blk(VIRTIO_BLK_T_IN, mib * MiB // 512, in_len=MiB)
            assert status == VIRTIO_BLK_S_OK and got == expected[mib * MiB:(mib + 1) * MiB], mib
        window = FILL_WINDOW * path.granule
        assert misses == [0, window, 3 * window, 7 * window]
        assert path.served_total == 64
        assert rig.blk(VIRTIO_BLK_T_IN, far // 512, in_len=4096)[:2] == (VIRTIO_BLK_S_OK, expected[far:far + 4096])
        assert misses[-1] == far and path._window == FILL_WINDOW
    finally:
        rig.device.close()
