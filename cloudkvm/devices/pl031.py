"""The Arm PrimeCell real-time clock PL031 (ARM DDI 0224 TRM, §3 programmers model) as Linux's rtc-pl031 uses it."""
import time
from typing import Any, Callable

from .irq import IrqLine
from .primecell import PrimeCell

# Register offsets (DDI 0224 Table 3-1).
DR = 0x000  # data: the counter, seconds (read-only)
MR = 0x004  # match: the interrupt is raised when the counter reaches it
LR = 0x008  # load: writing sets the counter; reads the last value written
CR = 0x00C  # control: bit 0 RTC start
IMSC = 0x010  # interrupt mask set/clear (bit 0, 1 = enabled)
RIS = 0x014  # raw interrupt status (read-only)
MIS = 0x018  # masked interrupt status (read-only)
ICR = 0x01C  # interrupt clear (write-only, bit 0)

CR_START = 1 << 0  # RTC start (DDI 0224 §3.3.4)
INT_MATCH = 1 << 0  # the match interrupt, the one bit of IMSC/RIS/MIS/ICR (DDI 0224 §3.3.5-3.3.8)

# The ID registers as QEMU's hw/rtc/pl031.c reports them (0x31 0x10 0x14 0x00): part 0x031, designer 0x41,
# revision 1. Linux's amba bus matches 0x00041031 under the mask 0x000fffff.
PERIPH_ID = 0x00141031

COUNTER_MASK = 0xFFFFFFFF  # the counter is 32 bits and wraps
HALF_RANGE = 1 << 31  # a match over 2^31 s (68 years) ahead is never waited for; a clock stepped back is not a match


class Pl031(PrimeCell):
    """The counter is `clock()` (host seconds since the epoch) plus an offset that LR writes set, so DR reads
    the host's UTC time until the guest sets it. The RTC is always running: CR reads 1 and writes change nothing,
    as QEMU's model does (the counter counts from power-on; the TRM's start bit has nothing left to start).

    The match interrupt (RTCINTR) is raised when the counter reaches MR. `call_later(delay, fn)` (the I/O
    thread's, returning a handle with `cancel()`) schedules the moment; without it the match is noticed at the
    next register access or `poll()`. A match is armed by writing MR or LR and fires once."""

    PERIPH_ID = PERIPH_ID

    def __init__(self, irq: IrqLine, clock: Callable[[], float] = time.time,
                 call_later: Callable[[float, Callable[[], None]], Any] | None = None):
        super().__init__(irq)
        self._clock = clock
        self._call_later = call_later
        self._offset = 0  # counter - floor(clock())
        self._mr = 0
        self._lr = 0
        self._imsc = 0
        self._ris = 0
        self._armed = False
        self._armed_from = 0  # the counter when the match was armed
        self._match_in = 0  # seconds from then until the counter equals MR
        self._timer = None

    def poll(self) -> None:
        """Raise the match interrupt if the counter has reached MR (for a board that gives no `call_later`)."""
        with self._lock:
            self._check_match()
            self._update_irq()

    # --- guest side ----------------------------------------------------------

    def _write_reg(self, reg: int, value: int) -> None:
        self._check_match()
        if reg == MR:
            self._mr = value
            self._arm()
        elif reg == LR:
            self._lr = value
            self._offset = value - self._seconds()
            self._arm()
        elif reg == IMSC:
            self._imsc = value & INT_MATCH
        elif reg == ICR:
            self._ris &= ~value
        # DR, RIS and MIS are read-only; CR writes change nothing; other offsets are outside the device.

    def _read_reg(self, reg: int) -> int | None:
        self._check_match()
        if reg == DR:
            return self._counter()
        if reg == MR:
            return self._mr
        if reg == LR:
            return self._lr
        if reg == CR:
            return CR_START
        if reg == IMSC:
            return self._imsc
        if reg == RIS:
            return self._ris
        if reg == MIS:
            return self._ris & self._imsc
        return None  # ICR is write-only

    # --- the counter and the match -------------------------------------------

    def _seconds(self) -> int:
        return int(self._clock() // 1)

    def _counter(self) -> int:
        return (self._seconds() + self._offset) & COUNTER_MASK

    def _arm(self) -> None:
        """A new MR or counter value: the match fires when the counter next equals MR (now, if it does)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed_from = self._counter()
        self._match_in = (self._mr - self._armed_from) & COUNTER_MASK
        self._armed = True
        self._check_match()

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
            self._check_match()
            self._update_irq()

    def _check_match(self) -> None:
        """Raise the match once the counter has advanced `_match_in` seconds from where it was armed (at or past
        MR: a late timer or a guest that looks late still sees the match). Otherwise keep a timer for it."""
        if not self._armed:
            return
        elapsed = (self._counter() - self._armed_from) & COUNTER_MASK
        if self._match_in <= elapsed < HALF_RANGE:
            self._armed = False
            self._ris |= INT_MATCH
            return
        if self._call_later is not None and self._timer is None and self._match_in < HALF_RANGE:
            due = self._seconds() + self._match_in - elapsed  # the host second at which the counter equals MR
            self._timer = self._call_later(max(0.0, due - self._clock()), self._on_timer)

    def _interrupt(self) -> bool:
        return bool(self._ris & self._imsc)
