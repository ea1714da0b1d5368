"""Every address, port and IRQ of the x86 board in one place: the guest-physical memory map, the ISA port map and
the interrupt lines (docs/architecture.md, "x86 board")."""
from ...boot import x86_longmode as lm

# --- memory map (guest-physical) -----------------------------------------------------------------------------
GDT_ADDR = 0x500
IDT_ADDR = 0x520                 # an empty IDT (limit 0) until the guest loads its own
BOOT_PARAMS_ADDR = 0x7000        # Linux zero page (boot protocol)
PAGE_TABLES_ADDR = 0x9000        # PML4, PDPT, 4 page directories: identity map of the first 4 GiB
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000
FLAT_STACKS_TOP = 0x80000        # flat test payloads: vCPU n starts with RSP = top - n * FLAT_STACK_SIZE
FLAT_STACK_SIZE = 0x1000
# vCPUs a flat payload can have: every vCPU's stack lies below FLAT_STACKS_TOP and above the page tables
FLAT_MAX_CPUS = (FLAT_STACKS_TOP - PAGE_TABLES_ADDR - lm.page_tables_size(4)) // FLAT_STACK_SIZE
EBDA_START = 0x9FC00             # [EBDA_START, 1 MiB) is reserved in the e820 map
ACPI_TABLES_ADDR = 0xE0000       # RSDP and tables, in the reserved BIOS area where Linux also scans for the RSDP
HIGH_MEMORY = 0x100000           # 1 MiB: kernels and flat payloads load here
MMIO_GAP_START = 0xC000_0000     # [3 GiB, 4 GiB) holds no RAM: device MMIO, IOAPIC, LAPIC
MMIO_GAP_END = 0x1_0000_0000
VIRTIO_MMIO_BASE = 0xD000_0000   # virtio-mmio slots, VIRTIO_MMIO_SIZE apart
VIRTIO_MMIO_SIZE = 0x1000
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000
IDENTITY_MAP_ADDR = 0xFFFB_C000  # KVM_SET_IDENTITY_MAP_ADDR page, then the 3 TSS pages (Intel real-mode support)
TSS_ADDR = 0xFFFB_D000

# --- port map and IRQs (ISA) ----------------------------------------------------------------------------------
COM1_PORT, COM1_IRQ = 0x3F8, 4
I8042_PORT = 0x60                # 0x60-0x64; 0x61 inside it is KVM's PIT speaker port
RTC_PORT = 0x70
POST_PORT = 0x80
PCI_CONFIG_PORT = 0xCF8
ACPI_POWER_PORT = 0x600          # sleep control 0x600, sleep status 0x601, reset 0x602
POWER_BUTTON_GSI = 9             # ACPI Generic Event Device: an edge here is "power button pressed" (the PC SCI line)
VIRTIO_GSIS = (5, 6, 7, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23)  # free IOAPIC pins, edge
