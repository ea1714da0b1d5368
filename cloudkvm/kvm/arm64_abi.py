"""arm64 KVM numbers Python computes with: api.rst §4.68 ONE_REG ids, §4.82 features, §4.25 IRQ_LINE, vGIC attrs."""
from __future__ import annotations

# <linux/kvm.h>: the register id's architecture and size fields (api.rst §4.68 KVM_SET_ONE_REG)
KVM_REG_ARM64 = 0x6000000000000000
KVM_REG_SIZE_SHIFT = 52
KVM_REG_SIZE_MASK = 0x00F0000000000000
KVM_REG_SIZE_U32 = 0x0020000000000000
KVM_REG_SIZE_U64 = 0x0030000000000000
KVM_REG_SIZE_U128 = 0x0040000000000000

# arm64 <asm/kvm.h>: register groups ("coprocessor" field) and the system register encoding
KVM_REG_ARM_COPROC_SHIFT = 16
KVM_REG_ARM_CORE = 0x0010 << KVM_REG_ARM_COPROC_SHIFT
KVM_REG_ARM64_SYSREG = 0x0013 << KVM_REG_ARM_COPROC_SHIFT
KVM_REG_ARM64_SYSREG_OP0_SHIFT = 14
KVM_REG_ARM64_SYSREG_OP1_SHIFT = 11
KVM_REG_ARM64_SYSREG_CRN_SHIFT = 7
KVM_REG_ARM64_SYSREG_CRM_SHIFT = 3
KVM_REG_ARM64_SYSREG_OP2_SHIFT = 0

# arm64 <asm/kvm.h>: KVM_ARM_VCPU_INIT feature bit numbers (api.rst §4.82)
KVM_ARM_VCPU_POWER_OFF = 0  # starts powered off; PSCI CPU_ON brings it up
KVM_ARM_VCPU_PSCI_0_2 = 2  # in-kernel PSCI v0.2 (or a compatible later revision)
KVM_ARM_VCPU_PMU_V3 = 3

# arm64 <asm/ptrace.h>: PSTATE bits
PSR_MODE_EL1h = 0x5
PSR_F_BIT = 0x40
PSR_I_BIT = 0x80
PSR_A_BIT = 0x100
PSR_D_BIT = 0x200

# arm64 <asm/kvm.h>: the vGIC device's attribute groups and attributes (devices/arm-vgic-v3.rst, arm-vgic.rst)
KVM_DEV_ARM_VGIC_GRP_ADDR = 0
KVM_DEV_ARM_VGIC_GRP_DIST_REGS = 1
KVM_DEV_ARM_VGIC_GRP_NR_IRQS = 3
KVM_DEV_ARM_VGIC_GRP_CTRL = 4
KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO = 7
KVM_DEV_ARM_VGIC_CTRL_INIT = 0
KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT = 10
VGIC_LEVEL_INFO_LINE_LEVEL = 0
KVM_VGIC_V2_ADDR_TYPE_DIST = 0
KVM_VGIC_V2_ADDR_TYPE_CPU = 1
KVM_VGIC_V3_ADDR_TYPE_DIST = 2
KVM_VGIC_V3_ADDR_TYPE_REDIST = 3

# arm64 <asm/kvm.h>: KVM_IRQ_LINE's irq field, | irq_type 27..24 | vcpu_index 23..16 | irq_id 15..0 | (api.rst §4.25)
KVM_ARM_IRQ_TYPE_SHIFT = 24
KVM_ARM_IRQ_VCPU_SHIFT = 16
KVM_ARM_IRQ_NUM_SHIFT = 0
KVM_ARM_IRQ_TYPE_SPI = 1
KVM_ARM_IRQ_TYPE_PPI = 2

# Byte offsets of the members of arm64's struct kvm_regs (its first member is struct user_pt_regs: regs[31], sp,
# pc, pstate; then sp_el1, elr_el1), whose ONE_REG ids are KVM_REG_ARM_CORE_REG(member): the offset in 32-bit words.
CORE_REG_OFFSETS = {**{f"x{i}": 8 * i for i in range(31)}, "sp": 248, "pc": 256, "pstate": 264, "sp_el1": 272,
                    "elr_el1": 280}

# booting.rst: the kernel is entered at EL1 (or EL2) with all of PSTATE.DAIF masked: EL1h, D, A, I and F set = 0x3c5
PSTATE_EL1H_DAIF_MASKED = PSR_MODE_EL1h | PSR_D_BIT | PSR_A_BIT | PSR_I_BIT | PSR_F_BIT

GIC_FIRST_SPI, GIC_LAST_SPI = 32, 1019  # GIC architecture: INTIDs 32-1019 are SPIs, 16-31 PPIs
GIC_FIRST_PPI = 16


def core_reg_id(name: str) -> int:
    """The ONE_REG id of a 64-bit core register: `x0`..`x30`, `sp`, `pc`, `pstate`, `sp_el1`, `elr_el1`."""
    try:
        offset = CORE_REG_OFFSETS[name]
    except KeyError:
        raise ValueError(f"{name!r} is not an arm64 core register ({', '.join(CORE_REG_OFFSETS)})") from None
    return KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | offset // 4


def sysreg_id(op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    """The ONE_REG id of a system register from its A64 MRS/MSR encoding (ARM64_SYS_REG in <asm/kvm.h>)."""
    fields = ((op0, 0x3, KVM_REG_ARM64_SYSREG_OP0_SHIFT), (op1, 0x7, KVM_REG_ARM64_SYSREG_OP1_SHIFT),
              (crn, 0xF, KVM_REG_ARM64_SYSREG_CRN_SHIFT), (crm, 0xF, KVM_REG_ARM64_SYSREG_CRM_SHIFT),
              (op2, 0x7, KVM_REG_ARM64_SYSREG_OP2_SHIFT))
    reg = KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM64_SYSREG
    for value, mask, shift in fields:
        if not 0 <= value <= mask:
            raise ValueError(f"system register field {value} does not fit in {mask.bit_length()} bits")
        reg |= value << shift
    return reg


MPIDR_EL1 = sysreg_id(3, 0, 0, 0, 5)  # Arm ARM D19.2: MPIDR_EL1 is op0=3, op1=0, CRn=0, CRm=0, op2=5


def reg_size(reg_id: int) -> int:
    """How many bytes the register `reg_id` names holds (its KVM_REG_SIZE field)."""
    return 1 << ((reg_id & KVM_REG_SIZE_MASK) >> KVM_REG_SIZE_SHIFT)


def spi_irq_line(intid: int) -> int:
    """KVM_IRQ_LINE's irq field for an SPI of the in-kernel vGIC: the GIC INTID itself (32-1019), type SPI."""
    if not GIC_FIRST_SPI <= intid <= GIC_LAST_SPI:
        raise ValueError(f"INTID {intid} is not an SPI ({GIC_FIRST_SPI}-{GIC_LAST_SPI})")
    return KVM_ARM_IRQ_TYPE_SPI << KVM_ARM_IRQ_TYPE_SHIFT | intid << KVM_ARM_IRQ_NUM_SHIFT


def ppi_irq_line(vcpu_index: int, intid: int) -> int:
    """KVM_IRQ_LINE's irq field for a PPI (16-31) of one vCPU (index below 256)."""
    if not GIC_FIRST_PPI <= intid < GIC_FIRST_SPI or not 0 <= vcpu_index <= 0xFF:
        raise ValueError(f"INTID {intid} of vCPU {vcpu_index} is not a PPI (16-31) of vCPUs 0-255")
    return (KVM_ARM_IRQ_TYPE_PPI << KVM_ARM_IRQ_TYPE_SHIFT | vcpu_index << KVM_ARM_IRQ_VCPU_SHIFT
            | intid << KVM_ARM_IRQ_NUM_SHIFT)


def spi_gsi(intid: int) -> int:
    """The KVM_IRQFD gsi that raises SPI `intid`. Once the vGIC is initialised KVM routes gsi N to irqchip pin N,
    and "irqchip.pin + 32 corresponds to the injected SPI ID" (api.rst §4.75 KVM_IRQFD): gsi = INTID - 32."""
    spi_irq_line(intid)  # the same range check
    return intid - GIC_FIRST_SPI
