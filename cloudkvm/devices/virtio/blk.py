"""virtio-blk (virtio 1.2 §5.2): one request queue over a disk backend.

The disk is anything with `size` (bytes), `pread(length, offset) -> bytes`, `pwrite(data, offset)` (`data` is a
bytes-like view of guest RAM, valid only during the call), `flush()`, and optionally `discard(length, offset)` and
`write_zeroes(length, offset)`. A disk may say what it supports with `supports_discard` / `supports_write_zeroes`
attributes (else having the method is enough), `read_only`, and `write_zeroes_may_unmap` (then a write-zeroes
request with the unmap flag calls `write_zeroes(length, offset, unmap=True)`).

A disk that can say where its bytes are (`runs`, storage/placement.py) gets the C data path (blk_native.py,
kvm/virtio_blk.c): reads and writes of known places are served there, everything else here, one request at a time,
in queue order.

A request that is wrong (out of range, a write to a read-only disk, a bad length) gets VIRTIO_BLK_S_IOERR, an
unknown type VIRTIO_BLK_S_UNSUPP, and the device goes on. A chain without a status byte cannot be completed:
the device then needs a reset.
"""
import contextlib
import struct

from ...errors import CloudkvmError, GuestMemoryError
from ...storage import vectored
from ...kvm.native import lib
from .blk_native import BlkDataPath
from .device import VirtioDevice
from .queue import BadChain, Chain, Virtqueue

VIRTIO_ID_BLOCK = 2     # §5.2.1

# §5.2.3 feature bits.
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# §5.2.6 request types and status values.
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1   # §5.2.6 struct virtio_blk_discard_write_zeroes flags.unmap

SECTOR = 512             # §5.2.6: the protocol's unit, whatever blk_size says
ID_BYTES = 20            # §5.2.6: GET_ID answers a NUL-padded string of up to 20 bytes

# Our limits (offered in the config space).
QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2  # data segments per request: with the header and the status a chain fills the queue, the
                         # longest §2.7.5.3.1 allows (QEMU's seg-max-adjust); Linux then sends 1 MiB in one or two
SIZE_MAX = 1 << 20       # bytes per segment; also the most we hand to the backend at once
BLK_SIZE = 512
MAX_DISCARD_SECTORS = 1 << 22          # 2 GiB per segment
MAX_DISCARD_SEG = 32
DISCARD_SECTOR_ALIGNMENT = 8           # 4 KiB
MAX_WRITE_ZEROES_SECTORS = 1 << 22
MAX_WRITE_ZEROES_SEG = 32

_HEADER = struct.Struct("<IIQ")                      # type, reserved, sector
_SEGMENT = struct.Struct("<QII")                     # sector, num_sectors, flags
# §5.2.4 struct virtio_blk_config, through the secure-erase fields (72 bytes).
_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3xIII")


def _supports(disk, what: str) -> bool:
    flag = getattr(disk, f"supports_{what}", None)
    if flag is not None:
        return bool(flag)
    return callable(getattr(disk, what, None))


def _skip(pieces: list[tuple[int, int]], skip: int) -> list[tuple[int, int]]:
    """`pieces` without their first `skip` bytes."""
    out = []
    for gpa, length in pieces:
        if skip >= length:
            skip -= length
            continue
        out.append((gpa + skip, length - skip))
        skip = 0
    return out


class _RequestError(Exception):
    """A request the device answers with an error status; `kind` names the problem for log-once."""

    def __init__(self, status: int, kind: str, why: str):
        super().__init__(why)
        self.status = status
        self.kind = kind
        self.why = why


class VirtioBlk(VirtioDevice):
    """A virtio block device over `disk` (see the module docstring for what a disk provides)."""

    device_id = VIRTIO_ID_BLOCK
    name = "virtio-blk"

    def __init__(self, disk, read_only: bool = False, serial: str = ""):
        try:
            serial_bytes = serial.encode("ascii")
        except UnicodeEncodeError:
            raise CloudkvmError(f"virtio-blk serial {serial!r} is not ASCII", "use up to 20 ASCII characters") from None
        if len(serial_bytes) > ID_BYTES:
            raise CloudkvmError(f"virtio-blk serial {serial!r} is longer than {ID_BYTES} bytes",
                                "use up to 20 ASCII characters")
        self.disk = disk
        self.read_only = bool(read_only or getattr(disk, "read_only", False))
        self.serial = serial_bytes.ljust(ID_BYTES, b"\0")
        self.capacity = int(disk.size) // SECTOR
        self.discard = not self.read_only and _supports(disk, "discard")
        self.write_zeroes = not self.read_only and _supports(disk, "write_zeroes")
        self.write_zeroes_may_unmap = self.write_zeroes and bool(getattr(disk, "write_zeroes_may_unmap", False))
        features = (1 << VIRTIO_BLK_F_SIZE_MAX | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_BLK_SIZE
                    | 1 << VIRTIO_BLK_F_FLUSH)
        if self.read_only:
            features |= 1 << VIRTIO_BLK_F_RO
        if self.discard:
            features |= 1 << VIRTIO_BLK_F_DISCARD
        if self.write_zeroes:
            features |= 1 << VIRTIO_BLK_F_WRITE_ZEROES
        config = _CONFIG.pack(
            self.capacity, SIZE_MAX, SEG_MAX,
            0, 0, 0,                     # geometry (not offered)
            BLK_SIZE,
            0, 0, 0, 0,                  # topology (not offered)
            0, 0, 1,                     # writeback (no CONFIG_WCE), unused0, num_queues
            MAX_DISCARD_SECTORS if self.discard else 0, MAX_DISCARD_SEG if self.discard else 0,
            DISCARD_SECTOR_ALIGNMENT if self.discard else 0,
            MAX_WRITE_ZEROES_SECTORS if self.write_zeroes else 0, MAX_WRITE_ZEROES_SEG if self.write_zeroes else 0,
            int(self.write_zeroes_may_unmap),
            0, 0, 0)                     # secure erase (not offered)
        super().__init__(features, (QUEUE_SIZE,), config)
        self.data_path = BlkDataPath(disk, self.capacity, self.read_only) if callable(getattr(disk, "runs", None)) \
            else None

    def close(self) -> None:
        """Stop the C path, then close the disk (the device owns it: metadata reaches the image when the VM ends).
        The C path's descriptors are closed under the transport's lock, which notifications served in C hold."""
        if self.data_path is not None:
            with self.transport.lock if self.transport is not None else contextlib.nullcontext():
                self.data_path.close()
        close = getattr(self.disk, "close", None)
        if callable(close):
            close()

    def native_serve(self, queue_index: int):
        """The request queue's C path for notifications served in C (notifier.py): (CKVM_SERVE_BLK, its state)."""
        if self.data_path is None:
            return None
        return lib.CKVM_SERVE_BLK, self.data_path.native

    # ---- queue processing --------------------------------------------------------------------------------------

    def process(self, queue_index: int, queue: Virtqueue) -> bool:
        """Every available request in order: as many as C serves, then the next one here, and so on."""
        added = False
        path = self.data_path
        while not self.needs_reset:
            if path is not None:
                code = path.serve(queue)
                added |= path.served > 0
                if code == lib.CKVM_BLK_IDLE:
                    break
                if code == lib.CKVM_BLK_MISS and path.fill(*path.miss):
                    continue
            try:
                chain = queue.pop()
            except BadChain as e:
                added |= self.bad_chain(queue, e)
                continue
            if chain is None:
                break
            used = self._request(queue, chain)
            if used is None:
                break
            queue.push(chain.head, used)
            added = True
        return added

    def bad_chain(self, queue: Virtqueue, exc: BadChain) -> bool:
        """A chain that failed validation: answer IOERR when its status byte is known and inside RAM."""
        self.warn_once("chain-" + exc.kind, "%s: bad descriptor chain: %s", self.name, exc.reason)
        if exc.head is not None and exc.segments and exc.segments[-1][2]:
            gpa, length, _ = exc.segments[-1]
            try:
                queue.memory.write(gpa + length - 1, bytes([VIRTIO_BLK_S_IOERR]))
            except GuestMemoryError:
                pass
            else:
                # used len counts bytes written from the first writable byte on (§2.7.8.2): only the status
                # byte was written, so 1 when it is the whole writable part, else an underestimate of 0.
                writable = sum(length for _, length, w in exc.segments if w)
                queue.push(exc.head, 1 if writable == 1 else 0)
                return True
        self.fail(f"cannot complete a request: {exc.reason}")
        return False

    def _request(self, queue: Virtqueue, chain: Chain) -> int | None:
        """Serve one request; the used length to report, or None when it cannot be completed (needs reset)."""
        mem = queue.memory
        segments = chain.segments
        if not segments or not segments[-1][2]:
            self.fail(f"request {chain.head} has no device-writable status byte")
            return None
        last_gpa, last_len, _ = segments[-1]
        status_gpa = last_gpa + last_len - 1
        readable = [(gpa, length) for gpa, length, w in segments if not w]
        writable = [(gpa, length) for gpa, length, w in segments if w]
        writable[-1] = (last_gpa, last_len - 1)
        writable = [p for p in writable if p[1]]
        written = 0
        try:
            if sum(length for _, length in readable) < _HEADER.size:
                raise _RequestError(VIRTIO_BLK_S_IOERR, "header", "request header shorter than 16 bytes")
            rtype, _, sector = _HEADER.unpack(self._gather(mem, readable, _HEADER.size))
            payload = _skip(readable, _HEADER.size)
            written = self._execute(mem, rtype, sector, payload, writable)
            status = VIRTIO_BLK_S_OK
        except _RequestError as e:
            self.warn_once("request-" + e.kind, "%s: request failed (%s): %s", self.name,
                           "IOERR" if e.status == VIRTIO_BLK_S_IOERR else "UNSUPP", e.why)
            status, written = e.status, 0
        except GuestMemoryError as e:   # cannot happen for a validated chain; never let it escape as a crash
            self.fail(f"request {chain.head}: {e}")
            return None
        except Exception as e:          # the backend failed: the guest sees an I/O error, the VMM goes on
            self.warn_once(f"backend-{type(e).__name__}", "%s: disk backend error: %r", self.name, e)
            status, written = VIRTIO_BLK_S_IOERR, 0
        mem.write(status_gpa, bytes([status]))
        # The used len counts bytes written from the first writable byte on (§2.7.8.2): data then status when the
        # data part was written whole, else only the prefix written (an underestimate is allowed, never more).
        return written + 1 if written == sum(n for _, n in writable) else written

    def _execute(self, mem, rtype: int, sector: int, payload: list[tuple[int, int]],
                 writable: list[tuple[int, int]]) -> int:
        """Run one request; returns the data bytes written to the guest. Raises _RequestError for a bad request."""
        if rtype == VIRTIO_BLK_T_IN:
            length = sum(n for _, n in writable)
            self._transfer(mem, writable, self._range(sector, length), vectored.read_into)
            return length
        if rtype == VIRTIO_BLK_T_OUT:
            if self.read_only:
                raise _RequestError(VIRTIO_BLK_S_IOERR, "read-only", "write to a read-only disk")
            length = sum(n for _, n in payload)
            offset = self._range(sector, length)
            try:
                self._transfer(mem, payload, offset, vectored.write_from)
            finally:
                self._forget(offset, length)
            return 0
        if rtype == VIRTIO_BLK_T_FLUSH:
            if not self.read_only:
                self.disk.flush()
            return 0
        if rtype == VIRTIO_BLK_T_GET_ID:
            remaining = ID_BYTES
            for gpa, n in writable:
                n = min(n, remaining)
                if n <= 0:
                    break
                mem.write(gpa, self.serial[ID_BYTES - remaining:ID_BYTES - remaining + n])
                remaining -= n
            return ID_BYTES - remaining
        if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            self._discard_or_zero(mem, rtype, payload)
            return 0
        raise _RequestError(VIRTIO_BLK_S_UNSUPP, "type", f"request type {rtype}")

    def _transfer(self, mem, pieces: list[tuple[int, int]], offset: int, move) -> None:
        """Move the data of a read or write between the disk and the guest's buffers in place (views of guest RAM,
        storage/vectored.py), SIZE_MAX bytes at a time: a backend that copies holds no more than that at once.
        A backend's exception is raised again from here without its traceback or chained exceptions, whose frames
        would keep views of guest RAM alive (and its mapping from being closed) for as long as anything keeps it."""
        cursor = vectored.Cursor(mem.views(pieces))
        failure = None
        try:
            while cursor.remaining:
                chunk = min(SIZE_MAX, cursor.remaining)
                move(self.disk, cursor.take(chunk), offset)
                offset += chunk
        except Exception as e:  # the backend failed: the request's status says so (see _request)
            failure = e
        cursor = None
        if failure is not None:
            failure.__traceback__ = failure.__context__ = failure.__cause__ = None
            raise failure

    def _discard_or_zero(self, mem, rtype: int, payload: list[tuple[int, int]]) -> None:
        zero = rtype == VIRTIO_BLK_T_WRITE_ZEROES
        if not (self.write_zeroes if zero else self.discard):
            raise _RequestError(VIRTIO_BLK_S_UNSUPP, "not-offered", f"request type {rtype} (not offered)")
        length = sum(n for _, n in payload)
        max_seg = MAX_WRITE_ZEROES_SEG if zero else MAX_DISCARD_SEG
        max_sectors = MAX_WRITE_ZEROES_SECTORS if zero else MAX_DISCARD_SECTORS
        if length == 0 or length % _SEGMENT.size or length // _SEGMENT.size > max_seg:
            raise _RequestError(VIRTIO_BLK_S_IOERR, "segments", f"{length} bytes of discard/write-zeroes segments")
        raw = self._gather(mem, payload, length)
        ranges = list(_SEGMENT.iter_unpack(raw))
        for _, _, flags in ranges:   # §5.2.6.2: UNSUPP for unknown flags, and for unmap on a discard
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (not zero and flags):
                raise _RequestError(VIRTIO_BLK_S_UNSUPP, "flags", f"discard/write-zeroes flags 0x{flags:x}")
        for sector, num, _ in ranges:
            if num > max_sectors:
                raise _RequestError(VIRTIO_BLK_S_IOERR, "segment-size",
                                    f"segment of {num} sectors exceeds {max_sectors}")
            self._range(sector, num * SECTOR)
        for sector, num, flags in ranges:
            if not num:
                continue
            self._forget(sector * SECTOR, num * SECTOR)
            if not zero:
                self.disk.discard(num * SECTOR, sector * SECTOR)
            elif flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP and self.write_zeroes_may_unmap:
                self.disk.write_zeroes(num * SECTOR, sector * SECTOR, unmap=True)
            else:
                self.disk.write_zeroes(num * SECTOR, sector * SECTOR)

    def _forget(self, offset: int, length: int) -> None:
        """The disk may place [offset, +length) elsewhere after a change made here: the C path asks it again."""
        if self.data_path is not None:
            self.data_path.forget(offset, length)

    def _range(self, sector: int, length: int) -> int:
        """The byte offset of `sector`, after checking [sector, +length) is whole sectors inside the disk."""
        if length % SECTOR:
            raise _RequestError(VIRTIO_BLK_S_IOERR, "length", f"data length {length} is not a multiple of {SECTOR}")
        if sector > self.capacity or length // SECTOR > self.capacity - sector:
            raise _RequestError(VIRTIO_BLK_S_IOERR, "range",
                                f"sectors {sector}+{length // SECTOR} beyond the capacity {self.capacity}")
        return sector * SECTOR

    @staticmethod
    def _gather(mem, pieces: list[tuple[int, int]], length: int) -> bytes:
        """The first `length` bytes of `pieces` (small reads only: headers and discard segments)."""
        out = bytearray()
        for gpa, n in pieces:
            take = min(n, length - len(out))
            if take <= 0:
                break
            out += mem.read(gpa, take)
        return bytes(out)
