"""boards/registry.py: which board answers to an arch, a profile machine or a QEMU -M name; what it says about a
board whose implementation is missing; the host check; default consoles; the written Board interface."""
import platform
import sys

import pytest

from cloudkvm.boards import registry
from cloudkvm.boards.base import Board, CpuOptions, VirtioSlot
from cloudkvm.errors import CloudkvmError


@pytest.fixture
def host(monkeypatch):
    """host(name): pretend platform.machine() says `name`."""
    return lambda name: monkeypatch.setattr(platform, "machine", lambda: name)


@pytest.fixture
def registered(monkeypatch):
    """registered(info): `info` in the registry for this test only."""
    def add(info):
        monkeypatch.setitem(registry._BOARDS, info.name, info)
        return info
    return add


# ---------------------------------------------------------------------------------------------------- lookups

def test_x86_is_found_by_arch_by_profile_machine_and_by_qemu_machine_names():
    assert registry.for_arch("x86_64") is registry.named("x86") is registry.X86
    for qemu in ("microvm", "pc", "q35", "isapc", "pc-i440fx-8.2", "pc-q35-7.1", "pc-1.0"):
        assert registry.for_qemu_machine(qemu) is registry.X86, qemu
    assert not registry.X86.approximates("microvm")   # the machine it is modelled on
    assert registry.X86.approximates("q35")            # PCI machines only approximately
    assert registry.X86.qemu_machine == "microvm"


def test_aarch64_is_the_virt_board_even_before_it_is_implemented():
    virt = registry.for_arch("aarch64")
    assert virt is registry.named("virt") is registry.VIRT
    assert registry.for_qemu_machine("virt") is virt and registry.for_qemu_machine("virt-8.2") is virt
    assert not virt.approximates("virt-8.2") and virt.qemu_machine == "virt"
    assert registry.arches() == ("x86_64", "aarch64")  # the profile schema's order


def test_unknown_names_are_refused_clearly():
    assert registry.for_qemu_machine("sbsa-ref") is None and registry.for_qemu_machine("virtual") is None
    with pytest.raises(CloudkvmError, match=r"board 'pc' is not available") as err:
        registry.named("pc")
    assert err.value.hint == "choose one of: x86, virt"
    with pytest.raises(CloudkvmError, match="no board runs riscv64 guests"):
        registry.for_arch("riscv64")


@pytest.mark.parametrize("board, console", [(registry.X86, "ttyS0"), (registry.VIRT, "ttyAMA0")])
def test_default_consoles(board, console):
    assert board.default_console == console


def test_the_x86_entry_agrees_with_its_board_class():
    cls = registry.X86.board_class()
    assert issubclass(cls, Board)
    assert (cls.name, cls.arch, cls.default_console) == ("x86", "x86_64", registry.X86.default_console)
    assert registry.X86.max_cpus == cls.max_cpus == 255
    assert registry.X86.virtio_slots == cls.virtio_slot_count == 17  # GSIs 5-7 and 10-23
    assert registry.X86.available() and cls.has_port_io and cls.pc_name == "RIP"


# ---------------------------------------------------------------------------------------------------- missing boards

def test_the_virt_entry_agrees_with_its_board_class():
    cls = registry.VIRT.board_class()
    assert issubclass(cls, Board)
    assert (cls.name, cls.arch, cls.default_console) == ("virt", "aarch64", registry.VIRT.default_console)
    assert registry.VIRT.max_cpus == cls.max_cpus == 123  # 2 x 64 KiB redistributor frames each in 0xF60000
    assert registry.VIRT.virtio_slots == cls.virtio_slot_count == 32  # as QEMU's virt
    assert not cls.has_port_io


def test_a_board_whose_module_is_absent_is_not_available(registered):
    ghost = registered(registry.BoardInfo(
        name="ghost", arch="ghost64", qemu_machines=("ghost",), qemu_machine="ghost", default_console="ttyG0",
        cpu_hide=False, implementation="cloudkvm.boards.ghost.board:GhostBoard"))
    assert not ghost.available()
    with pytest.raises(CloudkvmError, match="'ghost' board"):
        ghost.check_kernel(b"", "k")
    assert registry.for_qemu_machine("ghost") is ghost


def test_a_board_module_that_fails_inside_is_a_bug_not_a_missing_board(registered, tmp_path, monkeypatch):
    (tmp_path / "broken_board_mod.py").write_text("import cloudkvm_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "broken_board_mod", raising=False)
    broken = registered(registry.BoardInfo(
        name="broken", arch="broken64", qemu_machines=(), qemu_machine="", default_console="ttyB0",
        cpu_hide=False, implementation="broken_board_mod:BrokenBoard"))
    with pytest.raises(ModuleNotFoundError, match="cloudkvm_no_such_dependency"):
        broken.board_class()


# ---------------------------------------------------------------------------------------------------- the host

@pytest.mark.parametrize("machine, arch", [("x86_64", "x86_64"), ("amd64", "x86_64"), ("aarch64", "aarch64"),
                                           ("arm64", "aarch64"), ("riscv64", None)])
def test_host_arch(host, machine, arch):
    host(machine)
    assert registry.host_arch() == arch


def test_aarch64_guests_on_an_x86_64_host_need_an_arm64_host(host):
    host("x86_64")
    with pytest.raises(CloudkvmError) as err:
        registry.VIRT.check_host()
    assert "aarch64 guests need an arm64 host with KVM" in err.value.message and "virt" in err.value.message
    assert "this host is x86_64" in err.value.message
    registry.X86.check_host()
    assert registry.host_board() is registry.X86


def test_x86_guests_on_an_arm64_host_are_refused_the_same_way(host):
    host("aarch64")
    with pytest.raises(CloudkvmError, match="x86_64 guests need an x86_64 host with KVM"):
        registry.X86.check_host()
    registry.VIRT.check_host()
    assert registry.host_board() is registry.VIRT and registry.host_board_name() == "virt"


# ---------------------------------------------------------------------------------------------------- cpu.hide

def test_cpu_hide_names_come_from_the_boards_that_support_it():
    assert "cx16" in registry.X86.cpu_features() and "avx512f" in registry.cpu_features()
    assert registry.VIRT.cpu_features() == ()
    registry.X86.check_cpu_hide(["cx16", "avx512f"])
    with pytest.raises(CloudkvmError) as err:
        registry.X86.check_cpu_hide(["cx61"])
    assert "did you mean 'cx16'" in err.value.hint
    with pytest.raises(CloudkvmError, match="only supported on x86_64, not aarch64"):
        registry.VIRT.check_cpu_hide(["cx16"])


# ---------------------------------------------------------------------------------------------------- the interface

def test_a_board_must_implement_every_abstract_hook():
    class Half(Board):
        name, arch = "half", "x86_64"

        def __init__(self, cpus, cpu, quirks):
            pass

        def create_irqchip(self, vm):
            pass

    with pytest.raises(TypeError, match="abstract"):
        Half(1, CpuOptions(), None)
    missing = Half.__abstractmethods__
    assert {"memory_layout", "check_kernel", "create_devices", "virtio_slot", "boot_linux", "boot_flat",
            "serial_input", "request_shutdown", "pc"} == set(missing)


def test_x86_virtio_slots_and_kernel_check_speak_the_interface():
    from cloudkvm.hostquirks import HostQuirks

    board = registry.X86.create(2, CpuOptions(hide=["cx16"]), HostQuirks())
    assert board.virtio_slot(0) == VirtioSlot(0xD000_0000, 0x1000, 5)
    assert board.virtio_slot(16) == VirtioSlot(0xD001_0000, 0x1000, 23)
    with pytest.raises(CloudkvmError, match="too many virtio devices"):
        board.virtio_slot(17)
    with pytest.raises(CloudkvmError, match="vmlinuz"):
        registry.X86.check_kernel(b"\0" * 64, "vmlinuz")
