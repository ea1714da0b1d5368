"""Writes the seed corpora in fuzz/seeds/<target>/ from real inputs: `python3 fuzz/make_seeds.py [TARGET...]`.

- virtqueue, virtio_blk, virtio_net: rings and buffers laid out by the test suite's Linux-like virtio driver
  (tests/virtio/virtio_driver.py) and frames from tests/virtio_net/net_rig.py, in each harness's layout;
- qcow2: images made by `qemu-img create` / `convert` / `snapshot` and written by `qemu-io` (Debian qemu-utils),
  512-byte clusters so that an image is a few KiB;
- profile: the repository's profiles, the broken profiles of tests/profiles/broken, and a few that use the
  loader's features (base:, ${VAR:-default}, anchors and merge keys, every section).
The seeds are committed; rerun this after changing a harness's input format.
"""
import os
import shutil
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT, os.path.join(ROOT, "tests", "virtio"), os.path.join(ROOT, "tests", "virtio_net")]

from cloudkvm.devices.virtio.blk import (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,  # noqa: E402
                                         VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
                                         VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
from cloudkvm.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE  # noqa: E402
from cloudkvm.kvm.memory import GuestMemory  # noqa: E402
from targets import qcow2 as qcow2_target  # noqa: E402
from targets import virtio_blk as blk_target  # noqa: E402
from targets import virtio_net as net_target  # noqa: E402
from targets import virtqueue as vq_target  # noqa: E402
from virtio_driver import Allocator, DriverQueue  # noqa: E402

SEEDS = os.path.join(HERE, "seeds")


class _Driver:
    """What DriverQueue needs from a driver: the memory (kicks are not used here)."""

    def __init__(self, memory):
        self.memory = memory


def _queue(memory, size: int, rings: tuple[int, int, int] | None, alloc: Allocator, start: int = 0) -> DriverQueue:
    """A driver queue whose buffers come from `alloc`; its rings at `rings`, or allocated from `alloc`."""
    if rings is None:
        q = DriverQueue(_Driver(memory), 0, size, alloc)
    else:
        q = DriverQueue(_Driver(memory), 0, size, Allocator(memory, 0, 0x4000))  # scratch, then moved
        q.desc, q.avail, q.used = rings
        q.alloc = alloc
    q.avail_idx = start
    return q


def _ram(memory, regions) -> bytes:
    out = b"".join(memory.read(gpa, size) for gpa, size in regions)
    return out.rstrip(b"\0")


def _write(target: str, name: str, data: bytes) -> None:
    folder = os.path.join(SEEDS, target)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


# ---- virtqueue -----------------------------------------------------------------------------------------------------

def virtqueue_seeds() -> None:
    def seed(name, size, flags, chains, start=0, max_pops=0, extra=None):
        mem = GuestMemory(list(vq_target.REGIONS))
        try:
            alloc = Allocator(mem, 0, 0x1000)
            q = _queue(mem, size, None, alloc, start)
            for bufs, indirect in chains:
                q.add(bufs, indirect=indirect)
            if extra:
                extra(q, mem)
            q.publish()
            log2 = size.bit_length() - 1
            header = vq_target.HEADER.pack(log2 | flags, q.desc, q.avail, q.used, start, max_pops)
            _write("virtqueue", name, header + _ram(mem, vq_target.REGIONS))
        finally:
            mem.close()

    hi = 0x2000   # the second RAM region
    seed("direct", 8, 0, [([(0x900, 16, False), (0xA00, 512, True), (0xC00, 1, True)], False),
                          ([(0xC10, 64, False)], False), ([(hi, 100, True), (hi + 0x100, 100, True)], False)])
    seed("indirect", 16, 0x20, [([(0x900, 16, False), (hi, 1500, True)], True),
                                ([(0xA00, 16, False), (0xA10, 8, False), (0xA20, 1, True)], True),
                                ([(0xB00, 32, True)], False)])
    seed("event-idx-wrapped", 16, 0x10, [([(0xC00 + 16 * k, 16, k % 2 == 1)], False) for k in range(4)], start=65534)
    seed("max-pops", 4, 0, [([(0x900, 16, False)], False)] * 3, max_pops=2)

    def loop(q, mem):   # a chain whose second descriptor points back at the first
        head = q.free.pop(0)
        nxt = q.free.pop(0)
        q.write_desc(head, 0x900, 16, VIRTQ_DESC_F_NEXT, nxt)
        q.write_desc(nxt, 0x910, 16, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, head)
        q.put_avail(head)
    seed("bad-chains", 8, 0x20, [([(0x0FF0, 0x20, False)], False),          # straddles the hole after region 0
                                 ([(hi, 16, True), (0x900, 16, False)], False)], extra=loop)   # read after write


# ---- virtio-blk ----------------------------------------------------------------------------------------------------

def _blk_request(q, mem, alloc, rtype, sector=0, out=b"", in_len=0, indirect=False, split=0):
    hdr = alloc.alloc(16)
    mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
    bufs = [(hdr, 16, False)]
    if out:
        pieces = [out[:split], out[split:]] if split else [out]
        for piece in pieces:
            buf = alloc.alloc(len(piece))
            mem.write(buf, piece)
            bufs.append((buf, len(piece), False))
    if in_len:
        bufs.append((alloc.alloc(in_len, fill=0xEE), in_len, True))
    bufs.append((alloc.alloc(1, fill=0xFF), 1, True))
    q.add(bufs, indirect=indirect)


def blk_seeds() -> None:
    rings = (blk_target.DESC, blk_target.AVAIL, blk_target.USED)

    def seed(name, header, requests, size=16):
        mem = GuestMemory([(0, blk_target.RAM)])
        try:
            alloc = Allocator(mem, 0x300, blk_target.RAM)
            q = _queue(mem, size, rings, alloc)
            for kwargs in requests:
                _blk_request(q, mem, alloc, **kwargs)
            q.publish()
            _write("virtio_blk", name, blk_target.HEADER.pack(*header) + _ram(mem, [(0, blk_target.RAM)]))
        finally:
            mem.close()

    segment = struct.Struct("<QII")
    seed("read-write-flush-id", (0x03, 0x02, 4, 0x10), [
        dict(rtype=VIRTIO_BLK_T_IN, sector=4, in_len=1024),
        dict(rtype=VIRTIO_BLK_T_OUT, sector=0, out=b"W" * 512),
        dict(rtype=VIRTIO_BLK_T_FLUSH),
        dict(rtype=VIRTIO_BLK_T_GET_ID, in_len=20)])
    seed("discard-write-zeroes", (0x01, 0x06, 4, 0x00), [
        dict(rtype=VIRTIO_BLK_T_DISCARD, out=segment.pack(8, 8, 0)),
        dict(rtype=VIRTIO_BLK_T_WRITE_ZEROES, out=segment.pack(16, 4, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
             + segment.pack(32, 1, 0))])
    seed("indirect-split-unknown", (0x01, 0x00, 3, 0x40), [
        dict(rtype=VIRTIO_BLK_T_IN, sector=2, in_len=512, indirect=True),
        dict(rtype=VIRTIO_BLK_T_OUT, sector=126, out=b"S" * 1024, split=100),
        dict(rtype=99)], size=8)
    seed("read-only-out-of-range", (0x00, 0x09, 3, 0x00), [
        dict(rtype=VIRTIO_BLK_T_OUT, sector=1, out=b"R" * 512),
        dict(rtype=VIRTIO_BLK_T_IN, sector=127, in_len=1024)], size=8)
    seed("backend-error", (0x00, 0x00, 2, 0x01), [dict(rtype=VIRTIO_BLK_T_IN, sector=0, in_len=512)], size=4)
    # the same requests on the C data path (run bit 7): a memfd disk that says where its bytes are
    seed("c-path-read-write-flush-id", (0x03, 0x02, 4, 0x90), [
        dict(rtype=VIRTIO_BLK_T_IN, sector=4, in_len=1024),
        dict(rtype=VIRTIO_BLK_T_OUT, sector=0, out=b"W" * 512),
        dict(rtype=VIRTIO_BLK_T_FLUSH),
        dict(rtype=VIRTIO_BLK_T_IN, sector=126, in_len=1024, indirect=True)])
    seed("c-path-read-only-device", (0x00, 0x08, 4, 0xC0), [
        dict(rtype=VIRTIO_BLK_T_OUT, sector=1, out=b"R" * 512),
        dict(rtype=VIRTIO_BLK_T_OUT, sector=3, out=b"S" * 1024, split=100),
        dict(rtype=VIRTIO_BLK_T_IN, sector=127, in_len=1024)])


# ---- virtio-net ----------------------------------------------------------------------------------------------------

def net_seeds() -> None:
    from net_rig import HDR, NEEDS_CSUM, arp_frame, l4_frame

    def seed(name, accept, mtu_choice, tx, rx_posts, deliver, size_log2=4):
        mem = GuestMemory([(0, net_target.RAM)])
        try:
            alloc = Allocator(mem, 0x700, net_target.RAM)
            rxq = _queue(mem, 1 << size_log2, net_target.RX_RINGS, alloc)
            txq = _queue(mem, 1 << size_log2, net_target.TX_RINGS, alloc)
            for frame, flags, csum_start, csum_offset, indirect in tx:
                data = HDR.pack(flags, 0, 0, 0, csum_start, csum_offset, 0) + frame
                half = len(data) // 2
                bufs = []
                for piece in (data[:half], data[half:]):
                    gpa = alloc.alloc(len(piece))
                    mem.write(gpa, piece)
                    bufs.append((gpa, len(piece), False))
                txq.add(bufs, indirect=indirect)
            for size in rx_posts:
                rxq.add([(alloc.alloc(size, fill=0xEE), size, True)])
            rxq.publish()
            txq.publish()
            frames = b"".join(struct.pack("<H", len(f)) + f for f in deliver)
            header = net_target.HEADER.pack(accept, size_log2 | size_log2 << 4, mtu_choice, len(deliver))
            _write("virtio_net", name, header + frames + _ram(mem, [(0, net_target.RAM)]))
        finally:
            mem.close()

    tcp4, start4, off4 = l4_frame(4, 6, b"hello tcp", checksum="partial")
    udp6, start6, off6 = l4_frame(6, 17, b"hello udp", checksum="partial", vlan=5)
    udp4_full = l4_frame(4, 17, b"u" * 300)[0]
    tcp6_full = l4_frame(6, 6, b"t" * 900)[0]
    seed("mergeable-csum", 0x1F, 0, [(arp_frame(), 0, 0, 0, False), (tcp4, NEEDS_CSUM, start4, off4, False)],
         [512] * 4, [udp4_full, tcp6_full])
    seed("whole-buffers-vlan", 0x0E, 2, [(udp6, NEEDS_CSUM, start6, off6, True)], [1526, 1526],
         [arp_frame(), l4_frame(4, 6, b"x" * 1400)[0]])
    seed("small-mtu", 0x03, 1, [(arp_frame(), 0, 0, 0, False)], [128, 128], [arp_frame(), udp4_full], size_log2=2)
    seed("mergeable-csum-link", 0x3F, 0, [(arp_frame(), 0, 0, 0, False), (tcp4, NEEDS_CSUM, start4, off4, False)],
         [512] * 4, [udp4_full, tcp6_full])


# ---- qcow2 ---------------------------------------------------------------------------------------------------------

def _ops(*ops) -> bytes:
    """(kind name, fraction of the disk 0..65535, length in 256-byte units) -> the 16-byte operation program."""
    out = b""
    for kind, where, units in ops:
        out += qcow2_target.OP.pack(qcow2_target.KINDS.index(kind), where >> 8, units - 1, where & 0xFF)
    return out


def qcow2_seeds() -> None:
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        raise SystemExit("qcow2 seeds need qemu-img and qemu-io (apt-get install qemu-utils)")
    work = tempfile.mkdtemp(prefix="cloudkvm-seeds-")
    try:
        def run(*args):
            subprocess.run(args, cwd=work, check=True, capture_output=True)

        with open(os.path.join(work, "base.raw"), "wb") as f:
            f.write(bytes(range(256)) * 256)
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "base.qcow2", "64K")
        with open(os.path.join(work, "pattern.raw"), "wb") as f:
            f.write(b"".join(bytes([k]) * 512 + bytes(range(256)) * 2 for k in range(32)))

        def image(name, options, size=None, backing=(), io=(), convert=None, snapshot=False):
            path = name + ".qcow2"
            if convert:
                run("qemu-img", "convert", "-O", "qcow2", "-o", options, *convert, "pattern.raw", path)
            else:
                run("qemu-img", "create", "-q", "-f", "qcow2", "-o", options, *backing, path,
                    *([size] if size else []))
            for command in io:
                run("qemu-io", "-f", "qcow2", "-c", command, path)
            if snapshot:
                run("qemu-img", "snapshot", "-c", "s1", path)
            with open(os.path.join(work, path), "rb") as f:
                return f.read()

        writes = ("write -P 0x11 0 4k", "write -z 8k 4k", "write -P 0x22 64k 1k", "discard 0 512")
        rw = _ops(("write", 0, 8), ("read", 0, 64), ("discard", 0x100, 4), ("flush", 0, 1))
        zeros = _ops(("write_zeroes", 0x80, 16), ("write_zeroes_unmap", 0x10, 2), ("write", 0x11, 1),
                     ("read", 0, 255))
        partial = _ops(("write", 0x0333, 3), ("discard", 0x4000, 40), ("write", 0xFFF0, 2), ("flush", 0, 1))
        c512 = "cluster_size=512"
        seeds = {
            "v3-empty": rw + image("v3-empty", c512, "1M"),
            "v3-data": zeros + image("v3-data", c512, "1M", io=writes),
            "v2-data": partial + image("v2-data", c512 + ",compat=0.10", "1M", io=writes),
            "backing-raw": rw + image("backing-raw", c512, backing=("-b", "base.raw", "-F", "raw"),
                                      io=("write -P 0x33 1k 1k",)),
            "backing-qcow2": partial + image("backing-qcow2", c512, backing=("-b", "base.qcow2", "-F", "qcow2"),
                                             io=("write -P 0x44 0 600",)),
            "compressed-zlib": rw + image("compressed-zlib", c512, convert=("-c",)),
            "compressed-zstd": zeros + image("compressed-zstd", c512 + ",compression_type=zstd", convert=("-c",)),
            "refcount-1bit": partial + image("refcount-1bit", c512 + ",refcount_bits=1", "256K", io=writes[:2]),
            "refcount-64bit": zeros + image("refcount-64bit", c512 + ",refcount_bits=64", "256K", io=writes[:2]),
            "snapshot": rw + image("snapshot", c512, "128K", io=writes[:1], snapshot=True),
            "lazy-refcounts": rw + image("lazy-refcounts", c512 + ",lazy_refcounts=on", "128K"),
            "cluster-4k": partial + image("cluster-4k", "cluster_size=4096", "1M", io=writes),
            "extended-l2": rw + image("extended-l2", "cluster_size=16k,extended_l2=on", "1M",
                                      io=("write -P 0x55 2k 1k", "write -z 8k 1k")),
        }
        for name, data in seeds.items():
            if len(data) > qcow2_target.MAX_LEN:
                raise SystemExit(f"qcow2 seed {name} is {len(data)} bytes, over MAX_LEN {qcow2_target.MAX_LEN}")
            _write("qcow2", name, data)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- profile -------------------------------------------------------------------------------------------------------

PROFILES = {
    "features.yaml": """\
base: base.yaml
name: fuzz-${USER_NAME:-vm}
arch: x86_64
machine: x86
cpu:
  model: host
  hide: [avx512f, cx16]
cpus: 4
memory: 2048
boot:
  kernel: ${IMAGES}/vmlinuz
  initrd: initrd.img
  cmdline: "console=ttyS0 $${literal}"
  format: linux
disks:
  - file: disk.qcow2
    format: qcow2
    overlay: true
    size: 8G
  - {file: disk.img, format: raw, read_only: true, interface: virtio-blk}
network:
  mode: user
  net: 10.0.3.0/24
  restrict: true
  forwards:
    - tcp:127.0.0.1:2223-:22
    - {proto: udp, host_port: 5353, guest_ip: 10.0.3.15, guest_port: 53}
console:
  log: console.log
  serial: ttyS0
daemonize: false
host_quirks: false
""",
    "anchors.yaml": """\
name: anchors
boot: &boot
  kernel: vmlinuz
  cmdline: quiet
console:
  <<: {log: console.log}
disks:
  - &d {file: disk.img, format: raw, read_only: true}
  - *d
""",
    "aarch64.yaml": """\
name: arm
arch: aarch64
machine: virt
cpu: host
memory: 1G
boot: {kernel: vmlinuz, initrd: initrd.img}
console: {serial: ttyAMA0}
network: none
""",
    "bases.yaml": """\
base: [base.yaml, ../debian-cloud-x86_64.yaml]
name: two-bases
memory: 4G
network:
  forwards: ["udp::6000-:6000"]
""",
}


def profile_seeds() -> None:
    for folder in (os.path.join(ROOT, "profiles"), os.path.join(ROOT, "profiles", "examples"),
                   os.path.join(ROOT, "tests", "profiles", "broken")):
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name.endswith(".yaml") and os.path.isfile(path):
                with open(path, "rb") as f:
                    _write("profile", f"{os.path.basename(folder)}-{name}", f.read())
    for name, text in PROFILES.items():
        _write("profile", name, text.encode())


MAKERS = {"virtqueue": virtqueue_seeds, "virtio_blk": blk_seeds, "virtio_net": net_seeds, "qcow2": qcow2_seeds,
          "profile": profile_seeds}


def main(argv: list[str]) -> None:
    for name in argv or list(MAKERS):
        if name not in MAKERS:
            raise SystemExit(f"unknown target {name!r}; one of: {', '.join(MAKERS)}")
        shutil.rmtree(os.path.join(SEEDS, name), ignore_errors=True)
        MAKERS[name]()
        print(f"{name}: {len(os.listdir(os.path.join(SEEDS, name)))} seeds")


if __name__ == "__main__":
    main(sys.argv[1:])
