"""The C run loop's fast paths (kvm/_build.py `ckvm_run_loop`), accesses completed without returning to Python:
a console UART's status reads and data writes (a 16550's LSR/THR ports, a PL011's FR/DR by MMIO; the device
model keeps `state` true, the vCPU loops pass the bytes on), and the virtio-mmio interrupt registers (the
transports keep their InterruptStatus in cells the table points to)."""
from __future__ import annotations

from typing import Callable

from .native import ffi, lib


class FastUart:
    """`state` is the C view the UART model updates (`enabled`; a 16550's `lsr` and `thr`; a PL011's `fr` and
    `mmio_base`); `tx` the buffer every vCPU's run loop puts the data writes it completes in; `flush()` passes them
    on through `emit(take)`, which the model calls `take()` in under its output lock. A 16550's THR and LSR ports are in the port bus's `c_table` (devices/bus.py C_UART_THR,
    C_UART_LSR); a PL011 is found by `mmio_base` (non-zero)."""

    def __init__(self, emit: Callable[[Callable[[], bytes]], None]):
        self.state = ffi.new("struct ckvm_uart_fast *")
        self.tx = new_tx_buffer()
        self.emit = emit
        self._out = ffi.new("uint8_t[]", lib.CKVM_TX_MAX)

    def flush(self) -> None:
        """Pass on what the run loops buffered (before any other exit is handled, so output keeps its order): taken
        under the model's output lock, so bytes taken are out before any taken after them or written through the
        model."""
        self.emit(self._take)

    def _take(self) -> bytes:
        """The bytes pending in `tx`, which is left empty (under its lock: run loops may be adding to it)."""
        return bytes(ffi.buffer(self._out, lib.ckvm_tx_take(self.tx, self._out)))


def new_tx_buffer():
    """A buffer of data writes completed in C (`len` pending, `total` ever), shared by a machine's vCPUs."""
    return ffi.new("struct ckvm_tx *")



class IsrTable:
    """The C table of virtio-mmio interrupt registers (`table`, what ckvm_run_loop takes) for `windows`: (base,
    size, cell) triples where `cell` is a transport's `uint32_t *` InterruptStatus (`Bus.c_isr_windows`). Holds
    the cells alive as long as the table. At most CKVM_MAX_ISR_WINDOWS windows: any beyond stay with Python."""

    def __init__(self, windows):
        self.windows = list(windows)[:lib.CKVM_MAX_ISR_WINDOWS]
        self.table = ffi.new("struct ckvm_isr_table *")
        self.table.count = len(self.windows)
        for slot, (base, size, cell) in zip(self.table.windows, self.windows):
            slot.base, slot.size, slot.status = base, size, cell

    @property
    def served(self) -> int:
        """Accesses C completed so far (every vCPU's)."""
        return self.table.served
