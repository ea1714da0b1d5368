"""The console UART's C fast path on a real guest: polled LSR reads and THR writes, and the THR writes of an
interrupt-driven burst after its first, are completed in the run loop, every other register state goes through the
Python model, and the output keeps its bytes and their order."""
import threading

from cloudkvm.machine import FlatBinary, Machine, MachineSpec
from cloudkvm.vcpu_loop import VmResult

PROMPT = b"uart_fast: key? "
EXPECTED = ("uart_fast: polled line 1\nuart_fast: loopback ok\n.\nuart_fast: thre ok\n"
            "uart_fast: burst\nuart_fast: burst thre ok\n"
            "uart_fast: polled line 2\nuart_fast: key? got k\nuart_fast: no newline")


def run_uart_guest(binary, fast: bool):
    """Run the guest; type 'k' once its prompt is on the console (a prompt stuck in a buffer never gets it)."""
    with Machine(MachineSpec(payload=FlatBinary(binary))) as machine:
        if not fast:  # every COM1 access back to the model
            machine.pio_bus.c_table[0x3F8:0x400] = bytes(8)

        def type_key():
            if machine.console.wait_for(PROMPT, 20):
                machine.board.serial_input(b"k")
            else:
                machine.end(VmResult("stopped", "the prompt never showed"))
        threading.Thread(target=type_key, daemon=True).start()
        result = machine.run(timeout=30)
        return result, machine.console.text(), machine.board.fast_uart.tx.total


def test_polled_output_takes_the_fast_path_and_every_other_state_the_model(guest_binary):
    result, console, fast_bytes = run_uart_guest(guest_binary("uart_fast"), fast=True)
    assert result.reason == "poweroff", (result, console)
    assert console == EXPECTED  # the prompt showed while polling; the last partial line flushed at power-off
    # all but the '.' and the burst's first byte: each, written after IIR reported THRE, raises the line again
    assert fast_bytes == len(EXPECTED) - 2


def test_without_the_fast_path_the_output_is_the_same(guest_binary):
    result, console, fast_bytes = run_uart_guest(guest_binary("uart_fast"), fast=False)
    assert console == EXPECTED and result.reason == "poweroff"
    assert fast_bytes == 0
