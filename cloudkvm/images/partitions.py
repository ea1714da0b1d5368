"""The partition table of a disk image, read through `cloudkvm.storage.Disk.pread` (so through a qcow2 chain):
GPT (UEFI 2.10 §5.3), the protective MBR in front of it (§5.2.3), a plain MBR with its primary entries and a
bounded chain of extended boot records (§5.2.1), or no table at all around a whole-disk ext2/3/4 file system.

Only 512-byte logical sectors are handled; an image with 4096-byte sectors is refused with an error saying so.
A GPT whose primary header or entry array fails its CRC32 is read from the backup GPT instead (at the primary
header's AlternateLBA, else the disk's last sector), as §5.3.2 asks firmware to do; when both copies are bad the
image is refused. The image is untrusted (a guest writes its own disk): every count, size and offset is bounded
before it is used, and anything malformed is a one-line `CloudkvmError` naming the image.
"""
from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass

from ..errors import CloudkvmError, printable

SECTOR = 512
EXT_MAGIC_OFFSET = 1024 + 0x38  # s_magic in the ext2/3/4 superblock, which starts 1024 bytes into the volume
EXT_MAGIC = b"\x53\xef"
GPT_SIGNATURE = b"EFI PART"
GPT_HEADER_MIN = 92  # §5.3.2: HeaderSize is at least 92 and at most the logical block size
MAX_ENTRY_SIZE = 4096  # §5.3.2: 128 x 2^n; nothing uses more than 128
MAX_ENTRY_ARRAY = 1 << 20  # bytes of the GPT entry array we read (the usual 128 x 128 is 16 KiB)
MAX_LOGICAL = 128  # logical partitions followed in an MBR extended chain
MBR_EXTENDED = (0x05, 0x0F, 0x85)
MBR_PROTECTIVE = 0xEE

GPT_KINDS = {  # type GUID -> kind (Discoverable Partitions Specification; UEFI 2.10 §5.3.3 table 5.14)
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": "esp",
    "21686148-6449-6e6f-744e-656564454649": "bios-boot",
    "bc13c2ff-59e6-4262-a352-b275fd6f7172": "xbootldr",
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": "root-x86_64",
    "b921b045-1df0-41c3-af44-4c6f280d3fae": "root-aarch64",
    "44479540-f297-41b2-9af7-d131d5f0458a": "root-x86",
    "69dad710-2ce4-4e3c-b16c-21a1d49abed3": "root-arm",
    "0fc63daf-8483-4772-8e79-3d69d8477de4": "linux-data",
    "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "swap",
    "e6d6d379-f507-44c2-a23c-238f2a3df928": "lvm",
}
MBR_KINDS = {0x83: "linux-data", 0xEF: "esp", 0x82: "swap", 0x8E: "lvm", 0xEA: "xbootldr"}
_ZERO_GUID = bytes(16)


@dataclass(frozen=True)
class Partition:
    """One partition (or the whole disk, number 0). `start` and `size` are bytes of the virtual disk; `type` is
    the GPT type GUID (lower case) or the MBR type byte as '0x83'; `kind` is what cloudkvm makes of it ('esp',
    'xbootldr', 'root-x86_64', 'root-aarch64', 'linux-data', 'extended', 'disk', 'other', ...); `uuid` is the
    GPT unique partition GUID or the MBR PARTUUID ('1234abcd-01'), as Linux's root=PARTUUID= takes it."""

    number: int
    start: int
    size: int
    type: str
    kind: str
    name: str = ""
    uuid: str = ""


@dataclass(frozen=True)
class PartitionTable:
    """`scheme` is 'gpt', 'mbr' or 'none' (a whole-disk file system: one Partition numbered 0)."""

    scheme: str
    partitions: tuple[Partition, ...]
    disk_id: str = ""  # the GPT disk GUID or the MBR disk signature as 8 hex digits


def _corrupt(display: str, what: str, hint: str = "") -> CloudkvmError:
    return CloudkvmError(f"{display}: {what}", hint or "the image's partition table is damaged; inspect it with "
                                                       "`sfdisk --dump IMAGE` (on a raw copy: `qemu-img convert`)")


def _read(disk, display: str, length: int, offset: int) -> bytes:
    if offset < 0 or length < 0 or offset + length > disk.size:
        raise _corrupt(display, f"partition table data at byte {offset} (+{length}) lies beyond the end of the "
                                f"disk ({disk.size} bytes)")
    return disk.pread(length, offset)


def read_partitions(disk, display: str) -> PartitionTable:
    """The disk's partition table: GPT behind a protective MBR (UEFI 2.10 §5.2.3, §5.3), else an MBR (§5.2.1),
    else a whole-disk ext2/3/4 file system; a one-line CloudkvmError naming `display` for anything else."""
    if disk.size < 2 * SECTOR:
        raise _corrupt(display, f"the disk is {disk.size} bytes, too small for a partition table or file system",
                       "is this the right image?")
    mbr = _read(disk, display, SECTOR, 0)
    lba1 = _read(disk, display, SECTOR, SECTOR)
    has_mbr = mbr[510:512] == b"\x55\xaa"
    entries = [_mbr_entry(mbr, i) for i in range(4)] if has_mbr else []
    if lba1[:8] != GPT_SIGNATURE and disk.size >= 4096 * 2 and _read(disk, display, 8, 4096) == GPT_SIGNATURE:
        raise CloudkvmError(f"{display}: the disk has 4096-byte sectors (its GPT is at byte 4096)",
                            "cloudkvm reads images with 512-byte sectors only; convert the image to 512-byte "
                            "sectors or boot it with explicit kernel and initrd files")
    if any(e[1] == MBR_PROTECTIVE for e in entries) or (not has_mbr and lba1[:8] == GPT_SIGNATURE):
        return _read_gpt(disk, display)
    if has_mbr and any(e[1] for e in entries):
        return _read_mbr(disk, display, mbr, entries)
    if disk.size >= EXT_MAGIC_OFFSET + 2 and _read(disk, display, 2, EXT_MAGIC_OFFSET) == EXT_MAGIC:
        return PartitionTable("none", (Partition(0, 0, disk.size, "", "disk"),))
    raise CloudkvmError(f"{display}: no partition table (GPT or MBR) and no ext2/3/4 file system on the disk",
                        "is this a disk image? cloudkvm reads GPT and MBR disks and whole-disk ext2/3/4")


def _guid(raw: bytes) -> str:
    return str(uuid.UUID(bytes_le=raw))


# ---- GPT (UEFI 2.10 §5.3) -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GptHeader:
    my_lba: int
    alternate_lba: int
    first_usable: int
    last_usable: int
    disk_guid: str
    entries_lba: int
    entry_count: int
    entry_size: int
    entries_crc: int


def _read_gpt(disk, display: str) -> PartitionTable:
    sectors = disk.size // SECTOR
    problems = []
    primary = None
    try:
        primary = _gpt_header(disk, display, 1, sectors)
        return _gpt_table(disk, display, primary, sectors)
    except _GptInvalid as bad:
        problems.append(f"primary GPT: {bad}")
    candidates = []
    if primary is not None and 1 < primary.alternate_lba < sectors:
        candidates.append(primary.alternate_lba)
    else:  # the primary header's own AlternateLBA is not to be trusted unless its CRC was good
        alternate = _unchecked_alternate(disk, display, sectors)
        if alternate:
            candidates.append(alternate)
    if sectors - 1 not in candidates:
        candidates.append(sectors - 1)
    for lba in candidates:
        try:
            return _gpt_table(disk, display, _gpt_header(disk, display, lba, sectors), sectors)
        except _GptInvalid as bad:
            problems.append(f"backup GPT at sector {lba}: {bad}")
    raise _corrupt(display, "no valid GPT: " + "; ".join(problems))


class _GptInvalid(Exception):
    """One copy of the GPT is unusable (the other copy may still be good)."""


def _unchecked_alternate(disk, display: str, sectors: int) -> int:
    raw = _read(disk, display, SECTOR, SECTOR)
    if raw[:8] != GPT_SIGNATURE:
        return 0
    alternate = struct.unpack_from("<Q", raw, 32)[0]
    return alternate if 1 < alternate < sectors else 0


def _gpt_header(disk, display: str, lba: int, sectors: int) -> _GptHeader:
    raw = _read(disk, display, SECTOR, lba * SECTOR)
    if raw[:8] != GPT_SIGNATURE:
        raise _GptInvalid(f"no 'EFI PART' signature at sector {lba}")
    header_size, header_crc, reserved, my_lba = struct.unpack_from("<IIIQ", raw, 12)
    if not GPT_HEADER_MIN <= header_size <= SECTOR:
        raise _GptInvalid(f"header size {header_size} is outside 92..512")
    if zlib.crc32(raw[:16] + b"\0\0\0\0" + raw[20:header_size]) != header_crc:
        raise _GptInvalid("header CRC32 mismatch")
    alternate, first, last = struct.unpack_from("<QQQ", raw, 32)
    entries_lba, count, size, entries_crc = struct.unpack_from("<QIII", raw, 72)
    if my_lba != lba:
        raise _GptInvalid(f"header says it is at sector {my_lba}")
    if size < 128 or size > MAX_ENTRY_SIZE or size & (size - 1):
        raise _GptInvalid(f"partition entry size {size} is not 128 x 2^n (at most {MAX_ENTRY_SIZE})")
    if count * size > MAX_ENTRY_ARRAY:
        raise _GptInvalid(f"{count} partition entries of {size} bytes exceed the {MAX_ENTRY_ARRAY >> 10} KiB "
                          f"cloudkvm reads")
    array_sectors = (count * size + SECTOR - 1) // SECTOR
    if entries_lba < 2 or entries_lba + array_sectors > sectors:
        raise _GptInvalid(f"the entry array at sector {entries_lba} ({array_sectors} sectors) lies outside the "
                          f"disk ({sectors} sectors)")
    if not 2 <= first <= last + 1:
        raise _GptInvalid(f"usable sectors {first}..{last} make no range")
    return _GptHeader(my_lba, alternate, first, last, _guid(raw[56:72]), entries_lba, count, size, entries_crc)


def _gpt_table(disk, display: str, header: _GptHeader, sectors: int) -> PartitionTable:
    array = _read(disk, display, header.entry_count * header.entry_size, header.entries_lba * SECTOR)
    if zlib.crc32(array) != header.entries_crc:
        raise _GptInvalid("partition entry array CRC32 mismatch")
    parts = []
    for index in range(header.entry_count):
        entry = array[index * header.entry_size:(index + 1) * header.entry_size]
        if entry[:16] == _ZERO_GUID:
            continue  # an unused entry
        number = index + 1
        first, last = struct.unpack_from("<QQ", entry, 32)
        if first > last or first < header.first_usable or last > header.last_usable or last >= sectors:
            raise _corrupt(display, f"GPT partition {number} (sectors {first}..{last}) lies outside the disk's "
                                    f"usable sectors {header.first_usable}..{min(header.last_usable, sectors - 1)}")
        type_guid = _guid(entry[:16])
        name = entry[56:128].decode("utf-16-le", "replace").split("\0", 1)[0]
        parts.append(Partition(number, first * SECTOR, (last - first + 1) * SECTOR, type_guid,
                               GPT_KINDS.get(type_guid, "other"), printable(name), _guid(entry[16:32])))
    return PartitionTable("gpt", tuple(parts), header.disk_guid)


# ---- MBR (UEFI 2.10 §5.2.1) -----------------------------------------------------------------------------------


def _mbr_entry(sector: bytes, index: int) -> tuple[int, int, int, int]:
    """(boot indicator, type, first sector, sector count) of one of the four entries at byte 446."""
    boot, kind, start, count = struct.unpack_from("<B3xB3xII", sector, 446 + 16 * index)
    return boot, kind, start, count


def _read_mbr(disk, display: str, mbr: bytes, entries) -> PartitionTable:
    sectors = disk.size // SECTOR
    signature = struct.unpack_from("<I", mbr, 440)[0]
    disk_id = f"{signature:08x}"
    parts = []
    for index, (boot, kind, start, count) in enumerate(entries):
        if not kind:
            continue
        number = index + 1
        if boot not in (0x00, 0x80):
            raise _corrupt(display, f"MBR entry {number} has boot indicator 0x{boot:02x} (not 0x00 or 0x80): not an "
                                    f"MBR")
        _check_inside(display, number, start, count, 1, sectors)
        extended = kind in MBR_EXTENDED
        parts.append(Partition(number, start * SECTOR, count * SECTOR, f"0x{kind:02x}",
                               "extended" if extended else MBR_KINDS.get(kind, "other"), "",
                               f"{disk_id}-{number:02x}"))
        if extended:
            parts.extend(_logical_partitions(disk, display, start, count, disk_id))
    return PartitionTable("mbr", tuple(parts), disk_id)


def _check_inside(display: str, number: int, start: int, count: int, low: int, end: int) -> None:
    if count == 0 or start < low or start + count > end:
        raise _corrupt(display, f"partition {number} (sectors {start}..{start + count - 1}) lies outside "
                                f"{'the disk' if low == 1 else 'its extended partition'} (sectors {low}..{end - 1})")


def _logical_partitions(disk, display: str, ext_start: int, ext_count: int, disk_id: str) -> list[Partition]:
    """The logical partitions of an extended partition: a chain of EBRs, each holding one partition (relative to
    itself) and a link to the next (relative to the extended partition); bounded and loop-checked."""
    out, seen, ebr = [], set(), ext_start
    end = ext_start + ext_count
    while ebr:
        number = 5 + len(out)
        if ebr in seen or len(out) >= MAX_LOGICAL:
            raise _corrupt(display, f"the MBR's extended partition chain loops or holds more than {MAX_LOGICAL} "
                                    f"logical partitions (at sector {ebr})")
        seen.add(ebr)
        if not ext_start <= ebr < end:
            raise _corrupt(display, f"extended boot record at sector {ebr} lies outside its extended partition "
                                    f"(sectors {ext_start}..{end - 1})")
        record = _read(disk, display, SECTOR, ebr * SECTOR)
        if record[510:512] != b"\x55\xaa":
            raise _corrupt(display, f"extended boot record at sector {ebr} has no 55aa signature")
        _, kind, rel, count = _mbr_entry(record, 0)
        _, next_kind, next_rel, _ = _mbr_entry(record, 1)
        if kind:
            _check_inside(display, number, ebr + rel, count, ext_start + 1, end)
            out.append(Partition(number, (ebr + rel) * SECTOR, count * SECTOR, f"0x{kind:02x}",
                                 MBR_KINDS.get(kind, "other"), "", f"{disk_id}-{number:02x}"))
        ebr = ext_start + next_rel if next_kind in MBR_EXTENDED and next_rel else 0
    return out
