"""The x86_64 board: a microvm-like PC (in-kernel PIC/IOAPIC/LAPIC + PIT, COM1, CMOS RTC, i8042, ACPI power)."""
import logging
import mmap

from ..boot import x86_longmode as lm
from ..devices.acpi_power import AcpiPowerControl
from ..devices.bus import Bus
from ..devices.cmos_rtc import CmosRtc
from ..devices.i8042 import I8042
from ..devices.irq import KvmIrqLine
from ..devices.legacy import PciConfigNoDevices, PortSink
from ..devices.uart16550 import Uart16550
from ..hostquirks import HostQuirks
from ..kvm.native import ffi, lib
from .x86_cpu import CpuPolicy

log = logging.getLogger("cloudkvm.x86")

# --- memory map (guest-physical) -----------------------------------------------------------------------------
GDT_ADDR = 0x500
IDT_ADDR = 0x520                 # an empty IDT (limit 0) until the guest loads its own
BOOT_PARAMS_ADDR = 0x7000        # Linux zero page (boot protocol)
PAGE_TABLES_ADDR = 0x9000        # PML4, PDPT, 4 page directories: identity map of the first 4 GiB
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000
FLAT_STACKS_TOP = 0x80000        # flat test payloads: vCPU n starts with RSP = top - n * FLAT_STACK_SIZE
FLAT_STACK_SIZE = 0x1000
EBDA_START = 0x9FC00             # [EBDA_START, 1 MiB) is reserved in the e820 map
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
FIRST_FREE_GSI = 5               # GSIs from here on are free for virtio-mmio devices (edge)

# --- MSRs set at reset (Intel SDM Vol. 4) ---------------------------------------------------------------------
MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING = 0x1A0, 1 << 0
MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB = 0x2FF, (1 << 11) | 6
APIC_LVT_LINT0, APIC_LVT_LINT1 = 0x350, 0x360  # SDM Vol. 3A §11.5.1
APIC_MODE_EXTINT, APIC_MODE_NMI = 0x7 << 8, 0x4 << 8


def memory_layout(memory: int) -> list[tuple[int, int]]:
    """RAM regions for `memory` bytes: below the 3 GiB MMIO gap, the rest above 4 GiB."""
    if memory % mmap.PAGESIZE:
        raise ValueError("memory size must be a whole number of pages")
    if memory <= MMIO_GAP_START:
        return [(0, memory)]
    return [(0, MMIO_GAP_START), (MMIO_GAP_END, memory - MMIO_GAP_START)]


class X86Board:
    """Board hooks the machine calls: create the VM's chips and devices, reset vCPUs, explain odd exits."""

    name = "x86"
    arch = "x86_64"

    def __init__(self, cpus: int, cpu_policy: CpuPolicy, quirks: HostQuirks):
        self.cpus = cpus
        self.cpu_policy = cpu_policy
        self.quirks = quirks
        self.uart: Uart16550 | None = None

    def memory_layout(self, memory: int) -> list[tuple[int, int]]:
        return memory_layout(memory)

    def create_chips(self, vm) -> None:
        vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        vm.set_tss_addr(TSS_ADDR)
        vm.create_irqchip()
        vm.create_pit2()

    def create_devices(self, vm, pio: Bus, mmio: Bus, host) -> None:
        """Legacy devices every x86 guest expects; `host` gives console output and power callbacks."""
        self.uart = Uart16550(KvmIrqLine(vm, COM1_IRQ), host.console.write)
        pio.add(COM1_PORT, 8, self.uart, "COM1")
        pio.add(I8042_PORT, 5, I8042(on_reset=lambda: host.guest_power("reset", "i8042 reset")), "i8042")
        pio.add(RTC_PORT, 2, CmosRtc(), "rtc")
        pio.add(POST_PORT, 1, PortSink(), "post")
        pio.add(PCI_CONFIG_PORT, 8, PciConfigNoDevices(), "pci-config")
        pio.add(ACPI_POWER_PORT, 3, AcpiPowerControl(
            on_poweroff=lambda: host.guest_power("poweroff", "ACPI S5 sleep"),
            on_reset=lambda: host.guest_power("reset", "ACPI reset register")), "acpi-power")

    def serial_input(self, data: bytes) -> int:
        return self.uart.receive(data) if self.uart else 0

    # --- vCPU reset -------------------------------------------------------------------------------------------
    def setup_cpuid(self, kvm, vcpu) -> None:
        policy = self.cpu_policy
        if self.quirks.active and self.quirks.cpuid_hide:
            policy = CpuPolicy(policy.model, sorted(set(policy.hide) | set(self.quirks.cpuid_hide)))
        vcpu.set_cpuid(policy.cpuid_for(kvm.supported_cpuid(), apic_id=vcpu.index, ncpus=self.cpus))

    def setup_lapic(self, vcpu) -> None:
        """LINT0 as ExtINT (the PIC's wire) and LINT1 as NMI, as a PC BIOS leaves them (MP spec §3.6.1)."""
        state = bytearray(vcpu.get_lapic())
        for reg, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
            value = int.from_bytes(state[reg:reg + 4], "little")
            value = (value & ~(0x7 << 8)) | mode
            state[reg:reg + 4] = value.to_bytes(4, "little")
        vcpu.set_lapic(bytes(state))

    def write_long_mode_tables(self, memory) -> None:
        memory.write(GDT_ADDR, lm.gdt_bytes())
        memory.write(IDT_ADDR, bytes(8))
        memory.write(PAGE_TABLES_ADDR, lm.identity_page_tables(PAGE_TABLES_ADDR, gib=4))

    def enter_long_mode(self, vcpu, rip: int, rsp: int = 0, rsi: int = 0, rdi: int = 0) -> None:
        """Put `vcpu` in 64-bit mode with paging on, flat segments, interrupts off, at `rip`."""
        sregs = vcpu.get_sregs()
        code, data, tss = (lm.segment_from_descriptor(i) for i in (lm.GDT_CODE64, lm.GDT_DATA, lm.GDT_TSS))
        sregs.cs = code.as_kvm()
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(sregs, name, data.as_kvm())
        sregs.tr = tss.as_kvm()
        sregs.gdt.base, sregs.gdt.limit = GDT_ADDR, len(lm.GDT) * 8 - 1
        sregs.idt.base, sregs.idt.limit = IDT_ADDR, 0
        sregs.cr0 = lm.CR0_PE | lm.CR0_MP | lm.CR0_ET | lm.CR0_NE | lm.CR0_WP | lm.CR0_PG
        sregs.cr3 = PAGE_TABLES_ADDR
        sregs.cr4 = lm.CR4_PAE | lm.CR4_OSFXSR | lm.CR4_OSXMMEXCPT
        sregs.efer = lm.EFER_LME | lm.EFER_LMA | lm.EFER_SCE
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        regs.rip, regs.rsp, regs.rbp, regs.rsi, regs.rdi, regs.rflags = rip, rsp, 0, rsi, rdi, 0x2
        vcpu.set_regs(regs)
        fpu = ffi.new("struct kvm_fpu *")
        fpu.fcw, fpu.mxcsr = 0x37F, 0x1F80
        vcpu.set_fpu(fpu)
        vcpu.set_msrs({MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING, MSR_MTRR_DEF_TYPE: MTRR_ENABLE_WB})

    def boot_flat(self, kvm, vcpus, memory, image: bytes, load_addr: int, entry: int) -> None:
        """Flat test payload: every vCPU enters `entry` in long mode at once, RDI = index, RSI = vCPU count."""
        if load_addr < HIGH_MEMORY or not memory.contains(load_addr, len(image)):
            raise ValueError(f"flat payload of {len(image)} bytes does not fit at 0x{load_addr:x}")
        memory.write(load_addr, image)
        self.write_long_mode_tables(memory)
        for vcpu in vcpus:
            self.setup_cpuid(kvm, vcpu)
            self.setup_lapic(vcpu)
            self.enter_long_mode(vcpu, entry, rsp=FLAT_STACKS_TOP - vcpu.index * FLAT_STACK_SIZE,
                                 rsi=len(vcpus), rdi=vcpu.index)
            vcpu.set_mp_state(lib.KVM_MP_STATE_RUNNABLE)

    # --- reporting --------------------------------------------------------------------------------------------
    def rip(self, vcpu) -> int | None:
        try:
            return vcpu.get_regs().rip
        except OSError:
            return None

    def instruction_bytes(self, vcpu) -> bytes:
        """The bytes at the faulting RIP: from KVM's emulation-failure record, else read through the page tables."""
        failure = vcpu.run.emulation_failure
        if failure.ndata >= 3 and failure.flags & 1 and 0 < failure.insn_size <= 15:
            return bytes(failure.insn_bytes[0:failure.insn_size])
        rip = self.rip(vcpu)
        if rip is None:
            return b""
        try:
            gpa = vcpu.translate(rip)
        except OSError:
            return b""
        memory = vcpu.memory
        if gpa is None or memory is None:
            return b""
        length = 15
        while length and not memory.contains(gpa, length):
            length -= 1
        return memory.read(gpa, length) if length else b""

    def handle_internal_error(self, vcpu) -> bool:
        """Completes instructions this host's KVM cannot emulate, where that is safe (none yet)."""
        return False
