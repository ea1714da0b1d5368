"""x86_longmode: GDT descriptors (SDM Vol. 3A §3.4.5), their kvm_segment decoding, and identity page tables
walked the way the MMU walks them (SDM Vol. 3A §4.5)."""
import functools
import struct
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudkvm.boot import x86_longmode as lm

ADDR_MASK = 0x000F_FFFF_FFFF_F000  # bits 51:12 of a paging-structure entry
PD_2M_MASK = 0x000F_FFFF_FFE0_0000  # bits 51:21 of a PDE that maps a 2 MiB page


def reference_descriptor(base, limit, access, flags_nibble):
    """The descriptor built byte by byte from the SDM figure 3-8, independently of the module's shifts."""
    raw = bytes([limit & 0xFF, (limit >> 8) & 0xFF,
                 base & 0xFF, (base >> 8) & 0xFF, (base >> 16) & 0xFF,
                 access,
                 ((flags_nibble & 0xF) << 4) | ((limit >> 16) & 0xF),
                 (base >> 24) & 0xFF])
    return struct.unpack("<Q", raw)[0]


def test_well_known_flat_descriptors():
    assert lm.descriptor(0xA09B, 0, 0xFFFFF) == 0x00AF9B000000FFFF  # 64-bit code
    assert lm.descriptor(0xC093, 0, 0xFFFFF) == 0x00CF93000000FFFF  # flat data
    assert lm.descriptor(0x808B, 0, 0xFFFFF) == 0x008F8B000000FFFF  # busy TSS, G=1
    assert lm.descriptor(0xC09B, 0, 0xFFFFF) == 0x00CF9B000000FFFF  # 32-bit flat code (Linux __BOOT_CS)


def test_gdt_table_holds_the_well_known_values():
    assert lm.GDT == (0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x008F8B000000FFFF)
    assert (lm.GDT_CODE64, lm.GDT_DATA, lm.GDT_TSS) == (2, 3, 4)


def test_gdt_bytes_is_the_little_endian_table():
    raw = lm.gdt_bytes()
    assert len(raw) == 8 * len(lm.GDT)
    assert raw[:16] == bytes(16)
    assert raw[16:24] == bytes.fromhex("ffff0000009baf00")
    assert struct.unpack("<5Q", raw) == lm.GDT


def test_descriptor_places_base_and_limit_fields():
    d = lm.descriptor(0x4093, 0x12345678, 0xABCDE)
    assert d == reference_descriptor(0x12345678, 0xABCDE, 0x93, 0x4)
    assert d == 0x124A_9334_5678_BCDE


def test_descriptor_masks_out_of_range_inputs():
    # base above 32 bits, limit above 20 bits and flag bits 8-11 (where the limit's top nibble lives) are dropped
    assert lm.descriptor(0xCF93, 0x1_0000_0000, 0xFFFFF) == lm.descriptor(0xC093, 0, 0xFFFFF)
    assert lm.descriptor(0xC093, 0, 0x1FFFFF) == lm.descriptor(0xC093, 0, 0xFFFFF)


@given(base=st.integers(0, 0xFFFFFFFF), limit=st.integers(0, 0xFFFFF), access=st.integers(0, 0xFF),
       nibble=st.integers(0, 0xF))
def test_descriptor_matches_the_byte_layout(base, limit, access, nibble):
    assert lm.descriptor((nibble << 12) | access, base, limit) == reference_descriptor(base, limit, access, nibble)


def test_code_data_and_tss_segments():
    code = lm.segment_from_descriptor(lm.GDT_CODE64)
    assert code == lm.Segment(base=0, limit=0xFFFFFFFF, selector=0x10, type=0xB, present=1, dpl=0, db=0, s=1,
                              l=1, g=1)
    data = lm.segment_from_descriptor(lm.GDT_DATA)
    assert data == lm.Segment(base=0, limit=0xFFFFFFFF, selector=0x18, type=0x3, present=1, dpl=0, db=1, s=1,
                              l=0, g=1)
    tss = lm.segment_from_descriptor(lm.GDT_TSS)
    assert tss == lm.Segment(base=0, limit=0xFFFFFFFF, selector=0x20, type=0xB, present=1, dpl=0, db=0, s=0,
                             l=0, g=1)


def test_null_descriptor_is_not_present_and_unusable_for_kvm():
    null = lm.segment_from_descriptor(0)
    assert null.present == 0 and null.selector == 0
    assert null.as_kvm()["unusable"] == 1


def test_as_kvm_has_every_kvm_segment_field():
    k = lm.segment_from_descriptor(lm.GDT_CODE64).as_kvm()
    assert k == {"base": 0, "limit": 0xFFFFFFFF, "selector": 0x10, "type": 0xB, "present": 1, "dpl": 0, "db": 0,
                 "s": 1, "l": 1, "g": 1, "avl": 0, "unusable": 0}


def _reencode(seg: lm.Segment) -> int:
    raw_limit = seg.limit >> 12 if seg.g else seg.limit
    flags = (seg.type | seg.s << 4 | seg.dpl << 5 | seg.present << 7 | seg.l << 13 | seg.db << 14 | seg.g << 15)
    return lm.descriptor(flags, seg.base, raw_limit)


@pytest.mark.parametrize("index", range(len(lm.GDT)))
def test_segment_from_descriptor_round_trips_the_gdt(index):
    assert _reencode(lm.segment_from_descriptor(index)) == lm.GDT[index]


@settings(max_examples=300)
@given(base=st.integers(0, 0xFFFFFFFF), limit=st.integers(0, 0xFFFFF), typ=st.integers(0, 0xF),
       s=st.integers(0, 1), dpl=st.integers(0, 3), p=st.integers(0, 1), l_bit=st.integers(0, 1),
       db=st.integers(0, 1), g=st.integers(0, 1), index=st.integers(0, 7))
def test_segment_from_descriptor_decodes_any_descriptor(base, limit, typ, s, dpl, p, l_bit, db, g, index):
    flags = typ | s << 4 | dpl << 5 | p << 7 | l_bit << 13 | db << 14 | g << 15
    d = lm.descriptor(flags, base, limit)
    gdt = tuple(d if i == index else 0 for i in range(8))
    with mock.patch.object(lm, "GDT", gdt):
        seg = lm.segment_from_descriptor(index)
    assert seg == lm.Segment(base=base, limit=(limit << 12) | 0xFFF if g else limit, selector=index * 8,
                             type=typ, present=p, dpl=dpl, db=db, s=s, l=l_bit, g=g)
    assert _reencode(seg) == d


def test_control_register_bits_are_architectural():
    assert (lm.CR0_PE, lm.CR0_MP, lm.CR0_ET, lm.CR0_NE, lm.CR0_WP, lm.CR0_PG) == (
        0x1, 0x2, 0x10, 0x20, 0x10000, 0x80000000)
    assert (lm.CR4_PAE, lm.CR4_OSFXSR, lm.CR4_OSXMMEXCPT) == (0x20, 0x200, 0x400)
    assert (lm.EFER_SCE, lm.EFER_LME, lm.EFER_LMA) == (0x1, 0x100, 0x400)
    assert (lm.PTE_PRESENT, lm.PTE_WRITE, lm.PTE_PS) == (0x1, 0x2, 0x80)


# --- identity page tables ---------------------------------------------------------------------------------

class Walker:
    """A 4-level walk over the table bytes placed at guest-physical `base` (anything else is 'not RAM')."""

    def __init__(self, tables: bytes, base: int):
        self.tables, self.base = tables, base

    def entry(self, table_gpa: int, index: int) -> int:
        off = table_gpa - self.base + 8 * index
        assert table_gpa % lm.PAGE == 0, f"table at 0x{table_gpa:x} not page aligned"
        assert 0 <= off and off + 8 <= len(self.tables), f"table at 0x{table_gpa:x} is outside the tables"
        return struct.unpack_from("<Q", self.tables, off)[0]

    def translate(self, va: int) -> int | None:
        pml4e = self.entry(self.base, (va >> 39) & 511)
        if not pml4e & lm.PTE_PRESENT:
            return None
        assert pml4e & lm.PTE_WRITE and not pml4e & lm.PTE_PS
        pdpte = self.entry(pml4e & ADDR_MASK, (va >> 30) & 511)
        if not pdpte & lm.PTE_PRESENT:
            return None
        assert pdpte & lm.PTE_WRITE and not pdpte & lm.PTE_PS  # not a 1 GiB page: points at a PD
        pde = self.entry(pdpte & ADDR_MASK, (va >> 21) & 511)
        if not pde & lm.PTE_PRESENT:
            return None
        assert pde & lm.PTE_WRITE and pde & lm.PTE_PS  # a 2 MiB page
        assert pde & 0x1FE000 == 0, "reserved bits 20:13 of a 2 MiB PDE must be zero"
        return (pde & PD_2M_MASK) | (va & 0x1FFFFF)


@pytest.mark.parametrize("base,gib", [(0x9000, 4), (0, 1), (0x100000, 8)])
def test_table_size_and_layout(base, gib):
    t = lm.identity_page_tables(base, gib)
    assert len(t) == lm.page_tables_size(gib) == (2 + gib) * lm.PAGE
    pml4 = struct.unpack_from("<512Q", t, 0)
    assert pml4[0] == (base + lm.PAGE) | lm.PTE_PRESENT | lm.PTE_WRITE
    assert not any(pml4[1:])
    pdpt = struct.unpack_from("<512Q", t, lm.PAGE)
    assert [e & ADDR_MASK for e in pdpt[:gib]] == [base + (2 + i) * lm.PAGE for i in range(gib)]
    assert all(e & 0xFFF == lm.PTE_PRESENT | lm.PTE_WRITE for e in pdpt[:gib])
    assert not any(pdpt[gib:])


def test_default_is_four_gib():
    assert lm.identity_page_tables(0x9000) == lm.identity_page_tables(0x9000, 4)
    assert lm.page_tables_size() == 6 * lm.PAGE


@settings(max_examples=500)
@given(va=st.integers(0, (4 << 30) - 1))
def test_walk_is_identity_below_4gib(va):
    w = Walker(_tables(0x9000, 4), 0x9000)
    assert w.translate(va) == va


def test_walk_is_identity_at_page_boundaries_and_unmapped_beyond():
    base = 0x20000
    w = Walker(lm.identity_page_tables(base, 4), base)
    for va in (0, 0x1FFFFF, 0x200000, (1 << 30) - 1, 1 << 30, (4 << 30) - 1):
        assert w.translate(va) == va
    assert w.translate(4 << 30) is None          # PDPT entry 4 is not present
    assert w.translate((512 << 30) - 1) is None
    assert w.translate(512 << 30) is None        # PML4 entry 1 is not present


@functools.lru_cache(maxsize=None)
def _tables(base: int, gib: int) -> bytes:
    return lm.identity_page_tables(base, gib)


@settings(max_examples=300)
@given(base=st.sampled_from([0, 0x1000, 0x9000, 0x7F_F000]), gib=st.sampled_from([1, 2, 3, 7, 64, 511, 512]),
       data=st.data())
def test_walk_is_identity_for_any_size(base, gib, data):
    w = Walker(_tables(base, gib), base)
    va = data.draw(st.integers(0, (gib << 30) - 1))
    assert w.translate(va) == va
    if gib < 512:
        assert w.translate(data.draw(st.integers(gib << 30, (512 << 30) - 1))) is None


@pytest.mark.parametrize("base,gib", [(0x9000, 0), (0x9000, -1), (0x9000, 513), (0x9001, 4), (0x800, 1)])
def test_bad_arguments_raise(base, gib):
    with pytest.raises(ValueError):
        lm.identity_page_tables(base, gib)
