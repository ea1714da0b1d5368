"""arm64 vCPUs: api.rst §4.83 KVM_ARM_PREFERRED_TARGET, §4.82 KVM_ARM_VCPU_INIT, §4.68/§4.69 ONE_REG, §4.84."""
from __future__ import annotations

import errno
import sys
from typing import Iterable

from . import arm64_abi as abi
from .native import ffi, lib
from .system import ioctl

_FEATURE_WORDS = 7  # struct kvm_vcpu_init: __u32 features[7]


def preferred_target(vm) -> tuple[int, list[int]]:
    """KVM_ARM_PREFERRED_TARGET: the CPU target a vCPU on this host should be, and the feature bit numbers KVM
    recommends with it (not mandatory)."""
    init = ffi.new("struct kvm_vcpu_init *")
    ioctl(vm.fd, lib.KVM_ARM_PREFERRED_TARGET, init)
    features = [32 * word + bit for word in range(_FEATURE_WORDS) for bit in range(32)
                if init.features[word] >> bit & 1]
    return init.target, features


def vcpu_init(vcpu, target: int, features: Iterable[int] = ()) -> None:
    """KVM_ARM_VCPU_INIT: reset the vCPU as `target` with these feature bit numbers (abi.KVM_ARM_VCPU_*). Create
    every vCPU first (MPIDR and other registers reflect the topology); later calls must repeat the same arguments."""
    init = ffi.new("struct kvm_vcpu_init *", {"target": target})
    for feature in features:
        if not 0 <= feature < 32 * _FEATURE_WORDS:
            raise ValueError(f"vCPU feature bit {feature} is out of range")
        init.features[feature // 32] |= 1 << feature % 32
    ioctl(vcpu.fd, lib.KVM_ARM_VCPU_INIT, init)


def get_one_reg(vcpu, reg_id: int) -> int:
    """KVM_GET_ONE_REG: the register `reg_id` names, as an unsigned integer of its size."""
    size = abi.reg_size(reg_id)
    value = ffi.new("uint8_t[]", size)
    ioctl(vcpu.fd, lib.KVM_GET_ONE_REG, ffi.new("struct kvm_one_reg *", {"id": reg_id, "addr": _address(value)}))
    return int.from_bytes(ffi.buffer(value), sys.byteorder)


def set_one_reg(vcpu, reg_id: int, value: int) -> None:
    """KVM_SET_ONE_REG: write `value` (an unsigned integer that fits the register's size) to `reg_id`."""
    size = abi.reg_size(reg_id)
    data = ffi.new("uint8_t[]", value.to_bytes(size, sys.byteorder))  # OverflowError when it does not fit
    ioctl(vcpu.fd, lib.KVM_SET_ONE_REG, ffi.new("struct kvm_one_reg *", {"id": reg_id, "addr": _address(data)}))


def get_core_reg(vcpu, name: str) -> int:
    """A core register by name: `x0`..`x30`, `sp`, `pc`, `pstate`, `sp_el1`, `elr_el1`."""
    return get_one_reg(vcpu, abi.core_reg_id(name))


def set_core_reg(vcpu, name: str, value: int) -> None:
    set_one_reg(vcpu, abi.core_reg_id(name), value)


def read_mpidr(vcpu) -> int:
    """MPIDR_EL1 as KVM_ARM_VCPU_INIT set it (its affinity fields go into the DTB's cpu `reg`, and are what PSCI
    CPU_ON takes as the target)."""
    return get_one_reg(vcpu, abi.MPIDR_EL1)


def set_boot_regs(vcpu, entry: int, dtb: int) -> None:
    """The state booting.rst asks of the primary CPU: EL1h with DAIF masked, x0 = the DTB's address, x1-x3 = 0,
    pc = the kernel's entry."""
    set_core_reg(vcpu, "pstate", abi.PSTATE_EL1H_DAIF_MASKED)
    for name, value in (("x0", dtb), ("x1", 0), ("x2", 0), ("x3", 0), ("pc", entry)):
        set_core_reg(vcpu, name, value)


def reg_list(vcpu) -> list[int]:
    """KVM_GET_REG_LIST: the ids of every register ONE_REG can reach on this vCPU (after KVM_ARM_VCPU_INIT)."""
    count = 0
    while True:
        regs = ffi.new("struct kvm_reg_list *", {"n": count, "reg": count})
        try:
            ioctl(vcpu.fd, lib.KVM_GET_REG_LIST, regs)
        except OSError as exc:
            if exc.errno != errno.E2BIG or regs.n <= count:
                raise
            count = regs.n  # KVM wrote how many there are
            continue
        return [regs.reg[i] for i in range(regs.n)]


def _address(cdata) -> int:
    return int(ffi.cast("uintptr_t", cdata))
