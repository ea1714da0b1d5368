"""The Linux x86 boot protocol, host side: parse a bzImage or vmlinux, decompress it, build the zero page.

Spec: Documentation/x86/boot.rst and zero-page.rst, arch/x86/include/uapi/asm/bootparam.h (linux 6.1).
Everything here is pure Python over bytes; nothing touches KVM. Errors a user can cause (a wrong or broken
kernel file, an initrd that does not fit) raise CloudkvmError with a one-line message naming the file.
"""

from __future__ import annotations

import bz2
import hashlib
import lzma
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cloudkvm.cache import cache_dir
from cloudkvm.fsutil import atomic_write
from cloudkvm.errors import CloudkvmError

PAGE = 0x1000
MiB = 1 << 20
ZERO_PAGE_SIZE = 0x1000

# --- setup header (boot.rst "The Real-Mode Kernel Header") -------------------------------------------------
SETUP_HEADER_OFFSET = 0x1F1
BOOT_FLAG_OFFSET, BOOT_FLAG = 0x1FE, 0xAA55
HDRS_OFFSET, HDRS_MAGIC = 0x202, 0x53726448  # "HdrS"
VERSION_OFFSET = 0x206
MIN_PROTOCOL = 0x0206  # cmdline_size; 2.12 adds xloadflags, which the 64-bit entry needs
XLOADFLAGS_PROTOCOL = 0x020C
SYNTHETIC_PROTOCOL = 0x020F
ENTRY_64_OFFSET = 0x200  # the 64-bit entry is the protected-mode code's start + 0x200 (boot.rst "64-bit Boot Protocol")
DEFAULT_LOAD_ADDRESS = 0x100000  # LOADED_HIGH kernels without pref_address load at 1 MiB
DEFAULT_INITRD_ADDR_MAX = 0x37FFFFFF  # boot.rst: the value for protocols before 2.03
DEFAULT_CMDLINE_SIZE = 255  # boot.rst: the limit for protocols 2.05 and earlier
ELF_CMDLINE_SIZE = 2047  # x86 COMMAND_LINE_SIZE (2048) less the NUL, for a synthesised header

# loadflags and xloadflags (bootparam.h)
LOADED_HIGH, KASLR_FLAG, QUIET_FLAG, KEEP_SEGMENTS, CAN_USE_HEAP = 1 << 0, 1 << 1, 1 << 5, 1 << 6, 1 << 7
XLF_KERNEL_64, XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 0, 1 << 1
XLF_EFI_HANDOVER_32, XLF_EFI_HANDOVER_64, XLF_EFI_KEXEC = 1 << 2, 1 << 3, 1 << 4
XLF_5LEVEL, XLF_5LEVEL_ENABLED = 1 << 5, 1 << 6

# struct setup_header, packed, at 0x1F1 (field, struct code, first protocol carrying it)
_HEADER_FIELDS: tuple[tuple[str, str, int], ...] = (
    ("setup_sects", "B", 0), ("root_flags", "H", 0), ("syssize", "I", 0x0204), ("ram_size", "H", 0),
    ("vid_mode", "H", 0), ("root_dev", "H", 0), ("boot_flag", "H", 0), ("jump", "H", 0x0200),
    ("header", "I", 0x0200), ("version", "H", 0x0200), ("realmode_swtch", "I", 0x0200),
    ("start_sys_seg", "H", 0x0200), ("kernel_version", "H", 0x0200), ("type_of_loader", "B", 0x0200),
    ("loadflags", "B", 0x0200), ("setup_move_size", "H", 0x0200), ("code32_start", "I", 0x0200),
    ("ramdisk_image", "I", 0x0200), ("ramdisk_size", "I", 0x0200), ("bootsect_kludge", "I", 0x0200),
    ("heap_end_ptr", "H", 0x0201), ("ext_loader_ver", "B", 0x0202), ("ext_loader_type", "B", 0x0202),
    ("cmd_line_ptr", "I", 0x0202), ("initrd_addr_max", "I", 0x0203), ("kernel_alignment", "I", 0x0205),
    ("relocatable_kernel", "B", 0x0205), ("min_alignment", "B", 0x020A), ("xloadflags", "H", 0x020C),
    ("cmdline_size", "I", 0x0206), ("hardware_subarch", "I", 0x0207), ("hardware_subarch_data", "Q", 0x0207),
    ("payload_offset", "I", 0x0208), ("payload_length", "I", 0x0208), ("setup_data", "Q", 0x0209),
    ("pref_address", "Q", 0x020A), ("init_size", "I", 0x020A), ("handover_offset", "I", 0x020B),
    ("kernel_info_offset", "I", 0x020F),
)
_HEADER_STRUCT = struct.Struct("<" + "".join(code for _, code, _ in _HEADER_FIELDS))
SETUP_HEADER_END = SETUP_HEADER_OFFSET + _HEADER_STRUCT.size  # 0x26C
_FIELD_OFFSETS: dict[str, int] = {}
_off = SETUP_HEADER_OFFSET
for _name, _code, _ in _HEADER_FIELDS:
    _FIELD_OFFSETS[_name] = _off
    _off += struct.calcsize("<" + _code)
del _off, _name, _code

# --- zero page (zero-page.rst) -----------------------------------------------------------------------------
ZP_ACPI_RSDP_ADDR = 0x070
ZP_EXT_RAMDISK_IMAGE, ZP_EXT_RAMDISK_SIZE, ZP_EXT_CMD_LINE_PTR = 0x0C0, 0x0C4, 0x0C8
ZP_E820_ENTRIES = 0x1E8
ZP_SENTINEL = 0x1EF
ZP_HEADER_LIMIT = 0x290  # the setup header may not grow past here (edd_mbr_sig_buffer follows)
ZP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES_ZEROPAGE = 128
_E820_ENTRY = struct.Struct("<QQI")
E820_RAM, E820_RESERVED, E820_ACPI, E820_NVS = 1, 2, 3, 4
TYPE_OF_LOADER_UNDEFINED = 0xFF

# --- ELF ---------------------------------------------------------------------------------------------------
ELF_MAGIC = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
ET_REL, ET_EXEC, ET_DYN, ET_CORE = 1, 2, 3, 4
PT_LOAD = 1
EM_X86_64 = 62
_ELF_MACHINES = {
    2: "sparc", 3: "i386", 8: "mips", 20: "ppc", 21: "ppc64", 22: "s390x", 40: "arm", 42: "superh",
    43: "sparc64", 50: "ia64", 62: "x86_64", 183: "aarch64", 243: "riscv", 247: "bpf", 258: "loongarch",
}
_EHDR64 = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR64 = struct.Struct("<IIQQQQQQ")
MAX_PHDRS = 256
MIN_SEGMENT_PADDR = 0x100000  # below 1 MiB live the zero page, command line, page tables and legacy holes
MAX_SEGMENT_END = 1 << 40  # no sane vmlinux is linked to load above 1 TiB
MAX_IMAGE_SPAN = 1 << 30  # nor spans more than 1 GiB from its first byte to its last
MAX_VMLINUX_SIZE = 1 << 30  # decompression stops here (a payload that expands further is not a kernel)

_KERNEL_HINT = "pass a bzImage (e.g. /boot/vmlinuz-*) or an uncompressed x86_64 vmlinux ELF"


def _fmt_version(version: int) -> str:
    return f"{version >> 8}.{version & 0xFF:02d}"


@dataclass(frozen=True)
class SetupHeader:
    """struct setup_header (bootparam.h), as read from 0x1F1 of a bzImage or synthesised for an ELF.

    Fields the image's protocol version predates read as 0. `raw` is the header as it goes into the zero page
    at 0x1F1 (0x1F1 up to 0x202 + the byte at 0x201, capped at 0x290).
    """

    setup_sects: int = 0
    root_flags: int = 0
    syssize: int = 0
    ram_size: int = 0
    vid_mode: int = 0
    root_dev: int = 0
    boot_flag: int = 0
    jump: int = 0
    header: int = 0
    version: int = 0
    realmode_swtch: int = 0
    start_sys_seg: int = 0
    kernel_version: int = 0
    type_of_loader: int = 0
    loadflags: int = 0
    setup_move_size: int = 0
    code32_start: int = 0
    ramdisk_image: int = 0
    ramdisk_size: int = 0
    bootsect_kludge: int = 0
    heap_end_ptr: int = 0
    ext_loader_ver: int = 0
    ext_loader_type: int = 0
    cmd_line_ptr: int = 0
    initrd_addr_max: int = 0
    kernel_alignment: int = 0
    relocatable_kernel: int = 0
    min_alignment: int = 0
    xloadflags: int = 0
    cmdline_size: int = 0
    hardware_subarch: int = 0
    hardware_subarch_data: int = 0
    payload_offset: int = 0
    payload_length: int = 0
    setup_data: int = 0
    pref_address: int = 0
    init_size: int = 0
    handover_offset: int = 0
    kernel_info_offset: int = 0
    raw: bytes = field(default=b"", repr=False)
    synthetic: bool = False

    @property
    def version_str(self) -> str:
        return _fmt_version(self.version)

    @property
    def effective_initrd_addr_max(self) -> int:
        return self.initrd_addr_max if self.version >= 0x0203 and self.initrd_addr_max else DEFAULT_INITRD_ADDR_MAX

    @property
    def effective_cmdline_size(self) -> int:
        return self.cmdline_size if self.version >= 0x0206 and self.cmdline_size else DEFAULT_CMDLINE_SIZE

    @classmethod
    def from_bytes(cls, window: bytes) -> SetupHeader:
        """Decode bytes from 0x1F1 (shorter input is zero-padded; fields past `version`'s protocol are zeroed)."""
        raw = bytes(window)
        values = dict(zip((n for n, _, _ in _HEADER_FIELDS),
                          _HEADER_STRUCT.unpack(raw[:_HEADER_STRUCT.size].ljust(_HEADER_STRUCT.size, b"\0"))))
        version = values["version"] if values["header"] == HDRS_MAGIC else 0
        for name, _, since in _HEADER_FIELDS:
            if since > version:
                values[name] = 0
        return cls(**values, raw=raw)

    @classmethod
    def for_elf(cls, kernel_alignment: int, pref_address: int, init_size: int) -> SetupHeader:
        """A minimal header for a vmlinux ELF, which carries none: what the kernel's 64-bit entry reads."""
        values = {
            "boot_flag": BOOT_FLAG, "header": HDRS_MAGIC, "version": SYNTHETIC_PROTOCOL,
            "type_of_loader": TYPE_OF_LOADER_UNDEFINED, "loadflags": LOADED_HIGH,
            "initrd_addr_max": 0x7FFFFFFF, "kernel_alignment": kernel_alignment, "relocatable_kernel": 0,
            "xloadflags": XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G, "cmdline_size": ELF_CMDLINE_SIZE,
            "pref_address": pref_address, "init_size": init_size,
        }
        values["jump"] = 0xEB | ((SETUP_HEADER_END - HDRS_OFFSET) << 8)  # jmp short past the header
        raw = _HEADER_STRUCT.pack(*(values.get(name, 0) for name, _, _ in _HEADER_FIELDS))
        return cls(**values, raw=raw, synthetic=True)


@dataclass(frozen=True)
class ElfSegment:
    """One PT_LOAD program header and its file bytes."""

    paddr: int
    vaddr: int
    memsz: int
    flags: int
    align: int
    data: bytes | memoryview = field(repr=False)

    @property
    def filesz(self) -> int:
        return len(self.data)

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


@dataclass(frozen=True)
class KernelImage:
    """A parsed kernel: a bzImage (kind "bzimage") or an uncompressed vmlinux (kind "elf").

    entry: the guest-physical 64-bit entry point — for an ELF the physical address of startup_64 (vmlinux's
    e_entry is physical on x86_64); for a bzImage load_address + 0x200, valid when the protected-mode code
    (`payload`) is loaded at load_address. init_size is the memory the kernel needs from its load address
    before it reads the memory map; for an ELF, the span of its PT_LOAD segments.
    """

    kind: str
    name: str
    header: SetupHeader
    payload: bytes = field(repr=False)  # bzImage: the protected-mode code (file offset (setup_sects+1)*512)
    segments: tuple[ElfSegment, ...]
    entry: int
    load_address: int
    kernel_alignment: int
    init_size: int
    pref_address: int
    relocatable: bool
    kernel_release: str = ""  # bzImage: the kernel_version string, e.g. "6.1.0-50-cloud-amd64 (...) #1 SMP ..."

    @property
    def compressed_payload(self) -> bytes:
        """bzImage: the compressed vmlinux (payload_offset/payload_length within the protected-mode code)."""
        h = self.header
        return self.payload[h.payload_offset:h.payload_offset + h.payload_length]

    @property
    def kernel_end(self) -> int:
        """First byte above the kernel's initialisation footprint when loaded at load_address."""
        return self.load_address + max(self.init_size, len(self.payload) if self.kind == "bzimage" else 0)


def _err(name: str, what: str, hint: str = _KERNEL_HINT) -> CloudkvmError:
    return CloudkvmError(f"{name} {what}", hint)


# --- parsing ------------------------------------------------------------------------------------------------

def parse_kernel(data: bytes, name: str) -> KernelImage:
    """Parse a bzImage (boot protocol 2.12+ with a 64-bit entry) or an x86_64 vmlinux ELF64."""
    data = bytes(data)
    if not data:
        raise _err(name, "is empty")
    if data[:4] == ELF_MAGIC:
        return _parse_elf(data, name)
    return _parse_bzimage(data, name)


def _version_field_end(version: int) -> int:
    """The end of the last setup-header field that protocol `version` defines."""
    end = VERSION_OFFSET + 2
    for fname, code, since in _HEADER_FIELDS:
        if since <= version:
            end = max(end, _FIELD_OFFSETS[fname] + struct.calcsize("<" + code))
    return end


def _parse_bzimage(data: bytes, name: str) -> KernelImage:
    size = len(data)
    if size < VERSION_OFFSET + 2:
        raise _err(name, f"is truncated or not a kernel: {size} bytes is shorter than a bzImage setup header "
                         f"(0x{SETUP_HEADER_OFFSET:X}..0x{VERSION_OFFSET + 2:X}) and it is not an ELF")
    boot_flag = struct.unpack_from("<H", data, BOOT_FLAG_OFFSET)[0]
    if boot_flag != BOOT_FLAG:
        raise _err(name, f"is not a bzImage or vmlinux: wrong magic, no 0xAA55 boot flag at 0x1FE "
                         f"(found 0x{boot_flag:04X}) and no ELF header")
    hdrs = struct.unpack_from("<I", data, HDRS_OFFSET)[0]
    if hdrs != HDRS_MAGIC:
        raise _err(name, f"has wrong magic: no \"HdrS\" setup header at 0x202 (found {data[0x202:0x206]!r}); "
                         "it is a pre-2.00 zImage or not a Linux kernel")
    version = struct.unpack_from("<H", data, VERSION_OFFSET)[0]
    if version < MIN_PROTOCOL:
        raise _err(name, f"speaks boot protocol {_fmt_version(version)}, too old: 2.06 or newer is needed",
                   "use a Linux kernel from 2.6.22 or later (a 64-bit one needs 3.9+)")
    header_end = min(HDRS_OFFSET + data[0x201], ZP_HEADER_LIMIT)
    needed = _version_field_end(version)
    if size < max(header_end, needed):
        raise _err(name, f"is truncated: its setup header runs to 0x{max(header_end, needed):X} "
                         f"but the file has {size} bytes")
    if header_end < needed:
        raise _err(name, f"has a setup header ending at 0x{header_end:X} (jump at 0x200), shorter than boot "
                         f"protocol {_fmt_version(version)} needs (0x{needed:X}): the header is corrupt")
    hdr = SetupHeader.from_bytes(data[SETUP_HEADER_OFFSET:header_end])
    if version < XLOADFLAGS_PROTOCOL:
        raise _err(name, f"has no 64-bit entry point: boot protocol {hdr.version_str} predates xloadflags "
                         "(2.12)", "use a 64-bit Linux kernel 3.9 or newer")
    if not hdr.xloadflags & XLF_KERNEL_64:
        raise _err(name, f"has no 64-bit entry point: xloadflags 0x{hdr.xloadflags:X} lacks XLF_KERNEL_64 "
                         "(a 32-bit kernel?)", "use an x86_64 kernel")
    setup_sects = hdr.setup_sects or 4
    setup_size = (setup_sects + 1) * 512
    if size < setup_size:
        raise _err(name, f"is truncated: {setup_sects} setup sectors need {setup_size} bytes, the file has {size}")
    pm_size = hdr.syssize * 16
    if pm_size and size < setup_size + pm_size:
        raise _err(name, f"is truncated: the protected-mode code (syssize {hdr.syssize} paragraphs) needs "
                         f"{setup_size + pm_size} bytes, the file has {size}")
    payload = data[setup_size:setup_size + pm_size] if pm_size else data[setup_size:]
    if not payload:
        raise _err(name, "is truncated: it has no protected-mode code after the setup sectors")
    if hdr.payload_offset + hdr.payload_length > len(payload):
        raise _err(name, f"is truncated or corrupt: its payload (offset 0x{hdr.payload_offset:X}, length "
                         f"{hdr.payload_length}) runs past the protected-mode code ({len(payload)} bytes)")
    alignment = hdr.kernel_alignment
    if hdr.relocatable_kernel and (alignment == 0 or alignment & (alignment - 1)):
        raise _err(name, f"has kernel_alignment 0x{alignment:X}, which is not a power of two: the header is corrupt")
    load_address = hdr.pref_address if hdr.pref_address else DEFAULT_LOAD_ADDRESS
    if hdr.relocatable_kernel and alignment:
        load_address = (load_address + alignment - 1) & ~(alignment - 1)
    if load_address < DEFAULT_LOAD_ADDRESS or load_address + max(hdr.init_size, len(payload)) > MAX_SEGMENT_END:
        raise _err(name, f"asks to load at 0x{load_address:X} (pref_address), outside 1 MiB..1 TiB: "
                         "the header is corrupt")
    release = ""
    if hdr.kernel_version:
        start = hdr.kernel_version + 0x200
        if start < setup_size:
            end = data.find(b"\0", start, setup_size)
            release = data[start:end if end >= 0 else setup_size].decode("ascii", "replace")
    return KernelImage(kind="bzimage", name=name, header=hdr, payload=payload, segments=(),
                       entry=load_address + ENTRY_64_OFFSET, load_address=load_address,
                       kernel_alignment=alignment, init_size=hdr.init_size, pref_address=hdr.pref_address,
                       relocatable=bool(hdr.relocatable_kernel), kernel_release=release)


def _parse_elf(data: bytes, name: str) -> KernelImage:
    size = len(data)
    if size < 20:
        raise _err(name, f"is a truncated ELF: {size} bytes, shorter than the ELF identification")
    elf_class, elf_data = data[4], data[5]
    if elf_data != ELFDATA2LSB:
        raise _err(name, f"is a big-endian (or invalid, EI_DATA={elf_data}) ELF, not a little-endian x86_64 ELF")
    machine = struct.unpack_from("<H", data, 18)[0]
    if machine != EM_X86_64:
        arch = _ELF_MACHINES.get(machine, f"machine {machine}")
        hint = ("an i386 vmlinux cannot use the 64-bit entry: use an x86_64 kernel" if machine == 3
                else f"this VM is x86_64: use an x86_64 kernel, not one built for {arch}")
        bits = "a 32-bit ELF" if elf_class == ELFCLASS32 else "an ELF"
        raise _err(name, f"is {bits} for {arch}, not x86_64", hint)
    if elf_class == ELFCLASS32:
        raise _err(name, "is a 32-bit ELF (ELFCLASS32): the 64-bit entry needs an ELF64 x86_64 vmlinux",
                   "use the vmlinux of a 64-bit (x86_64) kernel build")
    if elf_class != ELFCLASS64:
        raise _err(name, f"is an ELF with an invalid class (EI_CLASS={elf_class})")
    if size < _EHDR64.size:
        raise _err(name, f"is a truncated ELF: {size} bytes, shorter than the 64-byte ELF64 header")
    (_, e_type, _, _, e_entry, e_phoff, _, _, _, e_phentsize, e_phnum, _, _, _) = _EHDR64.unpack_from(data, 0)
    view = memoryview(data)  # segments are views into `data`: a vmlinux is tens of MiB
    if e_type not in (ET_EXEC, ET_DYN):
        kind = {ET_REL: "a relocatable object (.o)", ET_CORE: "a core dump"}.get(e_type, f"of type {e_type}")
        raise _err(name, f"is an ELF {kind}, not a linked vmlinux executable")
    if e_phnum == 0:
        raise _err(name, "is an ELF without program headers: nothing to load")
    if e_phentsize != _PHDR64.size:
        raise _err(name, f"has ELF program headers of {e_phentsize} bytes, not {_PHDR64.size}: corrupt ELF")
    if e_phnum > MAX_PHDRS:
        raise _err(name, f"has {e_phnum} ELF program headers (at most {MAX_PHDRS} are sane): corrupt ELF")
    if e_phoff + e_phnum * _PHDR64.size > size:
        raise _err(name, f"is a truncated ELF: its program headers run to {e_phoff + e_phnum * _PHDR64.size}, "
                         f"the file has {size} bytes")
    segments: list[ElfSegment] = []
    for i in range(e_phnum):
        p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align = \
            _PHDR64.unpack_from(data, e_phoff + i * _PHDR64.size)
        if p_type != PT_LOAD or p_memsz == 0 and p_filesz == 0:
            continue
        if p_filesz > p_memsz:
            raise _err(name, f"has PT_LOAD segment {i} with filesz {p_filesz} > memsz {p_memsz}: corrupt ELF")
        if p_offset + p_filesz > size:
            raise _err(name, f"is truncated: PT_LOAD segment {i} needs file bytes up to {p_offset + p_filesz}, "
                             f"the file has {size}")
        if p_paddr < MIN_SEGMENT_PADDR or p_paddr + p_memsz > MAX_SEGMENT_END:
            raise _err(name, f"has PT_LOAD segment {i} at physical 0x{p_paddr:X}..0x{p_paddr + p_memsz:X}, "
                             "outside the sane range 1 MiB..1 TiB (is it a kernel linked for physical loading?)")
        segments.append(ElfSegment(paddr=p_paddr, vaddr=p_vaddr, memsz=p_memsz, flags=p_flags, align=p_align,
                                   data=view[p_offset:p_offset + p_filesz]))
    if not segments:
        raise _err(name, "is an ELF without PT_LOAD segments: nothing to load")
    ordered = sorted(segments, key=lambda s: s.paddr)
    for a, b in zip(ordered, ordered[1:]):
        if b.paddr < a.end:
            raise _err(name, f"has overlapping PT_LOAD segments at physical 0x{a.paddr:X}..0x{a.end:X} and "
                             f"0x{b.paddr:X}..0x{b.end:X}: corrupt ELF")
    start, end = ordered[0].paddr, max(s.end for s in ordered)
    if end - start > MAX_IMAGE_SPAN:
        raise _err(name, f"spans {(end - start) / MiB:.0f} MiB of physical memory (0x{start:X}..0x{end:X}), "
                         f"more than the {MAX_IMAGE_SPAN // MiB} MiB a kernel can sanely need: corrupt ELF")
    entry = _elf_entry(e_entry, segments, name)
    alignment = max((s.align for s in segments if s.align and not s.align & (s.align - 1)), default=PAGE)
    alignment = min(alignment, 1 << 30)
    hdr = SetupHeader.for_elf(kernel_alignment=alignment, pref_address=start, init_size=end - start)
    return KernelImage(kind="elf", name=name, header=hdr, payload=b"", segments=tuple(segments), entry=entry,
                       load_address=start, kernel_alignment=alignment, init_size=end - start,
                       pref_address=start, relocatable=False)


def _elf_entry(e_entry: int, segments: list[ElfSegment], name: str) -> int:
    """vmlinux's e_entry is physical (phys_startup_64); accept a virtual one that lies in a segment too."""
    for s in segments:
        if s.paddr <= e_entry < s.paddr + max(s.memsz, 1):
            return e_entry
    for s in segments:
        if s.vaddr <= e_entry < s.vaddr + max(s.memsz, 1):
            return e_entry - s.vaddr + s.paddr
    raise _err(name, f"has its ELF entry point 0x{e_entry:X} outside every PT_LOAD segment: corrupt ELF")


def load_elf_segments(image: KernelImage, memory) -> None:
    """Copy each PT_LOAD to its p_paddr in `memory` (a GuestMemory: write/fill by guest-physical address) and
    zero the rest of its p_memsz."""
    if image.kind != "elf":
        raise CloudkvmError(f"{image.name} is a bzImage, not an ELF: its segments are inside the compressed payload",
                            "decompress it first (vmlinux_cache) or load the bzImage's protected-mode code")
    for s in image.segments:
        memory.write(s.paddr, s.data)
        if s.memsz > s.filesz:
            memory.fill(s.paddr + s.filesz, s.memsz - s.filesz)


# --- decompression ------------------------------------------------------------------------------------------

_LZ4_LEGACY_MAGIC = 0x184C2102
_LZ4_CHUNK = 8 << 20
_LZMA_MEMLIMIT = 1 << 29  # the kernel's xz/lzma use dictionaries of at most 32 MiB
_FORMATS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"), (b"\x1f\x9e", "gzip"), (b"BZh", "bzip2"), (b"\x5d\x00\x00", "lzma"),
    (b"\xfd7zXZ\x00", "xz"), (struct.pack("<I", _LZ4_LEGACY_MAGIC), "lz4"), (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x89LZO\x00\r\n\x1a\n", "lzo"), (ELF_MAGIC, "elf"),
)


def payload_format(payload: bytes) -> str | None:
    """The compression of a bzImage payload from its magic bytes (boot.rst, payload_offset)."""
    for magic, fmt in _FORMATS:
        if payload.startswith(magic):
            return fmt
    return None


class _Corrupt(Exception):
    """Raised inside a decoder; turned into a CloudkvmError naming the kernel file."""


def _size_trailer_ok(out: bytes, unused: bytes) -> None:
    """Kernel payloads end with the uncompressed size as le32 (scripts/Makefile.lib size_append)."""
    if len(unused) == 4:
        expected = struct.unpack("<I", unused)[0]
        if expected != len(out) & 0xFFFFFFFF:
            raise _Corrupt(f"decompressed to {len(out)} bytes but its size trailer says {expected}")


def _stream(decoder, payload: bytes, limit: int) -> bytes:
    """Drive a zlib/lzma/bz2-style decompressor object to its end of stream."""
    out = decoder.decompress(payload, limit + 1)
    if len(out) > limit:
        raise _Corrupt(f"expands past {limit // MiB} MiB")
    if not decoder.eof:
        raise _Corrupt("is truncated (the compressed stream does not end)")
    _size_trailer_ok(out, decoder.unused_data)
    return out


def _gunzip(payload: bytes, limit: int) -> bytes:
    return _stream(zlib.decompressobj(wbits=16 + zlib.MAX_WBITS), payload, limit)


def _bunzip2(payload: bytes, limit: int) -> bytes:
    return _stream(bz2.BZ2Decompressor(), payload, limit)


def _unlzma(payload: bytes, limit: int) -> bytes:
    return _stream(lzma.LZMADecompressor(format=lzma.FORMAT_ALONE, memlimit=_LZMA_MEMLIMIT), payload, limit)


def _unxz(payload: bytes, limit: int) -> bytes:
    # The kernel's xz (scripts/xz_wrap.sh) uses CRC32 and the x86 BCJ filter in an ordinary .xz container.
    return _stream(lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=_LZMA_MEMLIMIT), payload, limit)


def _unzstd(payload: bytes, limit: int) -> bytes:
    try:
        import zstandard
    except ImportError:
        raise _Corrupt("is zstd-compressed and the Python package zstandard is not installed "
                       "(pip install zstandard)") from None
    # zstd -22 --ultra (the kernel's zstd22) uses windows up to 128 MiB; frames from a pipe carry no size.
    decoder = zstandard.ZstdDecompressor(max_window_size=1 << 28).decompressobj()
    pieces: list[bytes] = []
    total = 0
    for pos in range(0, len(payload), 4096):  # small input steps keep a decompression bomb near the limit
        if decoder.eof:
            break
        piece = decoder.decompress(payload[pos:pos + 4096])
        pieces.append(piece)
        total += len(piece)
        if total > limit:
            raise _Corrupt(f"expands past {limit // MiB} MiB")
    out = b"".join(pieces)
    if not decoder.eof:
        raise _Corrupt("is truncated (the zstd frame does not end)")
    _size_trailer_ok(out, decoder.unused_data)
    return out


def _unlz4(payload: bytes, limit: int) -> bytes:
    """The legacy lz4 format (lz4 -l): magic, then (le32 compressed size, block of <= 8 MiB output)*."""
    try:
        import lz4.block
    except ImportError:
        raise _Corrupt("is lz4-compressed and the Python package lz4 is not installed (pip install lz4)") from None
    pos, end = 4, len(payload)
    chunks: list[bytes] = []
    total = 0
    trailer: bytes = b""
    while end - pos >= 4:
        chunk_size = struct.unpack_from("<I", payload, pos)[0]
        if chunk_size == _LZ4_LEGACY_MAGIC:  # concatenated archives
            pos += 4
            continue
        if chunks and end - pos == 4:  # the size trailer appended by the kernel build
            trailer = payload[pos:]
            break
        if chunk_size == 0:
            break
        pos += 4
        if chunk_size > end - pos:
            raise _Corrupt(f"is truncated: an lz4 block of {chunk_size} bytes at offset {pos} runs past the end")
        try:
            block = lz4.block.decompress(payload[pos:pos + chunk_size], uncompressed_size=_LZ4_CHUNK)
        except Exception as exc:  # lz4.block.LZ4BlockError and friends
            raise _Corrupt(f"has a corrupt lz4 block at offset {pos}: {exc}") from None
        pos += chunk_size
        chunks.append(block)
        total += len(block)
        if total > limit:
            raise _Corrupt(f"expands past {limit // MiB} MiB")
    if not chunks:
        raise _Corrupt("is an lz4 archive with no data blocks")
    out = b"".join(chunks)
    _size_trailer_ok(out, trailer)
    return out


def _unlzo(payload: bytes, limit: int) -> bytes:
    raise _Corrupt("is LZO-compressed, which cloudkvm does not support (no LZO library for Python is used)")


_DECODERS: dict[str, Callable[[bytes, int], bytes]] = {
    "gzip": _gunzip, "bzip2": _bunzip2, "lzma": _unlzma, "xz": _unxz, "zstd": _unzstd, "lz4": _unlz4,
    "lzo": _unlzo,
}


def decompress_payload(image: KernelImage, limit: int = MAX_VMLINUX_SIZE) -> bytes:
    """The vmlinux ELF inside a bzImage's payload, decompressed on the host (gzip, bzip2, lzma, xz, lz4, zstd).

    The result is what the kernel's decompressor sees: vmlinux.bin (the ELF), possibly followed by the
    relocation table (vmlinux.relocs) that KASLR uses.
    """
    if image.kind != "bzimage":
        raise CloudkvmError(f"{image.name} is already an uncompressed ELF: there is nothing to decompress",
                            "load its segments with load_elf_segments")
    payload = image.compressed_payload
    if not payload:
        raise CloudkvmError(f"{image.name} has no payload (payload_length is 0): cannot extract vmlinux",
                            _KERNEL_HINT)
    fmt = payload_format(payload)
    if fmt is None:
        raise CloudkvmError(f"{image.name}: unknown payload compression (magic {payload[:4].hex(' ')})",
                            "supported: gzip, bzip2, lzma, xz, lz4, zstd")
    try:
        out = payload if fmt == "elf" else _DECODERS[fmt](payload, limit)
    except _Corrupt as exc:
        hint = ("rebuild the kernel with CONFIG_KERNEL_GZIP/XZ/ZSTD/LZ4 or pass its uncompressed vmlinux"
                if fmt == "lzo" else "the kernel file is damaged: fetch or build it again")
        raise CloudkvmError(f"{image.name}: the {fmt} payload {exc}", hint) from None
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError, MemoryError) as exc:
        raise CloudkvmError(f"{image.name}: the {fmt} payload is corrupt: {exc}",
                            "the kernel file is damaged: fetch or build it again") from None
    except Exception as exc:  # zstandard.ZstdError and other decoder-specific errors
        raise CloudkvmError(f"{image.name}: the {fmt} payload is corrupt: {type(exc).__name__}: {exc}",
                            "the kernel file is damaged: fetch or build it again") from None
    if out[:4] != ELF_MAGIC:
        raise CloudkvmError(f"{image.name}: the {fmt} payload decompressed to {len(out)} bytes that are not an ELF "
                            f"(they start {out[:4].hex(' ')})", "the kernel file is damaged or not a Linux bzImage")
    return out


def vmlinux_cache(kernel_path: str | os.PathLike, data: bytes | None = None) -> Path:
    """The decompressed vmlinux of a bzImage, cached as <cache>/vmlinux/<sha256[:24]>.elf (an ELF input is
    returned as is). `data`: the file's bytes, when the caller has read them already."""
    path = Path(kernel_path)
    try:
        data = path.read_bytes() if data is None else data
    except OSError as exc:
        raise CloudkvmError(f"cannot read kernel {path}: {exc.strerror or exc}", "check the path and permissions") \
            from None
    cached = cache_dir() / "vmlinux" / f"{hashlib.sha256(data).hexdigest()[:24]}.elf"
    if cached.is_file():
        return cached
    image = parse_kernel(data, str(path))
    if image.kind == "elf":
        return path
    elf = decompress_payload(image)
    parse_kernel(elf, f"{path} (decompressed vmlinux)")
    cached.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(cached, elf)


# --- zero page ----------------------------------------------------------------------------------------------

def build_boot_params(header: SetupHeader, e820: list[tuple[int, int, int]], cmdline_addr: int, cmdline_size: int,
                      initrd: tuple[int, int] | None, acpi_rsdp_addr: int | None) -> bytes:
    """The 4096-byte zero page (struct boot_params) for the 64-bit entry.

    header: the image's SetupHeader (copied to 0x1F1 as read from the bzImage, or the synthesised one for an
    ELF). e820: (address, size, type) entries, types E820_RAM/RESERVED/ACPI/NVS, at most 128. cmdline_size:
    the command line's length in bytes without its NUL (checked against the kernel's cmdline_size).
    initrd: (address, size) or None.
    """
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise ValueError(f"{len(e820)} e820 entries: the zero page holds at most {E820_MAX_ENTRIES_ZEROPAGE}")
    if cmdline_size < 0 or not 0 <= cmdline_addr < 1 << 64:
        raise ValueError(f"bad command line address/size 0x{cmdline_addr:X}/{cmdline_size}")
    if cmdline_size > header.effective_cmdline_size:
        raise CloudkvmError(f"the kernel command line is {cmdline_size} bytes; this kernel accepts at most "
                            f"{header.effective_cmdline_size}", "shorten the kernel command line")
    above_4g_ok = bool(header.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G)
    if cmdline_addr + cmdline_size >= 1 << 32 and not above_4g_ok:
        raise ValueError(f"command line at 0x{cmdline_addr:X} is above 4 GiB and the kernel lacks "
                         "XLF_CAN_BE_LOADED_ABOVE_4G")
    zp = bytearray(ZERO_PAGE_SIZE)
    raw = header.raw[:ZP_HEADER_LIMIT - SETUP_HEADER_OFFSET]
    zp[SETUP_HEADER_OFFSET:SETUP_HEADER_OFFSET + len(raw)] = raw
    zp[ZP_SENTINEL] = 0  # a clean zero page: the kernel need not sanitise anything

    def put(fmt: str, offset: int, value: int) -> None:
        struct.pack_into("<" + fmt, zp, offset, value)

    put("B", _FIELD_OFFSETS["type_of_loader"], TYPE_OF_LOADER_UNDEFINED)
    put("I", _FIELD_OFFSETS["cmd_line_ptr"], cmdline_addr & 0xFFFFFFFF)
    put("I", ZP_EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    if initrd is not None:
        addr, size = initrd
        if addr < 0 or size < 0 or addr + size > 1 << 64 or size >= 1 << 64:
            raise ValueError(f"bad initrd placement 0x{addr:X}+{size}")
        if size and addr + size - 1 > header.effective_initrd_addr_max and not above_4g_ok:
            raise ValueError(f"initrd at 0x{addr:X}..0x{addr + size:X} is above the kernel's initrd_addr_max "
                             f"0x{header.effective_initrd_addr_max:X}")
        put("I", _FIELD_OFFSETS["ramdisk_image"], addr & 0xFFFFFFFF)
        put("I", _FIELD_OFFSETS["ramdisk_size"], size & 0xFFFFFFFF)
        put("I", ZP_EXT_RAMDISK_IMAGE, addr >> 32)
        put("I", ZP_EXT_RAMDISK_SIZE, size >> 32)
    else:
        put("I", _FIELD_OFFSETS["ramdisk_image"], 0)
        put("I", _FIELD_OFFSETS["ramdisk_size"], 0)
    put("Q", ZP_ACPI_RSDP_ADDR, acpi_rsdp_addr or 0)
    zp[ZP_E820_ENTRIES] = len(e820)
    for i, (addr, size, kind) in enumerate(e820):
        if addr < 0 or size < 0 or addr + size > 1 << 64 or not 0 <= kind < 1 << 32:
            raise ValueError(f"bad e820 entry {i}: 0x{addr:X}+0x{size:X} type {kind}")
        _E820_ENTRY.pack_into(zp, ZP_E820_TABLE + i * _E820_ENTRY.size, addr, size, kind)
    return bytes(zp)


def initrd_placement(initrd_size: int, ram_top_below_4g: int, initrd_addr_max: int, kernel_end: int) -> int:
    """The page-aligned address for an initrd: as high as possible, ending at or below
    min(ram_top_below_4g, initrd_addr_max + 1), and starting at or above the (page-rounded) kernel end."""
    if initrd_size < 0:
        raise ValueError(f"negative initrd size {initrd_size}")
    top = min(ram_top_below_4g, initrd_addr_max + 1, 1 << 32)
    floor = (kernel_end + PAGE - 1) & ~(PAGE - 1)
    addr = (top - initrd_size) & ~(PAGE - 1)
    if initrd_size > top or addr < floor:
        raise CloudkvmError(f"initrd of {initrd_size / MiB:.1f} MiB does not fit below 0x{top:X} above the kernel "
                            f"(which ends at 0x{kernel_end:X})", "give the VM more memory")
    return addr
