"""What Arm PrimeCell peripherals share (PL011 TRM DDI 0183, PL031 TRM DDI 0224, PL061 TRM DDI 0190, each §3):
the identification registers at 0xFE0-0xFFC, how their 32-bit APB registers answer narrower accesses, and the
base class the models share."""
import threading

from .irq import IrqLine

PERIPH_ID0 = 0xFE0  # UARTPeriphID0/RTCPeriphID0/GPIOPeriphID0; PeriphID1-3 follow at 0xFE4-0xFEC
PCELL_ID0 = 0xFF0  # PCellID0; PCellID1-3 follow at 0xFF4-0xFFC
PCELL_ID = 0xB105F00D  # PCellID3..0 = 0xB1 0x05 0xF0 0x0D, the same for every PrimeCell (each TRM §3.3)
REGION_SIZE = 0x1000  # every PrimeCell decodes a 4 KiB window


def id_register(offset: int, periph_id: int) -> int | None:
    """The byte an ID register at word `offset` reads (each holds 8 bits of the 32-bit ID), or None when `offset`
    is not one of them."""
    if PERIPH_ID0 <= offset < PCELL_ID0:
        return (periph_id >> (8 * ((offset - PERIPH_ID0) >> 2))) & 0xFF
    if PCELL_ID0 <= offset < REGION_SIZE:
        return (PCELL_ID >> (8 * ((offset - PCELL_ID0) >> 2))) & 0xFF
    return None


def word_lane(offset: int, size: int) -> tuple[int, int] | None:
    """(word-aligned register offset, bit shift of the access's first byte) for an access the 32-bit APB slave
    can take: 1, 2 or 4 bytes inside one word of the 4 KiB window. None for anything else (a 64-bit access, a
    word-crossing one, an offset outside the window), which reads as 0 and writes nothing.

    The TRMs define word accesses only. A narrower read returns the addressed bytes of the register, with the
    read's side effects (Linux's amba-pl011 uses readw, earlycon readl/writeb, gpio-pl061 readb/writeb); a
    narrower write at the register's own offset writes the value zero-extended; one at another byte lane is
    ignored (the callers check `shift == 0` for writes)."""
    if size not in (1, 2, 4) or not 0 <= offset < REGION_SIZE:
        return None
    lane = offset & 3
    if lane + size > 4:
        return None
    return offset - lane, 8 * lane


def narrow(value: int, shift: int, size: int) -> int:
    """The `size` bytes of a 32-bit register `value` starting `shift` bits up."""
    return (value >> shift) & ((1 << (8 * size)) - 1)


class PrimeCell:
    """A PrimeCell behind a 4 KiB MMIO window: 32-bit registers guarded by one lock, and one level interrupt
    output driven through `irq.set_level` (devices/irq.py's IrqLine) only when its level changes.

    Subclasses give PERIPH_ID, `_read_reg(reg)`/`_write_reg(reg, value)` for word-aligned register offsets (the
    ID registers are answered here) and `_interrupt()`, the output's level; both run under `_lock`."""

    PERIPH_ID = 0

    def __init__(self, irq: IrqLine):
        self._irq = irq
        self._lock = threading.Lock()
        self._irq_level = False

    def read(self, offset: int, size: int) -> int:
        where = word_lane(offset, size)
        if where is None:
            return 0
        reg, shift = where
        with self._lock:
            value = self._read_reg(reg)
            self._update_irq()
        if value is None:
            value = id_register(reg, self.PERIPH_ID) or 0  # reserved and write-only registers read 0
        return narrow(value, shift, size)

    def write(self, offset: int, size: int, value: int) -> None:
        where = word_lane(offset, size)
        if where is None or where[1]:
            return
        with self._lock:
            self._write_reg(where[0], value & ((1 << (8 * size)) - 1))
            self._update_irq()

    def _read_reg(self, reg: int) -> int | None:
        """The register's value, or None where the device has none there."""
        raise NotImplementedError

    def _write_reg(self, reg: int, value: int) -> None:
        raise NotImplementedError

    def _interrupt(self) -> bool:
        raise NotImplementedError

    def _update_irq(self) -> None:
        level = self._interrupt()
        if level != self._irq_level:
            self._irq_level = level
            self._irq.set_level(level)
