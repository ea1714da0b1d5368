"""Fuzz virtio-net transmit and receive (cloudkvm/devices/virtio/net.py, virtio 1.2 §5.1) through virtio-mmio.

Input: a 4-byte header, the frames the backend delivers to the guest, then the first bytes of 16 KiB of guest RAM
(the rest is zero). Fixed driver layout: receiveq1 (queue 0) descriptor table 0x000, driver area 0x100, device
area 0x200; transmitq1 (queue 1) at 0x300, 0x400, 0x500 (room for 16 entries each); the rings' contents and every
buffer come from the input. Header:
  byte 0  features the driver accepts: bit 0 MRG_RXBUF, bit 1 CSUM, bit 2 GUEST_CSUM, bit 3 INDIRECT_DESC,
          bit 4 EVENT_IDX, bit 7 refuse VERSION_1; bit 5: the backend takes the frame path in C, as libslirp does
          (frames in through kvm/virtio_net.c ckvm_net_link_send, transmitted ones out of ckvm_net_tx)
  byte 1  bits 0-3: log2 of the receive queue size, bits 4-7: of the transmit queue size (each 0..4)
  byte 2  the MTU: bits 0-1 pick none (1500) / 68 / 1500 / 9000
  byte 3  how many frames follow (0..7), each a little-endian u16 length and its bytes
The run: the driver starts the device, notifies the transmit queue, notifies the receive queue, the backend
delivers the frames (keeping those the device refuses, as libslirp does), the driver notifies the receive queue
again (the backend retries), then resets the device.

Documented outcomes: a bad transmit frame is dropped, a bad chain returned empty or the device put into
DEVICE_NEEDS_RESET, a frame that fits no receive buffer kept or dropped. Crashes: an exception escaping the device
(`no_swallowed_exceptions`), `deliver` answering something other than True/False, or a transmitted frame the
backend must never see (shorter than an Ethernet header, or longer than MTU + 18 bytes: no offloads offered).
"""
import struct

from cloudkvm.devices.virtio import VirtioMmioTransport, mmio
from cloudkvm.devices.virtio.device import VIRTIO_F_VERSION_1
from cloudkvm.devices.virtio.net import (ETH_DATA_LEN, ETH_HLEN, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM,
                                         VIRTIO_NET_F_MRG_RXBUF, VLAN_HLEN, VirtioNet)
from cloudkvm.devices.virtio.queue import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC
from cloudkvm.kvm.memory import GuestMemory
from cloudkvm.net.backend import PythonFramePath

from .oracle import Crash, no_swallowed_exceptions, start_device

RAM = 0x4000
RX_RINGS = (0x000, 0x100, 0x200)
TX_RINGS = (0x300, 0x400, 0x500)
HEADER = struct.Struct("<BBBB")
MTUS = (None, 68, 1500, 9000)
MAX_LEN = 24 * 1024                      # a few frames and the RAM the rings and buffers use
TIMEOUT = 10
INSTRUMENT = ["cloudkvm"]
# not instrumented: the bounds-checked RAM accessor and the register file (their coverage says nothing about
# the requests; instrumenting them halves the rate)
UNINSTRUMENTED = ["cloudkvm.kvm.memory", "cloudkvm.devices.virtio.mmio"]
MAC = bytes.fromhex("020000f0220a")
_FEATURE_BITS = ((0, VIRTIO_NET_F_MRG_RXBUF), (1, VIRTIO_NET_F_CSUM), (2, VIRTIO_NET_F_GUEST_CSUM),
                 (3, VIRTIO_F_INDIRECT_DESC), (4, VIRTIO_F_EVENT_IDX))

_memory: GuestMemory | None = None


def memory() -> GuestMemory:
    global _memory
    if _memory is None:
        _memory = GuestMemory([(0, RAM)])
    return _memory


class FuzzBackend:
    """A NetBackend that records what the guest sent, and keeps refused frames for `rx_ready` (as libslirp)."""

    def __init__(self):
        self.deliver = None
        self.sent: list = []
        self.held: list[bytes] = []
        self.answers: list = []

    def connect(self, deliver) -> None:
        self.deliver = deliver

    def send(self, frame) -> None:
        self.sent.append(frame)

    def inject(self, frame: bytes) -> None:
        if self.held or not self._deliver(frame):
            self.held.append(frame)

    def _deliver(self, frame: bytes):
        answer = self.deliver(frame)
        self.answers.append(answer)
        return answer

    def rx_ready(self) -> None:
        while self.held and self._deliver(self.held[0]):
            self.held.pop(0)

    def attach(self, io) -> None:
        pass

    def close(self) -> None:
        pass


class FuzzLinkBackend(PythonFramePath, FuzzBackend):
    """FuzzBackend on the C frame path, as libslirp uses it: frames for the guest go through ckvm_net_link_send
    inside the device's section (FuzzBackend's delivery is the fallback for what C leaves); what C transmits
    arrives through the link's `input`."""

    def __init__(self):
        FuzzBackend.__init__(self)
        PythonFramePath.__init__(self)

    def inject(self, frame: bytes) -> None:
        self.emit(frame)

    def rx_ready(self) -> None:
        FuzzBackend.rx_ready(self)
        self._held_changed(len(self.held))

    def _for_guest(self, frame: bytes) -> None:
        FuzzBackend.inject(self, frame)
        self._held_changed(len(self.held))

    def _from_guest(self, frame: bytes) -> None:
        self.sent.append(frame)


def _frames(data: bytes, count: int) -> tuple[list[bytes], int]:
    frames, pos = [], HEADER.size
    for _ in range(count):
        if pos + 2 > len(data):
            break
        (n,) = struct.unpack_from("<H", data, pos)
        frames.append(data[pos + 2:pos + 2 + n])
        pos += 2 + n
    return frames, min(pos, len(data))


def one_input(data: bytes) -> str:
    if len(data) < HEADER.size:
        return "short"
    accept_bits, sizes, mtu_bits, count = HEADER.unpack_from(data)
    frames, ram_at = _frames(data, count & 7)
    mem = memory()
    mem.fill(0, RAM, 0)
    mem.write(0, data[ram_at:ram_at + RAM])
    mtu = MTUS[mtu_bits & 3]
    max_frame = (mtu or ETH_DATA_LEN) + ETH_HLEN + VLAN_HLEN
    backend = FuzzLinkBackend() if accept_bits & 0x20 else FuzzBackend()
    device = VirtioNet(backend, MAC, mtu)
    transport = VirtioMmioTransport(device, mem, lambda: None, name="virtio-net-fuzz")
    accept = ~0
    for bit, feature in _FEATURE_BITS:
        if not accept_bits >> bit & 1:
            accept &= ~(1 << feature)
    if accept_bits & 0x80:
        accept &= ~(1 << VIRTIO_F_VERSION_1)
    queues = [(0, 1 << (sizes & 0xF) % 5, *RX_RINGS), (1, 1 << (sizes >> 4) % 5, *TX_RINGS)]
    with no_swallowed_exceptions():
        live = start_device(transport, accept, queues)
        transport.write(mmio.QUEUE_NOTIFY, 4, 1)
        transport.write(mmio.QUEUE_NOTIFY, 4, 0)
        for frame in frames:
            backend.inject(frame)
        transport.queue_notify(0)
        status = transport.read(mmio.STATUS, 4)
        transport.write(mmio.STATUS, 4, 0)
    for answer in backend.answers:
        if answer is not True and answer is not False:
            raise Crash(f"deliver answered {answer!r}, not True or False")
    for frame in backend.sent:
        if not isinstance(frame, bytes):
            raise Crash(f"the backend was handed a {type(frame).__name__}, not bytes (it may keep the frame)")
        if not ETH_HLEN <= len(frame) <= max_frame:
            raise Crash(f"a {len(frame)}-byte frame reached the backend (limits {ETH_HLEN}..{max_frame})")
    if not live:
        return "not-live"
    if status & mmio.DEVICE_NEEDS_RESET:
        return "needs-reset"
    return "sent" if backend.sent else "served"
