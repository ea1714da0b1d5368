"""I8042 through ports 0x60-0x64 (offsets 0-4) as Linux's i8042.c and reboot.c drive an empty controller."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudkvm.devices.i8042 import I8042

DATA, STATUS = 0, 4
STR_OBF, STR_IBF, STR_SYS, STR_CMD, STR_UNLOCKED = 0x01, 0x02, 0x04, 0x08, 0x10
CTR_SYS, CTR_KBDDIS, CTR_AUXDIS = 0x04, 0x10, 0x20


def make():
    resets = []
    return I8042(lambda: resets.append(1)), resets


def command(kbc, cmd: int, param: int | None = None) -> int | None:
    """i8042_command(): write the command, the parameter if any, and poll OBF for a reply."""
    assert not kbc.read(STATUS, 1) & STR_IBF
    kbc.write(STATUS, 1, cmd)
    if param is not None:
        assert not kbc.read(STATUS, 1) & STR_IBF
        kbc.write(DATA, 1, param)
    if kbc.read(STATUS, 1) & STR_OBF:
        return kbc.read(DATA, 1)
    return None


def flush(kbc) -> int:
    """i8042_flush(): drain the output buffer; returns the bytes drained."""
    n = 0
    while kbc.read(STATUS, 1) & STR_OBF:
        kbc.read(DATA, 1)
        n += 1
        assert n < 64, "output buffer never empties: Linux would say 'No controller found'"
    return n


def test_power_on_status():
    kbc, resets = make()
    status = kbc.read(STATUS, 1)
    assert not status & (STR_OBF | STR_IBF | STR_SYS)
    assert status & STR_UNLOCKED  # no "Keylock active" warning
    assert flush(kbc) == 0
    assert resets == []


def test_self_test_returns_0x55_and_sets_the_system_flag():
    kbc, _ = make()
    kbc.write(STATUS, 1, 0xAA)
    status = kbc.read(STATUS, 1)
    assert status & STR_OBF and status & STR_SYS and status & STR_CMD
    assert kbc.read(DATA, 1) == 0x55
    assert not kbc.read(STATUS, 1) & STR_OBF
    assert kbc.read(STATUS, 1) & STR_SYS


def test_interface_tests_report_no_error():
    kbc, _ = make()
    assert command(kbc, 0xAB) == 0x00
    assert command(kbc, 0xA9) == 0x00


def test_command_byte_round_trip():
    kbc, _ = make()
    assert command(kbc, 0x60, 0x47) is None  # 0x47 includes CTR_SYS
    assert not kbc.read(STATUS, 1) & STR_CMD  # last write went to the data port
    assert command(kbc, 0x20) == 0x47
    assert kbc.read(STATUS, 1) & STR_SYS  # command byte bit 2 is the system flag
    command(kbc, 0x60, 0x47 & ~CTR_SYS)
    assert command(kbc, 0x20) == 0x43
    assert not kbc.read(STATUS, 1) & STR_SYS


def test_linux_controller_init_reads_a_stable_ctr_and_writes_it_back():
    kbc, _ = make()
    assert flush(kbc) == 0
    assert command(kbc, 0xAA) == 0x55
    ctr = [command(kbc, 0x20), command(kbc, 0x20)]
    assert ctr[0] == ctr[1] is not None
    new = (ctr[0] | CTR_KBDDIS) & ~0x01
    assert command(kbc, 0x60, new) is None
    assert flush(kbc) == 0
    assert command(kbc, 0x20) == new


def test_enable_disable_commands_move_the_command_byte_bits():
    kbc, _ = make()
    command(kbc, 0x60, 0x00)
    command(kbc, 0xA7)
    assert command(kbc, 0x20) & CTR_AUXDIS  # i8042_check_aux()'s bit assignment test
    command(kbc, 0xA8)
    assert not command(kbc, 0x20) & CTR_AUXDIS
    command(kbc, 0xAD)
    assert command(kbc, 0x20) == CTR_KBDDIS
    command(kbc, 0xAE)
    assert command(kbc, 0x20) == 0


def test_reset_via_0xfe_like_linux_reboot():
    kbc, resets = make()
    for _ in range(10):  # kb_wait()
        if not kbc.read(STATUS, 1) & STR_IBF:
            break
    kbc.write(STATUS, 1, 0xFE)
    assert resets == [1]


@pytest.mark.parametrize("cmd", range(0xF0, 0x100))
def test_pulse_commands_reset_only_when_bit_0_is_clear(cmd):
    kbc, resets = make()
    kbc.write(STATUS, 1, cmd)
    assert resets == ([1] if cmd % 2 == 0 else [])
    assert not kbc.read(STATUS, 1) & STR_OBF


def test_output_port_read_and_write():
    kbc, resets = make()
    assert command(kbc, 0xD0) == 0x03  # not in reset, A20 on
    command(kbc, 0xD1, 0xDF)
    assert resets == []
    assert command(kbc, 0xD0) == 0xDF
    command(kbc, 0xD1, 0xFE)  # bit 0 clear: reset
    assert resets == [1]
    assert command(kbc, 0xD0) == 0xFF  # the reset line is a pulse, it does not stay low


def test_keyboard_data_is_ignored():
    kbc, resets = make()
    for byte in (0xFF, 0xF2, 0xED, 0x00):
        kbc.write(DATA, 1, byte)
        assert not kbc.read(STATUS, 1) & STR_OBF
    assert command(kbc, 0x20) == 0x00
    assert resets == []


def test_parameter_goes_only_to_the_command_just_written():
    kbc, resets = make()
    command(kbc, 0x60, 0x11)
    kbc.write(STATUS, 1, 0x60)
    kbc.write(STATUS, 1, 0xA7)  # a new command cancels the pending parameter
    kbc.write(DATA, 1, 0x00)
    assert command(kbc, 0x20) == 0x11 | CTR_AUXDIS
    kbc.write(DATA, 1, 0x00)  # the parameter has been consumed: this goes to the keyboard
    assert command(kbc, 0x20) == 0x11 | CTR_AUXDIS
    kbc.write(STATUS, 1, 0xD1)
    kbc.write(STATUS, 1, 0xAE)
    kbc.write(DATA, 1, 0x00)
    assert resets == []


def test_offsets_1_to_3_float_and_ignore_writes():
    kbc, resets = make()
    kbc.write(STATUS, 1, 0x60)
    for off in (1, 2, 3):
        assert kbc.read(off, 1) == 0xFF
        kbc.write(off, 1, 0x00)
        kbc.write(off, 1, 0xFE)
    kbc.write(DATA, 1, 0x5A)  # still the parameter of 0x60
    assert command(kbc, 0x20) == 0x5A
    assert resets == []


def test_data_port_repeats_the_last_byte_when_empty():
    kbc, _ = make()
    assert command(kbc, 0xAA) == 0x55
    assert kbc.read(DATA, 1) == 0x55
    assert not kbc.read(STATUS, 1) & STR_OBF


def test_replies_queue_in_order_and_are_bounded():
    kbc, _ = make()
    kbc.write(STATUS, 1, 0xAA)
    kbc.write(STATUS, 1, 0xAB)
    assert [kbc.read(DATA, 1), kbc.read(DATA, 1)] == [0x55, 0x00]
    for _ in range(1000):
        kbc.write(STATUS, 1, 0xAA)
    assert 1 <= flush(kbc) <= 16


def test_on_reset_runs_outside_the_lock():
    seen = []
    kbc = I8042(lambda: seen.append(kbc.read(STATUS, 1)))
    kbc.write(STATUS, 1, 0xFE)
    assert len(seen) == 1


def test_wide_accesses_split_into_byte_lanes():
    kbc, resets = make()
    assert kbc.read(3, 2) & 0xFF == 0xFF
    kbc.write(3, 2, 0xFE << 8)  # byte lane 1 lands on offset 4: the reset pulse
    assert resets == [1]
    assert kbc.read(4, 2) >> 8 == 0xFF  # offset 5 lies outside the controller: floats high


ops = st.one_of(
    st.tuples(st.just("read"), st.integers(0, 5), st.sampled_from([1, 1, 1, 2, 4])),
    st.tuples(st.just("write"), st.integers(0, 5), st.sampled_from([1, 1, 1, 2, 4]), st.integers(0, 0xFFFFFFFF)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=60))
def test_no_guest_access_sequence_raises(seq):
    kbc, resets = make()
    for op in seq:
        if op[0] == "read":
            _, off, size = op
            assert 0 <= kbc.read(off, size) < 1 << (8 * size)
        else:
            _, off, size, value = op
            kbc.write(off, size, value & ((1 << (8 * size)) - 1))
        assert not kbc.read(STATUS, 1) & STR_IBF
    assert flush(kbc) <= 16
