"""Runs a purpose-built test guest on a real VM and returns how it ended plus its console text."""
from dataclasses import dataclass

from cloudkvm.machine import FlatBinary, Machine, MachineSpec
from cloudkvm.vcpu_loop import VmResult


@dataclass
class GuestRun:
    result: VmResult
    console: str
    isr_served: int = 0     # virtio-mmio interrupt register accesses the C run loop completed
    notified_in_c: int = 0  # queue notifications served whole in C (devices/virtio/notifier.py)


def run_guest(binary, cpus: int = 1, timeout: float = 60, setup=None, **spec_args) -> GuestRun:
    """`setup(machine)` may add devices or irqfds before the vCPUs start."""
    spec = MachineSpec(payload=FlatBinary(binary), cpus=cpus, **spec_args)
    with Machine(spec) as machine:
        if setup is not None:
            setup(machine)
        result = machine.run(timeout=timeout)
        return GuestRun(result, machine.console.text(), machine.isr_table.served, machine.notifier.served)
