"""The arm64 Linux boot protocol, host side: the `Image` header, host-side gunzip, and where the kernel, DTB and
initrd go in RAM (Documentation/arch/arm64/booting.rst, linux 6.1: §3 "Setup the device tree", §4 "Decompress
the kernel image", §5 "Call the kernel image", §2 initrd placement).

Pure Python over bytes. A wrong or broken kernel file is a one-line CloudkvmError naming the file."""

from __future__ import annotations

import errno

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from cloudkvm.errors import CloudkvmError
from cloudkvm.fsutil import read_bounded

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# booting.rst §4: the 64-byte header at the start of the Image
HEADER_SIZE = 64
_HEADER = struct.Struct("<IIQQQQQQII")  # code0 code1 text_offset image_size flags res2 res3 res4 magic res5
ARM64_MAGIC = 0x644D5241  # "ARM\x64", little-endian, at offset 0x38
MAGIC_OFFSET = 0x38
FLAG_BIG_ENDIAN = 1 << 0  # bit 0: kernel endianness, 1 = big-endian
FLAG_PAGE_SIZE_SHIFT, FLAG_PAGE_SIZE_MASK = 1, 0b11  # bits 1-2: 0 unspecified, 1 = 4K, 2 = 16K, 3 = 64K
FLAG_PHYS_PLACEMENT = 1 << 3  # bit 3: 1 = the 2 MiB aligned base may be anywhere in physical memory
PAGE_SIZES = {0: None, 1: 4 * KiB, 2: 16 * KiB, 3: 64 * KiB}
LEGACY_TEXT_OFFSET = 0x80000  # §4: before v3.17 image_size is 0 and text_offset is to be taken as 0x80000
KERNEL_ALIGN = 2 * MiB  # §4: "placed text_offset bytes from a 2MB aligned base address"
DTB_MAX_SIZE = 2 * MiB  # §3: the dtb "must not exceed 2 megabytes in size"
DTB_ALIGN = 8  # §3: "placed on an 8-byte boundary"
INITRD_WINDOW_ALIGN, INITRD_WINDOW_SIZE = 1 * GiB, 32 * GiB  # §2: 1 GB aligned window of up to 32 GB with the Image
INITRD_ALIGN = 4 * KiB  # page-aligned, as other loaders do (booting.rst asks no alignment)

# Our own sanity bounds (not from booting.rst)
MAX_IMAGE_SIZE = 512 * MiB  # an Image (or what a gzip'd one expands to) larger than this is not a kernel
LEGACY_SIZE_SLACK = 32 * MiB  # image_size 0: assume the file plus this much (.bss, early page tables) is needed
GZIP_MAGIC = b"\x1f\x8b"
ZBOOT_MAGIC_OFFSET, ZBOOT_MAGIC = 4, b"zimg"  # EFI zboot (drivers/firmware/efi/libstub/zboot-header.S)

_HINT = "give an arm64 Linux `Image` (Debian's /boot/vmlinuz-*-arm64) or a gzip'd one (Image.gz)"


@dataclass(frozen=True)
class ImageHeader:
    """The fields of an arm64 Image header (booting.rst §4); `image_size` is as stored (0 on old kernels)."""
    code0: int
    code1: int
    text_offset: int
    image_size: int
    flags: int
    res2: int
    res3: int
    res4: int
    magic: int
    res5: int  # the PE/COFF header offset on EFI-stub kernels

    @property
    def big_endian(self) -> bool:
        return bool(self.flags & FLAG_BIG_ENDIAN)

    @property
    def page_size(self) -> int | None:
        """4096, 16384 or 65536; None when the kernel does not say."""
        return PAGE_SIZES[(self.flags >> FLAG_PAGE_SIZE_SHIFT) & FLAG_PAGE_SIZE_MASK]

    @property
    def place_anywhere(self) -> bool:
        """Flag bit 3: the kernel may sit anywhere in RAM (else as close as possible to the base of DRAM)."""
        return bool(self.flags & FLAG_PHYS_PLACEMENT)

    @property
    def legacy(self) -> bool:
        """A pre-3.17 header: image_size is 0 and text_offset means 0x80000."""
        return self.image_size == 0


@dataclass(frozen=True)
class Arm64Image:
    """A parsed kernel: the (decompressed) Image bytes, its header, and how it was stored in the file."""
    name: str
    data: bytes
    header: ImageHeader
    compression: str | None  # None for a plain Image, "gzip" for Image.gz

    @property
    def text_offset(self) -> int:
        return LEGACY_TEXT_OFFSET if self.header.legacy else self.header.text_offset

    @property
    def effective_size(self) -> int:
        """Bytes from the image's first byte that must be free for the kernel (image_size, never less than the
        file; for a legacy header the file plus LEGACY_SIZE_SLACK, rounded up to 2 MiB)."""
        if self.header.legacy:
            return _align_up(len(self.data) + LEGACY_SIZE_SLACK, KERNEL_ALIGN)
        return max(self.header.image_size, len(self.data))


@dataclass(frozen=True)
class Arm64Placement:
    """Where everything goes in guest physical memory; the vCPU starts at `entry` with x0 = `dtb_addr`."""
    ram_base: int
    ram_size: int
    kernel_addr: int  # the 2 MiB aligned base + text_offset: where the Image's first byte goes
    kernel_end: int  # kernel_addr + the Image's effective size (kept free)
    dtb_addr: int  # 8-byte (here 2 MiB) aligned; DTB_MAX_SIZE bytes are set aside from here
    dtb_max_size: int
    initrd_addr: int | None
    initrd_size: int

    @property
    def entry(self) -> int:
        return self.kernel_addr

    @property
    def initrd_end(self) -> int | None:
        return None if self.initrd_addr is None else self.initrd_addr + self.initrd_size


def _align_up(value: int, align: int) -> int:
    return -(-value // align) * align


def _align_down(value: int, align: int) -> int:
    return value // align * align


def _err(name: str, what: str, hint: str = _HINT) -> CloudkvmError:
    return CloudkvmError(f"{name} {what}", hint)


def parse_header(data: bytes, name: str) -> ImageHeader:
    """The header of an uncompressed Image; refuses a short file, a bad magic, a big-endian kernel and an
    image_size or text_offset no kernel has."""
    if len(data) < HEADER_SIZE:
        raise _err(name, f"is truncated: {len(data)} bytes, shorter than the {HEADER_SIZE}-byte arm64 Image header")
    header = ImageHeader(*_HEADER.unpack_from(data, 0))
    if header.magic != ARM64_MAGIC:
        found = data[MAGIC_OFFSET:MAGIC_OFFSET + 4]
        raise _err(name, f"is not an arm64 Linux Image: magic at 0x38 is {found!r}, not b'ARM\\x64'")
    if header.big_endian:
        raise _err(name, "is a big-endian arm64 kernel (header flags bit 0): only little-endian kernels boot here",
                   "build the kernel without CONFIG_CPU_BIG_ENDIAN")
    if header.image_size and not HEADER_SIZE <= header.image_size <= MAX_IMAGE_SIZE:
        raise _err(name, f"has an absurd image_size {header.image_size:#x} in its header "
                         f"(a kernel needs between {HEADER_SIZE} bytes and {MAX_IMAGE_SIZE // MiB} MiB): corrupt Image")
    if header.text_offset >= KERNEL_ALIGN:
        raise _err(name, f"has text_offset {header.text_offset:#x}, not below the 2 MiB alignment of its base: "
                         "corrupt Image")
    return header


def gunzip_image(data: bytes, name: str, limit: int = MAX_IMAGE_SIZE) -> bytes:
    """A gzip'd Image expanded on the host, refusing to expand past `limit` bytes or a damaged stream."""
    decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = decoder.decompress(data, limit + 1)
    except zlib.error as e:
        raise _err(name, f"is a damaged gzip stream ({e})") from None
    if len(out) > limit:
        raise _err(name, f"expands past {limit // MiB} MiB when gunzipped: not a kernel Image")
    if not decoder.eof:
        raise _err(name, "is a truncated gzip stream (it ends before its end-of-stream marker)")
    return out


def parse_image(data: bytes, name: str) -> Arm64Image:
    """A plain or gzip'd arm64 Image from its bytes (the file's contents); `name` is used in errors."""
    data = bytes(data)
    compression = None
    if data[:2] == GZIP_MAGIC:
        data, compression = gunzip_image(data, name), "gzip"
    elif data[:2] == b"MZ" and data[ZBOOT_MAGIC_OFFSET:ZBOOT_MAGIC_OFFSET + 4] == ZBOOT_MAGIC:
        kind = data[0x18:0x38].split(b"\0", 1)[0].decode("ascii", "replace")
        raise _err(name, f"is an EFI zboot image ({kind}-compressed), which needs EFI firmware to unpack",
                   "extract the Image from it (e.g. with the kernel's scripts/extract-vmlinux) or boot the distro's "
                   "uncompressed Image")
    return Arm64Image(name, data, parse_header(data, name), compression)


def load_image(path: str | Path) -> Arm64Image:
    """Read and parse a kernel file (a regular file, at most MAX_IMAGE_SIZE bytes)."""
    name = str(path)
    try:
        data = read_bounded(path, MAX_IMAGE_SIZE, follow_symlinks=True)
    except OSError as e:
        if e.errno == errno.EFBIG:
            raise _err(name, f"is larger than {MAX_IMAGE_SIZE // MiB} MiB: not a kernel Image") from None
        raise _err(name, f"cannot be read: {e.strerror or e}", "check the kernel path in the profile") from None
    return parse_image(data, name)


def place(image: Arm64Image, ram_base: int, ram_size: int, initrd_size: int | None = None) -> Arm64Placement:
    """Kernel at RAM's first 2 MiB aligned base + text_offset (which satisfies both meanings of flag bit 3); the
    DTB in the top 2 MiB aligned 2 MiB of RAM; the initrd page-aligned just below it, inside the 1 GiB aligned
    32 GiB window that holds the kernel (booting.rst §2-§4). Refuses (one line) when RAM is too small."""
    name = image.name
    base = _align_up(ram_base, KERNEL_ALIGN)
    ram_end = ram_base + ram_size
    kernel_addr = base + image.text_offset
    kernel_end = kernel_addr + image.effective_size
    dtb_addr = _align_down(ram_end - DTB_MAX_SIZE, KERNEL_ALIGN)  # a 2 MiB block of its own: mapped as one block
    if dtb_addr < kernel_end:
        need = _align_up(kernel_end - ram_base, MiB) // MiB + 2 * DTB_MAX_SIZE // MiB
        raise CloudkvmError(f"{name} needs {image.effective_size // MiB} MiB at {kernel_addr:#x} and the device tree "
                            f"{DTB_MAX_SIZE // MiB} MiB above it: {ram_size // MiB} MiB of RAM is too little",
                            f"give the VM at least {need} MiB of memory")
    initrd_addr = None
    size = initrd_size or 0
    if initrd_size is not None:
        window_end = _align_down(kernel_addr, INITRD_WINDOW_ALIGN) + INITRD_WINDOW_SIZE
        top = min(dtb_addr, window_end)
        initrd_addr = _align_down(top - size, INITRD_ALIGN)
        if initrd_addr < kernel_end:
            room = max(0, top - _align_up(kernel_end, INITRD_ALIGN))
            raise CloudkvmError(f"the initrd ({size} bytes) does not fit between {name} (ending at {kernel_end:#x}) "
                                f"and the device tree: {room} bytes of room",
                                "give the VM more memory or use a smaller initrd")
    return Arm64Placement(ram_base, ram_size, kernel_addr, kernel_end, dtb_addr, DTB_MAX_SIZE, initrd_addr, size)


def check_dtb(dtb: bytes, placement: Arm64Placement) -> None:
    """A built DTB fits the space `place` set aside (booting.rst §3: at most 2 MiB)."""
    if len(dtb) > placement.dtb_max_size:
        raise CloudkvmError(f"the device tree is {len(dtb)} bytes: booting.rst allows at most "
                            f"{placement.dtb_max_size} bytes", "use fewer vCPUs or devices, or a shorter command line")
