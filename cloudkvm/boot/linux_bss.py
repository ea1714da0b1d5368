"""Finds where an x86_64 vmlinux clears its .bss and .brk (arch/x86/kernel/head64.c `clear_bss`).

Linux's first C code zeroes both regions with inlined `rep stos`. Guest RAM is zero when a VM starts, so on a KVM
that interprets guest kernel code the VMM can finish those instructions at once at a hardware breakpoint
(`boards/x86/complete.complete_zero_store`, which checks the memory really is zero). This module only says where
to put the breakpoints: a wrong guess costs nothing but the breakpoint, because the completion verifies everything."""
import io
import struct

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

REP_STOS = (b"\xf3\xaa", b"\xf3\xab", b"\xf3\x48\xab")  # rep stosb / stosd / stosq (SDM Vol. 2B "STOS")
CLEARED_SECTIONS = (".bss", ".brk")
LOOKBEHIND = 48  # bytes before the `rep stos` in which the region's start address must appear as an imm32
MAX_SITES = 4    # x86 has four breakpoint address registers (DR0-DR3)


def _rep_stos_offsets(text: bytes) -> list[int]:
    found = []
    for opcode in REP_STOS:
        pos = text.find(opcode)
        while pos >= 0:
            found.append(pos)
            pos = text.find(opcode, pos + 1)
    return sorted(found)


def _site_for(text: bytes, offsets: list[int], start: int, taken: list[int]) -> int | None:
    """Offset of the first untaken `rep stos` shortly preceded by `start` as a sign-extended imm32."""
    if start >> 31 not in (0, (1 << 33) - 1):  # not expressible as a sign-extended imm32: no inline clear
        return None
    imm = struct.pack("<I", start & 0xFFFFFFFF)
    return next((pos for pos in offsets if pos not in taken and imm in text[max(0, pos - LOOKBEHIND):pos]), None)


def bss_clear_sites(vmlinux: bytes) -> tuple[int, ...]:
    """Guest-virtual addresses of the `rep stos` instructions that clear .bss and .brk, in that order; empty when
    the image has no section headers or the code does not look like Linux's `clear_bss`."""
    try:
        elf = ELFFile(io.BytesIO(vmlinux))
        text = elf.get_section_by_name(".init.text")
        if text is None or text["sh_type"] != "SHT_PROGBITS":
            return ()
        code = text.data()
        offsets = _rep_stos_offsets(code)
        taken: list[int] = []
        for name in CLEARED_SECTIONS:
            section = elf.get_section_by_name(name)
            if section is not None and section["sh_size"]:
                site = _site_for(code, offsets, section["sh_addr"], taken)
                if site is not None:
                    taken.append(site)
        return tuple(text["sh_addr"] + pos for pos in taken[:MAX_SITES])
    except (ELFError, struct.error, ValueError):
        return ()
