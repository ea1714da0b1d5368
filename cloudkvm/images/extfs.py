"""A small read-only ext2/ext3/ext4 reader: enough to find and read a cloud image's kernel, initrd and init.

Written against the kernel's on-disk format description (Documentation/filesystems/ext4/: "Super Block",
"Block Group Descriptors", "Index Nodes", "The Contents of Inode.i_block", "Directory Entries"). It reads the
superblock, group descriptors (plain, 64-bit and META_BG layouts), inodes, extent trees (depth ≤ 5) and the
ext2/3 block maps (direct, indirect, double and triple indirect), linear directories (hash-tree directories are
read linearly, which their format allows), fast and slow symbolic links, and short inline-data symlinks.
It does not replay the journal (a file system whose guest crashed is read as it lies on disk), verify metadata
checksums, or read inline-data files and directories, encrypted names or an external journal device.

Everything it reads is untrusted (the guest writes its own disk): every number is checked before it is used,
every structure is bounded (directory size, extent depth, symlink count, path steps, file size), and a problem is
an `ExtError` with a one-line message; callers add the image and partition.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

SUPERBLOCK_OFFSET = 1024
EXT_MAGIC = 0xEF53
ROOT_INODE = 2
MAX_DIR_BYTES = 2 << 20  # a directory larger than this is refused (the ones on a boot path hold a few KiB)
MAX_SYMLINK = 4096  # PATH_MAX
MAX_SYMLINKS = 40  # followed while resolving one path, as Linux's ELOOP limit
MAX_STEPS = 256  # path components looked up while resolving one path (symlink targets included)
MAX_EXTENT_DEPTH = 5  # EXT4_MAX_EXTENT_DEPTH
READ_CHUNK = 4 << 20  # contiguous blocks read in one request
_CACHE = 64  # directories, inodes and tree blocks kept per file system

# superblock feature bits
COMPAT_SPARSE_SUPER2 = 0x200
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_HUGE_FILE = 0x8
INCOMPAT_COMPRESSION = 0x1
INCOMPAT_FILETYPE = 0x2
INCOMPAT_RECOVER = 0x4
INCOMPAT_JOURNAL_DEV = 0x8
INCOMPAT_META_BG = 0x10
INCOMPAT_64BIT = 0x80
INCOMPAT_DIRDATA = 0x1000
INCOMPAT_KNOWN = 0x2 | 0x4 | 0x10 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x2000 | 0x4000 | 0x8000 | 0x10000 | 0x20000
# inode flags
EXTENTS_FL = 0x80000
INLINE_DATA_FL = 0x10000000
# i_mode file types
S_IFMT, S_IFDIR, S_IFREG, S_IFLNK = 0o170000, 0o040000, 0o100000, 0o120000

EXTENT_MAGIC = 0xF30A
_EXTENT_HEADER = struct.Struct("<HHHH4x")  # eh_magic, eh_entries, eh_max, eh_depth, eh_generation
_EXTENT_ENTRY = struct.Struct("<IHHI")  # leaf: ee_block, ee_len, ee_start_hi, ee_start_lo
_EXTENT_INDEX = struct.Struct("<IIH2x")  # index: ei_block, ei_leaf_lo, ei_leaf_hi
_DIRENT = struct.Struct("<IHBB")  # inode, rec_len, name_len, file_type


class ExtError(Exception):
    """The file system is damaged, or uses something this reader does not read (one line, no location)."""


@dataclass(frozen=True)
class Inode:
    """The fields of one inode this reader uses."""

    number: int
    mode: int
    size: int
    flags: int
    blocks_512: int
    file_acl: int
    block: bytes  # i_block: the extent tree root, the block map, or a fast symlink's target

    @property
    def kind(self) -> int:
        return self.mode & S_IFMT

    @property
    def is_dir(self) -> bool:
        return self.kind == S_IFDIR

    @property
    def is_file(self) -> bool:
        return self.kind == S_IFREG

    @property
    def is_symlink(self) -> bool:
        return self.kind == S_IFLNK


class ExtFs:
    """One ext2/3/4 file system on a volume (anything with `pread(length, offset)` and `size`, offsets relative
    to the file system's first byte)."""

    def __init__(self, volume):
        self.volume = volume
        sb = self._pread(1024, SUPERBLOCK_OFFSET, "the superblock")
        (self.inodes_count, blocks_lo, _, _, _, self.first_data_block, log_block_size, _, self.blocks_per_group,
         _, self.inodes_per_group) = struct.unpack_from("<11I", sb, 0)
        magic = struct.unpack_from("<H", sb, 0x38)[0]
        if magic != EXT_MAGIC:
            raise ExtError(f"no ext2/3/4 superblock (magic 0x{magic:04x}, not 0x{EXT_MAGIC:04x})")
        rev_level = struct.unpack_from("<I", sb, 0x4C)[0]
        inode_size = struct.unpack_from("<H", sb, 0x58)[0]
        compat, self.incompat, self.ro_compat = struct.unpack_from("<III", sb, 0x5C)
        self.uuid_bytes = sb[0x68:0x78]
        self.label = sb[0x78:0x88].split(b"\0", 1)[0].decode("utf-8", "replace")
        self.first_meta_bg = struct.unpack_from("<I", sb, 0x104)[0]
        desc_size = struct.unpack_from("<H", sb, 0xFE)[0]
        blocks_hi = struct.unpack_from("<I", sb, 0x150)[0]
        self.backup_bgs = struct.unpack_from("<II", sb, 0x24C) if compat & COMPAT_SPARSE_SUPER2 else None
        self._check_features()
        if log_block_size > 6:
            raise ExtError(f"block size 1024 << {log_block_size} is larger than 64 KiB")
        self.block_size = bs = 1024 << log_block_size
        self.is_64bit = bool(self.incompat & INCOMPAT_64BIT)
        self.blocks_count = blocks_lo | (blocks_hi << 32 if self.is_64bit else 0)
        self.inode_size = 128 if rev_level == 0 else inode_size
        self.desc_size = desc_size if self.is_64bit else 32
        if not 128 <= self.inode_size <= bs or self.inode_size & (self.inode_size - 1):
            raise ExtError(f"inode size {self.inode_size} is not a power of two in 128..{bs}")
        if not 32 <= self.desc_size <= 1024 or self.desc_size & (self.desc_size - 1):
            raise ExtError(f"group descriptor size {self.desc_size} is not a power of two in 32..1024")
        if not 8 <= self.blocks_per_group <= 8 * bs or not 1 <= self.inodes_per_group <= 8 * bs:
            raise ExtError(f"{self.blocks_per_group} blocks and {self.inodes_per_group} inodes per group do not fit "
                           f"the {bs}-byte bitmaps")
        if self.first_data_block >= self.blocks_count:
            raise ExtError(f"first data block {self.first_data_block} is past the {self.blocks_count} blocks")
        if self.blocks_count * bs > volume.size:
            raise ExtError(f"the file system ({self.blocks_count} blocks of {bs} bytes) is larger than its volume "
                           f"({volume.size} bytes)")
        self.group_count = -(-(self.blocks_count - self.first_data_block) // self.blocks_per_group)
        if not 1 <= self.inodes_count <= self.group_count * self.inodes_per_group:
            raise ExtError(f"{self.inodes_count} inodes do not fit {self.group_count} groups of "
                           f"{self.inodes_per_group}")
        self._inodes: dict[int, Inode] = {}
        self._dirs: dict[int, dict[bytes, int]] = {}
        self._blocks: dict[int, bytes] = {}
        root = self.inode(ROOT_INODE)
        if not root.is_dir:
            raise ExtError(f"inode {ROOT_INODE}, the root folder, is not a folder (mode 0o{root.mode:o})")

    def _check_features(self) -> None:
        if self.incompat & INCOMPAT_JOURNAL_DEV:
            raise ExtError("this is an external journal device, not a file system")
        if self.incompat & (INCOMPAT_COMPRESSION | INCOMPAT_DIRDATA):
            raise ExtError(f"uses features this reader does not read (incompat 0x{self.incompat:x})")
        unknown = self.incompat & ~INCOMPAT_KNOWN
        if unknown:
            raise ExtError(f"uses unknown incompatible features 0x{unknown:x}")

    @property
    def needs_recovery(self) -> bool:
        """The journal holds changes not yet written in place (the guest stopped without unmounting); they are
        not replayed, so the newest files may be missing or stale."""
        return bool(self.incompat & INCOMPAT_RECOVER)

    @property
    def uuid(self) -> str:
        """The file system's UUID as blkid prints it (lower case, 8-4-4-4-12)."""
        h = self.uuid_bytes.hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    # ---- raw access ------------------------------------------------------------------------------------------

    def _pread(self, length: int, offset: int, what: str) -> bytes:
        if offset < 0 or offset + length > self.volume.size:
            raise ExtError(f"{what} at byte {offset} (+{length}) lies outside the volume ({self.volume.size} bytes)")
        data = self.volume.pread(length, offset)
        if len(data) != length:
            raise ExtError(f"short read of {what} at byte {offset}")
        return data

    def _block(self, number: int, what: str) -> bytes:
        """One metadata block (cached)."""
        cached = self._blocks.get(number)
        if cached is None:
            self._check_block(number, 1, what)
            cached = self._pread(self.block_size, number * self.block_size, what)
            if len(self._blocks) >= _CACHE:
                self._blocks.clear()
            self._blocks[number] = cached
        return cached

    def _check_block(self, number: int, count: int, what: str) -> None:
        if number < self.first_data_block or number + count > self.blocks_count:
            raise ExtError(f"{what} names blocks {number}..{number + count - 1}, outside the file system's "
                           f"{self.blocks_count} blocks")

    # ---- groups and inodes -----------------------------------------------------------------------------------

    def _group_has_super(self, group: int) -> bool:
        if self.backup_bgs is not None:
            return group == 0 or group in self.backup_bgs
        if group <= 1 or not self.ro_compat & RO_COMPAT_SPARSE_SUPER:
            return True
        for base in (3, 5, 7):
            n = base
            while n < group:
                n *= base
            if n == group:
                return True
        return False

    def _descriptor_offset(self, group: int) -> int:
        per_block = self.block_size // self.desc_size
        meta_group = group // per_block
        if self.incompat & INCOMPAT_META_BG and meta_group >= self.first_meta_bg:
            first = meta_group * per_block
            block = self.first_data_block + first * self.blocks_per_group + self._group_has_super(first)
            return block * self.block_size + (group % per_block) * self.desc_size
        return (self.first_data_block + 1) * self.block_size + group * self.desc_size

    def _inode_table(self, group: int) -> int:
        desc = self._pread(self.desc_size, self._descriptor_offset(group), f"group descriptor {group}")
        table = struct.unpack_from("<I", desc, 0x8)[0]
        if self.is_64bit and self.desc_size >= 64:
            table |= struct.unpack_from("<I", desc, 0x28)[0] << 32
        blocks = -(-self.inodes_per_group * self.inode_size // self.block_size)
        self._check_block(table, blocks, f"the inode table of group {group}")
        return table

    def inode(self, number: int) -> Inode:
        """Inode `number` (1-based)."""
        cached = self._inodes.get(number)
        if cached is not None:
            return cached
        if not 1 <= number <= self.inodes_count:
            raise ExtError(f"inode {number} is outside 1..{self.inodes_count}")
        group, index = divmod(number - 1, self.inodes_per_group)
        offset = self._inode_table(group) * self.block_size + index * self.inode_size
        raw = self._pread(128, offset, f"inode {number}")
        mode, size_lo = struct.unpack_from("<HxxI", raw, 0)
        links, blocks_lo, flags = struct.unpack_from("<HII", raw, 0x1A)
        file_acl_lo, size_hi = struct.unpack_from("<II", raw, 0x68)
        blocks_hi, file_acl_hi = struct.unpack_from("<HH", raw, 0x74)
        if links == 0 and mode == 0:
            raise ExtError(f"inode {number} is in use by a directory entry but is empty")
        blocks = blocks_lo | (blocks_hi << 32 if self.ro_compat & RO_COMPAT_HUGE_FILE else 0)
        inode = Inode(number, mode, size_lo | (size_hi << 32), flags, blocks,
                      file_acl_lo | (file_acl_hi << 32 if self.is_64bit else 0), raw[0x28:0x64])
        if len(self._inodes) >= _CACHE:
            self._inodes.clear()
        self._inodes[number] = inode
        return inode

    # ---- file contents ---------------------------------------------------------------------------------------

    def read(self, inode: Inode, limit: int) -> bytes:
        """All of a file's bytes (holes and unwritten extents read as zeros); ExtError past `limit` bytes."""
        if inode.size > limit:
            raise FileTooLarge(f"inode {inode.number} holds {inode.size} bytes, more than the {limit} allowed")
        if inode.flags & INLINE_DATA_FL:
            if inode.size > len(inode.block):
                raise ExtError(f"inode {inode.number} keeps its data inline in extended attributes, which this "
                               f"reader does not read")
            return inode.block[:inode.size]
        bs = self.block_size
        total = -(-inode.size // bs)
        chunks: list[bytes] = []
        logical = 0
        pending_start, pending_count = 0, 0  # a contiguous run of physical blocks not read yet
        while logical < total:
            physical, run = self._map(inode, logical, total)
            run = max(1, min(run, total - logical))
            if physical is not None and pending_count and pending_start + pending_count == physical \
                    and (pending_count + run) * bs <= READ_CHUNK:
                pending_count += run
            else:
                if pending_count:
                    chunks.append(self._data(inode, pending_start, pending_count))
                    pending_count = 0
                if physical is None:
                    chunks.append(bytes(run * bs))
                else:
                    pending_start, pending_count = physical, run
            logical += run
        if pending_count:
            chunks.append(self._data(inode, pending_start, pending_count))
        excess = total * bs - inode.size  # the last block's tail beyond the file's end
        if excess:
            chunks[-1] = chunks[-1][:len(chunks[-1]) - excess]
        return b"".join(chunks)

    def _data(self, inode: Inode, start: int, count: int) -> bytes:
        self._check_block(start, count, f"inode {inode.number}'s data")
        return self._pread(count * self.block_size, start * self.block_size, f"inode {inode.number}'s data")

    def _map(self, inode: Inode, logical: int, total: int) -> tuple[int | None, int]:
        """(first physical block or None for a hole, blocks in the run) for logical block `logical`."""
        if inode.flags & EXTENTS_FL:
            return self._map_extents(inode, logical, total)
        return self._map_blockmap(inode, logical)

    def _map_extents(self, inode: Inode, logical: int, end: int) -> tuple[int | None, int]:
        node, expected_depth, bound = inode.block, None, end
        for _ in range(MAX_EXTENT_DEPTH + 1):
            magic, entries, maximum, depth = _EXTENT_HEADER.unpack_from(node, 0)
            if magic != EXTENT_MAGIC:
                raise ExtError(f"inode {inode.number}: extent tree node without its magic (0x{magic:04x})")
            if depth > MAX_EXTENT_DEPTH or (expected_depth is not None and depth != expected_depth):
                raise ExtError(f"inode {inode.number}: extent tree node of depth {depth} where "
                               f"{expected_depth if expected_depth is not None else 'at most 5'} belongs")
            if entries > maximum or 12 + 12 * maximum > len(node):
                raise ExtError(f"inode {inode.number}: extent tree node claims {entries} of {maximum} entries in "
                               f"{len(node)} bytes")
            keys = [struct.unpack_from("<I", node, 12 + 12 * i)[0] for i in range(entries)]
            index = _last_at_most(keys, logical)
            following = keys[index + 1] if index + 1 < entries else None
            if following is not None and following > logical:
                bound = min(bound, following)
            if depth == 0:
                return self._leaf(inode, node, index, logical, bound)
            if index < 0:
                return None, bound - logical
            _, leaf_lo, leaf_hi = _EXTENT_INDEX.unpack_from(node, 12 + 12 * index)
            node = self._block(leaf_lo | (leaf_hi << 32), f"inode {inode.number}'s extent tree")
            expected_depth = depth - 1
        raise ExtError(f"inode {inode.number}: extent tree deeper than {MAX_EXTENT_DEPTH}")

    def _leaf(self, inode: Inode, node: bytes, index: int, logical: int, bound: int) -> tuple[int | None, int]:
        if index < 0:
            return None, bound - logical
        first, length, start_hi, start_lo = _EXTENT_ENTRY.unpack_from(node, 12 + 12 * index)
        unwritten = length > 32768
        length -= 32768 if unwritten else 0
        if length == 0:
            raise ExtError(f"inode {inode.number}: an extent of length 0")
        start = start_lo | (start_hi << 32)
        self._check_block(start, length, f"inode {inode.number}'s extent")
        if logical >= first + length:
            return None, bound - logical
        run = first + length - logical
        return (None if unwritten else start + logical - first), run

    def _map_blockmap(self, inode: Inode, logical: int) -> tuple[int | None, int]:
        """ext2/3 block maps: 12 direct blocks, then single, double and triple indirect blocks. The run is the
        pointers that follow in the same table and continue the first one's blocks (or its hole)."""
        per_block = self.block_size // 4
        table, index, what = inode.block[:48], logical, f"inode {inode.number}'s block map"
        if logical >= 12:
            logical -= 12
            for level, slot in ((1, 12), (2, 13), (3, 14)):
                span = per_block ** level
                if logical < span:
                    break
                logical -= span
            else:
                raise ExtError(f"inode {inode.number}: block {logical} is beyond what a block map can address")
            pointer = struct.unpack_from("<I", inode.block, 4 * slot)[0]
            for _ in range(level):
                if not pointer:
                    return None, 1
                table = self._block(pointer, what)
                span //= per_block
                index, logical = divmod(logical, span)
                if span > 1:
                    pointer = struct.unpack_from("<I", table, 4 * index)[0]
        pointers = struct.unpack_from(f"<{len(table) // 4}I", table)
        first = pointers[index]
        run = 1
        while index + run < len(pointers) and pointers[index + run] == (first + run if first else 0):
            run += 1
        if first:
            self._check_block(first, run, what)
        return first or None, run

    # ---- directories and names -------------------------------------------------------------------------------

    def entries(self, directory: Inode) -> dict[bytes, int]:
        """A directory's names -> inode numbers ('.' and '..' included)."""
        cached = self._dirs.get(directory.number)
        if cached is not None:
            return cached
        if not directory.is_dir:
            raise ExtError(f"inode {directory.number} is not a directory")
        if directory.flags & INLINE_DATA_FL:
            raise ExtError(f"directory inode {directory.number} keeps its entries inline, which this reader does "
                           f"not read")
        if directory.size > MAX_DIR_BYTES:
            raise ExtError(f"directory inode {directory.number} is {directory.size} bytes, more than the "
                           f"{MAX_DIR_BYTES >> 20} MiB this reader reads of a folder")
        data = self.read(directory, MAX_DIR_BYTES)
        names: dict[bytes, int] = {}
        bs = self.block_size
        wide_names = not self.incompat & INCOMPAT_FILETYPE
        for block_start in range(0, len(data) - bs + 1, bs):
            pos = 0
            while pos + 8 <= bs:
                number, rec_len, name_len, file_type = _DIRENT.unpack_from(data, block_start + pos)
                if wide_names:
                    name_len |= file_type << 8
                if rec_len in (0, 65535) and bs == 65536:
                    rec_len = 65536
                if rec_len < 8 or rec_len % 4 or pos + rec_len > bs or 8 + name_len > rec_len:
                    raise ExtError(f"directory inode {directory.number}: a broken entry at byte "
                                   f"{block_start + pos} (length {rec_len}, name length {name_len})")
                if number:
                    start = block_start + pos + 8
                    names.setdefault(data[start:start + name_len], number)
                pos += rec_len
        if len(self._dirs) >= _CACHE:
            self._dirs.clear()
        self._dirs[directory.number] = names
        return names

    def readlink(self, link: Inode) -> bytes:
        """A symbolic link's target."""
        if not link.is_symlink:
            raise ExtError(f"inode {link.number} is not a symbolic link")
        if link.size > MAX_SYMLINK:
            raise ExtError(f"symbolic link inode {link.number} is {link.size} bytes long")
        xattr_blocks = (self.block_size >> 9) if link.file_acl else 0
        fast = link.flags & INLINE_DATA_FL or (link.blocks_512 - xattr_blocks <= 0 and link.size < len(link.block))
        target = link.block[:link.size] if fast else self.read(link, MAX_SYMLINK)
        if not target or b"\0" in target:
            raise ExtError(f"symbolic link inode {link.number} has an empty or broken target")
        return target

    def resolve(self, path: str, mount: str = "/", follow: bool = True) -> Resolved | None:
        """The inode at `path` (absolute, in the system's view; `mount` is where this file system is mounted) and
        its path with symbolic links followed inside this file system; None when the path does not exist here or
        a link leads out of this file system. ExtError for a symlink loop, a too-long path or damage."""
        pending = _components(path.encode("utf-8", "surrogateescape"), mount)
        if pending is None:
            return None
        stack: list[tuple[int, bytes]] = [(ROOT_INODE, b"")]  # the directories walked, for '..', and their names
        links = steps = 0
        while pending:
            name = pending.pop(0)
            steps += 1
            if steps > MAX_STEPS:
                raise ExtError(f"resolving {path} takes more than {MAX_STEPS} steps")
            if name == b".":
                continue
            if name == b"..":
                if len(stack) > 1:
                    stack.pop()
                elif mount != "/":
                    return None  # above a mounted file system's root: another file system
                continue
            current = self.inode(stack[-1][0])
            if not current.is_dir:
                return None
            number = self.entries(current).get(name)
            if number is None:
                return None
            child = self.inode(number)
            if child.is_symlink and (pending or follow):
                links += 1
                if links > MAX_SYMLINKS:
                    raise ExtError(f"resolving {path}: more than {MAX_SYMLINKS} symbolic links (a loop?)")
                target = self.readlink(child)
                if target.startswith(b"/"):
                    rest = _components(target, mount)
                    if rest is None:
                        return None
                    stack = stack[:1]
                else:
                    rest = [part for part in target.split(b"/") if part]
                pending = rest + pending
                continue
            stack.append((number, name))
        names = b"/".join(name for _, name in stack[1:]).decode("utf-8", "surrogateescape")
        base = mount.rstrip("/")
        return Resolved(self.inode(stack[-1][0]), f"{base}/{names}" if names or not base else base)


@dataclass(frozen=True)
class Resolved:
    """A path's inode and the path itself with every symbolic link followed (in the system's view)."""

    inode: Inode
    path: str


class FileTooLarge(ExtError):
    """A file is larger than the caller allows."""


def _components(path: bytes, mount: str) -> list[bytes] | None:
    """The components of absolute `path` below `mount`, or None when it lies outside the mount."""
    parts = [part for part in path.split(b"/") if part and part != b"."]
    prefix = [part for part in mount.encode().split(b"/") if part]
    if parts[:len(prefix)] != prefix:
        return None
    return parts[len(prefix):]


def _last_at_most(keys: list[int], value: int) -> int:
    """Index of the last key ≤ value in (sorted) keys, -1 when none is."""
    found = -1
    for index, key in enumerate(keys):
        if key > value:
            break
        found = index
    return found
