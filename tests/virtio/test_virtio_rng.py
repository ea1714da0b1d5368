"""virtio-rng: every writable buffer is filled from the host's randomness, up to a bound per request."""
from cloudkvm.devices.virtio import VirtioRng, mmio


def test_fills_the_buffer(rng):
    buf = rng.alloc.alloc(256, fill=0)
    head = rng.queue.submit([(buf, 256, True)])
    assert rng.queue.get_used() == [(head, 256)]
    data = rng.memory.read(buf, 256)
    assert data != bytes(256) and len(set(data)) > 64
    assert rng.irqs == 1
    assert rng.driver.config(0, 4) == 0     # no configuration space


def test_several_buffers_in_one_chain_are_filled_in_order(make_rig):
    rig = make_rig(VirtioRng(source=lambda n: b"\xab" * n))
    rig.driver.init()
    a, b = rig.alloc.alloc(10), rig.alloc.alloc(20)
    rig.queue.submit([(a, 10, True), (b, 20, True)])
    assert rig.queue.get_used()[0][1] == 30
    assert rig.memory.read(a, 10) + rig.memory.read(b, 20) == b"\xab" * 30


def test_bounded_per_request(make_rig):
    rig = make_rig(VirtioRng(max_per_request=100, source=lambda n: b"\x01" * n))
    rig.driver.init()
    a, b = rig.alloc.alloc(64), rig.alloc.alloc(64)
    rig.queue.submit([(a, 64, True), (b, 64, True)])
    assert rig.queue.get_used()[0][1] == 100
    assert rig.memory.read(b, 64) == b"\x01" * 36 + bytes(28)


def test_default_bound_is_64_kib(rng):
    buf = rng.alloc.alloc(128 << 10)
    rng.queue.submit([(buf, 128 << 10, True)])
    assert rng.queue.get_used()[0][1] == 64 << 10


def test_readable_buffers_are_not_written(make_rig):
    rig = make_rig(VirtioRng(source=lambda n: b"\xcc" * n))
    rig.driver.init()
    r, w = rig.alloc.alloc(16, fill=0x11), rig.alloc.alloc(16)
    rig.queue.submit([(r, 16, False), (w, 16, True)])
    assert rig.queue.get_used()[0][1] == 16
    assert rig.memory.read(r, 16) == b"\x11" * 16
    assert rig.memory.read(w, 16) == b"\xcc" * 16


def test_bad_chain_is_returned_empty_without_a_reset(rng):
    q = rng.queue
    q.submit([(rng.memory.size + 0x1000, 16, True)])     # outside RAM
    assert q.get_used()[0][1] == 0
    assert not rng.driver.status & mmio.DEVICE_NEEDS_RESET
    buf = rng.alloc.alloc(8)
    q.submit([(buf, 8, True)])
    assert q.get_used()[0][1] == 8
