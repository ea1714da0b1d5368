"""Finding Linux's clear_bss `rep stos` instructions in a vmlinux, on ELF files built here with gcc."""
import shutil
import subprocess

import pytest
from elftools.elf.elffile import ELFFile

from cloudkvm.boot.linux_bss import bss_clear_sites

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build test ELF files")

# The shape of arch/x86/kernel/head64.c clear_bss as gcc compiles it, in .init.text, plus an unrelated
# `rep stosb` before it that must not be taken.
CLEAR_BSS = r"""
.section .init.text, "ax"
.globl _start
_start:
    lea other(%rip), %rdi
    mov $16, %ecx
    rep stosb
clear_bss:
    mov $__bss_stop, %rcx
    mov $__bss_start, %rdx
    xor %eax, %eax
    sub $__bss_start, %rcx
    mov %rdx, %rdi
site_bss:
    rep stosb
    mov $__brk_limit, %rcx
    mov $__brk_base, %rdi
    sub $__brk_base, %rcx
site_brk:
    rep stosb
    ret
.data
other: .quad 1, 2
.bss
.globl __bss_start, __bss_stop
__bss_start: .skip 0x3000
__bss_stop:
.section .brk, "aw", @nobits
.globl __brk_base, __brk_limit
__brk_base: .skip 0x1000
__brk_limit:
"""


def build_elf(tmp_path, source: str, name: str = "vmlinux"):
    src = tmp_path / f"{name}.S"
    src.write_text(source)
    out = tmp_path / name
    subprocess.run(["gcc", "-nostdlib", "-static", "-no-pie", "-o", str(out), str(src)], check=True,
                   capture_output=True)
    with open(out, "rb") as f:
        symbols = {s.name: s["st_value"] for s in ELFFile(f).get_section_by_name(".symtab").iter_symbols()}
    return out.read_bytes(), symbols


def test_both_clears_are_found_and_the_unrelated_rep_stos_is_not(tmp_path):
    data, symbols = build_elf(tmp_path, CLEAR_BSS)
    assert bss_clear_sites(data) == (symbols["site_bss"], symbols["site_brk"])


def test_an_image_without_init_text_has_no_sites(tmp_path):
    data, _ = build_elf(tmp_path, CLEAR_BSS.replace(".init.text", ".text"))
    assert bss_clear_sites(data) == ()


def test_a_rep_stos_far_from_the_address_load_is_not_taken(tmp_path):
    padded = CLEAR_BSS.replace("site_bss:\n", ".fill 64, 1, 0x90\nsite_bss:\n").replace(
        "    mov $__brk_limit", ".fill 64, 1, 0x90\n    mov $__brk_limit")
    data, symbols = build_elf(tmp_path, padded.replace("site_brk:\n", ".fill 64, 1, 0x90\nsite_brk:\n"))
    assert bss_clear_sites(data) == ()


@pytest.mark.parametrize("data", [b"", b"\x7fELF" + bytes(60), b"not an elf at all" * 10])
def test_garbage_has_no_sites(data):
    assert bss_clear_sites(data) == ()
