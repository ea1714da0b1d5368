"""CmosRtc through ports 0x70/0x71 (offsets 0/1) as firmware and Linux's mc146818-lib.c read and set it."""
import calendar
import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudkvm.devices.cmos_rtc import CmosRtc, civil_from_days, days_from_civil

SEC, SEC_ALARM, MIN, MIN_ALARM, HOUR, HOUR_ALARM = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05
DOW, DAY, MON, YEAR, REG_A, REG_B, REG_C, REG_D, CENTURY = 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x32
B_SET, B_DM_BINARY, B_24H = 0x80, 0x04, 0x02


class FakeClock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def utc(*args) -> float:
    return float(calendar.timegm(dt.datetime(*args).timetuple()))


LEAP_DAY = utc(2024, 2, 29, 13, 45, 56)  # a Thursday


def make(t: float = LEAP_DAY, **kw):
    clock = FakeClock(t)
    return CmosRtc(clock, **kw), clock


def cmos_read(rtc, index: int) -> int:
    rtc.write(0, 1, index)
    return rtc.read(1, 1)


def cmos_write(rtc, index: int, value: int) -> None:
    rtc.write(0, 1, index)
    rtc.write(1, 1, value)


def bcd(v: int) -> int:
    return (v // 10) << 4 | v % 10


def bcd2bin(b: int) -> int:
    return (b >> 4) * 10 + (b & 0x0F)


def linux_get_time(rtc) -> dt.datetime:
    """mc146818_get_time(): wait for UIP to clear, read the fields, convert from BCD unless DM says binary."""
    for _ in range(10):
        if not cmos_read(rtc, REG_A) & 0x80:
            break
    else:
        raise AssertionError("UIP never cleared")
    fields = [cmos_read(rtc, r) for r in (SEC, MIN, HOUR, DAY, MON, YEAR, CENTURY)]
    if not cmos_read(rtc, REG_B) & B_DM_BINARY:
        fields = [bcd2bin(f) for f in fields]
    sec, minute, hour, day, mon, year, century = fields
    return dt.datetime(century * 100 + year, mon, day, hour, minute, sec)


def linux_set_time(rtc, when: dt.datetime) -> None:
    """mc146818_set_time(): SET (and divider reset) held while the BCD fields are written."""
    control = cmos_read(rtc, REG_B)
    cmos_write(rtc, REG_B, control | B_SET)
    freq_select = cmos_read(rtc, REG_A)
    cmos_write(rtc, REG_A, freq_select | 0x70)
    for reg, value in ((YEAR, when.year % 100), (MON, when.month), (DAY, when.day),
                       (HOUR, when.hour), (MIN, when.minute), (SEC, when.second), (CENTURY, when.year // 100)):
        cmos_write(rtc, reg, value if control & B_DM_BINARY else bcd(value))
    cmos_write(rtc, REG_B, control)
    cmos_write(rtc, REG_A, freq_select)


def test_defaults_of_the_status_registers():
    rtc, _ = make()
    assert cmos_read(rtc, REG_A) == 0x26
    assert cmos_read(rtc, REG_B) == 0x02
    assert cmos_read(rtc, REG_C) == 0
    assert cmos_read(rtc, REG_D) == 0x80


def test_bcd_24_hour_reads_of_a_fixed_clock():
    rtc, _ = make()
    assert [cmos_read(rtc, r) for r in (SEC, MIN, HOUR, DOW, DAY, MON, YEAR, CENTURY)] == [
        0x56, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]


def test_binary_mode_reads():
    rtc, _ = make()
    cmos_write(rtc, REG_B, B_24H | B_DM_BINARY)
    assert [cmos_read(rtc, r) for r in (SEC, MIN, HOUR, DOW, DAY, MON, YEAR, CENTURY)] == [
        56, 45, 13, 5, 29, 2, 24, 20]


@pytest.mark.parametrize("hour, bcd_value, binary_value", [
    (0, 0x12, 12), (1, 0x01, 1), (11, 0x11, 11), (12, 0x92, 0x8C), (13, 0x81, 0x81), (23, 0x91, 0x8B)])
def test_12_hour_mode_reads(hour, bcd_value, binary_value):
    rtc, _ = make(utc(2024, 2, 29, hour, 0, 0))
    cmos_write(rtc, REG_B, 0)
    assert cmos_read(rtc, HOUR) == bcd_value
    cmos_write(rtc, REG_B, B_DM_BINARY)
    assert cmos_read(rtc, HOUR) == binary_value


def test_12_hour_mode_writes():
    rtc, _ = make()
    cmos_write(rtc, REG_B, 0)
    cmos_write(rtc, HOUR, 0x92)  # 12 PM
    cmos_write(rtc, REG_B, B_24H)
    assert cmos_read(rtc, HOUR) == 0x12
    cmos_write(rtc, REG_B, 0)
    cmos_write(rtc, HOUR, 0x12)  # 12 AM
    cmos_write(rtc, REG_B, B_24H)
    assert cmos_read(rtc, HOUR) == 0x00


def test_time_follows_the_clock():
    rtc, clock = make()
    clock.t += 3600 * 24 + 5  # one day and five seconds on
    assert linux_get_time(rtc) == dt.datetime(2024, 3, 1, 13, 46, 1)
    assert cmos_read(rtc, DOW) == 0x06  # Friday


def test_linux_reads_what_the_clock_says():
    rtc, _ = make(utc(1999, 12, 31, 23, 59, 59) + 0.75)
    assert linux_get_time(rtc) == dt.datetime(1999, 12, 31, 23, 59, 59)


def test_guest_set_time_keeps_ticking():
    rtc, clock = make()
    linux_set_time(rtc, dt.datetime(2001, 9, 9, 1, 46, 40))
    assert linux_get_time(rtc) == dt.datetime(2001, 9, 9, 1, 46, 40)
    clock.t += 61
    assert linux_get_time(rtc) == dt.datetime(2001, 9, 9, 1, 47, 41)
    clock.t += 86400 * 365
    assert linux_get_time(rtc) == dt.datetime(2002, 9, 9, 1, 47, 41)


def test_set_time_in_binary_mode():
    rtc, clock = make()
    cmos_write(rtc, REG_B, B_24H | B_DM_BINARY)
    linux_set_time(rtc, dt.datetime(2038, 1, 19, 3, 14, 7))
    clock.t += 1
    assert linux_get_time(rtc) == dt.datetime(2038, 1, 19, 3, 14, 8)


def test_set_freezes_the_clock_and_resumes_without_a_jump():
    rtc, clock = make()
    cmos_write(rtc, REG_B, B_24H | B_SET)
    clock.t += 10
    assert cmos_read(rtc, SEC) == 0x56
    cmos_write(rtc, MIN, 0x00)
    clock.t += 10
    assert (cmos_read(rtc, MIN), cmos_read(rtc, SEC)) == (0x00, 0x56)
    cmos_write(rtc, REG_B, B_24H)
    assert (cmos_read(rtc, MIN), cmos_read(rtc, SEC)) == (0x00, 0x56)
    clock.t += 5
    assert (cmos_read(rtc, MIN), cmos_read(rtc, SEC)) == (0x01, 0x01)


def test_a_write_without_set_moves_the_time_too():
    rtc, clock = make()
    cmos_write(rtc, MIN, 0x10)
    assert (cmos_read(rtc, HOUR), cmos_read(rtc, MIN), cmos_read(rtc, SEC)) == (0x13, 0x10, 0x56)
    clock.t += 4
    assert cmos_read(rtc, SEC) == 0x00 and cmos_read(rtc, MIN) == 0x11


def test_year_and_century_writes():
    rtc, _ = make()
    cmos_write(rtc, CENTURY, 0x19)
    assert (cmos_read(rtc, CENTURY), cmos_read(rtc, YEAR)) == (0x19, 0x24)
    cmos_write(rtc, YEAR, 0x99)
    assert linux_get_time(rtc) == dt.datetime(1999, 3, 1, 13, 45, 56)  # 1999-02-29 carries into March


def test_day_of_week_write_is_kept_and_ticks():
    rtc, clock = make()
    cmos_write(rtc, DOW, 0x02)
    assert cmos_read(rtc, DOW) == 0x02
    clock.t += 86400
    assert cmos_read(rtc, DOW) == 0x03
    clock.t += 86400 * 5
    assert cmos_read(rtc, DOW) == 0x01  # Saturday (7) wraps to Sunday (1)


def test_nmi_bit_of_the_index_is_dropped():
    rtc, _ = make()
    assert cmos_read(rtc, 0x80 | SEC) == 0x56
    cmos_write(rtc, 0x80 | 0x40, 0xA5)
    assert cmos_read(rtc, 0x40) == 0xA5
    assert cmos_read(rtc, 0x80 | REG_D) == 0x80


def test_index_port_reads_float_high():
    rtc, _ = make()
    rtc.write(0, 1, 0x0E)
    assert rtc.read(0, 1) == 0xFF


def test_register_a_uip_is_clear_and_divider_bits_are_writable():
    rtc, _ = make()
    cmos_write(rtc, REG_A, 0xF6)
    assert cmos_read(rtc, REG_A) == 0x76
    cmos_write(rtc, REG_A, 0x26)
    assert cmos_read(rtc, REG_A) == 0x26


def test_registers_c_and_d_are_read_only():
    rtc, _ = make()
    cmos_write(rtc, REG_C, 0xFF)
    cmos_write(rtc, REG_D, 0x00)
    assert cmos_read(rtc, REG_C) == 0 and cmos_read(rtc, REG_D) == 0x80


def test_alarm_registers_are_stored():
    rtc, _ = make()
    for reg, value in ((SEC_ALARM, 0x30), (MIN_ALARM, 0xC0), (HOUR_ALARM, 0x07)):
        cmos_write(rtc, reg, value)
    assert [cmos_read(rtc, r) for r in (SEC_ALARM, MIN_ALARM, HOUR_ALARM)] == [0x30, 0xC0, 0x07]
    assert cmos_read(rtc, SEC) == 0x56


def test_cmos_ram_round_trips():
    rtc, _ = make()
    ram = [i for i in range(0x0E, 0x80) if i != CENTURY]
    for i in ram:
        cmos_write(rtc, i, (i * 7 + 3) & 0xFF)
    assert [cmos_read(rtc, i) for i in ram] == [(i * 7 + 3) & 0xFF for i in ram]
    assert cmos_read(rtc, SEC) == 0x56


def test_memory_bytes_prefill_cmos_ram():
    rtc, _ = make(memory_bytes={0x15: 0x80, 0x16: 0x02, 0x34: 0x00, 0x35: 0x3F, 0x7F: 0xEE})
    assert [cmos_read(rtc, i) for i in (0x15, 0x16, 0x34, 0x35, 0x7F, 0x10)] == [0x80, 0x02, 0x00, 0x3F, 0xEE, 0]


@pytest.mark.parametrize("bad", [{0x00: 1}, {0x0B: 6}, {CENTURY: 0x20}, {0x80: 1}, {0x20: 256}, {0x20: -1}])
def test_memory_bytes_outside_plain_ram_are_refused(bad):
    with pytest.raises(ValueError):
        CmosRtc(FakeClock(0.0), memory_bytes=bad)


def test_default_clock_is_the_host_time():
    rtc = CmosRtc()
    assert abs((linux_get_time(rtc) - dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)).total_seconds()) < 5


def test_word_write_sets_index_then_data():
    rtc, _ = make()
    rtc.write(0, 2, 0x5A << 8 | 0x20)  # outw(0x70): index 0x20, data 0x5A
    assert cmos_read(rtc, 0x20) == 0x5A
    rtc.write(0, 1, SEC)
    assert rtc.read(0, 2) == 0x56 << 8 | 0xFF


EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


@given(st.integers(dt.date.min.toordinal() - EPOCH_ORDINAL, dt.date.max.toordinal() - EPOCH_ORDINAL))
def test_civil_conversions_match_datetime(days):
    date = dt.date.fromordinal(days + EPOCH_ORDINAL)
    assert civil_from_days(days) == (date.year, date.month, date.day)
    assert days_from_civil(date.year, date.month, date.day) == days


def test_days_from_civil_carries_overflowing_fields():
    assert days_from_civil(2023, 2, 31) == days_from_civil(2023, 3, 3)
    assert days_from_civil(2023, 13, 1) == days_from_civil(2024, 1, 1)
    assert days_from_civil(2023, 0, 0) == days_from_civil(2022, 11, 30)


ops = st.one_of(
    st.tuples(st.just("read"), st.integers(0, 3), st.sampled_from([1, 1, 1, 2, 4])),
    st.tuples(st.just("write"), st.integers(0, 3), st.sampled_from([1, 1, 1, 2, 4]), st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("tick"), st.floats(0, 1e7)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=60))
def test_no_guest_access_sequence_raises(seq):
    rtc, clock = make()
    for op in seq:
        if op[0] == "read":
            _, off, size = op
            assert 0 <= rtc.read(off, size) < 1 << (8 * size)
        elif op[0] == "write":
            _, off, size, value = op
            rtc.write(off, size, value & ((1 << (8 * size)) - 1))
        else:
            clock.t += op[1]
    for index in range(0x80):
        assert 0 <= cmos_read(rtc, index) <= 0xFF
    assert not cmos_read(rtc, REG_A) & 0x80
    assert cmos_read(rtc, REG_D) == 0x80
