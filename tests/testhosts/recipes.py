"""What each emulated KVM test host is: the QEMU that emulates it, its Debian kernel and modules, its root.

x86_64: QEMU TCG `-cpu max` is an AMD CPU with SVM; Debian's generic kernel (it has 9p, the cloud kernel has not)
loads kvm-amd with nested paging. Its root is this machine's own `/`, shared read-only over 9p, so the installed
cloudkvm runs there as it is. arm64: `virt` with the EL2 extensions and a GICv3 (`pauth-impdef`: the default
pointer-auth algorithm is 2.4x slower to emulate); Debian's generic arm64 kernel has KVM built in (VHE); its root
is an arm64 Debian user space made with `mmdebstrap --variant=extract` (no arm64 code runs to make it), with the
project tree shared at its own path and cloudkvm's cffi core cross-compiled for it.
"""
from __future__ import annotations

from dataclasses import dataclass

# Modules (with their dependencies, found from .modinfo) that the init loads before it mounts the 9p root.
NINE_P_MODULES = ("virtio_pci", "9pnet_virtio", "9p")


@dataclass(frozen=True)
class HostRecipe:
    arch: str                       # Debian architecture name: amd64 / arm64
    name: str                       # the name tests and the CLI use: x86_64 / arm64
    qemu: str                       # the QEMU binary (Debian package qemu-system-x86 / qemu-system-arm)
    machine_args: tuple[str, ...]   # -M/-cpu/-smp/-m
    console: str                    # the kernel's console device
    modules: tuple[str, ...]        # modules the init loads, in this order (dependencies first, found by the build)
    own_root: bool                  # True: the host machine's / is the test host's root (same architecture)
    rootfs_packages: tuple[str, ...] = ()  # for a foreign architecture: the Debian packages of its root

    @property
    def kernel_metapackage(self) -> str:
        return f"linux-image-{self.arch}" + ("" if self.own_root else f":{self.arch}")

    def package(self, name: str) -> str:
        """A Debian package name for this architecture (`name:arm64` where it is foreign)."""
        return name if self.own_root else f"{name}:{self.arch}"


X86_64 = HostRecipe(
    arch="amd64", name="x86_64", qemu="qemu-system-x86_64",
    # no TSC-deadline timer: in L2 guest mode QEMU's TCG judges L1's deadline against the L2 guest's TSC, so
    # L1's timer never fires until L2 exits by itself (docs/testing.md)
    machine_args=("-M", "q35", "-cpu", "max,-tsc-deadline", "-smp", "1", "-m", "3072"),
    console="ttyS0",
    modules=(*NINE_P_MODULES, "kvm_amd"),
    own_root=True,
)

ARM64 = HostRecipe(
    arch="arm64", name="arm64", qemu="qemu-system-aarch64",
    machine_args=("-M", "virt,gic-version=3,virtualization=on", "-cpu", "max,pauth-impdef=on",
                  "-smp", "2", "-m", "2048"),
    console="ttyAMA0",
    modules=NINE_P_MODULES,  # KVM is built into Debian's arm64 kernel
    own_root=False,
    rootfs_packages=("dash", "coreutils", "python3-minimal", "python3.11-minimal", "libpython3.11-stdlib",
                     "busybox-static", "libslirp0",
                     "openssh-client",  # `cloudkvm ssh` and `up --wait ssh` of the arm64 cloud image
                     "qemu-system-arm"),  # the reference VMM of bench/boot_time --testhost (-M virt -enable-kvm)
)

RECIPES = {r.name: r for r in (X86_64, ARM64)}
