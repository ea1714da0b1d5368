"""A KVM vCPU: the shared kvm_run page, KVM_RUN, and register/state accessors."""
import mmap
import os

from .native import ffi, lib
from .system import ioctl


class Vcpu:
    """One vCPU fd with its mmap'd `struct kvm_run`. Register getters return cdata that setters take back."""

    def __init__(self, vm_fd: int, index: int, mmap_size: int):
        self.index = index
        self.memory = None  # the VM's GuestMemory, for reports that read guest RAM
        self.fd = ioctl(vm_fd, lib.KVM_CREATE_VCPU, index)
        self._run_map = mmap.mmap(self.fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_buffer = ffi.from_buffer(self._run_map)
        self.run = ffi.cast("struct kvm_run *", self.run_buffer)
        self.run_page = memoryview(self._run_map)
        # Pointers into the kvm_run union, taken once so the exit path allocates no intermediate cdata.
        self.io = ffi.addressof(self.run[0], "io")
        self.mmio = ffi.addressof(self.run[0], "mmio")

    def run_once(self) -> int:
        """KVM_RUN until the next exit: 0, or -errno (-EINTR when kicked)."""
        return lib.ckvm_run(self.fd)

    def _get(self, request: int, ctype: str):
        value = ffi.new(ctype)
        ioctl(self.fd, request, value)
        return value

    # --- generic -------------------------------------------------------------------------------------------
    def get_mp_state(self) -> int:
        return self._get(lib.KVM_GET_MP_STATE, "struct kvm_mp_state *").mp_state

    def set_mp_state(self, state: int) -> None:
        ioctl(self.fd, lib.KVM_SET_MP_STATE, ffi.new("struct kvm_mp_state *", {"mp_state": state}))

    # --- x86 (arm64 reaches its registers through ONE_REG: kvm/arm64.py) ---------------------------------------
    def get_regs(self):
        return self._get(lib.KVM_GET_REGS, "struct kvm_regs *")

    def set_regs(self, regs) -> None:
        ioctl(self.fd, lib.KVM_SET_REGS, regs)

    def get_sregs(self):
        return self._get(lib.KVM_GET_SREGS, "struct kvm_sregs *")

    def set_sregs(self, sregs) -> None:
        ioctl(self.fd, lib.KVM_SET_SREGS, sregs)

    def get_fpu(self):
        return self._get(lib.KVM_GET_FPU, "struct kvm_fpu *")

    def set_fpu(self, fpu) -> None:
        ioctl(self.fd, lib.KVM_SET_FPU, fpu)

    def get_xsave(self):
        """KVM_GET_XSAVE: the XSAVE area (its legacy region holds MXCSR, which KVM_GET/SET_FPU do not carry)."""
        return self._get(lib.KVM_GET_XSAVE, "struct kvm_xsave *")

    def set_xsave(self, xsave) -> None:
        ioctl(self.fd, lib.KVM_SET_XSAVE, xsave)

    def get_lapic(self) -> bytes:
        return bytes(ffi.buffer(self._get(lib.KVM_GET_LAPIC, "struct kvm_lapic_state *")))

    def set_lapic(self, state: bytes) -> None:
        value = ffi.new("struct kvm_lapic_state *")
        ffi.buffer(value)[:] = state
        ioctl(self.fd, lib.KVM_SET_LAPIC, value)

    def get_vcpu_events(self):
        return self._get(lib.KVM_GET_VCPU_EVENTS, "struct kvm_vcpu_events *")

    def set_vcpu_events(self, events) -> None:
        ioctl(self.fd, lib.KVM_SET_VCPU_EVENTS, events)

    def set_cpuid(self, entries: list[dict]) -> None:
        """KVM_SET_CPUID2 from dicts with function/index/flags/eax/ebx/ecx/edx."""
        table = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
        for i, entry in enumerate(entries):
            for key, value in entry.items():
                setattr(table.entries[i], key, value)
        ioctl(self.fd, lib.KVM_SET_CPUID2, table)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        for i, index in enumerate(indices):
            msrs.entries[i].index = index
        got = ioctl(self.fd, lib.KVM_GET_MSRS, msrs)
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(got)}

    def set_msrs(self, values: dict[int, int]) -> int:
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(values), "entries": len(values)})
        for i, (index, data) in enumerate(values.items()):
            msrs.entries[i].index = index
            msrs.entries[i].data = data
        return ioctl(self.fd, lib.KVM_SET_MSRS, msrs)

    def translate(self, linear: int) -> int | None:
        """KVM_TRANSLATE: the guest-physical address of a guest-virtual one, or None when unmapped."""
        tr = ffi.new("struct kvm_translation *", {"linear_address": linear})
        ioctl(self.fd, lib.KVM_TRANSLATE, tr)
        return tr.physical_address if tr.valid else None

    def set_guest_debug(self, breakpoints=(), single_step: bool = False) -> None:
        """KVM_SET_GUEST_DEBUG: instruction breakpoints at up to four guest-virtual addresses (DR0-DR3, SDM Vol. 3B
        §18.2.4: R/W 00 = execute, LEN 00) and/or one single step; each is a KVM_EXIT_DEBUG. Neither turns guest
        debug off."""
        if len(breakpoints) > 4:
            raise ValueError("x86 has four breakpoint address registers")
        debug = ffi.new("struct kvm_guest_debug *")
        if single_step:
            debug.control = lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP
        if breakpoints:
            debug.control |= lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_USE_HW_BP
            dr7 = 1 << 10  # reserved, reads as 1
            for i, address in enumerate(breakpoints):
                debug.arch.debugreg[i] = address
                dr7 |= 0b11 << (2 * i)  # local and global enable
            debug.arch.debugreg[7] = dr7
        ioctl(self.fd, lib.KVM_SET_GUEST_DEBUG, debug)

    def close(self) -> None:
        if self.fd >= 0:
            self.run_page.release()
            del self.run, self.io, self.mmio, self.run_buffer
            self._run_map.close()
            os.close(self.fd)
            self.fd = -1
