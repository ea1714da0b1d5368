"""virtio-blk over real images (storage/vectored.py: the data goes by preadv/pwritev straight between the image and
guest RAM): requests the way Linux makes them from scattered pages, checked against qemu-img — reads equal
`qemu-img convert -O raw`, and after writes `qemu-img compare` finds the image equal to a raw twin that got the same
bytes, `qemu-img check` finds it clean."""
import random
import shutil
import struct
import subprocess

import pytest

from cloudkvm.devices.virtio import VirtioBlk
from cloudkvm.devices.virtio.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
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
