"""Guest RAM: mmap'd regions and the one bounds-checked accessor every guest-supplied address goes through."""
import gc
import mmap
import struct
import threading
from dataclasses import dataclass, field

from ..errors import GuestMemoryError
from .native import address, ffi, lib

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# KVM maps guest RAM with 2 MiB pages (x86 NPT/EPT, arm64 stage 2 with 4 KiB granules) only where the host address
# and the guest address agree modulo 2 MiB and the host has a huge page there (THP); kernels before 6.7 place
# anonymous mappings at any page, which kept every guest access on 4 KiB pages (Linux virt/kvm/kvm_main.c,
# arch/x86/kvm/mmu: the large-page check on `userspace_addr ^ base_gfn`).
HUGE_ALIGN = 2 << 20
MAX_NATIVE_REGIONS = lib.CKVM_MAX_REGIONS  # struct ckvm_mem (kvm/virtq.c); boards use one or two


@dataclass
class MemoryRegion:
    """One contiguous piece of guest-physical RAM backed by an anonymous private mapping."""

    gpa: int
    size: int
    map: mmap.mmap = field(repr=False)   # the whole mapping, padded for alignment; `view` is the region in it
    view: memoryview = field(repr=False)
    host_addr: int                       # the address of `view`'s first byte: congruent to `gpa` modulo HUGE_ALIGN

    @property
    def end(self) -> int:
        return self.gpa + self.size


def _aligned_region(gpa: int, size: int) -> MemoryRegion:
    """An anonymous private mapping for [gpa, gpa+size) placed so that host and guest addresses agree modulo
    HUGE_ALIGN (over-allocated by HUGE_ALIGN, never touched outside the region), asking for transparent huge
    pages."""
    m = mmap.mmap(-1, size + HUGE_ALIGN,
                  flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0))
    start = int(ffi.cast("uintptr_t", ffi.from_buffer(m)))
    pad = (gpa - start) % HUGE_ALIGN
    if hasattr(mmap, "MADV_HUGEPAGE"):
        m.madvise(mmap.MADV_HUGEPAGE)
    view = memoryview(m)[pad:pad + size]
    return MemoryRegion(gpa, size, m, view, start + pad)


class GuestMemory:
    """Guest-physical RAM. All access by guest address is bounds-checked; nothing outside a region is reachable."""

    def __init__(self, layout: list[tuple[int, int]]):
        self.regions: list[MemoryRegion] = []
        for gpa, size in sorted(layout):
            if size <= 0 or size % mmap.PAGESIZE or gpa % mmap.PAGESIZE:
                raise ValueError(f"memory region 0x{gpa:x}+0x{size:x} is not page aligned")
            if self.regions and gpa < self.regions[-1].end:
                raise ValueError(f"memory region 0x{gpa:x} overlaps the previous one")
            self.regions.append(_aligned_region(gpa, size))
        if len(self.regions) > MAX_NATIVE_REGIONS:
            raise ValueError(f"{len(self.regions)} memory regions; the C helpers take {MAX_NATIVE_REGIONS}")
        # The region table the C chain walk (virtq.c) reads guest RAM through (`walk_chain`); emptied by close()
        self._native_lock = threading.RLock()  # re-entrant: C may call back into Python that reaches RAM again
        self.native = ffi.new("struct ckvm_mem *")
        self._native_address = address(self.native)
        self.native.count = len(self.regions)
        for i, r in enumerate(self.regions):
            self.native.regions[i].gpa, self.native.regions[i].size = r.gpa, r.size
            self.native.regions[i].host = ffi.cast("uint8_t *", r.host_addr)

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

    def walk_chain(self, walk, head: int) -> None:
        """kvm/virtq.c's descriptor chain walk over this RAM."""
        self.call_native(lib.ckvm_walk_chain, walk, head)

    def call_native(self, fn, *args):
        """`fn(region table, *args)`: the one way C helpers (kvm/virtq.c, kvm/virtio_blk.c) reach this RAM, never
        while close() unmaps it (C holds no view that would keep a mapping in place)."""
        with self._native_lock:
            return fn(self.native, *args)

    def call_quick(self, fn, *args):
        """`call_native` for a `kvm.native.quick` helper (the GIL kept): it takes the region table's address."""
        with self._native_lock:
            return fn(self._native_address, *args)

    def region_view(self, gpa: int, length: int) -> tuple[memoryview, int]:
        """The whole view of the region holding [gpa, gpa+length) and gpa's offset in it, for a caller that
        accesses one fixed structure often (a virtqueue's rings). No new view is made: after close() the region's
        view is released and any access raises instead of touching unmapped memory."""
        r, off = self._locate(gpa, length)
        return r.view, off

    def views(self, pieces) -> list[memoryview]:
        """`view` of each (gpa, length) of `pieces`, in order (one region lookup per change of region)."""
        out = []
        view, start, end = None, 0, 0
        for gpa, length in pieces:
            if view is None or length < 0 or not (start <= gpa and gpa + length <= end):
                region, _ = self._locate(gpa, length)
                view, start, end = region.view, region.gpa, region.end
            out.append(view[gpa - start:gpa - start + length])
        return out

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data) -> None:
        self.view(gpa, len(data))[:] = data

    def is_zero(self, gpa: int, length: int) -> bool:
        """Whether every byte of the range is zero (raises like `read` outside guest RAM)."""
        return self.view(gpa, length) == bytes(length)

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        r, off = self._locate(gpa, length)
        r.view[off:off + length] = bytes([byte]) * length

    def read_u16(self, gpa: int) -> int:
        r, off = self._locate(gpa, 2)
        return _U16.unpack_from(r.view, off)[0]

    def read_u32(self, gpa: int) -> int:
        r, off = self._locate(gpa, 4)
        return _U32.unpack_from(r.view, off)[0]

    def read_u64(self, gpa: int) -> int:
        r, off = self._locate(gpa, 8)
        return _U64.unpack_from(r.view, off)[0]

    def write_u16(self, gpa: int, value: int) -> None:
        r, off = self._locate(gpa, 2)
        _U16.pack_into(r.view, off, value)

    def write_u32(self, gpa: int, value: int) -> None:
        r, off = self._locate(gpa, 4)
        _U32.pack_into(r.view, off, value)

    def write_u64(self, gpa: int, value: int) -> None:
        r, off = self._locate(gpa, 8)
        _U64.pack_into(r.view, off, value)

    def close(self) -> None:
        """Unmap guest RAM. A view of it still alive (one an exception's traceback keeps, in a reference cycle
        until the collector runs) keeps its mapping: collected first, else left mapped until the process ends
        rather than unmapped under it."""
        with self._native_lock:
            self.native.count = 0  # a chain walk finds nothing from now on, and none is running
        for r in self.regions:
            r.view.release()
            try:
                r.map.close()
            except BufferError:
                gc.collect()
                try:
                    r.map.close()
                except BufferError:
                    pass
        self.regions = []
