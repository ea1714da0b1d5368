"""A malicious or broken driver: every bad descriptor, ring or register value is refused and logged, no exception
leaves the transport, and nothing is written anywhere but the used ring and the request's own writable buffers."""
import logging
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cloudkvm.devices.virtio import VirtioBlk, VirtioRng, mmio
from cloudkvm.devices.virtio.blk import (VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_DISCARD,
                                         VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
                                         VIRTIO_BLK_T_WRITE_ZEROES)
from cloudkvm.devices.virtio.queue import (VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTQ_DESC_F_INDIRECT,
                                           VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE)
from cloudkvm.kvm.memory import GuestMemory
from virtio_fixtures import assert_only_changed, snapshot, used_area
from virtio_driver import MiB, FakeDisk, Rig

W, N, I = VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_INDIRECT


def header(rig, rtype, sector=0) -> int:
    hdr = rig.alloc.alloc(16)
    rig.memory.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
    return hdr


def needs_reset(rig) -> bool:
    return bool(rig.driver.status & mmio.DEVICE_NEEDS_RESET)


def assert_needs_reset_then_recovers(rig, caplog, expected: str):
    assert needs_reset(rig)
    assert rig.driver.read(mmio.INTERRUPT_STATUS) & mmio.INT_CONFIG   # §2.1.2: config change notification
    assert any(expected in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    q = rig.queue
    # inert until reset: more notifications consume nothing
    used = q.used_idx
    q.kick()
    rig.transport.queue_notify(0)
    assert q.used_idx == used
    # a reset and a fresh initialisation bring it back
    rig.driver.init()
    assert not needs_reset(rig)
    if isinstance(rig.device, VirtioBlk):
        assert rig.blk(VIRTIO_BLK_T_GET_ID, in_len=20)[0] == VIRTIO_BLK_S_OK


# ---- buffers outside RAM: the request fails, the device goes on ------------------------------------------------------

@pytest.mark.parametrize("addr, length", [
    (4 * MiB, 512),                 # just past RAM
    (4 * MiB - 256, 512),           # straddles the end of RAM
    (2**64 - 256, 512),             # addr + len overflows 64 bits
    (0x10000, 2**32 - 1),           # a 4 GiB length
    (2**63, 512),
])
@pytest.mark.parametrize("rtype", [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT])
def test_data_buffer_outside_ram_is_an_io_error(blk, disk, caplog, addr, length, rtype):
    q = blk.queue
    hdr = header(blk, rtype)
    st_ = blk.alloc.alloc(1, fill=0xFF)
    q.submit([(hdr, 16, False), (addr, length, rtype == VIRTIO_BLK_T_IN), (st_, 1, True)], kick=False)
    before = snapshot(blk.memory)
    q.kick()
    # used len: 1 when the status byte is the only writable byte, else 0 (never claims unwritten data)
    assert q.get_used()[0][1] == (0 if rtype == VIRTIO_BLK_T_IN else 1)
    assert blk.memory.read(st_, 1) == bytes([VIRTIO_BLK_S_IOERR])
    assert_only_changed(blk.memory, before, [used_area(q), (st_, 1)])
    assert not needs_reset(blk)
    assert not [c for c in disk.calls if c[0] == "pwrite"]
    assert "bad descriptor chain" in caplog.text   # outside guest RAM, or more than 2^32 bytes


def test_readable_after_writable_is_an_io_error(blk, disk, caplog):
    q = blk.queue
    hdr = header(blk, VIRTIO_BLK_T_OUT)
    w, r, st_ = blk.alloc.alloc(512), blk.alloc.alloc(512), blk.alloc.alloc(1, fill=0xFF)
    q.submit([(hdr, 16, False), (w, 512, True), (r, 512, False), (st_, 1, True)])
    assert q.get_used()[0][1] == 0
    assert blk.memory.read(st_, 1) == bytes([VIRTIO_BLK_S_IOERR])
    assert disk.calls == []
    assert "device-readable descriptor follows" in caplog.text


def test_status_byte_outside_ram_cannot_be_completed(blk, caplog):
    q = blk.queue
    hdr = header(blk, VIRTIO_BLK_T_IN)
    data = blk.alloc.alloc(512)
    q.submit([(hdr, 16, False), (data, 512, True), (4 * MiB + 10, 1, True)], kick=False)
    before = snapshot(blk.memory)
    q.kick()
    assert q.get_used() == []
    assert_only_changed(blk.memory, before, [used_area(q)])
    assert_needs_reset_then_recovers(blk, caplog, "outside guest RAM")


def test_request_without_any_writable_byte_needs_reset(blk, disk, caplog):
    q = blk.queue
    hdr = header(blk, VIRTIO_BLK_T_OUT)
    data = blk.alloc.alloc(512)
    q.submit([(hdr, 16, False), (data, 512, False)])
    assert q.get_used() == []
    assert disk.calls == []
    assert_needs_reset_then_recovers(blk, caplog, "no device-writable status byte")


# ---- structurally broken chains: the device needs a reset ------------------------------------------------------------

def raw_chain(rig, descs: list[tuple[int, int, int, int]], head: int = 0):
    """Write descriptors verbatim at indices 0.. of the descriptor table, make `head` available, kick."""
    q = rig.queue
    for i, d in enumerate(descs):
        q.write_desc(i, *d)
    q.put_avail(head)
    q.publish()
    q.kick()


def test_next_index_out_of_range(blk, caplog):
    hdr = header(blk, VIRTIO_BLK_T_GET_ID)
    raw_chain(blk, [(hdr, 16, N, 300)])
    assert_needs_reset_then_recovers(blk, caplog, "next index 300 is outside the descriptor table")


@pytest.mark.parametrize("loop", [[(0, 1), (1, 0)], [(0, 0)], [(0, 1), (1, 2), (2, 1)]])
def test_descriptor_loops(blk, caplog, loop):
    buf = blk.alloc.alloc(16)
    raw_chain(blk, [(buf, 16, N, nxt) for _, nxt in loop])
    assert blk.queue.get_used() == []
    assert_needs_reset_then_recovers(blk, caplog, "a loop")


def test_loop_inside_an_indirect_table(blk, caplog):
    buf = blk.alloc.alloc(16)
    table = blk.alloc.alloc(64)
    blk.queue.write_desc(0, buf, 16, N, 1, table=table)
    blk.queue.write_desc(1, buf, 16, N, 0, table=table)
    raw_chain(blk, [(table, 64, I, 0)])
    assert_needs_reset_then_recovers(blk, caplog, "a loop")


def test_chain_longer_than_the_queue(make_rig, disk, caplog):
    rig = make_rig(VirtioBlk(disk))
    rig.driver.init(queue_size=4)
    table = rig.alloc.alloc(16 * 5)
    hdr = header(rig, VIRTIO_BLK_T_GET_ID)
    for i in range(5):
        rig.queue.write_desc(i, hdr if i == 0 else rig.alloc.alloc(8), 16 if i == 0 else 8,
                             (N if i < 4 else 0) | (W if i else 0), i + 1, table=table)
    raw_chain(rig, [(table, 16 * 5, I, 0)])
    assert_needs_reset_then_recovers(rig, caplog, "more than 4 descriptors")


def test_indirect_inside_indirect(blk, caplog):
    inner = blk.alloc.alloc(16)
    outer = blk.alloc.alloc(16)
    blk.queue.write_desc(0, blk.alloc.alloc(16), 16, 0, table=inner)
    blk.queue.write_desc(0, inner, 16, I, table=outer)
    raw_chain(blk, [(outer, 16, I, 0)])
    assert_needs_reset_then_recovers(blk, caplog, "indirect descriptor inside an indirect table")


def test_indirect_with_next(blk, caplog):
    table = blk.alloc.alloc(16)
    blk.queue.write_desc(0, blk.alloc.alloc(16), 16, 0, table=table)
    raw_chain(blk, [(table, 16, I | N, 1), (blk.alloc.alloc(1), 1, W, 0)])
    assert_needs_reset_then_recovers(blk, caplog, "indirect descriptor with the NEXT flag")


@pytest.mark.parametrize("addr, length, expected", [
    (4 * MiB - 16, 32, "outside guest RAM"),
    (2**64 - 16, 32, "outside guest RAM"),
    (0x20000, 0, "not a non-zero multiple of 16"),
    (0x20000, 24, "not a non-zero multiple of 16"),
])
def test_bad_indirect_tables(blk, caplog, addr, length, expected):
    raw_chain(blk, [(addr, length, I, 0)])
    assert_needs_reset_then_recovers(blk, caplog, expected)


def test_head_index_out_of_range(blk, caplog):
    raw_chain(blk, [], head=256)
    assert_needs_reset_then_recovers(blk, caplog, "head 256 is out of range")


@pytest.mark.parametrize("jump", [257, 1000, 0xFFFF])
def test_avail_idx_moving_more_than_the_queue_size(blk, disk, caplog, jump):
    q = blk.queue
    q.set_avail_idx(jump)
    before = snapshot(blk.memory)
    q.kick()
    assert disk.calls == []
    assert_only_changed(blk.memory, before, [used_area(q)])
    assert_needs_reset_then_recovers(blk, caplog, "more than the queue size")


def test_avail_idx_moving_exactly_the_queue_size_is_fine(make_rig, disk):
    rig = make_rig(VirtioBlk(disk))
    rig.driver.init(queue_size=4)
    q = rig.queue
    statuses = []
    for _ in range(2):
        hdr = header(rig, VIRTIO_BLK_T_GET_ID)
        st_ = rig.alloc.alloc(21)
        statuses.append(st_)
        q.add([(hdr, 16, False), (st_, 21, True)])
    # reuse the same two chains for the other two slots: 4 available entries at once
    q.put_avail(0)
    q.put_avail(2)
    q.publish()
    q.kick()
    assert len(q.get_used()) == 4
    assert not needs_reset(rig)


# ---- queue configuration ---------------------------------------------------------------------------------------------

def setup_raw_queue(rig, size, desc, avail, used):
    d = rig.driver
    d.write(mmio.QUEUE_SEL, 0)
    d.write(mmio.QUEUE_NUM, size)
    for low, value in ((mmio.QUEUE_DESC_LOW, desc), (mmio.QUEUE_DRIVER_LOW, avail), (mmio.QUEUE_DEVICE_LOW, used)):
        d.write(low, value & 0xFFFFFFFF)
        d.write(low + 4, value >> 32)
    d.write(mmio.QUEUE_READY, 1)


@pytest.mark.parametrize("size, desc, avail, used", [
    (256, 4 * MiB - 16, 0x10000, 0x20000),       # descriptor table runs past RAM
    (256, 0x10000, 4 * MiB - 100, 0x20000),      # avail ring runs past RAM
    (256, 0x10000, 0x20000, 4 * MiB - 100),      # used ring runs past RAM
    (256, 1 << 40, 0x20000, 0x30000),            # far outside
    (256, 0x10008, 0x20000, 0x30000),            # misaligned descriptor table
    (256, 0x10000, 0x20001, 0x30000),            # misaligned avail ring
    (256, 0x10000, 0x20000, 0x30002),            # misaligned used ring
    (100, 0x10000, 0x20000, 0x30000),            # not a power of two
    (512, 0x10000, 0x20000, 0x30000),            # more than QueueNumMax
    (0, 0x10000, 0x20000, 0x30000),
    (1 << 16, 0x10000, 0x20000, 0x30000),
])
def test_bad_queue_configuration_is_refused(make_rig, disk, caplog, size, desc, avail, used):
    rig = make_rig(VirtioBlk(disk))
    d = rig.driver
    d.negotiate()
    before = snapshot(rig.memory)   # the driver wrote nothing in RAM: nothing may change
    setup_raw_queue(rig, size, desc, avail, used)
    assert d.read(mmio.QUEUE_READY) == 0
    d.add_status(mmio.DRIVER_OK)
    assert d.status & mmio.DEVICE_NEEDS_RESET
    d.write(mmio.QUEUE_NOTIFY, 0)
    assert_only_changed(rig.memory, before, [])
    assert "cannot be enabled" in caplog.text
    assert disk.calls == []
    # and the device can be set up properly after a reset
    d.init()
    assert rig.blk(VIRTIO_BLK_T_GET_ID, in_len=20)[0] == VIRTIO_BLK_S_OK


def test_queue_registers_for_a_missing_queue_are_ignored(blk):
    d = blk.driver
    d.write(mmio.QUEUE_SEL, 0xFFFFFFFF)
    d.write(mmio.QUEUE_NUM, 4)
    d.write(mmio.QUEUE_READY, 1)
    assert d.read(mmio.QUEUE_NUM_MAX) == 0 and d.read(mmio.QUEUE_READY) == 0
    d.write(mmio.QUEUE_NOTIFY, 0xFFFF)
    blk.transport.queue_notify(2**40)
    assert not needs_reset(blk)


def test_many_bad_requests_are_logged_once_per_kind(blk, caplog):
    for _ in range(50):
        assert blk.blk(VIRTIO_BLK_T_IN, 2**40, in_len=512)[0] == VIRTIO_BLK_S_IOERR
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "beyond the capacity" in r.getMessage()]
    assert len(warnings) == 1


def test_discard_segments_read_from_an_out_of_ram_buffer(blk, disk):
    q = blk.queue
    hdr = header(blk, VIRTIO_BLK_T_DISCARD)
    st_ = blk.alloc.alloc(1, fill=0xFF)
    q.submit([(hdr, 16, False), (4 * MiB - 8, 16, False), (st_, 1, True)])
    q.get_used()
    assert blk.memory.read(st_, 1) == bytes([VIRTIO_BLK_S_IOERR])
    assert not [c for c in disk.calls if c[0] == "discard"]


# ---- random descriptor tables ----------------------------------------------------------------------------------------

LOW_END = 1 * MiB          # RAM: [0, 1 MiB) and [2 MiB, 3 MiB), a hole between
HIGH = 2 * MiB
HIGH_END = 3 * MiB
BUFFERS = 0x80000          # a 64 KiB area of request buffers
INDIRECT = 0x90000         # a 16-entry indirect table
INTERESTING = [0, BUFFERS, BUFFERS + 0x1000, BUFFERS + 0xFFF0, INDIRECT, LOW_END - 16, LOW_END - 1, LOW_END,
               LOW_END + 0x1000, HIGH - 8, HIGH, HIGH + 0x1000, HIGH_END - 16, HIGH_END - 1, HIGH_END,
               1 << 32, 2**63, 2**64 - 16, 2**64 - 1]
LENGTHS = [0, 1, 15, 16, 17, 20, 21, 512, 513, 4096, 0x10000, 0x80000, 2**31, 2**32 - 1]

HEADERS = [BUFFERS + 0x1000 * i for i in range(4)]

# Mostly plausible values (so that requests get as far as the device), with the hostile ones mixed in.
addresses = st.one_of(st.sampled_from(HEADERS), st.sampled_from(HEADERS), st.integers(BUFFERS, BUFFERS + 0x10000),
                      st.sampled_from(INTERESTING), st.integers(0, 2**64 - 1))
lengths = st.one_of(st.sampled_from([1, 16, 20, 21, 512, 513, 1024]), st.sampled_from(LENGTHS),
                    st.integers(0, 2**32 - 1))
flag_values = st.one_of(st.integers(0, 3), st.integers(0, 7), st.integers(0, 0xFFFF))


def descriptors(size: int):
    return st.tuples(addresses, lengths, flag_values,
                     st.integers(0, size - 1) | st.integers(0, 15) | st.integers(0, 0xFFFF))


request_header = st.tuples(st.sampled_from([VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, 4, VIRTIO_BLK_T_GET_ID,
                                            VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES, 99]),
                           st.integers(0, 2**64 - 1) | st.integers(0, 2100))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data(), device_kind=st.sampled_from(["blk", "rng"]), size=st.sampled_from([1, 2, 4, 8, 16]),
       ring_features=st.sets(st.sampled_from([VIRTIO_F_INDIRECT_DESC, VIRTIO_F_EVENT_IDX])),
       path=st.sampled_from(["python", "c", "notifier"]))
def test_random_descriptor_tables_never_raise_out_of_queue_notify(data, device_kind, size, ring_features, path):
    memory = GuestMemory([(0, LOW_END), (HIGH, HIGH_END - HIGH)])
    disk = FakeDisk(MiB, native=path != "python")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("cloudkvm.virtio")
    logger.addHandler(handler)
    try:
        device = VirtioBlk(disk) if device_kind == "blk" else VirtioRng(max_per_request=4096)
        rig = Rig(memory, device, alloc_end=BUFFERS, notifier=path == "notifier")
        accept = ~((1 << VIRTIO_F_INDIRECT_DESC | 1 << VIRTIO_F_EVENT_IDX) & ~sum(1 << b for b in ring_features))
        rig.driver.init(accept=accept, queue_size=size)
        q = rig.queue
        # request buffers: random bytes with a few plausible virtio-blk headers among them
        memory.write(BUFFERS, data.draw(st.binary(min_size=64, max_size=64)) * 1024)
        for i, (rtype, sector) in enumerate(data.draw(st.lists(request_header, min_size=0, max_size=4))):
            memory.write(BUFFERS + 0x1000 * i, struct.pack("<IIQ", rtype, 0, sector))
        table = data.draw(st.lists(descriptors(size), min_size=size, max_size=size))
        indirect = data.draw(st.lists(descriptors(16), min_size=16, max_size=16))
        for i, d in enumerate(table):
            q.write_desc(i, *d)
        for i, d in enumerate(indirect):
            q.write_desc(i, *d, table=INDIRECT)
        heads = data.draw(st.lists(st.integers(0, size - 1) | st.integers(0, size - 1) | st.integers(0, 0xFFFF),
                                   min_size=size, max_size=size))
        for i, h in enumerate(heads):
            memory.write_u16(q.avail + 4 + 2 * i, h)
        memory.write_u16(q.avail, data.draw(st.integers(0, 0xFFFF)))                       # flags
        memory.write_u16(q.avail + 4 + 2 * size, data.draw(st.integers(0, 0xFFFF)))        # used_event
        avail_idx = data.draw(st.integers(1, size) | st.integers(1, size) | st.integers(0, 0xFFFF))

        # the device may write only: the used ring, and buffers some descriptor marks device-writable
        allowed = [used_area(q)]
        for addr, length, flags, _ in table:
            if flags & W and not flags & I:
                allowed.append((addr, length))
            elif flags & I and length and memory.contains(addr, length):   # whatever table it points at
                for entry in struct.iter_unpack("<QIHH", memory.read(addr, length - length % 16)):
                    if entry[2] & W and not entry[2] & I:
                        allowed.append(entry[:2])
        q.set_avail_idx(avail_idx)
        before = snapshot(memory)
        irqs = rig.irqs
        rig.notify(0)
        rig.driver.write(mmio.QUEUE_NOTIFY, 0)
        rig.transport.notify_all()

        assert_only_changed(memory, before, allowed)
        assert disk.violations == []
        assert [r for r in records if r.levelno >= logging.ERROR] == []
        used = q.used_idx
        assert used <= size
        event(f"{device_kind}: {'needs reset' if rig.driver.status & mmio.DEVICE_NEEDS_RESET else 'live'}, "
              f"{'some' if used else 'no'} used buffers")
        if rig.irqs > irqs:
            assert rig.driver.read(mmio.INTERRUPT_STATUS)
        # whatever happened, a reset brings the device back to a clean state
        rig.driver.write(mmio.STATUS, 0)
        assert rig.driver.status == 0
    finally:
        logger.removeHandler(handler)
        memory.close()
        disk.close()


segment = st.tuples(addresses, lengths, st.booleans())
blk_request = st.tuples(
    st.sampled_from([VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, 4, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_DISCARD,
                     VIRTIO_BLK_T_WRITE_ZEROES, 2, 99, 2**32 - 1]),
    st.integers(0, 2100) | st.integers(0, 2**64 - 1),               # sector
    st.sampled_from([16, 16, 16, 0, 8, 15, 24]),                     # header length
    st.lists(segment, max_size=5),                                   # data segments, any order, any address
    st.sampled_from(["status", "status", "status", "none", "outside", "wide"]),
    st.booleans())                                                   # indirect


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(requests=st.lists(blk_request, min_size=1, max_size=6), pattern=st.binary(min_size=16, max_size=16),
       ranges=st.lists(st.tuples(st.integers(0, 2100) | st.integers(0, 2**64 - 1), st.integers(0, 64) |
                                 st.integers(0, 2**32 - 1), st.integers(0, 3)), max_size=4),
       path=st.sampled_from(["python", "c", "notifier"]))
def test_random_blk_requests_in_well_formed_chains(requests, pattern, ranges, path):
    """Chains the queue accepts structurally, with hostile contents: every request completes with a status (on
    blk.py alone, and with the C data path serving what it can)."""
    memory = GuestMemory([(0, LOW_END), (HIGH, HIGH_END - HIGH)])
    disk = FakeDisk(MiB, native=path != "python")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("cloudkvm.virtio")
    logger.addHandler(handler)
    try:
        rig = Rig(memory, VirtioBlk(disk, serial="fuzz"), alloc_end=BUFFERS, notifier=path == "notifier")
        rig.driver.init(queue_size=64)
        q = rig.queue
        memory.write(BUFFERS, pattern * 4096)
        discard = b"".join(struct.pack("<QII", *r) for r in ranges)
        memory.write(BUFFERS + 0x4000, discard)
        allowed = [used_area(q)]
        expected = []     # (head, status gpa or None)
        for i, (rtype, sector, hlen, segs, status, indirect) in enumerate(requests):
            hdr = rig.alloc.alloc(24)
            memory.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
            bufs = [(hdr, hlen, False)] if hlen else []
            if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES) and discard:
                bufs.append((BUFFERS + 0x4000, len(discard), False))
            bufs += segs
            st_gpa = None
            if status == "status":
                st_gpa = rig.alloc.alloc(1, fill=0xFF)
                bufs.append((st_gpa, 1, True))
            elif status == "outside":
                bufs.append((HIGH_END + 5, 1, True))
            elif status == "wide":
                st_gpa = rig.alloc.alloc(700, fill=0xFF) + 699
                bufs.append((st_gpa - 699, 700, True))
            if not bufs:
                continue
            allowed += [(g, n) for g, n, w in bufs if w]
            expected.append((q.add(bufs, indirect=indirect), st_gpa, bufs))
        q.publish()
        before = snapshot(memory)
        q.kick()

        assert_only_changed(memory, before, allowed)
        assert disk.violations == []
        assert [r for r in records if r.levelno >= logging.ERROR] == []
        used = dict(q.get_used())
        live = not rig.driver.status & mmio.DEVICE_NEEDS_RESET
        for head, st_gpa, bufs in expected:
            if head in used and st_gpa is not None and bufs[-1][2]:
                assert memory.read(st_gpa, 1)[0] in (VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, 2)
            elif live:
                assert head in used
        event("live" if live else "needs reset")
        event(f"{len(used)} of {len(expected)} completed")
    finally:
        logger.removeHandler(handler)
        memory.close()
        disk.close()
