"""Completes the few x86 instructions a software KVM's emulator rejects (Intel SDM Vol. 2 encodings).

Pure logic over a `CpuAccess` (registers, guest-virtual memory, MXCSR/XMM, exception injection) so tests can
drive it without KVM. Only instructions whose effect is fully known are completed; anything else is left to
the caller to report."""
from dataclasses import dataclass
from typing import Protocol

RFLAGS_DF = 1 << 10  # SDM Vol. 1 §3.4.3.2: string instructions count down when set
GPR64 = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")  # SDM Vol. 2A §2.1.5 table 2-2 register order
MAX_ZERO_STORE = 1 << 30  # longer `rep stos` runs are left to the guest (checking them would take too long)
BP_VECTOR = 3  # SDM Vol. 3A §6.3.1: #BP


class CpuAccess(Protocol):
    def reg(self, name: str) -> int: ...
    def set_reg(self, name: str, value: int) -> None: ...
    def read_virt(self, addr: int, length: int) -> bytes: ...
    def write_virt(self, addr: int, data: bytes) -> None: ...
    def mxcsr(self) -> int: ...
    def set_mxcsr(self, value: int) -> None: ...
    def xmm(self, index: int) -> bytes: ...
    def set_xmm(self, index: int, value: bytes) -> None: ...
    def inject_exception(self, vector: int) -> None: ...
    def virt_is_zero(self, addr: int, length: int) -> bool: ...


class DecodeError(ValueError):
    """The bytes are not an instruction this module completes."""


@dataclass
class ModRM:
    """A decoded ModRM operand (SDM Vol. 2A §2.1.5, §2.2.1): `reg` field and either a register or an address."""

    reg: int
    rm_reg: int | None
    address: int | None
    length: int  # bytes consumed from the ModRM byte on


def _decode_modrm(code: bytes, pos: int, rex: int, cpu: CpuAccess, next_rip_base: int) -> ModRM:
    if pos >= len(code):
        raise DecodeError("truncated ModRM")
    modrm = code[pos]
    mod, reg, rm = modrm >> 6, ((modrm >> 3) & 7) | ((rex & 4) << 1), modrm & 7
    start = pos
    pos += 1
    if mod == 3:
        return ModRM(reg, rm | ((rex & 1) << 3), None, pos - start)
    address = 0
    rip_relative = False
    if rm == 4:  # SIB follows
        if pos >= len(code):
            raise DecodeError("truncated SIB")
        sib = code[pos]
        pos += 1
        scale, index, base = 1 << (sib >> 6), ((sib >> 3) & 7) | ((rex & 2) << 2), sib & 7
        if index != 4:
            address += cpu.reg(GPR64[index]) * scale
        if base == 5 and mod == 0:
            disp_size = 4
        else:
            address += cpu.reg(GPR64[base | ((rex & 1) << 3)])
            disp_size = {0: 0, 1: 1, 2: 4}[mod]
    elif rm == 5 and mod == 0:
        rip_relative, disp_size = True, 4
    else:
        address += cpu.reg(GPR64[rm | ((rex & 1) << 3)])
        disp_size = {0: 0, 1: 1, 2: 4}[mod]
    if pos + disp_size > len(code):
        raise DecodeError("truncated displacement")
    disp = int.from_bytes(code[pos:pos + disp_size], "little", signed=True) if disp_size else 0
    pos += disp_size
    # RIP-relative: relative to the next instruction, which (for the forms we complete) ends with this operand
    address = next_rip_base + (pos - start) + disp if rip_relative else address + disp
    return ModRM(reg, None, address & 0xFFFFFFFFFFFFFFFF, pos - start)


def complete(code: bytes, cpu: CpuAccess) -> str | None:
    """Complete the instruction at RIP whose bytes are `code`. Returns its name, or None if not ours."""
    rip = cpu.reg("rip")
    pos, rex, opsize, rep = 0, 0, False, False
    while pos < len(code) and code[pos] in (0x66, 0xF2, 0xF3, 0x2E, 0x3E, 0x26, 0x36):
        opsize |= code[pos] == 0x66
        rep |= code[pos] in (0xF2, 0xF3)
        pos += 1
    if pos < len(code) and 0x40 <= code[pos] <= 0x4F:
        rex = code[pos]
        pos += 1
    if pos >= len(code):
        return None
    op = code[pos]
    if op == 0xCC and pos == 0:  # int3: a trap, so #BP is delivered with RIP after the instruction
        cpu.set_reg("rip", rip + 1)
        cpu.inject_exception(BP_VECTOR)
        return "int3"
    if op == 0x9B and pos == 0:  # fwait: no unmasked x87 exception can be pending (the guest runs with none)
        cpu.set_reg("rip", rip + 1)
        return "fwait"
    if op != 0x0F or pos + 1 >= len(code) or rep:
        return None
    op2 = code[pos + 1]
    try:
        m = _decode_modrm(code, pos + 2, rex, cpu, rip + pos + 2)
    except DecodeError:
        return None
    length = pos + 2 + m.length
    if op2 == 0xAE and m.address is not None and (m.reg & 7) in (2, 3) and not opsize:
        if m.reg & 7 == 2:  # ldmxcsr m32
            cpu.set_mxcsr(int.from_bytes(cpu.read_virt(m.address, 4), "little"))
            name = "ldmxcsr"
        else:  # stmxcsr m32
            cpu.write_virt(m.address, cpu.mxcsr().to_bytes(4, "little"))
            name = "stmxcsr"
    elif op2 in (0x6E, 0x7E) and opsize:  # movd/movq between xmm and r/m (66 [REX.W] 0F 6E/7E)
        wide = bool(rex & 8)
        size = 8 if wide else 4
        if op2 == 0x6E:  # xmm <- r/m
            if m.rm_reg is not None:
                value = (cpu.reg(GPR64[m.rm_reg]) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            else:
                value = cpu.read_virt(m.address, size)
            cpu.set_xmm(m.reg, value.ljust(16, b"\0"))
        else:  # r/m <- xmm
            value = cpu.xmm(m.reg)[:size]
            if m.rm_reg is not None:
                cpu.set_reg(GPR64[m.rm_reg], int.from_bytes(value, "little"))  # 32-bit writes zero-extend
            else:
                cpu.write_virt(m.address, value)
        name = "movq" if wide else "movd"
    else:
        return None
    cpu.set_reg("rip", rip + length)
    return name


def complete_zero_store(code: bytes, cpu: CpuAccess) -> str | None:
    """Finish `rep stos{b,w,d,q}` (SDM Vol. 2B "REP", "STOS") at RIP at once when it stores zeros over memory that
    already reads as zero: only RDI, RCX and RIP change, as if every iteration had run. None (nothing changed)
    for any other instruction, a non-zero value, DF set, 32-bit addressing, or a destination holding data."""
    pos, opsize, rep = 0, False, False
    while pos < len(code) and code[pos] in (0x66, 0xF3):
        opsize |= code[pos] == 0x66
        rep |= code[pos] == 0xF3
        pos += 1
    rex = code[pos] if pos < len(code) and 0x40 <= code[pos] <= 0x4F else 0
    pos += bool(rex)
    if not rep or pos >= len(code) or code[pos] not in (0xAA, 0xAB):
        return None
    width = 1 if code[pos] == 0xAA else 8 if rex & 8 else 2 if opsize else 4
    if cpu.reg("rax") & ((1 << (8 * width)) - 1) or cpu.reg("rflags") & RFLAGS_DF:
        return None
    count, dest = cpu.reg("rcx"), cpu.reg("rdi")
    length = count * width
    if length > MAX_ZERO_STORE or dest + length > 1 << 64:
        return None
    if length and not cpu.virt_is_zero(dest, length):
        return None
    cpu.set_reg("rdi", dest + length)
    cpu.set_reg("rcx", 0)
    cpu.set_reg("rip", cpu.reg("rip") + pos + 1)
    return "rep stos"
