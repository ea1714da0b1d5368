"""The one interface every board implements, and the only board module the machine knows besides the registry.

A board is one kind of machine (x86: a microvm-like PC; virt: QEMU's aarch64 `virt`): its memory map, interrupt
controller, legacy devices, virtio-mmio slots, console, how a guest is loaded and how its vCPUs start. The machine
(`cloudkvm/machine.py`) owns the generic parts (KVM, guest RAM, buses, vCPU threads, the I/O thread, virtio
transports) and calls the hooks below, always in this order (docs/architecture.md, "Board interface"):

    board = Board(cpus, cpu, quirks)                         # nothing touches KVM yet
    board.create_irqchip(vm)                                 # 1. interrupt controller (and timers) of the VM
    vm.add_memory(GuestMemory(board.memory_layout(size)))    # 2. guest RAM
    board.create_devices(vm, pio, mmio, host)                # 3. the board's own devices (pio is None without port I/O)
    board.init_vcpu(kvm, vcpu)                               # 4. right after each KVM_CREATE_VCPU
    board.finalize_irqchip(vm, vcpus)                        # 5. all vCPUs exist (arm vGIC: KVM_DEV_ARM_VGIC_CTRL_INIT)
    board.virtio_slot(n)                                     # 6. where virtio device n lives, for each device
                                                             #    (its irqfd needs a finished irqchip: arm says EAGAIN)
    board.boot_linux(...) | board.boot_flat(...)             # 7. the payload: memory contents and entry registers

While the VM runs, vCPU threads call `pc`, `describe_exit`, `instruction_bytes`, `handle_internal_error`,
`handle_debug_exit` and `vcpu_tick`; the I/O thread calls `serial_input`; `request_shutdown` comes from the control
socket. Boards never import the machine: what they need of it arrives as `host` (see `create_devices`).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar


@dataclass(frozen=True)
class VirtioSlot:
    """One virtio-mmio transport's place: MMIO window [base, base + size) and the interrupt line its irqfd raises
    (a KVM GSI: an IOAPIC pin on x86, an SPI number on arm)."""

    base: int
    size: int
    irq: int


@dataclass
class CpuOptions:
    """The vCPU model a VM asks for: `host` (what KVM supports), minus the named features in `hide` (only on
    boards whose registry entry says `cpu_hide`)."""

    model: str = "host"
    hide: list[str] = field(default_factory=list)


class Board(abc.ABC):
    """A board: subclass it, set the class attributes, implement the abstract hooks (docs/architecture.md)."""

    # --- what the board is (read from the class, before any VM exists) --------------------------------------------
    name: ClassVar[str]             # the profile's `machine` (x86, virt)
    arch: ClassVar[str]             # the guest architecture (x86_64, aarch64)
    max_cpus: ClassVar[int]         # vCPUs the board's interrupt controller and firmware tables can describe
    virtio_slot_count: ClassVar[int]  # virtio-mmio slots: `virtio_slot(n)` exists for n below this
    default_console: ClassVar[str]  # the guest's console device for `console=` (ttyS0, ttyAMA0)
    has_port_io: ClassVar[bool]     # the machine creates a port-I/O bus only for boards that have port I/O
    pc_name: ClassVar[str] = "PC"   # what reports call the program counter (RIP on x86)
    flat_max_cpus: ClassVar[int]    # vCPUs a flat payload can have on this board ...
    flat_limit: ClassVar[str] = ""  # ... and why, in a few words, for the error that says so

    # --- what the running machine reads from the board instance -----------------------------------------------
    fast_uart = None                # the console UART's C fast path (kvm.fastpath.FastUart), or None
    tick_interval: float | None = None  # seconds between `vcpu_tick` calls on every vCPU thread (None: never)

    @abc.abstractmethod
    def __init__(self, cpus: int, cpu: CpuOptions, quirks) -> None:
        """A board for `cpus` vCPUs with the CPU model `cpu` and the host's quirks (hostquirks.HostQuirks);
        no KVM object exists yet."""

    # --- before a VM exists ---------------------------------------------------------------------------------------
    @staticmethod
    @abc.abstractmethod
    def memory_layout(memory: int) -> list[tuple[int, int]]:
        """Guest RAM of `memory` bytes as (guest-physical address, size) regions, one KVM memory slot each."""

    @staticmethod
    @abc.abstractmethod
    def check_kernel(data: bytes, path: str) -> None:
        """Refuse a kernel this board cannot boot with a one-line CloudkvmError naming `path` (x86: bzImage or
        vmlinux; virt: an arm64 Image), before anything is created."""

    @staticmethod
    def prepare_boot(kernel: bytes, initrd: bytes | None, name: str) -> None:
        """Do now, into the cache, the host-side work booting this kernel and initrd repeats on every boot that
        misses it (`image pull` readies an image's own kernel this way; `name` for messages). Nothing by default."""

    # --- building the VM, in the order the machine calls them ----------------------------------------------------
    @abc.abstractmethod
    def create_irqchip(self, vm) -> None:
        """1. The in-kernel interrupt controller (and any timer chip) of `vm` (kvm.vm.Vm), before RAM, devices
        and vCPUs exist."""

    @abc.abstractmethod
    def create_devices(self, vm, pio, mmio, host) -> None:
        """3. The board's own devices on its buses: `pio` (devices.bus.Bus, None when `has_port_io` is False) and
        `mmio`. `host` is the machine: `host.console.write(bytes)` takes console output and
        `host.guest_power(reason, detail)` ends the VM as the guest asked (poweroff, reset)."""

    @abc.abstractmethod
    def virtio_slot(self, index: int) -> VirtioSlot:
        """6. Where virtio-mmio device `index` lives; a CloudkvmError when the board has no such slot."""

    def init_vcpu(self, kvm, vcpu) -> None:
        """4. Once per vCPU, right after KVM_CREATE_VCPU: the state every payload starts from (x86: CPUID, local
        APIC wiring, MSRs; arm: KVM_ARM_VCPU_INIT). `kvm` is kvm.system.Kvm."""

    def finalize_irqchip(self, vm, vcpus: list) -> None:
        """5. Every vCPU exists: finish the interrupt controller (arm: the vGIC's CTRL_INIT). Nothing on x86."""

    @abc.abstractmethod
    def boot_linux(self, kvm, vcpus: list, memory, kernel_path: Path, initrd_path: Path | None, cmdline: str,
                   virtio_slots: list[VirtioSlot] = ()) -> dict:
        """7. Load a Linux kernel (and initrd) into `memory` (kvm.memory.GuestMemory) with what the board's boot
        protocol needs (x86: zero page, ACPI tables; arm: a device tree) describing `virtio_slots`, and set the
        boot vCPU's entry registers. Returns what was placed where (for logs and tests)."""

    @abc.abstractmethod
    def boot_flat(self, kvm, vcpus: list, memory, image: bytes, load_addr: int, entry: int) -> None:
        """7. A flat test payload at `load_addr`: every vCPU starts at `entry` (the board's flat-payload ABI)."""

    # --- while the VM runs ----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def serial_input(self, data: bytes) -> int:
        """Bytes typed on the host console for the guest's console UART; returns how many it took."""

    @abc.abstractmethod
    def request_shutdown(self, vm) -> bool:
        """Ask the guest's OS to power off (x86: ACPI power button; virt: the gpio-keys power key). False when the
        board has no way to ask."""

    @abc.abstractmethod
    def pc(self, vcpu) -> int | None:
        """The vCPU's program counter (for reports and sampling), or None when it cannot be read."""

    def describe_exit(self, vcpu, reason: int) -> tuple[str, str] | None:
        """(result reason, detail) for a KVM exit that only this architecture has (x86: KVM_EXIT_SHUTDOWN is a
        triple fault), ending the VM; None for an exit the board does not know (reported as unhandled)."""
        return None

    def describe_run_error(self, vcpu, err: int) -> tuple[str, str] | None:
        """(result reason, detail) when KVM_RUN failing with errno `err` means the guest did something KVM cannot
        run (arm: ENOSYS for an MMIO access without an instruction syndrome); None: a VMM/host error."""
        return None

    def instruction_bytes(self, vcpu) -> bytes:
        """The bytes of the instruction an emulation failure stopped at, when the board can find them."""
        return b""

    def handle_internal_error(self, vcpu) -> bool:
        """A KVM internal error the board can resolve (x86 host quirks: complete an instruction); True to go on."""
        return False

    def handle_debug_exit(self, vcpu) -> bool:
        """A KVM_EXIT_DEBUG the board caused itself (breakpoints of boot assists); True to go on."""
        return False

    def vcpu_tick(self, vcpu) -> None:
        """Every `tick_interval` seconds, on each vCPU's own thread."""

    def close(self) -> None:
        """Release what the board holds of the VM (KVM device fds: an open one keeps the whole VM alive in the
        kernel). The machine calls it once, before closing the VM."""
