"""Helpers for the virtio-net tests: a fake backend, a rig (device + transport + Linux-like driver on both queues),
packet builders, and a reference checksum written the straightforward way (independent of the device's)."""
import struct

from cloudkvm.devices.virtio import mmio
from cloudkvm.devices.virtio.net import VirtioNet
from cloudkvm.net.backend import PythonFramePath
from virtio_driver import MiB, Rig

RAM = 4 * MiB
HDR = struct.Struct("<BBHHHHH")   # virtio_net_hdr with num_buffers (virtio 1.2 §5.1.6)
HDR_SIZE = HDR.size
NEEDS_CSUM, DATA_VALID = 1, 2
GUEST_MAC = bytes.fromhex("020000aabbcc")
PEER_MAC = bytes.fromhex("525400123456")


class FakeBackend:
    """A NetBackend that records what the guest sent and keeps refused frames until rx_ready(), as slirp will."""

    def __init__(self, limit: int = 64):
        self.deliver = None
        self.sent: list[bytes] = []
        self.held: list[bytes] = []
        self.rx_ready_calls = 0
        self.limit = limit
        self.closed = 0
        self.connects = 0
        self.on_send = None        # optional hook: called with each frame the guest sends (e.g. to answer at once)

    def connect(self, deliver) -> None:
        self.deliver = deliver
        self.connects += 1

    def send(self, frame: bytes) -> None:
        assert isinstance(frame, bytes)
        self.sent.append(frame)
        if self.on_send is not None:
            self.on_send(frame)

    def inject(self, frame: bytes) -> bool:
        """A frame for the guest: delivered now (True), or kept for later (False)."""
        if self.held:
            self._keep(frame)
            return False
        if self.deliver(frame):
            return True
        self._keep(frame)
        return False

    def _keep(self, frame: bytes) -> None:
        if len(self.held) < self.limit:
            self.held.append(frame)

    def rx_ready(self) -> None:
        self.rx_ready_calls += 1
        while self.held and self.deliver(self.held[0]):
            self.held.pop(0)

    def attach(self, io) -> None:
        pass

    def close(self) -> None:
        self.closed += 1


class LinkBackend(PythonFramePath, FakeBackend):
    """A FakeBackend on the frame path in C, the way net/slirp.py uses it: frames for the guest go in through
    kvm/virtio_net.c ckvm_net_link_send (what libslirp calls) inside the device's section, with FakeBackend's
    delivery as the fallback for what C leaves; frames from the guest come out of ckvm_net_tx through the link's
    `input` (libslirp's slirp_input there, a recorder here)."""

    def __init__(self, limit: int = 64):
        FakeBackend.__init__(self, limit)
        PythonFramePath.__init__(self)
        self.fell_back = 0           # frames C handed to the fallback
        self._result = False

    def inject(self, frame: bytes) -> bool:
        self._result = True
        self.emit(frame)
        return self._result

    def rx_ready(self) -> None:
        FakeBackend.rx_ready(self)
        self._held_changed(len(self.held))

    def _for_guest(self, frame: bytes) -> None:
        self.fell_back += 1
        self._result = FakeBackend.inject(self, frame)
        self._held_changed(len(self.held))

    def _from_guest(self, frame: bytes) -> None:
        FakeBackend.send(self, frame)


class NetRig(Rig):
    """A VirtioNet behind the virtio-mmio transport; the driver sets up receiveq1 (0) and transmitq1 (1)."""

    def __init__(self, memory, backend, mtu=None, accept: int = ~0, queue_size=None, init: bool = True,
                 mac: bytes = GUEST_MAC, alloc_end: int | None = None, notifier: bool = False):
        self.backend = backend
        super().__init__(memory, VirtioNet(backend, mac, mtu), alloc_end=alloc_end, notifier=notifier)
        self.features = 0
        self.last_used: list[tuple[int, int]] = []
        if init:
            self.init(accept, queue_size)

    def init(self, accept: int = ~0, queue_size=None) -> int:
        d = self.driver
        features, ok = d.negotiate(accept)
        assert ok, "FEATURES_OK refused"
        d.setup_queue(0, queue_size)
        d.setup_queue(1, queue_size)
        d.add_status(mmio.DRIVER_OK)
        assert not d.status & mmio.DEVICE_NEEDS_RESET
        self.features = features
        return features

    @property
    def rxq(self):
        return self.driver.queues[0]

    @property
    def txq(self):
        return self.driver.queues[1]

    @property
    def needs_reset(self) -> bool:
        return bool(self.driver.status & mmio.DEVICE_NEEDS_RESET)

    # ---- transmit ----------------------------------------------------------------------------------------------

    def transmit(self, frame: bytes, flags: int = 0, gso_type: int = 0, csum_start: int = 0, csum_offset: int = 0,
                 split: list[int] | None = None, indirect: bool = False, header: bytes | None = None,
                 kick: bool = True) -> int:
        """Place header + frame in the transmit queue, cut into descriptors of the `split` sizes (the rest in a
        last one); returns the chain's head."""
        data = (header if header is not None else HDR.pack(flags, gso_type, 0, 0, csum_start, csum_offset, 0)) + frame
        sizes = list(split or [])
        sizes.append(len(data) - sum(sizes))
        bufs, pos = [], 0
        for size in sizes:
            if size <= 0:
                continue
            gpa = self.alloc.alloc(size)
            self.memory.write(gpa, data[pos:pos + size])
            bufs.append((gpa, size, False))
            pos += size
        return self.txq.submit(bufs, indirect=indirect, kick=kick)

    # ---- receive -----------------------------------------------------------------------------------------------

    def post_rx(self, size: int, count: int = 1, split: list[int] | None = None, kick: bool = True,
                fill: int = 0xEE) -> list[tuple[int, list[tuple[int, int]]]]:
        """Post `count` receive buffers of `size` bytes each (optionally cut into descriptors); returns
        [(head, [(gpa, len), ...])]."""
        posted = []
        for _ in range(count):
            sizes = list(split or [])
            sizes.append(size - sum(sizes))
            pieces = [(self.alloc.alloc(n, fill=fill), n) for n in sizes if n > 0]
            head = self.rxq.add([(gpa, n, True) for gpa, n in pieces])
            posted.append((head, pieces))
        self.rxq.publish()
        if kick:
            self.rxq.kick()
        return posted

    def received(self, posted) -> list[tuple[tuple, bytes]]:
        """Frames the device placed in the receive queue since the last call: [(header fields, frame)], following
        num_buffers over consecutive used elements as Linux's mergeable path does."""
        by_head = {head: pieces for head, pieces in posted}
        used = self.last_used = self.rxq.get_used()
        out = []
        i = 0
        while i < len(used):
            head, length = used[i]
            data = self._read(by_head[head], length)
            hdr = HDR.unpack_from(data)
            count = hdr[6]
            assert count >= 1
            for head2, length2 in used[i + 1:i + count]:
                data += self._read(by_head[head2], length2)
            assert i + count <= len(used), "fewer used buffers than num_buffers"
            out.append((hdr, data[HDR_SIZE:]))
            i += count
        return out

    def _read(self, pieces, length: int) -> bytes:
        out = b""
        for gpa, n in pieces:
            take = min(n, length - len(out))
            if take <= 0:
                break
            out += self.memory.read(gpa, take)
        return out


# ---- packets ---------------------------------------------------------------------------------------------------------

def ref_checksum(data: bytes) -> int:
    """RFC 1071 the plain way: add 16-bit words with end-around carry, then complement."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ref_sum(data: bytes) -> int:
    return ~ref_checksum(data) & 0xFFFF


def eth(payload: bytes, ethertype: int, dst: bytes = PEER_MAC, src: bytes = GUEST_MAC, vlan: int | None = None):
    tag = struct.pack(">HH", 0x8100, vlan) if vlan is not None else b""
    return dst + src + tag + struct.pack(">H", ethertype) + payload


def ipv4(payload: bytes, proto: int, src=bytes([10, 0, 2, 15]), dst=bytes([10, 0, 2, 2]), frag: int = 0x4000):
    hdr = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0x1234, frag, 64, proto, 0, src, dst)
    hdr = hdr[:10] + struct.pack(">H", ref_checksum(hdr)) + hdr[12:]
    return hdr + payload


V6_SRC = bytes.fromhex("fd000000000000000000000000000015")
V6_DST = bytes.fromhex("fd000000000000000000000000000002")


def ipv6(payload: bytes, proto: int, src=V6_SRC, dst=V6_DST):
    return struct.pack(">IHBB16s16s", 6 << 28, len(payload), proto, 64, src, dst) + payload


def tcp_segment(payload: bytes, sport=40000, dport=80) -> bytes:
    return struct.pack(">HHIIBBHHH", sport, dport, 1, 2, 5 << 4, 0x18, 65535, 0, 0) + payload


def udp_datagram(payload: bytes, sport=5353, dport=53) -> bytes:
    return struct.pack(">HHHH", sport, dport, 8 + len(payload), 0) + payload


def pseudo_header(version: int, src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if version == 4:
        return src + dst + struct.pack(">BBH", 0, proto, length)
    return src + dst + struct.pack(">I3xB", length, proto)


CSUM_FIELD = {6: 16, 17: 6}      # where the checksum sits in a TCP / UDP header


def l4_frame(version: int, proto: int, payload: bytes, checksum: str = "full", vlan=None) -> tuple[bytes, int, int]:
    """An Ethernet frame with TCP/UDP over IPv4/IPv6. `checksum`: "full" (correct), "partial" (the pseudo-header sum,
    as a guest with NEEDS_CSUM leaves it), "zero", or "bad". Returns (frame, csum_start, csum_offset)."""
    seg = tcp_segment(payload) if proto == 6 else udp_datagram(payload)
    src, dst = (bytes([10, 0, 2, 15]), bytes([10, 0, 2, 2])) if version == 4 else (V6_SRC, V6_DST)
    pseudo = pseudo_header(version, src, dst, proto, len(seg))
    off = CSUM_FIELD[proto]
    if checksum == "full":
        value = ref_checksum(pseudo + seg)
        if proto == 17 and value == 0:
            value = 0xFFFF
    elif checksum == "partial":
        value = ref_sum(pseudo)
    elif checksum == "bad":
        value = ref_checksum(pseudo + seg) ^ 0x0101
    else:
        value = 0
    seg = seg[:off] + struct.pack(">H", value) + seg[off + 2:]
    packet = ipv4(seg, proto) if version == 4 else ipv6(seg, proto)
    frame = eth(packet, 0x0800 if version == 4 else 0x86DD, vlan=vlan)
    csum_start = len(frame) - len(seg)
    return frame, csum_start, off


def l4_checksum_ok(frame: bytes, version: int, proto: int, vlan: bool = False) -> bool:
    """The receiver's check, done independently: the sum over pseudo-header and segment is 0xFFFF."""
    l3 = 18 if vlan else 14
    if version == 4:
        ihl = (frame[l3] & 15) * 4
        total = struct.unpack_from(">H", frame, l3 + 2)[0]
        seg = frame[l3 + ihl:l3 + total]
        pseudo = pseudo_header(4, frame[l3 + 12:l3 + 16], frame[l3 + 16:l3 + 20], proto, len(seg))
    else:
        plen = struct.unpack_from(">H", frame, l3 + 4)[0]
        seg = frame[l3 + 40:l3 + 40 + plen]
        pseudo = pseudo_header(6, frame[l3 + 8:l3 + 24], frame[l3 + 24:l3 + 40], proto, len(seg))
    return ref_checksum(pseudo + seg) == 0


def arp_frame() -> bytes:
    return eth(struct.pack(">HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, GUEST_MAC, bytes([10, 0, 2, 15]), bytes(6),
                           bytes([10, 0, 2, 2])), 0x0806, dst=b"\xff" * 6)
