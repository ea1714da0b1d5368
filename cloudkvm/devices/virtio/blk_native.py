"""virtio-blk's C data path (kvm/virtio_blk.c, virtio 1.2 §5.2.6): the disk map it reads and the files it may use.

The map has one entry per granule of the disk, filled on demand from the disk's own answer to `runs`
(storage/placement.py) when C reports a miss, and forgotten by blk.py around every change it makes through the
disk. A granule that is one whole deflate-compressed qcow2 cluster is inflated by C (zlib) into a small cache of
clusters (CACHE_BYTES) kept here. C reads the files through duplicates of the disk's descriptors, owned here:
closed by `close()` under the lock `serve` holds, so C never uses a descriptor number that may since name another
file.
"""
from __future__ import annotations

import mmap
import os
import threading
from array import array

from ...kvm.native import ffi, lib
from ...storage.placement import ZEROS, Deflated, Place

MIN_GRANULE = 64 << 10
FILL_WINDOW = 128       # granules learnt per miss (8 MiB at the smallest granule; a miss costs ~50 us natively
                        # of Python before its first granule, then ~0.5 us a granule)
FILL_WINDOW_MAX = 4096  # a sequential reader's window doubles per miss up to this (256 MiB at 64 KiB): each miss is a
                        # round trip to Python, which under an emulated KVM costs more than the granules themselves
SLOW = lib.CKVM_MAP_KNOWN | lib.CKVM_MAP_SLOW
MAX_ENTRIES = 1 << 24   # 128 MiB of address space at most for the map (an anonymous mapping: touched pages only)
CACHE_BYTES = 1 << 20   # inflated clusters kept (at least two): a sequential reader's cluster across its requests
SECTOR = 512


class BlkDataPath:
    """The C path's state for one disk: `serve(queue)` runs it; `fill` and `forget` keep its map true."""

    def __init__(self, disk, capacity: int, read_only: bool):
        size = capacity * 512
        granule = max(MIN_GRANULE, getattr(disk, "cluster_size", 0))
        while size > granule * MAX_ENTRIES:
            granule *= 2
        self.disk = disk
        self.size = size
        self.granule = granule
        entries = max(1, -(-size // granule))
        self._map_mem = mmap.mmap(-1, entries * 8)
        self._map = ffi.from_buffer("uint64_t[]", self._map_mem)
        self._map_view = memoryview(self._map_mem).cast("Q")
        self._blk = ffi.new("struct ckvm_blk *")
        self._blk.capacity = capacity
        self._blk.read_only = int(read_only)
        self._blk.granule_bits = granule.bit_length() - 1
        self._blk.map = self._map
        for i in range(lib.CKVM_BLK_MAX_FILES):
            self._blk.fds[i] = -1
        slots = max(2, CACHE_BYTES // granule)
        self._cache_mem = mmap.mmap(-1, slots * granule + lib.CKVM_BLK_SCRATCH)  # touched when a cluster is inflated
        self._keys = ffi.new("uint64_t[]", slots)
        self._blk.cache = ffi.from_buffer("uint8_t[]", self._cache_mem)
        self._blk.scratch = self._blk.cache + slots * granule
        self._blk.keys = self._keys
        self._blk.slots = slots
        self._files: dict[int, int] = {}  # the disk's fd -> index of its duplicate in fds
        self._lock = threading.Lock()
        self._closed = False
        self._window = FILL_WINDOW
        self._filled_to = -1    # the granule after the last window learnt
        self.served = 0             # by the last serve()

    def serve(self, queue) -> int:
        """Serve what C can from `queue` (CKVM_BLK_* says where it stopped); `served` counts the completions."""
        with self._lock:
            if self._closed:
                self.served = 0
                return lib.CKVM_BLK_SLOW
            code = queue.run_native(lib.ckvm_blk_serve, self._blk)
        self.served = self._blk.served
        return code

    @property
    def served_total(self) -> int:
        """Requests C has completed so far, from here and from notifications served in C (notifier.py)."""
        return self._blk.served_total

    @property
    def native(self):
        """The `struct ckvm_blk` C serves from (kvm/virtio_blk.c), for notifications served in C."""
        return self._blk

    @property
    def miss(self) -> tuple[int, int]:
        return self._blk.miss_offset, self._blk.miss_length

    def fill(self, offset: int, length: int) -> bool:
        """Learn where every granule of [offset, offset+length) is, and of the rest of a window of granules around
        it, from the disk: the FILL_WINDOW granules around it (a random reader's neighbours), or, for a miss just
        past the last window (a sequential reader), the next twice as many as last time, up to FILL_WINDOW_MAX.
        False when the disk failed to say (nothing is learnt: the request goes to blk.py, which meets the failure
        itself)."""
        g = self.granule
        miss = offset // g
        if miss == self._filled_to:
            self._window = min(self._window * 2, FILL_WINDOW_MAX)
            first = miss
        else:
            self._window = FILL_WINDOW
            first = miss // FILL_WINDOW * FILL_WINDOW
        last = max((offset + length - 1) // g + 1, first + self._window)
        start, stop = first * g, min(last * g, self.size)
        try:
            entries = self._entries_of_runs(first, last, self.disk.runs(start, stop - start))
        except Exception:
            return False
        self._map_view[first:first + len(entries)] = entries
        self._filled_to = first + len(entries)
        return True

    def _entries_of_runs(self, first: int, last: int, runs: list) -> array:
        """Map entries for granules first..last-1 from the disk's runs (storage/placement.py): a granule inside one
        run gets its answer (a run of places, entries counting up by the granule), one across runs is Python's."""
        g = self.granule
        entries = array("Q", [SLOW]) * (min(last, -(-self.size // g)) - first)
        for start, length, answer in runs:
            lo = max(-(-start // g), first)                         # granules wholly inside [start, start+length)
            hi = min((start + length) // g, last)
            if start + length == self.size:
                hi = min(-(-self.size // g), last)                  # the disk's last granule may be short
            if lo >= hi:
                continue
            if isinstance(answer, Place):
                answer = answer._replace(offset=answer.offset + lo * g - start)
                if answer.offset + (hi - lo) * g > lib.CKVM_MAP_OFFSET_MASK:
                    answer = None                                   # past what an entry can hold
            elif isinstance(answer, Deflated) and (start != lo * g or length != g):
                answer = None                                       # a cluster that is not exactly one granule
            entry = self._entry(answer)
            if isinstance(answer, Place) and entry != SLOW:
                entries[lo - first:hi - first] = array("Q", range(entry, entry + (hi - lo) * g, g))
            else:
                entries[lo - first:hi - first] = array("Q", [entry]) * (hi - lo)
        return entries

    def forget(self, offset: int, length: int) -> None:
        """The disk changed over [offset, offset+length) (or may have): ask it again next time."""
        if length <= 0:
            return
        g = self.granule
        first, last = offset // g, min((offset + length - 1) // g, len(self._map_mem) // 8 - 1)
        if first <= last:
            self._map_view[first:last + 1] = array("Q", bytes((last + 1 - first) * 8))

    def _entry(self, place) -> int:
        if place == ZEROS:
            return lib.CKVM_MAP_KNOWN | lib.CKVM_MAP_ZERO
        if isinstance(place, Deflated):
            return self._deflate_entry(place)
        if not isinstance(place, Place):
            return SLOW
        index = self._file_index(place.fd)
        if index is None:
            return SLOW
        return (lib.CKVM_MAP_KNOWN | (lib.CKVM_MAP_WRITABLE if place.writable else 0)
                | index << lib.CKVM_MAP_FILE_SHIFT | place.offset)

    def _deflate_entry(self, cluster: Deflated) -> int:
        """A DEFLATE entry (kvm/virtio_blk.c): the file, the offset and the sectors the data ends in; SLOW when the
        data does not end at a sector's end as qcow2's does, or is beyond what an entry holds."""
        end = cluster.offset + cluster.length
        sectors = end // SECTOR - cluster.offset // SECTOR
        if end % SECTOR or not 0 < sectors <= lib.CKVM_MAP_DEFLATE_SECTORS_MAX \
                or end > lib.CKVM_MAP_DEFLATE_OFFSET_MASK + 1:
            return SLOW
        index = self._file_index(cluster.fd)
        if index is None:
            return SLOW
        return (lib.CKVM_MAP_KNOWN | lib.CKVM_MAP_DEFLATE | index << lib.CKVM_MAP_FILE_SHIFT
                | (sectors - 1) << lib.CKVM_MAP_DEFLATE_SECTORS_SHIFT | cluster.offset)

    @property
    def inflated(self) -> int:
        """Compressed clusters C has inflated so far (a cluster read again from its cache is not counted)."""
        return self._blk.inflated

    def _file_index(self, fd: int) -> int | None:
        index = self._files.get(fd)
        if index is None:
            if len(self._files) == lib.CKVM_BLK_MAX_FILES:
                return None
            with self._lock:
                if self._closed:
                    return None
                index = len(self._files)
                self._blk.fds[index] = os.dup(fd)
                self._files[fd] = index
        return index

    def close(self) -> None:
        """Close the duplicated descriptors; C serves nothing from now on (everything goes to blk.py)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for i in range(lib.CKVM_BLK_MAX_FILES):
                fd, self._blk.fds[i] = self._blk.fds[i], -1
                if fd >= 0:
                    os.close(fd)

    def __del__(self):
        if hasattr(self, "_closed"):   # (not when __init__ failed before it had anything to close)
            self.close()
