"""The x86 board's vCPU reset state is the same on every vCPU, as firmware leaves an MP system."""
from cloudkvm.machine import FlatBinary, Machine, MachineSpec

MSR_MTRR_DEF_TYPE = 0x2FF  # Intel SDM Vol. 4, IA32_MTRR_DEF_TYPE
MTRR_ENABLE = 1 << 11      # E: MTRRs enabled
WRITE_BACK = 6             # the default memory type in bits 0-7


def test_every_vcpu_gets_the_same_enabled_write_back_mtrr_default_type(guest_binary):
    """Linux compares MTRRdefType across CPUs ("your CPUs had inconsistent MTRRdefType settings")."""
    with Machine(MachineSpec(payload=FlatBinary(guest_binary("c_hello")), cpus=3)) as machine:
        values = [vcpu.get_msrs([MSR_MTRR_DEF_TYPE])[MSR_MTRR_DEF_TYPE] for vcpu in machine.vcpus]
    assert values == [MTRR_ENABLE | WRITE_BACK] * 3
