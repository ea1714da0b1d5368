"""Finishes a user-mode `syscall` that a software KVM delivered as a page fault (SDM Vol. 2B "SYSCALL").

kvm_pvm runs guest user mode natively and, on `syscall`, jumps to the guest's LSTAR still at CPL3; a stock kernel's
entry code lives on supervisor-only pages, so the CPU raises #PF at LSTAR and the guest kernel takes it. Caught at
the first instruction of the guest's #PF handler (a hardware breakpoint), the VMM sees the fault frame and can
finish what `syscall` should have done. Pure logic, so tests can drive it without KVM."""
import struct
from dataclasses import dataclass

FAULT_FRAME = struct.Struct("<6Q")  # error code, RIP, CS, RFLAGS, RSP, SS (SDM Vol. 3A §6.14.2, 64-bit frame)
PF_USER = 1 << 2                    # #PF error code bit 2: the access came from user mode (SDM Vol. 3A §4.7)
RFLAGS_RF, RFLAGS_IF, RFLAGS_FIXED = 1 << 16, 1 << 9, 1 << 1
IDT_GATE = struct.Struct("<HHBBHII")  # offset 15:0, selector, IST, type/attr, offset 31:16, offset 63:32, zero
GATE_PRESENT = 0x80
PF_VECTOR = 14


@dataclass(frozen=True)
class SyscallEntry:
    """The state `syscall` gives: RIP = LSTAR, CS/SS from STAR[47:32], RFLAGS masked by SFMASK; RSP unchanged."""

    rip: int
    rsp: int
    rflags: int
    cs: int
    ss: int


def syscall_from_fault(frame: bytes, cr2: int, lstar: int, star: int, sfmask: int, r11: int) -> SyscallEntry | None:
    """The entry state of the `syscall` behind this #PF frame, or None when the fault is any other fault: one from
    user mode, on fetching the instruction at LSTAR itself, with SFMASK already applied to the pushed RFLAGS (the
    KVM's `syscall` did that). R11 holds the user RFLAGS (`syscall` saved them).

    The SFMASK test tells a real `syscall` from a user program that merely jumps to LSTAR with a forged R11 (say,
    IOPL 3): user mode cannot clear IF, so such a jump faults with IF set, as on hardware, and stays a fault."""
    error, rip, cs, pushed_rflags, rsp, _ = FAULT_FRAME.unpack(frame)
    if not lstar or cs & 3 != 3 or not error & PF_USER or rip != lstar or cr2 != lstar:
        return None
    if not sfmask & RFLAGS_IF or pushed_rflags & sfmask & ~RFLAGS_RF:  # the fault itself sets RF in the frame
        return None
    kernel_cs = (star >> 32) & 0xFFFC
    rflags = (r11 & ~sfmask & ~RFLAGS_RF) | RFLAGS_FIXED
    return SyscallEntry(rip=lstar, rsp=rsp, rflags=rflags & 0xFFFFFFFF, cs=kernel_cs, ss=kernel_cs + 8)


def gate_target(gate: bytes) -> int | None:
    """The handler address of a present 64-bit IDT gate (SDM Vol. 3A §6.14.1), else None."""
    off0, _, _, attr, off1, off2, _ = IDT_GATE.unpack(gate)
    if not attr & GATE_PRESENT:
        return None
    return off0 | off1 << 16 | off2 << 32
