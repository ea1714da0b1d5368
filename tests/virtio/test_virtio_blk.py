"""virtio-blk requests against an in-memory disk: read, write, flush, get-id, discard, write-zeroes, read-only,
out-of-range, unsupported types, odd layouts and backend failures."""
import os
import struct

import pytest

from cloudkvm.devices.virtio import VirtioBlk, mmio
from cloudkvm.devices.virtio.blk import (VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_WRITE_ZEROES,
                                         VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
                                         VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_GET_LIFETIME,
                                         VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_SECURE_ERASE,
                                         VIRTIO_BLK_T_WRITE_ZEROES)
from cloudkvm.errors import CloudkvmError
from cloudkvm.storage.placement import Place
from virtio_driver import MiB, FakeDisk

OK, IOERR, UNSUPP = VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP


def seg(sector: int, num: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, num, flags)


def test_read_returns_disk_contents(blk, disk):
    disk.data[512 * 3:512 * 5] = os.urandom(1024)
    status, data, used = blk.blk(VIRTIO_BLK_T_IN, 3, in_len=1024)
    assert status == OK
    assert data == bytes(disk.data[1536:2560])
    assert used == 1024 + 1


def test_write_then_read_back(blk, disk):
    payload = os.urandom(4096)
    status, _, used = blk.blk(VIRTIO_BLK_T_OUT, 8, out=payload)
    assert (status, used) == (OK, 1)
    assert bytes(disk.data[4096:8192]) == payload
    assert blk.blk(VIRTIO_BLK_T_IN, 8, in_len=4096)[1] == payload


def test_last_sector_is_reachable_and_one_past_is_not(blk, disk):
    last = disk.size // 512 - 1
    assert blk.blk(VIRTIO_BLK_T_OUT, last, out=b"\x5a" * 512)[0] == OK
    assert disk.data[-512:] == b"\x5a" * 512
    assert blk.blk(VIRTIO_BLK_T_IN, last, in_len=1024)[0] == IOERR
    assert blk.blk(VIRTIO_BLK_T_OUT, last + 1, out=b"\x00" * 512)[0] == IOERR
    assert blk.blk(VIRTIO_BLK_T_IN, 2**64 - 1, in_len=512)[0] == IOERR
    assert blk.blk(VIRTIO_BLK_T_IN, 2**63, in_len=512)[0] == IOERR
    assert disk.data[-512:] == b"\x5a" * 512
    # the device goes on
    assert blk.blk(VIRTIO_BLK_T_IN, 0, in_len=512)[0] == OK
    assert not blk.driver.status & mmio.DEVICE_NEEDS_RESET


def test_data_not_a_multiple_of_512_is_an_io_error(blk, disk):
    assert blk.blk(VIRTIO_BLK_T_IN, 0, in_len=100)[0] == IOERR
    assert blk.blk(VIRTIO_BLK_T_OUT, 0, out=b"x" * 100)[0] == IOERR
    assert disk.data[:100] == bytes(100)


def test_a_failed_read_does_not_claim_data(blk, disk):
    status, data, used = blk.blk(VIRTIO_BLK_T_IN, disk.size // 512, in_len=512)
    assert status == IOERR and used == 0   # §2.7.8.2: len never claims bytes that were not written
    assert data == b"\xee" * 512           # the driver's buffer is untouched


def test_flush(blk, disk):
    assert blk.blk(VIRTIO_BLK_T_FLUSH)[:2] == (OK, b"")
    assert ("flush",) in disk.calls


def test_get_id_returns_the_nul_padded_serial(blk):
    status, data, used = blk.blk(VIRTIO_BLK_T_GET_ID, in_len=20)
    assert status == OK
    assert data == b"ckvm-serial-0001\0\0\0\0"
    assert used == 21


def test_get_id_with_a_20_byte_serial_has_no_terminator(make_rig, disk):
    rig = make_rig(VirtioBlk(disk, serial="A" * 20))
    rig.driver.init()
    assert rig.blk(VIRTIO_BLK_T_GET_ID, in_len=20)[1] == b"A" * 20


def test_get_id_into_a_short_buffer_writes_what_fits(blk):
    status, data, used = blk.blk(VIRTIO_BLK_T_GET_ID, in_len=4)
    assert (status, data, used) == (OK, b"ckvm", 5)


def test_get_id_into_a_long_buffer_reports_only_the_id(blk):
    status, data, used = blk.blk(VIRTIO_BLK_T_GET_ID, in_len=30)
    assert (status, data[:20], data[20:], used) == (OK, b"ckvm-serial-0001\0\0\0\0", b"\xee" * 10, 20)


def test_bad_serials_are_user_errors(disk):
    with pytest.raises(CloudkvmError):
        VirtioBlk(disk, serial="x" * 21)
    with pytest.raises(CloudkvmError):
        VirtioBlk(disk, serial="é")


def test_discard(blk, disk):
    disk.data[:] = b"\x11" * disk.size
    status, _, _ = blk.blk(VIRTIO_BLK_T_DISCARD, out=seg(8, 8) + seg(100, 1))
    assert status == OK
    assert ("discard", 4096, 4096) in disk.calls and ("discard", 512, 51200) in disk.calls


def test_discard_with_unmap_or_unknown_flags_is_unsupported(blk, disk):
    assert blk.blk(VIRTIO_BLK_T_DISCARD, out=seg(0, 8, flags=1))[0] == UNSUPP
    assert blk.blk(VIRTIO_BLK_T_WRITE_ZEROES, out=seg(0, 8, flags=2))[0] == UNSUPP
    assert not [c for c in disk.calls if c[0] in ("discard", "write_zeroes")]


def test_discard_out_of_range_or_malformed(blk, disk):
    cap = disk.size // 512
    assert blk.blk(VIRTIO_BLK_T_DISCARD, out=seg(cap - 1, 2))[0] == IOERR
    assert blk.blk(VIRTIO_BLK_T_DISCARD, out=seg(2**64 - 1, 2))[0] == IOERR
    assert blk.blk(VIRTIO_BLK_T_DISCARD, out=seg(0, 1)[:10])[0] == IOERR         # not a whole segment
    assert blk.blk(VIRTIO_BLK_T_DISCARD)[0] == IOERR                              # no segment
    assert blk.blk(VIRTIO_BLK_T_DISCARD, out=seg(0, 1) * 33)[0] == IOERR          # > max_discard_seg
    assert blk.blk(VIRTIO_BLK_T_DISCARD, out=seg(0, (1 << 22) + 1))[0] == IOERR   # > max_discard_sectors
    # all-or-nothing validation: a good segment before a bad one is not executed
    assert blk.blk(VIRTIO_BLK_T_DISCARD, out=seg(0, 1) + seg(cap, 1))[0] == IOERR
    assert not [c for c in disk.calls if c[0] == "discard"]


def test_write_zeroes(blk, disk):
    disk.data[:] = b"\x11" * disk.size
    assert blk.blk(VIRTIO_BLK_T_WRITE_ZEROES, out=seg(2, 3))[0] == OK
    assert disk.data[1024:2560] == bytes(1536)
    assert disk.data[1023] == 0x11 and disk.data[2560] == 0x11
    assert ("write_zeroes", 1536, 1024, False) in disk.calls


def test_write_zeroes_unmap_is_passed_only_when_the_disk_may_unmap(make_rig):
    disk = FakeDisk(MiB, may_unmap=True)
    rig = make_rig(VirtioBlk(disk))
    rig.driver.init()
    assert rig.driver.config(56, 1) == 1           # write_zeroes_may_unmap
    assert rig.blk(VIRTIO_BLK_T_WRITE_ZEROES, out=seg(0, 1, flags=1))[0] == OK
    assert disk.calls[-1] == ("write_zeroes", 512, 0, True)
    plain = FakeDisk(MiB)
    rig2 = make_rig(VirtioBlk(plain))
    rig2.driver.init()
    assert rig2.blk(VIRTIO_BLK_T_WRITE_ZEROES, out=seg(0, 1, flags=1))[0] == OK
    assert plain.calls[-1] == ("write_zeroes", 512, 0, False)


def test_discard_and_write_zeroes_are_offered_only_when_the_disk_supports_them(make_rig):
    class Minimal:
        size = MiB

        def pread(self, length, offset):
            return bytes(length)

        def pwrite(self, data, offset):
            pass

        def flush(self):
            pass

    rig = make_rig(VirtioBlk(Minimal()))
    features = rig.driver.device_features()
    assert not features >> VIRTIO_BLK_F_DISCARD & 1 and not features >> VIRTIO_BLK_F_WRITE_ZEROES & 1
    rig.driver.init()
    assert rig.driver.config(36, 4) == 0 and rig.driver.config(48, 4) == 0
    assert rig.blk(VIRTIO_BLK_T_DISCARD, out=seg(0, 1))[0] == UNSUPP
    assert rig.blk(VIRTIO_BLK_T_WRITE_ZEROES, out=seg(0, 1))[0] == UNSUPP
    no_discard = make_rig(VirtioBlk(FakeDisk(MiB, discard=False)))
    features = no_discard.driver.device_features()
    assert not features >> VIRTIO_BLK_F_DISCARD & 1 and features >> VIRTIO_BLK_F_WRITE_ZEROES & 1


@pytest.mark.parametrize("path", ["python", "c"])
@pytest.mark.parametrize("how", ["argument", "disk attribute"])
def test_read_only(make_rig, how, path):
    disk = FakeDisk(MiB, read_only=(how == "disk attribute"), native=path == "c")
    disk.data[:512] = b"\x42" * 512
    rig = make_rig(VirtioBlk(disk, read_only=(how == "argument")))
    features = rig.driver.device_features()
    assert features >> VIRTIO_BLK_F_RO & 1
    assert not features >> VIRTIO_BLK_F_DISCARD & 1 and not features >> VIRTIO_BLK_F_WRITE_ZEROES & 1
    rig.driver.init()
    assert rig.blk(VIRTIO_BLK_T_OUT, 0, out=b"\x00" * 512)[0] == IOERR
    assert rig.blk(VIRTIO_BLK_T_WRITE_ZEROES, out=seg(0, 1))[0] == UNSUPP
    assert rig.blk(VIRTIO_BLK_T_DISCARD, out=seg(0, 1))[0] == UNSUPP
    assert disk.data[:512] == b"\x42" * 512
    assert not [c for c in disk.calls if c[0] not in ("pread", "runs")]
    assert rig.blk(VIRTIO_BLK_T_IN, 0, in_len=512)[:2] == (OK, b"\x42" * 512)
    assert rig.blk(VIRTIO_BLK_T_FLUSH)[0] == OK


@pytest.mark.parametrize("rtype", [2, 3, 5, VIRTIO_BLK_T_GET_LIFETIME, VIRTIO_BLK_T_SECURE_ERASE, 0x80000000, 99])
def test_unknown_or_not_offered_types_are_unsupported(blk, rtype):
    assert blk.blk(rtype, in_len=512)[0] == UNSUPP
    assert blk.blk(VIRTIO_BLK_T_IN, 0, in_len=512)[0] == OK


def test_backend_errors_become_io_errors(make_rig):
    disk = FakeDisk(MiB)
    blk = make_rig(VirtioBlk(disk))
    blk.driver.init()
    disk.fail_next = OSError(5, "EIO")
    assert blk.blk(VIRTIO_BLK_T_IN, 0, in_len=512)[0] == IOERR
    disk.fail_next = RuntimeError("bug in a backend")
    assert blk.blk(VIRTIO_BLK_T_OUT, 0, out=b"\x01" * 512)[0] == IOERR
    disk.fail_next = OSError(28, "ENOSPC")
    assert blk.blk(VIRTIO_BLK_T_FLUSH)[0] == IOERR
    assert blk.blk(VIRTIO_BLK_T_IN, 0, in_len=512)[0] == OK
    assert not blk.driver.status & mmio.DEVICE_NEEDS_RESET


def test_a_disk_failing_to_locate_sends_the_request_to_blk_py(make_rig):
    disk = FakeDisk(MiB, native=True)
    disk.data[512:1024] = b"\x5a" * 512
    blk = make_rig(VirtioBlk(disk))
    blk.driver.init()
    disk.fail_next = OSError(5, "EIO")      # met by `runs`: C learns nothing, blk.py reads by pread
    status, data, _ = blk.blk(VIRTIO_BLK_T_IN, 1, in_len=512)
    assert (status, data) == (OK, b"\x5a" * 512)
    assert ("pread", 512, 512) in disk.calls
    disk.calls.clear()
    assert blk.blk(VIRTIO_BLK_T_IN, 1, in_len=512)[:2] == (OK, b"\x5a" * 512)
    assert {c[0] for c in disk.calls} == {"runs"}     # learnt now (with its neighbours): C reads it
    disk.close()


def test_a_failed_system_call_in_c_is_retried_by_blk_py(make_rig, tmp_path):
    """C writes through a descriptor it cannot write (EBADF): it hands the request to blk.py, which writes it."""
    disk = FakeDisk(MiB, native=True)
    read_only = os.open(tmp_path / "ro", os.O_RDONLY | os.O_CREAT)
    disk.runs = lambda offset, length: [(offset, length, Place(read_only, offset, True))]
    blk = make_rig(VirtioBlk(disk))
    blk.driver.init()
    assert blk.blk(VIRTIO_BLK_T_OUT, 2, out=b"\x33" * 1024)[0] == OK
    assert ("pwrite", 1024, 1024) in disk.calls
    assert disk.data[1024:2048] == b"\x33" * 1024
    blk.device.close()
    os.close(read_only)


def test_short_read_from_the_backend_is_an_io_error(make_rig):
    class Short(FakeDisk):
        def pread(self, length, offset):
            return super().pread(length, offset)[:-1]
    rig = make_rig(VirtioBlk(Short(MiB)))
    rig.driver.init()
    assert rig.blk(VIRTIO_BLK_T_IN, 0, in_len=512)[0] == IOERR


def test_header_shorter_than_16_bytes_is_an_io_error(blk):
    hdr = blk.alloc.alloc(8)
    st = blk.alloc.alloc(1, fill=0xFF)
    blk.queue.submit([(hdr, 8, False), (st, 1, True)])
    assert blk.queue.get_used()[0][1] == 1
    assert blk.memory.read(st, 1) == bytes([IOERR])


def test_any_layout_header_split_data_and_status_in_one_buffer(blk, disk):
    """§2.7.4: the device MUST NOT assume a particular arrangement of descriptors."""
    disk.data[512:1024] = os.urandom(512)
    h1, h2 = blk.alloc.alloc(5), blk.alloc.alloc(11)
    raw = struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 1)
    blk.memory.write(h1, raw[:5])
    blk.memory.write(h2, raw[5:])
    a, b = blk.alloc.alloc(100, fill=0), blk.alloc.alloc(413, fill=0xFF)   # data + status in the last buffer
    blk.queue.submit([(h1, 5, False), (h2, 11, False), (a, 100, True), (b, 413, True)])
    assert blk.queue.get_used()[0][1] == 513
    assert blk.memory.read(a, 100) + blk.memory.read(b, 412) == bytes(disk.data[512:1024])
    assert blk.memory.read(b + 412, 1) == bytes([OK])


def test_write_gathered_from_many_segments(blk, disk):
    parts = [os.urandom(512) for _ in range(8)]
    hdr = blk.alloc.alloc(16)
    blk.memory.write(hdr, struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 10))
    bufs = [(hdr, 16, False)]
    for p in parts:
        gpa = blk.alloc.alloc(512)
        blk.memory.write(gpa, p)
        bufs.append((gpa, 512, False))
    st = blk.alloc.alloc(1, fill=0xFF)
    bufs.append((st, 1, True))
    blk.queue.submit(bufs, indirect=True)
    blk.queue.get_used()
    assert blk.memory.read(st, 1) == bytes([OK])
    assert bytes(disk.data[5120:5120 + 4096]) == b"".join(parts)


def test_large_segments_are_handed_to_the_backend_in_1_mib_chunks(make_rig):
    disk = FakeDisk(4 * MiB)
    disk.data[:] = os.urandom(4 * MiB)
    rig = make_rig(VirtioBlk(disk))
    rig.driver.init()
    status, data, _ = rig.blk(VIRTIO_BLK_T_IN, 0, in_len=3 * MiB // 2)
    assert status == OK and data == bytes(disk.data[:3 * MiB // 2])
    assert [c for c in disk.calls if c[0] == "pread"] == [("pread", MiB, 0), ("pread", MiB // 2, MiB)]
    assert disk.violations == []


def test_many_requests_in_one_notification(blk, disk):
    q = blk.queue
    heads = []
    statuses = []
    for i in range(10):
        hdr = blk.alloc.alloc(16)
        blk.memory.write(hdr, struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, i))
        data = blk.alloc.alloc(512)
        blk.memory.write(data, bytes([i]) * 512)
        st = blk.alloc.alloc(1, fill=0xFF)
        heads.append(q.add([(hdr, 16, False), (data, 512, False), (st, 1, True)]))
        statuses.append(st)
    q.publish()
    q.kick()
    assert [u[0] for u in q.get_used()] == heads
    assert all(blk.memory.read(st, 1) == b"\0" for st in statuses)
    assert blk.irqs == 1
    assert all(disk.data[512 * i:512 * i + 512] == bytes([i]) * 512 for i in range(10))


def test_disk_size_not_a_multiple_of_512_rounds_down(make_rig):
    rig = make_rig(VirtioBlk(FakeDisk(MiB + 100)))
    assert rig.driver.config(0, 8) == MiB // 512
