"""The virtio-mmio transport, version 2 only (virtio 1.2 §4.2): registers, feature negotiation, status, interrupts.

A bus device (`read(offset, size)` / `write(offset, size, value)`) in a 0x200-byte (or larger) MMIO window.
vCPU threads access the registers while the I/O thread processes queues (ioeventfd notifications): one lock per
transport serialises both (a recursive mutex in C, `TransportState`, which notifications served in C hold as well:
notifier.py), and no exception from a device or a bad driver ever leaves `read`, `write` or `queue_notify`.
"""
import logging
from typing import Callable

from ...errors import GuestMemoryError
from ...kvm.memory import GuestMemory
from ...kvm.native import address, ffi as _ffi, quick as _quick
from .device import VIRTIO_F_VERSION_1, VirtioDevice
from .notifier import TransportState
from .queue import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, Virtqueue, VirtqueueError

log = logging.getLogger("cloudkvm.virtio")

# virtio 1.2 §4.2.2 MMIO device register layout (offsets from the base).
MAGIC_VALUE = 0x000
VERSION = 0x004
DEVICE_ID = 0x008
VENDOR_ID = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

NOTIFY_OFFSET = QUEUE_NOTIFY   # where a board puts a KVM ioeventfd (4-byte write, data = queue index)
MMIO_MIN_SIZE = 0x200          # §4.2.1's example window; config space beyond 0x100 must fit in the window

MAGIC = 0x74726976             # §4.2.2: "virt" little-endian
MMIO_VERSION = 2               # §4.2.2: non-legacy devices return 0x2
# §4.2.2 leaves VendorID to the implementation (Linux's virtio drivers match any vendor): "CKVM" little-endian.
VENDOR = int.from_bytes(b"CKVM", "little")

# virtio 1.2 §2.1 device status bits.
ACKNOWLEDGE = 1
DRIVER = 2
DRIVER_OK = 4
FEATURES_OK = 8
DEVICE_NEEDS_RESET = 64
FAILED = 128

# §4.2.2 InterruptStatus bits.
INT_VRING = 1      # used buffer notification
INT_CONFIG = 2     # configuration change notification

# Feature bits the transport adds to the device's own: what this queue implementation supports.
TRANSPORT_FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_INDIRECT_DESC) | (1 << VIRTIO_F_EVENT_IDX)


class VirtioMmioTransport:
    """virtio-mmio v2 registers in front of one `VirtioDevice`.

    `interrupt()` raises the device's interrupt (the board wires it to an irqfd: an edge). It is called every time
    a bit is set in InterruptStatus.

    InterruptStatus lives in `c_isr`, a C cell whose bits are set and acknowledged atomically: the C run loop
    answers the driver's InterruptStatus reads and InterruptACK writes from it without the lock (kvm/fastpath.py
    IsrTable; the bus lists the cell in `c_isr_windows`).
    """

    def __init__(self, device: VirtioDevice, memory: GuestMemory, interrupt: Callable[[], None], name: str = "",
                 interrupt_fd: int | None = None):
        self.device = device
        self.memory = memory
        self.interrupt = interrupt
        self.name = name or device.name
        self.offered = device.features | TRANSPORT_FEATURES
        self.queues = [Virtqueue(memory, size, i) for i, size in enumerate(device.queue_max_sizes)]
        self.config_generation = 0
        self.c_isr = _ffi.new("uint32_t *")
        self._isr_address = address(self.c_isr)
        # the lock, and what notifications served in C (notifier.py) read under it; `interrupt_fd` is the eventfd
        # `interrupt` writes (the slot's irqfd), which C may write itself
        self.state = TransportState(self.c_isr, interrupt_fd)
        self._lock = self.state
        self._logged: set[tuple] = set()
        device.on_config_change = self._config_changed
        device.transport = self  # devices with their own events (virtio-net receive) call back through it
        self._clear()

    def _clear(self) -> None:
        self.status = 0
        self.c_isr[0] = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.shm_sel = 0
        self.acked_features = 0

    @property
    def status(self) -> int:
        """Device Status (§2.1)."""
        return self._status

    @status.setter
    def status(self, value: int) -> None:
        self._status = value
        self.state.set_live(bool(value & DRIVER_OK and not value & DEVICE_NEEDS_RESET))

    @property
    def interrupt_status(self) -> int:
        """InterruptStatus (§4.2.2): INT_VRING and INT_CONFIG bits set and not yet acknowledged."""
        return self.c_isr[0]

    # ---- bus device ----------------------------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            try:
                if offset >= CONFIG:
                    return self._read_config(offset - CONFIG, size)
                if size != 4 or offset % 4:
                    self._once("bad-read", offset, size, msg="%s: %d-byte read at register 0x%x; reads as 0",
                               args=(size, offset))
                    return 0
                return self._read_register(offset)
            except Exception:
                self._log_exception("register read 0x%x" % offset)
                return 0

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            try:
                if offset >= CONFIG:
                    self._write_config(offset - CONFIG, size, value)
                elif size != 4 or offset % 4:
                    self._once("bad-write", offset, size, msg="%s: %d-byte write at register 0x%x; ignored",
                               args=(size, offset))
                else:
                    self._write_register(offset, value & 0xFFFFFFFF)
            except Exception:
                self._log_exception("register write 0x%x" % offset)

    # ---- registers -------------------------------------------------------------------------------------------------

    def _selected(self) -> Virtqueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _read_register(self, offset: int) -> int:
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION:
            return MMIO_VERSION
        if offset == DEVICE_ID:
            return self.device.device_id
        if offset == VENDOR_ID:
            return VENDOR
        if offset == DEVICE_FEATURES:
            if self.device_features_sel > 1:
                return 0
            return self.offered >> (32 * self.device_features_sel) & 0xFFFFFFFF
        if offset == QUEUE_NUM_MAX:
            q = self._selected()
            return q.max_size if q is not None else 0   # 0: no such queue
        if offset == QUEUE_READY:
            q = self._selected()
            return int(q is not None and q.ready)
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.status
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
            return 0xFFFFFFFF   # §4.2.2: no shared memory regions: length -1, base ~0
        if offset == CONFIG_GENERATION:
            return self.config_generation
        self._once("unknown-read", offset, msg="%s: read of write-only or unknown register 0x%x; reads as 0")
        return 0

    def _write_register(self, offset: int, value: int) -> None:
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == QUEUE_NOTIFY:
            self._notify(value & 0xFFFF)   # without VIRTIO_F_NOTIFICATION_DATA the value is the queue index
        elif offset == INTERRUPT_ACK:
            _quick.ckvm_isr_clear(self._isr_address, value)
        elif offset == STATUS:
            self._write_status(value & 0xFF)
        elif offset in (QUEUE_NUM, QUEUE_READY, QUEUE_DESC_LOW, QUEUE_DESC_HIGH, QUEUE_DRIVER_LOW,
                        QUEUE_DRIVER_HIGH, QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH):
            self._write_queue_register(offset, value)
        elif offset == SHM_SEL:
            self.shm_sel = value
        else:
            self._once("unknown-write", offset, msg="%s: write to read-only or unknown register 0x%x; ignored")

    def _write_driver_features(self, value: int) -> None:
        if self.status & FEATURES_OK:   # §3.1.1: no new feature bits after FEATURES_OK
            self._once("features-late", msg="%s: DriverFeatures written after FEATURES_OK; ignored")
            return
        sel = self.driver_features_sel
        if sel > 1:
            if value:
                self._once("features-sel", msg="%s: driver accepts features in word %d; none exist there", args=(sel,))
            return
        shift = 32 * sel
        self.driver_features = self.driver_features & ~(0xFFFFFFFF << shift) | value << shift

    def _write_queue_register(self, offset: int, value: int) -> None:
        q = self._selected()
        if q is None:
            self._once("no-queue", msg="%s: queue register write for missing queue %d; ignored", args=(self.queue_sel,))
            return
        if offset == QUEUE_READY:
            if value & 1 and not q.ready:
                self._enable_queue(q)
            elif not value & 1:
                q.ready = False
            return
        if q.ready:   # §4.2.2.2: not while QueueReady is set
            self._once("ready-write", offset, msg="%s: queue register 0x%x written while the queue is ready; ignored")
            return
        if offset == QUEUE_NUM:
            q.size = value   # checked when the queue is enabled
        elif offset == QUEUE_DESC_LOW:
            q.desc_table = q.desc_table & ~0xFFFFFFFF | value
        elif offset == QUEUE_DESC_HIGH:
            q.desc_table = q.desc_table & 0xFFFFFFFF | value << 32
        elif offset == QUEUE_DRIVER_LOW:
            q.avail_ring = q.avail_ring & ~0xFFFFFFFF | value
        elif offset == QUEUE_DRIVER_HIGH:
            q.avail_ring = q.avail_ring & 0xFFFFFFFF | value << 32
        elif offset == QUEUE_DEVICE_LOW:
            q.used_ring = q.used_ring & ~0xFFFFFFFF | value
        elif offset == QUEUE_DEVICE_HIGH:
            q.used_ring = q.used_ring & 0xFFFFFFFF | value << 32

    def _enable_queue(self, q: Virtqueue) -> None:
        q.event_idx = bool(self.acked_features >> VIRTIO_F_EVENT_IDX & 1)
        q.indirect = bool(self.acked_features >> VIRTIO_F_INDIRECT_DESC & 1)
        try:
            q.activate()
        except VirtqueueError as e:
            self._once("queue-" + e.kind, msg="%s: %s", args=(e.reason,))
            self._need_reset(f"queue {q.index} cannot be enabled")

    # ---- status and negotiation --------------------------------------------------------------------------------

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        old = self.status
        # The driver MUST NOT clear status bits (§2.1.1): bits accumulate until a reset. DEVICE_NEEDS_RESET is the
        # device's to set.
        new = value & ~DEVICE_NEEDS_RESET | old
        if new & FEATURES_OK and not old & FEATURES_OK:
            refusal = self._refuse_features()
            if refusal:
                self._once("features-refused", msg="%s: refusing FEATURES_OK: %s", args=(refusal,))
                new &= ~FEATURES_OK
            else:
                self.acked_features = self.driver_features
                self.device.acked_features = self.driver_features
        self.status = new
        if new & DRIVER_OK and not old & DRIVER_OK:
            self._activate()

    def _refuse_features(self) -> str:
        extra = self.driver_features & ~self.offered
        if extra:
            return f"driver accepted features not offered (0x{extra:x})"
        if not self.driver_features >> VIRTIO_F_VERSION_1 & 1:
            return "driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported)"
        return ""

    def _activate(self) -> None:
        if not self.status & FEATURES_OK:
            self._need_reset("DRIVER_OK without FEATURES_OK")
            return
        for q in self.queues:
            q.event_idx = bool(self.acked_features >> VIRTIO_F_EVENT_IDX & 1)
            q.indirect = bool(self.acked_features >> VIRTIO_F_INDIRECT_DESC & 1)
        try:
            self.device.activate(self.queues)
        except Exception:
            self._log_exception("activate")
            self._need_reset("activation failed")

    def reset(self) -> None:
        """Device reset (Status written 0, or by the board): status back to 0, queues and interrupts cleared (§2.4)."""
        with self._lock:
            try:
                self.device.reset()
            except Exception:
                self._log_exception("reset")
            for q in self.queues:
                q.reset()
            self._clear()

    def _need_reset(self, reason: str) -> None:
        """§2.1.2: set DEVICE_NEEDS_RESET and, once DRIVER_OK is set, send a configuration change notification."""
        if self.status & DEVICE_NEEDS_RESET:
            return
        log.warning("%s: %s; DEVICE_NEEDS_RESET", self.name, reason)
        self.status |= DEVICE_NEEDS_RESET
        if self.status & DRIVER_OK:
            self._raise_interrupt(INT_CONFIG)

    def _config_changed(self) -> None:
        with self._lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
            if self.status & DRIVER_OK:
                self._raise_interrupt(INT_CONFIG)

    def _raise_interrupt(self, bit: int) -> None:
        _quick.ckvm_isr_set(self._isr_address, bit)
        try:
            self.interrupt()
        except Exception:
            self._log_exception("interrupt")

    # ---- configuration space -------------------------------------------------------------------------------------

    def _config_ok(self, offset: int, size: int) -> bool:
        return size in (1, 2, 4, 8) and offset + size <= len(self.device.config)

    def _read_config(self, offset: int, size: int) -> int:
        if not self._config_ok(offset, size):
            self._once("config-read", offset, size, msg="%s: %d-byte config read at 0x%x is outside the config space",
                       args=(size, offset))
            return 0
        return self.device.read_config(offset, size) & ((1 << 8 * size) - 1)

    def _write_config(self, offset: int, size: int, value: int) -> None:
        if not self._config_ok(offset, size):
            self._once("config-write", offset, size,
                       msg="%s: %d-byte config write at 0x%x is outside the config space", args=(size, offset))
            return
        self.device.write_config(offset, size, value & ((1 << 8 * size) - 1))

    # ---- notifications ---------------------------------------------------------------------------------------------

    def queue_notify(self, index: int) -> None:
        """An available buffer notification for queue `index`: from a QueueNotify write or an ioeventfd."""
        with self._lock:
            try:
                self._notify(index)
            except Exception:
                self._log_exception("queue notify")

    def notify_all(self) -> None:
        """Process every ready queue (for one ioeventfd without datamatch covering all queues)."""
        with self._lock:
            for q in self.queues:
                try:
                    self._notify(q.index)
                except Exception:
                    self._log_exception("queue notify")

    @property
    def lock(self) -> TransportState:
        """The lock every register access and all queue work hold (re-entrant): a device's own C path that works
        on a queue outside `run_on_queue` (virtio-net's frames from libslirp) holds it too."""
        return self._lock

    def queue_live(self, index: int) -> bool:
        """Whether queue `index` takes device work now: DRIVER_OK, no DEVICE_NEEDS_RESET, the queue ready. (Read
        under `lock` for an answer that stays true.)"""
        return bool(self.status & DRIVER_OK and not self.status & DEVICE_NEEDS_RESET and index < len(self.queues)
                    and self.queues[index].ready)

    def signal_used(self, index: int) -> None:
        """The used-buffer interrupt for queue `index` if the driver wants one, after device work done outside
        `run_on_queue` (C that pushed used buffers under `lock`)."""
        with self._lock:
            if self.queue_live(index):
                self._interrupt_if_wanted(index)

    def run_on_queue(self, index: int, work):
        """Device-initiated work on queue `index` (e.g. a received frame): `work(queue)` runs under the transport's
        lock with the same error handling and interrupt decision as a notification. Returns its result, or None
        when the queue is not live (quietly: devices ask before the driver is ready)."""
        with self._lock:
            if not self.queue_live(index):
                return None
            try:
                return self._run(index, work)
            except Exception:
                self._log_exception("device work")
                return None

    def _notify(self, index: int) -> None:
        if not self.status & DRIVER_OK or self.status & DEVICE_NEEDS_RESET:
            self._once("notify-inactive", msg="%s: notification while the device is not live; ignored")
            return
        if index >= len(self.queues):
            self._once("notify-index", msg="%s: notification for missing queue %d; ignored", args=(index,))
            return
        if not self.queues[index].ready:
            self._once("notify-not-ready", index, msg="%s: notification for queue %d, which is not ready; ignored")
            return
        self._run(index, lambda q: self.device.process(index, q))

    def _run(self, index: int, work):
        """`work(queue)`, then the used-buffer interrupt if the driver wants one; errors put the device in
        NEEDS_RESET. Returns what `work` returned (None when it failed)."""
        q = self.queues[index]
        result = None
        try:
            result = work(q)
        except VirtqueueError as e:
            self._once("queue-" + e.kind, msg="%s: %s", args=(e.reason,))
            self._need_reset(f"queue {index} is broken")
        except GuestMemoryError as e:
            self._once("memory", msg="%s: guest memory access failed: %s", args=(e,))
            self._need_reset(f"queue {index} referenced memory outside guest RAM")
        except Exception:
            self._log_exception(f"processing queue {index}")
            self._need_reset(f"device error on queue {index}")
        self._interrupt_if_wanted(index)
        return result

    def _interrupt_if_wanted(self, index: int) -> None:
        try:
            if self.queues[index].needs_interrupt():
                self._raise_interrupt(INT_VRING)
        except GuestMemoryError:
            self._need_reset(f"queue {index} rings are outside guest RAM")
        if self.device.needs_reset:
            self._need_reset("device error")

    # ---- logging ---------------------------------------------------------------------------------------------------

    def _once(self, kind: str, *key, msg: str, args: tuple | None = None) -> None:
        """Log a guest-caused oddity once per (kind, key); later repeats go to DEBUG."""
        level = logging.DEBUG if (kind, *key) in self._logged else logging.WARNING
        if len(self._logged) < 1024:
            self._logged.add((kind, *key))
        log.log(level, msg, self.name, *(args if args is not None else key))

    def _log_exception(self, what: str) -> None:
        if ("exception", what) in self._logged:
            log.debug("%s: %s failed", self.name, what, exc_info=True)
        else:
            self._logged.add(("exception", what))
            log.exception("%s: %s failed", self.name, what)
