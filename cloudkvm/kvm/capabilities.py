"""What this host's KVM offers that cloudkvm's boards need, per host architecture (KVM API, api.rst §4.4
KVM_CHECK_EXTENSION and §8 capabilities; §4.82 KVM_CREATE_DEVICE for the arm64 vGICv3)."""
from __future__ import annotations

import platform
from dataclasses import dataclass

from .native import lib
from .system import Kvm
from .vm import Vm


@dataclass(frozen=True)
class Capability:
    name: str
    value: int  # 0: absent; else KVM's answer (1 for yes, or a number such as the IPA size in bits)
    needed: bool  # a VM cannot be built without it

    def describe(self) -> str:
        state = "no" if not self.value else ("yes" if self.value == 1 else str(self.value))
        return f"{self.name}: {state}" + ("  (NEEDED)" if self.needed and not self.value else "")


# (name printed, KVM_CAP_* attribute, needed)
_COMMON = (("user-memory", "KVM_CAP_USER_MEMORY", True), ("irqfd", "KVM_CAP_IRQFD", True),
           ("ioeventfd", "KVM_CAP_IOEVENTFD", True), ("immediate-exit", "KVM_CAP_IMMEDIATE_EXIT", True),
           ("mp-state", "KVM_CAP_MP_STATE", True), ("memory-slots", "KVM_CAP_NR_MEMSLOTS", True))
_BY_ARCH = {
    "x86_64": (("in-kernel-irqchip", "KVM_CAP_IRQCHIP", True), ("irq-routing", "KVM_CAP_IRQ_ROUTING", True),
               ("signal-msi", "KVM_CAP_SIGNAL_MSI", False)),
    "aarch64": (("one-reg", "KVM_CAP_ONE_REG", True), ("device-ctrl", "KVM_CAP_DEVICE_CTRL", True),
                ("psci-0.2", "KVM_CAP_ARM_PSCI_0_2", True), ("ipa-size-bits", "KVM_CAP_ARM_VM_IPA_SIZE", False),
                ("pmu-v3", "KVM_CAP_ARM_PMU_V3", False)),
}


def host_capabilities(kvm: Kvm, machine: str | None = None) -> list[Capability]:
    """The capabilities the boards of this host's architecture use, and whether each is there."""
    machine = machine or platform.machine()
    caps = [Capability(name, kvm.check_extension(getattr(lib, attr)), needed)
            for name, attr, needed in (*_COMMON, *_BY_ARCH.get(machine, ()))]
    if machine == "aarch64":
        caps.append(Capability("vgic-v3", int(_has_device(kvm, lib.KVM_DEV_TYPE_ARM_VGIC_V3)), True))
    return caps


def _has_device(kvm: Kvm, dev_type: int) -> bool:
    """Whether a VM here can have that in-kernel device; a VM that cannot even be made has none."""
    try:
        vm = Vm(kvm)
    except OSError:
        return False
    try:
        return vm.can_create_device(dev_type)
    finally:
        vm.close()
