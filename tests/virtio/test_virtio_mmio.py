"""virtio-mmio v2 transport: identity registers, feature negotiation (and refusals), status and reset, queue set-up,
configuration space, interrupts, and the lock shared by vCPU register accesses and the I/O thread."""
import threading

import pytest

from cloudkvm.devices.virtio import NOTIFY_OFFSET, VirtioBlk, VirtioRng, mmio
from cloudkvm.devices.virtio.blk import (VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
                                         VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
                                         VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN)
from cloudkvm.devices.virtio.device import VIRTIO_F_VERSION_1
from cloudkvm.devices.virtio.queue import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC
from cloudkvm.kvm.memory import GuestMemory
from virtio_driver import FakeDisk, MiB, Rig

ALL = ~0


def test_identity_registers(make_rig, disk):
    rig = make_rig(VirtioBlk(disk))
    d = rig.driver
    assert d.read(mmio.MAGIC_VALUE) == 0x74726976
    assert d.read(mmio.VERSION) == 2
    assert d.read(mmio.DEVICE_ID) == 2
    assert d.read(mmio.VENDOR_ID).to_bytes(4, "little") == b"CKVM"
    assert make_rig(VirtioRng()).driver.read(mmio.DEVICE_ID) == 4
    assert NOTIFY_OFFSET == 0x50


def test_offered_features_are_version_1_ring_features_and_the_devices_own(make_rig, disk):
    d = make_rig(VirtioBlk(disk)).driver
    offered = d.device_features()
    for bit in (VIRTIO_F_VERSION_1, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_EVENT_IDX, VIRTIO_BLK_F_FLUSH,
                VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD,
                VIRTIO_BLK_F_WRITE_ZEROES):
        assert offered >> bit & 1, bit
    assert not offered >> VIRTIO_BLK_F_RO & 1
    assert not offered >> 33 & 1   # no VIRTIO_F_ACCESS_PLATFORM
    d.write(mmio.DEVICE_FEATURES_SEL, 2)
    assert d.read(mmio.DEVICE_FEATURES) == 0


def test_negotiation_accepts_a_subset_with_version_1(make_rig, disk):
    d = make_rig(VirtioBlk(disk)).driver
    features, ok = d.negotiate(accept=1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BLK_F_FLUSH)
    assert ok
    assert d.status == mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK
    assert d.t.acked_features == features == 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BLK_F_FLUSH


def test_features_without_version_1_are_refused(make_rig, disk):
    d = make_rig(VirtioBlk(disk)).driver
    _, ok = d.negotiate(accept=~(1 << VIRTIO_F_VERSION_1))
    assert not ok
    assert d.status == mmio.ACKNOWLEDGE | mmio.DRIVER
    d.add_status(mmio.FAILED)
    # after a reset the same device negotiates fine
    _, ok = d.negotiate()
    assert ok


def test_features_not_offered_are_refused(make_rig, disk):
    d = make_rig(VirtioBlk(disk)).driver
    offered = d.device_features()
    _, ok = d.negotiate(force=offered | 1 << VIRTIO_BLK_F_RO)   # RO is not offered for a writable disk
    assert not ok
    _, ok = d.negotiate(force=1 << VIRTIO_F_VERSION_1 | 1 << 40)
    assert not ok
    _, ok = d.negotiate(force=1 << VIRTIO_F_VERSION_1 | 1 << 33)   # ACCESS_PLATFORM
    assert not ok


def test_driver_features_after_features_ok_are_ignored(make_rig, disk):
    d = make_rig(VirtioBlk(disk)).driver
    features, ok = d.negotiate(accept=1 << VIRTIO_F_VERSION_1)
    assert ok
    d.write_driver_features(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_EVENT_IDX)
    assert d.t.acked_features == 1 << VIRTIO_F_VERSION_1
    d.write(mmio.DRIVER_FEATURES_SEL, 5)
    d.write(mmio.DRIVER_FEATURES, 0xFFFFFFFF)
    assert d.t.acked_features == 1 << VIRTIO_F_VERSION_1


def test_driver_ok_without_features_ok_needs_reset(make_rig, disk):
    rig = make_rig(VirtioBlk(disk))
    d = rig.driver
    d.reset()
    d.add_status(mmio.ACKNOWLEDGE | mmio.DRIVER)
    d.write_driver_features(1 << VIRTIO_F_VERSION_1)
    d.add_status(mmio.DRIVER_OK)
    assert d.status & mmio.DEVICE_NEEDS_RESET
    assert rig.irqs == 1 and d.read(mmio.INTERRUPT_STATUS) == mmio.INT_CONFIG


def test_status_bits_accumulate_and_needs_reset_is_the_devices(blk):
    d = blk.driver
    before = d.status
    d.write(mmio.STATUS, mmio.ACKNOWLEDGE)            # a driver MUST NOT clear bits: they stay
    assert d.status == before
    d.write(mmio.STATUS, before | mmio.DEVICE_NEEDS_RESET)
    assert not d.status & mmio.DEVICE_NEEDS_RESET


def test_reset_clears_status_queues_and_interrupts_and_the_device_works_again(blk):
    d = blk.driver
    assert blk.blk(VIRTIO_BLK_T_IN, 0, in_len=512)[0] == 0
    assert d.read(mmio.INTERRUPT_STATUS) == mmio.INT_VRING
    d.write(mmio.STATUS, 0)
    assert d.status == 0
    assert d.read(mmio.INTERRUPT_STATUS) == 0
    d.write(mmio.QUEUE_SEL, 0)
    assert d.read(mmio.QUEUE_READY) == 0
    assert blk.transport.acked_features == 0 and blk.device.acked_features == 0
    # notifications after a reset are ignored, nothing is consumed
    q = blk.queue
    q.submit([(blk.alloc.alloc(16), 16, False), (blk.alloc.alloc(1), 1, True)])
    assert q.get_used() == []
    # a fresh initialisation starts the rings from 0 again
    d.init()
    status, _, _ = blk.blk(VIRTIO_BLK_T_GET_ID, in_len=20)
    assert status == 0 and blk.queue.used_idx == 1


def test_queue_registers(make_rig, disk):
    d = make_rig(VirtioBlk(disk)).driver
    d.negotiate()
    d.write(mmio.QUEUE_SEL, 0)
    assert d.read(mmio.QUEUE_NUM_MAX) == 256
    d.write(mmio.QUEUE_SEL, 1)          # blk has one queue
    assert d.read(mmio.QUEUE_NUM_MAX) == 0
    assert d.read(mmio.QUEUE_READY) == 0
    d.write(mmio.QUEUE_READY, 1)        # ignored
    assert d.read(mmio.QUEUE_READY) == 0
    q = d.setup_queue(0, 64)
    t = d.t.queues[0]
    assert (t.size, t.desc_table, t.avail_ring, t.used_ring) == (64, q.desc, q.avail, q.used)
    assert d.read(mmio.QUEUE_READY) == 1
    d.write(mmio.QUEUE_NUM, 128)        # not while ready
    assert t.size == 64
    d.write(mmio.QUEUE_READY, 0)        # stopping a queue: reads back 0
    assert d.read(mmio.QUEUE_READY) == 0


def test_queue_addresses_take_both_halves():
    high = GuestMemory([(0, 1 << 20), (1 << 32, 1 << 20)])
    try:
        rig = Rig(high, VirtioRng())
        rig.alloc.next = 1 << 32
        rig.driver.init()
        q = rig.driver.queues[0]
        assert rig.transport.queues[0].desc_table == q.desc >= 1 << 32
        buf = rig.alloc.alloc(64)
        q.submit([(buf, 64, True)])
        assert q.get_used() == [(0, 64)]
    finally:
        high.close()


def test_write_only_and_unknown_registers_read_zero_and_odd_accesses_are_harmless(blk):
    t = blk.transport
    for off in (mmio.DEVICE_FEATURES_SEL, mmio.DRIVER_FEATURES, mmio.QUEUE_SEL, mmio.QUEUE_NOTIFY, mmio.INTERRUPT_ACK,
                mmio.QUEUE_DESC_LOW, 0x028, 0x0C0, 0x0F8):
        assert t.read(off, 4) == 0
    assert t.read(mmio.SHM_LEN_LOW, 4) == 0xFFFFFFFF   # no shared memory regions
    assert t.read(mmio.MAGIC_VALUE, 2) == 0            # registers are 32-bit only
    assert t.read(mmio.MAGIC_VALUE + 1, 4) == 0
    before = blk.driver.status
    t.write(mmio.STATUS, 1, 0)                         # a byte write does not reset
    t.write(mmio.MAGIC_VALUE, 4, 0)
    t.write(0x0F0, 4, 0xFFFFFFFF)
    assert blk.driver.status == before
    assert t.read(mmio.MAGIC_VALUE, 4) == 0x74726976


def test_config_space_reads(blk, disk):
    d = blk.driver
    assert d.config(0, 8) == disk.size // 512
    assert d.config_u64(0) == disk.size // 512
    assert d.config(8, 4) == 1 << 20        # size_max
    assert d.config(12, 4) == 254           # seg_max: header + 254 + status = the queue size
    assert d.config(20, 4) == 512           # blk_size
    assert d.config(36, 4) == 1 << 22       # max_discard_sectors
    assert d.config(40, 4) == 32            # max_discard_seg
    assert d.config(44, 4) == 8             # discard_sector_alignment
    assert d.config(48, 4) == 1 << 22       # max_write_zeroes_sectors
    assert d.config(52, 4) == 32            # max_write_zeroes_seg
    assert d.config(56, 1) == 0             # write_zeroes_may_unmap
    assert d.config(0, 1) == (disk.size // 512) & 0xFF
    assert d.config(1, 2) == (disk.size // 512) >> 8 & 0xFFFF
    assert d.config(72, 4) == 0             # past the end
    assert d.config(70, 4) == 0             # straddles the end
    assert d.config(0, 3) == 0              # not an access size
    blk.transport.write(mmio.CONFIG, 4, 0x12345678)   # read-only fields: ignored
    assert d.config(0, 8) == disk.size // 512
    assert d.read(mmio.CONFIG_GENERATION) == 0


def test_config_change_bumps_generation_and_interrupts(blk):
    d = blk.driver
    irqs = blk.irqs
    blk.device.signal_config_change()
    assert d.read(mmio.CONFIG_GENERATION) == 1
    assert blk.irqs == irqs + 1
    assert d.ack_interrupt() == mmio.INT_CONFIG
    assert d.read(mmio.INTERRUPT_STATUS) == 0


def test_used_buffers_set_interrupt_status_bit_0_until_acked(blk):
    d = blk.driver
    assert blk.irqs == 0
    blk.blk(VIRTIO_BLK_T_IN, 0, in_len=512)
    assert blk.irqs == 1
    assert d.read(mmio.INTERRUPT_STATUS) == mmio.INT_VRING
    d.write(mmio.INTERRUPT_ACK, mmio.INT_CONFIG)   # acking another bit leaves it
    assert d.read(mmio.INTERRUPT_STATUS) == mmio.INT_VRING
    assert d.ack_interrupt() == mmio.INT_VRING
    assert d.read(mmio.INTERRUPT_STATUS) == 0


def test_queue_notify_method_equals_the_register_write(blk):
    q = blk.queue
    buf = blk.alloc.alloc(16)
    blk.memory.write(buf, b"\x08" + bytes(15))
    st = blk.alloc.alloc(20 + 1)
    q.submit([(buf, 16, False), (st, 21, True)], kick=False)
    assert q.get_used() == []
    blk.transport.queue_notify(0)
    assert len(q.get_used()) == 1
    blk.transport.queue_notify(7)       # no such queue: ignored
    blk.transport.notify_all()


def test_notifications_before_driver_ok_are_ignored(make_rig, disk):
    rig = make_rig(VirtioBlk(disk))
    d = rig.driver
    d.negotiate()
    q = d.setup_queue(0)
    q.submit([(rig.alloc.alloc(16), 16, False), (rig.alloc.alloc(1), 1, True)])
    assert q.get_used() == [] and rig.irqs == 0
    d.add_status(mmio.DRIVER_OK)
    q.kick()
    assert len(q.get_used()) == 1


def test_a_queue_enabled_after_driver_ok_works(make_rig):
    rig = make_rig(VirtioRng())
    d = rig.driver
    d.negotiate()
    d.add_status(mmio.DRIVER_OK)
    q = d.setup_queue(0)
    buf = rig.alloc.alloc(32)
    q.submit([(buf, 32, True)])
    assert q.get_used() == [(0, 32)]


@pytest.mark.allow_errors
def test_interrupt_callback_failure_does_not_escape(make_rig, disk):
    rig = make_rig(VirtioBlk(disk))

    def broken():
        raise OSError("irqfd closed")
    rig.transport.interrupt = broken
    rig.driver.init()
    status, _, _ = rig.blk(VIRTIO_BLK_T_GET_ID, in_len=20)
    assert status == 0
    assert rig.driver.read(mmio.INTERRUPT_STATUS) == mmio.INT_VRING


def test_register_accesses_and_queue_processing_from_two_threads(make_rig):
    disk = FakeDisk(4 << 20)
    rig = make_rig(VirtioBlk(disk))
    rig.driver.init(queue_size=16)
    errors = []
    stop = threading.Event()

    def vcpu():
        try:
            while not stop.is_set():
                assert rig.transport.read(mmio.MAGIC_VALUE, 4) == 0x74726976
                if rig.transport.read(mmio.INTERRUPT_STATUS, 4):
                    rig.transport.write(mmio.INTERRUPT_ACK, 4, mmio.INT_VRING)
                rig.transport.read(mmio.CONFIG, 8)
        except Exception as e:   # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=vcpu)
    t.start()
    try:
        for i in range(200):
            status, data, _ = rig.blk(VIRTIO_BLK_T_IN, i, in_len=512)
            assert status == 0
    finally:
        stop.set()
        t.join()
    assert errors == []
    assert disk.violations == []


@pytest.mark.parametrize("device", ["blk", "rng"])
def test_reset_from_the_board(make_rig, device):
    rig = make_rig(VirtioBlk(FakeDisk(MiB)) if device == "blk" else VirtioRng())
    rig.driver.init()
    rig.transport.reset()
    assert rig.driver.status == 0
    assert rig.driver.read(mmio.INTERRUPT_STATUS) == 0
