"""The C run loop's PL011 fast path (kvm/_build.py ckvm_run_loop, MMIO exits) on a real guest, on any KVM: FR reads
and DR writes of a polled PL011 are completed in C while no transmit interrupt is enabled, everything else goes
to the Python model, and the output keeps its bytes and their order. The x86 board is the host here (the run loop
is the same C on both architectures); the PL011 sits in its MMIO gap."""
from cloudkvm.devices.pl011 import Pl011
from cloudkvm.kvm.fastpath import FastUart
from cloudkvm.machine import FlatBinary, Machine, MachineSpec

BASE = 0xD010_0000


class Line:
    def set_level(self, high: bool) -> None:
        pass


def run_pl011_guest(binary, fast: bool):
    out = []
    with Machine(MachineSpec(payload=FlatBinary(binary))) as machine:
        uart = Pl011(Line(), out.append)
        machine.add_mmio_device(BASE, 0x1000, uart, "pl011")
        if fast:
            machine.board.fast_uart = FastUart(uart.emit)
            uart.attach_fast_path(machine.board.fast_uart.state, BASE)
        result = machine.run(timeout=30)
        return result, b"".join(out), machine.board.fast_uart.tx.total


def test_polled_pl011_output_takes_the_fast_path_and_interrupt_driven_output_the_model(guest_binary):
    result, out, fast_bytes = run_pl011_guest(guest_binary("pl011_fast"), fast=True)
    assert result.reason == "poweroff", result
    assert out == b"pl011: polled\nx"  # the 8-byte DR write sent nothing on either path
    assert fast_bytes == len(b"pl011: polled\n")  # and 'x', written with TXIM on, went through the model


def test_without_the_fast_path_the_pl011_output_is_the_same(guest_binary):
    result, out, fast_bytes = run_pl011_guest(guest_binary("pl011_fast"), fast=False)
    assert result.reason == "poweroff" and out == b"pl011: polled\nx" and fast_bytes == 0
