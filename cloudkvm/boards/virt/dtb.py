"""The device tree of a `virt` VM (Devicetree Specification v0.4 §3 base nodes, with the Linux bindings of the
Arm GIC, arch timer, PSCI, PrimeCell PL011/PL031/PL061, gpio-keys and virtio-mmio), shaped like QEMU's
`-M virt` tree (hw/arm/virt.c create_fdt and friends)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cloudkvm.boot.fdt import DeviceTree
from cloudkvm.fsutil import atomic_write

from . import layout as L

RNG_SEED_SIZE = 64  # bytes of /chosen/rng-seed (Linux adds them to its entropy pool)
KASLR_SEED_SIZE = 8  # /chosen/kaslr-seed is one u64 (arch/arm64/kernel/kaslr.c)
KEY_POWER = 116  # include/uapi/linux/input-event-codes.h
COMMAND_LINE_SIZE = 2048  # arch/arm64/include/uapi/asm/setup.h: /chosen/bootargs beyond it is cut off

# Interrupt specifiers (Documentation/devicetree/bindings/interrupt-controller/arm,gic*.yaml): type, number, flags
GIC_SPI, GIC_PPI = 0, 1
IRQ_TYPE_EDGE_RISING, IRQ_TYPE_LEVEL_HIGH = 1, 4
GIC_PPI_CPU_MASK_SHIFT = 8  # GICv2 only: bits 8-15 of a PPI's flags name the CPUs it is wired to

# Node names as QEMU's virt uses them (stdout-path refers to the UART by this path)
PL011_NODE = f"pl011@{L.PL011_BASE:x}"
STDOUT_PATH = f"/{PL011_NODE}"


@dataclass(frozen=True)
class VirtDtbConfig:
    """What a virt VM's device tree describes; the seeds are the caller's random bytes (os.urandom, or fixed in
    tests), so the tree is a pure function of this record."""
    cpus: int
    memory_size: int
    rng_seed: bytes
    kaslr_seed: bytes
    gic_version: int = 3
    cmdline: str = ""
    initrd: tuple[int, int] | None = None  # (start, end) guest physical addresses, end exclusive
    virtio_slots: int = L.VIRTIO_MMIO_SLOTS

    def check(self) -> None:
        """ValueError naming the first field that no virt VM can have."""
        if self.gic_version not in (2, 3):
            raise ValueError(f"gic_version {self.gic_version}: the virt board has a GICv2 or a GICv3")
        max_cpus = L.GICV3_MAX_CPUS if self.gic_version == 3 else L.GICV2_MAX_CPUS
        if not 1 <= self.cpus <= max_cpus:
            raise ValueError(f"{self.cpus} vCPUs: a GICv{self.gic_version} virt board takes 1 to {max_cpus}")
        if not 0 < self.memory_size <= L.RAM_MAX_SIZE or self.memory_size % (4 * L.KiB):
            raise ValueError(f"memory size {self.memory_size:#x}: a whole number of 4 KiB pages, at most "
                             f"{L.RAM_MAX_SIZE // L.GiB} GiB")
        if not 0 <= self.virtio_slots <= L.VIRTIO_MMIO_SLOTS:
            raise ValueError(f"{self.virtio_slots} virtio slots: the virt board has 0 to {L.VIRTIO_MMIO_SLOTS}")
        if len(self.rng_seed) != RNG_SEED_SIZE or len(self.kaslr_seed) != KASLR_SEED_SIZE:
            raise ValueError(f"rng_seed must be {RNG_SEED_SIZE} bytes and kaslr_seed {KASLR_SEED_SIZE} bytes "
                             f"(got {len(self.rng_seed)} and {len(self.kaslr_seed)})")
        if "\0" in self.cmdline:
            raise ValueError("the kernel command line cannot contain NUL")
        try:
            encoded = self.cmdline.encode()
        except UnicodeEncodeError:
            raise ValueError("the kernel command line is not valid UTF-8 text") from None
        if len(encoded) >= COMMAND_LINE_SIZE:
            raise ValueError(f"the kernel command line is {len(encoded)} bytes: arm64 Linux takes at most "
                             f"{COMMAND_LINE_SIZE - 1} (COMMAND_LINE_SIZE)")
        if self.initrd is not None:
            start, end = self.initrd
            ram_end = L.RAM_BASE + self.memory_size
            if not L.RAM_BASE <= start <= end <= ram_end:
                raise ValueError(f"initrd [{start:#x}, {end:#x}) is not inside RAM [{L.RAM_BASE:#x}, {ram_end:#x})")


def fresh_seeds() -> tuple[bytes, bytes]:
    """(rng_seed, kaslr_seed) from the host's CSPRNG, for a real VM."""
    return os.urandom(RNG_SEED_SIZE), os.urandom(KASLR_SEED_SIZE)


def _reg(node, *pairs: tuple[int, int]) -> None:
    """`reg` in the root's 2-cell address / 2-cell size format."""
    node.set_u64("reg", *(v for pair in pairs for v in pair))


def _irq(kind: int, number: int, flags: int) -> tuple[int, int, int]:
    return kind, number, flags


def build_tree(config: VirtDtbConfig) -> DeviceTree:
    """The device tree of a virt VM as a DeviceTree (to inspect or extend before `to_bytes()`)."""
    config.check()
    tree = DeviceTree(boot_cpuid_phys=L.mpidr_affinity(0))
    root = tree.root
    root.set_string("compatible", "linux,dummy-virt").set_string("model", "linux,dummy-virt")
    root.set_u32("#address-cells", 2).set_u32("#size-cells", 2)
    root.set_u32("interrupt-parent", tree.phandle("gic"))

    _cpus(tree, config)
    root.add_node("psci").set_strings("compatible", "arm,psci-0.2").set_string("method", "hvc")
    memory = root.add_node(f"memory@{L.RAM_BASE:x}").set_string("device_type", "memory")
    _reg(memory, (L.RAM_BASE, config.memory_size))
    _gic(tree, config)
    _timer(tree, config)
    _primecells(tree)
    for index in range(config.virtio_slots):
        base, spi = L.virtio_mmio_slot(index)
        slot = root.add_node(f"virtio_mmio@{base:x}").set_string("compatible", "virtio,mmio")
        _reg(slot, (base, L.VIRTIO_MMIO_SIZE))
        slot.set_u32("interrupts", *_irq(GIC_SPI, spi, IRQ_TYPE_EDGE_RISING)).set_empty("dma-coherent")
    _chosen(tree, config)
    return tree


def _cpus(tree: DeviceTree, config: VirtDtbConfig) -> None:
    cpus = tree.root.add_node("cpus").set_u32("#address-cells", 1).set_u32("#size-cells", 0)
    for index in range(config.cpus):
        mpidr = L.mpidr_affinity(index)
        cpu = cpus.add_node(f"cpu@{mpidr:x}").set_string("device_type", "cpu")
        cpu.set_string("compatible", "arm,arm-v8").set_string("enable-method", "psci").set_u32("reg", mpidr)


def _gic(tree: DeviceTree, config: VirtDtbConfig) -> None:
    gic = tree.root.add_node(f"intc@{L.GIC_DIST_BASE:x}").set_phandle("gic")
    gic.set_empty("interrupt-controller").set_u32("#interrupt-cells", 3)
    # #address-cells on an interrupt provider: dtc (checks.c interrupt_provider) wants it; 0 = no child addresses
    gic.set_u32("#address-cells", 0)
    if config.gic_version == 3:
        gic.set_string("compatible", "arm,gic-v3").set_u32("#redistributor-regions", 1)
        _reg(gic, (L.GIC_DIST_BASE, L.GIC_DIST_SIZE), (L.GICV3_REDIST_BASE, L.gicv3_redist_size(config.cpus)))
    else:
        gic.set_string("compatible", "arm,cortex-a15-gic")
        _reg(gic, (L.GIC_DIST_BASE, L.GIC_DIST_SIZE), (L.GICV2_CPU_BASE, L.GICV2_CPU_SIZE))


def _timer(tree: DeviceTree, config: VirtDtbConfig) -> None:
    # QEMU says level-high (virt.c fdt_add_timer_nodes: GIC_FDT_IRQ_FLAGS_LEVEL_HI); Linux 4.8+ programs the
    # trigger itself. A GICv2 PPI also names the CPUs it reaches.
    flags = IRQ_TYPE_LEVEL_HIGH
    if config.gic_version == 2:
        flags |= ((1 << config.cpus) - 1) << GIC_PPI_CPU_MASK_SHIFT
    timer = tree.root.add_node("timer").set_strings("compatible", "arm,armv8-timer", "arm,armv7-timer")
    timer.set_u32("interrupts", *(c for ppi in L.TIMER_PPIS for c in _irq(GIC_PPI, ppi, flags)))
    timer.set_empty("always-on")


def _primecells(tree: DeviceTree) -> None:
    root = tree.root
    clock = tree.phandle("apb-pclk")
    apb = root.add_node("apb-pclk").set_phandle("apb-pclk").set_string("compatible", "fixed-clock")
    apb.set_u32("#clock-cells", 0).set_u32("clock-frequency", L.APB_PCLK_HZ)
    apb.set_string("clock-output-names", "clk24mhz")

    uart = root.add_node(PL011_NODE).set_strings("compatible", "arm,pl011", "arm,primecell")
    _reg(uart, (L.PL011_BASE, L.PL011_SIZE))
    uart.set_u32("interrupts", *_irq(GIC_SPI, L.PL011_SPI, IRQ_TYPE_LEVEL_HIGH))
    uart.set_u32("clocks", clock, clock).set_strings("clock-names", "uartclk", "apb_pclk")

    rtc = root.add_node(f"pl031@{L.PL031_BASE:x}").set_strings("compatible", "arm,pl031", "arm,primecell")
    _reg(rtc, (L.PL031_BASE, L.PL031_SIZE))
    rtc.set_u32("interrupts", *_irq(GIC_SPI, L.PL031_SPI, IRQ_TYPE_LEVEL_HIGH))
    rtc.set_u32("clocks", clock).set_string("clock-names", "apb_pclk")

    gpio = root.add_node(f"pl061@{L.PL061_BASE:x}").set_phandle("pl061")
    gpio.set_strings("compatible", "arm,pl061", "arm,primecell")
    _reg(gpio, (L.PL061_BASE, L.PL061_SIZE))
    gpio.set_u32("interrupts", *_irq(GIC_SPI, L.PL061_SPI, IRQ_TYPE_LEVEL_HIGH))
    gpio.set_empty("gpio-controller").set_u32("#gpio-cells", 2)
    gpio.set_u32("clocks", clock).set_string("clock-names", "apb_pclk")

    keys = root.add_node("gpio-keys").set_string("compatible", "gpio-keys")
    power = keys.add_node("poweroff").set_string("label", "GPIO Key Poweroff")
    power.set_u32("linux,code", KEY_POWER).set_u32("gpios", tree.phandle("pl061"), L.PL061_POWER_KEY_LINE, 0)


def _chosen(tree: DeviceTree, config: VirtDtbConfig) -> None:
    chosen = tree.root.add_node("chosen")
    chosen.set_string("bootargs", config.cmdline).set_string("stdout-path", STDOUT_PATH)
    if config.initrd is not None:
        chosen.set_u64("linux,initrd-start", config.initrd[0]).set_u64("linux,initrd-end", config.initrd[1])
    chosen.set_bytes("rng-seed", config.rng_seed).set_bytes("kaslr-seed", config.kaslr_seed)


def build_dtb(config: VirtDtbConfig) -> bytes:
    """The DTB of a virt VM."""
    return build_tree(config).to_bytes()


def write_virt_dtb(config: VirtDtbConfig, path: str | Path) -> Path:
    """Write the DTB of a virt VM to `path` (atomically, 0644), for `cloudkvm inspect dtb`."""
    return atomic_write(Path(path), build_dtb(config))
