"""Pure builders for a 64-bit entry (Intel SDM Vol. 3A §9.8.5): GDT, identity-mapped page tables, segment values."""
import struct
from dataclasses import dataclass

PAGE = 0x1000
HUGE_2M = 0x200000
PTE_PRESENT, PTE_WRITE, PTE_PS = 1 << 0, 1 << 1, 1 << 7  # SDM Vol. 3A §4.5, tables 4-15..4-19

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1 << 0, 1 << 1, 1 << 4, 1 << 5, 1 << 16, 1 << 31  # SDM §2.5
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 5, 1 << 9, 1 << 10  # SDM §2.5
EFER_SCE, EFER_LME, EFER_LMA = 1 << 0, 1 << 8, 1 << 10  # SDM §2.2.1

# GDT layout: selectors 0x10 code, 0x18 data, 0x20 TSS — boot.rst's 64-bit protocol asks for a GDT with flat
# __BOOT_CS (0x10) and __BOOT_DS (0x18) descriptors, CS = __BOOT_CS and DS/ES/SS = __BOOT_DS.
GDT_CODE64, GDT_DATA, GDT_TSS = 2, 3, 4


@dataclass(frozen=True)
class Segment:
    """The fields of `struct kvm_segment` for one GDT descriptor."""

    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741  (the architectural name)
    g: int

    def as_kvm(self) -> dict:
        return {"base": self.base, "limit": self.limit, "selector": self.selector, "type": self.type,
                "present": self.present, "dpl": self.dpl, "db": self.db, "s": self.s, "l": self.l, "g": self.g,
                "avl": 0, "unusable": 0 if self.present else 1}


def descriptor(flags: int, base: int, limit: int) -> int:
    """An 8-byte segment descriptor (SDM Vol. 3A §3.4.5): `flags` holds the access byte and the G/DB/L nibble."""
    return (((base & 0xFF000000) << 32) | ((flags & 0xF0FF) << 40) | ((limit & 0xF0000) << 32)
            | ((base & 0x00FFFFFF) << 16) | (limit & 0xFFFF))


GDT = (
    0,
    0,
    descriptor(0xA09B, 0, 0xFFFFF),  # 64-bit code, present, DPL0, execute/read, accessed, G=1, L=1
    descriptor(0xC093, 0, 0xFFFFF),  # data, present, DPL0, read/write, accessed, G=1, D/B=1
    descriptor(0x808B, 0, 0xFFFFF),  # 64-bit TSS (busy), G=1
)


def gdt_bytes() -> bytes:
    return struct.pack(f"<{len(GDT)}Q", *GDT)


def segment_from_descriptor(index: int) -> Segment:
    """Decode GDT entry `index` back into the register form KVM wants."""
    d = GDT[index]
    base = ((d >> 16) & 0xFFFFFF) | ((d >> 32) & 0xFF000000)
    limit = (d & 0xFFFF) | ((d >> 32) & 0xF0000)
    g = (d >> 55) & 1
    return Segment(base=base, limit=(limit << 12) | 0xFFF if g else limit, selector=index * 8,
                   type=(d >> 40) & 0xF, present=(d >> 47) & 1, dpl=(d >> 45) & 3, db=(d >> 54) & 1,
                   s=(d >> 44) & 1, l=(d >> 53) & 1, g=g)


def identity_page_tables(base: int, gib: int = 4) -> bytes:
    """PML4 at `base`, one PDPT, and `gib` page directories of 2 MiB pages mapping [0, gib GiB) 1:1."""
    if not 1 <= gib <= 512 or base % PAGE:
        raise ValueError("identity map: 1..512 GiB at a page-aligned base")
    pdpt = base + PAGE
    pml4 = struct.pack("<Q", pdpt | PTE_PRESENT | PTE_WRITE).ljust(PAGE, b"\0")
    pdpt_page = b"".join(struct.pack("<Q", (base + 2 * PAGE + i * PAGE) | PTE_PRESENT | PTE_WRITE)
                         for i in range(gib)).ljust(PAGE, b"\0")
    pds = b"".join(struct.pack("<Q", (i * HUGE_2M) | PTE_PRESENT | PTE_WRITE | PTE_PS) for i in range(gib * 512))
    return pml4 + pdpt_page + pds


def page_tables_size(gib: int = 4) -> int:
    return (2 + gib) * PAGE
