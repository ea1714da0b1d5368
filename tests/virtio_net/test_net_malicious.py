"""A malicious or broken driver on either virtio-net queue: every bad descriptor or ring is refused and logged, no
exception leaves the transport or `deliver`, and nothing is written anywhere but the used rings and the writable
buffers the driver posted."""
import logging
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cloudkvm.devices.virtio import mmio
from cloudkvm.devices.virtio.queue import (VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTQ_DESC_F_INDIRECT,
                                           VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE)
from cloudkvm.kvm.memory import GuestMemory
from net_rig import HDR, HDR_SIZE, NEEDS_CSUM, FakeBackend, LinkBackend, NetRig, arp_frame, ref_checksum
from virtio_fixtures import assert_only_changed, snapshot, used_area
from virtio_driver import MiB

W, N, I = VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_INDIRECT


def raw_chain(q, descs, head: int = 0, kick: bool = True):
    """Write descriptors verbatim at indices 0.., make `head` available, kick."""
    for i, d in enumerate(descs):
        q.write_desc(i, *d)
    q.put_avail(head)
    q.publish()
    if kick:
        q.kick()


def tx_buffer(rig, frame: bytes = None) -> tuple[int, int]:
    data = HDR.pack(0, 0, 0, 0, 0, 0, 0) + (frame or arp_frame())
    gpa = rig.alloc.alloc(len(data))
    rig.memory.write(gpa, data)
    return gpa, len(data)


def assert_recovers(rig, backend):
    """A reset and a fresh initialisation bring the device back: a frame goes out and one comes in."""
    rig.init()
    assert not rig.needs_reset
    sent = len(backend.sent)
    rig.transmit(arp_frame())
    assert len(backend.sent) == sent + 1
    backend.held.clear()
    posted = rig.post_rx(1526)
    assert backend.inject(arp_frame())
    assert [f for _, f in rig.received(posted)] == [arp_frame()]


BAD_BUFFERS = [
    (4 * MiB, 100),                 # just past RAM
    (4 * MiB - 50, 100),            # straddles the end of RAM
    (2**64 - 50, 100),              # addr + len overflows 64 bits
    (0x10000, 2**32 - 1),           # a 4 GiB length
    (2**63, 100),
]


@pytest.mark.parametrize("addr, length", BAD_BUFFERS)
def test_tx_buffer_outside_ram(net, backend, caplog, addr, length):
    q = net.txq
    gpa, n = tx_buffer(net)
    q.submit([(gpa, 12, False), (addr, length, False)], kick=False)
    before = snapshot(net.memory)
    q.kick()
    assert [u[1] for u in q.get_used()] == [0]
    assert backend.sent == []
    assert_only_changed(net.memory, before, [used_area(q)])
    assert not net.needs_reset
    assert "bad descriptor chain" in caplog.text
    net.transmit(arp_frame())
    assert backend.sent == [arp_frame()]


@pytest.mark.parametrize("addr, length", BAD_BUFFERS)
def test_rx_buffer_outside_ram_is_returned_empty(net, backend, caplog, addr, length):
    q = net.rxq
    good = net.alloc.alloc(1526)
    bad_head = q.add([(good, 100, True), (addr, length, True)])
    good_head = q.add([(good, 1526, True)])
    q.publish()
    before = snapshot(net.memory)
    q.kick()
    assert backend.inject(arp_frame())
    assert q.get_used() == [(bad_head, 0), (good_head, HDR_SIZE + 42)]
    assert_only_changed(net.memory, before, [used_area(q), (good, 1526)])
    assert net.memory.read(good + HDR_SIZE, 42) == arp_frame()
    assert not net.needs_reset
    assert "bad descriptor chain" in caplog.text


def test_rx_chain_without_writable_buffers(net, backend, caplog):
    q = net.rxq
    buf = net.alloc.alloc(1526, fill=0x33)
    head = q.submit([(buf, 1526, False)])
    assert backend.inject(arp_frame()) is False        # nothing usable: kept by the backend
    assert q.get_used() == [(head, 0)]
    assert net.memory.read(buf, 1526) == b"\x33" * 1526
    assert "no device-writable buffer" in caplog.text
    assert not net.needs_reset


def test_rx_readable_after_writable(net, backend, caplog):
    q = net.rxq
    w, r = net.alloc.alloc(1526), net.alloc.alloc(64)
    head = q.submit([(w, 1526, True), (r, 64, False)])
    backend.inject(arp_frame())
    assert q.get_used() == [(head, 0)]
    assert "device-readable descriptor follows" in caplog.text


def test_rx_chain_with_readable_buffers_first_uses_only_the_writable_part(net, backend, caplog):
    q = net.rxq
    r, w = net.alloc.alloc(64, fill=0x44), net.alloc.alloc(1526)
    head = q.submit([(r, 64, False), (w, 1526, True)])
    assert backend.inject(arp_frame())
    assert q.get_used() == [(head, HDR_SIZE + 42)]
    assert net.memory.read(r, 64) == b"\x44" * 64
    assert net.memory.read(w + HDR_SIZE, 42) == arp_frame()


def test_bad_rx_chain_in_the_middle_of_a_mergeable_frame(net, backend):
    q = net.rxq
    a, b = net.alloc.alloc(600), net.alloc.alloc(600)
    ha = q.add([(a, 600, True)])
    hbad = q.add([(4 * MiB, 600, True)])
    hb = q.add([(b, 600, True)])
    q.publish()
    q.kick()
    frame = arp_frame() + bytes(1400)
    assert backend.inject(frame) is False             # 1200 usable bytes: not enough, and one chain was consumed
    used = q.get_used()
    assert sorted(used) == sorted([(ha, 0), (hbad, 0), (hb, 0)])
    assert not net.needs_reset
    posted = net.post_rx(1526)
    assert [f for _, f in net.received(posted)] == [frame]


@pytest.mark.parametrize("queue", ["rx", "tx"])
@pytest.mark.parametrize("loop", [[(0, 1), (1, 0)], [(0, 0)], [(0, 1), (1, 2), (2, 1)]])
def test_descriptor_loops(net, backend, caplog, queue, loop):
    q = net.rxq if queue == "rx" else net.txq
    buf, n = tx_buffer(net)
    raw_chain(q, [(buf, 16, N | (W if queue == "rx" else 0), nxt) for _, nxt in loop])
    if queue == "rx":
        assert backend.inject(arp_frame()) is False
    assert q.get_used() == [(0, 0)]
    assert "a loop" in caplog.text
    assert backend.sent == []
    assert not net.needs_reset


@pytest.mark.parametrize("queue", ["rx", "tx"])
def test_head_index_out_of_range_needs_reset(net, backend, caplog, queue):
    q = net.rxq if queue == "rx" else net.txq
    raw_chain(q, [], head=256)
    if queue == "rx":
        assert backend.inject(arp_frame()) is False
    assert net.needs_reset
    assert net.driver.read(mmio.INTERRUPT_STATUS) & mmio.INT_CONFIG
    assert "out of range" in caplog.text
    # inert until reset: frames are refused, notifications ignored
    assert backend.inject(arp_frame()) is False
    q.kick()
    assert_recovers(net, backend)


@pytest.mark.parametrize("queue", ["rx", "tx"])
@pytest.mark.parametrize("jump", [257, 1000, 0xFFFF])
def test_avail_idx_moving_more_than_the_queue_size(net, backend, caplog, queue, jump):
    q = net.rxq if queue == "rx" else net.txq
    q.set_avail_idx(jump)
    before = snapshot(net.memory)
    q.kick()
    if queue == "rx":
        assert backend.inject(arp_frame()) is False
    assert net.needs_reset
    assert_only_changed(net.memory, before, [used_area(net.rxq), used_area(net.txq)])
    assert "more than the queue size" in caplog.text
    assert_recovers(net, backend)


@pytest.mark.parametrize("addr, length, expected", [
    (4 * MiB - 16, 32, "outside guest RAM"),
    (0x20000, 0, "not a non-zero multiple of 16"),
    (0x20000, 24, "not a non-zero multiple of 16"),
])
@pytest.mark.parametrize("queue", ["rx", "tx"])
def test_bad_indirect_tables(net, backend, caplog, addr, length, expected, queue):
    q = net.rxq if queue == "rx" else net.txq
    raw_chain(q, [(addr, length, I, 0)])
    if queue == "rx":
        backend.inject(arp_frame())
    assert q.get_used() == [(0, 0)]
    assert expected in caplog.text
    assert not net.needs_reset


def test_indirect_without_the_feature(make_net, backend, caplog):
    rig = make_net(accept=~(1 << VIRTIO_F_INDIRECT_DESC))
    table = rig.alloc.alloc(16)
    buf, n = tx_buffer(rig)
    rig.txq.write_desc(0, buf, n, 0, table=table)
    raw_chain(rig.txq, [(table, 16, I, 0)])
    assert rig.txq.get_used() == [(0, 0)] and backend.sent == []
    assert "without VIRTIO_F_INDIRECT_DESC" in caplog.text


def test_rx_buffer_aliasing_the_rings_never_raises(net, backend):
    """A driver may point a receive buffer at its own rings; the rings get garbage, the device gets a reset."""
    q = net.rxq
    q.submit([(q.desc, 16 * q.size, True)])
    for _ in range(3):
        backend.inject(bytes(range(256)) * 5)
        q.kick()
        net.txq.kick()
    assert_recovers(net, backend)


def test_mergeable_ring_too_small_for_one_frame(make_net, backend, caplog):
    rig = make_net(queue_size=4)
    posted = rig.post_rx(12, count=4)                 # 48 bytes in all
    assert backend.inject(arp_frame() + bytes(100)) is True     # can never fit: dropped, not kept forever
    assert "does not fit the whole receive queue" in caplog.text
    assert rig.rxq.get_used() == []
    assert backend.inject(arp_frame()[:24]) is True   # 36 bytes: fits in 3
    assert [f for _, f in rig.received(posted)] == [arp_frame()[:24]]


def test_tx_while_not_live_and_for_missing_queues(net, backend):
    net.driver.write(mmio.QUEUE_NOTIFY, 2)
    net.transport.queue_notify(5)
    net.transport.notify_all()
    assert not net.needs_reset


# ---- random transmit headers and frames ------------------------------------------------------------------------------

header_fields = st.tuples(
    st.sampled_from([0, 1, 2, 3, 0x80, 0xFF]) | st.integers(0, 0xFF),          # flags
    st.sampled_from([0, 0, 0, 1, 3, 4, 5, 0x80]) | st.integers(0, 0xFF),       # gso_type
    st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),                           # hdr_len, gso_size
    st.integers(0, 80) | st.integers(0, 0xFFFF),                              # csum_start
    st.sampled_from([6, 16]) | st.integers(0, 40) | st.integers(0, 0xFFFF),   # csum_offset
    st.integers(0, 0xFFFF))                                                   # num_buffers


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=header_fields, frame=st.binary(min_size=0, max_size=1600),
       cuts=st.lists(st.integers(1, 200), max_size=4), indirect=st.booleans())
def test_random_tx_headers_and_frames_never_raise(net, backend, fields, frame, cuts, indirect):
    backend.sent.clear()
    split: list[int] = []
    for cut in cuts:                      # descriptor sizes, the rest goes in a last one
        if sum(split) + cut < HDR_SIZE + len(frame):
            split.append(cut)
    mark = net.alloc.mark()
    try:
        head = net.transmit(frame, header=HDR.pack(*fields), split=split, indirect=indirect)
    finally:
        net.alloc.release(mark)
    assert net.txq.get_used() == [(head, 0)]
    assert not net.needs_reset
    flags, gso_type, _, _, csum_start, csum_offset, _ = fields
    if not backend.sent:
        return
    [sent] = backend.sent
    assert 14 <= len(sent) <= 1518 and gso_type == 0
    if not flags & NEEDS_CSUM:
        assert sent == frame
        return
    pos = csum_start + csum_offset
    assert pos + 2 <= len(frame)
    assert sent[:pos] == frame[:pos] and sent[pos + 2:] == frame[pos + 2:]
    expected = ref_checksum(frame[csum_start:])
    assert int.from_bytes(sent[pos:pos + 2], "big") == (expected or 0xFFFF)


# ---- random descriptor tables on both queues, with frames arriving -------------------------------------------------

LOW_END = 1 * MiB          # RAM: [0, 1 MiB) and [2 MiB, 3 MiB), a hole between
HIGH = 2 * MiB
HIGH_END = 3 * MiB
BUFFERS = 0x80000          # a 64 KiB area of buffers
INDIRECT = 0x90000         # a 16-entry indirect table
INTERESTING = [0, BUFFERS, BUFFERS + 0x1000, BUFFERS + 0xFFF0, INDIRECT, LOW_END - 16, LOW_END - 1, LOW_END,
               HIGH - 8, HIGH, HIGH_END - 16, HIGH_END - 1, HIGH_END, 1 << 32, 2**63, 2**64 - 16, 2**64 - 1]
LENGTHS = [0, 1, 11, 12, 13, 26, 60, 100, 600, 1526, 4096, 0x10000, 2**31, 2**32 - 1]
HEADERS = [BUFFERS + 0x1000 * i for i in range(4)]

addresses = st.one_of(st.sampled_from(HEADERS), st.sampled_from(HEADERS), st.integers(BUFFERS, BUFFERS + 0xF000),
                      st.sampled_from(INTERESTING), st.integers(0, 2**64 - 1))
lengths = st.one_of(st.sampled_from([12, 42, 54, 100, 600, 1526]), st.sampled_from(LENGTHS),
                    st.integers(0, 2**32 - 1))
flag_values = st.one_of(st.sampled_from([0, W, N, W | N, I]), st.integers(0, 7), st.integers(0, 0xFFFF))


def descriptors(size: int):
    return st.tuples(addresses, lengths, flag_values,
                     st.integers(0, size - 1) | st.integers(0, 15) | st.integers(0, 0xFFFF))


def plausible_descriptors(size: int, write: bool):
    """What a correct driver writes, give or take: buffers in RAM, in-range next indices, the right direction."""
    if write:
        return st.tuples(st.integers(BUFFERS, BUFFERS + 0xF000), st.sampled_from([12, 20, 54, 100, 600, 1526, 2048]),
                         st.sampled_from([W, W | N]), st.integers(0, size - 1))
    return st.tuples(st.sampled_from(HEADERS), st.sampled_from([12, 54, 54, 100]), st.sampled_from([0, N]),
                     st.integers(0, size - 1))


def allowed_writes(memory, table) -> list[tuple[int, int]]:
    allowed = []
    for addr, length, flags, _ in table:
        if flags & W and not flags & I:
            allowed.append((addr, length))
        elif flags & I and length and memory.contains(addr, length):
            for entry in struct.iter_unpack("<QIHH", memory.read(addr, length - length % 16)):
                if entry[2] & W and not entry[2] & I:
                    allowed.append(entry[:2])
    return allowed


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data(), size=st.sampled_from([1, 2, 4, 8, 16]),
       ring_features=st.sets(st.sampled_from([VIRTIO_F_INDIRECT_DESC, VIRTIO_F_EVENT_IDX])),
       mergeable=st.booleans(), plausible=st.sampled_from([{"rx", "tx"}, {"rx", "tx"}, {"rx"}, {"tx"}, set()]),
       frames=st.lists(st.sampled_from([arp_frame(), arp_frame() * 30, arp_frame() * 36]) |
                       st.binary(min_size=0, max_size=1600), min_size=1, max_size=4),
       path=st.sampled_from(["python", "c", "link", "notifier"]))
def test_random_descriptor_tables_never_raise(data, size, ring_features, mergeable, plausible, frames, path):
    memory = GuestMemory([(0, LOW_END), (HIGH, HIGH_END - HIGH)])
    backend = LinkBackend() if path in ("link", "notifier") else FakeBackend()
    rx_in_c = path != "python"
    try:
        refuse = (1 << VIRTIO_F_INDIRECT_DESC | 1 << VIRTIO_F_EVENT_IDX) & ~sum(1 << b for b in ring_features)
        if not mergeable:
            refuse |= 1 << 15
        rig = NetRig(memory, backend, accept=~refuse, queue_size=size, alloc_end=BUFFERS,
                     notifier=path == "notifier")
        rig.device.rx_in_c = rx_in_c
        memory.write(BUFFERS, data.draw(st.binary(min_size=64, max_size=64)) * 1024)
        for i, fields in enumerate(data.draw(st.lists(header_fields, max_size=4))):
            memory.write(HEADERS[i], HDR.pack(*fields) + arp_frame())
        # the used rings, and the avail idx fields this test moves after the snapshot
        allowed = [used_area(rig.rxq), used_area(rig.txq), (rig.rxq.avail + 2, 2), (rig.txq.avail + 2, 2)]
        indirect = data.draw(st.lists(descriptors(16), min_size=16, max_size=16))
        for i, d in enumerate(indirect):
            rig.txq.write_desc(i, *d, table=INDIRECT)
        idx = {}
        for name, q in (("rx", rig.rxq), ("tx", rig.txq)):
            good = name in plausible
            entry = plausible_descriptors(size, name == "rx") if good else descriptors(size)
            table = data.draw(st.lists(entry, min_size=size, max_size=size))
            for i, d in enumerate(table):
                q.write_desc(i, *d)
            head = st.integers(0, size - 1) if good else st.integers(0, size - 1) | st.integers(0, 0xFFFF)
            heads = data.draw(st.lists(head, min_size=size, max_size=size))
            idx[name] = data.draw(st.integers(1, size) if good else st.integers(1, size) | st.integers(0, 0xFFFF))
            for i, h in enumerate(heads):
                memory.write_u16(q.avail + 4 + 2 * i, h)
            memory.write_u16(q.avail, data.draw(st.integers(0, 0xFFFF)))                   # flags
            memory.write_u16(q.avail + 4 + 2 * size, data.draw(st.integers(0, 0xFFFF)))    # used_event
            allowed += allowed_writes(memory, table)
        # (writable buffers of either queue are allowed: the indirect table is shared; tx ones are never written)
        rx_idx, tx_idx = idx["rx"], idx["tx"]
        before = snapshot(memory)
        rig.txq.set_avail_idx(tx_idx)
        rig.transport.queue_notify(1)
        for frame in frames:
            backend.inject(frame)
        rig.rxq.set_avail_idx(rx_idx)
        rig.notify(0)
        for frame in frames:
            backend.inject(frame)
        rig.driver.write(mmio.QUEUE_NOTIFY, 0)
        rig.transport.notify_all()

        stats = rig.device.stats
        event(f"frames received: {bool(stats['rx_frames'])}, sent: {bool(stats['tx_frames'])}, "
              f"needs reset: {rig.needs_reset}")
        assert_only_changed(memory, before, allowed)
        for sent in backend.sent:
            assert 14 <= len(sent) <= 1518
    finally:
        memory.close()


def test_errors_are_logged_once_per_kind(net, backend, caplog):
    for _ in range(20):
        net.txq.submit([(4 * MiB, 100, False)])
        net.txq.get_used()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "outside guest RAM" in r.getMessage()]
    assert len(warnings) == 1
