"""ACPI 6.4 §4.8.3.7-4.8.3.8 hardware-reduced sleep control/status registers and §4.8.3.6 reset register."""
from typing import Callable

SLP_EN = 1 << 5  # ACPI 6.4 §4.8.3.7: sleep enable
SLP_TYP_SHIFT, SLP_TYP_MASK = 2, 0x7  # ACPI 6.4 §4.8.3.7: bits 4:2 hold the sleep type
S5_SLP_TYP = 5  # our \_S5 package value (the DSDT says the same)
RESET_VALUE = 0x01  # the value the FADT's RESET_VALUE field names

SLEEP_CONTROL, SLEEP_STATUS, RESET = 0, 1, 2  # byte offsets inside the 3-port block


class AcpiPowerControl:
    """Sleep control (offset 0), sleep status (1) and reset (2) registers: S5 → power off, reset value → reset."""

    def __init__(self, on_poweroff: Callable[[], None], on_reset: Callable[[], None]):
        self.on_poweroff = on_poweroff
        self.on_reset = on_reset
        self.status = 0

    def read(self, offset: int, size: int) -> int:
        return self.status if offset == SLEEP_STATUS else 0

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == SLEEP_CONTROL and value & SLP_EN:
            if (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == S5_SLP_TYP:
                self.on_poweroff()
        elif offset == SLEEP_STATUS:
            self.status &= ~value  # write-one-to-clear
        elif offset == RESET and value == RESET_VALUE:
            self.on_reset()
