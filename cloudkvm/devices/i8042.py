"""An 8042 keyboard controller with nothing attached (IBM PC AT Technical Reference, Keyboard Controller)."""
import threading
from collections import deque
from typing import Callable

DATA = 0  # offset of port 0x60: output buffer (read) / input buffer for data (write)
STATUS_COMMAND = 4  # offset of port 0x64: status register (read) / command (write)

# Status register bits (IBM PC AT Tech. Ref., Keyboard Controller status register).
STATUS_OBF = 0x01  # output buffer full: a byte waits at port 0x60
STATUS_IBF = 0x02  # input buffer full: never set, commands complete at once
STATUS_SYS = 0x04  # system flag: set by a passed self-test, or by command byte bit 2
STATUS_CMD = 0x08  # the last write was to port 0x64 (command) rather than 0x60 (data)
STATUS_UNLOCKED = 0x10  # keyboard not inhibited by the keylock switch

# Command byte bits (IBM PC AT Tech. Ref., controller command byte).
CTR_SYS = 0x04  # system flag, mirrored in status bit 2
CTR_KBD_DISABLE = 0x10  # keyboard interface disabled
CTR_AUX_DISABLE = 0x20  # auxiliary (mouse) interface disabled

# Controller commands written to port 0x64 (IBM PC AT Tech. Ref.; 0xA7-0xA9 from the PS/2 8042 extensions).
CMD_READ_CTR = 0x20  # read the command byte
CMD_WRITE_CTR = 0x60  # write the command byte (next data byte)
CMD_AUX_DISABLE = 0xA7  # disable the auxiliary interface
CMD_AUX_ENABLE = 0xA8  # enable the auxiliary interface
CMD_AUX_TEST = 0xA9  # auxiliary interface test: 0x00 = no error
CMD_SELF_TEST = 0xAA  # controller self-test: 0x55 = passed
CMD_KBD_TEST = 0xAB  # keyboard interface test: 0x00 = no error
CMD_KBD_DISABLE = 0xAD  # disable the keyboard interface
CMD_KBD_ENABLE = 0xAE  # enable the keyboard interface
CMD_READ_OUTPUT = 0xD0  # read the output port
CMD_WRITE_OUTPUT = 0xD1  # write the output port (next data byte)
CMD_PULSE_FIRST = 0xF0  # 0xF0-0xFF pulse output-port bits 0-3 low where the command's bit is 0 (0xFE: reset)

SELF_TEST_OK = 0x55  # self-test passed (IBM PC AT Tech. Ref.)
INTERFACE_OK = 0x00  # interface test: no error (IBM PC AT Tech. Ref.)
OUTPUT_RESET = 0x01  # output port bit 0: system reset, active low (IBM PC AT Tech. Ref., output port)
OUTPUT_A20 = 0x02  # output port bit 1: gate A20
OUTPUT_DEFAULT = OUTPUT_RESET | OUTPUT_A20  # running, A20 enabled (KVM never masks A20)
CTR_DEFAULT = 0x00  # no firmware has programmed the controller yet
OUTPUT_QUEUE_LIMIT = 16  # bound on queued replies (ours; the chip holds one byte)


class I8042:
    """Ports 0x60-0x64 as one 5-port range: offset 0 is data, offset 4 status/command, offsets 1-3 float."""

    def __init__(self, on_reset: Callable[[], None]):
        self._on_reset = on_reset
        self._lock = threading.Lock()
        self._out: deque[int] = deque()
        self._last_out = 0  # port 0x60 repeats its last byte when nothing new is queued
        self._ctr = CTR_DEFAULT
        self._sys = False
        self._last_was_command = False
        self._pending: int | None = None  # a command waiting for its data byte at port 0x60
        self._output_port = OUTPUT_DEFAULT

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            value = 0
            for i in range(size):
                value |= self._read_byte(offset + i) << (8 * i)
            return value

    def write(self, offset: int, size: int, value: int) -> None:
        resets = 0
        with self._lock:
            for i in range(size):
                resets += self._write_byte(offset + i, (value >> (8 * i)) & 0xFF)
        for _ in range(resets):  # outside the lock: the board may tear the machine down from here
            self._on_reset()

    def _read_byte(self, offset: int) -> int:
        if offset == DATA:
            if self._out:
                self._last_out = self._out.popleft()
            return self._last_out
        if offset == STATUS_COMMAND:
            return ((STATUS_OBF if self._out else 0) | (STATUS_SYS if self._sys else 0)
                    | (STATUS_CMD if self._last_was_command else 0) | STATUS_UNLOCKED)
        return 0xFF  # offsets 1-3 (0x61-0x63) are not the controller's

    def _write_byte(self, offset: int, value: int) -> int:
        """Handles one byte; returns 1 when it pulsed the reset line, else 0."""
        if offset == DATA:
            self._last_was_command = False
            command, self._pending = self._pending, None
            if command == CMD_WRITE_CTR:
                self._ctr = value
                self._sys = bool(value & CTR_SYS)
            elif command == CMD_WRITE_OUTPUT:
                self._output_port = value | OUTPUT_RESET  # the reset is a pulse, not a held line
                return 0 if value & OUTPUT_RESET else 1
            # Otherwise the byte is for the keyboard, and none is attached: ignore it.
            return 0
        if offset == STATUS_COMMAND:
            self._last_was_command = True
            self._pending = None
            return self._command(value)
        return 0

    def _command(self, command: int) -> int:
        if command in (CMD_WRITE_CTR, CMD_WRITE_OUTPUT):
            self._pending = command
        elif command == CMD_READ_CTR:
            self._reply(self._ctr)
        elif command == CMD_READ_OUTPUT:
            self._reply(self._output_port)
        elif command == CMD_SELF_TEST:
            self._sys = True
            self._reply(SELF_TEST_OK)
        elif command in (CMD_AUX_TEST, CMD_KBD_TEST):
            self._reply(INTERFACE_OK)
        elif command == CMD_AUX_DISABLE:
            self._ctr |= CTR_AUX_DISABLE
        elif command == CMD_AUX_ENABLE:
            self._ctr &= ~CTR_AUX_DISABLE
        elif command == CMD_KBD_DISABLE:
            self._ctr |= CTR_KBD_DISABLE
        elif command == CMD_KBD_ENABLE:
            self._ctr &= ~CTR_KBD_DISABLE
        elif command >= CMD_PULSE_FIRST and not command & OUTPUT_RESET:
            return 1  # pulse commands with bit 0 clear pulse the reset line (0xFE and the other even ones)
        return 0

    def _reply(self, byte: int) -> None:
        if len(self._out) < OUTPUT_QUEUE_LIMIT:
            self._out.append(byte)
