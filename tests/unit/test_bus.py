"""Bus: non-overlapping [base, base+size) ranges, lookup by address, the memo, and the C-side sink table."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudkvm.devices.bus import C_UART_LSR, C_UART_THR, Bus, BusConflict


class Dev:
    """A bus device that records nothing; identity is what the tests compare."""

    def __init__(self, name: str = "dev"):
        self.name = name

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        pass

    def __repr__(self):
        return f"Dev({self.name})"


class SinkDev(Dev):
    c_sink = True


def test_lookup_returns_offset_and_device_for_every_address_in_range():
    bus, dev = Bus("pio"), Dev()
    bus.add(0x3F8, 8, dev, "uart")
    for addr in range(0x3F8, 0x400):
        hit = bus.lookup(addr)
        assert hit is not None
        assert hit[0] == addr - 0x3F8
        assert hit[1] is dev


def test_lookup_misses_before_after_and_between_ranges():
    bus, a, b = Bus("mmio"), Dev("a"), Dev("b")
    bus.add(0x1000, 0x100, a, "a")
    bus.add(0x2000, 0x10, b, "b")
    assert bus.lookup(0) is None
    assert bus.lookup(0xFFF) is None          # just before a
    assert bus.lookup(0x1100) is None         # just after a (end is exclusive)
    assert bus.lookup(0x1800) is None         # in the hole between a and b
    assert bus.lookup(0x1FFF) is None         # just before b
    assert bus.lookup(0x2010) is None         # just after b
    assert bus.lookup(1 << 40) is None        # far beyond everything
    assert bus.lookup(0x10FF) == (0xFF, a)    # last byte of a
    assert bus.lookup(0x2000) == (0, b)       # first byte of b


def test_lookup_on_empty_bus_is_none():
    assert Bus("empty").lookup(0) is None
    assert Bus("empty").lookup(0x1234) is None


def test_adjacent_ranges_are_allowed_and_resolved_to_the_right_device():
    bus, a, b = Bus("pio"), Dev("a"), Dev("b")
    bus.add(0x10, 0x10, a, "a")
    bus.add(0x20, 0x10, b, "b")
    bus.add(0x00, 0x10, Dev("c"), "c")
    assert bus.lookup(0x1F) == (0xF, a)
    assert bus.lookup(0x20) == (0, b)
    assert [r[0] for r in bus.ranges()] == [0x00, 0x10, 0x20]


def test_overlap_with_lower_neighbour_is_rejected_and_names_it():
    bus = Bus("pio")
    bus.add(0x100, 0x10, Dev(), "low")
    with pytest.raises(BusConflict, match="low"):
        bus.add(0x10F, 0x10, Dev(), "new")
    assert bus.ranges() == [(0x100, 0x10, "low")]


def test_overlap_with_upper_neighbour_is_rejected_and_names_it():
    bus = Bus("pio")
    bus.add(0x100, 0x10, Dev(), "high")
    with pytest.raises(BusConflict, match="high"):
        bus.add(0xF8, 0x9, Dev(), "new")      # [0xF8, 0x101) touches 0x100
    assert bus.ranges() == [(0x100, 0x10, "high")]


def test_overlap_between_two_neighbours_and_exact_duplicate_are_rejected():
    bus = Bus("pio")
    bus.add(0x100, 0x10, Dev(), "low")
    bus.add(0x120, 0x10, Dev(), "high")
    with pytest.raises(BusConflict, match="high"):
        bus.add(0x110, 0x11, Dev(), "new")    # fits after low, runs one byte into high
    with pytest.raises(BusConflict, match="low"):
        bus.add(0x100, 0x10, Dev(), "dup")    # same base as low
    with pytest.raises(BusConflict):
        bus.add(0x0, 0x1000, Dev(), "cover")  # contains both
    with pytest.raises(BusConflict):
        bus.add(0x104, 0x2, Dev(), "inside")  # strictly inside low
    assert bus.ranges() == [(0x100, 0x10, "low"), (0x120, 0x10, "high")]


def test_bus_conflict_is_a_value_error():
    assert issubclass(BusConflict, ValueError)


@pytest.mark.parametrize("size", [0, -1, -0x100])
def test_empty_or_negative_range_is_rejected(size):
    bus = Bus("pio")
    with pytest.raises(BusConflict, match="empty"):
        bus.add(0x100, size, Dev(), "nothing")
    assert bus.ranges() == []
    assert bus.lookup(0x100) is None


def test_memo_is_invalidated_when_a_device_is_added_later():
    bus, a, b = Bus("mmio"), Dev("a"), Dev("b")
    bus.add(0x1000, 0x10, a, "a")
    assert bus.lookup(0x2000) is None       # a miss is memoised ...
    assert bus.lookup(0x1004) == (4, a)     # ... and so is a hit
    bus.add(0x2000, 0x10, b, "b")
    assert bus.lookup(0x2000) == (0, b)     # the memoised miss must not survive
    assert bus.lookup(0x1004) == (4, a)
    assert bus.lookup(0x2000) == (0, b)     # and repeated lookups stay right


def test_memo_is_bounded():
    bus = Bus("mmio")
    dev = Dev()
    bus.add(0, 1 << 20, dev)
    for addr in range(Bus.MEMO_LIMIT + 100):
        assert bus.lookup(addr) == (addr, dev)
    assert len(bus._memo) <= Bus.MEMO_LIMIT
    # addresses past the memo limit are still answered correctly
    assert bus.lookup(Bus.MEMO_LIMIT + 50) == (Bus.MEMO_LIMIT + 50, dev)


def test_ranges_sorted_by_base_with_labels_and_default_label():
    bus = Bus("pio")
    bus.add(0x70, 2, Dev(), "rtc")
    bus.add(0x3F8, 8, Dev(), "uart")
    bus.add(0x60, 1, Dev())                 # no label: the class name is used
    assert bus.ranges() == [(0x60, 1, "Dev"), (0x70, 2, "rtc"), (0x3F8, 8, "uart")]


def test_c_table_marks_exactly_the_sink_device_ports():
    bus = Bus("pio", sink_ports=0x10000)
    assert bus.c_table is not None and len(bus.c_table) == 0x10000
    bus.add(0x80, 1, SinkDev(), "post")
    bus.add(0xED, 1, SinkDev(), "delay")
    bus.add(0x3F8, 8, Dev(), "uart")        # not a sink
    bus.add(0xFFF0, 0x10, SinkDev(), "top")  # reaches exactly the end of the table
    marked = {i for i, v in enumerate(bus.c_table) if v}
    assert marked == {0x80, 0xED} | set(range(0xFFF0, 0x10000))
    assert all(v in (0, 1) for v in bus.c_table)


def test_sink_device_that_would_run_past_the_table_is_not_marked():
    bus = Bus("pio", sink_ports=0x100)
    bus.add(0xF8, 0x10, SinkDev(), "straddle")
    assert not any(bus.c_table)
    assert bus.lookup(0x100) is not None     # still on the bus, just not sunk in C


def test_bus_without_sink_ports_has_no_c_table():
    bus = Bus("mmio")
    bus.add(0x80, 1, SinkDev(), "post")
    assert bus.c_table is None
    assert bus.lookup(0x80)[1].__class__ is SinkDev


def test_rejected_sink_device_does_not_mark_the_table():
    bus = Bus("pio", sink_ports=0x10000)
    bus.add(0x80, 4, Dev(), "normal")
    with pytest.raises(BusConflict):
        bus.add(0x82, 1, SinkDev(), "post")
    assert not any(bus.c_table)


@st.composite
def layouts(draw):
    """Non-overlapping (base, size) ranges in random insertion order, plus probe addresses around them."""
    n = draw(st.integers(0, 12))
    cursor, ranges = 0, []
    for _ in range(n):
        gap = draw(st.integers(0, 64))
        size = draw(st.integers(1, 64))
        ranges.append((cursor + gap, size))
        cursor += gap + size
    order = draw(st.permutations(ranges))
    probes = draw(st.lists(st.integers(0, cursor + 70), max_size=60))
    edges = [a for b, s in ranges for a in (b - 1, b, b + s - 1, b + s) if a >= 0]
    return order, probes + edges


@settings(max_examples=200, deadline=None)
@given(layouts())
def test_lookup_matches_brute_force(layout):
    order, probes = layout
    bus = Bus("prop")
    devices = {}
    for base, size in order:
        dev = Dev(f"{base:x}")
        devices[base] = dev
        bus.add(base, size, dev)
    for addr in probes + probes:  # second pass goes through the memo
        expected = None
        for base, size in order:
            if base <= addr < base + size:
                expected = (addr - base, devices[base])
        assert bus.lookup(addr) == expected
    assert [(b, s) for b, s, _ in bus.ranges()] == sorted(order)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(1, 40)), max_size=20))
def test_add_accepts_exactly_the_non_overlapping_ranges(candidates):
    bus, accepted = Bus("prop"), []
    for base, size in candidates:
        overlaps = any(base < b + s and b < base + size for b, s in accepted)
        if overlaps:
            with pytest.raises(BusConflict):
                bus.add(base, size, Dev())
        else:
            bus.add(base, size, Dev())
            accepted.append((base, size))
    assert [(b, s) for b, s, _ in bus.ranges()] == sorted(accepted)


def test_c_ports_mark_their_codes_at_their_offsets_only():
    bus = Bus("pio", sink_ports=0x10000)
    bus.add(0x3F8, 8, Dev(), "uart", c_ports={0: C_UART_THR, 5: C_UART_LSR})
    assert {i: v for i, v in enumerate(bus.c_table) if v} == {0x3F8: C_UART_THR, 0x3FD: C_UART_LSR}


def test_c_ports_outside_the_device_are_a_layout_bug_and_change_nothing():
    bus = Bus("pio", sink_ports=0x10000)
    with pytest.raises(BusConflict, match="outside its range"):
        bus.add(0x3F8, 8, Dev(), "uart", c_ports={8: C_UART_LSR})
    assert not any(bus.c_table) and bus.lookup(0x3F8) is None
