"""The descriptor chain walk as cloudkvm first wrote it in Python, kept as an independent oracle for the C walk
(kvm/virtq.c) that replaced it: the same rules (virtio 1.2 §2.7.5, §2.7.5.3, §2.7.4.2) with a visited set.
Returns ("ok", segments), ("problem", kind, segments) or ("error", kind)."""
import struct

NEXT, WRITE, INDIRECT = 1, 2, 4
MAX_CHAIN_BYTES = 1 << 32
_DESC = struct.Struct("<QIHH")


def reference_walk(memory, desc_table: int, size: int, indirect_ok: bool, head: int):
    table, entries = desc_table, size
    in_indirect = False
    idx = head
    seen: set[int] = set()
    segments = []
    count = total = 0
    writing = False
    problem = None
    while True:
        if idx >= entries:
            return ("error", "next-out-of-range")
        if idx in seen:
            return ("error", "loop")
        seen.add(idx)
        addr, length, flags, nxt = _DESC.unpack(memory.read(table + 16 * idx, 16))
        if flags & INDIRECT:
            if not indirect_ok:
                return ("error", "indirect-not-negotiated")
            if in_indirect:
                return ("error", "nested-indirect")
            if flags & NEXT:
                return ("error", "indirect-next")
            if length == 0 or length % 16:
                return ("error", "indirect-len")
            if not memory.contains(addr, length):
                return ("error", "outside-ram")
            table, entries = addr, length // 16
            in_indirect = True
            idx = 0
            seen = set()
            continue
        count += 1
        if count > size:
            return ("error", "too-long")
        is_write = bool(flags & WRITE)
        if is_write:
            writing = True
        elif writing and problem is None:
            problem = "order"
        total += length
        if total > MAX_CHAIN_BYTES and problem is None:
            problem = "too-large"
        if length:
            if problem is None and not memory.contains(addr, length):
                problem = "outside-ram"
            segments.append((addr, length, is_write))
        if not flags & NEXT:
            break
        idx = nxt
    return ("problem", problem, segments) if problem else ("ok", segments)
