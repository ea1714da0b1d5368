"""The `virt` board's memory map and interrupts in one place: QEMU's `virt` machine (hw/arm/virt.c base_memmap,
a15irqmap), so a device tree written for this board also describes QEMU's `-M virt`."""

from __future__ import annotations

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# --- GIC (virt.c VIRT_GIC_DIST, VIRT_GIC_CPU, VIRT_GIC_REDIST) ---------------------------------------------------
GIC_DIST_BASE, GIC_DIST_SIZE = 0x0800_0000, 0x1_0000
GICV2_CPU_BASE, GICV2_CPU_SIZE = 0x0801_0000, 0x1_0000
GICV3_REDIST_BASE = 0x080A_0000
GICV3_REDIST_SIZE_PER_CPU = 0x2_0000  # RD_base + SGI_base frames, 64 KiB each (GICv3 spec §12.10)
GICV3_REDIST_REGION_SIZE = 0xF6_0000  # virt.c: "allows up to 2*64kB*123 CPUs", up to the UART
GICV3_MAX_CPUS = GICV3_REDIST_REGION_SIZE // GICV3_REDIST_SIZE_PER_CPU  # 123
GICV2_MAX_CPUS = 8  # GICv2 spec §1.1: CPU interfaces 0-7
GIC_SPI_COUNT = 256  # virt.c NUM_IRQS: SPIs the GIC has (KVM's vGIC NR_IRQS counts 32 more: SGIs and PPIs)
GIC_SPI_BASE = 32  # INTID of SPI 0 (GIC spec: INTIDs 0-15 SGIs, 16-31 PPIs); a KVM irqfd/GSI is the SPI number
GIC_PPI_BASE = 16  # INTID of PPI 0

# --- architected timer PPIs (virt.h ARCH_TIMER_*_IRQ; the Arm generic timer binding's order) -------------------
TIMER_SECURE_PPI = 13      # secure EL1 physical timer
TIMER_NONSECURE_PPI = 14   # non-secure EL1 physical timer
TIMER_VIRTUAL_PPI = 11     # EL1 virtual timer
TIMER_HYP_PPI = 10         # EL2 (hypervisor) physical timer
TIMER_PPIS = (TIMER_SECURE_PPI, TIMER_NONSECURE_PPI, TIMER_VIRTUAL_PPI, TIMER_HYP_PPI)

# --- PrimeCell devices (virt.c VIRT_UART, VIRT_RTC, VIRT_GPIO; a15irqmap) -----------------------------------------
PL011_BASE, PL011_SIZE, PL011_SPI = 0x0900_0000, 0x1000, 1
PL031_BASE, PL031_SIZE, PL031_SPI = 0x0901_0000, 0x1000, 2
PL061_BASE, PL061_SIZE, PL061_SPI = 0x0903_0000, 0x1000, 7
PL061_POWER_KEY_LINE = 3  # virt.c create_gpio_keys: GPIO 3 is the power button (gpio-keys, KEY_POWER)
APB_PCLK_HZ = 24_000_000  # virt.c create_fdt: the fixed 24 MHz "apb-pclk" clock of every PrimeCell

# --- virtio-mmio transports (virt.c VIRT_MMIO, NUM_VIRTIO_TRANSPORTS; a15irqmap VIRT_MMIO = 16) -----------------
VIRTIO_MMIO_BASE = 0x0A00_0000
VIRTIO_MMIO_STRIDE = VIRTIO_MMIO_SIZE = 0x200
VIRTIO_MMIO_FIRST_SPI = 16
VIRTIO_MMIO_SLOTS = 32

# --- RAM (virt.c VIRT_MEM: from 1 GiB; LEGACY_RAMLIMIT_GB = 255) ---------------------------------------------------
RAM_BASE = 0x4000_0000
RAM_MAX_SIZE = 255 * GiB


def virtio_mmio_slot(index: int) -> tuple[int, int]:
    """(base address, SPI number) of virtio-mmio transport `index` (0 .. VIRTIO_MMIO_SLOTS - 1)."""
    if not 0 <= index < VIRTIO_MMIO_SLOTS:
        raise ValueError(f"virtio-mmio slot {index}: the virt board has slots 0-{VIRTIO_MMIO_SLOTS - 1}")
    return VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_STRIDE, VIRTIO_MMIO_FIRST_SPI + index


def gicv3_redist_size(cpus: int) -> int:
    """Bytes of redistributor space `cpus` vCPUs take from GICV3_REDIST_BASE."""
    return cpus * GICV3_REDIST_SIZE_PER_CPU


def mpidr_affinity(cpu: int) -> int:
    """The MPIDR_EL1 affinity KVM gives vCPU `cpu` (arch/arm64/kvm/sys_regs.c reset_mpidr: Aff0 = id[3:0],
    Aff1 = id[11:4], Aff2 = id[19:12]); QEMU's virt agrees up to 16 vCPUs with a GICv3 and 8 with a GICv2."""
    if cpu < 0:
        raise ValueError(f"vCPU index {cpu} is negative")
    return (cpu & 0xF) | ((cpu >> 4) & 0xFF) << 8 | ((cpu >> 12) & 0xFF) << 16
