"""Instruction completion for the software-KVM quirks, against a fake CPU."""
import pytest

from cloudkvm.boards.x86.complete import MAX_ZERO_STORE, complete, complete_zero_store


class FakeCpu:
    def __init__(self, **regs):
        self.regs = {"rip": 0x1000, **regs}
        self.memory = {}
        self.mxcsr_value = 0x1F80
        self.xmms = [bytes(16)] * 16
        self.injected = []

    def reg(self, name):
        return self.regs.get(name, 0)

    def set_reg(self, name, value):
        self.regs[name] = value

    def read_virt(self, addr, length):
        return bytes(self.memory.get(addr + i, 0) for i in range(length))

    def write_virt(self, addr, data):
        for i, b in enumerate(data):
            self.memory[addr + i] = b

    def mxcsr(self):
        return self.mxcsr_value

    def set_mxcsr(self, value):
        self.mxcsr_value = value

    def xmm(self, index):
        return self.xmms[index]

    def set_xmm(self, index, value):
        self.xmms[index] = value

    def inject_exception(self, vector):
        self.injected.append(vector)

    def virt_is_zero(self, addr, length):
        self.zero_checks = getattr(self, "zero_checks", []) + [(addr, length)]
        return not any(self.memory.get(a, 0) for a in self.memory if addr <= a < addr + length)


def test_int3_advances_rip_and_injects_bp():
    cpu = FakeCpu()
    assert complete(b"\xcc\x90", cpu) == "int3"
    assert cpu.regs["rip"] == 0x1001 and cpu.injected == [3]


def test_fwait_is_skipped():
    cpu = FakeCpu()
    assert complete(b"\x9b", cpu) == "fwait"
    assert cpu.regs["rip"] == 0x1001 and cpu.injected == []


def test_ldmxcsr_rsp_plus_4_reads_guest_memory():
    """The stop seen in kernel_fpu_begin: ldmxcsr [rsp+4] = 0f ae 54 24 04."""
    cpu = FakeCpu(rsp=0x8000)
    cpu.write_virt(0x8004, (0x1FBF).to_bytes(4, "little"))
    assert complete(bytes.fromhex("0fae542404"), cpu) == "ldmxcsr"
    assert cpu.mxcsr_value == 0x1FBF and cpu.regs["rip"] == 0x1005


def test_stmxcsr_rip_relative_writes_after_the_instruction():
    cpu = FakeCpu()
    cpu.mxcsr_value = 0x1234
    # stmxcsr [rip+0x10] = 0f ae 1d 10 00 00 00 (7 bytes): address = 0x1000 + 7 + 0x10
    assert complete(bytes.fromhex("0fae1d10000000"), cpu) == "stmxcsr"
    assert cpu.read_virt(0x1017, 4) == (0x1234).to_bytes(4, "little") and cpu.regs["rip"] == 0x1007


def test_ldmxcsr_with_sib_index_scale_and_disp32():
    cpu = FakeCpu(rax=0x100, rbx=0x10)
    cpu.write_virt(0x100 + 0x10 * 8 - 0x20, (0xABCD).to_bytes(4, "little"))
    # ldmxcsr [rax + rbx*8 - 0x20]: 0f ae 94 d8 e0 ff ff ff
    assert complete(bytes.fromhex("0fae94d8e0ffffff"), cpu) == "ldmxcsr"
    assert cpu.mxcsr_value == 0xABCD and cpu.regs["rip"] == 0x1008


def test_movd_xmm15_from_ecx():
    """The next stop seen: movd xmm15, ecx = 66 44 0f 6e f9."""
    cpu = FakeCpu(rcx=0xFFFFFFFF_12345678)
    assert complete(bytes.fromhex("66440f6ef9"), cpu) == "movd"
    assert cpu.xmms[15] == (0x12345678).to_bytes(4, "little") + bytes(12)
    assert cpu.regs["rip"] == 0x1005


def test_movq_rax_from_xmm1_and_to_memory():
    cpu = FakeCpu(rdi=0x5000)
    cpu.xmms[1] = bytes(range(16))
    assert complete(bytes.fromhex("66480f7ec8"), cpu) == "movq"  # movq rax, xmm1
    assert cpu.regs["rax"] == int.from_bytes(bytes(range(8)), "little")
    cpu.regs["rip"] = 0x1000
    assert complete(bytes.fromhex("660f7e0f"), cpu) == "movd"  # movd [rdi], xmm1
    assert cpu.read_virt(0x5000, 4) == bytes(range(4))


@pytest.mark.parametrize("code", ["", "0f", "0fae", "0fae54", "0fae5424", "c3", "0f0b",
                                  "0fae00",     # fxsave [rax]: not ours
                                  "f30fae10",   # a rep prefix makes it another instruction
                                  "660fae10"])  # so does an operand-size prefix
def test_anything_else_is_left_alone(code):
    cpu = FakeCpu(rsp=0x8000)
    before = dict(cpu.regs)
    result = complete(bytes.fromhex(code), cpu)
    assert result is None and cpu.regs == before and cpu.injected == []


# --- rep stos of zeros over zeroed memory (boot assists) -------------------------------------------------------

@pytest.mark.parametrize("code, width", [("f3aa", 1), ("66f3ab", 2), ("f3ab", 4), ("f348ab", 8), ("f366ab", 2)])
def test_rep_stos_of_zeros_over_zeros_advances_rdi_rcx_and_rip_as_every_iteration_would(code, width):
    cpu = FakeCpu(rdi=0x10000, rcx=100, rax=0xFFFF_FFFF_FFFF_FF00 if width == 1 else 0, rflags=0x2)
    assert complete_zero_store(bytes.fromhex(code), cpu) == "rep stos"
    assert cpu.regs["rdi"] == 0x10000 + 100 * width and cpu.regs["rcx"] == 0
    assert cpu.regs["rip"] == 0x1000 + len(code) // 2
    assert cpu.zero_checks == [(0x10000, 100 * width)]


@pytest.mark.parametrize("why, code, regs", [
    ("stores a non-zero byte", "f3aa", {"rax": 1}),
    ("stores a non-zero qword", "f348ab", {"rax": 1 << 40}),
    ("counts down (DF set)", "f3aa", {"rflags": 0x402}),
    ("has no rep prefix", "aa", {}),
    ("uses 32-bit addressing (67 prefix)", "67f3aa", {}),
    ("is another string instruction (rep movsb)", "f3a4", {}),
    ("is too long to check", "f348ab", {"rcx": MAX_ZERO_STORE}),
    ("wraps the address space", "f3aa", {"rdi": (1 << 64) - 16, "rcx": 32}),
])
def test_rep_stos_is_left_to_the_guest_when(why, code, regs):
    cpu = FakeCpu(**{"rdi": 0x10000, "rcx": 64, "rflags": 0x2, **regs})
    before = dict(cpu.regs)
    assert complete_zero_store(bytes.fromhex(code), cpu) is None, why
    assert cpu.regs == before


def test_rep_stos_over_memory_holding_data_is_left_to_the_guest():
    cpu = FakeCpu(rdi=0x10000, rcx=64, rflags=0x2)
    cpu.write_virt(0x10000 + 63, b"\x01")
    assert complete_zero_store(b"\xf3\xaa", cpu) is None
    assert cpu.regs["rdi"] == 0x10000 and cpu.regs["rcx"] == 64 and cpu.regs["rip"] == 0x1000


def test_rep_stos_with_a_zero_count_only_moves_rip():
    cpu = FakeCpu(rdi=0x10000, rcx=0, rflags=0x2)
    assert complete_zero_store(b"\xf3\xaa", cpu) == "rep stos"
    assert cpu.regs["rdi"] == 0x10000 and cpu.regs["rip"] == 0x1002
