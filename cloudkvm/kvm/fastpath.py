"""The C run loop's console fast path (kvm/_build.py `ckvm_run_loop`): a polled console UART's status reads and data
writes (a 16550's LSR/THR ports, a PL011's FR/DR by MMIO) completed without returning to Python; the device model
keeps `state` true, the vCPU loop passes the bytes on."""
from __future__ import annotations

from typing import Callable

from .native import ffi


class FastUart:
    """`state` is the C view the UART model updates (`enabled`; a 16550's `lsr`; a PL011's `fr` and `mmio_base`);
    `emit(bytes)` takes the bytes C buffered. A 16550's THR and LSR ports are in the port bus's `c_table`
    (devices/bus.py C_UART_THR, C_UART_LSR); a PL011 is found by `mmio_base` (non-zero)."""

    def __init__(self, emit: Callable[[bytes], None]):
        self.state = ffi.new("struct ckvm_uart_fast *")
        self.emit = emit


def new_tx_buffer():
    """One vCPU's buffer of THR bytes completed in C (`len` pending, `total` ever)."""
    return ffi.new("struct ckvm_tx *")


def take_tx(tx) -> bytes:
    """The bytes pending in `tx`, which is left empty."""
    data = bytes(ffi.buffer(tx.data, tx.len))
    tx.len = 0
    return data
