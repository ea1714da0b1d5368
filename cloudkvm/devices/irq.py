"""Interrupt lines a device raises: a KVM_IRQ_LINE-backed level line and an irqfd-backed edge trigger."""
import os
from typing import Protocol


class IrqLine(Protocol):
    """A wire from a device to the interrupt controller."""

    def set_level(self, high: bool) -> None: ...


class KvmIrqLine:
    """A level-sensitive line driven with KVM_IRQ_LINE (x86: a GSI on the in-kernel PIC/IOAPIC)."""

    def __init__(self, vm, gsi: int):
        self.vm = vm
        self.gsi = gsi
        self.level = False

    def set_level(self, high: bool) -> None:
        if high != self.level:
            self.level = high
            self.vm.irq_line(self.gsi, 1 if high else 0)


class IrqFd:
    """An eventfd registered with KVM_IRQFD: each `trigger()` injects an edge on `gsi` without a vCPU exit."""

    def __init__(self, vm, gsi: int):
        self.vm = vm
        self.gsi = gsi
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            vm.irqfd(self.fd, gsi)
        except BaseException:
            os.close(self.fd)
            raise

    def trigger(self) -> None:
        os.eventfd_write(self.fd, 1)

    def close(self) -> None:
        if self.fd >= 0:
            self.vm.irqfd(self.fd, self.gsi, deassign=True)
            os.close(self.fd)
            self.fd = -1
