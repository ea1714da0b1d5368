"""qcow2 images (versions 2 and 3), written from QEMU's docs/interop/qcow2.txt ("the spec").

Supported
- any cluster size 512 B .. 2 MiB; refcount widths 1..64 bits (refcount_order 0..6) for reading and writing;
- backing files and chains (relative names resolve against the image's folder; the backing format extension
  0xE2792ACA is honoured, else the backing file is probed); loops and self-references are refused;
- compressed clusters (raw deflate, or zstd when the v3 compression_type says so), read; a write to one
  rewrites it as a normal cluster and drops its references;
- zero clusters (v3 flag; in v2 unallocated clusters without backing data read as zeros);
- extended L2 entries (subclusters): read only;
- allocating writes with copy-on-write from the backing chain, L2 table allocation, refcount block creation and
  refcount table growth, exact refcounts (`qemu-img check` finds no leaks after close());
- `create()` (v3, 16-bit refcounts) and `grow()` (resizes the L1 table, moving it when needed);
- discard and write_zeroes: whole clusters become unallocated, or v3 zero clusters where a backing file would
  show through; write_zeroes without `unmap` keeps the clusters the image owns allocated ("zero, allocated"),
  and writes into such preallocated zero clusters fill them in place.

Not supported (refused with a CloudkvmError): encryption, external data files, writing images with internal
snapshots (reading their active state works), writing extended-L2 images, writing images marked corrupt or dirty
(lazy refcounts left unrepaired), creating compressed clusters, shrinking. Bitmaps are left alone (a writer
clears the autoclear bits, which marks them inconsistent, as the spec asks).

Metadata caching and write ordering (crash safety)
Data is written straight to its host cluster with pwrite. Metadata changes go to in-memory caches first: L2
tables (LRU, 32 tables), refcount blocks (LRU, 32 blocks) and the whole L1 table. The on-disk image must never
reference a cluster whose refcount on disk is lower than its references, and an L2 entry must never point at a
new cluster before that cluster holds its data. So dirty metadata reaches the disk in this order, in
`flush()`, `close()`, and whenever a dirty L2 table is evicted from its cache:

    1. (data clusters were already pwritten, including the copy-on-write parts from the backing chain)
    2. dirty refcount blocks (increments only) and brand-new L2 tables (not yet linked from the on-disk L1)
    3. fdatasync                                     <- barrier: data + refcounts + new tables durable
    4. modified existing L2 tables, then dirty L1 entries (8-byte writes)
    5. only if clusters were released (a rewritten compressed or shared cluster, discard, write_zeroes):
       fdatasync, then the refcount decrements are applied and their blocks written
    6. flush() ends with fdatasync

A refcount block holding only increments can be written at any time, so evicting a dirty refcount block just
writes it. Decrements are held back until the L2/L1 change that dropped the reference is durable (step 5), so a
released cluster is never reused while the on-disk image still points at it.

Structural changes are written through at once, each behind its own fdatasync. New refcount blocks are placed
at the end of the image, right before the clusters they were made for, counting those clusters and themselves:
they are written and synced before their refcount-table entries are written. A grown refcount table is written
with the new refcount blocks that cover it, synced, then the header is switched to it with one sector-sized
write and synced again before the old table is released. `grow()` moves the L1 table the same way.
A crash at any point therefore leaves the image consistent, at worst with leaked clusters (which
`qemu-img check -r leaks` reclaims), and every write completed before the last successful flush() intact.

The dirty bit is never set (no lazy refcounts). Files are flock'ed (shared for readers, exclusive for a writer) and
locked the way QEMU locks images (storage/locks.py).
"""
from __future__ import annotations

import os
import stat
import struct
import sys
import threading
import zlib
from array import array
from collections import OrderedDict

from ..errors import CloudkvmError
from . import qcow2_header as hdr
from . import vectored
from ._refblock import new_block
from .backing import BackingPolicy, open_image
from ._util import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, check_range, fallocate, lock_image, pread_full,
                    pwrite_full)
from .errors import CorruptImage, DiskError, ReadOnlyDisk
from .placement import ZEROS, Deflated, Place

__all__ = ["Qcow2Disk", "create", "grow"]

# spec: "Cluster mapping" and "Host cluster management"
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00   # L1 entry bits 9-55: L2 table offset
L1E_RESERVED = 0x7F000000000001FF      # L1 entry bits 0-8 and 56-62
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00   # standard cluster descriptor bits 9-55: host cluster offset
L2E_STD_RESERVED = 0x3F000000000001FE  # standard cluster descriptor bits 1-8 and 56-61
RT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00    # refcount table entry bits 9-63
RT_RESERVED = 0x1FF                    # refcount table entry bits 0-8
OFLAG_COPIED = 1 << 63                 # L1/L2 entry bit 63: refcount is exactly one
OFLAG_COMPRESSED = 1 << 62             # L2 entry bit 62
OFLAG_ZERO = 1                         # standard cluster descriptor bit 0: reads as zeros
# what `_extents` yields: where a piece of a read comes from
_HOST, _ZERO, _DATA, _BACKING = "host", "zero", "data", "backing"
SUBCLUSTERS = 32                       # spec: extended L2 entries divide a cluster into 32 subclusters
SECTOR = 512                           # spec: compressed sizes count 512-byte sectors

_LITTLE = sys.byteorder == "little"
_HEADER_SIZE_FIELDS = struct.Struct(">QII")       # size, crypt_method, l1_size (header bytes 24-39)
_HEADER_L1_FIELDS = struct.Struct(">QIIQ")        # size, crypt_method, l1_size, l1_table_offset (24-47)
_HEADER_RT_FIELDS = struct.Struct(">QI")          # refcount_table_offset, refcount_table_clusters (48-59)


def _be_array(raw: bytes) -> array:
    a = array("Q")
    a.frombytes(raw)
    if _LITTLE:
        a.byteswap()
    return a


def _to_be(a: array) -> bytes:
    if _LITTLE:
        a = array("Q", a)
        a.byteswap()
    return a.tobytes()


def _compressed(disk: "Qcow2Disk", e: int, off: int, n: int, decompress: bool) -> tuple:
    """`_extents`' answer for guest bytes [off, off+n) in the compressed cluster of L2 entry `e` (without
    `decompress`: the entry instead of the bytes)."""
    return (_DATA, disk._read_compressed(e, off, n), None) if decompress else (_DATA, e, n)


def _repeat_pattern(mask: int, n: int) -> int:
    return int.from_bytes(mask.to_bytes(8, "big") * n, "big")


class Qcow2Disk:
    """A qcow2 image as a `Disk`. Use `cloudkvm.storage.open_disk` (or this class directly)."""

    format = "qcow2"
    L2_CACHE_TABLES = 32
    REFBLOCK_CACHE = 32

    def __init__(self, path, read_only: bool = False, *, devices: bool = True, policy: BackingPolicy = BackingPolicy(),
                 _chain: tuple = ()):
        """`devices`: a block device is acceptable as this image; `policy`: what its backing chain may name."""
        self.path = os.fspath(path)
        self.read_only = read_only
        self.backing = None
        self.policy = policy
        self._fd = -1
        self._fd, _ = open_image(self.path, read_only, devices)
        try:
            self._setup(_chain)
        except BaseException:
            self._release_fds()
            raise

    # ---------------------------------------------------------------------------------------------- opening
    def _setup(self, chain: tuple) -> None:
        fd, path = self._fd, self.path
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino)
        if ident in chain:
            raise CloudkvmError(f"{path}: backing file loop: this image is already in the backing chain above it "
                                f"(an image cannot be its own backing file)",
                                "point the backing file at a different image (`qemu-img rebase -u -b BASE IMAGE`)")
        lock_image(fd, path, self.read_only)
        self._file_size = os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size
        h = self.header = hdr.parse(path, fd, self._file_size)
        if not self.read_only:
            self._check_writable(h)
        self.version = h.version
        self.size = h.size
        cb = self._cb = h.cluster_bits
        cs = self.cluster_size = self._cs = 1 << cb
        self._cmask = cs - 1
        self._ext = h.extended_l2
        l2e = hdr.l2_entries(cb, self._ext)
        self._l2_bits = l2e.bit_length() - 1
        self._l2_mask = l2e - 1
        self._l1_shift = cb + self._l2_bits
        self._sc_bits = cb - 5  # subcluster size = cluster size / 32
        self._rb_order = h.refcount_order
        self._rb_bits = cb + 3 - h.refcount_order  # log2(refcount entries per block)
        self._rb_mask = (1 << self._rb_bits) - 1
        self._csize_shift = 62 - (cb - 8)          # spec: compressed cluster descriptor, x = 62 - (cluster_bits - 8)
        self._coff_mask = (1 << self._csize_shift) - 1
        self._csize_mask = (1 << (cb - 8)) - 1
        self._zstd = None
        if h.compression_type == hdr.COMPRESSION_ZSTD:
            try:
                import zstandard
            except ImportError:
                raise CloudkvmError(f"{path}: zstd-compressed qcow2 needs the 'zstandard' package",
                                    "pip install zstandard") from None
            self._zstd = zstandard.ZstdDecompressor()
        self._lock = threading.Lock()
        self._l2_cache: OrderedDict[int, array] = OrderedDict()
        self._l2_dirty: set[int] = set()
        self._l2_new: set[int] = set()
        self._rb_cache: OrderedDict[int, object] = OrderedDict()
        self._rb_dirty: set[int] = set()
        self._l1_dirty: set[int] = set()
        self._pending_free: list[tuple[int, bool]] = []
        self._free_hint = 0
        self._alloc_end = (self._file_size + cs - 1) & ~self._cmask
        self._last_compressed = (-1, b"")
        # the metadata map: byte offsets of every metadata cluster (header, L1, refcount table, L2 tables,
        # refcount blocks), so that data entries pointing into metadata are refused
        self._meta: set[int] = {0}
        self._l1_offset = h.l1_table_offset
        self._l1_size = h.l1_size
        self._rt_offset = h.refcount_table_offset
        self._rt_clusters = h.refcount_table_clusters
        self._meta.update(self._cluster_offsets(self._rt_offset, self._rt_clusters * cs))
        if self._l1_size:
            self._meta.update(self._cluster_offsets(self._l1_offset, self._l1_size * 8))
        self._l1 = _be_array(pread_full(fd, h.l1_size * 8, h.l1_table_offset)) if h.l1_size else array("Q")
        self._rt = _be_array(pread_full(fd, self._rt_clusters * cs, self._rt_offset))
        self._check_l1_and_reftable()
        n = l2e * (2 if self._ext else 1)
        self._l2_low_pattern = _repeat_pattern((1 << cb) - 2, n)   # bits 1..cb-1: reserved or misaligned
        self._l2_off_pattern = _repeat_pattern(L2E_OFFSET_MASK, n)
        self._backing_size = 0
        if h.backing_file:
            self._open_backing(h, chain + (ident,))
        if not self.read_only and h.version >= 3 and h.autoclear:
            # spec: a writer must clear auto-clear bits it does not maintain (bitmaps become inconsistent)
            pwrite_full(fd, struct.pack(">Q", 0), 88)
            os.fdatasync(fd)
            h.autoclear = 0

    def _check_writable(self, h: hdr.Header) -> None:
        path = self.path
        if h.incompatible & hdr.INCOMPAT_CORRUPT:
            raise CloudkvmError(f"{path}: the image is marked corrupt; refusing to open it for writing",
                                "open it read-only to rescue data, or repair a copy with `qemu-img check -r all`")
        if h.incompatible & hdr.INCOMPAT_DIRTY:
            raise CloudkvmError(f"{path}: the image is marked dirty (lazy refcounts were not written back); "
                                "refusing to open it for writing",
                                "repair it first with `qemu-img check -r all`, or open it read-only")
        if h.incompatible & hdr.INCOMPAT_EXTENDED_L2:
            raise hdr.unsupported(path, "writing qcow2 images with extended L2 entries is not supported",
                                  "open it read-only, or convert it: `qemu-img convert -O qcow2 -o extended_l2=off "
                                  "IMAGE NEW.qcow2`")
        if h.nb_snapshots:
            raise hdr.unsupported(path, f"writing qcow2 images with internal snapshots ({h.nb_snapshots}) is not "
                                        "supported", "open it read-only, or drop the snapshots (`qemu-img snapshot "
                                                     "-d NAME IMAGE`) or convert the image")

    def _cluster_offsets(self, offset: int, length: int) -> range:
        return range(offset & ~self._cmask, offset + length, self._cs)

    def _check_l1_and_reftable(self) -> None:
        meta = self._meta
        fixed = set(meta)
        l2_tables = self._checked_pointers(self._l1, "L1", L1E_OFFSET_MASK, L1E_RESERVED, "L2 table", fixed,
                                           "the header, L1 or refcount table")
        blocks = self._checked_pointers(self._rt, "refcount table", RT_OFFSET_MASK, RT_RESERVED, "refcount block",
                                        fixed | l2_tables, "other metadata")
        meta.update(l2_tables)
        meta.update(blocks)

    def _checked_pointers(self, table, name: str, offset_mask: int, reserved: int, target: str, taken: set[int],
                          taken_name: str) -> set[int]:
        """The cluster offsets a metadata table points at, each checked (reserved bits, alignment, inside the
        file, no overlap with `taken`); the first bad entry is refused with a message naming it."""
        path, cs, fs = self.path, self._cs, self._file_size
        found: set[int] = set()
        for i, e in enumerate(table):
            if not e:
                continue
            off = e & offset_mask
            where = f"{name} entry {i} ({e:#018x})"
            if e & reserved:
                raise hdr.corrupt(path, f"{where} has reserved bits set")
            if off == 0:
                raise hdr.corrupt(path, f"{where} has flags but no {target} offset")
            if off % cs:
                raise hdr.corrupt(path, f"{where}: {target} offset {off:#x} is not cluster aligned")
            if off + cs > fs:
                raise hdr.corrupt(path, f"{where}: {target} at {off:#x} is past the end of the file ({fs:#x})")
            if off in taken:
                raise hdr.corrupt(path, f"{where}: {target} at {off:#x} overlaps {taken_name}")
            found.add(off)
        return found

    def _open_backing(self, h: hdr.Header, chain: tuple) -> None:
        from . import FORMATS, _open
        name = h.backing_file
        fmt = h.backing_format
        if fmt is not None and fmt not in FORMATS:
            raise hdr.unsupported(self.path, f"backing file {name!r} has format {fmt!r} (only raw and qcow2)",
                                  "convert the backing file to qcow2 and rebase onto it")
        bpath = self.policy.resolve(self.path, name)
        try:
            self.backing = _open(bpath, True, fmt, fmt is None, self.policy, chain)
        except CloudkvmError as err:
            raise CloudkvmError(f"{self.path}: backing file {name!r}: {err.message}", err.hint) from None
        self._backing_size = self.backing.size

    # ---------------------------------------------------------------------------------------------- public API
    def pread(self, length: int, offset: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            check_range(self, length, offset)
        with self._lock:
            return bytes(self._read(offset, length))

    def preadv(self, buffers: list, offset: int) -> None:
        """`pread` into `buffers` (storage/vectored.py): allocated runs by preadv, straight into them."""
        cursor = vectored.Cursor(buffers)
        length = cursor.remaining
        if offset < 0 or offset + length > self.size:
            check_range(self, length, offset)
        with self._lock:
            self._read_into(offset, cursor)

    def pwritev(self, buffers: list, offset: int) -> None:
        """`pwrite` of the buffers' bytes in order (joined first: allocation and copy-on-write see one range)."""
        self.pwrite(buffers[0] if len(buffers) == 1 else b"".join(buffers), offset)

    def pwrite(self, data, offset: int) -> None:
        if self.read_only:
            raise ReadOnlyDisk(f"{self.path}: disk opened read-only")
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        n = len(view)
        if offset < 0 or offset + n > self.size:
            check_range(self, n, offset)
        if n:
            with self._lock:
                self._write(offset, view)

    def runs(self, offset: int, length: int) -> list:
        """storage/placement.py: [offset, offset+length) as consecutive (start, length, answer) pieces, from one walk
        of the cluster mapping (compressed clusters are not read) and, for what falls through, of the backing
        chain's: runs of host clusters (writable when this image owns them: COPIED, neither zero nor compressed),
        zeros, or places in the backing chain (never writable: a write copies them up)."""
        end = offset + length
        if length <= 0:
            return []
        if offset < 0 or end > self.size or self._fd < 0:
            return [(offset, length, None)]
        pieces = []
        with self._lock:
            pos = offset
            for kind, a, b in self._extents(offset, length, decompress=False):
                n = a if kind is _ZERO else b
                if kind is _HOST:   # (read-only, a base: nothing is written in place, no ownership to read)
                    for start, size, owned in [(pos, n, False)] if self.read_only else self._ownership(pos, n):
                        writable = owned and not self.read_only
                        pieces.append((start, size, Place(self._fd, a + start - pos, writable)))
                        if writable:   # written around _pwrite from now on: what `_write_piece` takes for past the
                            self._file_size = max(self._file_size, a + start - pos + size)  # end may now hold data
                elif kind is _DATA:
                    pieces.append((pos, n, self._deflated(a) if n == self._cs and not pos & self._cmask else None))
                else:
                    pieces.append((pos, n, ZEROS if kind is _ZERO else _BACKING))
                pos += n
        out = []
        for start, size, answer in pieces:
            out += self._backing_runs(start, size) if answer is _BACKING else [(start, size, answer)]
        return out

    def _deflated(self, e: int) -> Deflated | None:
        """The placement of the whole compressed cluster of L2 entry `e`: a Deflated answer, or None for zstd."""
        if self._zstd is not None:
            return None
        coff, csize = self._compressed_extent(e)
        return Deflated(self._fd, coff, csize)

    def _backing_runs(self, start: int, size: int) -> list:
        """`runs` of guest bytes this image leaves to its backing chain: the backing file's own (never writable
        here) below its end, zeros past it (or without one)."""
        limit = self._backing_size if self.backing is not None else 0
        below = max(0, min(start + size, limit) - start)
        out = [(s, n, p._replace(writable=False) if isinstance(p, Place) else p)
               for s, n, p in (self.backing.runs(start, below) if below else [])]
        if below < size:
            out.append((start + below, size - below, ZEROS))
        return out

    def _ownership(self, off: int, n: int) -> list:
        """[off, off+n) (allocated host clusters) as (start, length, owned) pieces: owned where the L2 entry has
        COPIED (refcount one), so a write may go there in place."""
        cb, out = self._cb, []
        end = off + n
        c = off >> cb
        while off < end:
            tbl = None if self._ext else self._l2(c >> self._l2_bits)
            owned = tbl is not None and bool(tbl[c & self._l2_mask] & OFLAG_COPIED)
            stop = min(end, (c + 1) << cb)
            if out and out[-1][2] == owned:
                out[-1] = (out[-1][0], stop - out[-1][0], owned)
            else:
                out.append((off, stop - off, owned))
            off, c = stop, c + 1
        return out

    def flush(self) -> None:
        if self.read_only:
            return
        with self._lock:
            self._flush_metadata()
            os.fdatasync(self._fd)

    write_zeroes_may_unmap = True  # write_zeroes(..., unmap=True) releases clusters

    def discard(self, length: int, offset: int) -> None:
        """Drop whole clusters in the range (they read as zeros afterwards); partial clusters are left alone."""
        if self.read_only:
            raise ReadOnlyDisk(f"{self.path}: disk opened read-only")
        check_range(self, length, offset)
        if length:
            with self._lock:
                self._zero_or_discard(offset, length, zero=False, unmap=True)

    def write_zeroes(self, length: int, offset: int, unmap: bool = False) -> None:
        """Make the range read as zeros. Whole clusters become zero clusters without data writes: with `unmap`
        their host clusters are released, without it clusters this image owns stay allocated (v3 "zero, allocated"
        entries). Partial clusters (and v2 images, which have no zero flag, unless unmapping is allowed and no
        backing file shows through) get zero bytes written."""
        if self.read_only:
            raise ReadOnlyDisk(f"{self.path}: disk opened read-only")
        check_range(self, length, offset)
        if length:
            with self._lock:
                self._zero_or_discard(offset, length, zero=True, unmap=unmap)

    def grow(self, new_size: int) -> None:
        """Grow the virtual disk to `new_size` bytes (rounded up to 512); the new space reads as zeros (or from a
        larger backing file). Moves the L1 table when it must grow past its clusters."""
        if self.read_only:
            raise ReadOnlyDisk(f"{self.path}: disk opened read-only")
        new_size = (new_size + SECTOR - 1) & ~(SECTOR - 1)
        if new_size < self.size:
            raise CloudkvmError(f"{self.path}: cannot shrink the disk from {self.size} to {new_size} bytes",
                                "only growing is supported")
        with self._lock:
            self._grow(new_size)

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            if not self.read_only:
                with self._lock:
                    self._flush_metadata()
                    os.fdatasync(self._fd)
        finally:
            self._release_fds()

    def _release_fds(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        backing, self.backing = self.backing, None
        if backing is not None:
            backing.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Qcow2Disk({self.path!r}, size={self.size}, v{self.version}, cluster={self._cs}, "
                f"read_only={self.read_only}, backing={self.backing!r})")

    # ---------------------------------------------------------------------------------------------- L2 tables
    def _l2(self, l1i: int):
        """The L2 table for L1 index `l1i` (an array of entries, native byte order), or None if unallocated."""
        tbl = self._l2_cache.get(l1i)
        if tbl is not None:
            self._l2_cache.move_to_end(l1i)
            return tbl
        off = self._l1[l1i] & L1E_OFFSET_MASK
        if not off:
            return None
        raw = pread_full(self._fd, self._cs, off)
        tbl = _be_array(raw)
        self._check_l2(raw, tbl, off)
        self._cache_l2(l1i, tbl)
        return tbl

    def _cache_l2(self, l1i: int, tbl: array) -> None:
        cache = self._l2_cache
        cache[l1i] = tbl
        while len(cache) > self.L2_CACHE_TABLES:
            victim = next(iter(cache))
            if victim in self._l2_dirty:
                self._flush_metadata()  # writes every dirty table in the right order
            del cache[victim]

    def _mark_l2_dirty(self, l1i: int, tbl: array) -> None:
        self._l2_dirty.add(l1i)
        if self._l2_cache.get(l1i) is not tbl:  # evicted while we worked on it: put it back
            self._l2_cache[l1i] = tbl

    def _check_l2(self, raw: bytes, tbl: array, toff: int) -> None:
        """Refuse an L2 table with entries past EOF, into metadata, misaligned or with reserved bits. The common
        case (standard entries only) is checked with C-speed bulk operations; anything else entry by entry."""
        if not self._ext and not raw[0::8].translate(None, b"\x00\x80"):
            whole = int.from_bytes(raw, "big")
            if not whole & self._l2_low_pattern:
                offs = _be_array((whole & self._l2_off_pattern).to_bytes(len(raw), "big"))
                if max(offs) < self._file_size:
                    hosts = set(offs)
                    hosts.discard(0)
                    if hosts.isdisjoint(self._meta):
                        return
        self._check_l2_slow(tbl, toff)

    def _check_l2_slow(self, tbl: array, toff: int) -> None:
        fs, meta, cmask = self._file_size, self._meta, self._cmask
        step = 2 if self._ext else 1
        for k in range(0, len(tbl), step):
            e = tbl[k]
            bm = tbl[k + 1] if self._ext else 0
            if not e and not bm:
                continue
            where = f"L2 table at {toff:#x}, entry {k // step} ({e:#018x})"
            if e & OFLAG_COMPRESSED:
                coff = e & self._coff_mask
                if coff >= fs:
                    raise CorruptImage(f"{self.path}: {where}: compressed data at {coff:#x} is past the end of the "
                                       f"file ({fs:#x})")
                if (coff & ~cmask) in meta:
                    raise CorruptImage(f"{self.path}: {where}: compressed data at {coff:#x} is inside metadata")
                if bm:
                    raise CorruptImage(f"{self.path}: {where}: compressed cluster with a subcluster bitmap")
                continue
            reserved = L2E_STD_RESERVED | (OFLAG_ZERO if self._ext else 0)
            if e & reserved:
                raise CorruptImage(f"{self.path}: {where} has reserved bits set")
            host = e & L2E_OFFSET_MASK
            if self._ext:
                alloc, zero = bm & 0xFFFFFFFF, bm >> 32
                if alloc & zero:
                    raise CorruptImage(f"{self.path}: {where}: subclusters both allocated and zero "
                                       f"(bitmap {bm:#018x})")
                if alloc and not host:
                    raise CorruptImage(f"{self.path}: {where}: allocated subclusters without a host cluster")
            if host:
                if host & cmask:
                    raise CorruptImage(f"{self.path}: {where}: host offset {host:#x} is not cluster aligned")
                if host >= fs:
                    raise CorruptImage(f"{self.path}: {where}: host offset {host:#x} is past the end of the file "
                                       f"({fs:#x})")
                if host in meta:
                    raise CorruptImage(f"{self.path}: {where}: host offset {host:#x} points into metadata")
            elif e & OFLAG_COPIED and not e & OFLAG_ZERO:
                raise CorruptImage(f"{self.path}: {where}: marked in use but has no host offset")

    # ---------------------------------------------------------------------------------------------- reading
    def _read(self, off: int, n: int) -> bytearray:
        buf = bytearray(n)
        self._read_into(off, vectored.Cursor([memoryview(buf)]))
        return buf

    def _read_into(self, off: int, cursor: vectored.Cursor) -> None:
        """Guest bytes [off, off + cursor.remaining) into the cursor's buffers: preadv for allocated runs."""
        n = cursor.remaining
        for kind, a, b in self._extents(off, n):
            if kind is _HOST:
                vectored.preadv_full(self._fd, cursor.take(b), a)
            elif kind is _ZERO:
                vectored.zero_fill(cursor.take(a))
            elif kind is _DATA:
                vectored.scatter(a, cursor.take(len(a)))
            else:
                self._read_unallocated_into(a, cursor.take(b))

    def _extents(self, off: int, n: int, decompress: bool = True):
        """Where the guest bytes [off, off+n) are, in order: (_HOST, host offset, length) in this file, (_ZERO,
        length, None), (_DATA, bytes, None) for decompressed data (without `decompress`: (_DATA, L2 entry, length)),
        (_BACKING, offset, length) for the backing chain (or zeros past it)."""
        end = off + n
        cb, cs, cmask, l1_shift, l2_mask = self._cb, self._cs, self._cmask, self._l1_shift, self._l2_mask
        while off < end:
            l1i = off >> l1_shift
            tend = min(end, (l1i + 1) << l1_shift)
            tbl = self._l2(l1i)
            if tbl is None:
                yield _BACKING, off, tend - off
                off = tend
                continue
            if self._ext:
                yield from self._extents_extended(tbl, off, tend, decompress)
                off = tend
                continue
            i = (off >> cb) & l2_mask
            while off < tend:
                e = tbl[i]
                cend = ((off >> cb) + 1) << cb
                if cend > tend:
                    cend = tend
                if e & OFLAG_COMPRESSED:
                    yield _compressed(self, e, off, cend - off, decompress)
                    off = cend
                    i += 1
                    continue
                host = e & L2E_OFFSET_MASK
                run_end = cend
                i += 1
                if e & OFLAG_ZERO:
                    while run_end < tend and (tbl[i] & (OFLAG_ZERO | OFLAG_COMPRESSED)) == OFLAG_ZERO:
                        run_end = min(tend, run_end + cs)
                        i += 1
                    yield _ZERO, run_end - off, None
                elif host:
                    nxt = host + cs
                    while run_end < tend and (tbl[i] & (L2E_OFFSET_MASK | OFLAG_COMPRESSED | OFLAG_ZERO)) == nxt:
                        run_end = min(tend, run_end + cs)
                        i += 1
                        nxt += cs
                    yield _HOST, host + (off & cmask), run_end - off
                else:
                    while run_end < tend and not tbl[i] & ~OFLAG_COPIED:
                        run_end = min(tend, run_end + cs)
                        i += 1
                    yield _BACKING, off, run_end - off
                off = run_end

    def _read_unallocated_into(self, off: int, buffers: list) -> None:
        n = vectored.total(buffers)
        if self.backing is None or off >= self._backing_size:
            vectored.zero_fill(buffers)
            return
        k = min(n, self._backing_size - off)
        if k == n:
            vectored.read_into(self.backing, buffers, off)
            return
        cursor = vectored.Cursor(buffers)
        vectored.read_into(self.backing, cursor.take(k), off)
        vectored.zero_fill(cursor.take(n - k))

    def _read_compressed(self, e: int, off: int, n: int) -> bytes:
        coff, csize = self._compressed_extent(e)
        cached_off, data = self._last_compressed
        if cached_off != coff:
            raw = os.pread(self._fd, csize, coff)
            data = self._decompress(raw, coff)
            self._last_compressed = (coff, data)
        start = off & self._cmask
        return data[start:start + n]

    def _compressed_extent(self, e: int) -> tuple[int, int]:
        """(host offset, byte length) of the compressed data of L2 entry `e`: from the offset to the end of its
        last 512-byte sector (spec: Compressed Clusters Descriptor)."""
        coff = e & self._coff_mask
        nsectors = ((e >> self._csize_shift) & self._csize_mask) + 1
        return coff, nsectors * SECTOR - (coff & (SECTOR - 1))

    def _decompress(self, raw: bytes, coff: int) -> bytes:
        cs = self._cs
        try:
            if self._zstd is None:
                out = zlib.decompressobj(-15).decompress(raw, cs)  # spec/QEMU: raw deflate, no zlib header
            else:
                out = b""
                rest = raw
                while len(out) < cs and rest:  # one or more zstd frames, then unused tail bytes
                    d = self._zstd.decompressobj()
                    got = d.decompress(rest)
                    if not got and not d.eof:
                        break
                    out += got
                    rest = d.unused_data
                out = out[:cs]
        except Exception as err:  # zlib.error, zstandard.ZstdError
            raise CorruptImage(f"{self.path}: compressed cluster at {coff:#x} does not decompress: {err}") from None
        if len(out) != cs:
            raise CorruptImage(f"{self.path}: compressed cluster at {coff:#x} decompresses to {len(out)} bytes, "
                               f"not a cluster ({cs})")
        return out

    def _extents_extended(self, tbl: array, off: int, tend: int, decompress: bool = True):
        """`_extents` within one L2 table of an image with extended L2 entries (subclusters)."""
        cb, cmask, sc_bits = self._cb, self._cmask, self._sc_bits
        while off < tend:
            k = ((off >> cb) & self._l2_mask) * 2
            e, bm = tbl[k], tbl[k + 1]
            base = off & ~cmask
            cend = min(tend, base + self._cs)
            if e & OFLAG_COMPRESSED:
                yield _compressed(self, e, off, cend - off, decompress)
                off = cend
                continue
            host = e & L2E_OFFSET_MASK
            alloc, zero = bm & 0xFFFFFFFF, bm >> 32
            while off < cend:
                sc = (off & cmask) >> sc_bits
                state = (alloc >> sc) & 1 | ((zero >> sc) & 1) << 1
                sc2 = sc + 1
                while sc2 < SUBCLUSTERS and base + (sc2 << sc_bits) < cend and \
                        ((alloc >> sc2) & 1 | ((zero >> sc2) & 1) << 1) == state:
                    sc2 += 1
                seg_end = min(cend, base + (sc2 << sc_bits))
                if state == 1:
                    yield _HOST, host + (off & cmask), seg_end - off
                elif state == 2:
                    yield _ZERO, seg_end - off, None
                else:
                    yield _BACKING, off, seg_end - off
                off = seg_end

    # ---------------------------------------------------------------------------------------------- writing
    def _pwrite(self, data, off: int) -> None:
        pwrite_full(self._fd, data, off)
        end = off + len(data)
        if end > self._file_size:
            self._file_size = end

    def _write(self, off: int, view: memoryview) -> None:
        start = off
        end = off + len(view)
        cb, cs, cmask, l1_shift, l2_mask = self._cb, self._cs, self._cmask, self._l1_shift, self._l2_mask
        owned_mask = L2E_OFFSET_MASK | OFLAG_COMPRESSED | OFLAG_ZERO | OFLAG_COPIED
        while off < end:
            l1i = off >> l1_shift
            tend = min(end, (l1i + 1) << l1_shift)
            tbl = self._l2_for_write(l1i)
            i = (off >> cb) & l2_mask
            while off < tend:
                e = tbl[i]
                cend = min(tend, ((off >> cb) + 1) << cb)
                if e & (OFLAG_COPIED | OFLAG_COMPRESSED | OFLAG_ZERO) == OFLAG_COPIED and e & L2E_OFFSET_MASK:
                    # clusters we own: write in place, one pwrite for the contiguous run
                    host = e & L2E_OFFSET_MASK
                    run_end = cend
                    i += 1
                    nxt = host + cs | OFLAG_COPIED
                    while run_end < tend and tbl[i] & owned_mask == nxt:
                        run_end = min(tend, run_end + cs)
                        i += 1
                        nxt += cs
                    self._pwrite(view[off - start:run_end - start], host + (off & cmask))
                    off = run_end
                    continue
                if e & (OFLAG_COPIED | OFLAG_COMPRESSED | OFLAG_ZERO) == OFLAG_COPIED | OFLAG_ZERO and \
                        e & L2E_OFFSET_MASK:
                    # a preallocated zero cluster we own: fill it in place, then drop the zero flag
                    host = e & L2E_OFFSET_MASK
                    c0 = off & ~cmask
                    self._pwrite(b"".join((bytes(off - c0), view[off - start:cend - start],
                                           bytes(c0 + cs - cend))), host)
                    tbl[i] = host | OFLAG_COPIED
                    self._mark_l2_dirty(l1i, tbl)
                    i += 1
                    off = cend
                    continue
                # clusters that need a new host cluster (unallocated, zero, compressed or shared)
                j = i + 1
                run_end = cend
                while run_end < tend:
                    e2 = tbl[j]
                    if e2 & (OFLAG_COPIED | OFLAG_COMPRESSED) == OFLAG_COPIED and e2 & L2E_OFFSET_MASK:
                        break  # owned (possibly preallocated zero) clusters are written in place
                    run_end = min(tend, run_end + cs)
                    j += 1
                self._write_new_clusters(tbl, i, j, off, run_end, view[off - start:run_end - start])
                self._mark_l2_dirty(l1i, tbl)
                i = j
                off = run_end

    def _write_new_clusters(self, tbl: array, i: int, j: int, off: int, run_end: int, payload) -> None:
        """Guest clusters i..j-1 of `tbl` get fresh host clusters holding `payload` at [off, run_end) plus the old
        contents around it (copy-on-write from compressed data, the backing chain or zeros); one pwrite per
        contiguous piece of host clusters."""
        cmask = self._cmask
        pos = 0
        while i < j:
            base, k = self._alloc(j - i)
            piece_end = min(run_end, ((off | cmask) + 1) + (k - 1) * self._cs)
            self._write_piece(tbl, i, k, base, off, piece_end, payload[pos:pos + piece_end - off])
            pos += piece_end - off
            off = piece_end
            i += k

    def _write_piece(self, tbl: array, i: int, m: int, base: int, off: int, run_end: int, payload) -> None:
        cs, cmask = self._cs, self._cmask
        fs = self._file_size
        c0 = off & ~cmask
        head = off - c0
        tail = (((run_end - 1) | cmask) + 1) - run_end
        parts = []
        wstart = base
        if head:
            fill = self._old_contents(c0, head, tbl[i])
            if fill is None and base >= fs:
                wstart = base + head  # a hole past the end of the file reads as zeros
            else:
                parts.append(fill if fill is not None else bytes(head))
        parts.append(payload)
        if tail:
            fill = self._old_contents(run_end, tail, tbl[i + m - 1])
            if fill is not None or base + (run_end - c0) < fs:
                parts.append(fill if fill is not None else bytes(tail))
        self._pwrite(parts[0] if len(parts) == 1 else b"".join(parts), wstart)
        for k in range(m):
            old = tbl[i + k]
            tbl[i + k] = (base + k * cs) | OFLAG_COPIED
            if old:
                self._release(old, False)

    def _old_contents(self, goff: int, n: int, e: int):
        """What guest bytes [goff, goff+n) (inside one cluster with L2 entry e) read as now; None = zeros."""
        avail = min(n, self.size - goff)
        if avail <= 0:
            return None
        if not e & OFLAG_COMPRESSED and (e & OFLAG_ZERO or not e & L2E_OFFSET_MASK and (
                self.backing is None or goff >= self._backing_size)):
            return None
        data = self._read(goff, avail)
        return data if avail == n else data + bytes(n - avail)

    def _l2_for_write(self, l1i: int) -> array:
        e = self._l1[l1i]
        off = e & L1E_OFFSET_MASK
        if off:
            if not e & OFLAG_COPIED:
                if self._refcount(off >> self._cb) != 1:
                    raise CorruptImage(f"{self.path}: L1 entry {l1i}: L2 table at {off:#x} is shared "
                                       f"(refcount {self._refcount(off >> self._cb)}) but the image has no snapshots")
                self._l1[l1i] = e | OFLAG_COPIED
                self._l1_dirty.add(l1i)
            return self._l2(l1i)
        off, _ = self._alloc(1)
        tbl = array("Q", [0]) * (self._cs // 8)
        self._meta.add(off)
        self._l1[l1i] = off | OFLAG_COPIED
        self._l1_dirty.add(l1i)
        self._l2_new.add(l1i)
        self._l2_dirty.add(l1i)
        self._cache_l2(l1i, tbl)
        return tbl

    def _release(self, e: int, punch: bool) -> None:
        """Queue the host clusters an old L2 entry referenced for a refcount decrement (applied after the L2
        change is durable)."""
        if e & OFLAG_COMPRESSED:
            coff = e & self._coff_mask
            nsectors = ((e >> self._csize_shift) & self._csize_mask) + 1
            first = coff & ~(SECTOR - 1)
            last = first + nsectors * SECTOR - 1
            for c in range(first >> self._cb, (last >> self._cb) + 1):
                self._pending_free.append((c, False))
            return
        host = e & L2E_OFFSET_MASK
        if host:
            self._pending_free.append((host >> self._cb, punch))

    def _zero_or_discard(self, off: int, n: int, zero: bool, unmap: bool) -> None:
        cmask, cb = self._cmask, self._cb
        end = off + n
        fa = (off + cmask) & ~cmask
        fb = end & ~cmask if end < self.size else (end + cmask) & ~cmask  # the disk's last partial cluster counts
        if fa >= fb:
            if zero:
                self._write_zero_bytes(off, n)
            return
        if zero and off < fa:
            self._write_zero_bytes(off, fa - off)
        if zero and fb < end:
            self._write_zero_bytes(fb, end - fb)
        if self.version < 3 and (self.backing is not None or zero and not unmap):
            if zero:  # v2 has no zero flag: unallocating would expose the backing file, or deallocate
                self._write_zero_bytes(fa, min(fb, self.size) - fa)
            return
        plain = OFLAG_ZERO if self.backing is not None else 0
        keep = zero and not unmap
        c = fa
        while c < fb:
            l1i = c >> self._l1_shift
            tend = min(fb, (l1i + 1) << self._l1_shift)
            if not self._l1[l1i] & L1E_OFFSET_MASK and not plain:
                c = tend
                continue
            tbl = self._l2_for_write(l1i)
            changed = False
            for idx in range((c >> cb) & self._l2_mask, (((tend - 1) >> cb) & self._l2_mask) + 1):
                old = tbl[idx]
                new = plain
                if keep and old & (OFLAG_COPIED | OFLAG_COMPRESSED) == OFLAG_COPIED and old & L2E_OFFSET_MASK:
                    new = old | OFLAG_ZERO  # keep our own host cluster, preallocated
                if old == new:
                    continue
                tbl[idx] = new
                changed = True
                if old and new == plain:
                    self._release(old, True)
            if changed:
                self._mark_l2_dirty(l1i, tbl)
            c = tend

    def _write_zero_bytes(self, off: int, n: int) -> None:
        chunk = 1 << 20
        zeros = memoryview(bytes(min(n, chunk)))
        while n > 0:
            k = min(n, chunk)
            self._write(off, zeros[:k])
            off += k
            n -= k

    # ---------------------------------------------------------------------------------------------- refcounts
    def _rt_entry(self, ti: int) -> int:
        return self._rt[ti] & RT_OFFSET_MASK if ti < len(self._rt) else 0

    def _refblock(self, ti: int):
        blk = self._rb_cache.get(ti)
        if blk is not None:
            self._rb_cache.move_to_end(ti)
            return blk
        off = self._rt_entry(ti)
        blk = new_block(self._rb_order, pread_full(self._fd, self._cs, off))
        self._rb_cache[ti] = blk
        self._trim_refblock_cache()
        return blk

    def _trim_refblock_cache(self) -> None:
        cache = self._rb_cache
        while len(cache) > self.REFBLOCK_CACHE:
            victim = next(iter(cache))
            if victim in self._rb_dirty:  # increments only: safe to write at any time
                self._write_refblock(victim)
            del cache[victim]

    def _write_refblock(self, ti: int) -> None:
        self._pwrite(self._rb_cache[ti].tobytes(), self._rt_entry(ti))
        self._rb_dirty.discard(ti)

    def _refcount(self, c: int) -> int:
        ti = c >> self._rb_bits
        if not self._rt_entry(ti):
            return 0
        return self._refblock(ti).get(c & self._rb_mask)

    def _alloc(self, m: int) -> tuple[int, int]:
        """Up to m contiguous free host clusters (at least one), the first free ones at or after the free hint:
        (byte offset, count). Their refcounts become 1 in the cache (written before any L2 entry uses them)."""
        cb, rb_bits, rb_mask = self._cb, self._rb_bits, self._rb_mask
        c = self._free_hint
        while True:
            ti = c >> rb_bits
            if not self._rt_entry(ti):  # nothing counted from here on: allocate at the end of the image
                off = self._alloc_at_end(m)
                self._free_hint = (off >> cb) + m
                return off, m
            j = self._refblock(ti).find_zero(c & rb_mask)
            if j <= rb_mask:
                start = (ti << rb_bits) + j
                break
            c = (ti + 1) << rb_bits
        k = 0
        c = start
        while k < m:  # extend the run through the following refcount blocks
            ti = c >> rb_bits
            if not self._rt_entry(ti):
                break
            j = c & rb_mask
            r = self._refblock(ti).zero_run(j, m - k)
            k += r
            c += r
            if j + r <= rb_mask:
                break
        for c in range(start, start + k):
            if (c << cb) in self._meta:
                raise CorruptImage(f"{self.path}: cluster {c << cb:#x} holds metadata but its refcount is 0")
            ti = c >> rb_bits
            self._refblock(ti).set(c & rb_mask, 1)
            self._rb_dirty.add(ti)
        self._free_hint = start + k
        end = (start + k) << cb
        if end > self._alloc_end:
            self._alloc_end = end
        return start << cb, k

    def _alloc_at_end(self, n: int) -> int:
        """n contiguous clusters past everything allocated, preceded by the new refcount blocks that count them
        (and themselves). Existing blocks that count any of them are written, the new blocks written and synced,
        and only then linked into the refcount table. Returns the byte offset of the n clusters."""
        cb, cs, rb_bits, rb_mask = self._cb, self._cs, self._rb_bits, self._rb_mask
        while True:
            first = max(self._alloc_end, (self._file_size + self._cmask) & ~self._cmask) >> cb
            k = 0
            while True:
                end = first + k + n
                missing = [ti for ti in range(first >> rb_bits, ((end - 1) >> rb_bits) + 1) if not self._rt_entry(ti)]
                if len(missing) <= k:
                    break
                k = len(missing)
            if missing and missing[-1] >= len(self._rt):
                self._grow_reftable(missing[-1] + 1)
                continue
            busy = [c for c in range(first, end) if (c >> rb_bits) not in missing and self._refcount(c)]
            if busy:  # counted clusters past the end of the file: skip them
                self._alloc_end = (busy[-1] + 1) << cb
                continue
            break
        blocks = {ti: new_block(self._rb_order, bytes(cs)) for ti in missing}
        where = {ti: (first + b) << cb for b, ti in enumerate(missing)}
        touched = set()
        for c in range(first, end):
            off = c << cb
            if off in self._meta:
                raise CorruptImage(f"{self.path}: cluster {off:#x} holds metadata but its refcount is 0")
            ti = c >> rb_bits
            if ti in blocks:
                blocks[ti].set(c & rb_mask, 1)
            else:
                self._refblock(ti).set(c & rb_mask, 1)
                self._rb_dirty.add(ti)
                touched.add(ti)
        if blocks:
            for ti in sorted(touched):
                self._write_refblock(ti)
            for ti, blk in blocks.items():
                self._pwrite(blk.tobytes(), where[ti])
            os.fdatasync(self._fd)
            for ti, blk in blocks.items():
                self._rt[ti] = where[ti]
                self._pwrite(struct.pack(">Q", where[ti]), self._rt_offset + ti * 8)
                self._meta.add(where[ti])
                self._rb_cache[ti] = blk
            self._trim_refblock_cache()
        self._alloc_end = max(self._alloc_end, end << cb)
        return (first + k) << cb

    def _change_refcount(self, c: int, delta: int) -> int:
        ti = c >> self._rb_bits
        if not self._rt_entry(ti):
            raise CorruptImage(f"{self.path}: cluster {c << self._cb:#x} is in use but has no refcount block")
        blk = self._refblock(ti)
        v = blk.get(c & self._rb_mask) + delta
        if v < 0:
            raise CorruptImage(f"{self.path}: cluster {c << self._cb:#x} is in use but its refcount is 0")
        if v > blk.max:
            raise DiskError(f"{self.path}: refcount of cluster {c << self._cb:#x} would overflow "
                            f"{1 << self._rb_order}-bit refcounts")
        blk.set(c & self._rb_mask, v)
        self._rb_dirty.add(ti)
        return v

    def _grow_reftable(self, min_entries: int) -> None:
        """Move the refcount table to a bigger one at the end of the image, together with the refcount blocks
        that count it (placed first); synced, then the header switches to it, then the old table is freed."""
        cs, cb, rb_bits = self._cs, self._cb, self._rb_bits
        per = cs // 8
        old_n = len(self._rt)
        first = max(self._alloc_end, (self._file_size + self._cmask) & ~self._cmask) >> cb
        first = max(first, old_n << rb_bits)
        first_ti = first >> rb_bits
        k = 1
        while True:
            want = max(min_entries, old_n * 2, first_ti + k)
            new_n = (want + per - 1) // per * per
            tclusters = new_n // per
            end = first + k + tclusters
            need = ((end - 1) >> rb_bits) - first_ti + 1
            if need <= k:
                break
            k = need
        if tclusters * cs > hdr.MAX_REFTABLE_BYTES:
            raise DiskError(f"{self.path}: the refcount table would exceed {hdr.MAX_REFTABLE_BYTES >> 20} MiB")
        new_rt = array("Q", self._rt) + array("Q", [0]) * (new_n - old_n)
        blocks = {}
        for b in range(k):
            ti = first_ti + b
            blk = new_block(self._rb_order, bytes(cs))
            lo, hi = max(first, ti << rb_bits), min(end, (ti + 1) << rb_bits)
            for c in range(lo, hi):
                blk.set(c & self._rb_mask, 1)
            blocks[ti] = blk
            new_rt[ti] = (first + b) << cb
            self._pwrite(blk.tobytes(), (first + b) << cb)
        new_off = (first + k) << cb
        self._pwrite(_to_be(new_rt), new_off)
        os.fdatasync(self._fd)
        self._pwrite(_HEADER_RT_FIELDS.pack(new_off, tclusters), 48)
        os.fdatasync(self._fd)
        old_off, old_clusters = self._rt_offset, self._rt_clusters
        self._rt, self._rt_offset, self._rt_clusters = new_rt, new_off, tclusters
        for ti, blk in blocks.items():
            self._rb_cache[ti] = blk
            self._meta.add(new_rt[ti])
        self._meta.update(range(new_off, new_off + tclusters * cs, cs))
        self._alloc_end = max(self._alloc_end, end << cb)
        for c in range(old_off >> cb, (old_off >> cb) + old_clusters):  # header no longer points there
            self._meta.discard(c << cb)
            self._change_refcount(c, -1)
            self._free_hint = min(self._free_hint, c)
        self._trim_refblock_cache()

    # ---------------------------------------------------------------------------------------------- flushing
    def _flush_metadata(self) -> None:
        """Write dirty metadata in crash-safe order (see the module docstring); ends without a final sync."""
        if not (self._rb_dirty or self._l2_dirty or self._l1_dirty or self._pending_free):
            return
        fd = self._fd
        for ti in sorted(self._rb_dirty):
            self._write_refblock(ti)
        for l1i in sorted(self._l2_new & self._l2_dirty):
            self._write_l2(l1i)
        os.fdatasync(fd)
        for l1i in sorted(self._l2_dirty):
            self._write_l2(l1i)
        self._l2_new.clear()
        self._write_l1_entries()
        if self._pending_free:
            os.fdatasync(fd)
            self._apply_frees()

    def _write_l2(self, l1i: int) -> None:
        self._pwrite(_to_be(self._l2_cache[l1i]), self._l1[l1i] & L1E_OFFSET_MASK)
        self._l2_dirty.discard(l1i)

    def _write_l1_entries(self) -> None:
        if not self._l1_dirty:
            return
        idx = sorted(self._l1_dirty)
        self._l1_dirty.clear()
        runs = []
        a = b = idx[0]
        for i in idx[1:]:
            if i == b + 1:
                b = i
            else:
                runs.append((a, b))
                a = b = i
        runs.append((a, b))
        for a, b in runs:
            self._pwrite(_to_be(self._l1[a:b + 1]), self._l1_offset + a * 8)

    def _apply_frees(self) -> None:
        pending, self._pending_free = self._pending_free, []
        punch = []
        for c, want_punch in pending:
            if self._change_refcount(c, -1) == 0:
                if c < self._free_hint:
                    self._free_hint = c
                if want_punch:
                    punch.append(c)
        for ti in sorted(self._rb_dirty):
            self._write_refblock(ti)
        for c in punch:  # best effort: give the space back to the file system
            try:
                if not fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, c << self._cb, self._cs):
                    break
            except OSError:
                break

    # ---------------------------------------------------------------------------------------------- growing
    def _grow(self, new_size: int) -> None:
        if new_size == self.size:
            return
        cs, cb = self._cs, self._cb
        needed = hdr.l1_entries_needed(new_size, cb, self._ext)
        if needed * 8 > hdr.MAX_L1_BYTES:
            raise CloudkvmError(f"{self.path}: {new_size} bytes needs an L1 table over the "
                                f"{hdr.MAX_L1_BYTES >> 20} MiB limit with {cs}-byte clusters",
                                "convert to a larger cluster size first")
        self._flush_metadata()
        os.fdatasync(self._fd)
        crypt = self.header.crypt_method
        old_n = self._l1_size
        capacity = ((old_n * 8 + cs - 1) // cs) * cs // 8 if old_n else 0
        if needed <= old_n:
            self._pwrite(struct.pack(">Q", new_size), 24)
        elif needed <= capacity:
            self._pwrite(bytes((needed - old_n) * 8), self._l1_offset + old_n * 8)
            os.fdatasync(self._fd)
            self._pwrite(_HEADER_SIZE_FIELDS.pack(new_size, crypt, needed), 24)
        else:
            nclusters = (needed * 8 + cs - 1) // cs
            new_off = self._alloc_at_end(nclusters)
            self._meta.update(range(new_off, new_off + nclusters * cs, cs))
            table = array("Q", self._l1) + array("Q", [0]) * (nclusters * cs // 8 - old_n)
            self._pwrite(_to_be(table), new_off)
            self._flush_metadata()
            os.fdatasync(self._fd)
            self._pwrite(_HEADER_L1_FIELDS.pack(new_size, crypt, needed, new_off), 24)
            os.fdatasync(self._fd)
            if old_n:
                for c in self._cluster_offsets(self._l1_offset, old_n * 8):
                    self._meta.discard(c)
                    self._change_refcount(c >> cb, -1)
                    self._free_hint = min(self._free_hint, c >> cb)
            self._l1_offset = new_off
            self._flush_metadata()
        os.fdatasync(self._fd)
        if needed > old_n:
            self._l1.extend(array("Q", [0]) * (needed - old_n))
            self._l1_size = needed
        self.size = self.header.size = new_size


def create(path, size: int | None, backing=None, backing_format: str | None = None,
           cluster_size: int = 65536, policy: BackingPolicy = BackingPolicy()) -> None:
    """Create (or overwrite) a qcow2 v3 image with 16-bit refcounts. `size` may be None with a backing file (the
    backing file's virtual size is used); sizes round up to 512 bytes. A relative `backing` name is stored as
    given and resolved against the new image's folder (as qemu-img does). The caller names `backing` itself;
    `policy` applies to that file's own backing chain."""
    from . import FORMATS, _open
    path = os.fspath(path)
    if cluster_size & (cluster_size - 1) or not 1 << hdr.MIN_CLUSTER_BITS <= cluster_size <= 1 << hdr.MAX_CLUSTER_BITS:
        raise CloudkvmError(f"{path}: cluster size {cluster_size} is not a power of two between 512 and 2 MiB",
                            "use e.g. 65536 (the default)")
    cb = cluster_size.bit_length() - 1
    cs = cluster_size
    bname = None
    if backing is not None:
        bname = os.fspath(backing)
        if not bname or len(bname.encode()) > hdr.MAX_BACKING_NAME:
            raise CloudkvmError(f"{path}: backing file name must be 1..{hdr.MAX_BACKING_NAME} bytes",
                                "use a shorter (relative) path")
        if backing_format is not None and backing_format not in FORMATS:
            raise CloudkvmError(f"{path}: backing format {backing_format!r} is not supported",
                                f"use one of {', '.join(FORMATS)}")
        bpath = bname if os.path.isabs(bname) else os.path.join(os.path.dirname(path), bname)
        bdisk = _open(bpath, True, backing_format, backing_format is None, policy, ())
        try:
            backing_format = bdisk.format
            if size is None:
                size = bdisk.size
        finally:
            bdisk.close()
    if size is None:
        raise CloudkvmError(f"{path}: no size given for the new image", "give a size, or a backing file")
    if size < 0:
        raise CloudkvmError(f"{path}: negative image size {size}", "give a size in bytes")
    size = (size + SECTOR - 1) & ~(SECTOR - 1)
    l1_size = hdr.l1_entries_needed(size, cb)
    if l1_size * 8 > hdr.MAX_L1_BYTES:
        raise CloudkvmError(f"{path}: {size} bytes needs an L1 table over the {hdr.MAX_L1_BYTES >> 20} MiB "
                            f"limit with {cs}-byte clusters", "use a larger cluster size")
    entries = cs * 8 // 16
    l1c = (l1_size * 8 + cs - 1) // cs
    rtc = rbc = 1
    while True:
        total = 1 + rtc + rbc + l1c
        rbc2 = (total + entries - 1) // entries
        rtc2 = (rbc2 * 8 + cs - 1) // cs
        if (rbc2, rtc2) == (rbc, rtc):
            break
        rbc, rtc = rbc2, rtc2
    rt_off = cs
    rb_off = rt_off + rtc * cs
    l1_off = rb_off + rbc * cs if l1_size else 0
    h = hdr.Header(version=3, backing_file_offset=0, backing_file_size=0, cluster_bits=cb, size=size,
                   crypt_method=0, l1_size=l1_size, l1_table_offset=l1_off, refcount_table_offset=rt_off,
                   refcount_table_clusters=rtc, nb_snapshots=0, snapshots_offset=0, refcount_order=4,
                   header_length=hdr.V3_LENGTH)
    exts = b""
    if bname is not None:
        exts += hdr.extension(hdr.EXT_BACKING_FORMAT, backing_format.encode())
    exts += bytes(8)  # end of the header extension area
    name = bname.encode() if bname is not None else b""
    if bname is not None:
        h.backing_file_offset = hdr.V3_LENGTH + len(exts)
        h.backing_file_size = len(name)
    cluster0 = hdr.pack(h) + exts + name
    if len(cluster0) > cs:
        raise CloudkvmError(f"{path}: the backing file name does not fit in a {cs}-byte header cluster",
                            "use a shorter (relative) backing path or a larger cluster size")
    rt = array("Q", [(rb_off + i * cs) for i in range(rbc)]) + array("Q", [0]) * (rtc * cs // 8 - rbc)
    blocks = array("H", [0]) * (rbc * entries)
    for c in range(total):
        blocks[c] = 1
    if _LITTLE:
        blocks.byteswap()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)  # readable: QEMU's locks are read locks
    except OSError as err:
        from . import open_error
        raise open_error(path, err, False) from None
    try:
        lock_image(fd, path, False)  # never overwrite an image a cloudkvm process has open
        os.ftruncate(fd, 0)
        pwrite_full(fd, cluster0.ljust(cs, b"\0"), 0)
        pwrite_full(fd, _to_be(rt), rt_off)
        pwrite_full(fd, blocks.tobytes(), rb_off)
        os.ftruncate(fd, total * cs)
        os.fsync(fd)
    finally:
        os.close(fd)


def grow(path_or_disk, new_size: int) -> None:
    """Grow a qcow2 image (a path, or an open writable `Qcow2Disk`) to `new_size` bytes."""
    if isinstance(path_or_disk, Qcow2Disk):
        path_or_disk.grow(new_size)
        return
    with Qcow2Disk(path_or_disk) as disk:
        disk.grow(new_size)
