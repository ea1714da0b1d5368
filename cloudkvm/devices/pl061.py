"""The Arm PrimeCell GPIO PL061 (ARM DDI 0190 TRM, §3 programmers model) as Linux's gpio-pl061 and gpio-keys use it."""
import time
from typing import Any, Callable

from .irq import IrqLine
from .primecell import PrimeCell

# Register offsets (DDI 0190 Table 3-1).
DATA = 0x000  # data, 0x000-0x3FC: address bits [9:2] mask which pins an access reads or writes
DATA_END = 0x400
DIR = 0x400  # direction: 1 = output
IS = 0x404  # interrupt sense: 1 = level, 0 = edge
IBE = 0x408  # interrupt both edges (edge-sensitive pins; IEV is then ignored)
IEV = 0x40C  # interrupt event: 1 = rising edge / high level, 0 = falling edge / low level
IE = 0x410  # interrupt mask: 1 = enabled
RIS = 0x414  # raw interrupt status (read-only)
MIS = 0x418  # masked interrupt status (read-only)
IC = 0x41C  # interrupt clear (write-only): 1 clears a latched edge
AFSEL = 0x420  # mode control select: 1 = hardware control (nothing drives it here; stored only)

PINS = 8
PIN_MASK = 0xFF
PLAIN = (DIR, IS, IBE, IEV, IE, AFSEL)  # 8-bit registers a write simply sets

# The ID registers as QEMU's hw/gpio/pl061.c reports them (0x61 0x10 0x04 0x00): part 0x061, designer 0x41,
# revision 0. Linux's amba bus matches 0x00041061 under the mask 0x000fffff.
PERIPH_ID = 0x00041061

# The virt board's power key: QEMU's hw/arm/virt.h GPIO_PIN_POWER_BUTTON, the pin its DTB's gpio-keys node
# maps to KEY_POWER (linux,code 116), and how long QEMU's gpio-key device holds it (hw/gpio/gpio_key.c,
# GPIO_KEY_LATENCY, 100 ms: longer than gpio-keys' default 5 ms debounce, after which it reads the pin).
POWER_KEY_PIN = 3
POWER_KEY_HOLD = 0.1
POWER_KEY_MAX_HOLD = 10.0  # seconds the key stays down at most while the guest has not read it


class Pl061(PrimeCell):
    """Eight GPIO pins behind a 4 KiB MMIO window; the combined interrupt (GPIOINTR) drives `irq.set_level`.

    Input pins are driven by the host with `set_input(pin, level)` (all low at power-on, as the virt board pulls
    its lines down). A pin reads its output latch when DIR makes it an output, its host level otherwise; DATA
    writes change only output pins in the address mask (a value written to an input pin is not kept, as Linux's
    gpio-pl061 notes when it writes the value again after setting DIR).

    Interrupts: an edge-sensitive pin (IS clear) latches its RIS bit when its host level changes while it is an
    input: on either edge with IBE, else on the edge IEV selects; IC clears the latch. A level-sensitive pin's
    RIS bit follows the pin (high with IEV set, low with IEV clear) and IC does not clear it. Configuration
    writes and direction changes raise nothing by themselves."""

    PERIPH_ID = PERIPH_ID

    def __init__(self, irq: IrqLine):
        super().__init__(irq)
        self._regs = dict.fromkeys(PLAIN, 0)
        self._out = 0  # the output latch (bits of output pins)
        self._inputs = 0  # the levels the host drives
        self._edges = 0  # latched edge interrupts
        self._seen_high = 0  # pins the guest has read as high since they last rose

    # --- host side -----------------------------------------------------------

    def set_input(self, pin: int, level: bool) -> None:
        """Drive input `pin` (0-7) high or low from the host side."""
        if not 0 <= pin < PINS:
            raise ValueError(f"PL061 pin {pin} is not 0-{PINS - 1}")
        bit = 1 << pin
        with self._lock:
            before = self._inputs
            self._inputs = (before | bit) if level else (before & ~bit)
            if before == self._inputs:
                return
            if level:
                self._seen_high &= ~bit
            regs = self._regs
            edge_input = not (regs[DIR] | regs[IS]) & bit
            if edge_input and (regs[IBE] & bit or bool(level) == bool(regs[IEV] & bit)):
                self._edges |= bit
            self._update_irq()

    def seen_high(self, pin: int) -> bool:
        """Has the guest read `pin` as high since the host last raised it?"""
        with self._lock:
            return bool(self._seen_high & (1 << pin))

    # --- guest side ----------------------------------------------------------

    def _write_reg(self, reg: int, value: int) -> None:
        if reg in self._regs:
            self._regs[reg] = value & PIN_MASK
        elif reg < DATA_END:
            mask = (reg >> 2) & self._regs[DIR]
            self._out = (self._out & ~mask) | (value & mask)
        elif reg == IC:
            self._edges &= ~value
        # RIS, MIS, the IDs and reserved offsets are read-only or nothing.

    def _read_reg(self, reg: int) -> int | None:
        if reg in self._regs:
            return self._regs[reg]
        if reg < DATA_END:
            mask = reg >> 2
            pins = self._pins()
            self._seen_high |= pins & mask & ~self._regs[DIR]
            return pins & mask
        if reg == RIS:
            return self._raw()
        if reg == MIS:
            return self._raw() & self._regs[IE]
        return None  # IC is write-only

    def _pins(self) -> int:
        return (self._out & self._regs[DIR]) | (self._inputs & ~self._regs[DIR] & PIN_MASK)

    def _raw(self) -> int:
        regs = self._regs
        levels = ~(self._pins() ^ regs[IEV]) & regs[IS] & PIN_MASK  # level-sensitive pins at their active level
        return self._edges | levels

    def _interrupt(self) -> bool:
        return bool(self._raw() & self._regs[IE])


def press_power_key(gpio: Pl061, call_later: Callable[[float, Callable[[], None]], Any],
                    pin: int = POWER_KEY_PIN, hold: float = POWER_KEY_HOLD,
                    max_hold: float = POWER_KEY_MAX_HOLD, clock: Callable[[], float] = time.monotonic) -> None:
    """Press and release the power key as QEMU's virt board does for `system_powerdown`: the pin goes high, and low
    again `hold` seconds later (`call_later(delay, fn)` is the I/O thread's).

    Linux's gpio-keys asks for both edges (IS clear, IBE set) and on each edge reads the pin after its debounce
    delay: it reports KEY_POWER down if the pin is still high then, and up after the falling edge. A guest slower
    than `hold` would read the pin only after the release and see no press, so the key stays down until the guest
    has read it high (`Pl061.seen_high`), for at most `max_hold` seconds."""
    gpio.set_input(pin, True)
    give_up = clock() + max_hold

    def release() -> None:
        if gpio.seen_high(pin) or clock() >= give_up:
            gpio.set_input(pin, False)
        else:
            call_later(hold, release)

    call_later(hold, release)
