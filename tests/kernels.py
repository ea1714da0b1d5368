"""Synthetic x86 kernels for tests, built from the offsets in Linux's Documentation/x86/boot.rst and the ELF
specification (not from cloudkvm's own tables): an ELF64 vmlinux, its payload compressed as
arch/x86/boot/compressed/Makefile does, and a minimal bzImage around it."""
import bz2
import gzip
import lzma
import struct

import lz4.block
import zstandard

MiB = 1 << 20

EM_AARCH64, EM_386, EM_X86_64 = 183, 3, 62


def make_elf(segments=None, *, entry=None, machine=EM_X86_64, elf_class=2, e_type=2) -> bytes:
    """An ELF64 (or ELF32 header only) with PT_LOADs given as (paddr, vaddr, data, memsz, flags)."""
    if segments is None:
        segments = [(0x1000000, 0xFFFFFFFF81000000, b"\x90" * 0x300 + b"TEXT", 0x1000, 5),
                    (0x1200000, 0xFFFFFFFF81200000, b"DATA" * 64, 0x3000, 6)]
    if entry is None:
        entry = segments[0][0] if segments else 0
    if elf_class == 1:
        ident = b"\x7fELF" + bytes([1, 1, 1]) + bytes(9)
        return ident + struct.pack("<HHIIIIIHHHHHH", e_type, machine, 1, entry, 52, 0, 0, 52, 32, 0, 40, 0, 0)
    phoff = 64
    data_off = phoff + 56 * (len(segments) + 1)  # one PT_NOTE too, which the loader skips
    phdrs, blobs = b"", b""
    for paddr, vaddr, data, memsz, flags in segments:
        phdrs += struct.pack("<IIQQQQQQ", 1, flags, data_off + len(blobs), vaddr, paddr, len(data), memsz, 0x200000)
        blobs += data
    phdrs += struct.pack("<IIQQQQQQ", 4, 4, 0, 0, 0, 0, 0, 4)  # PT_NOTE
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", e_type, machine, 1, entry, phoff, 0, 0, 64, 56,
                               len(segments) + 1, 64, 0, 0)
    return ehdr + phdrs + blobs


def size_append(data: bytes) -> bytes:
    """scripts/Makefile.lib size_append: the uncompressed size as le32."""
    return struct.pack("<I", len(data) & 0xFFFFFFFF)


def lz4_legacy(data: bytes, chunk: int = 8 * MiB) -> bytes:
    """`lz4 -l` (the legacy frame): magic, then le32 block size + block, per 8 MiB of input."""
    out = struct.pack("<I", 0x184C2102)
    for i in range(0, len(data), chunk):
        block = lz4.block.compress(data[i:i + chunk], store_size=False, mode="high_compression")
        out += struct.pack("<I", len(block)) + block
    return out


def compress(fmt: str, data: bytes) -> bytes:
    """As arch/x86/boot/compressed/Makefile does it (gzip has ISIZE; the others get size_append)."""
    if fmt == "gzip":
        return gzip.compress(data, mtime=0)
    if fmt == "bzip2":
        return bz2.compress(data, 9) + size_append(data)
    if fmt == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_ALONE, preset=9) + size_append(data)
    if fmt == "xz":
        filters = [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": 9}]
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=filters) \
            + size_append(data)
    if fmt == "zstd":
        return zstandard.ZstdCompressor(level=19, write_content_size=False).compress(data) + size_append(data)
    if fmt == "lz4":
        return lz4_legacy(data) + size_append(data)
    raise AssertionError(fmt)


def make_bzimage(payload: bytes = b"", *, version=0x020F, setup_sects=4, xloadflags=0x3, loadflags=0x01,
                 kernel_alignment=0x200000, relocatable=1, init_size=0x800000, pref_address=0x1000000,
                 cmdline_size=2047, payload_offset=0x80, header_end=0x26C, boot_flag=0xAA55, magic=b"HdrS",
                 version_string=b"6.1.0-synthetic (test@example) #1 SMP") -> bytes:
    """A minimal bzImage: boot sector + setup sectors with the header at 0x1F1, then the protected-mode code."""
    real = setup_sects or 4
    setup = bytearray((real + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    setup[0x200], setup[0x201] = 0xEB, header_end - 0x202
    setup[0x202:0x206] = magic
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<H", setup, 0x20E, 0x400 - 0x200)  # kernel_version: string at file offset 0x400
    setup[0x400:0x400 + len(version_string)] = version_string
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, 0x100000)  # code32_start
    struct.pack_into("<I", setup, 0x22C, 0x7FFFFFFF)  # initrd_addr_max
    struct.pack_into("<I", setup, 0x230, kernel_alignment)
    setup[0x234] = relocatable
    setup[0x235] = 21
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    pm = bytearray(b"\xcc" * payload_offset) + payload
    pm += bytes(-len(pm) % 16 or 0)
    if version >= 0x0208:
        struct.pack_into("<II", setup, 0x248, payload_offset, len(payload))
    if version >= 0x020A:
        struct.pack_into("<QI", setup, 0x258, pref_address, init_size)
    struct.pack_into("<I", setup, 0x1F4, len(pm) // 16)  # syssize
    return bytes(setup) + bytes(pm)
