"""A 16550A UART (National Semiconductor PC16550D datasheet, Table II register summary) as Linux's 8250 expects."""
import threading
from collections import deque
from typing import Callable

from .irq import IrqLine

# Register offsets (PC16550D Table II); DLAB is LCR bit 7.
RBR_THR_DLL = 0  # receiver buffer (read) / transmitter holding (write) / divisor latch LSB when DLAB=1
IER_DLM = 1  # interrupt enable / divisor latch MSB when DLAB=1
IIR_FCR = 2  # interrupt identification (read) / FIFO control (write)
LCR = 3  # line control
MCR = 4  # modem control
LSR = 5  # line status
MSR = 6  # modem status
SCR = 7  # scratch

# IER bits (PC16550D, Interrupt Enable Register).
IER_ERBFI = 0x01  # received data available interrupt enable
IER_ETBEI = 0x02  # transmitter holding register empty interrupt enable
IER_ELSI = 0x04  # receiver line status interrupt enable
IER_EDSSI = 0x08  # modem status interrupt enable

# IIR values (PC16550D Table IV, Interrupt Control Functions), highest priority first.
IIR_NONE = 0x01  # bit 0 set: no interrupt pending
IIR_RLS = 0x06  # receiver line status
IIR_RDA = 0x04  # received data available
IIR_THRE = 0x02  # transmitter holding register empty
IIR_MS = 0x00  # modem status
IIR_FIFO = 0xC0  # bits 6-7 set when FCR bit 0 enables the FIFOs

# FCR bits (PC16550D, FIFO Control Register).
FCR_ENABLE = 0x01  # FIFO enable
FCR_CLEAR_RX = 0x02  # clear the receiver FIFO (self-clearing)
FCR_CLEAR_TX = 0x04  # clear the transmitter FIFO (self-clearing)

LCR_DLAB = 0x80  # divisor latch access bit (PC16550D, Line Control Register)

# MCR bits (PC16550D, Modem Control Register).
MCR_DTR = 0x01  # data terminal ready
MCR_RTS = 0x02  # request to send
MCR_OUT1 = 0x04  # user output 1
MCR_OUT2 = 0x08  # user output 2; gates the IRQ line on PC boards
MCR_LOOP = 0x10  # diagnostic loopback
MCR_MASK = 0x1F  # bits 5-7 are always 0 on the 16550A

# LSR bits (PC16550D, Line Status Register).
LSR_DR = 0x01  # data ready
LSR_OE = 0x02  # overrun error (cleared by reading LSR)
LSR_THRE = 0x20  # transmitter holding register empty
LSR_TEMT = 0x40  # transmitter empty

# MSR bits (PC16550D, Modem Status Register): deltas in bits 0-3, line states in bits 4-7.
MSR_DCTS = 0x01  # delta clear to send
MSR_DDSR = 0x02  # delta data set ready
MSR_TERI = 0x04  # trailing edge ring indicator
MSR_DDCD = 0x08  # delta data carrier detect
MSR_CTS = 0x10  # clear to send
MSR_DSR = 0x20  # data set ready
MSR_RI = 0x40  # ring indicator
MSR_DCD = 0x80  # data carrier detect

RX_CAPACITY = 4096  # host-side receive buffer bound (ours; the chip's FIFO holds 16)


class Uart16550:
    """Eight byte-wide registers at offsets 0-7; `receive()` feeds input from the host side."""

    def __init__(self, irq: IrqLine, on_output: Callable[[bytes], None]):
        self._irq = irq
        self._on_output = on_output
        self._lock = threading.Lock()  # guards the register state
        self._tx_lock = threading.Lock()  # keeps output in THR-write order without holding _lock in on_output
        self._rx: deque[int] = deque()
        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._fcr = 0
        self._lsr_err = 0  # latched error bits (only OE is modelled)
        self._msr_delta = 0
        self._scr = 0
        self._dll = 0x0C  # 9600 baud at the PC's 1.8432 MHz clock; Linux reprograms it
        self._dlm = 0
        self._thre_pending = False
        self._irq_level = False
        self._fast = None  # the C run loop's view of LSR/THR (kvm.fastpath.FastUart.state), if any

    def attach_fast_path(self, state) -> None:
        """Keep `state.enabled`/`state.lsr`/`state.thr` true so a run loop may complete LSR reads and THR writes."""
        with self._lock:
            self._fast = state
            self._publish()

    def emit(self, take) -> None:
        """Bytes the guest wrote to THR while the fast path took them, `take()` under the output lock (so a THR write
        this model handles meanwhile cannot go out first); straight out."""
        with self._tx_lock:
            data = take()
            if data:
                self._on_output(data)

    # --- host side -----------------------------------------------------------

    def receive(self, data: bytes) -> int:
        """Queue bytes for the guest to read; returns how many fit (the rest is the caller's to retry)."""
        with self._lock:
            n = min(len(data), RX_CAPACITY - len(self._rx))
            self._rx.extend(data[:n])
            self._update_irq()
            return n

    def rx_space(self) -> int:
        with self._lock:
            return RX_CAPACITY - len(self._rx)

    # --- guest side ----------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            value = 0
            for i in range(size):
                value |= self._read_byte(offset + i) << (8 * i)
            self._update_irq()
            return value

    def write(self, offset: int, size: int, value: int) -> None:
        with self._tx_lock:
            out = bytearray()
            with self._lock:
                for i in range(size):
                    self._write_byte(offset + i, (value >> (8 * i)) & 0xFF, out)
                self._update_irq()
            if out:
                self._on_output(bytes(out))

    def _read_byte(self, offset: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                return self._dll
            return self._rx.popleft() if self._rx else 0
        if offset == IER_DLM:
            return self._dlm if dlab else self._ier
        if offset == IIR_FCR:
            iid = self._pending()
            if iid == IIR_THRE:
                self._thre_pending = False  # reading IIR clears THRE when it is the reported source
            return iid | (IIR_FIFO if self._fcr & FCR_ENABLE else 0)
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            value = self._lsr()
            self._lsr_err = 0
            return value
        if offset == MSR:
            value = self._msr_lines() | self._msr_delta
            self._msr_delta = 0
            return value
        if offset == SCR:
            return self._scr
        return 0

    def _write_byte(self, offset: int, value: int, out: bytearray) -> None:
        dlab = self._lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                self._dll = value
            else:
                self._transmit(value, out)
        elif offset == IER_DLM:
            if dlab:
                self._dlm = value
            else:
                rising = value & ~self._ier & IER_ETBEI
                self._ier = value & 0x0F
                if rising:
                    self._thre_pending = True  # THR is always empty, so enabling ETBEI raises THRE
                elif not self._ier & IER_ETBEI:
                    self._thre_pending = False
        elif offset == IIR_FCR:
            self._fcr = value & ~(FCR_CLEAR_RX | FCR_CLEAR_TX)
            if value & FCR_CLEAR_RX:
                self._rx.clear()
            # FCR_CLEAR_TX: the transmitter never holds bytes, so there is nothing to clear.
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            before = self._msr_lines()
            self._mcr = value & MCR_MASK
            self._note_msr_change(before, self._msr_lines())
        elif offset == SCR:
            self._scr = value
        # LSR and MSR are read-only; other offsets are outside the device.

    def _transmit(self, byte: int, out: bytearray) -> None:
        if self._mcr & MCR_LOOP:
            if len(self._rx) < RX_CAPACITY:
                self._rx.append(byte)
            else:
                self._lsr_err |= LSR_OE
        else:
            out.append(byte)
        # The byte leaves at once, so THR is empty again: THRE is re-raised if enabled.
        self._thre_pending = bool(self._ier & IER_ETBEI)

    def _lsr(self) -> int:
        return LSR_THRE | LSR_TEMT | self._lsr_err | (LSR_DR if self._rx else 0)

    def _msr_lines(self) -> int:
        mcr = self._mcr
        if not mcr & MCR_LOOP:
            return MSR_DCD | MSR_DSR | MSR_CTS
        # Loopback wiring (PC16550D, Modem Control Register bit 4): RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD.
        return ((MSR_CTS if mcr & MCR_RTS else 0) | (MSR_DSR if mcr & MCR_DTR else 0)
                | (MSR_RI if mcr & MCR_OUT1 else 0) | (MSR_DCD if mcr & MCR_OUT2 else 0))

    def _note_msr_change(self, before: int, after: int) -> None:
        changed = before ^ after
        if changed & MSR_CTS:
            self._msr_delta |= MSR_DCTS
        if changed & MSR_DSR:
            self._msr_delta |= MSR_DDSR
        if before & MSR_RI and not after & MSR_RI:
            self._msr_delta |= MSR_TERI
        if changed & MSR_DCD:
            self._msr_delta |= MSR_DDCD

    def _pending(self) -> int:
        """The highest-priority enabled interrupt source (PC16550D Table IV), or IIR_NONE."""
        ier = self._ier
        if ier & IER_ELSI and self._lsr_err:
            return IIR_RLS
        if ier & IER_ERBFI and self._rx:
            return IIR_RDA
        if ier & IER_ETBEI and self._thre_pending:
            return IIR_THRE
        if ier & IER_EDSSI and self._msr_delta:
            return IIR_MS
        return IIR_NONE

    def _update_irq(self) -> None:
        level = self._pending() != IIR_NONE and bool(self._mcr & MCR_OUT2)
        if level != self._irq_level:
            self._irq_level = level
            self._irq.set_level(level)
        self._publish()

    def _publish(self) -> None:
        """Tell the fast path whether LSR reads and THR writes are plain now, and what LSR reads. Both: no divisor
        latch, no loopback, no latched error for a read to clear. THR writes also: no THRE interrupt to raise, so
        polled transmit, or THRE already pending with the line already at the level it gives (Linux's
        serial8250_tx_chars after the first byte of each burst)."""
        fast = self._fast
        if fast is None:
            return
        plain = not (self._lcr & LCR_DLAB or self._mcr & MCR_LOOP or self._lsr_err)
        if plain:
            fast.lsr = self._lsr()
        fast.enabled = int(plain)
        fast.thr = int(plain and (not self._ier & IER_ETBEI
                                  or self._thre_pending and self._irq_level == bool(self._mcr & MCR_OUT2)))
