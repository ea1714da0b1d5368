"""The real Machine drives a board only through boards/base.Board, in the order base.py promises: interrupt
controller, RAM, the board's devices, virtio slots, each vCPU's init as it is created, the finished interrupt
controller, then the payload. A recording board (the x86 board with every hook logged, registered under its own
name) shows it on /dev/kvm; a variant without port I/O shows the machine makes no port bus for such a board and
that an exit only the board understands is described by the board."""
import pytest

from cloudkvm.boards import registry
from cloudkvm.boards.x86.board import X86Board
from cloudkvm.devices.virtio.rng import VirtioRng
from cloudkvm.kvm.native import lib
from cloudkvm.machine import FlatBinary, LinuxBoot, Machine, MachineSpec

LOG: list = []  # (hook, what the machine had built when the board was called)


def _state(vm) -> str:
    return "ram" if vm.memory is not None else "no-ram"


class RecordingBoard(X86Board):
    name = "recording"

    def __init__(self, cpus, cpu, quirks):
        LOG.append(("__init__", cpus))
        super().__init__(cpus, cpu, quirks)

    @staticmethod
    def memory_layout(memory):
        LOG.append(("memory_layout", memory >> 20))
        return X86Board.memory_layout(memory)

    def create_irqchip(self, vm):
        LOG.append(("create_irqchip", _state(vm)))
        super().create_irqchip(vm)

    def create_devices(self, vm, pio, mmio, host):
        LOG.append(("create_devices", _state(vm), len(host.vcpus), pio is not None))
        super().create_devices(vm, pio, mmio, host)

    def virtio_slot(self, index):
        LOG.append(("virtio_slot", index))
        return super().virtio_slot(index)

    def init_vcpu(self, kvm, vcpu):
        LOG.append(("init_vcpu", vcpu.index))
        super().init_vcpu(kvm, vcpu)

    def finalize_irqchip(self, vm, vcpus):
        LOG.append(("finalize_irqchip", len(vcpus)))
        super().finalize_irqchip(vm, vcpus)

    def boot_flat(self, kvm, vcpus, memory, image, load_addr, entry):
        LOG.append(("boot_flat", len(vcpus), hex(entry)))
        super().boot_flat(kvm, vcpus, memory, image, load_addr, entry)


class LinuxRecordingBoard(RecordingBoard):
    """Takes any file as a kernel and only records what the machine asks it to boot."""

    name = "linux-recording"
    default_console = "ttyX9"

    @staticmethod
    def check_kernel(data, path):
        LOG.append(("check_kernel", data))

    def boot_linux(self, kvm, vcpus, memory, kernel_path, initrd_path, cmdline, virtio_slots=()):
        LOG.append(("boot_linux", len(vcpus), cmdline, tuple(virtio_slots)))
        return {}


class NoPortsBoard(RecordingBoard):
    """The same board as if it had no port I/O (as virt has none): its UART and PC devices are not there."""

    name = "no-ports"
    has_port_io = False

    def create_devices(self, vm, pio, mmio, host):
        LOG.append(("create_devices", _state(vm), len(host.vcpus), pio is not None))

    def describe_exit(self, vcpu, reason):
        if reason == lib.KVM_EXIT_IO:
            return "port-access", f"port 0x{vcpu.io.port:x} on a board without ports"
        return super().describe_exit(vcpu, reason)


@pytest.fixture
def board(monkeypatch):
    """board(cls) -> the registry name under which the real Machine finds `cls`."""
    LOG.clear()

    def register(cls):
        monkeypatch.setitem(registry._BOARDS, cls.name, registry.BoardInfo(
            name=cls.name, arch=cls.arch, qemu_machines=(), qemu_machine="", default_console=cls.default_console,
            cpu_hide=False, implementation=f"{__name__}:{cls.__name__}"))
        return cls.name
    return register


def test_the_machine_calls_the_board_hooks_in_the_promised_order(board, guest_binary):
    spec = MachineSpec(payload=FlatBinary(guest_binary("c_hello")), board=board(RecordingBoard), cpus=2,
                       memory=64 << 20, virtio=[VirtioRng()])
    with Machine(spec) as machine:
        built = list(LOG)
        assert isinstance(machine.board, RecordingBoard) and machine.pio_bus is not None
        result = machine.run(timeout=60)
        console = machine.console.text()
    assert built == [("__init__", 2), ("create_irqchip", "no-ram"), ("memory_layout", 64),
                     ("create_devices", "ram", 0, True), ("init_vcpu", 0), ("init_vcpu", 1),
                     ("finalize_irqchip", 2), ("virtio_slot", 0), ("boot_flat", 2, "0x100000")]
    assert result.reason == "poweroff", (result, console)  # the board built this way really runs its guest
    assert "c_hello: vCPU 1 of 2" in console


def test_a_board_without_port_io_gets_no_port_bus_and_describes_its_own_exits(board, guest_binary):
    spec = MachineSpec(payload=FlatBinary(guest_binary("c_hello")), board=board(NoPortsBoard), memory=64 << 20)
    with Machine(spec) as machine:
        assert machine.pio_bus is None
        assert ("create_devices", "ram", 0, False) in LOG
        result = machine.run(timeout=60)
    # the guest's first port write (its console) is no exit the machine handles: the board says what it was
    assert result.reason == "port-access" and "on a board without ports" in result.detail, result
    assert result.cpu == 0 and result.pc is not None and f" at RIP 0x{result.pc:x}" in str(result)


@pytest.mark.parametrize("cmdline, expected", [(None, "console=ttyX9"), ("", ""), ("quiet", "quiet")])
def test_a_linux_payload_is_checked_by_the_board_and_gets_its_console_by_default(board, tmp_path, cmdline,
                                                                                 expected):
    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"any kernel")
    spec = MachineSpec(payload=LinuxBoot(kernel, None, cmdline), board=board(LinuxRecordingBoard), memory=64 << 20,
                       virtio=[VirtioRng(), VirtioRng()])
    with Machine(spec) as machine:
        slots = tuple(X86Board.virtio_slot(machine.board, i) for i in range(2))  # unrecorded
    assert LOG[0] == ("check_kernel", b"any kernel")
    # the slots are attached once the interrupt controller is finished, asked for again to describe them to the
    # guest, then the kernel boots
    assert LOG[-6:] == [("finalize_irqchip", 1), ("virtio_slot", 0), ("virtio_slot", 1), ("virtio_slot", 0),
                        ("virtio_slot", 1), ("boot_linux", 1, expected, slots)]
