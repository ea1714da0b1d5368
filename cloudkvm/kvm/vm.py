"""A KVM virtual machine: memory slots, irqchip, IRQ lines, irqfd, ioeventfd, GSI routing, device fds."""
import os

from .memory import GuestMemory
from .native import ffi, lib
from .system import Kvm, ioctl
from .vcpu import Vcpu


class Vm:
    """One VM fd. Arch-neutral calls live here; x86-only ones say so in their names' docstrings."""

    def __init__(self, kvm: Kvm):
        self.kvm = kvm
        self.fd = kvm.create_vm()
        self.memory: GuestMemory | None = None
        self._next_slot = 0

    def check_extension(self, cap: int) -> int:
        try:
            return ioctl(self.fd, lib.KVM_CHECK_EXTENSION, cap)
        except OSError:
            return self.kvm.check_extension(cap)

    def add_memory(self, memory: GuestMemory) -> None:
        """Registers every region of `memory` as a KVM memory slot (KVM_SET_USER_MEMORY_REGION)."""
        for region in memory.regions:
            self.set_user_memory_region(self._next_slot, region.gpa, region.size, region.host_addr)
            self._next_slot += 1
        self.memory = memory

    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0) -> None:
        region = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": flags, "guest_phys_addr": gpa, "memory_size": size, "userspace_addr": host_addr})
        ioctl(self.fd, lib.KVM_SET_USER_MEMORY_REGION, region)

    # --- interrupt controllers and lines -------------------------------------------------------------------
    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP (x86: PIC + IOAPIC + per-vCPU LAPIC in the kernel)."""
        ioctl(self.fd, lib.KVM_CREATE_IRQCHIP)

    def create_pit2(self) -> None:
        """KVM_CREATE_PIT2 (x86: the i8254 in the kernel, speaker port ignored)."""
        config = ffi.new("struct kvm_pit_config *", {"flags": lib.KVM_PIT_SPEAKER_DUMMY})
        ioctl(self.fd, lib.KVM_CREATE_PIT2, config)

    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR (x86, Intel: three pages the VMX real-mode emulation may use)."""
        ioctl(self.fd, lib.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR (x86, Intel: one page for the real-mode identity map)."""
        ioctl(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, ffi.new("__u64 *", addr))

    def irq_line(self, irq: int, level: int) -> None:
        """KVM_IRQ_LINE: set an interrupt line (a GSI on x86; type | vCPU | INTID on arm64, kvm/vgic.py) high (1)
        or low (0)."""
        ioctl(self.fd, lib.KVM_IRQ_LINE, ffi.new("struct kvm_irq_level *", {"irq": irq, "level": level}))

    def irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None:
        """KVM_IRQFD: a write to eventfd `fd` raises (edge) interrupt `gsi` without leaving the kernel."""
        arg = ffi.new("struct kvm_irqfd *", {"fd": fd, "gsi": gsi,
                                             "flags": lib.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0})
        ioctl(self.fd, lib.KVM_IRQFD, arg)

    def ioeventfd(self, fd: int, addr: int, length: int, datamatch: int | None = None, pio: bool = False,
                  deassign: bool = False) -> None:
        """KVM_IOEVENTFD: a guest write of `length` bytes at `addr` signals eventfd `fd` instead of exiting."""
        flags = (lib.KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (lib.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        arg = ffi.new("struct kvm_ioeventfd *", {"datamatch": datamatch or 0, "addr": addr, "len": length,
                                                 "fd": fd, "flags": flags})
        ioctl(self.fd, lib.KVM_IOEVENTFD, arg)

    def set_gsi_routing(self, routes: list[dict]) -> None:
        """KVM_SET_GSI_ROUTING. Each route: {"gsi", "irqchip", "pin"} or {"gsi", "msi": (addr, data)}."""
        table = ffi.new("struct kvm_irq_routing *", {"nr": len(routes), "entries": len(routes)})
        for i, route in enumerate(routes):
            entry = table.entries[i]
            entry.gsi = route["gsi"]
            if "msi" in route:
                address, data = route["msi"]
                entry.type = lib.KVM_IRQ_ROUTING_MSI
                entry.u.msi.address_lo = address & 0xFFFFFFFF
                entry.u.msi.address_hi = address >> 32
                entry.u.msi.data = data
            else:
                entry.type = lib.KVM_IRQ_ROUTING_IRQCHIP
                entry.u.irqchip.irqchip = route["irqchip"]
                entry.u.irqchip.pin = route["pin"]
        ioctl(self.fd, lib.KVM_SET_GSI_ROUTING, table)

    def signal_msi(self, address: int, data: int) -> int:
        msi = ffi.new("struct kvm_msi *", {"address_lo": address & 0xFFFFFFFF, "address_hi": address >> 32,
                                           "data": data})
        return ioctl(self.fd, lib.KVM_SIGNAL_MSI, msi)

    def create_device(self, dev_type: int) -> int:
        """KVM_CREATE_DEVICE (e.g. the arm64 GIC): the device's fd."""
        arg = ffi.new("struct kvm_create_device *", {"type": dev_type})
        ioctl(self.fd, lib.KVM_CREATE_DEVICE, arg)
        return arg.fd

    def can_create_device(self, dev_type: int) -> bool:
        """KVM_CREATE_DEVICE with KVM_CREATE_DEVICE_TEST: whether this KVM has that device (none is made)."""
        arg = ffi.new("struct kvm_create_device *", {"type": dev_type, "flags": lib.KVM_CREATE_DEVICE_TEST})
        try:
            ioctl(self.fd, lib.KVM_CREATE_DEVICE, arg)
        except OSError:
            return False
        return True

    def set_device_attr(self, dev_fd: int, group: int, attr: int, value_ptr=None) -> None:
        """KVM_SET_DEVICE_ATTR: `value_ptr` points at the attribute's value (its type is the attribute's), or None."""
        ioctl(dev_fd, lib.KVM_SET_DEVICE_ATTR, _device_attr(group, attr, value_ptr))

    def get_device_attr(self, dev_fd: int, group: int, attr: int, value_ptr) -> None:
        """KVM_GET_DEVICE_ATTR: KVM writes the attribute's value where `value_ptr` points."""
        ioctl(dev_fd, lib.KVM_GET_DEVICE_ATTR, _device_attr(group, attr, value_ptr))

    def create_vcpu(self, index: int) -> Vcpu:
        return Vcpu(self.fd, index, self.kvm.vcpu_mmap_size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _device_attr(group: int, attr: int, value_ptr):
    return ffi.new("struct kvm_device_attr *", {"group": group, "attr": attr,
                                               "addr": int(ffi.cast("uintptr_t", value_ptr)) if value_ptr else 0})
