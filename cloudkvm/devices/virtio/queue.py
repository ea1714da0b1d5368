"""The split virtqueue, device side (virtio 1.2 §2.7): pop validated descriptor chains, push used elements.

The driver owns the descriptor table and the available ring; we only read them, and only through `GuestMemory`,
so nothing a driver writes there can make us touch memory outside guest RAM. Every chain is validated before a
device sees it; a chain we cannot accept raises `BadChain`, a ring we cannot trust raises `BadQueue`.
"""
import struct
from dataclasses import dataclass, field

from ...errors import GuestMemoryError
from ...kvm.memory import GuestMemory
from ...kvm.native import address, ffi as _ffi, lib as _lib, quick as _quick

# virtio 1.2 §2.7.5 struct virtq_desc flags.
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# virtio 1.2 §2.7.6 struct virtq_avail flags.
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
# virtio 1.2 §2.7.8 struct virtq_used flags.
VIRTQ_USED_F_NO_NOTIFY = 1
# virtio 1.2 §6 reserved feature bits (Linux calls the first two VIRTIO_RING_F_*).
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_RING_F_INDIRECT_DESC = VIRTIO_F_INDIRECT_DESC
VIRTIO_RING_F_EVENT_IDX = VIRTIO_F_EVENT_IDX

# virtio 1.2 §2.7: "The maximum Queue Size value is 32768"; alignment and size of each part (table in §2.7).
MAX_QUEUE_SIZE = 32768
DESC_SIZE = 16
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4
# virtio 1.2 §2.7.5: "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in total".
MAX_CHAIN_BYTES = 1 << 32

_DESC = struct.Struct("<QIHH")      # addr, len, flags, next
_USED_ELEM = struct.Struct("<II")   # id, len
_U16 = struct.Struct("<H")
_SEG = struct.Struct("<QI?3x")      # struct ckvm_seg (kvm/virtq.c): gpa, len, write (region and padding skipped)


def desc_table_size(size: int) -> int:
    return DESC_SIZE * size


def avail_ring_size(size: int) -> int:
    return 6 + 2 * size   # flags, idx, ring[size], used_event


def used_ring_size(size: int) -> int:
    return 6 + 8 * size   # flags, idx, ring[size] of (id, len), avail_event


class VirtqueueError(Exception):
    """Something the driver put in a virtqueue that the device will not accept."""

    def __init__(self, reason: str, kind: str):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind    # a short category, stable across occurrences (used to log each kind once)


class BadChain(VirtqueueError):
    """One descriptor chain is invalid.

    `head` is the chain's head index when it is a valid index (the chain can then be returned on the used ring),
    else None. `segments` is the whole chain, unvalidated, when its structure could be walked to the end and only
    a buffer was wrong (outside RAM, readable after writable): a device may then still write an error status into
    the last writable byte (through GuestMemory, which refuses anything outside RAM). Otherwise None.
    """

    def __init__(self, reason: str, kind: str, head: int | None = None,
                 segments: list[tuple[int, int, bool]] | None = None):
        super().__init__(reason, kind)
        self.head = head
        self.segments = segments


class BadQueue(VirtqueueError):
    """The ring itself cannot be trusted (bad layout, avail idx moved too far): the device needs a reset."""


@dataclass(slots=True)
class Chain:
    """A validated descriptor chain: device-readable segments first, then device-writable ones.

    Each segment is (guest-physical address, length, is_write); every one lies inside guest RAM and has a non-zero
    length (zero-length descriptors carry nothing and are dropped).
    """

    head: int
    segments: list[tuple[int, int, bool]] = field(default_factory=list)

    @property
    def readable(self) -> list[tuple[int, int]]:
        return [(gpa, length) for gpa, length, w in self.segments if not w]

    @property
    def writable(self) -> list[tuple[int, int]]:
        return [(gpa, length) for gpa, length, w in self.segments if w]

    @property
    def readable_len(self) -> int:
        return sum(length for _, length, w in self.segments if not w)

    @property
    def writable_len(self) -> int:
        return sum(length for _, length, w in self.segments if w)


def _in_native(field: str, doc: str) -> property:
    """A queue attribute kept in the queue's `struct ckvm_vq` (kvm/virtq.c), the one copy Python and the device
    paths in C (`run_native`, virtio-net's frame path from libslirp) both read and move."""
    return property(lambda self: getattr(self._native_vq, field),
                    lambda self, value: setattr(self._native_vq, field, value), doc=doc)


class Virtqueue:
    """One split virtqueue. The transport sets `size`, the three addresses and `ready`; devices `pop`/`push`.

    Not thread-safe by itself: the transport serialises every use under its lock.
    """

    size = _in_native("size", "the queue size the driver chose (validated by check_layout)")
    desc_table = _in_native("desc_table", "Descriptor Area")
    avail_ring = _in_native("avail_ring", "Driver Area")
    used_ring = _in_native("used_ring", "Device Area")
    event_idx = _in_native("event_idx", "VIRTIO_F_EVENT_IDX negotiated")
    indirect = _in_native("indirect", "VIRTIO_F_INDIRECT_DESC negotiated")
    last_avail = _in_native("last_avail", "the next avail ring entry we will consume (free-running u16)")
    used_idx = _in_native("used_idx", "our copy of used->idx (free-running u16)")
    _avail_idx = _in_native("avail_idx", "avail->idx as read at the start of the current batch")
    ready = _in_native("ready", "QueueReady: the driver enabled the queue (activate checked its layout)")
    _signalled_used = _in_native("signalled_used", "used_idx when needs_interrupt last decided")

    def __init__(self, memory: GuestMemory, max_size: int, index: int = 0):
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue max size {max_size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        self.memory = memory
        self.max_size = max_size
        self.index = index
        # the queue's state (see _in_native), and the C walk's arguments and scratch for the largest size the
        # driver may choose
        self._native_vq = _ffi.new("struct ckvm_vq *")
        self._native_vq_address = address(self._native_vq)
        self._native_segs = _ffi.new("struct ckvm_seg[]", max_size)
        self._native_visited = _ffi.new("uint32_t[]", max_size + 1)
        self._native_walk = _ffi.new("struct ckvm_walk *", {"segs": self._native_segs,
                                                            "visited": self._native_visited})
        self.event_idx = self.indirect = False
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.desc_table = self.avail_ring = self.used_ring = 0
        self.ready = False
        self.last_avail = self.used_idx = self._avail_idx = self._signalled_used = 0
        self._avail = self._used = None  # the rings' region views and their offsets in them (activate)
        self._avail_at = self._used_at = 0

    # ---- set-up (transport) ------------------------------------------------------------------------------------

    def check_layout(self) -> None:
        """Raise BadQueue unless size and the three areas are valid: power of two, aligned, wholly inside RAM."""
        size = self.size
        if not 1 <= size <= self.max_size or size & (size - 1):
            raise BadQueue(f"queue {self.index}: size {size} is not a power of two in 1..{self.max_size}", "size")
        for name, gpa, align, length in (("descriptor table", self.desc_table, DESC_ALIGN, desc_table_size(size)),
                                         ("driver area", self.avail_ring, AVAIL_ALIGN, avail_ring_size(size)),
                                         ("device area", self.used_ring, USED_ALIGN, used_ring_size(size))):
            if gpa % align:   # virtio 1.2 §2.7.1: the driver MUST align each part
                raise BadQueue(f"queue {self.index}: {name} 0x{gpa:x} is not {align}-byte aligned", "align")
            if not self.memory.contains(gpa, length):
                raise BadQueue(f"queue {self.index}: {name} 0x{gpa:x}+0x{length:x} is outside guest RAM", "layout")

    def activate(self) -> None:
        """Start from the indices the driver starts from (0); the used ring's idx is ours to initialise."""
        self.check_layout()
        self.last_avail = self._avail_idx = 0
        self.used_idx = self._signalled_used = 0
        # the rings' regions, found once (check_layout put each whole inside one): every later access is a
        # struct at a known offset, checked by the memoryview itself
        self._avail, self._avail_at = self.memory.region_view(self.avail_ring, avail_ring_size(self.size))
        self._used, self._used_at = self.memory.region_view(self.used_ring, used_ring_size(self.size))
        _U16.pack_into(self._used, self._used_at + 2, 0)
        self.ready = True

    # ---- the device side ---------------------------------------------------------------------------------------

    def pop(self) -> Chain | None:
        """The next available descriptor chain, validated, or None when the driver has made nothing more available.

        Raises BadChain (that one chain is bad; the queue moves on past it) or BadQueue (the ring is broken).
        """
        if self.last_avail == self._avail_idx:
            if not self._refill():
                return None
        slot = self.last_avail % self.size
        head = _U16.unpack_from(self._avail, self._avail_at + 4 + 2 * slot)[0]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if head >= self.size:
            raise BadChain(f"queue {self.index}: avail ring head {head} is out of range (size {self.size})",
                           "head-out-of-range")
        return self._walk(head)

    def _refill(self) -> bool:
        """Read avail->idx once for a new batch; False when nothing new is available."""
        if self.event_idx:
            # virtio 1.2 §2.7.10: avail_event asks the driver to notify once it adds entry `last_avail`. Written
            # before re-reading idx, so a buffer added meanwhile is either seen now or notified.
            _U16.pack_into(self._used, self._used_at + 4 + 8 * self.size, self.last_avail)
        idx = _U16.unpack_from(self._avail, self._avail_at + 2)[0]
        pending = (idx - self.last_avail) & 0xFFFF
        if pending > self.size:
            raise BadQueue(f"queue {self.index}: avail idx moved from {self.last_avail} to {idx}, more than the "
                           f"queue size {self.size}", "avail-idx")
        self._avail_idx = idx
        return pending != 0

    def _walk(self, head: int) -> Chain:
        """The chain from `head`, walked and checked in C (kvm/virtq.c, the rules below); BadChain when wrong.

        Structure (fatal for the chain, no segments known): a next index outside its table; a descriptor visited
        twice (a loop); more descriptors than the queue size (§2.7.5.3.1, indirect ones included); an INDIRECT
        descriptor without VIRTIO_F_INDIRECT_DESC, inside an indirect table, with NEXT, or whose table is not a
        non-zero multiple of 16 bytes inside RAM (§2.7.5.3.1). Buffers (the chain is walked to its end and
        `segments` kept, so a device can still write a status): one outside RAM, a device-readable one after a
        device-writable one (§2.7.4.2), more than 2^32 bytes in all (§2.7.5). The WRITE flag of a descriptor naming
        an indirect table is ignored (§2.7.5.3.2)."""
        self._check_scratch()
        walk = self._native_walk
        walk.desc_table, walk.size, walk.indirect = self.desc_table, self.size, self.indirect
        self.memory.walk_chain(walk, head)
        if walk.error:
            raise self._walk_error(head, walk)
        segments = list(_SEG.iter_unpack(_ffi.buffer(walk.segs, _SEG.size * walk.nsegs)))
        if walk.problem:
            exc = self._walk_error(head, walk)
            exc.segments = segments
            raise exc
        return Chain(head, segments)

    def run_native(self, fn, *args):
        """`fn(region table, struct ckvm_vq, struct ckvm_walk, *args)`: a device's C path (kvm/virtio_blk.c,
        kvm/virtio_net.c) that pops and pushes in C, on the queue's own state (the struct ckvm_vq this class keeps
        its addresses and indices in): C and this class take turns on the queue, never at once. Returns what `fn`
        returns."""
        self._check_scratch()
        return self.memory.call_native(fn, self._native_vq, self._native_walk, *args)

    def _check_scratch(self) -> None:
        if not 1 <= self.size <= self.max_size:  # the C walk's scratch holds max_size segments
            raise BadQueue(f"queue {self.index}: size {self.size} is not in 1..{self.max_size}", "size")

    def _walk_error(self, head: int, walk) -> BadChain:
        code = walk.error or walk.problem
        where = "indirect table" if walk.in_indirect else "descriptor table"
        reason, kind = {
            _lib.CKVM_WALK_NEXT_OUT_OF_RANGE: (f"next index {walk.idx} is outside the {where} ({walk.entries} "
                                               "entries)", "next-out-of-range"),
            _lib.CKVM_WALK_LOOP: (f"descriptor {walk.idx} is visited twice (a loop)", "loop"),
            _lib.CKVM_WALK_INDIRECT_NOT_NEGOTIATED: ("INDIRECT flag without VIRTIO_F_INDIRECT_DESC negotiated",
                                                     "indirect-not-negotiated"),
            _lib.CKVM_WALK_NESTED_INDIRECT: ("indirect descriptor inside an indirect table", "nested-indirect"),
            _lib.CKVM_WALK_INDIRECT_NEXT: ("indirect descriptor with the NEXT flag", "indirect-next"),
            _lib.CKVM_WALK_INDIRECT_LEN: (f"indirect table length {walk.len} is not a non-zero multiple of 16",
                                          "indirect-len"),
            _lib.CKVM_WALK_INDIRECT_OUTSIDE_RAM: (f"indirect table 0x{walk.addr:x}+0x{walk.len:x} is outside "
                                                  "guest RAM", "outside-ram"),
            _lib.CKVM_WALK_TOO_LONG: (f"more than {self.size} descriptors (the queue size)", "too-long"),
            _lib.CKVM_WALK_TABLE_OUTSIDE_RAM: (f"descriptor table 0x{walk.addr:x}+0x{walk.len:x} is outside guest "
                                               "RAM", "outside-ram"),
            _lib.CKVM_WALK_ORDER: ("a device-readable descriptor follows a device-writable one", "order"),
            _lib.CKVM_WALK_TOO_LARGE: ("more than 2^32 bytes in total", "too-large"),
            _lib.CKVM_WALK_BUFFER_OUTSIDE_RAM: (f"buffer 0x{walk.addr:x}+0x{walk.len:x} is outside guest RAM",
                                                "outside-ram"),
        }[code]
        return BadChain(f"queue {self.index} chain {head}: {reason}", kind, head)

    def push(self, head: int, written_len: int) -> None:
        """Return chain `head` to the driver: the used element first, then used->idx (§2.7.8.2)."""
        if not 0 <= head < self.size:
            raise ValueError(f"queue {self.index}: head {head} is not a descriptor index")
        slot = self.used_idx % self.size
        _USED_ELEM.pack_into(self._used, self._used_at + 4 + 8 * slot, head, min(max(written_len, 0), 0xFFFFFFFF))
        # On x86 stores are not reordered with other stores; Python issues them in program order.
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        _U16.pack_into(self._used, self._used_at + 2, self.used_idx)

    def needs_interrupt(self) -> bool:
        """Whether the driver wants a used buffer notification for what was pushed since the last call (§2.7.7:
        EVENT_IDX's used_event, else VIRTQ_AVAIL_F_NO_INTERRUPT): kvm/virtq.c ckvm_vq_needs_interrupt, the one
        decision Python and the notifications served in C (devices/virtio/notifier.py) share."""
        wanted = self.memory.call_quick(_quick.ckvm_vq_needs_interrupt, self._native_vq_address)
        if wanted < 0:
            raise GuestMemoryError(f"queue {self.index}: its rings are not inside guest RAM")
        return bool(wanted)

    def __repr__(self) -> str:
        return (f"Virtqueue(index={self.index}, size={self.size}, ready={self.ready}, desc=0x{self.desc_table:x}, "
                f"avail=0x{self.avail_ring:x}, used=0x{self.used_ring:x})")

