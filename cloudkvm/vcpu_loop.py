"""The per-vCPU thread body: KVM_RUN, decode the exit, dispatch to the PIO/MMIO bus, report how the VM ended."""
import errno
import logging
from dataclasses import dataclass

from .kvm.native import ffi, lib

log = logging.getLogger("cloudkvm.vcpu")

EXIT_IO, EXIT_MMIO = lib.KVM_EXIT_IO, lib.KVM_EXIT_MMIO
IO_OUT = lib.KVM_EXIT_IO_OUT
_EXIT_NAMES = {getattr(lib, n): n[len("KVM_EXIT_"):].lower() for n in dir(lib)
               if n.startswith("KVM_EXIT_") and n not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")}
_SUBERRORS = {lib.KVM_INTERNAL_ERROR_EMULATION: "emulation failure",
              lib.KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
              lib.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed",
              lib.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected exit reason"}
_SYSTEM_EVENTS = {lib.KVM_SYSTEM_EVENT_SHUTDOWN: "poweroff", lib.KVM_SYSTEM_EVENT_RESET: "reset",
                  lib.KVM_SYSTEM_EVENT_CRASH: "guest-crash"}


_NO_PORTS = ffi.new("uint8_t[65536]")  # the C loop's port codes on a board without port I/O: all C_PYTHON (0)


@dataclass
class VmResult:
    """How a VM ended. `reason` is one word; `detail` says what happened in a sentence; `pc` is the vCPU's program
    counter where that is known, which reports call by the board's name for it (`pc_name`: RIP on x86)."""

    reason: str
    detail: str = ""
    cpu: int | None = None
    pc: int | None = None
    pc_name: str = "PC"

    @property
    def clean(self) -> bool:
        return self.reason in ("poweroff", "reset", "stopped")

    def __str__(self) -> str:
        where = f" on vCPU {self.cpu}" if self.cpu is not None else ""
        pc = f" at {self.pc_name} 0x{self.pc:x}" if self.pc is not None else ""
        return f"{self.reason}{where}{pc}" + (f": {self.detail}" if self.detail else "")


class VcpuLoop:
    """Runs one vCPU until the machine stops. `host` provides the buses, the board hooks and `end(result)`."""

    def __init__(self, vcpu, host):
        self.vcpu = vcpu
        self.host = host
        self.exits = 0
        self._warned: set = set()

    def run(self) -> None:
        vcpu, host = self.vcpu, self.host
        run, io, mmio, page = vcpu.run, vcpu.io, vcpu.mmio, vcpu.run_page
        run_loop, fd = lib.ckvm_run_loop, vcpu.fd
        pio = host.pio_bus
        codes = ffi.from_buffer(pio.c_table) if pio is not None else _NO_PORTS
        # Without a port bus, a port exit is no exit this board expects: `_other_exit` reports it.
        exit_io = EXIT_IO if pio is not None else None
        exits = ffi.new("uint64_t *")
        fast_uart = host.board.fast_uart
        uart_state, tx = (fast_uart.state, fast_uart.tx) if fast_uart is not None else (ffi.NULL, ffi.NULL)
        pio_lookup, mmio_lookup = (pio.lookup if pio is not None else None), host.mmio_bus.lookup
        isr = host.isr_table.table if host.isr_table is not None else ffi.NULL
        stopping = host.stopping
        try:
            while not stopping.is_set():
                rc = run_loop(fd, run, codes, exits, uart_state, tx, isr)
                if fast_uart is not None and tx.len:  # before any other exit, so output keeps its order
                    self._flush(fast_uart)
                if rc == 1:  # a line (or a full buffer) of console output, passed on above
                    continue
                if rc < 0:
                    if rc in (-errno.EINTR, -errno.EAGAIN):
                        run.immediate_exit = 0
                        if host.samples is not None:  # someone asked where the vCPUs are (Machine.sample_pcs)
                            host.samples[vcpu.index] = host.board.pc(vcpu)
                        if vcpu.index in host.ticks_due:
                            host.ticks_due.discard(vcpu.index)
                            host.board.vcpu_tick(vcpu)
                        continue
                    guest_fault = host.board.describe_run_error(vcpu, -rc)
                    if guest_fault is not None:  # the guest did something KVM cannot run, not a VMM failure
                        host.end(self._result(*guest_fault))
                    else:
                        host.end(VmResult("error", f"KVM_RUN failed: {errno.errorcode.get(-rc, -rc)}", vcpu.index))
                    return
                reason = run.exit_reason
                if reason == exit_io:
                    size, off = io.size, io.data_offset
                    hit = pio_lookup(io.port)
                    if size == 1 and io.count == 1 and io.direction == IO_OUT:  # the common case: outb
                        if hit is not None:
                            self._write(hit, 1, page[off], io.port)
                    elif io.direction == IO_OUT:
                        for i in range(io.count):
                            start = off + i * size
                            value = int.from_bytes(page[start:start + size], "little")
                            if hit is not None:
                                self._write(hit, size, value, io.port)
                    else:
                        for i in range(io.count):
                            start = off + i * size
                            value = self._read(hit, size, io.port) if hit is not None else (1 << (8 * size)) - 1
                            page[start:start + size] = value.to_bytes(size, "little")
                elif reason == EXIT_MMIO:
                    addr, size = mmio.phys_addr, mmio.len
                    hit = mmio_lookup(addr)
                    if hit is None:
                        if self._unmapped_mmio(addr, size, bool(mmio.is_write)):
                            return
                        continue
                    if mmio.is_write:
                        value = int.from_bytes(bytes(mmio.data[0:size]), "little")
                        self._write(hit, size, value, addr)
                    else:
                        mmio.data[0:size] = self._read(hit, size, addr).to_bytes(size, "little")
                elif not self._other_exit(reason):
                    return
        except Exception as exc:  # a bug of ours must end this VM with a report, not hang it
            log.exception("vCPU %d crashed", vcpu.index)
            host.end(VmResult("error", f"VMM error: {type(exc).__name__}: {exc}", vcpu.index))
        finally:
            self.exits = exits[0]

    def _flush(self, fast_uart) -> None:
        try:
            fast_uart.flush()
        except Exception:  # as for a device's own write: a console listener's failure must not end the VM
            self._warn(("emit",), "console output failed")

    def _read(self, hit, size: int, addr: int) -> int:
        offset, device = hit
        try:
            return device.read(offset, size) & ((1 << (8 * size)) - 1)
        except Exception:
            self._warn(("read", addr), "device %r failed a %d-byte read at 0x%x", device, size, addr)
            return (1 << (8 * size)) - 1

    def _write(self, hit, size: int, value: int, addr: int) -> None:
        offset, device = hit
        try:
            device.write(offset, size, value)
        except Exception:
            self._warn(("write", addr), "device %r failed a %d-byte write at 0x%x", device, size, addr)

    def _warn(self, key, fmt: str, *args) -> None:
        if key not in self._warned and len(self._warned) < 256:
            self._warned.add(key)
            log.warning(fmt, *args, exc_info=True)

    def _unmapped_mmio(self, addr: int, size: int, is_write: bool) -> bool:
        """Returns True when the access ended the VM (policy 'stop'); otherwise reads see all ones."""
        kind = "write to" if is_write else "read from"
        if self.host.unmapped_mmio == "stop":
            self.host.end(self._result("unmapped-mmio", f"{size}-byte {kind} unmapped MMIO 0x{addr:x}"))
            return True
        self._warn(("mmio", addr & ~0xFFF), "vCPU %d: %d-byte %s unmapped MMIO 0x%x ignored",
                   self.vcpu.index, size, kind, addr)
        if not is_write:
            self.vcpu.mmio.data[0:size] = b"\xff" * size
        return False

    def _result(self, reason: str, detail: str, pc: bool = True) -> VmResult:
        """How the VM ended on this vCPU, with its program counter as the board reads it (`pc`: when it says)."""
        board = self.host.board
        return VmResult(reason, detail, self.vcpu.index, board.pc(self.vcpu) if pc else None, board.pc_name)

    def _other_exit(self, reason: int) -> bool:
        """Handles the rare exits. Returns False when the vCPU must stop."""
        vcpu, host, run = self.vcpu, self.host, self.vcpu.run
        if reason == lib.KVM_EXIT_INTR:
            return True
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            if host.board.handle_internal_error(vcpu):
                return True
            host.end(self.describe_internal_error())
            return False
        if reason == lib.KVM_EXIT_DEBUG and host.board.handle_debug_exit(vcpu):
            return True
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            kind = _SYSTEM_EVENTS.get(run.system_event.type, f"system-event-{run.system_event.type}")
            host.end(self._result(kind, "requested by the guest", pc=False))
            return False
        if reason == lib.KVM_EXIT_HLT:
            host.end(self._result("halted", "the guest halted with no interrupt controller to wake it"))
            return False
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            failure = run.fail_entry.hardware_entry_failure_reason
            host.end(self._result("fail-entry", f"hardware entry failure 0x{failure:x}", pc=False))
            return False
        described = host.board.describe_exit(vcpu, reason)  # an exit of this architecture (x86: shutdown)
        if described is not None:
            host.end(self._result(*described))
            return False
        name = _EXIT_NAMES.get(reason, str(reason))
        host.end(self._result("unhandled-exit", f"KVM exit '{name}' ({reason})"))
        return False

    def describe_internal_error(self) -> VmResult:
        """An internal error as a report: suberror, program counter, and the instruction bytes KVM gave us."""
        vcpu, board = self.vcpu, self.host.board
        internal = vcpu.run.internal
        sub = internal.suberror
        detail = _SUBERRORS.get(sub, f"suberror {sub}")
        pc = board.pc(vcpu)
        if sub == lib.KVM_INTERNAL_ERROR_EMULATION:
            insn = board.instruction_bytes(vcpu)
            if insn:
                detail += ", instruction bytes " + insn.hex(" ")
        elif internal.ndata:
            detail += ", data " + " ".join(f"0x{internal.data[i]:x}" for i in range(min(internal.ndata, 16)))
        return VmResult("emulation-failure" if sub == lib.KVM_INTERNAL_ERROR_EMULATION else "internal-error",
                        detail, vcpu.index, pc, board.pc_name)
