"""The ioctl sequences of kvm/vgic.py and kvm/arm64.py's ONE_REG helpers, against recording fakes (no KVM).

What the fakes record is what KVM would be given: device attribute groups, attributes and the type and value
behind each pointer, and the register id and value inside each struct kvm_one_reg. The numbers themselves are
checked against the arm64 headers in test_kvm_arm64_abi.py and on a real arm64 KVM in
tests/realkvm/test_arm64_kvm_core.py.
"""
import errno
import os
import sys

import pytest

from cloudkvm.errors import CloudkvmError
from cloudkvm.kvm import arm64, vgic
from cloudkvm.kvm import arm64_abi as abi
from cloudkvm.kvm.native import ffi, lib

V2, V3 = lib.KVM_DEV_TYPE_ARM_VGIC_V2, lib.KVM_DEV_TYPE_ARM_VGIC_V3


class RecordingVm:
    """The Vm methods vgic.py uses; device registers read back what was written (or `registers`)."""

    def __init__(self, devices=(V3, V2), fail_group=None):
        self.devices, self.fail_group = set(devices), fail_group
        self.calls, self.registers, self.fds = [], {}, []

    def can_create_device(self, dev_type):
        self.calls.append(("test", dev_type))
        return dev_type in self.devices

    def create_device(self, dev_type):
        self.calls.append(("create", dev_type))
        self.fds.append(os.open(os.devnull, os.O_RDONLY))
        return self.fds[-1]

    def set_device_attr(self, dev_fd, group, attr, value_ptr=None):
        assert dev_fd == self.fds[-1]
        value = None if value_ptr is None else (ffi.typeof(value_ptr).item.cname, value_ptr[0])
        self.calls.append(("set", group, attr, value))
        if group == self.fail_group:
            raise OSError(errno.EINVAL, "refused")
        self.registers[group, attr] = value_ptr[0] if value_ptr is not None else None

    def get_device_attr(self, dev_fd, group, attr, value_ptr):
        self.calls.append(("get", group, attr, ffi.typeof(value_ptr).item.cname))
        value_ptr[0] = self.registers.get((group, attr), 0)

    def irq_line(self, irq, level):
        self.calls.append(("irq_line", irq, level))

    def irqfd(self, fd, gsi, deassign=False):
        self.calls.append(("irqfd", fd, gsi, deassign))


def test_a_vgic_v3_gets_its_addresses_and_interrupt_count_then_init_once_finalized():
    vm = RecordingVm()
    gic = vgic.create_vgic(vm, 0x0800_0000, redist=0x080A_0000, cpu_interface=0x0801_0000, nr_irqs=128)
    assert gic.version == 3
    assert vm.calls == [
        ("test", V3), ("create", V3),
        ("set", abi.KVM_DEV_ARM_VGIC_GRP_ADDR, abi.KVM_VGIC_V3_ADDR_TYPE_DIST, ("unsigned long long", 0x0800_0000)),
        ("set", abi.KVM_DEV_ARM_VGIC_GRP_ADDR, abi.KVM_VGIC_V3_ADDR_TYPE_REDIST, ("unsigned long long", 0x080A_0000)),
        ("set", abi.KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, ("unsigned int", 128))]
    del vm.calls[:]
    gic.finalize()
    assert vm.calls == [("set", abi.KVM_DEV_ARM_VGIC_GRP_CTRL, abi.KVM_DEV_ARM_VGIC_CTRL_INIT, None)]
    gic.close()


def test_without_a_vgic_v3_a_vgic_v2_gets_distributor_and_cpu_interface():
    vm = RecordingVm(devices=(V2,))
    gic = vgic.create_vgic(vm, 0x0800_0000, redist=0x080A_0000, cpu_interface=0x0801_0000)
    assert gic.version == 2
    assert vm.calls == [
        ("test", V3), ("test", V2), ("create", V2),
        ("set", abi.KVM_DEV_ARM_VGIC_GRP_ADDR, abi.KVM_VGIC_V2_ADDR_TYPE_DIST, ("unsigned long long", 0x0800_0000)),
        ("set", abi.KVM_DEV_ARM_VGIC_GRP_ADDR, abi.KVM_VGIC_V2_ADDR_TYPE_CPU, ("unsigned long long", 0x0801_0000)),
        ("set", abi.KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, ("unsigned int", vgic.DEFAULT_NR_IRQS))]
    with pytest.raises(NotImplementedError):
        gic.line_level(33)
    gic.close()


def test_no_usable_gic_is_a_user_error_and_creates_nothing():
    vm = RecordingVm(devices=(V2,))
    with pytest.raises(CloudkvmError, match="cannot create an in-kernel GICv3"):
        vgic.create_vgic(vm, 0x0800_0000, redist=0x080A_0000)  # no CPU interface address: no v2 fallback
    assert vm.calls == [("test", V3)]
    with pytest.raises(CloudkvmError, match="GICv3 or GICv2"):
        vgic.create_vgic(RecordingVm(devices=()), 0x0800_0000, redist=0x080A_0000, cpu_interface=0x0801_0000)


@pytest.mark.parametrize("count", [32, 63, 1056, 100])
def test_an_impossible_interrupt_count_is_refused_before_any_ioctl(count):
    vm = RecordingVm()
    with pytest.raises(ValueError, match="64 to 1024"):
        vgic.create_vgic(vm, 0x0800_0000, redist=0x080A_0000, nr_irqs=count)
    assert vm.calls == []


def test_a_refused_attribute_closes_the_new_device_fd():
    vm = RecordingVm(fail_group=abi.KVM_DEV_ARM_VGIC_GRP_NR_IRQS)
    with pytest.raises(OSError):
        vgic.create_vgic(vm, 0x0800_0000, redist=0x080A_0000)
    with pytest.raises(OSError):
        os.fstat(vm.fds[-1])


def test_edge_triggering_sets_one_icfgr_bit_and_keeps_the_others():
    vm = RecordingVm()
    gic = vgic.create_vgic(vm, 0x0800_0000, redist=0x080A_0000)
    regs = abi.KVM_DEV_ARM_VGIC_GRP_DIST_REGS
    vm.registers[regs, 0xC08] = 0x0000_0002  # INTID 32 already edge-triggered
    del vm.calls[:]
    gic.set_edge_triggered(37)  # GICD_ICFGR2 covers INTIDs 32-47, two bits each: INTID 37's upper bit is bit 11
    assert vm.calls == [("get", regs, 0xC08, "unsigned int"), ("set", regs, 0xC08, ("unsigned int", 0x802))]
    gic.set_edge_triggered(32, edge=False)
    assert vm.registers[regs, 0xC08] == 0x800
    with pytest.raises(ValueError):
        gic.set_edge_triggered(27)  # a PPI
    gic.close()


def test_pending_and_line_level_read_the_right_bits():
    vm = RecordingVm()
    gic = vgic.create_vgic(vm, 0x0800_0000, redist=0x080A_0000)
    vm.registers[abi.KVM_DEV_ARM_VGIC_GRP_DIST_REGS, 0x204] = 1 << 5  # GICD_ISPENDR1: INTIDs 32-63
    vm.registers[abi.KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, 32] = 1 << 1  # line levels of INTIDs 32-63
    assert gic.spi_pending(37) and not gic.spi_pending(36) and not gic.spi_pending(69)
    assert gic.line_level(33) and not gic.line_level(34)
    gic.close()


def test_spi_lines_and_irqfds():
    vm = RecordingVm()
    vgic.set_spi_level(vm, 33, 1)
    vgic.assign_spi_irqfd(vm, 7, 48)
    vgic.assign_spi_irqfd(vm, 7, 48, deassign=True)
    # KVM_IRQ_LINE: type SPI (1) in bits 27..24, the INTID in 15..0; KVM_IRQFD: gsi = INTID - 32 (api.rst §4.75)
    assert vm.calls == [("irq_line", 0x0100_0021, 1), ("irqfd", 7, 16, False), ("irqfd", 7, 16, True)]


class FakeVcpu:
    fd = 99


@pytest.fixture
def one_reg(monkeypatch):
    """Records (request, id, value) for every ONE_REG ioctl of kvm/arm64.py; GET returns `values[id]`."""
    names = {lib.KVM_SET_ONE_REG: "set", lib.KVM_GET_ONE_REG: "get"}
    record, values = [], {}

    def fake_ioctl(fd, request, arg):
        assert fd == FakeVcpu.fd
        size = abi.reg_size(arg.id)
        data = ffi.cast("uint8_t *", arg.addr)
        if names[request] == "set":
            record.append(("set", arg.id, int.from_bytes(ffi.buffer(data, size), sys.byteorder)))
        else:
            record.append(("get", arg.id))
            ffi.buffer(data, size)[:] = values[arg.id].to_bytes(size, sys.byteorder)
        return 0
    monkeypatch.setattr(arm64, "ioctl", fake_ioctl)
    return record, values


def test_the_boot_registers_are_the_ones_booting_rst_asks(one_reg):
    record, _ = one_reg
    arm64.set_boot_regs(FakeVcpu(), entry=0x4020_0000, dtb=0x4800_0000)
    # ids from api.rst §4.68's table: X0 ..0000, X1 ..0002, X2 ..0004, X3 ..0006, PC ..0040, PSTATE ..0042
    assert sorted(record) == sorted([
        ("set", 0x6030_0000_0010_0042, 0x3C5), ("set", 0x6030_0000_0010_0000, 0x4800_0000),
        ("set", 0x6030_0000_0010_0002, 0), ("set", 0x6030_0000_0010_0004, 0), ("set", 0x6030_0000_0010_0006, 0),
        ("set", 0x6030_0000_0010_0040, 0x4020_0000)])
    assert record[-1][1] == 0x6030_0000_0010_0040  # pc last


def test_registers_are_read_at_their_own_width(one_reg):
    record, values = one_reg
    values[abi.MPIDR_EL1] = 0x8000_0001
    fpsr = abi.KVM_REG_ARM64 | abi.KVM_REG_SIZE_U32 | abi.KVM_REG_ARM_CORE | 0xD4  # api.rst: FPSR is 32 bits
    values[fpsr] = 0xFFFF_FFFF
    assert arm64.read_mpidr(FakeVcpu()) == 0x8000_0001
    assert arm64.get_one_reg(FakeVcpu(), fpsr) == 0xFFFF_FFFF
    with pytest.raises(OverflowError):
        arm64.set_one_reg(FakeVcpu(), fpsr, 1 << 32)
    assert record == [("get", abi.MPIDR_EL1), ("get", fpsr)]


def test_the_register_list_is_fetched_again_at_the_size_kvm_names(monkeypatch):
    calls = []

    def fake_ioctl(fd, request, regs):
        assert request == lib.KVM_GET_REG_LIST
        calls.append(regs.n)
        if regs.n < 3:
            regs.n = 3
            raise OSError(errno.E2BIG, "too small")
        for i, reg in enumerate((1, 2, 3)):
            regs.reg[i] = reg
        return 0
    monkeypatch.setattr(arm64, "ioctl", fake_ioctl)
    assert arm64.reg_list(FakeVcpu()) == [1, 2, 3]
    assert calls == [0, 3]
