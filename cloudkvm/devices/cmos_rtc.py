"""The PC's real-time clock and CMOS RAM (Motorola MC146818A datasheet; IBM PC AT Technical Reference, CMOS)."""
import math
import threading
import time
from typing import Callable

INDEX_PORT = 0  # offset of port 0x70: register index (write-only on the PC)
DATA_PORT = 1  # offset of port 0x71: data of the indexed register
INDEX_MASK = 0x7F  # bit 7 of port 0x70 is the PC's NMI mask, not part of the index (IBM PC AT Tech. Ref.)

# Time and calendar registers (MC146818A Figure 3, address map).
SECONDS = 0x00  # seconds
SECONDS_ALARM = 0x01  # seconds alarm
MINUTES = 0x02  # minutes
MINUTES_ALARM = 0x03  # minutes alarm
HOURS = 0x04  # hours; bit 7 = PM in 12-hour mode
HOURS_ALARM = 0x05  # hours alarm
DAY_OF_WEEK = 0x06  # day of week, 1 = Sunday
DAY_OF_MONTH = 0x07  # date of month
MONTH = 0x08  # month
YEAR = 0x09  # year within the century
REG_A = 0x0A  # register A: UIP (bit 7, read-only), divider DV2-0, rate select RS3-0
REG_B = 0x0B  # register B: SET, PIE, AIE, UIE, SQWE, DM, 24/12, DSE
REG_C = 0x0C  # register C: interrupt flags (read-only)
REG_D = 0x0D  # register D: VRT valid RAM and time (read-only)
CENTURY = 0x32  # century byte (IBM PC AT Tech. Ref. CMOS map; ACPI FADT CENTURY default on PCs)

REG_A_UIP = 0x80  # update in progress (MC146818A Register A)
REG_A_DEFAULT = 0x26  # 32.768 kHz time base, 1024 Hz rate: the value PC firmware programs (IBM PC AT Tech. Ref.)
REG_B_SET = 0x80  # SET: abort updates while the time is written (MC146818A Register B)
REG_B_DM_BINARY = 0x04  # DM: 1 = binary, 0 = BCD (MC146818A Register B)
REG_B_24H = 0x02  # 24/12: 1 = 24-hour mode (MC146818A Register B)
REG_B_DEFAULT = REG_B_24H  # 24-hour, BCD, no interrupts: the PC firmware default
REG_D_VRT = 0x80  # valid RAM and time (MC146818A Register D)
HOUR_PM = 0x80  # PM flag in the hours byte in 12-hour mode (MC146818A Table 2)

TIME_REGISTERS = (SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, CENTURY)
RAM_FIRST = 0x0E  # first general-purpose CMOS byte (MC146818A: 50 bytes at 0x0E-0x3F; PCs extend to 0x7F)


def days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 in the proleptic Gregorian calendar; any month/day overflow carries over."""
    year += (month - 1) // 12
    month = (month - 1) % 12 + 1
    if month <= 2:  # count years from March so the leap day is the year's last
        year -= 1
        month += 12
    era_days = 365 * year + year // 4 - year // 100 + year // 400
    return era_days + (153 * (month - 3) + 2) // 5 + day - 1 - 719468


def civil_from_days(days: int) -> tuple[int, int, int]:
    """(year, month, day) of a day count since 1970-01-01; the inverse of `days_from_civil`."""
    days += 719468  # days since 0000-03-01
    era, doe = divmod(days, 146097)  # 400-year eras of 146097 days
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153  # month counted from March
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return era * 400 + yoe + (month <= 2), month, day


class CmosRtc:
    """Two ports (0x70 index, 0x71 data); time follows `clock()` (UTC seconds) plus whatever the guest set."""

    def __init__(self, clock: Callable[[], float] = time.time, memory_bytes: dict[int, int] | None = None):
        self._clock = clock
        self._lock = threading.Lock()
        self._index = 0
        self._ram = bytearray(128)  # also holds the alarm bytes and registers A and B
        self._ram[REG_A] = REG_A_DEFAULT
        self._ram[REG_B] = REG_B_DEFAULT
        self._offset = 0.0  # guest time minus clock()
        self._frozen: float | None = None  # the guest time while SET holds the clock
        self._dow_adjust = 0  # guest-written day of week minus the calendar's, mod 7
        for index, value in (memory_bytes or {}).items():
            if not RAM_FIRST <= index <= INDEX_MASK or index == CENTURY or not 0 <= value <= 0xFF:
                raise ValueError(f"CMOS byte 0x{index:x}=0x{value:x}: only RAM bytes 0x0E-0x7F (not 0x32) hold 0-0xFF")
            self._ram[index] = value

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            value = 0
            for i in range(size):
                value |= self._read_byte(offset + i) << (8 * i)
            return value

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            for i in range(size):
                self._write_byte(offset + i, (value >> (8 * i)) & 0xFF)

    def _read_byte(self, offset: int) -> int:
        if offset != DATA_PORT:
            return 0xFF  # the index port is write-only; nothing drives the bus
        index = self._index
        if index in TIME_REGISTERS:
            return self._read_time(index)
        if index == REG_C:
            return 0  # no interrupt flags: this model raises no RTC interrupts
        if index == REG_D:
            return REG_D_VRT
        return self._ram[index]

    def _write_byte(self, offset: int, value: int) -> None:
        if offset == INDEX_PORT:
            self._index = value & INDEX_MASK
            return
        if offset != DATA_PORT:
            return
        index = self._index
        if index in TIME_REGISTERS:
            self._write_time(index, value)
        elif index == REG_A:
            self._ram[REG_A] = value & ~REG_A_UIP
        elif index == REG_B:
            self._write_reg_b(value)
        elif index not in (REG_C, REG_D):  # C and D are read-only
            self._ram[index] = value

    def _write_reg_b(self, value: int) -> None:
        was_set = self._ram[REG_B] & REG_B_SET
        self._ram[REG_B] = value
        if value & REG_B_SET and not was_set:
            self._frozen = self._now()
        elif was_set and not value & REG_B_SET:
            self._offset = self._frozen - self._clock()
            self._frozen = None

    def _now(self) -> float:
        return self._frozen if self._frozen is not None else self._clock() + self._offset

    def _encode(self, value: int) -> int:
        if self._ram[REG_B] & REG_B_DM_BINARY:
            return value & 0xFF
        return ((value // 10) % 10) << 4 | value % 10

    def _decode(self, byte: int) -> int:
        if self._ram[REG_B] & REG_B_DM_BINARY:
            return byte
        return (byte >> 4) * 10 + (byte & 0x0F)  # invalid BCD digits just carry, as the counters would

    def _read_time(self, index: int) -> int:
        seconds = math.floor(self._now())
        days, second_of_day = divmod(seconds, 86400)
        year, month, day = civil_from_days(days)
        hour, rest = divmod(second_of_day, 3600)
        minute, second = divmod(rest, 60)
        if index == SECONDS:
            return self._encode(second)
        if index == MINUTES:
            return self._encode(minute)
        if index == HOURS:
            if self._ram[REG_B] & REG_B_24H:
                return self._encode(hour)
            return self._encode(hour % 12 or 12) | (HOUR_PM if hour >= 12 else 0)
        if index == DAY_OF_WEEK:
            return self._encode((days + 4 + self._dow_adjust) % 7 + 1)  # 1970-01-01 was a Thursday
        if index == DAY_OF_MONTH:
            return self._encode(day)
        if index == MONTH:
            return self._encode(month)
        if index == YEAR:
            return self._encode(year % 100)
        return self._encode(year // 100 % 100)  # CENTURY

    def _write_time(self, index: int, byte: int) -> None:
        seconds = math.floor(self._now())
        days, second_of_day = divmod(seconds, 86400)
        year, month, day = civil_from_days(days)
        hour, rest = divmod(second_of_day, 3600)
        minute, second = divmod(rest, 60)
        if index == DAY_OF_WEEK:  # an independent counter on the chip: keep what was written
            self._dow_adjust = (self._decode(byte) - 1 - (days + 4)) % 7
            return
        if index == SECONDS:
            second = self._decode(byte)
        elif index == MINUTES:
            minute = self._decode(byte)
        elif index == HOURS:
            if self._ram[REG_B] & REG_B_24H:
                hour = self._decode(byte)
            else:
                hour = self._decode(byte & ~HOUR_PM) % 12 + (12 if byte & HOUR_PM else 0)
        elif index == DAY_OF_MONTH:
            day = self._decode(byte)
        elif index == MONTH:
            month = self._decode(byte)
        elif index == YEAR:
            year = year // 100 * 100 + self._decode(byte)
        else:  # CENTURY
            year = self._decode(byte) * 100 + year % 100
        written = float(days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second)
        if self._frozen is not None:
            self._frozen = written
        else:
            self._offset = written - self._clock()
