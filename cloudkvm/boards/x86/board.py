"""The x86_64 board: a microvm-like PC (in-kernel PIC/IOAPIC/LAPIC + PIT, COM1, CMOS RTC, i8042, ACPI power)."""
import logging
import mmap
from pathlib import Path

from ...boot import linux_x86
from ...boot import x86_longmode as lm
from ...boot.acpi import AcpiConfig, VirtioMmioSlot, build_tables
from ...boot.initrd import expanded_initrd
from ...devices.acpi_power import AcpiPowerControl
from ...devices.bus import C_UART_LSR, C_UART_THR, Bus
from ...devices.cmos_rtc import CmosRtc
from ...devices.i8042 import I8042
from ...devices.irq import KvmIrqLine
from ...devices.legacy import PciConfigNoDevices, PortSink
from ...devices.uart16550 import LSR, RBR_THR_DLL, Uart16550
from ...kvm.fastpath import FastUart
from ...errors import CloudkvmError, GuestMemoryError
from ...hostquirks import HostQuirks
from ...kvm.native import ffi, lib
from ..base import Board, CpuOptions, VirtioSlot
from .assist import TICK_SECONDS, BootAssists
from .complete import complete
from .kvm_access import KvmCpuAccess
from .cpu import CpuPolicy, linux_clearcpuid
from .layout import (ACPI_POWER_PORT, ACPI_TABLES_ADDR, BOOT_PARAMS_ADDR, CMDLINE_ADDR, CMDLINE_MAX, COM1_IRQ,
                     COM1_PORT, EBDA_START, FLAT_MAX_CPUS, FLAT_STACK_SIZE, FLAT_STACKS_TOP, GDT_ADDR, HIGH_MEMORY,
                     I8042_PORT, IDENTITY_MAP_ADDR, IDT_ADDR, IOAPIC_ADDR, LAPIC_ADDR, MMIO_GAP_END, MMIO_GAP_START,
                     PAGE_TABLES_ADDR, PCI_CONFIG_PORT, POST_PORT, POWER_BUTTON_GSI, RTC_PORT, TSS_ADDR, VIRTIO_GSIS,
                     VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE)

log = logging.getLogger("cloudkvm.x86")

# --- MSRs set at reset (Intel SDM Vol. 4) ---------------------------------------------------------------------
MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING = 0x1A0, 1 << 0
MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB = 0x2FF, (1 << 11) | 6
APIC_LVT_LINT0, APIC_LVT_LINT1 = 0x350, 0x360  # SDM Vol. 3A §11.5.1
APIC_MODE_EXTINT, APIC_MODE_NMI = 0x7 << 8, 0x4 << 8


def _read(path: str, what: str) -> bytes:
    try:
        data = open(path, "rb").read()
    except OSError as exc:
        raise CloudkvmError(f"{path}: cannot read the {what}: {exc.strerror}", f"check the {what} path") from None
    if not data:
        raise CloudkvmError(f"{path}: the {what} file is empty", f"pass a real {what}")
    return data


def write_acpi_tables(folder, cpus: int, virtio_slots: list[VirtioSlot] = ()) -> list:
    """The tables an x86 VM with `cpus` vCPUs gets, one `<name>.dat` file each (as `iasl -d` reads them)."""
    if not 1 <= cpus <= X86Board.max_cpus:
        raise CloudkvmError(f"--cpus {cpus}: an x86 VM has 1 to {X86Board.max_cpus} vCPUs",
                            "pick a count in that range")
    board = X86Board(cpus, CpuOptions(), HostQuirks())
    tables = build_tables(board.acpi_config(list(virtio_slots)), ACPI_TABLES_ADDR)
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, blob in tables.tables.items():
            path = folder / f"{name.lower()}.dat"
            path.write_bytes(blob)
            paths.append(path)
    except OSError as exc:
        raise CloudkvmError(f"{folder}: cannot write the tables: {exc.strerror}", "pick a writable folder") from None
    return paths


def memory_layout(memory: int) -> list[tuple[int, int]]:
    """RAM regions for `memory` bytes: below the 3 GiB MMIO gap, the rest above 4 GiB."""
    if memory % mmap.PAGESIZE:
        raise ValueError("memory size must be a whole number of pages")
    if memory <= MMIO_GAP_START:
        return [(0, memory)]
    return [(0, MMIO_GAP_START), (MMIO_GAP_END, memory - MMIO_GAP_START)]


class X86Board(Board):
    """The x86 board's hooks (boards/base.Board): chips, legacy devices, vCPU reset into 64-bit mode, reports."""

    name = "x86"
    arch = "x86_64"
    max_cpus = 255  # the MADT's Processor Local APIC entries carry 8-bit APIC ids (ACPI 6.4 §5.2.12.2)
    virtio_slot_count = len(VIRTIO_GSIS)
    default_console = "ttyS0"  # COM1
    has_port_io = True
    pc_name = "RIP"
    flat_max_cpus = FLAT_MAX_CPUS
    flat_limit = f"each starts on its own {FLAT_STACK_SIZE // 1024} KiB stack below 0x{FLAT_STACKS_TOP:x}"

    def __init__(self, cpus: int, cpu: CpuOptions, quirks: HostQuirks):
        self.cpus = cpus
        self.cpu_policy = CpuPolicy(cpu.model, list(cpu.hide))
        self.quirks = quirks
        self.uart: Uart16550 | None = None
        self.fast_uart: FastUart | None = None  # the console UART's C fast path, for the vCPU loops
        self.completed: dict[str, int] = {}  # instructions completed for the host's emulator, by name
        self.assists = BootAssists(syscalls=quirks.boot_assists)
        self.tick_interval: float | None = None  # seconds between `vcpu_tick` calls, when the board wants them

    @staticmethod
    def memory_layout(memory: int) -> list[tuple[int, int]]:
        return memory_layout(memory)

    @staticmethod
    def write_acpi_tables(folder, cpus: int) -> list:
        """`cloudkvm inspect acpi`: the ACPI tables a VM of `cpus` vCPUs gets, as `<name>.dat` files in `folder`."""
        return write_acpi_tables(folder, cpus)

    @staticmethod
    def check_kernel(data: bytes, path: str) -> None:
        """A bzImage or an x86_64 vmlinux ELF (boot/linux_x86.parse_kernel's one-line errors otherwise)."""
        linux_x86.parse_kernel(data, path)

    @staticmethod
    def prepare_boot(kernel: bytes, initrd: bytes | None, name: str) -> None:
        """The decompressed vmlinux of a bzImage and the expanded initramfs, cached by content as `boot_linux`
        finds them."""
        if linux_x86.parse_kernel(kernel, name).kind != "elf":
            linux_x86.vmlinux_cache(name, kernel)
        if initrd is not None:
            expanded_initrd(initrd, f"{name} (initrd)")

    def create_irqchip(self, vm) -> None:
        """PIC + IOAPIC + LAPIC in the kernel and the PIT (with KVM's Intel real-mode helper pages first)."""
        vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        vm.set_tss_addr(TSS_ADDR)
        vm.create_irqchip()
        vm.create_pit2()

    def create_devices(self, vm, pio: Bus | None, mmio: Bus, host) -> None:
        """Legacy devices every x86 guest expects; `host` gives console output and power callbacks."""
        self.uart = Uart16550(KvmIrqLine(vm, COM1_IRQ), host.console.write)
        self.fast_uart = FastUart(self.uart.emit)
        self.uart.attach_fast_path(self.fast_uart.state)
        pio.add(COM1_PORT, 8, self.uart, "COM1", c_ports={RBR_THR_DLL: C_UART_THR, LSR: C_UART_LSR})
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

    def setup_msrs(self, vcpu) -> None:
        """What firmware leaves in every processor's MSRs alike: fast strings on, and MTRRs on with write-back
        as the default type (SDM Vol. 3A §11.11.8: all processors of an MP system must have the same MTRRs)."""
        vcpu.set_msrs({MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING, MSR_MTRR_DEF_TYPE: MTRR_ENABLE_WB})

    def init_vcpu(self, kvm, vcpu) -> None:
        """The per-vCPU state every payload starts from: CPUID, local APIC wiring, MSRs."""
        self.setup_cpuid(kvm, vcpu)
        self.setup_lapic(vcpu)
        self.setup_msrs(vcpu)

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

    def boot_flat(self, kvm, vcpus, memory, image: bytes, load_addr: int, entry: int) -> None:
        """Flat test payload: every vCPU enters `entry` in long mode at once, RDI = index, RSI = vCPU count."""
        if load_addr < HIGH_MEMORY or not memory.contains(load_addr, len(image)):
            raise ValueError(f"flat payload of {len(image)} bytes does not fit at 0x{load_addr:x}")
        memory.write(load_addr, image)
        self.write_long_mode_tables(memory)
        for vcpu in vcpus:
            self.enter_long_mode(vcpu, entry, rsp=FLAT_STACKS_TOP - vcpu.index * FLAT_STACK_SIZE,
                                 rsi=len(vcpus), rdi=vcpu.index)
            vcpu.set_mp_state(lib.KVM_MP_STATE_RUNNABLE)

    def e820_map(self, memory) -> list[tuple[int, int, int]]:
        """RAM below the EBDA, the reserved BIOS hole up to 1 MiB, then every RAM region (ACPI 6.4 §15)."""
        table = []
        for region in memory.regions:
            if region.gpa == 0:
                table.append((0, EBDA_START, linux_x86.E820_RAM))
                table.append((EBDA_START, HIGH_MEMORY - EBDA_START, linux_x86.E820_RESERVED))
                table.append((HIGH_MEMORY, region.size - HIGH_MEMORY, linux_x86.E820_RAM))
            else:
                table.append((region.gpa, region.size, linux_x86.E820_RAM))
        return table

    def acpi_config(self, virtio_slots: list[VirtioSlot]) -> AcpiConfig:
        return AcpiConfig(cpus=self.cpus, ioapic_addr=IOAPIC_ADDR, lapic_addr=LAPIC_ADDR,
                          sleep_control_port=ACPI_POWER_PORT, sleep_status_port=ACPI_POWER_PORT + 1,
                          reset_port=ACPI_POWER_PORT + 2, com1=(COM1_PORT, COM1_IRQ),
                          virtio_mmio=[VirtioMmioSlot(s.base, s.size, s.irq) for s in virtio_slots],
                          power_button_gsi=POWER_BUTTON_GSI)

    def virtio_slot(self, index: int) -> VirtioSlot:
        """Where virtio-mmio device `index` lives: its MMIO window and its (edge) GSI."""
        if index >= len(VIRTIO_GSIS):
            raise CloudkvmError(f"too many virtio devices ({index + 1})", f"the x86 board has {len(VIRTIO_GSIS)} slots")
        return VirtioSlot(VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_SIZE, VIRTIO_MMIO_SIZE, VIRTIO_GSIS[index])

    def request_shutdown(self, vm) -> bool:
        """Press the ACPI power button: an edge on the GED's GSI (the guest's OS decides to power off)."""
        vm.irq_line(POWER_BUTTON_GSI, 1)
        vm.irq_line(POWER_BUTTON_GSI, 0)
        return True

    def linux_cmdline(self, cmdline: str) -> str:
        """The user's command line plus the host quirks' Linux parameters (said once in the log)."""
        params = list(self.quirks.linux_cmdline)
        if self.quirks.linux_clearcpuid:
            params.append(linux_clearcpuid(self.quirks.linux_clearcpuid))
        given = {a.split("=")[0] for a in cmdline.split()}
        extra = [p for p in params if p and p.split("=")[0] not in given]
        return " ".join([cmdline.strip(), *extra]).strip()

    def boot_linux(self, kvm, vcpus, memory, kernel_path, initrd_path, cmdline: str,
                   virtio_slots: list[VirtioSlot] = ()) -> dict:
        """Linux x86 boot protocol, 64-bit entry (boot.rst §"64-bit Boot Protocol"): host-decompressed vmlinux
        at its physical addresses, zero page, command line, initrd, ACPI tables; vCPU 0 enters startup_64 with
        RSI = zero page, the others wait for INIT/SIPI from the guest. Returns what was placed where."""
        kernel_path = str(kernel_path)
        try:
            vmlinux = _read(kernel_path, "kernel")
            image = original = linux_x86.parse_kernel(vmlinux, kernel_path)
            elf_path = kernel_path
            if original.kind != "elf":
                elf_path = str(linux_x86.vmlinux_cache(kernel_path, vmlinux))
                vmlinux = _read(elf_path, "kernel")
                image = linux_x86.parse_kernel(vmlinux, f"{kernel_path} (decompressed)")
        except MemoryError:
            raise CloudkvmError(f"{kernel_path}: too large to load", "is this really a kernel?") from None
        header = original.header if original.kind == "bzimage" else linux_x86.SetupHeader.for_elf(
            image.kernel_alignment, image.load_address, image.init_size)
        kernel_end = max(s.end for s in image.segments)
        ram_top = memory.regions[0].end
        if kernel_end + (2 << 20) > ram_top:
            raise CloudkvmError(f"{kernel_path}: the kernel needs {kernel_end >> 20} MiB of low memory, the VM has "
                                f"{ram_top >> 20} MiB", "give the VM more memory")
        linux_x86.load_elf_segments(image, memory)
        line = self.linux_cmdline(cmdline)
        encoded = line.encode()
        if len(encoded) >= min(CMDLINE_MAX, header.effective_cmdline_size + 1):
            raise CloudkvmError(f"the kernel command line is {len(encoded)} bytes, the kernel takes "
                                f"{header.effective_cmdline_size}", "shorten the command line")
        memory.write(CMDLINE_ADDR, encoded + b"\0")
        initrd = None
        if initrd_path:
            data = expanded_initrd(_read(str(initrd_path), "initrd"), str(initrd_path))
            addr = linux_x86.initrd_placement(len(data), ram_top, header.effective_initrd_addr_max,
                                              max(kernel_end, original.kernel_end))
            memory.write(addr, data)
            initrd = (addr, len(data))
        tables = build_tables(self.acpi_config(list(virtio_slots)), ACPI_TABLES_ADDR)
        for gpa, blob in tables.blobs:
            memory.write(gpa, blob)
        zero_page = linux_x86.build_boot_params(header, self.e820_map(memory), CMDLINE_ADDR, len(encoded),
                                                initrd, tables.rsdp_addr)
        memory.write(BOOT_PARAMS_ADDR, zero_page)
        self.write_long_mode_tables(memory)
        self.enter_long_mode(vcpus[0], image.entry, rsi=BOOT_PARAMS_ADDR)
        if self.quirks.boot_assists:
            from ...boot.linux_bss import bss_clear_sites  # pyelftools: only interpreting KVMs pay its import

            self.assists.arm_zero_stores(vcpus[0], bss_clear_sites(vmlinux))
            self.tick_interval = TICK_SECONDS  # the syscall assist arms once the kernel has set up `syscall`
        return {"entry": image.entry, "cmdline": line, "initrd": initrd, "rsdp": tables.rsdp_addr,
                "vmlinux": elf_path}

    # --- reporting --------------------------------------------------------------------------------------------
    def pc(self, vcpu) -> int | None:
        try:
            return vcpu.get_regs().rip
        except OSError:
            return None

    def describe_exit(self, vcpu, reason: int) -> tuple[str, str] | None:
        """KVM_EXIT_SHUTDOWN: the processor shut down after a triple fault (SDM Vol. 3A §6.15, #DF)."""
        if reason == lib.KVM_EXIT_SHUTDOWN:
            return "triple-fault", "the guest triple-faulted (x86 shutdown)"
        return None

    def instruction_bytes(self, vcpu) -> bytes:
        """The bytes at the faulting RIP: from KVM's emulation-failure record, else read through the page tables."""
        failure = vcpu.run.emulation_failure
        if failure.ndata >= 3 and failure.flags & 1 and 0 < failure.insn_size <= 15:
            return bytes(failure.insn_bytes[0:failure.insn_size])
        rip = self.pc(vcpu)
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
        """With host quirks on: complete an instruction the host's emulator rejected, if we know it (CPL0 only)."""
        run = vcpu.run
        if not self.quirks.active or run.internal.suberror != lib.KVM_INTERNAL_ERROR_EMULATION:
            return False
        if vcpu.get_sregs().cs.selector & 3:
            return False  # user-mode code runs natively; an emulation failure there is a real one
        code = self.instruction_bytes(vcpu)
        cpu = KvmCpuAccess(vcpu)
        try:
            name = complete(code, cpu)
        except GuestMemoryError:
            return False  # an operand we cannot reach: report the failure as it is
        if name is None:
            return False
        cpu.commit()
        count = self.completed[name] = self.completed.get(name, 0) + 1
        if count == 1:
            log.warning("host quirk: completing '%s' for the guest (the host KVM's emulator rejects it)", name)
        return True

    def handle_debug_exit(self, vcpu) -> bool:
        """A breakpoint or single step of the boot assists; False for one that is not ours."""
        return self.assists.handle_debug_exit(vcpu)

    def vcpu_tick(self, vcpu) -> None:
        """Every `tick_interval` seconds, on each vCPU's thread."""
        self.assists.tick(vcpu)
