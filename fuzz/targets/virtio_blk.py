"""Fuzz virtio-blk requests (cloudkvm/devices/virtio/blk.py, virtio 1.2 §5.2) through the virtio-mmio transport.

Input: a 4-byte header, then the first bytes of 16 KiB of guest RAM (the rest is zero). The driver side is fixed:
one queue with its descriptor table at 0x000, driver area at 0x100 and device area at 0x200 (room for 16
entries); everything in them, and every buffer, comes from the input. Header:
  byte 0  features the driver accepts: bit 0 INDIRECT_DESC, bit 1 EVENT_IDX, bit 7 refuse VERSION_1
  byte 1  the disk: bit 0 read-only, bit 1 has discard and write-zeroes, bit 2 write-zeroes may unmap,
          bit 3 the device (not the disk) is read-only
  byte 2  log2 of the queue size (0..4)
  byte 3  bits 0-3: the disk's n-th call fails with EIO (0: none), bits 4-5: extra notifications,
          bit 6: notify through the ioeventfd path (`queue_notify`) instead of the QueueNotify register,
          bit 7: the disk lives in a memfd and says where (`runs`), so reads and writes take the C data path
          (kvm/virtio_blk.c)

Documented outcomes: requests complete with VIRTIO_BLK_S_OK / IOERR / UNSUPP, a chain that cannot be completed
puts the device in DEVICE_NEEDS_RESET. Crashes: an exception escaping the device's process path (the transport
logs it: `no_swallowed_exceptions`), an exception of the device's own that it reports as a disk error (only the
disk's injected errors may become IOERR), or a disk call outside the disk, with a bad length, or modifying a
read-only disk (the device must check every request before it calls the disk); on the C path, any byte of a
read-only disk changed.
"""
import errno
import mmap
import os
import struct

from cloudkvm.devices.virtio import VirtioBlk, VirtioMmioTransport, mmio
from cloudkvm.devices.virtio.device import VIRTIO_F_VERSION_1
from cloudkvm.devices.virtio.queue import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC
from cloudkvm.kvm.memory import GuestMemory
from cloudkvm.storage.placement import Place

from .oracle import Crash, no_swallowed_exceptions, start_device

RAM = 0x4000
DESC, AVAIL, USED = 0x000, 0x100, 0x200
DISK_SIZE = 64 * 1024
INITIAL = bytes(range(256)) * (DISK_SIZE // 256)   # the C path's disk content at the start
HEADER = struct.Struct("<BBBB")
MAX_LEN = HEADER.size + RAM
TIMEOUT = 10
INSTRUMENT = ["cloudkvm"]
# not instrumented: the bounds-checked RAM accessor and the register file (their coverage says nothing about
# the requests; instrumenting them halves the rate)
UNINSTRUMENTED = ["cloudkvm.kvm.memory", "cloudkvm.devices.virtio.mmio"]

_memory: GuestMemory | None = None


def memory() -> GuestMemory:
    global _memory
    if _memory is None:
        _memory = GuestMemory([(0, RAM)])
    return _memory


class InjectedDiskError(OSError):
    """The error the fuzz disk raises on purpose (the guest must see VIRTIO_BLK_S_IOERR, nothing else)."""


class FuzzDisk:
    """A 64 KiB in-memory disk that records calls outside its contract (checked after the run) and can fail."""

    def __init__(self, read_only: bool, device_read_only: bool, trims: bool, may_unmap: bool, fail_at: int,
                 native: bool = False):
        self.size = DISK_SIZE
        self.fd = -1
        if native:
            self.fd = os.memfd_create("fuzzdisk", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, DISK_SIZE)
            self.data = mmap.mmap(self.fd, DISK_SIZE)
            self.data[:] = INITIAL       # not zeros: a write of zeros to a read-only disk shows too
            self.runs = self._runs
        else:
            self.data = bytearray(DISK_SIZE)
        self.read_only = read_only
        self.forbid_writes = read_only or device_read_only
        self.supports_discard = self.supports_write_zeroes = trims
        self.write_zeroes_may_unmap = may_unmap
        self.violations: list[str] = []
        self.calls = 0
        self.fail_at = fail_at

    def _call(self, op: str, length: int, offset: int, modifies: bool) -> None:
        self.calls += 1
        if not (isinstance(length, int) and isinstance(offset, int)) or offset < 0 or length < 0 \
                or offset + length > self.size:
            self.violations.append(f"{op}({length}, {offset}) outside the {self.size}-byte disk")
        if modifies and self.forbid_writes:
            self.violations.append(f"{op}({length}, {offset}) on a read-only disk or device")
        if self.calls == self.fail_at:
            raise InjectedDiskError(errno.EIO, "injected disk error")

    def _runs(self, offset: int, length: int):
        self._call("runs", length, offset, False)
        # writable unless the disk is read-only: the device must still refuse writes it made read-only itself
        return [(offset, length, Place(self.fd, offset, not self.read_only))]

    def close(self) -> None:
        if self.fd >= 0:
            if self.forbid_writes and self.data[:] != INITIAL:
                self.violations.append("the C path changed a read-only disk")
            self.data.close()
            os.close(self.fd)
            self.fd = -1

    def pread(self, length: int, offset: int) -> bytes:
        self._call("pread", length, offset, False)
        return bytes(self.data[offset:offset + length]).ljust(length, b"\0")   # whole: a violation is noted above

    def pwrite(self, data, offset: int) -> None:
        self._call("pwrite", len(data), offset, True)
        self.data[offset:offset + len(data)] = bytes(data)

    def flush(self) -> None:
        self._call("flush", 0, 0, False)

    def discard(self, length: int, offset: int) -> None:
        self._call("discard", length, offset, True)
        if not self.supports_discard:
            self.violations.append("discard on a disk that does not support it")

    def write_zeroes(self, length: int, offset: int, unmap: bool = False) -> None:
        self._call("write_zeroes", length, offset, True)
        if not self.supports_write_zeroes or (unmap and not self.write_zeroes_may_unmap):
            self.violations.append(f"write_zeroes(unmap={unmap}) the disk does not support")
        self.data[offset:offset + length] = bytes(length)


def one_input(data: bytes) -> str:
    if len(data) < HEADER.size:
        return "short"
    accept_bits, disk_bits, size_log2, run_bits = HEADER.unpack_from(data)
    mem = memory()
    mem.fill(0, RAM, 0)
    mem.write(0, data[HEADER.size:HEADER.size + RAM])
    disk = FuzzDisk(read_only=bool(disk_bits & 1), device_read_only=bool(disk_bits & 8), trims=bool(disk_bits & 2),
                    may_unmap=bool(disk_bits & 4), fail_at=run_bits & 0xF, native=bool(run_bits & 0x80))
    device = VirtioBlk(disk, read_only=bool(disk_bits & 8), serial="fuzz-serial")
    transport = VirtioMmioTransport(device, mem, lambda: None, name="virtio-blk-fuzz")
    accept = ~(1 << VIRTIO_F_INDIRECT_DESC | 1 << VIRTIO_F_EVENT_IDX | 1 << VIRTIO_F_VERSION_1)
    accept |= (accept_bits & 1) << VIRTIO_F_INDIRECT_DESC | (accept_bits >> 1 & 1) << VIRTIO_F_EVENT_IDX
    accept |= (0 if accept_bits & 0x80 else 1) << VIRTIO_F_VERSION_1
    size = 1 << (size_log2 % 5)
    with no_swallowed_exceptions(injected=InjectedDiskError):
        live = start_device(transport, accept, [(0, size, DESC, AVAIL, USED)])
        for _ in range(1 + (run_bits >> 4 & 3)):
            if run_bits & 0x40:
                transport.queue_notify(0)
            else:
                transport.write(mmio.QUEUE_NOTIFY, 4, 0)
        status = transport.read(mmio.STATUS, 4)
        transport.write(mmio.STATUS, 4, 0)
        if transport.read(mmio.STATUS, 4) != 0:
            raise Crash("the device did not reset when the driver wrote 0 to Status")
    device.close()                     # the C path's descriptors, then the disk (checked for read-only changes)
    if disk.violations:
        raise Crash("disk contract broken: " + "; ".join(disk.violations[:3]))
    if not live:
        return "not-live"
    return "needs-reset" if status & mmio.DEVICE_NEEDS_RESET else "served"
