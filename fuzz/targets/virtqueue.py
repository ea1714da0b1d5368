"""Fuzz the split-virtqueue walker (cloudkvm/devices/virtio/queue.py, virtio 1.2 §2.7) directly, without a device.

Input: a 10-byte header, then guest RAM. Guest RAM is two 4 KiB regions with a hole between them
([0, 0x1000) and [0x2000, 0x3000)), so buffers may straddle the hole; the bytes after the header fill the first
region, then the second. The queue's maximum size is 16: a notification costs up to size^2 descriptor reads
(size chains of size descriptors), and nothing in the walker depends on the size but its bounds. Header:
  byte 0   bits 0-3: log2 of the queue size (sizes above 16 must be refused), bit 4: EVENT_IDX,
           bit 5: INDIRECT_DESC, bit 6: a size that is not a power of two (size - 1)
  bytes 1-6  descriptor table, driver area, device area addresses (u16 each, little-endian)
  bytes 7-8  the avail/used index the queue starts from (a queue that has already wrapped)
  byte 9     at most this many pops (0: until the queue is empty)

Documented outcomes: `BadQueue` from activation or a pop (the device then needs a reset), `BadChain` for one
chain (returned empty when its head is known), or a chain. Oracles for a chain, checked against the header and
RAM independently of the walker: its head is the avail ring entry it was popped from; every segment has a
non-zero length and lies wholly inside one RAM region; no device-readable segment follows a device-writable one;
at most `size` segments and 2^32 bytes; the used index counts the pushes.
"""
import struct

from cloudkvm.devices.virtio.queue import BadChain, BadQueue, Virtqueue
from cloudkvm.kvm.memory import GuestMemory

from .oracle import Crash

MAX_QUEUE = 16
REGIONS = ((0x0000, 0x1000), (0x2000, 0x1000))
HEADER = struct.Struct("<BHHHHB")
MAX_LEN = HEADER.size + sum(size for _, size in REGIONS)
TIMEOUT = 10
INSTRUMENT = ["cloudkvm"]
# not instrumented: the bounds-checked RAM accessor (its coverage says nothing about the walker; time)
UNINSTRUMENTED = ["cloudkvm.kvm.memory"]

_memory: GuestMemory | None = None


def memory() -> GuestMemory:
    global _memory
    if _memory is None:
        _memory = GuestMemory(list(REGIONS))
    return _memory


def _load_ram(mem: GuestMemory, body: bytes) -> None:
    pos = 0
    for gpa, size in REGIONS:
        chunk = body[pos:pos + size]
        mem.fill(gpa, size, 0)
        if chunk:
            mem.write(gpa, chunk)
        pos += size


def _inside_one_region(gpa: int, length: int) -> bool:
    return any(start <= gpa and gpa + length <= start + size for start, size in REGIONS)


def _check_chain(mem: GuestMemory, chain, expected_head: int, size: int) -> None:
    if chain.head != expected_head:
        raise Crash(f"popped chain {chain.head}, but the avail ring entry says {expected_head}")
    if len(chain.segments) > size:
        raise Crash(f"chain {chain.head} has {len(chain.segments)} segments, more than the queue size {size}")
    writing = False
    total = 0
    for gpa, length, is_write in chain.segments:
        if length <= 0:
            raise Crash(f"chain {chain.head}: segment 0x{gpa:x} has length {length}")
        if not _inside_one_region(gpa, length):
            raise Crash(f"chain {chain.head}: segment 0x{gpa:x}+0x{length:x} is not inside guest RAM")
        if is_write:
            writing = True
        elif writing:
            raise Crash(f"chain {chain.head}: a device-readable segment follows a device-writable one")
        total += length
    if total > 1 << 32:
        raise Crash(f"chain {chain.head}: {total} bytes, more than 2^32")


def one_input(data: bytes) -> str:
    if len(data) < HEADER.size:
        return "short"
    flags, desc, avail, used, start, max_pops = HEADER.unpack_from(data)
    mem = memory()
    _load_ram(mem, data[HEADER.size:])
    size = 1 << (flags & 0xF)
    if flags & 0x40 and size > 1:
        size -= 1
    q = Virtqueue(mem, MAX_QUEUE)
    q.size, q.desc_table, q.avail_ring, q.used_ring = size, desc, avail, used
    q.event_idx, q.indirect = bool(flags & 0x10), bool(flags & 0x20)
    try:
        q.activate()
    except BadQueue:
        return "bad-layout"
    if not (1 <= size <= MAX_QUEUE and not size & (size - 1)):
        raise Crash(f"a queue of size {size} was activated")
    for gpa, length in ((desc, 16 * size), (avail, 6 + 2 * size), (used, 6 + 8 * size)):
        if not _inside_one_region(gpa, length):
            raise Crash(f"a ring at 0x{gpa:x}+0x{length:x} outside guest RAM was activated")
    # a queue that has been running for a while: both indices start at `start`
    q.last_avail = q._avail_idx = q.used_idx = q._signalled_used = start
    mem.write_u16(used + 2, start)
    position, pushes, outcome = start, 0, "empty"
    for _ in range(max_pops or 4 * size + 4):
        try:
            chain = q.pop()
        except BadChain as exc:
            position = (position + 1) & 0xFFFF
            if exc.head is not None:
                if not 0 <= exc.head < size:
                    raise Crash(f"BadChain names head {exc.head}, outside the queue of {size}") from exc
                q.push(exc.head, 0)
                pushes += 1
            outcome = "bad-chain"
            continue
        except BadQueue:
            return "bad-queue"
        if chain is None:
            break
        _check_chain(mem, chain, mem.read_u16(avail + 4 + 2 * (position % size)), size)
        position = (position + 1) & 0xFFFF
        q.push(chain.head, chain.writable_len)
        pushes += 1
        outcome = "chains" if outcome == "empty" else outcome
    if mem.read_u16(used + 2) != (start + pushes) & 0xFFFF:
        raise Crash(f"used idx is {mem.read_u16(used + 2)} after {pushes} pushes from {start}")
    q.needs_interrupt()
    return outcome
