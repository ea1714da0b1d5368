"""Turns a machine spec into a running VM: board + memory + devices + vCPU threads + I/O thread."""
import errno
import functools
import logging
import os
import signal
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

from . import hostquirks
from .boards import registry
from .boards.base import CpuOptions
from .console import ConsoleLog
from .devices.bus import Bus
from .devices.irq import IrqFd
from .devices.virtio.notifier import Notifier
from .errors import CloudkvmError
from .fsutil import read_bounded
from .iothread import IoThread
from .kvm.fastpath import IsrTable
from .kvm.memory import GuestMemory
from .kvm.native import lib
from .kvm.system import Kvm
from .kvm.vm import Vm
from .terminal import EscapeFilter
from .vcpu_loop import VcpuLoop, VmResult

log = logging.getLogger("cloudkvm.machine")

KICK_SIGNAL = signal.SIGRTMIN + 1
MiB = 1 << 20
MAX_KERNEL = 512 * MiB  # a kernel file larger than this is not one (checked before it is read)


@dataclass
class FlatBinary:
    """A raw binary loaded at `load_addr`; every vCPU starts at `entry` as the board's flat ABI says (test guests;
    x86: in 64-bit mode)."""

    path: Path
    load_addr: int = 0x100000
    entry: int | None = None


@dataclass
class LinuxBoot:
    """Direct kernel boot: a kernel the board boots (x86: bzImage or vmlinux ELF), an optional initrd, and the
    kernel command line (None: `console=` the board's serial console)."""

    kernel: Path
    initrd: Path | None = None
    cmdline: str | None = None


@dataclass
class MachineSpec:
    """What to build. Serial output goes to `console_fd` and to `console_out` (a writer such as
    logfile.CappedLog), each when given (neither: kept in memory only)."""

    payload: FlatBinary | LinuxBoot
    board: str = field(default_factory=registry.host_board_name)  # a boards.registry name: x86, virt
    cpus: int = 1
    memory: int = 256 * MiB
    cpu: CpuOptions = field(default_factory=CpuOptions)
    host_quirks: bool = True
    unmapped_mmio: str = "stop"  # "stop": end the VM with a report; "ignore": log once, reads see all ones
    console_fd: int | None = None
    console_out: object | None = None
    console_input_fd: int | None = None
    console_escape: bool = False  # Ctrl-A x on the console input stops the VM
    virtio: list = field(default_factory=list)  # VirtioDevice models, one virtio-mmio slot each, in this order


def check_payload(payload: FlatBinary | LinuxBoot, board: str | None = None) -> None:
    """Refuse a missing, empty or malformed payload before anything is created (one-line CloudkvmError); a kernel
    is checked by `board` (a registry name; default: this host's board)."""
    paths = [("kernel", payload.kernel), ("initrd", payload.initrd)] if isinstance(payload, LinuxBoot) \
        else [("payload", payload.path)]
    for what, path in paths:
        if path is None:
            continue
        try:
            st = os.stat(path)
        except OSError as exc:
            raise CloudkvmError(f"{path}: cannot read the {what}: {exc.strerror}", f"check the {what} path") from None
        if not stat.S_ISREG(st.st_mode):
            raise CloudkvmError(f"{path}: the {what} is not a regular file", f"name the {what} file itself")
        size = st.st_size
        if size == 0:
            raise CloudkvmError(f"{path}: the {what} file is empty", f"pass a real {what}")
    if isinstance(payload, LinuxBoot):
        info = registry.named(board) if board is not None else registry.host_board()
        try:
            data = read_bounded(payload.kernel, MAX_KERNEL, follow_symlinks=True)  # no FIFO swapped in since stat
        except OSError as exc:
            if exc.errno == errno.EFBIG:
                raise CloudkvmError(f"{payload.kernel}: over {MAX_KERNEL >> 20} MiB is too large for a kernel",
                                    "is this really a kernel?") from None
            raise CloudkvmError(f"{payload.kernel}: cannot read the kernel: {exc.strerror}", "check the kernel path") \
                from None
        info.check_kernel(data, str(payload.kernel))


class Machine:
    """One VM. Build it, optionally add devices, then `run()` until it ends; the result says how."""

    def __init__(self, spec: MachineSpec, kvm: Kvm | None = None):
        info = registry.named(spec.board)
        if spec.cpus < 1:
            raise CloudkvmError(f"cpus must be at least 1 (got {spec.cpus})", "set cpus: 1 or more")
        if spec.memory < 16 * MiB or spec.memory % MiB:
            raise CloudkvmError(f"memory: {spec.memory} bytes is not a whole number of MiB of at least 16 MiB",
                                "give e.g. 512M or 2G")
        if spec.unmapped_mmio not in ("stop", "ignore"):
            raise CloudkvmError(f"unmapped_mmio must be 'stop' or 'ignore' (got {spec.unmapped_mmio!r})")
        self.spec = spec
        info.check_host()
        board_class = info.board_class()
        check_payload(spec.payload, spec.board)
        if spec.cpus > board_class.max_cpus:
            raise CloudkvmError(f"cpus: the {spec.board} board has at most {board_class.max_cpus} vCPUs "
                                f"(got {spec.cpus})", f"use {board_class.max_cpus} or fewer")
        self.quirks = hostquirks.detect() if spec.host_quirks else hostquirks.HostQuirks()
        self.board = board_class(spec.cpus, spec.cpu, self.quirks)  # may refuse the spec: before /dev/kvm is open
        self.kvm = kvm or Kvm()
        if spec.cpus > self.kvm.max_vcpus():
            allowed = self.kvm.max_vcpus()
            if kvm is None:
                self.kvm.close()
            raise CloudkvmError(f"cpus: {spec.cpus} is more than this host's KVM allows ({allowed})")
        self.unmapped_mmio = spec.unmapped_mmio
        self.console = ConsoleLog(spec.console_fd, writer=spec.console_out)
        self.stopping = threading.Event()
        self.samples: dict | None = None  # filled by vCPU threads while sample_pcs() waits
        self.ticks_due: set[int] = set()  # vCPUs that owe the board a `vcpu_tick` (see _tick)
        self.isr_table: IsrTable | None = None  # the virtio-mmio interrupt registers C completes (built by run)
        self.notifier = Notifier()  # virtio notifications served in C (devices/virtio/notifier.py)
        self._notifier_replaced = False  # its thread ended by itself and the I/O thread took its queues over
        self.result: VmResult | None = None
        self._result_lock = threading.Lock()
        # Port I/O only where the board has it (x86); the C run loop gets every port as "return to Python" otherwise.
        self.pio_bus = Bus("pio", sink_ports=0x10000) if self.board.has_port_io else None
        self.mmio_bus = Bus("mmio")
        self.io = IoThread()
        self.memory: GuestMemory | None = None
        self.virtio: list = []  # VirtioMmioTransport, one per slot in use
        self._eventfds: list[int] = []
        self._irqfds: list[IrqFd] = []
        self.vcpus: list = []
        self._threads: list[threading.Thread] = []
        self.boot_info: dict = {}
        self._escape = EscapeFilter(lambda: self.end(VmResult("stopped", "Ctrl-A x on the console"))) \
            if spec.console_escape else None
        self.vm = Vm(self.kvm)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        hostquirks.announce(self.quirks)  # once the VM exists: a refused start says only why

    def _build(self) -> None:
        """The board's hooks in the order boards/base.py promises: interrupt controller, RAM, the board's devices,
        vCPUs (each initialised as created), the finished interrupt controller, virtio slots, the payload."""
        spec, board = self.spec, self.board
        board.create_irqchip(self.vm)
        try:
            self.memory = GuestMemory(board.memory_layout(spec.memory))
        except OSError as exc:
            raise CloudkvmError(f"memory: cannot reserve {spec.memory >> 20} MiB of guest RAM: {exc.strerror}",
                                "give the VM less memory") from None
        self.vm.add_memory(self.memory)
        board.create_devices(self.vm, self.pio_bus, self.mmio_bus, self)
        for index in range(spec.cpus):
            vcpu = self.vm.create_vcpu(index)
            self.vcpus.append(vcpu)
            vcpu.memory = self.memory
            board.init_vcpu(self.kvm, vcpu)
        board.finalize_irqchip(self.vm, self.vcpus)
        for device in spec.virtio:  # after the interrupt controller is finished: arm's KVM_IRQFD needs it
            self._attach_virtio(device)
        self.loops = [VcpuLoop(v, self) for v in self.vcpus]
        self._load_payload()

    def _attach_virtio(self, device) -> None:
        """A virtio-mmio slot for `device`: registers on the MMIO bus, one ioeventfd per queue (served by the
        I/O thread, so a notification costs the vCPU no exit to userspace), and an irqfd for its interrupt."""
        from .devices.virtio.mmio import NOTIFY_OFFSET, VirtioMmioTransport  # only VMs with virtio pay its import

        slot = self.board.virtio_slot(len(self.virtio))
        irq = IrqFd(self.vm, slot.irq)
        self._irqfds.append(irq)
        transport = VirtioMmioTransport(device, self.memory, irq.trigger, name=f"{device.name}@0x{slot.base:x}",
                                        interrupt_fd=irq.fd)
        self.mmio_bus.add(slot.base, slot.size, transport, transport.name)
        for queue in range(device.num_queues):
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._eventfds.append(efd)
            self.vm.ioeventfd(efd, slot.base + NOTIFY_OFFSET, 4, datamatch=queue)
            # a queue the device serves in C: its notifications go to the notifier's thread (or, for a transmit
            # queue into libslirp, the I/O thread's wait in C), and only those C cannot finish reach the I/O
            # thread's Python, through python_fd
            python_fd = self.notifier.add(efd, transport, queue, io=self.io)
            if python_fd is not None:
                self.io.add_reader(python_fd, functools.partial(self._handed_on, python_fd, transport, queue))
            else:
                self.io.add_reader(efd, functools.partial(_queue_kick, efd, transport, queue))
        self.virtio.append(transport)

    def _handed_on(self, python_fd: int, transport, queue: int) -> None:
        """I/O thread: a notification the notifier's C thread handed on. Should that thread have ended by itself,
        the I/O thread watches its ioeventfds from now on (it woke every queue on its way out)."""
        _queue_kick(python_fd, transport, queue)
        if self.notifier.failed and not self._notifier_replaced:
            self._notifier_replaced = True
            log.warning("the virtio notification thread stopped (%s); the I/O thread serves its queues",
                        os.strerror(self.notifier.failed) if self.notifier.failed > 0 else "unknown error")
            for efd, t, index in self.notifier.watched:
                self.io.add_reader(efd, functools.partial(_queue_kick, efd, t, index))

    def virtio_slots(self) -> list:
        return [self.board.virtio_slot(i) for i in range(len(self.virtio))]

    def _load_payload(self) -> None:
        payload = self.spec.payload
        if isinstance(payload, LinuxBoot):
            cmdline = payload.cmdline if payload.cmdline is not None else f"console={self.board.default_console}"
            self.boot_info = self.board.boot_linux(self.kvm, self.vcpus, self.memory, payload.kernel,
                                                   payload.initrd, cmdline, self.virtio_slots())
            return
        try:
            image = Path(payload.path).read_bytes()
        except OSError as exc:
            raise CloudkvmError(f"{payload.path}: cannot read the payload: {exc.strerror}") from None
        entry = payload.entry if payload.entry is not None else payload.load_addr
        self.board.boot_flat(self.kvm, self.vcpus, self.memory, image, payload.load_addr, entry)

    def add_mmio_device(self, base: int, size: int, device, label: str = "") -> None:
        self.mmio_bus.add(base, size, device, label)

    # --- called from vCPU / device threads --------------------------------------------------------------------
    def end(self, result: VmResult) -> None:
        """Record how the VM ended (the first report wins) and stop every vCPU."""
        with self._result_lock:
            if self.result is None:
                self.result = result
        self.stopping.set()
        self._kick_all()

    def sample_pcs(self, timeout: float = 2.0) -> dict[int, int | None]:
        """Where each running vCPU is right now: kick them out of KVM_RUN once and read its program counter (the
        board's `pc`; for diagnosis)."""
        import time

        self.samples = {}
        try:
            for vcpu, thread in zip(self.vcpus, self._threads):
                if thread.ident is not None and thread.is_alive():
                    vcpu.run.immediate_exit = 1
                    signal.pthread_kill(thread.ident, KICK_SIGNAL)
            deadline = time.monotonic() + timeout
            while len(self.samples) < len(self.vcpus) and time.monotonic() < deadline:
                time.sleep(0.01)
            return dict(self.samples)
        finally:
            self.samples = None

    def request_shutdown(self) -> bool:
        """Ask the guest to power off the board's way (board.request_shutdown). False when it has no way."""
        return self.board.request_shutdown(self.vm)

    def guest_power(self, reason: str, detail: str) -> None:
        self.end(VmResult(reason, detail))

    def _tick(self) -> None:
        """I/O thread: ask every vCPU thread to run the board's `vcpu_tick` at its next exit (kicked out now)."""
        if self.stopping.is_set():
            return
        self.ticks_due.update(vcpu.index for vcpu in self.vcpus)
        self._kick_all()
        self.io.call_later(self.board.tick_interval, self._tick)

    def _kick_all(self) -> None:
        for vcpu in self.vcpus:
            vcpu.run.immediate_exit = 1
        for thread in self._threads:
            if thread.ident is not None and thread.is_alive() and thread is not threading.current_thread():
                try:
                    signal.pthread_kill(thread.ident, KICK_SIGNAL)
                except ProcessLookupError:
                    pass

    # --- lifecycle --------------------------------------------------------------------------------------------
    def run(self, timeout: float | None = None) -> VmResult:
        """Run until the guest powers off, resets, faults, or `timeout` seconds pass."""
        lib.ckvm_install_kick_handler(KICK_SIGNAL)
        if self.spec.console_input_fd is not None:
            self.io.add_reader(self.spec.console_input_fd, self._console_input)
        self.io.start()
        self.isr_table = IsrTable(self.mmio_bus.c_isr_windows)  # every device is on the bus by now
        self.notifier.start()
        self._threads = [threading.Thread(target=loop.run, name=f"vcpu{loop.vcpu.index}", daemon=True)
                         for loop in self.loops]
        for thread in self._threads:
            thread.start()
        if self.board.tick_interval:
            self.io.call_later(self.board.tick_interval, self._tick)
        try:
            if not self.stopping.wait(timeout):
                self.end(VmResult("timeout", f"still running after {timeout:g} s"))
        except KeyboardInterrupt:
            self.end(VmResult("stopped", "interrupted by the user"))
        for thread in self._threads:
            while thread.is_alive():
                self._kick_all()
                thread.join(0.05)
        self.notifier.stop()
        self.io.stop()
        return self.result

    def _console_input(self) -> None:
        data = os.read(self.spec.console_input_fd, 4096)
        if not data:
            self.io.remove_reader(self.spec.console_input_fd)
            return
        if self._escape is not None:
            data = self._escape(data)
        if data:
            self.board.serial_input(data)

    def close(self) -> None:
        """Release everything the machine holds (also after a build that stopped half-way); one release that
        fails is logged and the others still happen."""
        steps = [self.notifier.close]  # first: its thread polls the ioeventfds and reaches devices and RAM
        steps += [functools.partial(os.close, efd) for efd in self._eventfds]
        steps += [irq.close for irq in self._irqfds]
        steps += [device.close for device in self.spec.virtio if hasattr(device, "close")]
        steps += [vcpu.close for vcpu in self.vcpus]
        steps += [self.board.close, self.vm.close]  # the board's KVM devices (a vGIC fd holds the VM) first
        steps += [self.memory.close] if self.memory is not None else []
        steps.append(self.kvm.close)
        for step in steps:
            try:
                step()
            except OSError as exc:
                log.warning("releasing the VM: %s", exc)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _queue_kick(efd: int, transport, queue: int) -> None:
    """I/O thread: a guest wrote QueueNotify (KVM signalled the ioeventfd); let the device process the queue."""
    try:
        os.eventfd_read(efd)
    except BlockingIOError:
        return
    transport.queue_notify(queue)


def run(spec: MachineSpec, timeout: float | None = None) -> VmResult:
    """Build the VM described by `spec`, run it to its end, release it, and say how it ended."""
    with Machine(spec) as machine:
        return machine.run(timeout)
