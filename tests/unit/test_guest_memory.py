"""GuestMemory: the one bounds-checked accessor for guest-physical RAM; nothing outside a region is reachable."""
import ctypes
import mmap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudkvm.errors import GuestMemoryError
from cloudkvm.kvm.memory import GuestMemory
from cloudkvm.kvm.native import ffi

MiB, GiB = 1 << 20, 1 << 30
LOW = (0, 1 * MiB)
HIGH = (4 * GiB, 2 * MiB)
PAGE = mmap.PAGESIZE


@pytest.fixture
def one():
    m = GuestMemory([LOW])
    yield m
    m.close()


@pytest.fixture
def two():
    m = GuestMemory([HIGH, LOW])  # unsorted on purpose: the layout is sorted
    yield m
    m.close()


def test_layout_is_sorted_and_sized(two):
    assert [(r.gpa, r.size) for r in two.regions] == [LOW, HIGH]
    assert two.size == 3 * MiB
    assert [r.end for r in two.regions] == [1 * MiB, 4 * GiB + 2 * MiB]


def test_fresh_memory_is_zero(two):
    assert two.read(0, 16) == bytes(16)
    assert two.read(4 * GiB + 2 * MiB - 16, 16) == bytes(16)


@pytest.mark.parametrize("gpa", [0, 0x1234, 1 * MiB - 8, 4 * GiB, 4 * GiB + 0x5555, 4 * GiB + 2 * MiB - 8])
def test_round_trips_at_region_edges_and_inside(two, gpa):
    two.write(gpa, b"\x01\x02\x03\x04\x05\x06\x07\x08")
    assert two.read(gpa, 8) == b"\x01\x02\x03\x04\x05\x06\x07\x08"
    assert bytes(two.view(gpa, 8)) == b"\x01\x02\x03\x04\x05\x06\x07\x08"
    assert two.read_u64(gpa) == 0x0807060504030201
    assert two.read_u32(gpa) == 0x04030201
    assert two.read_u32(gpa + 4) == 0x08070605
    assert two.read_u16(gpa + 6) == 0x0807

    two.write_u16(gpa, 0xBEEF)
    assert two.read(gpa, 2) == b"\xef\xbe"
    assert two.read_u16(gpa) == 0xBEEF
    two.write_u32(gpa, 0x11223344)
    assert two.read(gpa, 4) == b"\x44\x33\x22\x11"
    assert two.read_u32(gpa) == 0x11223344
    two.write_u64(gpa, 0xFEDCBA9876543210)
    assert two.read(gpa, 8) == bytes.fromhex("1032547698badcfe")
    assert two.read_u64(gpa) == 0xFEDCBA9876543210

    two.fill(gpa, 8, 0x5A)
    assert two.read(gpa, 8) == b"\x5a" * 8
    two.fill(gpa, 8)
    assert two.read(gpa, 8) == bytes(8)


def test_last_byte_of_each_region_is_reachable(two):
    for r in two.regions:
        two.write(r.end - 1, b"\x99")
        assert two.read(r.end - 1, 1) == b"\x99"
        assert two.read(r.end - 2, 2) == b"\x00\x99"


def test_regions_are_independent(two):
    two.write(0x100, b"low")
    two.write(4 * GiB + 0x100, b"HIGH")
    assert two.read(0x100, 3) == b"low"
    assert two.read(4 * GiB + 0x100, 4) == b"HIGH"


def test_view_is_zero_copy_both_ways(one):
    v = one.view(0x2000, 4)
    v[:] = b"abcd"
    assert one.read(0x2000, 4) == b"abcd"
    one.write(0x2001, b"Z")
    assert bytes(v) == b"aZcd"
    assert len(v) == 4
    v.release()


def test_fill_only_touches_its_range(one):
    one.fill(0x1000, 0x20, 0xFF)
    assert one.read(0xFFF, 1) == b"\x00"
    assert one.read(0x1000, 0x20) == b"\xff" * 0x20
    assert one.read(0x1020, 1) == b"\x00"


def test_zero_length_access_inside_ram(one):
    assert one.read(0x10, 0) == b""
    one.write(0x10, b"")
    one.fill(0x10, 0, 0xAA)
    assert one.read(0x10, 1) == b"\x00"


def test_host_addr_points_at_the_same_bytes(two):
    two.write(4 * GiB + 0x40, b"host-visible")
    host = two.regions[1].host_addr
    assert ctypes.string_at(host + 0x40, 12) == b"host-visible"
    ctypes.memmove(two.regions[0].host_addr + 0x80, b"from-host", 9)
    assert two.read(0x80, 9) == b"from-host"


def test_contains(two):
    assert two.contains(0)
    assert two.contains(0, 1 * MiB)
    assert two.contains(1 * MiB - 1)
    assert not two.contains(1 * MiB - 1, 2)       # crosses the end of low RAM
    assert not two.contains(1 * MiB)              # the hole
    assert not two.contains(2 * GiB)
    assert not two.contains(4 * GiB - 1)
    assert two.contains(4 * GiB, 2 * MiB)
    assert not two.contains(4 * GiB, 2 * MiB + 1)
    assert not two.contains(4 * GiB + 2 * MiB)    # beyond RAM
    assert not two.contains(-1)
    assert not two.contains(0, -1)
    assert not two.contains(1 * MiB - 4, 4 * GiB)  # spans both regions and the hole


# (gpa, length) pairs no access may touch in the two-region layout
BAD_RANGES = [
    (1 * MiB - 1, 2),                 # crosses the end of low RAM into the hole
    (1 * MiB - 7, 8),
    (1 * MiB, 1),                     # starts in the hole
    (3 * GiB, 8),
    (4 * GiB - 4, 8),                 # starts in the hole, ends in high RAM
    (4 * GiB + 2 * MiB - 1, 2),       # crosses the end of RAM
    (4 * GiB + 2 * MiB, 1),           # beyond RAM
    (1 << 52, 8),
    (-1, 1),                          # negative address
    (-8, 8),
    (0, 4 * GiB + 2 * MiB),           # from low RAM across the hole into high RAM
]


class _Huge:
    """Stands in for a multi-GiB buffer: write() must reject it by its length before touching any byte."""

    def __init__(self, length):
        self.length = length

    def __len__(self):
        return self.length


def _snapshot(mem):
    return [bytes(r.view) for r in mem.regions]


def _scribble(mem):
    """Put a known non-zero pattern at every region edge, so a partial write is visible."""
    for r in mem.regions:
        mem.fill(r.gpa, 64, 0x11)
        mem.fill(r.end - 64, 64, 0x22)


@pytest.mark.parametrize("gpa,length", BAD_RANGES)
def test_every_accessor_rejects_bad_ranges_and_leaves_memory_untouched(two, gpa, length):
    _scribble(two)
    before = _snapshot(two)
    accesses = [
        lambda: two.read(gpa, length),
        lambda: two.view(gpa, length),
        lambda: two.write(gpa, _Huge(length) if length > MiB else b"\xaa" * length),
        lambda: two.fill(gpa, length, 0xAA),
    ]
    for width in (2, 4, 8):
        if not _inside(gpa, width):  # the integer accessor at gpa is bad too
            accesses += [lambda w=width: getattr(two, f"read_u{8 * w}")(gpa),
                         lambda w=width: getattr(two, f"write_u{8 * w}")(gpa, (1 << (8 * w)) - 1)]
    assert len(accesses) >= 4
    for access in accesses:
        with pytest.raises(GuestMemoryError):
            access()
    assert _snapshot(two) == before


@pytest.mark.parametrize("accessor,width", [("u16", 2), ("u32", 4), ("u64", 8)])
def test_integer_accessors_reject_straddling_each_region_end(two, accessor, width):
    _scribble(two)
    before = _snapshot(two)
    for r in two.regions:
        for back in range(1, width):
            gpa = r.end - back
            with pytest.raises(GuestMemoryError):
                getattr(two, "read_" + accessor)(gpa)
            with pytest.raises(GuestMemoryError):
                getattr(two, "write_" + accessor)(gpa, (1 << (8 * width)) - 1)
        # the last whole slot is fine
        getattr(two, "write_" + accessor)(r.end - width, 0)
        getattr(two, "write_" + accessor)(r.end - width, int.from_bytes(b"\x22" * width, "little"))
    assert _snapshot(two) == before


def test_negative_length_is_rejected(two):
    for call in (lambda: two.read(0x100, -1), lambda: two.view(0x100, -1), lambda: two.fill(0x100, -1)):
        with pytest.raises(GuestMemoryError):
            call()


def test_zero_length_at_a_region_end_or_in_a_hole_is_outside_ram(two):
    with pytest.raises(GuestMemoryError):
        two.read(1 * MiB, 0)
    with pytest.raises(GuestMemoryError):
        two.read(2 * GiB, 0)


def test_guest_memory_error_message_names_the_address(two):
    with pytest.raises(GuestMemoryError, match="0x100000"):
        two.read(1 * MiB, 4)


@pytest.mark.parametrize("layout", [
    [(0, PAGE + 1)],                  # size not a page multiple
    [(1, PAGE)],                      # gpa not page aligned
    [(PAGE // 2, PAGE)],
    [(0, 0)],                         # empty
    [(0, -PAGE)],                     # negative
    [(0, 2 * PAGE), (PAGE, PAGE)],    # overlap
    [(0, PAGE), (0, PAGE)],           # duplicate
    [(4 * PAGE, PAGE), (0, 8 * PAGE)],  # overlap given in reverse order
])
def test_bad_layouts_raise_value_error(layout):
    with pytest.raises(ValueError):
        GuestMemory(layout)


def test_adjacent_regions_are_allowed():
    m = GuestMemory([(0, PAGE), (PAGE, PAGE)])
    try:
        assert m.size == 2 * PAGE
        assert m.contains(PAGE - 1) and m.contains(PAGE)
        # regions are separate mappings: an access spanning the seam is rejected, not stitched together
        assert not m.contains(PAGE - 1, 2)
        with pytest.raises(GuestMemoryError):
            m.write(PAGE - 1, b"xx")
    finally:
        m.close()


def test_close_drops_all_regions():
    m = GuestMemory([LOW])
    m.write(0, b"x")
    m.close()
    assert m.regions == []
    assert m.size == 0
    with pytest.raises(GuestMemoryError):
        m.read(0, 1)


# --- property: an access is either wholly inside one region or rejected without side effects ----------------

@pytest.fixture(scope="module")
def shared():
    m = GuestMemory([LOW, HIGH])
    yield m
    m.close()


EDGES = [0, 1 * MiB, 4 * GiB, 4 * GiB + 2 * MiB]
gpas = st.one_of(
    st.builds(lambda e, d: e + d, st.sampled_from(EDGES), st.integers(-70, 70)),
    st.integers(-(1 << 20), 5 * GiB),
)
lengths = st.one_of(st.integers(0, 80), st.integers(0, 3 * MiB))


def _inside(gpa, length):
    return gpa >= 0 and length >= 0 and any(b <= gpa < b + s and gpa + length <= b + s for b, s in (LOW, HIGH))


def _window(mem, gpa, length):
    """What RAM holds in [gpa - 8, gpa + length + 8), per region (clamped), to compare before and after."""
    out = []
    for r in mem.regions:
        lo, hi = max(r.gpa, gpa - 8), min(r.end, gpa + length + 8)
        out.append(bytes(r.view[lo - r.gpa:hi - r.gpa]) if lo < hi else b"")
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(gpa=gpas, length=lengths, op=st.sampled_from(["write", "fill", "u16", "u32", "u64"]))
def test_access_is_all_or_nothing(shared, gpa, length, op):
    if op in ("u16", "u32", "u64"):
        length = {"u16": 2, "u32": 4, "u64": 8}[op]
    ok = _inside(gpa, length)
    assert shared.contains(gpa, length) == ok
    before = _window(shared, gpa, length)
    pattern = (bytes(range(1, 256)) * (length // 255 + 1))[:length]
    value = int.from_bytes(pattern, "little")
    actions = {
        "write": lambda: shared.write(gpa, pattern),
        "fill": lambda: shared.fill(gpa, length, 0xC3),
        "u16": lambda: shared.write_u16(gpa, value),
        "u32": lambda: shared.write_u32(gpa, value),
        "u64": lambda: shared.write_u64(gpa, value),
    }
    if not ok:
        with pytest.raises(GuestMemoryError):
            actions[op]()
        with pytest.raises(GuestMemoryError):
            shared.read(gpa, length)
        assert _window(shared, gpa, length) == before
        return
    actions[op]()
    expected = b"\xc3" * length if op == "fill" else pattern
    assert shared.read(gpa, length) == expected
    if op in ("u16", "u32", "u64"):
        assert getattr(shared, "read_" + op)(gpa) == value
    after = _window(shared, gpa, length)
    # only [gpa, gpa+length) changed: the 8 bytes either side are as before
    region = next(r for r in shared.regions if r.gpa <= gpa < r.end)
    idx = shared.regions.index(region)
    lo = max(region.gpa, gpa - 8)
    head = gpa - lo
    assert after[idx][:head] == before[idx][:head]
    assert after[idx][head + length:] == before[idx][head + length:]
    shared.fill(gpa, length, 0)  # restore for the next example


@pytest.mark.parametrize("size", [(2 << 20) + 4096, (6 << 20) + 8192, 64 << 20])
def test_host_addresses_agree_with_guest_addresses_modulo_2mib(size):
    """KVM maps 2 MiB pages only where host and guest addresses agree modulo 2 MiB (kernels before 6.7 place
    mappings at any page; lengths not a multiple of 2 MiB are placed at any page by later ones too)."""
    mem = GuestMemory([(0, size), ((1 << 32) + 0x3000, size)])
    try:
        for region in mem.regions:
            assert (region.host_addr - region.gpa) % (2 << 20) == 0
            # the region's bytes are the ones at host_addr (what KVM is given), and the whole size is usable
            mem.write(region.gpa + size - 4, b"\x11\x22\x33\x44")
            at_host = ffi.buffer(ffi.cast("char *", region.host_addr + size - 4), 4)[:]
            assert at_host == b"\x11\x22\x33\x44"
        with pytest.raises(GuestMemoryError):
            mem.read(size, 1)   # the padding beyond the region is not guest RAM
    finally:
        mem.close()


def test_views_span_regions_and_refuse_what_is_outside():
    mem = GuestMemory([(0, 1 << 20), (4 << 20, 1 << 20)])
    try:
        mem.write(0x10, b"low")
        mem.write((4 << 20) + 0x20, b"high")
        low, high, again = mem.views([(0x10, 3), ((4 << 20) + 0x20, 4), (0x11, 2)])
        assert (bytes(low), bytes(high), bytes(again)) == (b"low", b"high", b"ow")
        for outside in ([(1 << 20, 1)], [((1 << 20) - 1, 2)], [(0, 1), ((5 << 20) - 1, 2)], [(0x10, -1)]):
            with pytest.raises(GuestMemoryError):
                mem.views(outside)
    finally:
        mem.close()


def test_close_unmaps_once_views_in_reference_cycles_are_collected_and_never_under_a_live_view():
    import gc

    mem = GuestMemory([(0, 1 << 20)])
    cycle = [mem.view(0, 16)]
    cycle.append(cycle)  # only the cycle collector frees this view
    del cycle
    gc.disable()
    try:
        mem.close()  # collects the cycle itself, then unmaps: no BufferError
    finally:
        gc.enable()
    assert mem.regions == [] and mem.native.count == 0
    kept = GuestMemory([(0, 1 << 20)])
    view = kept.view(0, 4)
    kept.close()  # a live view: the mapping stays under it, nothing raises
    view[:] = b"safe"
    assert bytes(view) == b"safe" and kept.native.count == 0
