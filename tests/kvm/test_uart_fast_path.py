"""The console UART's C fast path on a real guest: polled LSR reads and THR writes are completed in the run loop,
every other register state goes through the Python model, and the output keeps its bytes and their order."""
from cloudkvm.machine import FlatBinary, Machine, MachineSpec

EXPECTED = ("uart_fast: polled line 1\nuart_fast: loopback ok\n.\nuart_fast: thre ok\n"
            "uart_fast: polled line 2\nuart_fast: no newline")


def test_polled_output_takes_the_fast_path_and_every_other_state_the_model(guest_binary):
    with Machine(MachineSpec(payload=FlatBinary(guest_binary("uart_fast")))) as machine:
        result = machine.run(timeout=30)
        console = machine.console.text()
        fast_bytes = sum(loop.tx.total for loop in machine.loops)
    assert result.reason == "poweroff", result
    assert console == EXPECTED  # the partial last line was flushed by the power-off exit
    assert fast_bytes == len(EXPECTED) - 1  # all but the '.' written while THRE interrupts were enabled


def test_without_the_fast_path_the_output_is_the_same(guest_binary):
    with Machine(MachineSpec(payload=FlatBinary(guest_binary("uart_fast")))) as machine:
        machine.board.fast_uart.state.thr_port = machine.board.fast_uart.state.lsr_port = 0xFFFF  # never matches
        result = machine.run(timeout=30)
        assert machine.console.text() == EXPECTED and result.reason == "poweroff"
        assert sum(loop.tx.total for loop in machine.loops) == 0
