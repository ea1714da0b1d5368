"""Pl031 driven the way Linux's drivers/rtc/rtc-pl031.c drives the Arm variant (probe, read/set time, alarms and
the interrupt handler), against a fake host clock and a fake I/O-thread timer."""
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudkvm.devices.pl031 import Pl031
from device_probe import LevelLine, access, hostile_accesses

# drivers/rtc/rtc-pl031.c
RTC_DR, RTC_MR, RTC_LR, RTC_CR, RTC_IMSC, RTC_RIS, RTC_MIS, RTC_ICR = 0x00, 0x04, 0x08, 0x0C, 0x10, 0x14, 0x18, 0x1C
RTC_CR_EN = 1 << 0
RTC_BIT_AI = 1 << 0
AMBA_CID = 0xB105F00D
T0 = 1_700_000_000.25  # a host time a quarter second into a second


class Clock:
    def __init__(self, t=T0):
        self.t = t

    def __call__(self):
        return self.t


class Timers:
    """call_later as the I/O thread offers it: (delay, fn) -> a handle with cancel()."""

    class Handle:
        def __init__(self, due, fn):
            self.due, self.fn, self.cancelled = due, fn, False

        def cancel(self):
            self.cancelled = True

    def __init__(self, clock):
        self.clock = clock
        self.handles = []

    def __call__(self, delay, fn):
        assert delay >= 0
        handle = self.Handle(self.clock.t + delay, fn)
        self.handles.append(handle)
        return handle

    def pending(self):
        return [h for h in self.handles if not h.cancelled]

    def run_until(self, t):
        """Advance the clock to `t`, running every timer that falls due on the way, at its due time."""
        while True:
            due = [h for h in self.pending() if h.due <= t]
            if not due:
                break
            handle = min(due, key=lambda h: h.due)
            self.handles.remove(handle)
            self.clock.t = max(self.clock.t, handle.due)
            handle.fn()
        self.clock.t = t


def make(with_timers=True):
    line, clock = LevelLine(), Clock()
    timers = Timers(clock) if with_timers else None
    return Pl031(line, clock=clock, call_later=timers), line, clock, timers


def readl(rtc, off):
    return rtc.read(off, 4)


def writel(rtc, off, value):
    rtc.write(off, 4, value)


def alarm_irq_enable(rtc, enabled):  # pl031_alarm_irq_enable
    writel(rtc, RTC_ICR, RTC_BIT_AI)
    imsc = readl(rtc, RTC_IMSC)
    writel(rtc, RTC_IMSC, imsc | RTC_BIT_AI if enabled else imsc & ~RTC_BIT_AI)


def set_alarm(rtc, time, enabled=True):  # pl031_set_alarm
    writel(rtc, RTC_MR, time)
    alarm_irq_enable(rtc, enabled)


def interrupt(rtc) -> bool:  # pl031_interrupt
    if readl(rtc, RTC_MIS) & RTC_BIT_AI:
        writel(rtc, RTC_ICR, RTC_BIT_AI)
        return True
    return False


def test_amba_ids_and_probe():
    rtc, line, _, _ = make()
    pid = sum((readl(rtc, 0xFE0 + 4 * i) & 255) << (8 * i) for i in range(4))
    cid = sum((readl(rtc, 0xFF0 + 4 * i) & 255) << (8 * i) for i in range(4))
    assert cid == AMBA_CID and pid & 0x000FFFFF == 0x00041031
    assert [readl(rtc, off) for off in range(0xFE0, 0x1000, 4)] == [0x31, 0x10, 0x14, 0x00, 0x0D, 0xF0, 0x05, 0xB1]
    data = readl(rtc, RTC_CR)  # pl031_probe: start the counter
    writel(rtc, RTC_CR, data | RTC_CR_EN)
    assert readl(rtc, RTC_CR) == RTC_CR_EN
    writel(rtc, RTC_CR, 0)  # the RTC keeps running
    assert readl(rtc, RTC_CR) == RTC_CR_EN
    assert line.changes == []


def test_dr_is_host_time_and_lr_sets_it():
    rtc, _, clock, _ = make()
    assert readl(rtc, RTC_DR) == 1_700_000_000
    clock.t += 1.0
    assert readl(rtc, RTC_DR) == 1_700_000_001
    writel(rtc, RTC_LR, 946_684_800)  # pl031_set_time: 2000-01-01
    assert readl(rtc, RTC_DR) == 946_684_800
    assert readl(rtc, RTC_LR) == 946_684_800  # LR reads the last value written
    clock.t += 61.0
    assert readl(rtc, RTC_DR) == 946_684_861


def test_alarm_fires_at_the_match_second_through_the_timer():
    rtc, line, clock, timers = make()
    now = readl(rtc, RTC_DR)
    set_alarm(rtc, now + 5)
    (handle,) = timers.pending()
    assert handle.due == 1_700_000_005.0  # the second the counter becomes MR, not 5 s from a quarter past
    timers.run_until(1_700_000_004.99)
    assert not line.level
    timers.run_until(1_700_000_005.0)
    assert line.level and readl(rtc, RTC_RIS) & RTC_BIT_AI
    assert readl(rtc, RTC_DR) == readl(rtc, RTC_MR)
    assert interrupt(rtc)
    assert not line.level and not readl(rtc, RTC_RIS)
    timers.run_until(clock.t + 10_000)  # a match fires once
    assert not line.level and not timers.pending()


def test_alarm_without_a_timer_is_seen_at_the_next_access_or_poll():
    rtc, line, clock, _ = make(with_timers=False)
    set_alarm(rtc, readl(rtc, RTC_DR) + 2)
    clock.t += 3
    assert not line.level  # nothing has looked yet
    rtc.poll()
    assert line.level
    assert interrupt(rtc) and not line.level


def test_masked_alarm_is_pending_but_raises_nothing():
    rtc, line, clock, timers = make()
    set_alarm(rtc, readl(rtc, RTC_DR) + 1, enabled=False)
    timers.run_until(clock.t + 2)
    assert readl(rtc, RTC_RIS) & RTC_BIT_AI and not readl(rtc, RTC_MIS)
    assert not line.level
    writel(rtc, RTC_IMSC, RTC_BIT_AI)  # unmasking a pending match raises the line
    assert line.level
    alarm_irq_enable(rtc, True)  # which clears it first, as the driver does
    assert not line.level


def test_match_equal_to_the_counter_fires_at_once():
    rtc, line, _, _ = make()
    writel(rtc, RTC_IMSC, RTC_BIT_AI)
    writel(rtc, RTC_MR, readl(rtc, RTC_DR))
    assert line.level


def test_match_in_the_past_does_not_fire():
    rtc, line, clock, timers = make()
    set_alarm(rtc, readl(rtc, RTC_DR) - 1)
    timers.run_until(clock.t + 100_000)
    assert not line.level and not readl(rtc, RTC_RIS)


def test_late_timer_still_fires_and_early_timer_waits():
    rtc, line, clock, timers = make()
    set_alarm(rtc, readl(rtc, RTC_DR) + 3)
    (handle,) = timers.pending()
    clock.t = handle.due - 0.5  # the timer runs half a second early (the host clock and the timer's differ)
    timers.handles.remove(handle)
    handle.fn()
    assert not line.level
    (again,) = timers.pending()  # it set itself again
    clock.t = again.due + 7  # and this one runs 7 s late: the counter is past MR
    timers.handles.remove(again)
    again.fn()
    assert line.level


def test_loading_the_counter_rearms_the_match():
    rtc, line, clock, timers = make()
    set_alarm(rtc, 2_000_000_000)
    assert len(timers.pending()) == 1
    writel(rtc, RTC_LR, 1_999_999_998)
    assert len(timers.pending()) == 1  # the old timer was cancelled
    timers.run_until(clock.t + 1)
    assert not line.level
    timers.run_until(clock.t + 1)
    assert line.level and readl(rtc, RTC_DR) == 2_000_000_000


def test_counter_wraps_at_32_bits():
    rtc, line, clock, timers = make()
    writel(rtc, RTC_LR, 0xFFFF_FFFE)
    set_alarm(rtc, 1)
    timers.run_until(clock.t + 2)
    assert readl(rtc, RTC_DR) == 0 and not line.level
    timers.run_until(clock.t + 1)
    assert readl(rtc, RTC_DR) == 1 and line.level


def test_host_clock_stepping_back_is_not_a_match():
    rtc, line, clock, _ = make(with_timers=False)
    set_alarm(rtc, readl(rtc, RTC_DR) + 10)
    clock.t -= 3600
    rtc.poll()
    assert not line.level
    clock.t += 3600 + 10
    rtc.poll()
    assert line.level


def test_unknown_and_read_only_offsets_and_sizes():
    rtc, line, clock, _ = make()
    writel(rtc, RTC_MR, 0x12345678)
    writel(rtc, RTC_DR, 5)  # read-only
    writel(rtc, RTC_RIS, 1)
    writel(rtc, RTC_MIS, 1)
    for off in (0x020, 0x024, 0x030, 0x7FC, 0xFDC, 0x1000, -4):
        assert readl(rtc, off) == 0, hex(off)
        writel(rtc, off, 0xFFFFFFFF)
    assert readl(rtc, RTC_ICR) == 0  # write-only
    assert readl(rtc, RTC_DR) == 1_700_000_000
    assert readl(rtc, RTC_MR) == 0x12345678
    assert rtc.read(RTC_MR, 1) == 0x78 and rtc.read(RTC_MR + 2, 2) == 0x1234 and rtc.read(RTC_MR + 3, 1) == 0x12
    assert rtc.read(RTC_MR, 8) == 0 and rtc.read(RTC_MR + 2, 4) == 0
    rtc.write(RTC_MR, 2, 0xABCD)  # a halfword write at the register's offset: zero-extended
    assert readl(rtc, RTC_MR) == 0xABCD
    rtc.write(RTC_MR + 2, 2, 0x1111)  # another lane: ignored
    rtc.write(RTC_MR, 8, 0x1111)
    assert readl(rtc, RTC_MR) == 0xABCD
    writel(rtc, RTC_IMSC, 0xFFFFFFFF)
    assert readl(rtc, RTC_IMSC) == 1
    assert line.changes == []


ops = st.one_of(hostile_accesses([RTC_DR, RTC_MR, RTC_LR, RTC_CR, RTC_IMSC, RTC_RIS, RTC_MIS, RTC_ICR]),
                st.tuples(st.just("time"), st.floats(-1e5, 1e5)))


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=60))
def test_no_access_sequence_raises_and_the_line_follows_mis(seq):
    rtc, line, clock, timers = make()
    for op in seq:
        if not access(rtc, op):
            timers.run_until(max(clock.t, clock.t + op[1]))
            clock.t += min(op[1], 0)  # the host clock may also step back
        assert line.level == bool(readl(rtc, RTC_MIS))
        assert len(timers.pending()) <= 1
