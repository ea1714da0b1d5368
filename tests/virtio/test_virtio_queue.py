"""The split virtqueue: chains (direct, indirect, mixed), used ring order, and used buffer notification suppression
(VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTIO_F_EVENT_IDX with used_event/avail_event)."""
import struct

import pytest

from cloudkvm.devices.virtio import BadChain, BadQueue, Chain, Virtqueue, VirtioBlk, VirtioRng, mmio
from cloudkvm.devices.virtio.blk import VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN
from cloudkvm.devices.virtio.queue import (VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTQ_DESC_F_INDIRECT,
                                           VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE)
from virtio_driver import Allocator, DriverQueue

NO_EVENT_IDX = ~(1 << VIRTIO_F_EVENT_IDX)


@pytest.fixture
def vq(memory):
    """A bare Virtqueue of 8 entries with a DriverQueue-like layout, for pop/push without a transport."""
    alloc = Allocator(memory, 0x1000, memory.regions[-1].end)

    class Stub:
        pass
    stub = Stub()
    stub.memory = memory
    dq = DriverQueue(stub, 0, 8, alloc)
    q = Virtqueue(memory, 8)
    q.desc_table, q.avail_ring, q.used_ring = dq.desc, dq.avail, dq.used
    q.indirect = True
    q.activate()
    return q, dq, alloc


def test_pop_returns_validated_segments_in_order(vq):
    q, dq, alloc = vq
    a, b, c = alloc.alloc(16), alloc.alloc(512), alloc.alloc(1)
    head = dq.submit([(a, 16, False), (b, 512, True), (c, 1, True)], kick=False)
    chain = q.pop()
    assert isinstance(chain, Chain)
    assert chain.head == head
    assert chain.segments == [(a, 16, False), (b, 512, True), (c, 1, True)]
    assert chain.readable == [(a, 16)] and chain.writable == [(b, 512), (c, 1)]
    assert (chain.readable_len, chain.writable_len) == (16, 513)
    assert q.pop() is None
    q.push(head, 513)
    assert dq.get_used() == [(head, 513)]


def test_indirect_table_and_mixed_direct_then_indirect(vq):
    q, dq, alloc = vq
    a, b, c = alloc.alloc(16), alloc.alloc(64), alloc.alloc(1)
    head = dq.submit([(a, 16, False), (b, 64, True), (c, 1, True)], indirect=True, kick=False)
    assert q.pop().segments == [(a, 16, False), (b, 64, True), (c, 1, True)]
    # §2.7.5.3.2: zero or more direct descriptors followed by one indirect descriptor
    table = alloc.alloc(32)
    dq.write_desc(0, b, 64, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1, table=table)
    dq.write_desc(1, c, 1, VIRTQ_DESC_F_WRITE, table=table)
    dq.write_desc(5, a, 16, VIRTQ_DESC_F_NEXT, 6)
    dq.write_desc(6, table, 32, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE)   # WRITE on it is ignored
    dq.put_avail(5)
    dq.publish()
    chain = q.pop()
    assert chain.head == 5
    assert chain.segments == [(a, 16, False), (b, 64, True), (c, 1, True)]
    assert head != 5


def test_zero_length_descriptors_are_dropped(vq):
    q, dq, alloc = vq
    a = alloc.alloc(16)
    dq.submit([(a, 16, False), (0xFFFF_FFFF_0000, 0, False), (a, 0, True)], kick=False)
    assert q.pop().segments == [(a, 16, False)]


def test_a_bare_queue_rejects_indirect_unless_negotiated(vq):
    q, dq, alloc = vq
    q.indirect = False
    dq.submit([(alloc.alloc(16), 16, False)], indirect=True, kick=False)
    with pytest.raises(BadChain) as e:
        q.pop()
    assert e.value.kind == "indirect-not-negotiated" and e.value.head is not None


def test_avail_idx_is_read_once_per_batch(vq, monkeypatch):
    """avail->idx is read when a batch starts (`_refill`), not per chain: buffers the driver publishes meanwhile
    wait for the next batch."""
    q, dq, alloc = vq
    for _ in range(3):
        dq.add([(alloc.alloc(8), 8, True)])
    dq.publish()
    reads = []
    real = q._refill

    def counting():
        reads.append(q.last_avail)
        return real()
    monkeypatch.setattr(q, "_refill", counting)
    assert q.pop() is not None
    dq.add([(alloc.alloc(8), 8, True)])
    dq.publish()  # published during the batch
    assert [q.pop() is not None for _ in range(2)] == [True] * 2
    assert reads == [0]
    assert q.pop() is not None and reads == [0, 3]  # the next batch sees it
    assert q.pop() is None
    assert reads == [0, 3, 4]


def test_avail_idx_jump_is_a_bad_queue(vq):
    q, dq, _ = vq
    dq.set_avail_idx(9)
    with pytest.raises(BadQueue):
        q.pop()


def test_layout_checks(memory):
    q = Virtqueue(memory, 256)
    q.desc_table, q.avail_ring, q.used_ring = 0x1000, 0x2000, 0x3000
    q.check_layout()
    for attr, value in [("size", 100), ("size", 512), ("size", 0), ("desc_table", 0x1008), ("used_ring", 0x3002),
                        ("avail_ring", 0x2001), ("used_ring", memory.size - 100), ("desc_table", 1 << 40)]:
        saved = getattr(q, attr)
        setattr(q, attr, value)
        with pytest.raises(BadQueue):
            q.check_layout()
        setattr(q, attr, saved)
    with pytest.raises(ValueError):
        Virtqueue(memory, 100)


def test_push_rejects_a_non_descriptor_head(vq):
    q, _, _ = vq
    with pytest.raises(ValueError):
        q.push(8, 0)


# ---- through the transport ---------------------------------------------------------------------------------------

def test_blk_requests_through_indirect_descriptors(blk, disk):
    disk.data[:512] = b"\x77" * 512
    status, data, used = blk.blk(VIRTIO_BLK_T_IN, 0, in_len=512, indirect=True)
    assert (status, data, used) == (0, b"\x77" * 512, 513)


def test_no_interrupt_flag_suppresses_interrupts_without_event_idx(make_rig, disk):
    rig = make_rig(VirtioBlk(disk))
    rig.driver.init(accept=NO_EVENT_IDX)
    rig.queue.set_no_interrupt(True)
    rig.blk(VIRTIO_BLK_T_GET_ID, in_len=20)
    rig.blk(VIRTIO_BLK_T_GET_ID, in_len=20)
    assert rig.irqs == 0
    assert rig.driver.read(mmio.INTERRUPT_STATUS) == 0
    rig.queue.set_no_interrupt(False)
    rig.blk(VIRTIO_BLK_T_GET_ID, in_len=20)
    assert rig.irqs == 1


def test_event_idx_ignores_the_no_interrupt_flag(make_rig, disk):
    rig = make_rig(VirtioBlk(disk))
    features = rig.driver.init()
    assert features >> VIRTIO_F_EVENT_IDX & 1
    rig.queue.set_no_interrupt(True)
    rig.queue.set_used_event(0)   # interrupt after the first used buffer
    rig.blk(VIRTIO_BLK_T_GET_ID, in_len=20)
    assert rig.irqs == 1


def test_event_idx_interrupts_only_when_used_idx_passes_used_event(make_rig, disk):
    rig = make_rig(VirtioBlk(disk))
    rig.driver.init()
    q = rig.queue
    q.set_used_event(3)           # "interrupt me once you write used entry 3" (used idx reaching 4)
    irqs = []
    for _ in range(6):
        rig.blk(VIRTIO_BLK_T_GET_ID, in_len=20)
        irqs.append(rig.irqs)
    assert irqs == [0, 0, 0, 1, 1, 1]
    q.set_used_event(q.used_idx)  # the next one
    rig.blk(VIRTIO_BLK_T_GET_ID, in_len=20)
    assert rig.irqs == 2


def test_event_idx_batch_crossing_used_event_interrupts_once(make_rig, disk):
    rig = make_rig(VirtioBlk(disk))
    rig.driver.init()
    q = rig.queue
    q.set_used_event(2)
    for _ in range(5):
        hdr, st = rig.alloc.alloc(16), rig.alloc.alloc(21)
        rig.memory.write(hdr, struct.pack("<IIQ", VIRTIO_BLK_T_GET_ID, 0, 0))
        q.add([(hdr, 16, False), (st, 21, True)])
    q.publish()
    q.kick()
    assert len(q.get_used()) == 5
    assert rig.irqs == 1
    q.set_used_event(0xFFFF)     # far away: no interrupt for the next ones
    for _ in range(3):
        rig.blk(VIRTIO_BLK_T_GET_ID, in_len=20)
    assert rig.irqs == 1


def test_event_idx_wraps_at_65536(make_rig):
    rig = make_rig(VirtioRng(max_per_request=1))
    rig.driver.init(queue_size=4)
    q = rig.queue
    # fast-forward both sides to just before the 16-bit indices wrap
    start = 0xFFFD
    dev = rig.transport.queues[0]
    dev.last_avail = dev._avail_idx = dev.used_idx = dev._signalled_used = start
    rig.memory.write_u16(q.used + 2, start)
    q.set_avail_idx(start)
    q.last_used = start
    q.set_used_event(0xFFFF)           # interrupt when entry 0xFFFF is written: used idx wraps to 0
    buf = rig.alloc.alloc(1)
    irq_at = []
    for i in range(start, start + 5):
        q.submit([(buf, 1, True)])
        assert len(q.get_used()) == 1
        if rig.irqs:
            irq_at.append(i & 0xFFFF)
            rig.irqs = 0
    assert irq_at == [0xFFFF]
    assert q.used_idx == (start + 5) & 0xFFFF


def test_device_publishes_avail_event(make_rig):
    rig = make_rig(VirtioRng())
    rig.driver.init()
    q = rig.queue
    for n in range(1, 4):
        q.submit([(rig.alloc.alloc(8), 8, True)])
        q.get_used()
        assert q.avail_event == n    # notify me when you add entry n


def test_no_avail_event_without_event_idx(make_rig):
    rig = make_rig(VirtioRng())
    rig.driver.init(accept=NO_EVENT_IDX)
    q = rig.queue
    q.submit([(rig.alloc.alloc(8), 8, True)])
    q.get_used()
    assert q.avail_event == 0


def test_indirect_is_refused_when_not_negotiated(make_rig, disk):
    rig = make_rig(VirtioBlk(disk))
    rig.driver.init(accept=~(1 << VIRTIO_F_INDIRECT_DESC))
    used = rig.blk(VIRTIO_BLK_T_IN, 0, in_len=512, indirect=True, expect_used=False)
    assert used == []
    assert rig.driver.status & mmio.DEVICE_NEEDS_RESET
