"""An address bus (port I/O or MMIO): non-overlapping ranges, each served by one device."""
import bisect
from typing import Protocol


class Device(Protocol):
    """What a bus device implements. Offsets are relative to the device's base; values are little-endian ints."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


# What the C run loop does at a port (kvm/_build.py `ckvm_run_loop`), one code per port in `Bus.c_table`.
C_PYTHON = 0    # return to Python: the device model handles the access
C_SINK = 1      # writes dropped, reads all ones (devices that say `c_sink = True`)
C_UART_THR = 2  # the console UART's THR writes, buffered while its model says they are plain
C_UART_LSR = 3  # the console UART's LSR reads, answered from the value its model publishes


class BusConflict(ValueError):
    """Two devices were placed on overlapping ranges (a board layout bug)."""


class Bus:
    """Ranges [base, base+size) mapped to devices; lookup is a bisect plus a small per-address memo."""

    MEMO_LIMIT = 4096

    def __init__(self, name: str, sink_ports: int = 0):
        self.name = name
        # One C_* code per port: what the C run loop completes without returning to Python (sinks, and the
        # fast paths a board wires with `c_ports`). Only port-I/O buses have it.
        self.c_table = bytearray(sink_ports) if sink_ports else None
        self._bases: list[int] = []
        self._entries: list[tuple[int, int, Device, str]] = []  # (base, size, device, label), sorted by base
        self._memo: dict[int, tuple[int, Device] | None] = {}
        # (base, size, cell) of every device with a `c_isr` cell: virtio-mmio transports whose interrupt registers
        # the C run loop completes (kvm/fastpath.py IsrTable)
        self.c_isr_windows: list[tuple[int, int, object]] = []

    def add(self, base: int, size: int, device: Device, label: str = "", c_ports: dict[int, int] | None = None) -> None:
        """Map `device` at [base, base+size). `c_ports` (offset -> C_* code) names the accesses the C run loop may
        complete for it; a device with `c_sink = True` has C_SINK on every port. A device with a `c_isr` cell (a
        virtio-mmio transport's InterruptStatus) is listed in `c_isr_windows`."""
        if size <= 0:
            raise BusConflict(f"{self.name}: {label or device!r} has an empty range")
        codes = dict.fromkeys(range(size), C_SINK) if getattr(device, "c_sink", False) else dict(c_ports or {})
        if any(not 0 <= offset < size for offset in codes):
            raise BusConflict(f"{self.name}: {label or device!r} names C-completed ports outside its range")
        i = bisect.bisect_left(self._bases, base)
        if i > 0 and self._entries[i - 1][0] + self._entries[i - 1][1] > base:
            raise BusConflict(f"{self.name}: {label} at 0x{base:x} overlaps {self._entries[i - 1][3]}")
        if i < len(self._entries) and base + size > self._entries[i][0]:
            raise BusConflict(f"{self.name}: {label} at 0x{base:x} overlaps {self._entries[i][3]}")
        self._bases.insert(i, base)
        self._entries.insert(i, (base, size, device, label or type(device).__name__))
        self._memo.clear()
        cell = getattr(device, "c_isr", None)
        if cell is not None:
            self.c_isr_windows.append((base, size, cell))
        if self.c_table is not None and base + size <= len(self.c_table):
            for offset, code in codes.items():
                self.c_table[base + offset] = code

    def lookup(self, addr: int) -> tuple[int, Device] | None:
        """(offset, device) serving `addr`, or None when nothing is mapped there."""
        try:
            return self._memo[addr]
        except KeyError:
            pass
        i = bisect.bisect_right(self._bases, addr) - 1
        hit = None
        if i >= 0:
            base, size, device, _ = self._entries[i]
            if addr < base + size:
                hit = (addr - base, device)
        if len(self._memo) < self.MEMO_LIMIT:
            self._memo[addr] = hit
        return hit

    def ranges(self) -> list[tuple[int, int, str]]:
        return [(base, size, label) for base, size, _, label in self._entries]
