"""virtio-net (virtio 1.2 §5.1): one receive and one transmit queue in front of a `NetBackend`.

Offered: MAC (config `mac`), STATUS (link up), MRG_RXBUF (a frame may span several receive chains), CSUM (the
guest may leave TCP/UDP checksums for us: we complete them, since backends want whole checksums), GUEST_CSUM (we
mark received TCP/UDP frames whose checksum we checked with DATA_VALID), and MTU when one is given. No GSO/TSO/UFO
in either direction, no control queue, no multiqueue: every frame is at most mtu + 18 bytes (Ethernet header and
one VLAN tag), 1518 by default.

Receiving: a frame whose chains are all plain (whole, device-writable only) is placed by kvm/virtio_net.c; any other
case (and every one when `rx_in_c` is off) by `_receive` here, which also says what was wrong.

The frame path without Python: with a backend that offers it (`connect_native`: net/slirp.py), libslirp hands its
frames to kvm/virtio_net.c directly, which places them while the link is armed, and the transmit queue's plain
chains go to libslirp from C (`send_native`, ckvm_net_tx). The link is armed only inside the backend's calls into
libslirp, under the transport's lock, while the receive queue is live (`_LinkSection`); the used-buffer interrupt
for what C placed is decided when that call returns. Whatever C leaves comes here by the paths below.

Threads: queue processing runs under the transport's lock (the transport calls `process`). Frames for the guest
arrive on the I/O thread through `deliver`, outside any transport call, yet a used buffer needs the lock and an
interrupt: `deliver` places the frame through `transport.run_on_queue(0, ...)`, so the transport's lock, its
"device is live" checks, its error handling and its interrupt decision all apply. The transport sets itself as
`device.transport` when it is built.

Malformed guest input never raises: a bad descriptor chain is logged once per kind and returned with used length 0
(or puts the device into DEVICE_NEEDS_RESET when it cannot be returned, as for every virtio device here); a bad
transmit header drops that frame (used length 0); a received frame larger than the MTU allows, or (without
MRG_RXBUF) than the posted buffer, is dropped.
"""
import hashlib
import string
import struct
import threading

from ...errors import CloudkvmError
from ...kvm.native import ffi as _ffi, lib as _lib
from .device import VirtioDevice
from .mmio import DEVICE_NEEDS_RESET, DRIVER_OK
from .queue import BadChain, Chain, Virtqueue

VIRTIO_ID_NET = 1                         # §5.1.1
RX_QUEUE, TX_QUEUE = 0, 1                 # §5.1.2 receiveq1, transmitq1
QUEUE_SIZE = 256

# §5.1.3 feature bits (the ones we offer; GSO/TSO/UFO, CTRL_VQ and MQ are deliberately absent).
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16

# §5.1.4 status bits.
VIRTIO_NET_S_LINK_UP = 1

# §5.1.6 struct virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers (12 bytes:
# with VIRTIO_F_VERSION_1 num_buffers is always there; no HASH_REPORT, so nothing follows).
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
_HDR = struct.Struct("<BBHHHHH")
HDR_SIZE = _HDR.size

# §5.1.4 struct virtio_net_config up to mtu: mac[6], status, max_virtqueue_pairs, mtu.
_CONFIG = struct.Struct("<6sHHH")
STATUS_OFFSET = 6

ETH_HLEN = 14                             # IEEE 802.3 destination, source, EtherType
VLAN_HLEN = 4                             # IEEE 802.1Q tag
ETH_DATA_LEN = 1500                       # the MTU when none is configured
MIN_MTU, MAX_MTU = 68, 65535              # §5.1.4.1: "between 68 and 65535 inclusive"

ETH_P_8021Q, ETH_P_8021AD = 0x8100, 0x88A8

MAC_PREFIX = b"\x02"                      # locally administered (bit 1), unicast (bit 0 clear)


# ---- MAC addresses -----------------------------------------------------------------------------------------------

def mac_for(name: str) -> bytes:
    """A stable MAC for the VM called `name`: 02 followed by the first 5 bytes of SHA-256("cloudkvm-mac:" + name).

    02 sets the locally-administered bit and clears the group bit (IEEE 802 §8.2), so it never collides with a
    vendor's address (nor with QEMU's 52:54:00 range); the same name always gives the same address.
    """
    digest = hashlib.sha256(b"cloudkvm-mac:" + name.encode("utf-8", "surrogatepass")).digest()
    return MAC_PREFIX + digest[:5]


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    """"52:54:00:12:34:56" (or with dashes) → 6 bytes; a CloudkvmError for anything else."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or any(len(p) != 2 or not all(c in string.hexdigits for c in p) for p in parts):
        raise CloudkvmError(f"{text!r} is not a MAC address", "write six hex bytes like 02:00:00:12:34:56")
    return bytes.fromhex("".join(parts))


# ---- checksums (RFC 1071) ----------------------------------------------------------------------------------------

def ones_complement_sum(data) -> int:
    """The 16-bit ones'-complement sum of `data` (big-endian words, an odd length padded with a zero byte), in C
    (kvm/checksum.c). The sum is 0 only when every word is 0, else 1..0xFFFF."""
    return _lib.ckvm_ones_complement_sum(_ffi.from_buffer(data), len(data))


def complete_checksum(frame: bytearray, csum_start: int, csum_offset: int) -> None:
    """Finish a partial checksum in place (§5.1.6.2; kvm/checksum.c): the field at csum_start+csum_offset holds the
    pseudo-header sum; the ones' complement of the sum from csum_start to the end goes there (0 becomes 0xFFFF)."""
    if csum_start + csum_offset + 2 > len(frame):
        raise ValueError(f"checksum field at {csum_start}+{csum_offset} lies outside the {len(frame)}-byte frame")
    _lib.ckvm_complete_checksum(_ffi.from_buffer(frame), len(frame), csum_start, csum_offset)


def l4_checksum_valid(frame) -> bool:
    """Whether `frame` is TCP or UDP over IPv4/IPv6 (one optional VLAN tag, not a fragment) with a correct
    transport checksum: what VIRTIO_NET_HDR_F_DATA_VALID promises (§5.1.6.4.1: the device MUST validate it). In C
    (kvm/checksum.c ckvm_l4_checksum_valid), the one implementation net.py and the C frame path share."""
    return bool(_lib.ckvm_l4_checksum_valid(_ffi.from_buffer(frame), len(frame)))


# ---- the device ----------------------------------------------------------------------------------------------------

class VirtioNet(VirtioDevice):
    """A virtio network device over `backend` (see `cloudkvm.net.backend.NetBackend`)."""

    device_id = VIRTIO_ID_NET
    name = "virtio-net"
    _rx_in_c = True         # plain receive chains filled by kvm/virtio_net.c (off: all by _receive): rx_in_c
    tx_in_c = True          # plain transmit chains sent to a native backend by kvm/virtio_net.c (off: by _transmit)

    def __init__(self, backend, mac: bytes, mtu: int | None = None):
        mac = bytes(mac)
        if len(mac) != 6:
            raise CloudkvmError(f"virtio-net MAC {mac.hex(':')!r} is not 6 bytes", "use mac_for(name) or 6 bytes")
        if mac[0] & 1:
            raise CloudkvmError(f"virtio-net MAC {format_mac(mac)} is a multicast address",
                                "the first byte must be even (02:... is a locally administered unicast MAC)")
        if mtu is not None and not MIN_MTU <= mtu <= MAX_MTU:
            raise CloudkvmError(f"virtio-net MTU {mtu} is outside {MIN_MTU}..{MAX_MTU}", "1500 is the usual MTU")
        features = (1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS | 1 << VIRTIO_NET_F_MRG_RXBUF
                    | 1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_GUEST_CSUM)
        if mtu is not None:
            features |= 1 << VIRTIO_NET_F_MTU
        # max_virtqueue_pairs is 1 (only meaningful with MQ); mtu reads 1500 when no MTU is offered.
        config = _CONFIG.pack(mac, VIRTIO_NET_S_LINK_UP, 1, mtu if mtu is not None else ETH_DATA_LEN)
        super().__init__(features, (QUEUE_SIZE, QUEUE_SIZE), config)
        self.backend = backend
        self.mac = mac
        self.mtu = mtu
        # The largest frame either way: the MTU plus the Ethernet header and one VLAN tag (§5.1.4.1).
        self.max_frame = (mtu if mtu is not None else ETH_DATA_LEN) + ETH_HLEN + VLAN_HLEN
        # what Python counted; the link's own counts (C's frames) are added when `stats` is read
        self._stats = {"tx_frames": 0, "tx_dropped": 0, "rx_frames": 0, "rx_dropped": 0, "rx_no_buffer": 0}
        self._closed = False
        self._rx_placed_by_call = 0     # frames kvm/virtio_net.c placed when _receive called it
        self._rx_chains = _ffi.new("struct ckvm_rx_chain[]", QUEUE_SIZE)
        self._rx_segs = _ffi.new("struct ckvm_seg[]", 4 * QUEUE_SIZE)
        self._rx_scratch = _ffi.new("struct ckvm_rx *", {"chains": self._rx_chains, "segs": self._rx_segs,
                                                         "max_chains": QUEUE_SIZE, "max_segs": 4 * QUEUE_SIZE})
        self._link = None
        self._rx_link_signalled = 0     # the link's rx_frames when net.py last decided their interrupt
        connect_native = getattr(backend, "connect_native", None)
        if connect_native is not None:
            self._tx_buf = _ffi.new("uint8_t[]", HDR_SIZE + self.max_frame)
            self._link = connect_native(_LinkSection(self))
            self._link.tx_buf, self._link.tx_cap = self._tx_buf, HDR_SIZE + self.max_frame
            self._link.max_frame = self.max_frame
            self._link.rx = self._rx_scratch
            self._link.arm_ok = self._rx_in_c
        backend.connect(self.deliver)

    # ---- counters ------------------------------------------------------------------------------------------------

    @property
    def rx_in_c(self) -> bool:
        return self._rx_in_c

    @rx_in_c.setter
    def rx_in_c(self, on: bool) -> None:
        self._rx_in_c = on
        if self._link is not None:
            self._link.arm_ok = on and not self._closed

    @property
    def stats(self) -> dict[str, int]:
        """Frames sent, received, dropped, and receive attempts that found no buffer (C's frames included)."""
        stats = dict(self._stats)
        stats["rx_frames"] += self.rx_frames_by_link
        stats["tx_frames"] += self.tx_frames_in_c
        return stats

    @property
    def rx_frames_in_c(self) -> int:
        """Of stats["rx_frames"], those kvm/virtio_net.c placed."""
        return self._rx_placed_by_call + self.rx_frames_by_link

    @property
    def rx_frames_by_link(self) -> int:
        """Of rx_frames_in_c, those a native backend handed C directly (the link)."""
        return self._link.rx_frames if self._link is not None else 0

    @property
    def tx_frames_in_c(self) -> int:
        """Of stats["tx_frames"], those kvm/virtio_net.c sent to a native backend."""
        return self._link.tx_frames if self._link is not None else 0

    # ---- link status ---------------------------------------------------------------------------------------------

    @property
    def link_up(self) -> bool:
        return bool(self.config[STATUS_OFFSET] & VIRTIO_NET_S_LINK_UP)

    def set_link(self, up: bool) -> None:
        """Change the link status and tell the driver (a configuration change notification)."""
        if up == self.link_up:
            return
        self.config[STATUS_OFFSET] = VIRTIO_NET_S_LINK_UP if up else 0
        self.signal_config_change()

    # ---- life cycle ------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the backend (the machine closes its virtio devices when it closes)."""
        if not self._closed:
            self._closed = True
            if self._link is not None:
                self._link.armed = self._link.arm_ok = 0
            self.backend.close()

    def native_serve(self, queue_index: int):
        """With a native backend, both queues' notifications are served in C (notifier.py): the receive queue's
        need nothing unless the backend keeps frames (`held`), which then come to `_rx_buffers_posted`; the
        transmit queue's plain chains go to the backend's libslirp while it lets C call it (on the I/O thread,
        waiting in C: kvm/notify.c CKVM_SERVE_NET_TX), the rest to `_transmit`."""
        if self._link is None:
            return None
        if queue_index == RX_QUEUE:
            return _lib.CKVM_SERVE_NET_RX, self._link
        if queue_index == TX_QUEUE and self.tx_in_c:
            return _lib.CKVM_SERVE_NET_TX, self._link
        return None

    def activate(self, queues: list[Virtqueue]) -> None:
        super().activate(queues)
        link = self._link
        if link is not None and len(queues) > RX_QUEUE:
            rxq = queues[RX_QUEUE]
            state = self.transport.state.native if self.transport is not None else _ffi.NULL
            link.live = _ffi.addressof(state, "live") if state != _ffi.NULL else _ffi.NULL
            link.t = state
            link.mem, link.rxq, link.rxwalk = rxq.memory.native, rxq._native_vq, rxq._native_walk
            link.mergeable = self.has_feature(VIRTIO_NET_F_MRG_RXBUF)
            link.guest_csum = self.has_feature(VIRTIO_NET_F_GUEST_CSUM)
            link.csum = self.has_feature(VIRTIO_NET_F_CSUM)

    # ---- the frame path in C (module docstring) --------------------------------------------------------------------

    def _arm_link(self) -> None:
        """Under the transport's lock: let C place frames (C itself looks at the transport's live flag and the
        receive queue's `ready` for every frame; `activate` pointed the link at them)."""
        link = self._link
        link.armed = self._rx_in_c and not self._closed and not self.needs_reset and link.rxq != _ffi.NULL

    def _disarm_link(self) -> None:
        """Still under the lock: C places nothing more; the interrupt for what it placed (counted by the link)."""
        link = self._link
        link.armed = 0
        if link.rx_frames != self._rx_link_signalled:
            self._rx_link_signalled = link.rx_frames
            self.transport.signal_used(RX_QUEUE)

    def process(self, queue_index: int, queue: Virtqueue) -> bool:
        if queue_index == TX_QUEUE:
            return self._transmit(queue)
        if queue_index == RX_QUEUE:
            return self._rx_buffers_posted(queue)
        return False

    # ---- transmit --------------------------------------------------------------------------------------------------

    def _transmit(self, queue: Virtqueue) -> bool:
        """Send every available frame: plain chains by C into a native backend, the rest here (one chain each time
        C stops at one, or all when C cannot run now)."""
        added = bad = False
        while not self.needs_reset:
            in_c = self._transmit_in_c(queue)
            if in_c is not None:
                added |= in_c[1]
                if in_c[0] == _lib.CKVM_NET_DONE:
                    break
            took = False
            for chain in self.available_chains(queue):
                took = added = True
                self._transmit_chain(queue, chain)
                if in_c is not None:
                    break                            # C takes the next chain again
            bad |= self.completed_bad
            if in_c is None or not took:
                break
        return added or bad

    def _transmit_in_c(self, queue: Virtqueue) -> tuple[int, bool] | None:
        """kvm/virtio_net.c ckvm_net_tx through the backend: (its code, whether it returned chains); None when the
        path is off or the backend cannot take it now."""
        link = self._link
        if link is None or not self.tx_in_c:
            return None
        used_before = queue.used_idx
        code = self.backend.send_native(lambda: queue.run_native(_lib.ckvm_net_tx, link))
        if code is None:
            return None
        return code, queue.used_idx != used_before

    def _transmit_chain(self, queue: Virtqueue, chain: Chain) -> None:
        frame = self._tx_frame(queue, chain)
        queue.push(chain.head, 0)                    # the device writes nothing into transmit buffers
        if frame is None:
            self._stats["tx_dropped"] += 1
            return
        self._stats["tx_frames"] += 1
        try:
            self.backend.send(frame)
        except Exception as e:                       # the backend's trouble is not the guest's: drop, go on
            self.warn_once(f"backend-send-{type(e).__name__}", "%s: backend send failed: %r", self.name, e)

    def _tx_frame(self, queue: Virtqueue, chain: Chain) -> bytes | None:
        """The Ethernet frame in a transmit chain, checksum completed; None (logged once per kind) when it is bad."""
        if chain.writable_len:
            self.warn_once("tx-writable", "%s: transmit chain %d has device-writable buffers; ignored", self.name,
                           chain.head)
        length = chain.readable_len
        if length < HDR_SIZE + ETH_HLEN:
            self.warn_once("tx-short", "%s: transmit chain %d holds %d bytes, less than a header and an Ethernet "
                           "header; dropped", self.name, chain.head, length)
            return None
        if length > HDR_SIZE + self.max_frame:
            self.warn_once("tx-long", "%s: transmitted frame of %d bytes exceeds %d (no segmentation offload was "
                           "offered); dropped", self.name, length - HDR_SIZE, self.max_frame)
            return None
        mem = queue.memory
        segments = chain.readable
        if len(segments) == 1:
            data = mem.view(*segments[0])            # guest RAM itself: copied once, below
        else:
            data = memoryview(b"".join([mem.view(gpa, n) for gpa, n in segments]))
        flags, gso_type, _, _, csum_start, csum_offset, _ = _HDR.unpack_from(data)
        if gso_type != VIRTIO_NET_HDR_GSO_NONE:
            self.warn_once("tx-gso", "%s: transmit header asks for segmentation (gso_type 0x%x), which was not "
                           "offered; dropped", self.name, gso_type)
            return None
        if not flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:  # §5.1.6.2.2: unknown flag bits are ignored
            return bytes(data[HDR_SIZE:])
        if not self.has_feature(VIRTIO_NET_F_CSUM):
            self.warn_once("tx-csum-feature", "%s: transmit header has NEEDS_CSUM without VIRTIO_NET_F_CSUM "
                           "negotiated; dropped", self.name)
            return None
        frame = bytearray(data[HDR_SIZE:])           # a private copy: the guest cannot change it under us
        if csum_start + csum_offset + 2 > len(frame):
            self.warn_once("tx-csum-range", "%s: checksum at csum_start %d + csum_offset %d lies outside the %d-byte "
                           "frame; dropped", self.name, csum_start, csum_offset, len(frame))
            return None
        complete_checksum(frame, csum_start, csum_offset)
        return bytes(frame)

    # ---- receive ---------------------------------------------------------------------------------------------------

    def deliver(self, frame) -> bool:
        """A frame for the guest (the backend calls this on the I/O thread). False when no receive buffer is posted:
        the backend keeps the frame and retries after `backend.rx_ready()`. True when the frame was placed in the
        receive queue, or dropped for good (malformed, too large for the posted buffers, a broken driver)."""
        transport = self.transport
        if transport is None:
            self.warn_once("no-transport", "%s: a frame arrived but the device has no transport; kept", self.name)
            return False
        if not self._live(transport):
            return False
        # Under the transport's lock (re-entrant: rx_ready() calls back here from inside process()), with its
        # error handling and interrupt decision.
        return bool(transport.run_on_queue(RX_QUEUE, lambda queue: self._receive(queue, frame)))

    def _live(self, transport) -> bool:
        """Whether the receive queue can take frames now (read without the lock: a hint that spares the transport
        a "not live" warning per frame before DRIVER_OK; process() runs only when it really is live)."""
        status = getattr(transport, "status", None)
        if isinstance(status, int) and (not status & DRIVER_OK or status & DEVICE_NEEDS_RESET):
            return False
        queues = self.queues
        return not self.needs_reset and len(queues) > RX_QUEUE and queues[RX_QUEUE].ready

    def _rx_buffers_posted(self, queue: Virtqueue) -> bool:
        """The driver notified the receive queue: it posted buffers. Let the backend retry the frames it kept (its
        deliveries come back through `deliver`)."""
        used_before = queue.used_idx
        try:
            self.backend.rx_ready()
        except Exception as e:
            self.warn_once(f"backend-rx-ready-{type(e).__name__}", "%s: backend rx_ready failed: %r", self.name, e)
        return queue.used_idx != used_before

    def _receive(self, queue: Virtqueue, frame) -> bool:
        """Place one frame (header first) into receive chains; see `deliver` for the result."""
        if self.needs_reset or not queue.ready:
            return False
        n = len(frame)
        if n < ETH_HLEN or n > self._rx_limit(frame):
            self._stats["rx_dropped"] += 1
            self.warn_once("rx-size", "%s: backend delivered a %d-byte frame (limit %d); dropped", self.name, n,
                           self._rx_limit(frame))
            return True
        mergeable = self.has_feature(VIRTIO_NET_F_MRG_RXBUF)
        flags = self._rx_flags(frame)   # once: the checksum check is the costly part of a frame
        if self._rx_in_c and self._receive_in_c(queue, frame, flags, mergeable):
            self._stats["rx_frames"] += 1
            self._rx_placed_by_call += 1
            return True
        total = HDR_SIZE + n
        chains: list[Chain] = []
        room = 0
        tainted = False        # a chain was consumed (pushed) while gathering: what was popped cannot be unpopped
        while room < total and not self.needs_reset:
            try:
                chain = queue.pop()
            except BadChain as e:
                self.bad_chain(queue, e)
                tainted = True
                continue
            if chain is None:
                break
            if chain.readable_len:
                self.warn_once("rx-readable", "%s: receive chain %d has device-readable buffers; ignored", self.name,
                               chain.head)
            capacity = chain.writable_len
            if capacity == 0:
                self.warn_once("rx-no-writable", "%s: receive chain %d has no device-writable buffer; returned "
                               "unused", self.name, chain.head)
                queue.push(chain.head, 0)
                tainted = True
                continue
            if not mergeable and capacity < total:
                # §5.1.6.3: without MRG_RXBUF each buffer must hold a whole frame. Leave the buffer for a smaller one.
                queue.last_avail = (queue.last_avail - 1) & 0xFFFF
                self._stats["rx_dropped"] += 1
                self.warn_once("rx-too-big", "%s: a %d-byte frame does not fit the %d-byte receive buffer "
                               "(VIRTIO_NET_F_MRG_RXBUF not negotiated); dropped", self.name, n, capacity - HDR_SIZE)
                return True
            chains.append(chain)
            room += capacity
        if self.needs_reset:
            return False
        if room < total:
            return self._not_enough_buffers(queue, chains, tainted, n)
        self._write_frame(queue, chains, frame, flags, total)
        self._stats["rx_frames"] += 1
        return True

    def _receive_in_c(self, queue: Virtqueue, frame, flags: int, mergeable: bool) -> bool:
        """kvm/virtio_net.c places the frame when every chain it needs is plain (it sets num_buffers); False: it
        changed nothing."""
        header = bytearray(_HDR.pack(flags, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0, 0, 1))
        code = queue.run_native(_lib.ckvm_net_rx, _ffi.from_buffer(header), len(header), _ffi.from_buffer(frame),
                                len(frame), int(mergeable), self._rx_scratch)
        return code == _lib.CKVM_NET_DONE

    def _rx_flags(self, frame) -> int:
        """§5.1.6.4: the receive header's flags: DATA_VALID when the frame's TCP/UDP checksum was checked and holds."""
        if self.has_feature(VIRTIO_NET_F_GUEST_CSUM) and l4_checksum_valid(frame):
            return VIRTIO_NET_HDR_F_DATA_VALID
        return 0

    def _rx_limit(self, frame) -> int:
        """§5.1.4.1: no frame larger than the MTU plus the Ethernet header (and its VLAN tag, when there is one)."""
        tagged = len(frame) >= ETH_HLEN and (frame[12] << 8 | frame[13]) in (ETH_P_8021Q, ETH_P_8021AD)
        return self.max_frame if tagged else self.max_frame - VLAN_HLEN

    def _not_enough_buffers(self, queue: Virtqueue, chains: list[Chain], tainted: bool, n: int) -> bool:
        if tainted:
            # Chains already consumed sit between the ones popped for this frame: hand those back empty too.
            for chain in chains:
                queue.push(chain.head, 0)
            self._stats["rx_no_buffer"] += 1
            return False
        if len(chains) >= queue.size:
            # Every descriptor is posted and still the frame does not fit: waiting cannot help.
            queue.last_avail = (queue.last_avail - len(chains)) & 0xFFFF
            self._stats["rx_dropped"] += 1
            self.warn_once("rx-ring-too-small", "%s: a %d-byte frame does not fit the whole receive queue; "
                           "dropped", self.name, n)
            return True
        # Put the chains back (they are still the driver's available entries, in order) and wait for more.
        queue.last_avail = (queue.last_avail - len(chains)) & 0xFFFF
        self._stats["rx_no_buffer"] += 1
        return False

    def _write_frame(self, queue: Virtqueue, chains: list[Chain], frame, flags: int, total: int) -> None:
        # §5.1.6.4.1: num_buffers is 1 without MRG_RXBUF, else the number of buffers the frame spans.
        data = memoryview(_HDR.pack(flags, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0, 0, len(chains)) + bytes(frame))
        mem = queue.memory
        pos = 0
        for chain in chains:
            written = 0
            for gpa, length in chain.writable:   # every buffer but the last is filled completely (§5.1.6.4.1)
                take = min(length, total - pos)
                if take <= 0:
                    break
                mem.write(gpa, data[pos:pos + take])
                pos += take
                written += take
            queue.push(chain.head, written)


class _LinkSection:
    """What a native backend wraps every call into libslirp in (re-entrant): the transport's lock held, and the link
    armed for the outermost call while the receive queue is live; on leaving that call, C's frames are counted and
    the used-buffer interrupt decided. Before the transport exists, nothing is armed."""

    __slots__ = ("device", "depth", "locks", "_own")

    def __init__(self, device: "VirtioNet"):
        self.device = device
        self.depth = 0
        self.locks: list = []
        self._own = threading.RLock()

    def __enter__(self):
        transport = self.device.transport
        lock = transport.lock if transport is not None else self._own
        lock.acquire()
        self.locks.append(lock)
        self.depth += 1
        if self.depth == 1 and transport is not None:
            try:
                self.device._arm_link()
            except BaseException:
                self.depth -= 1
                self.locks.pop().release()
                raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.depth == 1 and self.device.transport is not None:
                self.device._disarm_link()
        finally:
            self.depth -= 1
            self.locks.pop().release()
