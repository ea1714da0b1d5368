"""qcow2 refcount blocks of any width (refcount_order 0..6 = 1..64-bit entries), held decoded in memory.

Widths of 8..64 bits live in an `array` (native order; big-endian on disk per the spec); 1, 2 and 4-bit entries
stay packed in a bytearray, entry 0 in the least significant bits of byte 0 (spec: "bit 0 means the least
significant bit in this context"). `find_zero` is C-speed for both (array.index / a regular expression).
"""
from __future__ import annotations

import re
import sys
from array import array

_LITTLE = sys.byteorder == "little"
_TYPECODES = {3: "B", 4: "H", 5: "I" if array("I").itemsize == 4 else "L", 6: "Q"}


def new_block(order: int, data: bytes):
    return (ArrayRefs if order >= 3 else PackedRefs)(order, data)


class ArrayRefs:
    __slots__ = ("a", "order", "max")

    def __init__(self, order: int, data: bytes):
        a = array(_TYPECODES[order])
        a.frombytes(data)
        if _LITTLE and order > 3:
            a.byteswap()
        self.a = a
        self.order = order
        self.max = (1 << (1 << order)) - 1

    def get(self, i: int) -> int:
        return self.a[i]

    def set(self, i: int, v: int) -> None:
        self.a[i] = v

    def find_zero(self, start: int) -> int:
        """Index of the first zero entry at or after `start`, or len() when there is none."""
        try:
            return self.a.index(0, start)
        except ValueError:
            return len(self.a)

    def zero_run(self, start: int, cap: int) -> int:
        """How many entries from `start` (at most `cap`) are zero."""
        chunk = self.a[start:start + cap]
        if chunk.count(0) == len(chunk):
            return len(chunk)
        n = 0
        for v in chunk:
            if v:
                break
            n += 1
        return n

    def __len__(self) -> int:
        return len(self.a)

    def tobytes(self) -> bytes:
        if _LITTLE and self.order > 3:
            b = array(self.a.typecode, self.a)
            b.byteswap()
            return b.tobytes()
        return self.a.tobytes()


def _zero_field_class(order: int) -> re.Pattern:
    bits = 1 << order
    mask = (1 << bits) - 1
    hits = [b for b in range(256) if any((b >> s) & mask == 0 for s in range(0, 8, bits))]
    return re.compile(b"[" + b"".join(re.escape(bytes([b])) for b in hits) + b"]")


_ZERO_FIELD = {order: _zero_field_class(order) for order in (0, 1, 2)}


class PackedRefs:
    __slots__ = ("buf", "order", "bits", "per", "mask", "max")

    def __init__(self, order: int, data: bytes):
        self.buf = bytearray(data)
        self.order = order
        self.bits = 1 << order
        self.per = 8 >> order
        self.mask = self.max = (1 << self.bits) - 1

    def get(self, i: int) -> int:
        return (self.buf[i // self.per] >> (self.bits * (i % self.per))) & self.mask

    def set(self, i: int, v: int) -> None:
        k, sh = divmod(i, self.per)
        sh *= self.bits
        self.buf[k] = (self.buf[k] & ~(self.mask << sh)) | (v << sh)

    def find_zero(self, start: int) -> int:
        n = len(self)
        i = start
        while i < n and i % self.per:
            if not self.get(i):
                return i
            i += 1
        if i >= n:
            return n
        m = _ZERO_FIELD[self.order].search(self.buf, i // self.per)
        if m is None:
            return n
        i = m.start() * self.per
        while self.get(i):
            i += 1
        return i

    def zero_run(self, start: int, cap: int) -> int:
        n = 0
        end = min(len(self), start + cap)
        while start + n < end and not self.get(start + n):
            n += 1
        return n

    def __len__(self) -> int:
        return len(self.buf) * self.per

    def tobytes(self) -> bytes:
        return bytes(self.buf)
