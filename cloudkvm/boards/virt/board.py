"""The aarch64 `virt` board: QEMU's `virt` machine on arm64 KVM (an in-kernel vGICv3, or v2 where v3 is missing;
PSCI 0.2 in the kernel; PL011, PL031, PL061 with a gpio-keys power key; virtio-mmio), booted as
Documentation/arch/arm64/booting.rst asks: an Image, a device tree, x0 = its address, EL1h with DAIF masked."""
from __future__ import annotations

import errno
import logging
import struct
from pathlib import Path

from ...boot import linux_arm64
from ...devices.pl011 import Pl011
from ...devices.pl031 import Pl031
from ...devices.pl061 import Pl061, press_power_key
from ...errors import CloudkvmError
from ...fsutil import read_bounded
from ...kvm import arm64, arm64_abi, vgic
from ...kvm.fastpath import FastUart
from ..base import Board, CpuOptions, VirtioSlot
from . import layout as L
from .dtb import VirtDtbConfig, build_dtb, fresh_seeds

log = logging.getLogger("cloudkvm.virt")

MAX_INITRD = 2 << 30  # bytes read from an initrd file (a larger one is not an initramfs a VM boots from)
PLACEHOLDER_SIZE = 32 << 20  # `inspect dtb`: the size assumed for a kernel or initrd that is not there


class SpiLine:
    """A level interrupt line into the vGIC: one SPI driven with KVM_IRQ_LINE (devices.irq.IrqLine)."""

    def __init__(self, vm, spi: int):
        self.vm, self.intid, self.level = vm, L.GIC_SPI_BASE + spi, False

    def set_level(self, high: bool) -> None:
        if high != self.level:
            self.level = high
            vgic.set_spi_level(self.vm, self.intid, 1 if high else 0)


class VirtBoard(Board):
    """Board hooks for arm64 guests on QEMU's `virt` memory map (boards/virt/layout.py)."""

    name = "virt"
    arch = "aarch64"
    max_cpus = L.GICV3_MAX_CPUS  # a GICv2 host takes GICV2_MAX_CPUS (checked when the vGIC is created)
    virtio_slot_count = L.VIRTIO_MMIO_SLOTS
    default_console = "ttyAMA0"
    has_port_io = False
    pc_name = "PC"
    flat_max_cpus = L.GICV3_MAX_CPUS
    flat_limit = "the GICv3 redistributor region"

    def __init__(self, cpus: int, cpu: CpuOptions, quirks) -> None:
        if cpu.model != "host" or cpu.hide:
            raise CloudkvmError("the virt board runs vCPUs as `cpu: host` only", "set cpu: host and remove cpu.hide")
        self.cpus = cpus
        self.quirks = quirks
        self.vgic: vgic.Vgic | None = None
        self.target: int | None = None
        self.uart: Pl011 | None = None
        self.rtc: Pl031 | None = None
        self.gpio: Pl061 | None = None
        self._call_later = None

    # --- before a VM exists -----------------------------------------------------------------------------------
    @staticmethod
    def memory_layout(memory: int) -> list[tuple[int, int]]:
        """One RAM region from 1 GiB (QEMU virt's VIRT_MEM), at most 255 GiB."""
        if memory > L.RAM_MAX_SIZE:
            raise CloudkvmError(f"memory: the virt board has at most {L.RAM_MAX_SIZE >> 30} GiB of RAM "
                                f"(got {memory >> 20} MiB)", f"give the VM {L.RAM_MAX_SIZE >> 30}G or less")
        return [(L.RAM_BASE, memory)]

    @staticmethod
    def check_kernel(data: bytes, path: str) -> None:
        linux_arm64.parse_image(data, path)

    # --- building the VM ----------------------------------------------------------------------------------------
    def create_irqchip(self, vm) -> None:
        """An in-kernel vGICv3 (vGICv2 where this KVM has no v3) at QEMU virt's addresses; its CTRL_INIT waits
        for the vCPUs (finalize_irqchip)."""
        self.target, _ = arm64.preferred_target(vm)
        self.vgic = vgic.create_vgic(vm, L.GIC_DIST_BASE, redist=L.GICV3_REDIST_BASE,
                                     cpu_interface=L.GICV2_CPU_BASE, nr_irqs=L.GIC_SPI_BASE + L.GIC_SPI_COUNT)
        if self.vgic.version == 2 and self.cpus > L.GICV2_MAX_CPUS:
            self.close()
            raise CloudkvmError(f"cpus: this host's KVM has only a GICv2, which takes {L.GICV2_MAX_CPUS} vCPUs "
                                f"(got {self.cpus})", f"use {L.GICV2_MAX_CPUS} or fewer")

    def create_devices(self, vm, pio, mmio, host) -> None:
        """PL011 console (SPI 1), PL031 clock (SPI 2), PL061 GPIO with the power key on line 3 (SPI 7)."""
        self._call_later = host.io.call_later
        self.uart = Pl011(SpiLine(vm, L.PL011_SPI), host.console.write)
        self.fast_uart = FastUart(self.uart.emit)  # the console's FR reads and DR writes stay in the C run loop
        self.uart.attach_fast_path(self.fast_uart.state, L.PL011_BASE)
        self.rtc = Pl031(SpiLine(vm, L.PL031_SPI), call_later=host.io.call_later)
        self.gpio = Pl061(SpiLine(vm, L.PL061_SPI))
        mmio.add(L.PL011_BASE, L.PL011_SIZE, self.uart, "pl011")
        mmio.add(L.PL031_BASE, L.PL031_SIZE, self.rtc, "pl031")
        mmio.add(L.PL061_BASE, L.PL061_SIZE, self.gpio, "pl061")

    def virtio_slot(self, index: int) -> VirtioSlot:
        """virtio-mmio transport `index`: 0x200 bytes from 0x0a000000, SPI 16 + index (edge, through an irqfd)."""
        if not 0 <= index < L.VIRTIO_MMIO_SLOTS:
            raise CloudkvmError(f"too many virtio devices ({index + 1})",
                                f"the virt board has {L.VIRTIO_MMIO_SLOTS} slots")
        base, spi = L.virtio_mmio_slot(index)
        return VirtioSlot(base, L.VIRTIO_MMIO_SIZE, spi)

    def init_vcpu(self, kvm, vcpu) -> None:
        """KVM_ARM_VCPU_INIT with in-kernel PSCI 0.2; every vCPU but the first starts powered off, for the guest
        to start with PSCI CPU_ON (booting.rst §5, "enable-method" psci)."""
        features = [arm64_abi.KVM_ARM_VCPU_PSCI_0_2]
        if vcpu.index:
            features.append(arm64_abi.KVM_ARM_VCPU_POWER_OFF)
        arm64.vcpu_init(vcpu, self.target, features)

    def finalize_irqchip(self, vm, vcpus: list) -> None:
        self.vgic.finalize()

    # --- payloads -------------------------------------------------------------------------------------------------
    def boot_linux(self, kvm, vcpus: list, memory, kernel_path: Path, initrd_path: Path | None, cmdline: str,
                   virtio_slots: list[VirtioSlot] = ()) -> dict:
        """booting.rst: the Image at RAM base + text_offset, the initrd and the DTB (with /chosen bootargs,
        linux,initrd-start/end, rng-seed, kaslr-seed) placed in RAM, and the boot vCPU entering the Image with
        x0 = the DTB; the other vCPUs wait, powered off, for PSCI CPU_ON."""
        image = linux_arm64.load_image(kernel_path)
        initrd = _read_initrd(initrd_path) if initrd_path else None
        return self._load(vcpus, memory, image, initrd, cmdline, len(virtio_slots))

    def boot_flat(self, kvm, vcpus: list, memory, image: bytes, load_addr: int, entry: int) -> None:
        """A purpose-built guest is an arm64 Image too (tests/guests/aarch64): placed and entered as Linux is,
        whatever `load_addr` and `entry` say (they are the x86 flat ABI's), with an empty command line."""
        self._load(vcpus, memory, linux_arm64.parse_image(image, "the flat payload"), None, "", 0)

    def _load(self, vcpus: list, memory, image, initrd: bytes | None, cmdline: str, slots: int) -> dict:
        region = memory.regions[0]
        placement, dtb = plan(image, None if initrd is None else len(initrd), region.size, len(vcpus),
                              self.vgic.version, cmdline, slots)
        memory.write(placement.kernel_addr, image.data)
        if initrd is not None:
            memory.write(placement.initrd_addr, initrd)
        memory.write(placement.dtb_addr, dtb)
        arm64.set_boot_regs(vcpus[0], placement.entry, placement.dtb_addr)
        return {"entry": placement.entry, "cmdline": cmdline, "dtb": (placement.dtb_addr, len(dtb)),
                "initrd": None if initrd is None else (placement.initrd_addr, len(initrd)),
                "gic": self.vgic.version}

    @staticmethod
    def write_dtb(path: Path, cpus: int, memory: int, kernel: Path | None, initrd: Path | None, cmdline: str,
                  virtio_slots: int) -> list[str]:
        """`cloudkvm inspect dtb`: the device tree a VM would get (GICv3), written to `path`. A kernel or initrd
        that is not there is stood in for by a placeholder of PLACEHOLDER_SIZE bytes; the notes say which."""
        notes = []
        if kernel is not None and kernel.is_file():
            image = linux_arm64.load_image(kernel)
        else:
            notes.append(f"the kernel {kernel} is not there: placed as a {PLACEHOLDER_SIZE >> 20} MiB Image")
            image = linux_arm64.parse_image(placeholder_image(), "placeholder kernel")
        initrd_size = None
        if initrd is not None:
            if initrd.is_file():
                initrd_size = initrd.stat().st_size
            else:
                notes.append(f"the initrd {initrd} is not there: a {PLACEHOLDER_SIZE >> 20} MiB placeholder")
                initrd_size = PLACEHOLDER_SIZE
        _, dtb = plan(image, initrd_size, memory, cpus, 3, cmdline, virtio_slots)
        try:
            Path(path).write_bytes(dtb)
        except OSError as exc:
            raise CloudkvmError(f"{path}: cannot write the device tree: {exc.strerror}", "pick a writable path") \
                from None
        return notes

    # --- while the VM runs -------------------------------------------------------------------------------------------
    def serial_input(self, data: bytes) -> int:
        return self.uart.receive(data) if self.uart else 0

    def request_shutdown(self, vm) -> bool:
        """Press the power key (GPIO line 3, gpio-keys KEY_POWER), as QEMU's virt does for system_powerdown."""
        if self.gpio is None or self._call_later is None:
            return False
        press_power_key(self.gpio, self._call_later, pin=L.PL061_POWER_KEY_LINE)
        return True

    def close(self) -> None:
        if self.vgic is not None:
            self.vgic.close()
            self.vgic = None

    def describe_run_error(self, vcpu, err: int) -> tuple[str, str] | None:
        """KVM answers ENOSYS for a data abort on MMIO it cannot decode (no valid ISV: a load/store pair, writeback,
        or SIMD access to device memory; arch/arm64/kvm/mmio.c io_mem_abort): the guest's fault."""
        if err == errno.ENOSYS:
            return ("guest-fault", "an MMIO access KVM cannot decode (no instruction syndrome: e.g. a load/store "
                                   "pair or a writeback access to device memory)")
        return None

    def pc(self, vcpu) -> int | None:
        try:
            return arm64.get_core_reg(vcpu, "pc")
        except OSError:
            return None


def plan(image, initrd_size: int | None, memory: int, cpus: int, gic_version: int, cmdline: str,
         slots: int) -> tuple:
    """(placement, DTB) of a VM: where booting.rst puts the Image, initrd and DTB in RAM, and the tree naming them."""
    placement = linux_arm64.place(image, L.RAM_BASE, memory, initrd_size)
    rng_seed, kaslr_seed = fresh_seeds()
    config = VirtDtbConfig(cpus=cpus, memory_size=memory, rng_seed=rng_seed, kaslr_seed=kaslr_seed,
                           gic_version=gic_version, cmdline=cmdline, virtio_slots=slots,
                           initrd=None if initrd_size is None else (placement.initrd_addr, placement.initrd_end))
    try:
        config.check()
    except ValueError as exc:
        raise CloudkvmError(f"the virt board cannot describe this VM: {exc}", "check cpus and memory") from None
    dtb = build_dtb(config)
    linux_arm64.check_dtb(dtb, placement)
    return placement, dtb


def placeholder_image() -> bytes:
    """The 64-byte header of an arm64 Image of PLACEHOLDER_SIZE bytes (booting.rst §4), standing in for a kernel."""
    return struct.pack("<IIQQQQQQII", 0, 0, 0, PLACEHOLDER_SIZE, 0b1010, 0, 0, 0, 0x644D5241, 0)


def _read_initrd(path: Path) -> bytes:
    """The initrd's bytes as they are (the arm64 kernel unpacks it itself; KVM runs its code at native speed)."""
    try:
        data = read_bounded(path, MAX_INITRD, follow_symlinks=True)
    except OSError as exc:
        if exc.errno == errno.EFBIG:
            raise CloudkvmError(f"{path}: the initrd is larger than {MAX_INITRD >> 30} GiB",
                                "is this an initramfs?") from None
        raise CloudkvmError(f"{path}: cannot read the initrd: {exc.strerror or exc}", "check the initrd path") from None
    if not data:
        raise CloudkvmError(f"{path}: the initrd file is empty", "pass a real initrd")
    return data
