"""The virt board's KVM sequence and boot layout against recording fakes of the KVM core (no KVM needed): the vGIC
before the vCPUs and its CTRL_INIT after them, PSCI 0.2 on every vCPU with the secondaries powered off, the Image,
initrd and DTB where booting.rst wants them, x0 = the DTB, level SPIs for the PrimeCells. The DTB is read back with
dtc/fdtget; the real arm64 KVM runs the same board in tests/realkvm/test_arm64_virt.py."""
import os
import struct
from types import SimpleNamespace

import pytest

from cloudkvm.boards.base import CpuOptions
from cloudkvm.boards.virt import board as virt
from cloudkvm.boards.virt import layout as L
from cloudkvm.devices.bus import Bus
from cloudkvm.errors import CloudkvmError
from cloudkvm.hostquirks import HostQuirks
from cloudkvm.kvm import arm64_abi as abi
from cloudkvm.kvm.memory import GuestMemory
from cloudkvm.kvm.native import lib
from dtc_oracle import decompile, fdtget, need_dtc

MiB = 1 << 20
TEXT_OFFSET = 0x80000


def fake_image(size: int = 3 * MiB) -> bytes:
    """An arm64 Image: booting.rst's 64-byte header (text_offset, image_size, flags LE/4K, magic) and a body."""
    header = struct.pack("<IIQQQQQQII", 0x14000010, 0, TEXT_OFFSET, size, 0b1010, 0, 0, 0, 0x644D5241, 0)
    return header + bytes(range(256)) * 16


class RecordingVm:
    """What the board does to the VM: vGIC device ioctls, KVM_IRQ_LINE, and the arm64 helpers it calls."""

    def __init__(self, devices):
        self.devices, self.calls = set(devices), []

    def can_create_device(self, dev_type):
        return dev_type in self.devices

    def create_device(self, dev_type):
        self.calls.append(("create-device", "v3" if dev_type == V3 else "v2"))
        self.device_fd = os.open(os.devnull, os.O_RDONLY)  # a real fd of our own: Vgic.close closes it
        return self.device_fd

    def set_device_attr(self, fd, group, attr, value_ptr=None):
        self.calls.append(("device-attr", group, attr, None if value_ptr is None else value_ptr[0]))

    def irq_line(self, irq, level):
        self.calls.append(("irq-line", irq, level))


V3, V2 = lib.KVM_DEV_TYPE_ARM_VGIC_V3, lib.KVM_DEV_TYPE_ARM_VGIC_V2


@pytest.fixture
def recorded(monkeypatch):
    calls = []
    monkeypatch.setattr(virt.arm64, "preferred_target", lambda vm: (calls.append(("preferred-target",)) or (5, [])))
    monkeypatch.setattr(virt.arm64, "vcpu_init",
                        lambda vcpu, target, features: calls.append(("vcpu-init", vcpu.index, target, sorted(features))))
    monkeypatch.setattr(virt.arm64, "set_boot_regs",
                        lambda vcpu, entry, dtb: calls.append(("boot-regs", vcpu.index, entry, dtb)))
    return calls


def build(recorded, cpus=2, memory=256 * MiB, devices=(V3, V2)):
    vm = RecordingVm(devices)
    board = virt.VirtBoard(cpus, CpuOptions(), HostQuirks())
    board.create_irqchip(vm)
    mem = GuestMemory(board.memory_layout(memory))
    mmio, output = Bus("mmio"), []
    host = SimpleNamespace(console=SimpleNamespace(write=output.append), io=SimpleNamespace(call_later=lambda d, f: f))
    board.create_devices(vm, None, mmio, host)
    vcpus = [SimpleNamespace(index=i) for i in range(cpus)]
    for vcpu in vcpus:
        recorded.append(("created-vcpu", vcpu.index))
        board.init_vcpu(None, vcpu)
    board.finalize_irqchip(vm, vcpus)
    return SimpleNamespace(vm=vm, board=board, memory=mem, mmio=mmio, vcpus=vcpus, output=output)


def test_the_vgic_is_initialised_only_after_every_vcpu_exists_and_secondaries_start_off(recorded):
    machine = build(recorded, cpus=3)
    init = ("device-attr", abi.KVM_DEV_ARM_VGIC_GRP_CTRL, abi.KVM_DEV_ARM_VGIC_CTRL_INIT, None)
    assert machine.vm.calls[0] == ("create-device", "v3")
    assert ("device-attr", abi.KVM_DEV_ARM_VGIC_GRP_ADDR, abi.KVM_VGIC_V3_ADDR_TYPE_DIST, 0x0800_0000) in machine.vm.calls
    assert ("device-attr", abi.KVM_DEV_ARM_VGIC_GRP_ADDR, abi.KVM_VGIC_V3_ADDR_TYPE_REDIST, 0x080A_0000) \
        in machine.vm.calls
    assert ("device-attr", abi.KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, 288) in machine.vm.calls
    assert machine.vm.calls[-1] == init and machine.vm.calls.count(init) == 1
    psci, off = abi.KVM_ARM_VCPU_PSCI_0_2, abi.KVM_ARM_VCPU_POWER_OFF
    assert recorded == [("preferred-target",),
                        ("created-vcpu", 0), ("vcpu-init", 0, 5, [psci]),
                        ("created-vcpu", 1), ("vcpu-init", 1, 5, sorted([psci, off])),
                        ("created-vcpu", 2), ("vcpu-init", 2, 5, sorted([psci, off]))]


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_without_a_vgic_v3_it_falls_back_to_v2_and_its_eight_cpu_limit(recorded, monkeypatch):
    machine = build(recorded, cpus=8, devices=(V2,))
    assert machine.vm.calls[0] == ("create-device", "v2") and machine.board.vgic.version == 2
    machine.board.close()
    made = []
    monkeypatch.setattr(RecordingVm, "create_device",
                        lambda vm, dev_type: made.append(os.open(os.devnull, os.O_RDONLY)) or made[-1])
    with pytest.raises(CloudkvmError, match="only a GICv2, which takes 8 vCPUs"):
        build(recorded, cpus=9, devices=(V2,))
    assert made and not fd_open(made[0])  # the refused vGIC's fd is closed, not left holding the VM
    with pytest.raises(CloudkvmError, match="cannot create an in-kernel"):
        build(recorded, devices=())


def test_linux_gets_the_image_initrd_and_a_device_tree_where_booting_rst_says(recorded, tmp_path):
    need_dtc()
    machine = build(recorded)
    kernel, initrd = tmp_path / "Image", tmp_path / "initrd"
    kernel.write_bytes(fake_image())
    initrd.write_bytes(b"070701" + bytes(4090))
    slots = [machine.board.virtio_slot(i) for i in range(3)]
    info = machine.board.boot_linux(None, machine.vcpus, machine.memory, kernel, initrd, "console=ttyAMA0 quiet",
                                    slots)
    assert info["entry"] == L.RAM_BASE + TEXT_OFFSET
    assert machine.memory.read(info["entry"], 64) == fake_image()[:64]
    dtb_addr, dtb_size = info["dtb"]
    assert recorded[-1] == ("boot-regs", 0, info["entry"], dtb_addr)  # x0 = the DTB, only the boot vCPU
    assert dtb_addr % 8 == 0 and dtb_addr + dtb_size <= L.RAM_BASE + 256 * MiB
    initrd_addr, initrd_size = info["initrd"]
    assert machine.memory.read(initrd_addr, initrd_size) == initrd.read_bytes()
    dtb = tmp_path / "board.dtb"
    dtb.write_bytes(machine.memory.read(dtb_addr, dtb_size))
    dts = decompile(dtb)
    assert fdtget(dtb, "/chosen", "bootargs", "s") == "console=ttyAMA0 quiet"
    start, end = (int(fdtget(dtb, "/chosen", p, "x").replace(" ", ""), 16)
                  for p in ("linux,initrd-start", "linux,initrd-end"))
    assert (start, end) == (initrd_addr, initrd_addr + initrd_size)
    assert fdtget(dtb, "/memory@40000000", "reg", "x").split() == ["0", "40000000", "0", "10000000"]
    assert dts.count("virtio,mmio") == 3  # the slots in use, no empty transports for Linux to probe
    assert fdtget(dtb, "/cpus/cpu@1", "enable-method", "s") == "psci"
    assert "arm,gic-v3" in dts


def test_closing_the_board_closes_the_vgic_device_that_holds_the_vm(recorded):
    machine = build(recorded)
    fd = machine.vm.device_fd
    assert fd_open(fd)
    machine.board.close()
    machine.board.close()  # once is enough; twice is harmless
    assert not fd_open(fd) and machine.board.vgic is None


def test_the_primecells_sit_on_qemus_addresses_with_level_spis(recorded):
    machine = build(recorded)
    for base, device in ((L.PL011_BASE, machine.board.uart), (L.PL031_BASE, machine.board.rtc),
                         (L.PL061_BASE, machine.board.gpio)):
        assert machine.mmio.lookup(base) == (0, device)
    del machine.vm.calls[:]
    uart = machine.board.uart
    uart.write(0x30, 4, 0x301)      # CR: UARTEN | TXE | RXE
    uart.write(0x38, 4, 1 << 4)     # IMSC: RXIM
    uart.receive(b"x")
    assert machine.vm.calls == [("irq-line", abi.spi_irq_line(32 + L.PL011_SPI), 1)]
    uart.read(0x000, 4)             # DR: the byte is taken, the interrupt drops
    assert machine.vm.calls[-1] == ("irq-line", abi.spi_irq_line(32 + L.PL011_SPI), 0)
    uart.write(0x000, 4, ord("A"))
    assert b"".join(machine.output) == b"A"


def test_the_power_key_is_gpio_line_3(recorded):
    machine = build(recorded)
    assert machine.board.request_shutdown(machine.vm)
    gpio = machine.board.gpio
    assert gpio.read(0x000 + (1 << (L.PL061_POWER_KEY_LINE + 2)), 4) == 1 << L.PL061_POWER_KEY_LINE  # DATA, masked


def test_virt_takes_only_cpu_host(recorded):
    with pytest.raises(CloudkvmError, match="cpu: host"):
        virt.VirtBoard(1, CpuOptions(hide=["sve"]), HostQuirks())


def test_an_mmio_access_kvm_cannot_decode_is_the_guests_fault_not_a_vmm_error(recorded):
    import errno

    board = virt.VirtBoard(1, CpuOptions(), HostQuirks())
    reason, detail = board.describe_run_error(None, errno.ENOSYS)
    assert reason == "guest-fault" and "instruction syndrome" in detail
    assert board.describe_run_error(None, errno.EFAULT) is None  # anything else stays a VMM/host error


@pytest.mark.parametrize("cmdline, what", [("x" * 2048, "COMMAND_LINE_SIZE"), ("console=\udcff", "UTF-8")])
def test_a_command_line_linux_would_cut_or_cannot_read_is_refused_in_one_line(recorded, tmp_path, cmdline, what):
    machine = build(recorded)
    kernel = tmp_path / "Image"
    kernel.write_bytes(fake_image())
    with pytest.raises(CloudkvmError, match=what):
        machine.board.boot_linux(None, machine.vcpus, machine.memory, kernel, None, cmdline, [])


def test_a_kernel_file_larger_than_any_kernel_is_refused_without_reading_it(tmp_path):
    from cloudkvm.machine import MAX_KERNEL, LinuxBoot, check_payload

    huge = tmp_path / "disk-image-not-a-kernel"
    with open(huge, "wb") as f:
        f.truncate(MAX_KERNEL + 1)  # sparse: reading it whole would cost 512 MiB of memory
    with pytest.raises(CloudkvmError, match="too large for a kernel"):
        check_payload(LinuxBoot(huge), "virt")
