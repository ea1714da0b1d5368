"""Uart16550 driven through read()/write() the way Linux's 8250 driver (8250_port.c) drives a PC COM port."""
import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from cloudkvm.devices.uart16550 import RX_CAPACITY, Uart16550

RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR, MCR, LSR, MSR, SCR = 3, 4, 5, 6, 7

IER_RDI, IER_THRI, IER_RLSI, IER_MSI = 0x01, 0x02, 0x04, 0x08
IIR_NO_INT, IIR_MSI, IIR_THRI, IIR_RDI, IIR_RLSI = 0x01, 0x00, 0x02, 0x04, 0x06
IIR_ID = 0x0E
LSR_DR, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
MSR_DCTS, MSR_DDSR, MSR_TERI, MSR_DDCD = 0x01, 0x02, 0x04, 0x08
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80


class FakeIrq:
    def __init__(self):
        self.levels: list[bool] = []

    def set_level(self, high: bool) -> None:
        self.levels.append(high)

    @property
    def level(self) -> bool:
        return self.levels[-1] if self.levels else False


def make():
    irq, out = FakeIrq(), []
    return Uart16550(irq, out.append), irq, out


def rd(u, off):
    return u.read(off, 1)


def wr(u, off, value):
    u.write(off, 1, value)


def linux_autoconfig(u) -> str:
    """The probe in 8250_port.c autoconfig() + autoconfig_16550a(), step by step; returns the port type found."""
    scratch = rd(u, IER)
    wr(u, IER, 0)
    scratch2 = rd(u, IER) & 0x0F
    wr(u, IER, 0x0F)
    scratch3 = rd(u, IER) & 0x0F
    wr(u, IER, scratch)
    if scratch2 != 0 or scratch3 != 0x0F:
        return "none (IER test)"
    save_mcr, save_lcr = rd(u, MCR), rd(u, LCR)
    wr(u, MCR, MCR_LOOP | 0x0A)
    status1 = rd(u, MSR) & 0xF0
    wr(u, MCR, save_mcr)
    if status1 != (MSR_DCD | MSR_CTS):
        return "none (loopback test)"
    wr(u, LCR, 0xBF)  # UART_LCR_CONF_MODE_B
    wr(u, 2, 0)  # UART_EFR
    wr(u, LCR, 0)
    wr(u, FCR, 0x01)
    kind = {0: "8250", 1: "unknown", 2: "16550", 3: "16550A"}[rd(u, IIR) >> 6]
    if kind == "16550A":
        wr(u, LCR, 0x80)  # EFR only visible with DLAB on an ST16C650V1
        if rd(u, 2) == 0:
            return "16650V1"
        wr(u, LCR, 0xBF)
        if rd(u, 2) == 0:
            return "16650"
        wr(u, LCR, 0)  # National SuperIO check: EXCR1 at LCR=0xE0 tracks MCR LOOP
        status1 = rd(u, MCR)
        wr(u, LCR, 0xE0)
        status2 = rd(u, 2)
        if not (status2 ^ status1) & MCR_LOOP:
            wr(u, LCR, 0)
            wr(u, MCR, status1 ^ MCR_LOOP)
            wr(u, LCR, 0xE0)
            status2 = rd(u, 2)
            wr(u, LCR, 0)
            wr(u, MCR, status1)
            if (status2 ^ status1) & MCR_LOOP:
                return "NS16550A"
        wr(u, LCR, 0)  # TI16750: IIR bit 5 with the 64-byte FIFO only when DLAB is set
        wr(u, FCR, 0x21)
        status1 = rd(u, IIR) & 0xE0
        wr(u, FCR, 0)
        wr(u, LCR, 0x80)
        wr(u, FCR, 0x21)
        status2 = rd(u, IIR) & 0xE0
        wr(u, FCR, 0)
        wr(u, LCR, 0)
        if status1 == 0xC0 and status2 == 0xE0:
            return "16750"
        iersave = rd(u, IER)  # XScale: IER bit 6 (UUE) sticks
        wr(u, IER, iersave & ~0x40)
        if not rd(u, IER) & 0x40:
            wr(u, IER, iersave | 0x40)
            if rd(u, IER) & 0x40:
                return "XScale"
        wr(u, IER, iersave)
    wr(u, LCR, save_lcr)
    wr(u, MCR, save_mcr)
    wr(u, FCR, 0x01)  # serial8250_clear_fifos()
    wr(u, FCR, 0x07)
    wr(u, FCR, 0)
    rd(u, RBR)
    wr(u, IER, 0)
    return kind


def thre_test(u) -> tuple[int, int]:
    """serial8250_do_startup()'s check that THRE is re-asserted whenever IER.THRI is turned on."""
    wr(u, IER, IER_THRI)
    iir1 = rd(u, IIR)
    wr(u, IER, 0)
    wr(u, IER, IER_THRI)
    iir = rd(u, IIR)
    wr(u, IER, 0)
    return iir1, iir


def test_reset_state():
    u, irq, out = make()
    assert rd(u, IER) == 0
    assert rd(u, IIR) == IIR_NO_INT
    assert rd(u, LCR) == 0
    assert rd(u, MCR) == 0
    assert rd(u, LSR) == LSR_THRE | LSR_TEMT
    assert rd(u, MSR) == MSR_DCD | MSR_DSR | MSR_CTS
    assert rd(u, RBR) == 0
    assert not irq.level and out == []


def test_linux_autoconfig_finds_a_16550a_and_leaves_it_quiet():
    u, irq, out = make()
    assert linux_autoconfig(u) == "16550A"
    assert rd(u, IER) == 0 and rd(u, MCR) == 0 and rd(u, LCR) == 0
    assert rd(u, IIR) == IIR_NO_INT
    assert not irq.level and out == []


def test_classic_probe_scratch_loopback_and_fifo():
    u, _, out = make()
    for pattern in (0x55, 0xAA, 0x00, 0xFF):
        wr(u, SCR, pattern)
        assert rd(u, SCR) == pattern
    wr(u, MCR, 0x1F)
    assert rd(u, MSR) & 0xF0 == 0xF0
    wr(u, MCR, MCR_LOOP)
    assert rd(u, MSR) & 0xF0 == 0
    wr(u, MCR, 0)
    wr(u, FCR, 0xE7)
    iir = rd(u, IIR)
    assert iir >> 6 == 3
    assert not iir & 0x20  # no 64-byte FIFO: not a 16750
    wr(u, FCR, 0)
    assert rd(u, IIR) >> 6 == 0
    assert out == []


def test_ier_holds_only_the_low_nibble():
    u, _, _ = make()
    wr(u, IER, 0xFF)
    assert rd(u, IER) == 0x0F


def test_thre_handshake_raises_and_iir_read_drops_the_line():
    u, irq, _ = make()
    wr(u, MCR, MCR_OUT2 | MCR_RTS | MCR_DTR)
    assert not irq.level
    wr(u, IER, IER_THRI)
    assert irq.level
    assert rd(u, IIR) == IIR_THRI
    assert not irq.level
    assert rd(u, IIR) == IIR_NO_INT  # cleared by the read that reported it
    assert irq.levels == [True, False]


def test_linux_thre_retest_sees_the_interrupt_reasserted():
    u, irq, _ = make()
    wr(u, MCR, MCR_OUT2 | MCR_RTS | MCR_DTR)
    iir1, iir = thre_test(u)
    assert iir1 & IIR_ID == IIR_THRI and not iir1 & IIR_NO_INT
    assert iir & IIR_ID == IIR_THRI and not iir & IIR_NO_INT  # else Linux sets UART_BUG_THRE
    assert not irq.level


def test_rewriting_ier_with_thri_already_set_does_not_retrigger():
    u, _, _ = make()
    wr(u, IER, IER_THRI)
    assert rd(u, IIR) == IIR_THRI
    wr(u, IER, IER_THRI | IER_RDI)
    assert rd(u, IIR) == IIR_NO_INT


def test_clearing_thri_drops_a_pending_thre():
    u, irq, _ = make()
    wr(u, MCR, MCR_OUT2)
    wr(u, IER, IER_THRI)
    assert irq.level
    wr(u, IER, 0)
    assert not irq.level
    assert rd(u, IIR) == IIR_NO_INT


def test_transmit_calls_on_output_per_byte_and_thr_is_empty_at_once():
    u, _, out = make()
    for b in b"hi\n":
        assert rd(u, LSR) & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT  # wait_for_xmitr()
        wr(u, THR, b)
    assert out == [b"h", b"i", b"\n"]
    assert rd(u, LSR) & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT


def test_interrupt_driven_transmit_like_serial8250_tx_chars():
    u, irq, out = make()
    wr(u, MCR, MCR_OUT2 | MCR_RTS | MCR_DTR)
    wr(u, FCR, 0x01)
    message = b"interrupt driven output, longer than one 16-byte FIFO load\n"
    pending = bytearray(message)
    wr(u, IER, IER_RDI | IER_THRI)  # __start_tx()
    interrupts = 0
    while irq.level:
        interrupts += 1
        iir = rd(u, IIR)
        assert iir & IIR_ID == IIR_THRI
        for _ in range(16):
            if not pending:
                wr(u, IER, IER_RDI)  # __stop_tx()
                break
            wr(u, THR, pending.pop(0))
        assert interrupts < 100
    assert b"".join(out) == message
    assert rd(u, IIR) & IIR_NO_INT


def test_writing_thr_with_thri_reraises_thre():
    u, irq, _ = make()
    wr(u, MCR, MCR_OUT2)
    wr(u, IER, IER_THRI)
    rd(u, IIR)
    assert not irq.level
    wr(u, THR, ord("x"))
    assert irq.level
    assert rd(u, IIR) == IIR_THRI


def test_irq_line_is_gated_by_out2():
    u, irq, _ = make()
    u.receive(b"x")
    wr(u, IER, IER_RDI)
    assert not irq.level  # pending, but OUT2 is clear
    assert rd(u, IIR) == IIR_RDI
    wr(u, MCR, MCR_OUT2)
    assert irq.level
    wr(u, MCR, 0)
    assert not irq.level


def test_receive_interrupt_and_reads():
    u, irq, _ = make()
    wr(u, MCR, MCR_OUT2 | MCR_RTS | MCR_DTR)
    wr(u, FCR, 0x01)
    wr(u, IER, IER_RDI | IER_RLSI)
    assert not irq.level
    assert u.receive(b"ab") == 2
    assert irq.level
    assert rd(u, IIR) == 0xC0 | IIR_RDI
    assert irq.level  # reading IIR does not clear a data-available interrupt
    assert rd(u, LSR) & LSR_DR
    assert rd(u, RBR) == ord("a")
    assert rd(u, LSR) & LSR_DR and irq.level
    assert rd(u, RBR) == ord("b")
    assert not rd(u, LSR) & LSR_DR
    assert not irq.level
    assert rd(u, IIR) == 0xC0 | IIR_NO_INT
    assert irq.levels == [True, False]


def test_serial8250_rx_chars_loop_drains_everything():
    u, irq, _ = make()
    wr(u, MCR, MCR_OUT2)
    wr(u, IER, IER_RDI)
    data = bytes(range(256)) * 3
    assert u.receive(data) == len(data)
    got = bytearray()
    while irq.level:
        assert rd(u, IIR) & IIR_ID == IIR_RDI
        for _ in range(256):  # max_count in serial8250_rx_chars()
            if not rd(u, LSR) & LSR_DR:
                break
            got.append(rd(u, RBR))
    assert bytes(got) == data


def test_rx_buffer_is_bounded():
    u, _, _ = make()
    assert u.rx_space() == RX_CAPACITY == 4096
    assert u.receive(b"z" * 5000) == 4096
    assert u.rx_space() == 0
    assert u.receive(b"more") == 0
    assert u.receive(b"") == 0
    rd(u, RBR)
    assert u.rx_space() == 1
    assert u.receive(b"ab") == 1


def test_fcr_clears_the_receive_fifo():
    u, _, _ = make()
    u.receive(b"stale")
    wr(u, FCR, 0x01 | 0x04)  # clearing tx leaves rx alone
    assert rd(u, LSR) & LSR_DR
    wr(u, FCR, 0x01 | 0x02)
    assert not rd(u, LSR) & LSR_DR
    assert u.rx_space() == RX_CAPACITY
    assert rd(u, IIR) >> 6 == 3  # clear bits are self-clearing; FIFO stays enabled


def test_dlab_switches_offsets_0_and_1_to_the_divisor_latch():
    u, _, out = make()
    wr(u, IER, IER_RDI)
    wr(u, LCR, 0x80 | 0x03)
    wr(u, DLL, 0x01)  # 115200 baud
    wr(u, DLM, 0x00)
    assert rd(u, DLL) == 0x01 and rd(u, DLM) == 0x00
    wr(u, DLM, 0x12)
    assert rd(u, DLM) == 0x12
    assert out == []  # a DLL write is not a transmit
    wr(u, LCR, 0x03)
    assert rd(u, LCR) == 0x03
    assert rd(u, IER) == IER_RDI
    wr(u, THR, 0x41)
    assert out == [b"A"]
    wr(u, LCR, 0x83)
    assert rd(u, DLL) == 0x01 and rd(u, DLM) == 0x12


def test_loopback_sends_thr_to_rbr_and_not_out():
    u, irq, out = make()
    wr(u, MCR, MCR_LOOP | MCR_OUT2)
    wr(u, IER, IER_RDI)
    wr(u, THR, 0x5A)
    assert out == []
    assert rd(u, LSR) & LSR_DR
    assert irq.level
    assert rd(u, RBR) == 0x5A
    assert not irq.level
    wr(u, MCR, 0)
    wr(u, THR, 0x5A)
    assert out == [b"Z"]


def test_loopback_msr_follows_mcr_with_deltas():
    u, _, _ = make()
    wr(u, MCR, MCR_LOOP)
    assert rd(u, MSR) == MSR_DCTS | MSR_DDSR | MSR_DDCD  # all of CTS/DSR/DCD fell
    assert rd(u, MSR) == 0  # deltas clear on read
    wr(u, MCR, MCR_LOOP | MCR_RTS)
    assert rd(u, MSR) == MSR_CTS | MSR_DCTS
    wr(u, MCR, MCR_LOOP | MCR_RTS | MCR_DTR | MCR_OUT1 | MCR_OUT2)
    assert rd(u, MSR) == MSR_CTS | MSR_DSR | MSR_RI | MSR_DCD | MSR_DDSR | MSR_DDCD
    wr(u, MCR, MCR_LOOP | MCR_RTS | MCR_DTR | MCR_OUT2)
    assert rd(u, MSR) == MSR_CTS | MSR_DSR | MSR_DCD | MSR_TERI  # RI trailing edge
    wr(u, MCR, 0)
    assert rd(u, MSR) == MSR_CTS | MSR_DSR | MSR_DCD  # the real lines match the looped ones: no deltas


def test_mcr_keeps_only_bits_0_to_4():
    u, _, _ = make()
    wr(u, MCR, 0xFF)
    assert rd(u, MCR) == 0x1F


def test_overrun_in_loopback_and_interrupt_priority():
    u, irq, _ = make()
    assert u.receive(bytes(RX_CAPACITY)) == RX_CAPACITY
    wr(u, MCR, MCR_LOOP | MCR_OUT2)
    wr(u, THR, 0xEE)  # no room: overrun
    wr(u, IER, IER_RDI | IER_THRI | IER_RLSI | IER_MSI)
    assert irq.level
    assert rd(u, IIR) == IIR_RLSI
    assert rd(u, LSR) & LSR_OE
    assert not rd(u, LSR) & LSR_OE  # cleared by the read
    assert rd(u, IIR) == IIR_RDI
    while rd(u, LSR) & LSR_DR:
        rd(u, RBR)
    assert rd(u, IIR) == IIR_THRI
    assert rd(u, IIR) == IIR_MSI  # entering loopback changed the modem lines
    assert irq.level
    rd(u, MSR)
    assert rd(u, IIR) == IIR_NO_INT
    assert not irq.level


def test_receive_from_another_thread_keeps_order():
    u, _, _ = make()
    data = bytes(i % 251 for i in range(20000))
    got = bytearray()

    def producer():
        sent = 0
        while sent < len(data):
            sent += u.receive(data[sent:sent + 1000])

    t = threading.Thread(target=producer)
    t.start()
    while len(got) < len(data):
        if rd(u, LSR) & LSR_DR:
            got.append(rd(u, RBR))
    t.join()
    assert bytes(got) == data


def test_on_output_may_feed_input_back_without_deadlock():
    irq = FakeIrq()
    holder = []
    u = Uart16550(irq, lambda b: holder[0].receive(b))
    holder.append(u)
    wr(u, THR, ord("e"))
    assert rd(u, RBR) == ord("e")


def test_wide_accesses_split_into_byte_lanes():
    u, _, out = make()
    u.write(0, 2, 0x0241)  # THR = 'A', IER = 0x02
    assert out == [b"A"]
    assert rd(u, IER) == IER_THRI
    assert u.read(5, 2) == (MSR_DCD | MSR_DSR | MSR_CTS) << 8 | LSR_THRE | LSR_TEMT
    assert u.read(8, 1) == 0  # beyond the eight registers
    u.write(9, 1, 0xFF)


ops = st.one_of(
    st.tuples(st.just("read"), st.integers(0, 9), st.sampled_from([1, 1, 1, 2, 4])),
    st.tuples(st.just("write"), st.integers(0, 9), st.sampled_from([1, 1, 1, 2, 4]), st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("receive"), st.binary(max_size=64)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=60))
def test_no_guest_access_sequence_raises_and_the_line_matches_iir(seq):
    u, irq, _ = make()
    for op in seq:
        if op[0] == "read":
            _, off, size = op
            assert 0 <= u.read(off, size) < 1 << (8 * size)
        elif op[0] == "write":
            _, off, size, value = op
            u.write(off, size, value & ((1 << (8 * size)) - 1))
        else:
            assert 0 <= u.receive(op[1]) <= len(op[1])
        level, lcr = irq.level, rd(u, LCR)
        mcr, iir = rd(u, MCR), rd(u, IIR)
        assert 0 <= mcr <= 0x1F and iir & 0x30 == 0
        assert level == (not iir & IIR_NO_INT and bool(mcr & MCR_OUT2)), (lcr, mcr, iir)
        assert 0 <= u.rx_space() <= RX_CAPACITY


# --- the run loop's fast path view (kvm.fastpath.FastUart.state) ----------------------------------------------

class FastState:
    enabled = 0
    lsr = 0
    thr = 0


def fast_uart():
    u, irq, out = make()
    state = FastState()
    u.attach_fast_path(state)
    return u, state, out


def test_polled_mode_is_published_as_plain_with_the_lsr_a_read_would_see():
    u, state, _ = fast_uart()
    assert state.enabled == 1 and state.lsr == LSR_THRE | LSR_TEMT
    u.receive(b"k")
    assert state.enabled == 1 and state.lsr == LSR_THRE | LSR_TEMT | LSR_DR
    assert rd(u, RBR) == ord("k") and state.lsr == LSR_THRE | LSR_TEMT


def test_every_state_a_plain_access_would_get_wrong_turns_the_fast_path_off():
    for register, value in ((LCR, 0x80), (MCR, MCR_LOOP)):
        u, state, _ = fast_uart()
        wr(u, register, value)
        assert (state.enabled, state.thr) == (0, 0), register
        wr(u, register, 0)
        assert (state.enabled, state.thr) == (1, 1), register


def test_interrupt_driven_transmit_leaves_thr_to_c_only_while_a_write_changes_no_interrupt_state():
    """serial8250_tx_chars: the IIR read that reports THRE drops the line, so the burst's first THR write raises it
    again (the model's); the rest of the burst leaves THRE pending and the line high (C's); LSR reads stay C's."""
    u, state, out = fast_uart()
    wr(u, MCR, MCR_OUT2)
    wr(u, IER, IER_THRI)                      # THRE pending at once, the line raised
    assert (state.enabled, state.thr) == (1, 1)
    assert rd(u, IIR) & IIR_ID == IIR_THRI      # reported: no longer pending, the line dropped
    assert (state.enabled, state.thr) == (1, 0)
    wr(u, THR, ord("a"))                      # pending again, the line raised: a change only the model makes
    assert (state.enabled, state.thr) == (1, 1)
    wr(u, MCR, 0)                             # the line gated off: a write still changes nothing
    assert state.thr == 1
    wr(u, IER, 0)
    assert (state.enabled, state.thr) == (1, 1) and b"".join(out) == b"a"


def test_a_latched_overrun_keeps_lsr_reads_in_the_model_until_one_clears_it():
    u, state, _ = fast_uart()
    wr(u, MCR, MCR_LOOP)
    for _ in range(RX_CAPACITY + 1):
        wr(u, THR, 0x55)  # loopback into a full receiver: overrun
    wr(u, MCR, 0)
    assert state.enabled == 0
    assert rd(u, LSR) & LSR_OE
    assert state.enabled == 1


def test_emit_passes_fast_path_bytes_on_in_order():
    u, _, out = fast_uart()
    wr(u, THR, ord("a"))
    u.emit(lambda: b"bc")
    assert b"".join(out) == b"abc"
