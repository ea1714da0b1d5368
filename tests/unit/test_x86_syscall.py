"""Turning kvm_pvm's #PF-at-LSTAR back into the `syscall` it was (SDM Vol. 2B "SYSCALL"), and IDT gate decoding."""
import struct

import pytest

from cloudkvm.boards.x86.syscall import FAULT_FRAME, IDT_GATE, gate_target, syscall_from_fault

LSTAR = 0xFFFFFFFF81C00080
STAR = 0x23 << 48 | 0x10 << 32              # Linux syscall_init: __USER32_CS for sysret, __KERNEL_CS for syscall
SFMASK = 0x257FD5  # Linux 6.1 syscall_init: CF PF AF ZF SF TF IF DF OF IOPL NT RF AC ID (RF included)


def frame(error=0xF, rip=LSTAR, cs=0x33, rflags=0x10002, rsp=0x7FFE58B5CDD0, ss=0x2B) -> bytes:
    """A #PF frame as kvm_pvm's `syscall` leaves it: SFMASK applied to RFLAGS (IF clear), RF set by the fault."""
    return FAULT_FRAME.pack(error, rip, cs, rflags, rsp, ss)


def test_the_fault_at_lstar_from_user_mode_becomes_the_syscall_entry():
    entry = syscall_from_fault(frame(), cr2=LSTAR, lstar=LSTAR, star=STAR, sfmask=SFMASK, r11=0x246)
    assert entry is not None
    assert (entry.rip, entry.rsp, entry.cs, entry.ss) == (LSTAR, 0x7FFE58B5CDD0, 0x10, 0x18)
    assert entry.rflags == 0x2  # everything in Linux's SFMASK cleared, bit 1 set


@pytest.mark.parametrize("why, kwargs", [
    ("fault from kernel mode", {"frame": frame(cs=0x10)}),
    ("kernel-mode error code", {"frame": frame(error=0x1)}),
    ("fault elsewhere", {"frame": frame(rip=LSTAR + 16)}),
    ("cr2 elsewhere (a data access at RIP=LSTAR)", {"cr2": 0x1000}),
    ("no LSTAR set", {"lstar": 0}),
    ("a user jump to LSTAR: IF still set in the pushed RFLAGS", {"frame": frame(rflags=0x10246), "r11": 0x3246}),
    ("a user jump with a flag SFMASK would have cleared (DF)", {"frame": frame(rflags=0x10402)}),
    ("SFMASK does not clear IF, so a jump cannot be told from a syscall", {"sfmask": 0x500}),
])
def test_any_other_fault_is_left_to_the_guest(why, kwargs):
    args = {"frame": frame(), "cr2": LSTAR, "lstar": LSTAR, "star": STAR, "sfmask": SFMASK, "r11": 0x202, **kwargs}
    assert syscall_from_fault(args.pop("frame"), **args) is None, why


def test_gate_target_reassembles_the_handler_address_of_a_present_gate():
    handler = 0xFFFFFFFF81E00A50
    gate = IDT_GATE.pack(handler & 0xFFFF, 0x10, 0, 0x8E, (handler >> 16) & 0xFFFF, handler >> 32, 0)
    assert gate_target(gate) == handler
    assert gate_target(IDT_GATE.pack(handler & 0xFFFF, 0x10, 0, 0x0E, 0, 0, 0)) is None  # not present
    assert IDT_GATE.size == 16 and len(struct.pack("<6Q", *range(6))) == FAULT_FRAME.size
