"""The x86 board's vCPU reset state is the same on every vCPU, as firmware leaves an MP system."""
from cloudkvm.boards.x86 import MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB, X86Board
from cloudkvm.boards.x86_cpu import CpuPolicy
from cloudkvm.hostquirks import HostQuirks
from cloudkvm.kvm.system import Kvm
from cloudkvm.kvm.vm import Vm


def test_every_vcpu_gets_the_same_mtrr_default_type():
    """Linux compares MTRRdefType across CPUs ("your CPUs had inconsistent MTRRdefType settings")."""
    kvm = Kvm()
    vm = Vm(kvm)
    board = X86Board(3, CpuPolicy(), HostQuirks())
    vcpus = []
    try:
        board.create_chips(vm)
        vcpus = [vm.create_vcpu(i) for i in range(3)]
        board.reset_vcpus(kvm, vcpus)
        assert [v.get_msrs([MSR_MTRR_DEF_TYPE]) for v in vcpus] == [{MSR_MTRR_DEF_TYPE: MTRR_ENABLE_WB}] * 3
    finally:
        for v in vcpus:
            v.close()
        vm.close()
        kvm.close()
