"""The qcow2 header: parse and validate (refusing hostile values before anything large is allocated), and pack.

Field layout and constants cite QEMU's docs/interop/qcow2.txt ("the spec" below). This module only reads the
first cluster of the file; the L1 and refcount tables are validated by `qcow2.Qcow2Disk`.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from ..errors import CloudkvmError
from .errors import CHECK_HINT

MAGIC = b"QFI\xfb"                      # spec: header bytes 0-3
V2 = struct.Struct(">4sIQIIQIIQQIIQ")   # spec: bytes 0-71 (version 2 header is exactly 72 bytes)
V3 = struct.Struct(">QQQII")            # spec: bytes 72-103 (version 3 header is at least 104 bytes)
V2_LENGTH = 72
V3_MIN_LENGTH = 104
V3_LENGTH = 112                         # what we write: 104 + compression_type byte + 7 bytes of padding

# spec: incompatible_features bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_EXTERNAL_DATA = 1 << 2
INCOMPAT_COMPRESSION_TYPE = 1 << 3
INCOMPAT_EXTENDED_L2 = 1 << 4
INCOMPAT_KNOWN = 0x1F
INCOMPAT_NAMES = {0: "dirty bit", 1: "corrupt bit", 2: "external data file", 3: "compression type",
                  4: "extended L2 entries"}
COMPAT_LAZY_REFCOUNTS = 1 << 0          # spec: compatible_features bit 0

COMPRESSION_ZLIB = 0                    # spec: compression_type values
COMPRESSION_ZSTD = 1

# spec: header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

MIN_CLUSTER_BITS = 9                    # spec: cluster_bits must not be less than 9
MAX_CLUSTER_BITS = 21                   # spec note: QEMU's 2 MiB implementation limit (we keep it)
MIN_EXTENDED_L2_CLUSTER_BITS = 14       # spec: extended L2 needs cluster_bits >= 14
MAX_BACKING_NAME = 1023                 # spec: backing_file_size must not be longer than 1023 bytes
MAX_L1_BYTES = 32 << 20                 # spec note: QEMU's 32 MiB L1 implementation limit (we keep it)
MAX_REFTABLE_BYTES = 8 << 20            # spec note: QEMU's 8 MiB refcount table implementation limit
MAX_SNAPSHOTS = 65536                   # QEMU's limit on nb_snapshots
MAX_REFCOUNT_ORDER = 6                  # spec: refcount_order may not exceed 6

UNSUPPORTED_HINT = "convert the image to a plain qcow2 first: `qemu-img convert -O qcow2 IMAGE NEW.qcow2`"


def corrupt(path: str, what: str) -> CloudkvmError:
    return CloudkvmError(f"{path}: {what}", CHECK_HINT)


def unsupported(path: str, what: str, hint: str = UNSUPPORTED_HINT) -> CloudkvmError:
    return CloudkvmError(f"{path}: {what}", hint)


@dataclass
class Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = V2_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    backing_file: str | None = None
    backing_format: str | None = None
    feature_names: dict = field(default_factory=dict)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible & INCOMPAT_EXTENDED_L2)


def l2_entries(cluster_bits: int, extended: bool) -> int:
    """Entries per L2 table (spec: cluster_size / 8, or / 16 with extended L2 entries)."""
    return (1 << cluster_bits) // (16 if extended else 8)


def l1_entries_needed(size: int, cluster_bits: int, extended: bool = False) -> int:
    per_l1 = l2_entries(cluster_bits, extended) << cluster_bits
    return (size + per_l1 - 1) // per_l1


def parse(path: str, fd: int, file_size: int) -> Header:
    """Read and validate the header cluster; CloudkvmError naming the field on anything wrong or unsupported."""
    if file_size < V2_LENGTH:
        raise corrupt(path, f"qcow2 header truncated: the file has {file_size} bytes, a header needs {V2_LENGTH}")
    head = os.pread(fd, V3_MIN_LENGTH, 0)
    (magic, version, bf_offset, bf_size, cluster_bits, size, crypt, l1_size, l1_offset, rt_offset, rt_clusters,
     nb_snapshots, snapshots_offset) = V2.unpack_from(head, 0)
    if magic != MAGIC:
        raise CloudkvmError(f"{path}: not a qcow2 image (magic {magic!r})", "open it as raw, or check the path")
    if version not in (2, 3):
        raise unsupported(path, f"qcow2 header: version {version} is not supported (only 2 and 3)")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise corrupt(path, f"qcow2 header: cluster_bits {cluster_bits} outside {MIN_CLUSTER_BITS}.."
                            f"{MAX_CLUSTER_BITS} (512 B .. 2 MiB clusters)")
    cs = 1 << cluster_bits
    h = Header(version, bf_offset, bf_size, cluster_bits, size, crypt, l1_size, l1_offset, rt_offset, rt_clusters,
               nb_snapshots, snapshots_offset)
    if version >= 3:
        if file_size < V3_MIN_LENGTH:
            raise corrupt(path, f"qcow2 v3 header truncated: the file has {file_size} bytes, need {V3_MIN_LENGTH}")
        h.incompatible, h.compatible, h.autoclear, h.refcount_order, h.header_length = V3.unpack_from(head, V2_LENGTH)
        if h.header_length < V3_MIN_LENGTH or h.header_length % 8 or h.header_length > cs:
            raise corrupt(path, f"qcow2 header: header_length {h.header_length} is not a multiple of 8 between "
                                f"{V3_MIN_LENGTH} and the cluster size {cs}")
        if h.header_length > file_size:
            raise corrupt(path, f"qcow2 header: header_length {h.header_length} runs past the end of the file")
    cluster0 = os.pread(fd, min(cs, file_size), 0)
    if version >= 3 and h.header_length > 104:
        h.compression_type = cluster0[104]
    _check_features(path, h, cluster0, file_size)
    _check_tables(path, h, file_size)
    _parse_backing(path, h, cluster0, file_size)
    return h


def _parse_extensions(path: str, h: Header, cluster0: bytes, end: int) -> dict[int, bytes]:
    exts: dict[int, bytes] = {}
    pos = h.header_length if h.version >= 3 else V2_LENGTH
    while pos + 8 <= end:
        etype, elen = struct.unpack_from(">II", cluster0, pos)
        if etype == EXT_END:
            break
        if elen > end - pos - 8:
            raise corrupt(path, f"qcow2 header extension {etype:#010x} at offset {pos:#x}: length {elen} runs past "
                                f"the end of the header cluster ({end:#x})")
        exts.setdefault(etype, cluster0[pos + 8:pos + 8 + elen])
        pos += 8 + ((elen + 7) & ~7)
    return exts


def _check_features(path: str, h: Header, cluster0: bytes, file_size: int) -> None:
    end = len(cluster0)
    if h.backing_file_offset and h.backing_file_size and h.backing_file_offset < end:
        end = max(h.backing_file_offset, h.header_length)  # the backing file name follows the extension area
    exts = _parse_extensions(path, h, cluster0, end)
    table = exts.get(EXT_FEATURE_TABLE, b"")
    for i in range(0, len(table) - 47, 48):  # spec: feature name table entries are 48 bytes
        kind, bit = table[i], table[i + 1]
        h.feature_names[(kind, bit)] = table[i + 2:i + 48].split(b"\0", 1)[0].decode("ascii", "replace")
    fmt = exts.get(EXT_BACKING_FORMAT)
    if fmt is not None:
        if len(fmt) > MAX_BACKING_NAME:
            raise corrupt(path, f"qcow2 backing format extension: {len(fmt)} bytes is too long")
        h.backing_format = fmt.decode("ascii", "replace")
    unknown = h.incompatible & ~INCOMPAT_KNOWN
    if unknown:
        names = ", ".join(f"bit {b}" + (f" ({h.feature_names[(0, b)]!r})" if (0, b) in h.feature_names else "")
                          for b in range(64) if unknown >> b & 1)
        raise unsupported(path, f"qcow2 incompatible feature(s) not supported: {names}",
                          "use a newer tool, or convert the image with a QEMU that knows the feature")
    if h.crypt_method:
        raise unsupported(path, f"qcow2 encryption (crypt_method {h.crypt_method}) is not supported",
                          "decrypt it first: `qemu-img convert --object secret,... -O qcow2 IMAGE PLAIN.qcow2`")
    if h.incompatible & INCOMPAT_EXTERNAL_DATA:
        raise unsupported(path, "qcow2 external data files are not supported")
    if h.refcount_order > MAX_REFCOUNT_ORDER:
        raise corrupt(path, f"qcow2 header: refcount_order {h.refcount_order} exceeds {MAX_REFCOUNT_ORDER}")
    has_type_bit = bool(h.incompatible & INCOMPAT_COMPRESSION_TYPE)
    if has_type_bit != (h.compression_type != COMPRESSION_ZLIB):
        raise corrupt(path, f"qcow2 header: compression_type {h.compression_type} does not match the "
                            f"compression type feature bit ({int(has_type_bit)})")
    if h.compression_type not in (COMPRESSION_ZLIB, COMPRESSION_ZSTD):
        raise unsupported(path, f"qcow2 compression_type {h.compression_type} is not supported (0 zlib, 1 zstd)")
    if h.extended_l2 and h.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS:
        raise corrupt(path, f"qcow2 header: extended L2 entries need clusters of at least 16 KiB, "
                            f"cluster_bits is {h.cluster_bits}")


def _check_tables(path: str, h: Header, file_size: int) -> None:
    cs = h.cluster_size
    needed = l1_entries_needed(h.size, h.cluster_bits, h.extended_l2)
    if h.size >= 1 << 63 or needed > MAX_L1_BYTES // 8:
        raise unsupported(path, f"qcow2 header: virtual size {h.size} needs more than the "
                                f"{MAX_L1_BYTES >> 20} MiB L1 table limit", CHECK_HINT)
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise corrupt(path, f"qcow2 header: l1_size {h.l1_size} ({h.l1_size * 8 >> 20} MiB) exceeds the "
                            f"{MAX_L1_BYTES >> 20} MiB L1 table limit")
    if h.l1_size < needed:
        raise corrupt(path, f"qcow2 header: l1_size {h.l1_size} is too small for the virtual size {h.size} "
                            f"(needs {needed})")
    if h.l1_size:
        if h.l1_table_offset % cs or h.l1_table_offset == 0:
            raise corrupt(path, f"qcow2 header: l1_table_offset {h.l1_table_offset:#x} is not a non-zero multiple "
                                f"of the cluster size {cs:#x}")
        if h.l1_table_offset + h.l1_size * 8 > file_size:
            raise corrupt(path, f"qcow2 header: L1 table at {h.l1_table_offset:#x} (+{h.l1_size * 8:#x}) runs past "
                                f"the end of the file ({file_size:#x})")
    if h.refcount_table_clusters == 0 or h.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise corrupt(path, f"qcow2 header: refcount_table_clusters {h.refcount_table_clusters} outside 1.."
                            f"{MAX_REFTABLE_BYTES // cs} ({MAX_REFTABLE_BYTES >> 20} MiB limit)")
    rt_end = h.refcount_table_offset + h.refcount_table_clusters * cs
    if h.refcount_table_offset % cs or h.refcount_table_offset == 0:
        raise corrupt(path, f"qcow2 header: refcount_table_offset {h.refcount_table_offset:#x} is not a non-zero "
                            f"multiple of the cluster size {cs:#x}")
    if rt_end > file_size:
        raise corrupt(path, f"qcow2 header: refcount table at {h.refcount_table_offset:#x} "
                            f"(+{h.refcount_table_clusters * cs:#x}) runs past the end of the file ({file_size:#x})")
    if h.l1_size and h.l1_table_offset < rt_end and h.refcount_table_offset < h.l1_table_offset + h.l1_size * 8:
        raise corrupt(path, "qcow2 header: the L1 table and the refcount table overlap")
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise corrupt(path, f"qcow2 header: nb_snapshots {h.nb_snapshots} exceeds {MAX_SNAPSHOTS}")
    if h.nb_snapshots and (h.snapshots_offset % cs or not 0 < h.snapshots_offset < file_size):
        raise corrupt(path, f"qcow2 header: snapshots_offset {h.snapshots_offset:#x} is misaligned or past the "
                            f"end of the file")


def _parse_backing(path: str, h: Header, cluster0: bytes, file_size: int) -> None:
    if not h.backing_file_offset or not h.backing_file_size:
        return
    if h.backing_file_size > MAX_BACKING_NAME:
        raise corrupt(path, f"qcow2 header: backing_file_size {h.backing_file_size} exceeds {MAX_BACKING_NAME}")
    end = h.backing_file_offset + h.backing_file_size
    if end > len(cluster0):
        raise corrupt(path, f"qcow2 header: backing file name at {h.backing_file_offset:#x} "
                            f"(+{h.backing_file_size}) is outside the header cluster")
    raw = cluster0[h.backing_file_offset:end]
    try:
        h.backing_file = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise corrupt(path, f"qcow2 header: backing file name {raw!r} is not UTF-8") from None
    if "\0" in h.backing_file:
        raise corrupt(path, f"qcow2 header: backing file name {h.backing_file!r} contains a NUL byte")


def pack(h: Header) -> bytes:
    """The header fields (72 bytes for v2, header_length for v3), without extensions."""
    out = V2.pack(MAGIC, h.version, h.backing_file_offset, h.backing_file_size, h.cluster_bits, h.size,
                  h.crypt_method, h.l1_size, h.l1_table_offset, h.refcount_table_offset, h.refcount_table_clusters,
                  h.nb_snapshots, h.snapshots_offset)
    if h.version < 3:
        return out
    out += V3.pack(h.incompatible, h.compatible, h.autoclear, h.refcount_order, h.header_length)
    extra = bytes([h.compression_type]) if h.header_length > V3_MIN_LENGTH else b""
    return (out + extra).ljust(h.header_length, b"\0")


def extension(etype: int, data: bytes) -> bytes:
    return struct.pack(">II", etype, len(data)) + data + bytes(-len(data) % 8)
