"""`complete.CpuAccess` over a stopped KVM vCPU: registers, guest-virtual memory via KVM_TRANSLATE, SSE
state, exception injection."""
from ...errors import GuestMemoryError


XSAVE_MXCSR_WORD = 24 // 4       # SDM Vol. 1 §10.5.1 table 10-2: MXCSR at byte 24 of the legacy region
XSAVE_XSTATE_BV_WORD = 512 // 4  # SDM Vol. 1 §13.4.2: XSTATE_BV at byte 512
XSTATE_SSE = 1 << 1


class KvmCpuAccess:
    """`complete.CpuAccess` over a stopped vCPU: registers, guest-virtual memory via KVM_TRANSLATE, SSE state."""

    def __init__(self, vcpu):
        self.vcpu = vcpu
        self.regs = vcpu.get_regs()
        self._fpu = None
        self._regs_dirty = self._fpu_dirty = False
        self._inject: int | None = None

    def reg(self, name: str) -> int:
        return getattr(self.regs, name)

    def set_reg(self, name: str, value: int) -> None:
        setattr(self.regs, name, value & 0xFFFFFFFFFFFFFFFF)
        self._regs_dirty = True

    def _phys(self, addr: int, length: int) -> list[tuple[int, int]]:
        """Guest-physical pieces of [addr, addr+length), split at page boundaries; raises if unmapped."""
        pieces = []
        while length:
            chunk = min(length, 0x1000 - (addr & 0xFFF))
            gpa = self.vcpu.translate(addr)
            if gpa is None:
                raise GuestMemoryError(f"guest-virtual 0x{addr:x} is not mapped")
            pieces.append((gpa, chunk))
            addr, length = addr + chunk, length - chunk
        return pieces

    def virt_is_zero(self, addr: int, length: int) -> bool:
        try:
            return all(self.vcpu.memory.is_zero(gpa, n) for gpa, n in _merged(self._phys(addr, length)))
        except GuestMemoryError:
            return False

    def read_virt(self, addr: int, length: int) -> bytes:
        return b"".join(self.vcpu.memory.read(gpa, n) for gpa, n in self._phys(addr, length))

    def write_virt(self, addr: int, data: bytes) -> None:
        offset = 0
        for gpa, n in self._phys(addr, len(data)):
            self.vcpu.memory.write(gpa, data[offset:offset + n])
            offset += n

    def _fpu_state(self):
        if self._fpu is None:
            self._fpu = self.vcpu.get_fpu()
        return self._fpu

    # MXCSR lives in the XSAVE legacy region (SDM Vol. 1 §13.4.1, offset 24): KVM_SET_FPU does not load it, and
    # KVM_SET_XSAVE loads it only when XSTATE_BV (header offset 512) marks SSE state present (§13.6).
    def mxcsr(self) -> int:
        return self.vcpu.get_xsave().region[XSAVE_MXCSR_WORD]

    def set_mxcsr(self, value: int) -> None:
        xsave = self.vcpu.get_xsave()
        xsave.region[XSAVE_MXCSR_WORD] = value
        xsave.region[XSAVE_XSTATE_BV_WORD] |= XSTATE_SSE
        self.vcpu.set_xsave(xsave)

    def xmm(self, index: int) -> bytes:
        return bytes(self._fpu_state().xmm[index])

    def set_xmm(self, index: int, value: bytes) -> None:
        self._fpu_state().xmm[index] = list(value)
        self._fpu_dirty = True

    def inject_exception(self, vector: int) -> None:
        self._inject = vector

    def commit(self) -> None:
        """Write back what the completion changed, in one go."""
        if self._fpu_dirty:
            self.vcpu.set_fpu(self._fpu)
        if self._regs_dirty:
            self.vcpu.set_regs(self.regs)
        if self._inject is not None:
            events = self.vcpu.get_vcpu_events()
            events.exception.injected = 1
            events.exception.nr = self._inject
            events.exception.has_error_code = 0
            events.exception.error_code = 0
            self.vcpu.set_vcpu_events(events)


def _merged(pieces: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent guest-physical (address, length) pieces joined into runs."""
    runs: list[tuple[int, int]] = []
    for gpa, n in pieces:
        if runs and runs[-1][0] + runs[-1][1] == gpa:
            runs[-1] = (runs[-1][0], runs[-1][1] + n)
        else:
            runs.append((gpa, n))
    return runs
