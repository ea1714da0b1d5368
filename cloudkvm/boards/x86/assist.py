"""Boot assists for KVMs that interpret guest kernel code (kvm_pvm): work the VMM finishes for the guest at
hardware breakpoints (KVM_SET_GUEST_DEBUG, SDM Vol. 3B §18.2), each with exactly the architectural effect.

- zero stores: `rep stos` of zeros over RAM that already reads zero (Linux's `clear_bss`), finished at once;
- syscalls: a user-mode `syscall` that the KVM delivered as a #PF at LSTAR (`syscall.py`) is turned into the
  kernel entry `syscall` should have made. The breakpoint sits on the guest's #PF handler, found in its IDT by a
  periodic check (`tick`) once LSTAR is set; any other fault steps past the breakpoint and goes on.

Per vCPU: up to four breakpoints (the zero-store sites on vCPU 0, the #PF handler on all), or one single step."""
import logging
import struct
from dataclasses import dataclass, field

from ...errors import GuestMemoryError
from .complete import complete_zero_store
from .kvm_access import KvmCpuAccess
from .syscall import FAULT_FRAME, PF_VECTOR, IDT_GATE, gate_target, syscall_from_fault

log = logging.getLogger("cloudkvm.x86")

MSR_EFER, MSR_STAR, MSR_LSTAR, MSR_SFMASK = 0xC0000080, 0xC0000081, 0xC0000082, 0xC0000084  # SDM Vol. 4 §2.1
EFER_SCE = 1 << 0
TICK_SECONDS = 1.0


@dataclass
class _VcpuDebug:
    zero_sites: list[int] = field(default_factory=list)
    pf_handler: int | None = None
    stepping: bool = False


class BootAssists:
    """The assists' state for one VM; the board calls `handle_debug_exit` and `tick` on the vCPU's own thread."""

    def __init__(self, syscalls: bool):
        self.syscalls = syscalls
        self.completed: dict[str, int] = {}
        self._vcpus: dict[int, _VcpuDebug] = {}

    def _state(self, vcpu) -> _VcpuDebug:
        return self._vcpus.setdefault(vcpu.index, _VcpuDebug())

    def _apply(self, vcpu) -> None:
        state = self._state(vcpu)
        if state.stepping:  # no breakpoints while stepping off one: it would fire again first
            vcpu.set_guest_debug((), single_step=True)
            return
        breakpoints = state.zero_sites + ([state.pf_handler] if state.pf_handler is not None else [])
        vcpu.set_guest_debug(breakpoints[:4])

    def _count(self, name: str) -> None:
        self.completed[name] = self.completed.get(name, 0) + 1

    def zero_sites(self, vcpu) -> list[int]:
        return list(self._state(vcpu).zero_sites)

    def arm_zero_stores(self, vcpu, sites) -> None:
        """Breakpoints at (up to three) `rep stos` instructions that clear memory the VM was given zeroed."""
        self._state(vcpu).zero_sites = list(sites)[:3]
        self._apply(vcpu)

    def tick(self, vcpu) -> None:
        """Periodic, on the vCPU thread: (re)arm the syscall assist on the guest's current #PF handler."""
        if not self.syscalls:
            return
        handler = _guest_pf_handler(vcpu)
        state = self._state(vcpu)
        if handler != state.pf_handler and not state.stepping:
            state.pf_handler = handler
            self._apply(vcpu)
            if handler is not None:
                log.info("boot assist: vCPU %d: user-mode syscalls caught at the #PF handler 0x%x", vcpu.index,
                         handler)

    def handle_debug_exit(self, vcpu) -> bool:
        """One of our breakpoints or single steps: do its work and go on. False for a debug exit not ours."""
        state = self._state(vcpu)
        if state.stepping:
            state.stepping = False
            self._apply(vcpu)
            return True
        cpu = KvmCpuAccess(vcpu)
        rip = cpu.reg("rip")
        if rip in state.zero_sites:
            self._zero_store(vcpu, cpu, rip)
            state.zero_sites.remove(rip)
            self._apply(vcpu)
            return True
        if rip == state.pf_handler:
            if not self._syscall(vcpu, cpu):
                state.stepping = True  # an ordinary fault: let the handler's first instruction run, then re-arm
                self._apply(vcpu)
            return True
        return False

    def _zero_store(self, vcpu, cpu: KvmCpuAccess, rip: int) -> None:
        try:
            name = complete_zero_store(cpu.read_virt(rip, 4), cpu)
        except GuestMemoryError:
            name = None
        if name is not None:
            cpu.commit()
            self._count(name)
        log.info("boot assist at 0x%x: %s", rip, "finished the kernel's clear of zeroed memory" if name
                 else "left to the guest (not a zero store over zeroed memory)")

    def _syscall(self, vcpu, cpu: KvmCpuAccess) -> bool:
        sregs = vcpu.get_sregs()
        msrs = vcpu.get_msrs([MSR_STAR, MSR_LSTAR, MSR_SFMASK])
        try:
            frame = cpu.read_virt(cpu.reg("rsp"), FAULT_FRAME.size)
        except GuestMemoryError:
            return False
        entry = syscall_from_fault(frame, sregs.cr2, msrs.get(MSR_LSTAR, 0), msrs.get(MSR_STAR, 0),
                                   msrs.get(MSR_SFMASK, 0), cpu.reg("r11"))
        if entry is None:
            return False
        _flat_segment(sregs.cs, entry.cs, code=True)
        _flat_segment(sregs.ss, entry.ss, code=False)
        vcpu.set_sregs(sregs)
        cpu.set_reg("rip", entry.rip)
        cpu.set_reg("rsp", entry.rsp)
        cpu.set_reg("rflags", entry.rflags)
        cpu.commit()
        if "syscall" not in self.completed:
            log.warning("host quirk: finishing user-mode 'syscall' for the guest (the host KVM enters LSTAR at CPL3)")
        self._count("syscall")
        return True


def _flat_segment(seg, selector: int, code: bool) -> None:
    """The fixed descriptor `syscall` loads (SDM Vol. 2B "SYSCALL"): base 0, 4 GiB, DPL 0; CS 64-bit code."""
    seg.selector, seg.base, seg.limit, seg.g, seg.s, seg.present, seg.dpl = selector, 0, 0xFFFFFFFF, 1, 1, 1, 0
    seg.unusable = 0
    if code:
        seg.type, seg.l, seg.db = 11, 1, 0
    else:
        seg.type, seg.l, seg.db = 3, 0, 1


def _guest_pf_handler(vcpu) -> int | None:
    """The guest's #PF handler, once it has `syscall` set up (EFER.SCE and LSTAR); None before."""
    try:
        sregs = vcpu.get_sregs()
        if not sregs.efer & EFER_SCE or not vcpu.get_msrs([MSR_LSTAR]).get(MSR_LSTAR):
            return None
        if sregs.idt.limit < (PF_VECTOR + 1) * IDT_GATE.size - 1:
            return None
        gate = KvmCpuAccess(vcpu).read_virt(sregs.idt.base + PF_VECTOR * IDT_GATE.size, IDT_GATE.size)
    except (GuestMemoryError, OSError, struct.error):
        return None
    return gate_target(gate)
