"""Pl011 driven the way Linux drives it: the amba bus probe, earlycon's pl011_putc, and amba-pl011.c's startup,
termios, interrupt handler and transmit paths (register sequences from drivers/tty/serial/amba-pl011.c; bit values
from include/linux/amba/serial.h, not from the model)."""
import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from cloudkvm.devices.pl011 import RX_BACKLOG, Pl011
from device_probe import LevelLine, access, hostile_accesses

# include/linux/amba/serial.h
DR, RSR_ECR, FR, ILPR, IBRD, FBRD, LCRH, CR, IFLS, IMSC, RIS, MIS, ICR, DMACR = (
    0x00, 0x04, 0x18, 0x20, 0x24, 0x28, 0x2C, 0x30, 0x34, 0x38, 0x3C, 0x40, 0x44, 0x48)
DR_OE = 1 << 11
RSR_OE = 0x08
FR_CTS, FR_DSR, FR_DCD, FR_BUSY, FR_RXFE, FR_TXFF, FR_RXFF, FR_TXFE, FR_RI = (
    0x001, 0x002, 0x004, 0x008, 0x010, 0x020, 0x040, 0x080, 0x100)
LCRH_FEN, LCRH_WLEN_8 = 0x10, 0x60
CR_UARTEN, CR_LBE, CR_TXE, CR_RXE, CR_DTR, CR_RTS, CR_OUT1, CR_OUT2 = (
    0x0001, 0x0080, 0x0100, 0x0200, 0x0400, 0x0800, 0x1000, 0x2000)
RIMIS, CTSMIS, DCDMIS, DSRMIS = 1 << 0, 1 << 1, 1 << 2, 1 << 3
RXIS, TXIS, RTIS, FEIS, PEIS, BEIS, OEIS = 1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 8, 1 << 9, 1 << 10
RXIM, TXIM, RTIM = RXIS, TXIS, RTIS
IFLS_RX4_8, IFLS_TX4_8 = 0x10, 0x02
IFLS_RX1_8, IFLS_RX7_8 = 0x00, 0x20
AMBA_CID = 0xB105F00D
FIFOSIZE = 16  # amba-pl011.c get_fifosize_arm: amba_rev < 3 ? 16 : 32 (the ID says revision 1)


def make():
    line, out = LevelLine(), []
    return Pl011(line, out.append), line, out


def readw(u, off):  # amba-pl011.c pl011_read for UPIO_MEM ports (the DT gives no reg-io-width): readw_relaxed
    return u.read(off, 2)


def writew(u, off, value):
    u.write(off, 2, value)


def output(out) -> bytes:
    return b"".join(out)


class LinuxPort:
    """The parts of amba-pl011.c's uart_amba_port that the tests exercise, transcribed from the driver."""

    def __init__(self, u):
        self.u = u
        self.im = 0
        self.xmit = bytearray()
        self.received = bytearray()

    def startup(self):  # pl011_startup: pl011_hwinit, pl011_allocate_irq, IFLS, CR, pl011_enable_interrupts
        writew(self.u, ICR, OEIS | BEIS | PEIS | FEIS | RTIS | RXIS)
        self.im = readw(self.u, IMSC)
        writew(self.u, IMSC, RTIM | RXIM)
        writew(self.u, IMSC, self.im)
        writew(self.u, IFLS, IFLS_RX4_8 | IFLS_TX4_8)
        cr = readw(self.u, CR) & (CR_RTS | CR_DTR)
        writew(self.u, CR, cr | CR_UARTEN | CR_RXE | CR_TXE)
        readw(self.u, FR)
        writew(self.u, ICR, RTIS | RXIS)
        for _ in range(FIFOSIZE * 2):  # drain what arrived before the port was opened
            if readw(self.u, FR) & FR_RXFE:
                break
            readw(self.u, DR)
        self.im = RTIM | RXIM
        writew(self.u, IMSC, self.im)

    def set_termios(self, quot=0x1A0):  # 8N1 with FIFOs (uap->fifosize > 1)
        writew(self.u, FBRD, quot & 0x3F)
        writew(self.u, IBRD, quot >> 6)
        writew(self.u, LCRH, LCRH_WLEN_8 | LCRH_FEN)
        writew(self.u, CR, readw(self.u, CR))

    def tx_chars(self, from_irq):  # pl011_tx_chars + pl011_tx_char (no x_char, no DMA)
        count = FIFOSIZE >> 1
        while self.xmit:
            if from_irq:
                if count == 0:
                    break
                count -= 1
            if not from_irq and readw(self.u, FR) & FR_TXFF:
                break
            writew(self.u, DR, self.xmit.pop(0))
        if not self.xmit:
            self.im &= ~TXIM  # pl011_stop_tx
            writew(self.u, IMSC, self.im)
            return False
        return True

    def start_tx(self, data: bytes):  # pl011_start_tx_pio
        self.xmit += data
        if self.tx_chars(from_irq=False):
            self.im |= TXIM
            writew(self.u, IMSC, self.im)

    def interrupt(self) -> bool:  # pl011_int
        status = readw(self.u, RIS) & self.im
        if not status:
            return False
        for _ in range(256):
            writew(self.u, ICR, status & ~(TXIS | RTIS | RXIS))
            if status & (RTIS | RXIS):
                for _ in range(256):  # pl011_fifo_to_tty
                    if readw(self.u, FR) & FR_RXFE:
                        break
                    self.received.append(readw(self.u, DR) & 0xFF)
            if status & TXIS:
                self.tx_chars(from_irq=True)
            status = readw(self.u, RIS) & self.im
            if not status:
                break
        return True


def opened_port():
    u, line, out = make()
    port = LinuxPort(u)
    port.set_termios()
    port.startup()
    return u, line, out, port


# --- probe and reset ----------------------------------------------------------------------------------------------

def test_amba_bus_reads_the_ids_linux_matches():
    u, _, _ = make()
    # drivers/amba/bus.c amba_read_periphid: 8 bits from each of 4 words below size - 0x20 and size - 0x10
    pid = sum((u.read(0x1000 - 0x20 + 4 * i, 4) & 255) << (8 * i) for i in range(4))
    cid = sum((u.read(0x1000 - 0x10 + 4 * i, 4) & 255) << (8 * i) for i in range(4))
    assert cid == AMBA_CID
    assert pid & 0x000FFFFF == 0x00041011  # amba-pl011.c pl011_ids
    # QEMU hw/char/pl011.c pl011_id_arm, byte for byte
    assert [u.read(off, 4) for off in range(0xFE0, 0x1000, 4)] == [0x11, 0x10, 0x14, 0x00, 0x0D, 0xF0, 0x05, 0xB1]


def test_reset_values():
    u, line, out = make()
    assert readw(u, CR) == CR_TXE | CR_RXE  # 0x0300 (DDI 0183 §3.3.8)
    assert readw(u, IFLS) == 0x12
    assert readw(u, FR) == FR_TXFE | FR_RXFE
    for reg in (RSR_ECR, ILPR, IBRD, FBRD, LCRH, IMSC, RIS, MIS, DMACR):
        assert readw(u, reg) == 0, hex(reg)
    assert line.changes == [] and out == []


# --- transmit -----------------------------------------------------------------------------------------------------

def test_earlycon_putc_without_enabling_the_uart():
    # drivers/tty/serial/amba-pl011.c pl011_putc (earlycon=pl011,0x9000000: UPIO_MEM, so writeb for DR)
    u, line, out = make()
    for ch in b"Booting Linux\n":
        while u.read(FR, 4) & FR_TXFF:
            pass
        u.write(DR, 1, ch)
        assert not u.read(FR, 4) & FR_BUSY
    assert output(out) == b"Booting Linux\n"
    assert line.changes == []  # nothing enabled, nothing raised


def test_console_write_sequence():
    # pl011_console_write: enable UART and TX, putchar with TXFF polling, wait for !BUSY, restore CR
    u, _, out = make()
    old_cr = readw(u, CR)
    writew(u, CR, (old_cr & ~0x8000) | CR_UARTEN | CR_TXE)
    for ch in b"console\r\n":
        assert not readw(u, FR) & FR_TXFF
        writew(u, DR, ch)
    assert not readw(u, FR) & FR_BUSY
    writew(u, CR, old_cr)
    assert output(out) == b"console\r\n"
    assert readw(u, CR) == old_cr


def test_only_the_data_byte_of_a_dr_write_is_sent():
    u, _, out = make()
    u.write(DR, 4, 0xFFFF_FF41)
    assert output(out) == b"A"


def test_pio_transmit_writes_everything_while_the_fifo_never_fills():
    u, line, out, port = opened_port()
    text = bytes(range(32, 127)) * 3
    port.start_tx(text)
    assert output(out) == text
    assert not port.im & TXIM  # pl011_tx_chars emptied the buffer and stopped TX: no interrupt needed
    assert not line.level


def test_txis_is_raised_when_the_fifo_drains_below_its_trigger_not_at_reset():
    u, line, out, port = opened_port()
    writew(u, IMSC, port.im | TXIM)  # enabling TXIM before anything was written raises nothing (DDI 0183: a transition)
    assert not readw(u, RIS) & TXIS and not line.level
    writew(u, DR, ord("x"))  # the byte leaves at once: the level falls through the trigger
    assert readw(u, RIS) & TXIS and readw(u, MIS) & TXIS
    assert line.level
    writew(u, ICR, TXIS)
    assert not readw(u, RIS) & TXIS and not line.level
    writew(u, IMSC, port.im)


def test_interrupt_driven_transmit_runs_to_the_end_and_masks_txim():
    # The driver fills the FIFO with TXIM set and sends the rest from pl011_int in fifosize/2 chunks.
    u, line, out, port = opened_port()
    port.xmit += b"0123456789" * 5
    writew(u, DR, port.xmit.pop(0))  # the part pl011_start_tx_pio wrote before it set TXIM
    port.im |= TXIM
    writew(u, IMSC, port.im)
    assert line.level  # TXIS: the FIFO level has dropped
    rounds = 0
    while line.level:
        assert port.interrupt()
        rounds += 1
        assert rounds < 10
    assert output(out) == b"0123456789" * 5
    assert not port.im & TXIM and readw(u, IMSC) == RTIM | RXIM


def test_concurrent_dr_writes_lose_no_byte():
    u, _, out = make()

    def writer(ch):
        for _ in range(2000):
            u.write(DR, 1, ch)

    threads = [threading.Thread(target=writer, args=(c,)) for c in b"ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = output(out)
    assert sorted(data) == sorted(b"a" * 2000 + b"b" * 2000)
    assert all(len(chunk) == 1 for chunk in out)  # one callback per byte, each under the transmit lock


# --- receive ------------------------------------------------------------------------------------------------------

def test_linux_interrupt_handler_receives_host_input():
    u, line, out, port = opened_port()
    assert not line.level
    assert u.receive(b"root\r") == 5
    assert line.level  # RTIS: the FIFO holds data and no more is coming
    assert readw(u, MIS) & RTIS
    assert port.interrupt()
    assert bytes(port.received) == b"root\r"
    assert not line.level  # reading the FIFO empty cleared the timeout interrupt
    assert readw(u, RIS) & (RTIS | RXIS) == 0


def test_receive_trigger_level_from_ifls():
    u, line, _ = make()
    writew(u, LCRH, LCRH_WLEN_8 | LCRH_FEN)
    writew(u, CR, CR_UARTEN | CR_RXE | CR_TXE)
    writew(u, IFLS, IFLS_RX4_8)  # trigger at 16 of 32
    writew(u, IMSC, RXIM)  # only the FIFO-level interrupt
    u.receive(b"x" * 15)
    assert readw(u, RIS) & (RXIS | RTIS) == RTIS and not line.level
    u.receive(b"y")
    assert readw(u, RIS) & RXIS and line.level
    readw(u, DR)  # 15 left: below the trigger again
    assert not readw(u, RIS) & RXIS and not line.level
    assert readw(u, RIS) & RTIS  # the timeout interrupt stays until the FIFO is empty
    for _ in range(15):
        readw(u, DR)
    assert not readw(u, RIS) & RTIS


def test_rx_trigger_levels_one_eighth_and_seven_eighths():
    for ifls, trigger in ((IFLS_RX1_8, 4), (IFLS_RX7_8, 28)):
        u, _, _ = make()
        writew(u, LCRH, LCRH_FEN)
        writew(u, CR, CR_UARTEN | CR_RXE)
        writew(u, IFLS, ifls)
        u.receive(b"z" * (trigger - 1))
        assert not readw(u, RIS) & RXIS
        u.receive(b"z")
        assert readw(u, RIS) & RXIS


def test_fifo_holds_32_and_the_rest_waits_in_order():
    u, _, _ = make()
    writew(u, LCRH, LCRH_WLEN_8 | LCRH_FEN)
    writew(u, CR, CR_UARTEN | CR_RXE | CR_TXE)
    data = bytes(range(100))
    assert u.receive(data) == 100
    assert readw(u, FR) & FR_RXFF  # 32 in the FIFO; the other 68 are held back, not overrun
    assert not readw(u, RSR_ECR) & RSR_OE
    got = bytearray()
    while not readw(u, FR) & FR_RXFE:
        entry = readw(u, DR)
        assert not entry & 0xF00
        got.append(entry & 0xFF)
    assert bytes(got) == data


def test_without_fen_the_fifo_is_one_byte_deep():
    u, _, _ = make()
    writew(u, CR, CR_UARTEN | CR_RXE)
    u.receive(b"abc")
    assert readw(u, FR) & (FR_RXFF | FR_RXFE) == FR_RXFF
    assert [readw(u, DR) for _ in range(3)] == list(b"abc")
    assert readw(u, FR) & FR_RXFE


def test_clearing_fen_keeps_the_bytes_the_one_byte_fifo_cannot_hold():
    u, _, _ = make()
    writew(u, LCRH, LCRH_FEN)
    writew(u, CR, CR_UARTEN | CR_RXE)
    u.receive(b"hello")
    writew(u, LCRH, 0)
    got = bytearray()
    while not readw(u, FR) & FR_RXFE:
        assert readw(u, FR) & FR_RXFF
        got.append(readw(u, DR))
    assert bytes(got) == b"hello"


def test_input_waits_until_the_receiver_is_enabled():
    u, line, _ = make()
    writew(u, IMSC, RXIM | RTIM)
    assert u.receive(b"early") == 5
    assert readw(u, FR) & FR_RXFE and not line.level  # UARTEN is clear at reset
    writew(u, CR, CR_UARTEN | CR_TXE)  # still no RXE
    assert readw(u, FR) & FR_RXFE
    writew(u, CR, CR_UARTEN | CR_TXE | CR_RXE)
    assert not readw(u, FR) & FR_RXFE and line.level
    assert readw(u, DR) == ord("e")


def test_backlog_is_bounded_and_rx_space_reports_it():
    u, _, _ = make()
    assert u.rx_space() == RX_BACKLOG
    assert u.receive(b"q" * (RX_BACKLOG + 10)) == RX_BACKLOG  # receiver off: everything waits in the backlog
    assert u.rx_space() == 0
    assert u.receive(b"more") == 0
    writew(u, CR, CR_UARTEN | CR_RXE)  # one byte moves into the (FEN-clear) FIFO
    assert u.rx_space() == 1


def test_input_from_the_io_thread_reaches_the_interrupt_handler_in_order():
    u, line, _, port = opened_port()
    data = bytes(i % 251 for i in range(20000))

    def io_thread():  # the host side hands over whatever fits, and retries the rest
        sent = 0
        while sent < len(data):
            sent += u.receive(data[sent:sent + 700])

    t = threading.Thread(target=io_thread)
    t.start()
    while len(port.received) < len(data):
        if line.level:  # the vCPU takes the interrupt
            port.interrupt()
    t.join()
    assert bytes(port.received) == data
    assert not line.level


def test_empty_fifo_reads_zero():
    u, _, _ = make()
    writew(u, CR, CR_UARTEN | CR_RXE)
    assert readw(u, DR) == 0 and readw(u, FR) & FR_RXFE


# --- loopback and overrun -----------------------------------------------------------------------------------------

def test_loopback_overrun_sets_oe_and_flags_the_next_byte():
    u, line, out = make()
    writew(u, LCRH, LCRH_WLEN_8 | LCRH_FEN)
    writew(u, CR, CR_UARTEN | CR_RXE | CR_TXE | CR_LBE)
    writew(u, IMSC, OEIS)
    for i in range(32):
        writew(u, DR, 0x40 + i)
    assert readw(u, FR) & FR_RXFF and not line.level
    writew(u, DR, ord("!"))  # the FIFO is full: this one is lost
    assert readw(u, RSR_ECR) & RSR_OE and readw(u, RIS) & OEIS and line.level
    assert out == []  # loopback sends nothing to the host
    assert readw(u, DR) == 0x40  # the FIFO contents stay valid
    writew(u, DR, ord("+"))  # the first byte after the overrun carries OE
    entries = [readw(u, DR) for _ in range(32)]
    assert [e & 0xFF for e in entries] == [0x40 + i for i in range(1, 32)] + [ord("+")]
    assert [e & DR_OE for e in entries] == [0] * 31 + [DR_OE]
    writew(u, RSR_ECR, 0)  # any write to UARTECR clears the status
    assert readw(u, RSR_ECR) == 0
    writew(u, ICR, OEIS)
    assert not line.level


def test_host_input_is_not_taken_in_loopback():
    u, _, _ = make()
    writew(u, CR, CR_UARTEN | CR_RXE | CR_LBE)
    u.receive(b"x")
    assert readw(u, FR) & FR_RXFE
    writew(u, CR, CR_UARTEN | CR_RXE)
    assert readw(u, DR) == ord("x")


def test_loopback_modem_lines_and_their_interrupts():
    u, line, _ = make()
    writew(u, IMSC, RIMIS | CTSMIS | DCDMIS | DSRMIS)
    assert readw(u, FR) & (FR_CTS | FR_DSR | FR_DCD | FR_RI) == 0
    writew(u, CR, CR_LBE | CR_RTS | CR_OUT2)
    assert readw(u, FR) & (FR_CTS | FR_DSR | FR_DCD | FR_RI) == FR_CTS | FR_RI
    assert u.read(FR + 1, 1) == FR_RI >> 8  # a byte read of FR's second lane
    assert readw(u, RIS) & (RIMIS | CTSMIS | DCDMIS | DSRMIS) == RIMIS | CTSMIS
    assert line.level
    writew(u, ICR, 0x7FF)
    assert not line.level
    writew(u, CR, CR_LBE | CR_RTS | CR_OUT2 | CR_DTR | CR_OUT1)
    assert readw(u, RIS) == DSRMIS | DCDMIS


# --- registers, sizes, unknown offsets ----------------------------------------------------------------------------

def test_register_widths():
    u, _, _ = make()
    for reg, width_mask in ((ILPR, 0xFF), (IBRD, 0xFFFF), (FBRD, 0x3F), (LCRH, 0xFF), (IFLS, 0x3F),
                            (IMSC, 0x7FF), (DMACR, 0x7), (CR, 0xFF87)):
        u.write(reg, 4, 0xFFFFFFFF)
        assert u.read(reg, 4) == width_mask, hex(reg)


def snapshot(u):
    return [u.read(reg, 4) for reg in (RSR_ECR, FR, ILPR, IBRD, FBRD, LCRH, CR, IFLS, IMSC, RIS, MIS, DMACR)]


def test_unknown_offsets_read_zero_and_ignore_writes():
    u, line, out = make()
    writew(u, CR, CR_UARTEN | CR_RXE | CR_TXE)
    writew(u, IBRD, 0x1A)
    before = snapshot(u)
    for off in (0x008, 0x00C, 0x010, 0x014, 0x01C, 0x04C, 0x07C, 0x080, 0x08C, 0x100, 0xFDC, 0x1000, -4):
        assert u.read(off, 4) == 0, hex(off)
        u.write(off, 4, 0xFFFFFFFF)
    assert u.read(ICR, 4) == 0  # write-only
    for reg in (FR, RIS, MIS) + tuple(range(0xFE0, 0x1000, 4)):  # read-only
        u.write(reg, 4, 0xFFFFFFFF)
    assert snapshot(u) == before
    assert out == [] and line.changes == []


def test_narrow_and_odd_accesses():
    u, _, out = make()
    u.write(IBRD, 4, 0x1234)
    assert u.read(IBRD, 1) == 0x34 and u.read(IBRD + 1, 1) == 0x12 and u.read(IBRD, 2) == 0x1234
    assert u.read(IBRD + 2, 2) == 0
    u.write(IBRD, 1, 0x56)  # a narrow write at the register's offset writes the value zero-extended
    assert u.read(IBRD, 4) == 0x56
    u.write(IBRD + 1, 1, 0x77)  # another byte lane: ignored
    u.write(IBRD, 8, 0x99)  # wider than the APB word: ignored, reads 0
    u.write(IBRD + 2, 4, 0x99)  # crosses a word: ignored
    u.write(IBRD, 3, 0x99)
    assert u.read(IBRD, 4) == 0x56
    assert u.read(IBRD, 8) == 0 and u.read(IBRD + 3, 2) == 0 and u.read(IBRD, 0) == 0
    u.write(DR + 1, 1, ord("x"))
    assert out == []


def test_on_output_may_feed_input_back_without_deadlock():
    line = LevelLine()
    holder = []
    u = Pl011(line, lambda b: holder[0].receive(b))
    holder.append(u)
    writew(u, CR, CR_UARTEN | CR_RXE | CR_TXE)
    writew(u, DR, ord("e"))
    assert readw(u, DR) == ord("e")


# --- a malicious guest --------------------------------------------------------------------------------------------

ops = st.one_of(hostile_accesses([DR, RSR_ECR, FR, LCRH, CR, IFLS, IMSC, RIS, MIS, ICR]),
                st.tuples(st.just("receive"), st.binary(max_size=80)))


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=80))
def test_no_access_sequence_raises_and_the_line_follows_mis(seq):
    u, line, _ = make()
    for op in seq:
        if not access(u, op):
            assert 0 <= u.receive(op[1]) <= len(op[1])
        assert line.level == bool(u.read(MIS, 4))
        fr = u.read(FR, 4)
        assert not (fr & FR_RXFE and fr & FR_RXFF)
        assert 0 <= u.rx_space() <= RX_BACKLOG


# --- the C run loop's fast path (kvm/_build.py ckvm_run_loop: FR reads and DR writes by MMIO) -----------------------
def fast_pl011():
    from cloudkvm.kvm.fastpath import FastUart

    u, line, out = make()
    fast = FastUart(u.emit)
    u.attach_fast_path(fast.state, 0x0900_0000)
    return u, line, out, fast.state


def test_the_fast_path_knows_the_uart_and_what_fr_reads():
    u, _, _, state = fast_pl011()
    assert state.mmio_base == 0x0900_0000 and state.enabled == 1
    assert state.fr == readw(u, FR) == FR_TXFE | FR_RXFE
    writew(u, CR, CR_UARTEN | CR_TXE | CR_RXE)
    u.receive(b"k")  # host input: FR must stop saying "receive FIFO empty" in C too
    assert state.fr == readw(u, FR) == FR_TXFE | FR_RXFF and state.enabled == 1  # FEN clear: a 1-byte FIFO


def test_the_fast_path_stops_while_transmit_interrupts_or_loopback_are_on():
    u, _, _, state = fast_pl011()
    writew(u, IMSC, TXIM)  # interrupt-driven transmit (the tty layer): every DR write must reach the model
    assert state.enabled == 0
    writew(u, IMSC, RXIM | RTIM)
    assert state.enabled == 1
    writew(u, CR, CR_UARTEN | CR_TXE | CR_RXE | CR_LBE)  # loopback: DR writes feed the receive FIFO
    assert state.enabled == 0


def test_bytes_written_through_the_fast_path_leave_in_order_and_raise_txris():
    u, line, out, _ = fast_pl011()
    writew(u, DR, ord("a"))  # through the model
    u.emit(lambda: b"bc\n")          # what the C loop buffered
    assert output(out) == b"abc\n"
    writew(u, ICR, TXIS)
    u.emit(lambda: b"d")
    assert readw(u, RIS) & TXIS  # as if "d" had been written to DR here: Linux then enables TXIM and waits for it
    writew(u, IMSC, TXIM)
    assert line.level
