"""Guest RAM: mmap'd regions and the one bounds-checked accessor every guest-supplied address goes through."""
import mmap
import struct
from dataclasses import dataclass, field

from ..errors import GuestMemoryError
from .native import ffi

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass
class MemoryRegion:
    """One contiguous piece of guest-physical RAM backed by an anonymous private mapping."""

    gpa: int
    size: int
    map: mmap.mmap = field(repr=False)
    view: memoryview = field(repr=False)
    host_addr: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMemory:
    """Guest-physical RAM. All access by guest address is bounds-checked; nothing outside a region is reachable."""

    def __init__(self, layout: list[tuple[int, int]]):
        self.regions: list[MemoryRegion] = []
        for gpa, size in sorted(layout):
            if size <= 0 or size % mmap.PAGESIZE or gpa % mmap.PAGESIZE:
                raise ValueError(f"memory region 0x{gpa:x}+0x{size:x} is not page aligned")
            if self.regions and gpa < self.regions[-1].end:
                raise ValueError(f"memory region 0x{gpa:x} overlaps the previous one")
            m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0))
            if hasattr(mmap, "MADV_HUGEPAGE"):
                m.madvise(mmap.MADV_HUGEPAGE)
            host = int(ffi.cast("uintptr_t", ffi.from_buffer(m)))
            self.regions.append(MemoryRegion(gpa, size, m, memoryview(m), host))

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    def _locate(self, gpa: int, length: int) -> tuple[MemoryRegion, int]:
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"bad guest range 0x{gpa:x}+{length}")
        for r in self.regions:
            if r.gpa <= gpa < r.end:
                off = gpa - r.gpa
                if off + length > r.size:
                    break
                return r, off
        raise GuestMemoryError(f"guest range 0x{gpa:x}+0x{length:x} is outside guest RAM")

    def contains(self, gpa: int, length: int = 1) -> bool:
        try:
            self._locate(gpa, length)
            return True
        except GuestMemoryError:
            return False

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy window on guest RAM [gpa, gpa+length); raises GuestMemoryError when not all inside RAM."""
        r, off = self._locate(gpa, length)
        return r.view[off:off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data) -> None:
        self.view(gpa, len(data))[:] = data

    def is_zero(self, gpa: int, length: int) -> bool:
        """Whether every byte of the range is zero (raises like `read` outside guest RAM)."""
        return self.view(gpa, length) == bytes(length)

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        r, off = self._locate(gpa, length)
        r.map[off:off + length] = bytes([byte]) * length

    def read_u16(self, gpa: int) -> int:
        r, off = self._locate(gpa, 2)
        return _U16.unpack_from(r.map, off)[0]

    def read_u32(self, gpa: int) -> int:
        r, off = self._locate(gpa, 4)
        return _U32.unpack_from(r.map, off)[0]

    def read_u64(self, gpa: int) -> int:
        r, off = self._locate(gpa, 8)
        return _U64.unpack_from(r.map, off)[0]

    def write_u16(self, gpa: int, value: int) -> None:
        r, off = self._locate(gpa, 2)
        _U16.pack_into(r.map, off, value)

    def write_u32(self, gpa: int, value: int) -> None:
        r, off = self._locate(gpa, 4)
        _U32.pack_into(r.map, off, value)

    def write_u64(self, gpa: int, value: int) -> None:
        r, off = self._locate(gpa, 8)
        _U64.pack_into(r.map, off, value)

    def close(self) -> None:
        for r in self.regions:
            r.view.release()
            r.map.close()
        self.regions = []
