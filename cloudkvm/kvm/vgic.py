"""The in-kernel arm GIC: api.rst §4.79/§4.80 (devices/arm-vgic-v3.rst), SPIs by §4.25 KVM_IRQ_LINE, §4.75 KVM_IRQFD."""
from __future__ import annotations

import os

from ..errors import CloudkvmError
from . import arm64_abi as abi
from .native import ffi, lib

DEFAULT_NR_IRQS = 288  # as QEMU's virt board: 256 SPIs + the 32 private INTIDs (a multiple of 32, 64-1024)
GICD_ISPENDR = 0x200  # GIC architecture (IHI 0069 §12.9, IHI 0048 §4.1.2): GICD_ISPENDR<n>, one bit per INTID
GICD_ICFGR = 0xC00  # GICD_ICFGR<n>: two bits per INTID; the upper one set = edge-triggered, clear = level


class Vgic:
    """One in-kernel vGIC device of a VM: version 3 (distributor + redistributors) or 2 (+ CPU interface)."""

    def __init__(self, vm, fd: int, version: int, nr_irqs: int):
        self.vm, self.fd, self.version, self.nr_irqs = vm, fd, version, nr_irqs

    def finalize(self) -> None:
        """KVM_DEV_ARM_VGIC_CTRL_INIT: must come after every vCPU exists (and before KVM_IRQ_LINE on a v3)."""
        self.vm.set_device_attr(self.fd, abi.KVM_DEV_ARM_VGIC_GRP_CTRL, abi.KVM_DEV_ARM_VGIC_CTRL_INIT)

    def read_dist_reg(self, offset: int) -> int:
        """A 32-bit distributor register as userspace sees it (no vCPU may be running)."""
        value = ffi.new("__u32 *")
        self.vm.get_device_attr(self.fd, abi.KVM_DEV_ARM_VGIC_GRP_DIST_REGS, offset, value)
        return value[0]

    def write_dist_reg(self, offset: int, value: int) -> None:
        self.vm.set_device_attr(self.fd, abi.KVM_DEV_ARM_VGIC_GRP_DIST_REGS, offset, ffi.new("__u32 *", value))

    def set_edge_triggered(self, intid: int, edge: bool = True) -> None:
        """GICD_ICFGR for one SPI: edge-triggered (KVM's reset state for SPIs: an irqfd's pulse stays pending until
        taken) or level (the line is pending while high). A guest's GIC driver sets this itself from the DTB."""
        abi.spi_irq_line(intid)  # SPIs only: SGIs and PPIs are configured per redistributor
        offset, bit = GICD_ICFGR + intid // 16 * 4, 1 << (intid % 16 * 2 + 1)
        value = self.read_dist_reg(offset)
        self.write_dist_reg(offset, value | bit if edge else value & ~bit)

    def spi_pending(self, intid: int) -> bool:
        """The SPI's latched pending state (GICD_ISPENDR read through the device: for a level-triggered interrupt
        the latch only, not the input line; arm-vgic-v3.rst)."""
        abi.spi_irq_line(intid)
        return bool(self.read_dist_reg(GICD_ISPENDR + intid // 32 * 4) >> intid % 32 & 1)

    def line_level(self, intid: int) -> bool:
        """The input level of an SPI's line (KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, vGICv3 only)."""
        abi.spi_irq_line(intid)
        if self.version != 3:
            raise NotImplementedError("line levels are readable from a vGICv3 only")
        attr = abi.VGIC_LEVEL_INFO_LINE_LEVEL << abi.KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT | intid // 32 * 32
        value = ffi.new("__u32 *")
        self.vm.get_device_attr(self.fd, abi.KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, attr, value)
        return bool(value[0] >> intid % 32 & 1)

    def close(self) -> None:
        """Closes the device fd (the vGIC itself lives as long as the VM)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def create_vgic(vm, dist: int, *, redist: int | None = None, cpu_interface: int | None = None,
                nr_irqs: int = DEFAULT_NR_IRQS) -> Vgic:
    """An in-kernel vGICv3 at `dist` with its redistributors from `redist` (two 64 KiB frames per vCPU) where this
    KVM has one, else a vGICv2 at `dist` with its CPU interface at `cpu_interface` (whichever addresses the caller
    gave). Call `finalize()` once every vCPU exists."""
    if nr_irqs % 32 or not 64 <= nr_irqs <= 1024:
        raise ValueError(f"a GIC has 64 to 1024 interrupts in steps of 32, not {nr_irqs}")
    if redist is not None and vm.can_create_device(lib.KVM_DEV_TYPE_ARM_VGIC_V3):
        version, dev_type = 3, lib.KVM_DEV_TYPE_ARM_VGIC_V3
        addresses = ((abi.KVM_VGIC_V3_ADDR_TYPE_DIST, dist), (abi.KVM_VGIC_V3_ADDR_TYPE_REDIST, redist))
    elif cpu_interface is not None and vm.can_create_device(lib.KVM_DEV_TYPE_ARM_VGIC_V2):
        version, dev_type = 2, lib.KVM_DEV_TYPE_ARM_VGIC_V2
        addresses = ((abi.KVM_VGIC_V2_ADDR_TYPE_DIST, dist), (abi.KVM_VGIC_V2_ADDR_TYPE_CPU, cpu_interface))
    else:
        offered = " or ".join(name for name, at in (("GICv3", redist), ("GICv2", cpu_interface)) if at is not None)
        raise CloudkvmError(f"this host's KVM cannot create an in-kernel {offered or 'GIC'}",
                            "run on an arm64 host whose KVM has a vGIC (cloudkvm doctor lists vgic-v3)")
    vgic = Vgic(vm, vm.create_device(dev_type), version, nr_irqs)
    try:
        for addr_type, address in addresses:
            vm.set_device_attr(vgic.fd, abi.KVM_DEV_ARM_VGIC_GRP_ADDR, addr_type, ffi.new("__u64 *", address))
        vm.set_device_attr(vgic.fd, abi.KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, ffi.new("__u32 *", nr_irqs))
    except BaseException:
        vgic.close()
        raise
    return vgic


def set_spi_level(vm, intid: int, level: int) -> None:
    """KVM_IRQ_LINE for an SPI (a level line such as the PL011's, PL031's or PL061's); the vGIC must be finalized."""
    vm.irq_line(abi.spi_irq_line(intid), level)


def assign_spi_irqfd(vm, fd: int, intid: int, deassign: bool = False) -> None:
    """KVM_IRQFD: a write to eventfd `fd` raises SPI `intid`. On arm the gsi is the SPI's number (INTID - 32) through
    the identity routing the vGIC sets up when it is initialised (api.rst §4.75). The pulse stays pending until the
    guest takes it while the SPI is edge-triggered (KVM's reset state; describe it so in the DTB, as QEMU's virt
    does for virtio-mmio)."""
    vm.irqfd(fd, abi.spi_gsi(intid), deassign)
