"""The Arm PrimeCell UART PL011 (ARM DDI 0183 r1p5 TRM §3) as Linux's amba-pl011 driver and earlycon use it."""
import threading
from collections import deque
from typing import Callable

from .irq import IrqLine
from .primecell import PrimeCell

# Register offsets (DDI 0183 Table 3-1).
DR = 0x000  # data: write transmits bits 7:0; read pops the receive FIFO, bits 11:8 = OE, BE, PE, FE
RSR_ECR = 0x004  # receive status (read) / error clear (write, any value)
FR = 0x018  # flags (read-only)
ILPR = 0x020  # IrDA low-power counter
IBRD = 0x024  # integer baud rate divisor, 16 bits
FBRD = 0x028  # fractional baud rate divisor, 6 bits
LCR_H = 0x02C  # line control
CR = 0x030  # control
IFLS = 0x034  # interrupt FIFO level select
IMSC = 0x038  # interrupt mask set/clear (1 = enabled)
RIS = 0x03C  # raw interrupt status (read-only)
MIS = 0x040  # masked interrupt status (read-only)
ICR = 0x044  # interrupt clear (write-only, 1 clears)
DMACR = 0x048  # DMA control

# Receive status bits, in DR bits 11:8 and RSR bits 3:0 (DDI 0183 §3.3.1-3.3.2).
DR_FE, DR_PE, DR_BE, DR_OE = 1 << 8, 1 << 9, 1 << 10, 1 << 11
RSR_OE = 1 << 3

# FR bits (DDI 0183 §3.3.3).
FR_CTS, FR_DSR, FR_DCD = 1 << 0, 1 << 1, 1 << 2
FR_BUSY = 1 << 3
FR_RXFE = 1 << 4
FR_TXFF = 1 << 5
FR_RXFF = 1 << 6
FR_TXFE = 1 << 7
FR_RI = 1 << 8

LCR_H_FEN = 1 << 4  # FIFO enable (DDI 0183 §3.3.7); clear: one-byte holding registers

# CR bits (DDI 0183 §3.3.8).
CR_UARTEN = 1 << 0
CR_LBE = 1 << 7  # loopback
CR_TXE = 1 << 8
CR_RXE = 1 << 9
CR_DTR, CR_RTS, CR_OUT1, CR_OUT2 = 1 << 10, 1 << 11, 1 << 12, 1 << 13
CR_MASK = 0xFF87  # bits 6:3 are reserved
CR_RESET = CR_TXE | CR_RXE  # 0x0300

IFLS_RESET = 0x12  # both FIFOs at half (DDI 0183 §3.3.9)

# Interrupt bits, the same in IMSC, RIS, MIS and ICR (DDI 0183 §3.3.10-3.3.13).
INT_RIM, INT_CTSM, INT_DCDM, INT_DSRM = 1 << 0, 1 << 1, 1 << 2, 1 << 3
INT_RX = 1 << 4
INT_TX = 1 << 5
INT_RT = 1 << 6  # receive timeout
INT_FE, INT_PE, INT_BE, INT_OE = 1 << 7, 1 << 8, 1 << 9, 1 << 10
INT_MASK = 0x7FF

# The ID registers as QEMU's hw/char/pl011.c reports them (pl011_id_arm: 0x11 0x10 0x14 0x00): part 0x011,
# designer 0x41 (Arm), revision 1. Linux's amba bus matches 0x00041011 under the mask 0x000fffff.
PERIPH_ID = 0x00141011

RX_FIFO_DEPTH = 32  # the r1p5 receive FIFO is 32 entries deep (DDI 0183); 1 with LCR_H.FEN clear
RX_BACKLOG = 4096  # host input waiting for FIFO space (ours: input is held back, as with flow control, not lost)
# RXIFLSEL (IFLS bits 5:3): receive interrupt at 1/8, 1/4, 1/2, 3/4, 7/8 full; 5-7 are reserved, taken as 1/2.
RX_TRIGGER_EIGHTHS = (1, 2, 4, 6, 7, 4, 4, 4)

# Registers a write simply sets, and the bits each keeps (DDI 0183 §3.3: their widths).
PLAIN = {ILPR: 0xFF, IBRD: 0xFFFF, FBRD: 0x3F, IFLS: 0x3F, IMSC: INT_MASK, DMACR: 0x7}
LCR_H_MASK = 0xFF


class Pl011(PrimeCell):
    """One PL011 behind a 4 KiB MMIO window. `on_output` gets transmitted bytes in order; `receive()` feeds host
    input. The interrupt output (UARTINTR, the OR of the masked sources) drives `irq.set_level`.

    The transmitter is infinitely fast: a byte written to DR leaves at once, so FR always shows an empty transmit
    FIFO (TXFE, never TXFF or BUSY), and TXRIS is raised after every DR write — the FIFO level has just fallen to
    or below its trigger: the TRM raises UARTTXINTR on that transition, not on the level (so not at reset), and
    Linux waits for it after it fills the FIFO and sets TXIM. Transmission does not wait for CR.UARTEN/TXE:
    Linux's earlycon writes DR without enabling the UART (firmware is expected to have), and QEMU transmits
    regardless too.

    Reception: host input waits in a backlog and moves into the receive FIFO (32 entries, 1 with FEN clear)
    while CR.UARTEN and CR.RXE are set and loopback is off; every DR read lets the next byte in. A byte entering
    the FIFO raises RTRIS at once (nothing more is arriving: the 32-bit-period timeout has passed), and RXRIS when
    the FIFO level rises to the RXIFLSEL trigger. RXRIS clears when reads take the level below the trigger, RTRIS
    when they empty the FIFO; ICR clears either. A FIFO-enable change keeps every byte: the ones a 1-entry FIFO
    cannot hold go back to the front of the backlog.

    Loopback (CR.LBE): transmitted bytes go to the receive FIFO instead of the host; one that finds the FIFO
    full is lost and sets OE (RSR.OE, OERIS, and DR.OE on the next byte that fits), as the TRM's overrun does.
    The modem lines read inactive, and in loopback follow RTS→CTS, DTR→DSR, Out1→DCD, Out2→RI; a change of one
    raises its modem interrupt."""

    PERIPH_ID = PERIPH_ID

    def __init__(self, irq: IrqLine, on_output: Callable[[bytes], None]):
        super().__init__(irq)
        self._on_output = on_output
        self._tx_lock = threading.Lock()  # keeps output in DR-write order without holding _lock in on_output
        self._tx = bytearray()  # what the current DR write transmitted (guarded by _tx_lock)
        self._fifo: deque[int] = deque()  # receive FIFO entries: data | DR_* status bits
        self._backlog: deque[int] = deque()  # host input not yet in the FIFO
        self._overrun = False  # the next byte into the FIFO carries DR_OE
        self._regs = dict.fromkeys(PLAIN, 0)
        self._regs[IFLS] = IFLS_RESET
        self._rsr = 0
        self._lcr_h = 0
        self._cr = CR_RESET
        self._ris = 0
        self._fast = None  # the C run loop's view of FR/DR (kvm.fastpath.FastUart.state), if any

    # --- host side -----------------------------------------------------------

    def receive(self, data: bytes) -> int:
        """Queue host input for the guest; returns how many bytes were taken (the rest is the caller's to retry)."""
        with self._lock:
            n = min(len(data), RX_BACKLOG - len(self._backlog))
            self._backlog.extend(data[:n])
            self._fill()
            self._update_irq()
            return n

    def rx_space(self) -> int:
        with self._lock:
            return RX_BACKLOG - len(self._backlog)

    def attach_fast_path(self, state, base: int) -> None:
        """Let a run loop complete FR reads and DR writes at `base` itself while they are plain (no loopback, no
        transmit interrupt enabled): `state.enabled`/`state.fr` are kept true after every access."""
        with self._lock:
            self._fast = state
            state.mmio_base = base
            self._publish()

    def emit(self, take) -> None:
        """Bytes the guest wrote to DR through the fast path, `take()` under the output lock (so a DR write this
        model handles meanwhile cannot go out first): out, in order, and TXRIS raised as a DR write here raises it
        (Linux enables TXIM after filling the FIFO and waits for it)."""
        with self._tx_lock:
            data = take()
            if not data:
                return
            self._on_output(data)
            with self._lock:
                self._ris |= INT_TX
                self._update_irq()

    def _update_irq(self) -> None:
        super()._update_irq()
        self._publish()

    def _publish(self) -> None:
        fast = self._fast
        if fast is None:
            return
        if self._cr & CR_LBE or self._regs[IMSC] & INT_TX:
            fast.enabled = 0
        else:
            fast.fr = self._flags()
            fast.enabled = 1

    # --- guest side ----------------------------------------------------------

    def write(self, offset: int, size: int, value: int) -> None:
        with self._tx_lock:
            super().write(offset, size, value)
            if self._tx:
                out, self._tx = bytes(self._tx), bytearray()
                self._on_output(out)

    def _read_reg(self, reg: int) -> int | None:
        if reg in self._regs:
            return self._regs[reg]
        if reg == DR:
            return self._pop()
        if reg == RSR_ECR:
            return self._rsr
        if reg == FR:
            return self._flags()
        if reg == LCR_H:
            return self._lcr_h
        if reg == CR:
            return self._cr
        if reg == RIS:
            return self._ris
        if reg == MIS:
            return self._ris & self._regs[IMSC]
        return None  # ICR is write-only; reserved and test registers read 0

    def _write_reg(self, reg: int, value: int) -> None:
        if reg in PLAIN:
            self._regs[reg] = value & PLAIN[reg]
        elif reg == DR:
            self._transmit(value & 0xFF)
        elif reg == RSR_ECR:
            self._rsr = 0
        elif reg == LCR_H:
            old_depth = self._depth()
            self._lcr_h = value & LCR_H_MASK
            self._refit(old_depth)
        elif reg == CR:
            before = self._modem_lines()
            self._cr = value & CR_MASK
            self._note_modem_change(before, self._modem_lines())
            self._fill()
        elif reg == ICR:
            self._ris &= ~value
        # DR's status bits, FR, RIS, MIS, the IDs and reserved offsets are read-only or nothing.

    # --- transmit --------------------------------------------------------------

    def _transmit(self, byte: int) -> None:
        if self._cr & CR_LBE:
            if self._cr & CR_UARTEN and self._cr & CR_RXE:
                self._push(byte)
        else:
            self._tx.append(byte)
        self._ris |= INT_TX  # the byte has left: the FIFO level fell to (or below) its trigger

    # --- receive ---------------------------------------------------------------

    def _depth(self) -> int:
        return RX_FIFO_DEPTH if self._lcr_h & LCR_H_FEN else 1

    def _trigger(self) -> int:
        if not self._lcr_h & LCR_H_FEN:
            return 1
        return RX_FIFO_DEPTH * RX_TRIGGER_EIGHTHS[(self._regs[IFLS] >> 3) & 7] // 8

    def _push(self, entry: int) -> None:
        """A character arrives at the receive FIFO (from the host or loopback)."""
        if len(self._fifo) >= self._depth():
            self._overrun = True
            self._rsr |= RSR_OE
            self._ris |= INT_OE
            return
        if self._overrun:
            entry |= DR_OE
            self._overrun = False
        self._fifo.append(entry)
        if len(self._fifo) == self._trigger():
            self._ris |= INT_RX
        self._ris |= INT_RT

    def _receiving(self) -> bool:
        cr = self._cr
        return bool(cr & CR_UARTEN and cr & CR_RXE and not cr & CR_LBE)

    def _fill(self) -> None:
        """Move host input into the FIFO while it has room and the receiver takes input from the line."""
        if not self._receiving():
            return
        depth = self._depth()
        while self._backlog and len(self._fifo) < depth:
            self._push(self._backlog.popleft())

    def _pop(self) -> int:
        if not self._fifo:
            return 0
        entry = self._fifo.popleft()
        if len(self._fifo) < self._trigger():
            self._ris &= ~INT_RX
        self._fill()
        if not self._fifo:
            self._ris &= ~INT_RT
        return entry

    def _refit(self, old_depth: int) -> None:
        """LCR_H.FEN changed the FIFO depth: what a 1-entry FIFO cannot hold goes back to the host backlog."""
        depth = self._depth()
        if depth < old_depth:
            while len(self._fifo) > depth:
                self._backlog.appendleft(self._fifo.pop() & 0xFF)
        self._fill()

    # --- flags and modem lines -------------------------------------------------

    def _flags(self) -> int:
        fr = FR_TXFE | self._modem_lines()
        if not self._fifo:
            fr |= FR_RXFE
        elif len(self._fifo) >= self._depth():
            fr |= FR_RXFF
        return fr

    def _modem_lines(self) -> int:
        cr = self._cr
        if not cr & CR_LBE:
            return 0
        return ((FR_CTS if cr & CR_RTS else 0) | (FR_DSR if cr & CR_DTR else 0)
                | (FR_DCD if cr & CR_OUT1 else 0) | (FR_RI if cr & CR_OUT2 else 0))

    def _note_modem_change(self, before: int, after: int) -> None:
        changed = before ^ after
        for line, interrupt in ((FR_CTS, INT_CTSM), (FR_DSR, INT_DSRM), (FR_DCD, INT_DCDM), (FR_RI, INT_RIM)):
            if changed & line:
                self._ris |= interrupt

    def _interrupt(self) -> bool:
        return bool(self._ris & self._regs[IMSC])
