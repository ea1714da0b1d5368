"""A small virtio-mmio *driver* for tests: lays out split queues in a GuestMemory and talks to the registers in the
order Linux's virtio_mmio + virtio core do (reset, ACKNOWLEDGE, DRIVER, features high/low, FEATURES_OK and
re-read, queue set-up, DRIVER_OK). Also a fake disk for virtio-blk.
"""
import mmap
import os
import struct
import weakref

from cloudkvm.devices.virtio import VirtioMmioTransport, mmio
from cloudkvm.devices.virtio.notifier import Notifier
from cloudkvm.storage.placement import Place
from cloudkvm.devices.virtio.queue import (VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
                                           avail_ring_size, used_ring_size)

MiB = 1 << 20
DESC = struct.Struct("<QIHH")


class FakeDisk:
    """An in-memory disk with the backend interface virtio-blk expects; records calls and contract violations.

    `native`: the bytes live in a memfd and `runs` names it, so virtio-blk serves reads and writes by its C path
    (kvm/virtio_blk.c) straight from that file, calling only `runs` here."""

    def __init__(self, size: int = 1 * MiB, discard: bool = True, write_zeroes: bool = True,
                 read_only: bool | None = None, may_unmap: bool = False, native: bool = False):
        self.size = size
        self.native = native
        if native:
            self.fd = os.memfd_create("fakedisk", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, size)
            self.data = mmap.mmap(self.fd, size)
            self.runs = self._runs       # only then: virtio-blk takes the C path for a disk that has `runs`
        else:
            self.data = bytearray(size)
        self.supports_discard = discard
        self.supports_write_zeroes = write_zeroes
        if read_only is not None:
            self.read_only = read_only
        self.write_zeroes_may_unmap = may_unmap
        self.calls: list[tuple] = []
        self.violations: list[str] = []
        self.fail_next: Exception | None = None

    def _check(self, op: str, length: int, offset: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            self.violations.append(f"{op} {length}@{offset} outside the disk")
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc

    def _runs(self, offset: int, length: int):
        self.calls.append(("runs", length, offset))
        self._check("runs", length, offset)
        return [(offset, length, Place(self.fd, offset, not getattr(self, "read_only", False)))]

    def close(self) -> None:
        if self.native and self.fd >= 0:
            self.data.close()
            os.close(self.fd)
            self.fd = -1

    def pread(self, length: int, offset: int) -> bytes:
        self.calls.append(("pread", length, offset))
        self._check("pread", length, offset)
        return bytes(self.data[offset:offset + length])

    def pwrite(self, data, offset: int) -> None:
        self.calls.append(("pwrite", len(data), offset))
        self._check("pwrite", len(data), offset)
        self.data[offset:offset + len(data)] = data

    def flush(self) -> None:
        self.calls.append(("flush",))
        self._check("flush", 0, 0)

    def discard(self, length: int, offset: int) -> None:
        self.calls.append(("discard", length, offset))
        self._check("discard", length, offset)
        self.data[offset:offset + length] = b"\xdd" * length   # contents after a discard are undefined

    def write_zeroes(self, length: int, offset: int, unmap: bool = False) -> None:
        self.calls.append(("write_zeroes", length, offset, unmap))
        self._check("write_zeroes", length, offset)
        self.data[offset:offset + length] = bytes(length)


class Allocator:
    """Bump allocation of guest memory; `mark()`/`release(mark)` free everything allocated since the mark."""

    def __init__(self, memory, start: int, end: int):
        self.memory = memory
        self.next = start
        self.end = end

    def alloc(self, size: int, align: int = 16, fill: int | None = 0) -> int:
        gpa = (self.next + align - 1) // align * align
        if gpa + size > self.end:
            raise MemoryError("test allocator exhausted")
        self.next = gpa + max(size, 1)
        if fill is not None and size:
            self.memory.fill(gpa, size, fill)
        return gpa

    def mark(self) -> int:
        return self.next

    def release(self, mark: int) -> None:
        self.next = mark


class DriverQueue:
    """The driver's side of one split virtqueue."""

    def __init__(self, driver: "MmioDriver", index: int, size: int, alloc: Allocator):
        self.driver = driver
        self.memory = driver.memory
        self.index = index
        self.size = size
        self.desc = alloc.alloc(16 * size, 16)
        self.avail = alloc.alloc(avail_ring_size(size), 2)
        self.used = alloc.alloc(used_ring_size(size), 4)
        self.alloc = alloc
        self.free = list(range(size))
        self.avail_idx = 0
        self.last_used = 0
        self.chains: dict[int, list[int]] = {}

    # raw structure access (also for the malicious tests)
    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0, table: int | None = None):
        self.memory.write((self.desc if table is None else table) + 16 * i, DESC.pack(addr, length, flags, nxt))

    def put_avail(self, head: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    def publish(self) -> None:
        self.memory.write_u16(self.avail + 2, self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.publish()

    def kick(self) -> None:
        self.driver.write(mmio.QUEUE_NOTIFY, self.index)

    def set_no_interrupt(self, on: bool) -> None:
        self.memory.write_u16(self.avail, 1 if on else 0)

    def set_used_event(self, value: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * self.size, value & 0xFFFF)

    @property
    def avail_event(self) -> int:
        return self.memory.read_u16(self.used + 4 + 8 * self.size)

    @property
    def used_idx(self) -> int:
        return self.memory.read_u16(self.used + 2)

    # the normal path
    def add(self, bufs: list[tuple[int, int, bool]], indirect: bool = False) -> int:
        """Place a chain of (gpa, length, is_write) buffers (direct, or one indirect table) in the avail ring."""
        if indirect:
            table = self.alloc.alloc(16 * len(bufs), 16)
            for i, (gpa, length, w) in enumerate(bufs):
                last = i == len(bufs) - 1
                self.write_desc(i, gpa, length, (VIRTQ_DESC_F_WRITE if w else 0) | (0 if last else VIRTQ_DESC_F_NEXT),
                                0 if last else i + 1, table=table)
            head = self.free.pop(0)
            self.write_desc(head, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT)
            self.chains[head] = [head]
        else:
            ids = [self.free.pop(0) for _ in bufs]
            for n, (i, (gpa, length, w)) in enumerate(zip(ids, bufs)):
                last = n == len(bufs) - 1
                self.write_desc(i, gpa, length, (VIRTQ_DESC_F_WRITE if w else 0) | (0 if last else VIRTQ_DESC_F_NEXT),
                                0 if last else ids[n + 1])
            head = ids[0]
            self.chains[head] = ids
        self.put_avail(head)
        return head

    def submit(self, bufs: list[tuple[int, int, bool]], indirect: bool = False, kick: bool = True) -> int:
        head = self.add(bufs, indirect)
        self.publish()
        if kick:
            self.kick()
        return head

    def get_used(self) -> list[tuple[int, int]]:
        """New used elements (id, len) since the last call; their descriptors return to the free list."""
        out = []
        idx = self.used_idx
        while self.last_used != idx:
            slot = self.last_used % self.size
            out.append(struct.unpack("<II", self.memory.read(self.used + 4 + 8 * slot, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        for head, _ in out:
            self.free.extend(self.chains.pop(head, []))
        return out


class MmioDriver:
    """Register-level driver for one VirtioMmioTransport."""

    def __init__(self, transport, memory, alloc: Allocator):
        self.t = transport
        self.memory = memory
        self.alloc = alloc
        self.queues: list[DriverQueue] = []
        self.on_notify = None       # QueueNotify writes go here instead, when set (Rig with a notifier)

    def read(self, offset: int) -> int:
        return self.t.read(offset, 4)

    def write(self, offset: int, value: int) -> None:
        if offset == mmio.QUEUE_NOTIFY and self.on_notify is not None:
            self.on_notify(value)
            return
        self.t.write(offset, 4, value)

    @property
    def status(self) -> int:
        return self.read(mmio.STATUS)

    def add_status(self, bits: int) -> None:
        self.write(mmio.STATUS, self.status | bits)

    def reset(self) -> None:
        self.write(mmio.STATUS, 0)
        assert self.status == 0
        self.queues = []

    def probe(self) -> int:
        assert self.read(mmio.MAGIC_VALUE) == 0x74726976
        assert self.read(mmio.VERSION) == 2
        device_id = self.read(mmio.DEVICE_ID)
        assert device_id != 0
        self.read(mmio.VENDOR_ID)
        return device_id

    def device_features(self) -> int:
        self.write(mmio.DEVICE_FEATURES_SEL, 1)
        high = self.read(mmio.DEVICE_FEATURES)
        self.write(mmio.DEVICE_FEATURES_SEL, 0)
        return high << 32 | self.read(mmio.DEVICE_FEATURES)

    def write_driver_features(self, features: int) -> None:
        self.write(mmio.DRIVER_FEATURES_SEL, 1)
        self.write(mmio.DRIVER_FEATURES, features >> 32 & 0xFFFFFFFF)
        self.write(mmio.DRIVER_FEATURES_SEL, 0)
        self.write(mmio.DRIVER_FEATURES, features & 0xFFFFFFFF)

    def negotiate(self, accept: int = ~0, force: int | None = None) -> tuple[int, bool]:
        """Reset, ACKNOWLEDGE, DRIVER, features (offered & accept, or `force` verbatim), FEATURES_OK, re-read."""
        self.probe()
        self.reset()
        self.add_status(mmio.ACKNOWLEDGE)
        self.add_status(mmio.DRIVER)
        features = self.device_features() & accept if force is None else force
        self.write_driver_features(features)
        self.add_status(mmio.FEATURES_OK)
        return features, bool(self.status & mmio.FEATURES_OK)

    def setup_queue(self, index: int, size: int | None = None) -> DriverQueue:
        self.write(mmio.QUEUE_SEL, index)
        assert self.read(mmio.QUEUE_READY) == 0
        max_size = self.read(mmio.QUEUE_NUM_MAX)
        assert max_size, f"queue {index} not available"
        size = size or max_size
        q = DriverQueue(self, index, size, self.alloc)
        self.write(mmio.QUEUE_NUM, size)
        self.write(mmio.QUEUE_DESC_LOW, q.desc & 0xFFFFFFFF)
        self.write(mmio.QUEUE_DESC_HIGH, q.desc >> 32)
        self.write(mmio.QUEUE_DRIVER_LOW, q.avail & 0xFFFFFFFF)
        self.write(mmio.QUEUE_DRIVER_HIGH, q.avail >> 32)
        self.write(mmio.QUEUE_DEVICE_LOW, q.used & 0xFFFFFFFF)
        self.write(mmio.QUEUE_DEVICE_HIGH, q.used >> 32)
        self.write(mmio.QUEUE_READY, 1)
        self.queues.append(q)
        return q

    def init(self, accept: int = ~0, queue_size: int | None = None) -> int:
        """The whole Linux-like initialisation; returns the negotiated features."""
        features, ok = self.negotiate(accept)
        assert ok, "FEATURES_OK refused"
        self.setup_queue(0, queue_size)
        self.add_status(mmio.DRIVER_OK)
        assert not self.status & mmio.DEVICE_NEEDS_RESET
        return features

    def config(self, offset: int, size: int) -> int:
        return self.t.read(mmio.CONFIG + offset, size)

    def config_u64(self, offset: int) -> int:
        """As Linux reads a 64-bit field: two 32-bit reads, repeated until ConfigGeneration is stable."""
        while True:
            before = self.read(mmio.CONFIG_GENERATION)
            value = self.config(offset, 4) | self.config(offset + 4, 4) << 32
            if self.read(mmio.CONFIG_GENERATION) == before:
                return value

    def ack_interrupt(self) -> int:
        status = self.read(mmio.INTERRUPT_STATUS)
        self.write(mmio.INTERRUPT_ACK, status)
        return status


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


class Rig:
    """One device behind a transport, its driver, and the interrupts it raised.

    With `notifier`, the transport has an irqfd and the queues the device serves in C take their notifications
    through devices/virtio/notifier.py's C entry (`ckvm_notify_serve`, what its thread runs on an ioeventfd), served
    synchronously here; what C hands on to Python is then notified to the transport, as the I/O thread would."""

    def __init__(self, memory, device, alloc_end: int | None = None, notifier: bool = False):
        self.memory = memory
        self.device = device
        self._irqs = 0
        self.irqfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) if notifier else None
        self.transport = VirtioMmioTransport(device, memory, self._irq, name=device.name, interrupt_fd=self.irqfd)
        self.alloc = Allocator(memory, 0x1000, alloc_end or memory.regions[-1].end)
        self.driver = MmioDriver(self.transport, memory, self.alloc)
        self.notifier = None
        self.native_queues: dict = {}
        if notifier:
            path = getattr(device, "data_path", None)
            if path is not None:
                path.fill(0, path.size)   # the map learnt up front: C serves from the first notification on
                getattr(device.disk, "calls", []).clear()   # (the rig's doing, not the test's)
            self.notifier = Notifier()
            for index in range(device.num_queues):
                # (the thread is never started; the queues for the I/O thread's wait are served here too)
                python_fd = self.notifier.add(self.irqfd, self.transport, index, io=self)
                if python_fd is not None:
                    self.native_queues[index] = (self.notifier.queues[-1], python_fd)
            self.driver.on_notify = self.notify
            # (the finalizer holds only the descriptors: holding the notifier would keep this rig alive through
            # the transport it refers to and the transport's interrupt callback)
            weakref.finalize(self, _close_fds, [self.irqfd, *self.notifier.fds])

    def serve_in_c(self, nq) -> bool:
        """As the I/O thread takes a queue into its wait in C (iothread.py): here served by `notify`."""
        return True

    def notify(self, index: int) -> None:
        """The guest notified queue `index`: through C when it serves the queue, else (and for what C hands on)
        the transport."""
        native = self.native_queues.get(index & 0xFFFF)
        if native is not None:
            nq, python_fd = native
            if not Notifier.serve(nq):
                return
            os.eventfd_read(python_fd)
        self.transport.write(mmio.QUEUE_NOTIFY, 4, index)

    def _irq(self) -> None:
        self._irqs += 1

    @property
    def irqs(self) -> int:
        """Interrupts raised so far, by Python and (through the irqfd) by C."""
        if self.irqfd is not None:
            try:
                self._irqs += os.eventfd_read(self.irqfd)
            except BlockingIOError:
                pass
        return self._irqs

    @irqs.setter
    def irqs(self, value: int) -> None:
        self._irqs = value

    @property
    def queue(self):
        return self.driver.queues[0]

    def blk(self, rtype: int, sector: int = 0, out: bytes = b"", in_len: int = 0, indirect: bool = False,
            status_fill: int = 0xFF, expect_used: bool = True):
        """Submit one virtio-blk request the way Linux lays it out; returns (status, data read, used len)."""
        mark = self.alloc.mark()
        try:
            hdr = self.alloc.alloc(16)
            self.memory.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
            bufs = [(hdr, 16, False)]
            if out:
                buf = self.alloc.alloc(len(out))
                self.memory.write(buf, out)
                bufs.append((buf, len(out), False))
            data = None
            if in_len:
                data = self.alloc.alloc(in_len, fill=0xEE)
                bufs.append((data, in_len, True))
            status = self.alloc.alloc(1, fill=status_fill)
            bufs.append((status, 1, True))
            head = self.queue.submit(bufs, indirect=indirect)
            used = self.queue.get_used()
            if not expect_used:
                return used
            assert [u[0] for u in used] == [head]
            return (self.memory.read(status, 1)[0], self.memory.read(data, in_len) if data else b"", used[0][1])
        finally:
            self.alloc.release(mark)
