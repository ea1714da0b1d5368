"""Notifications served in C (devices/virtio/notifier.py, kvm/notify.c) by the real thread: a virtio-blk read
notified through an eventfd (as KVM's ioeventfd would) is served and interrupted by C alone; what C leaves (a flush,
a transport that is not live) reaches Python through the queue's python_fd; the lock is the transport's."""
import os
import resource
import select
import threading
import time

import pytest

from cloudkvm.devices.virtio import mmio
from cloudkvm.devices.virtio.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VirtioBlk
from cloudkvm.devices.virtio.notifier import Notifier
from cloudkvm.devices.virtio.queue import VIRTIO_F_EVENT_IDX
from virtio_driver import MiB, FakeDisk, Rig


class Threaded:
    """A blk rig whose QueueNotify writes go to an eventfd the notifier's thread polls; each kick waits until the
    thread has answered (served in C, or handed on through python_fd, which is then notified to the transport here,
    as the I/O thread does)."""

    def __init__(self, memory):
        self.disk = FakeDisk(MiB, native=True)
        self.disk.data[:4096] = bytes(range(256)) * 16
        self.rig = Rig(memory, VirtioBlk(self.disk), notifier=True)   # the irqfd; its synchronous path unused
        self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.notifier = Notifier()
        self.python_fd = self.notifier.add(self.efd, self.rig.transport, 0)
        self.rig.driver.on_notify = self.kick
        self.handed_on = 0

    def kick(self, index: int) -> None:
        answered = self.notifier.served + self.notifier.forwarded
        os.eventfd_write(self.efd, 1)
        deadline = time.monotonic() + 10
        while self.notifier.served + self.notifier.forwarded == answered:
            assert time.monotonic() < deadline, "the notifier's thread answered nothing in 10 s"
            time.sleep(0.001)
        if select.select([self.python_fd], [], [], 0)[0]:
            os.eventfd_read(self.python_fd)
            self.handed_on += 1
            self.rig.transport.queue_notify(index)

    def close(self) -> None:
        self.notifier.close()
        os.close(self.efd)
        self.disk.close()


@pytest.fixture
def threaded(memory):
    t = Threaded(memory)
    yield t
    t.close()


def test_a_read_is_served_and_interrupted_by_the_thread_alone(threaded):
    t = threaded
    t.rig.driver.init(accept=~(1 << VIRTIO_F_EVENT_IDX))   # every used buffer interrupts (§2.7.7.1)
    t.notifier.start()
    irqs = t.rig.irqs
    status, data, used_len = t.rig.blk(VIRTIO_BLK_T_IN, 0, in_len=4096)   # (the rig's map knows the disk)
    assert status == VIRTIO_BLK_S_OK and data == bytes(range(256)) * 16 and used_len == 4097
    assert t.notifier.served == 1 and t.handed_on == 0
    assert t.rig.irqs == irqs + 1                                   # C wrote the irqfd
    assert t.rig.transport.interrupt_status & mmio.INT_VRING         # and set InterruptStatus before it


def test_the_thread_is_favoured_over_the_vcpus_where_the_host_allows(threaded):
    """On a CPU it shares with a vCPU, the thread that copies every request must take the CPU at the guest's kick
    (its process's nice - 5, notify.c): the nice /proc shows for its thread, when this process may lower a nice
    (root, as in CI), else the process's."""
    t = threaded
    t.notifier.start()
    deadline = time.monotonic() + 10
    while not t.notifier.thread_id:
        assert time.monotonic() < deadline, "the thread never ran"
        time.sleep(0.001)
    with open(f"/proc/self/task/{t.notifier.thread_id}/stat") as f:
        nice = int(f.read().rsplit(")", 1)[1].split()[16])   # proc(5): field 19, nice
    own = os.getpriority(os.PRIO_PROCESS, 0)
    favoured = max(-20, own - 5)
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    may_lower = os.geteuid() == 0 or 20 - soft <= favoured
    assert nice == (favoured if may_lower else own)


def test_what_c_leaves_reaches_python_through_python_fd(threaded):
    t = threaded
    t.rig.driver.init()
    t.notifier.start()
    status, _, _ = t.rig.blk(VIRTIO_BLK_T_FLUSH)                  # not a plain read or write: blk.py's
    assert status == VIRTIO_BLK_S_OK
    assert t.handed_on == 1 and t.notifier.forwarded == 1 and t.notifier.served == 0


def test_a_notification_before_driver_ok_goes_to_python(threaded, caplog):
    t = threaded
    t.notifier.start()
    t.rig.driver.on_notify(0)                                         # nothing set up: not live
    assert t.handed_on == 1 and t.notifier.served == 0
    assert "not live" in caplog.text                                  # and mmio.py said so, as before


def test_the_thread_waits_for_the_transport_lock(threaded):
    t = threaded
    t.rig.driver.init()
    t.notifier.start()
    done = threading.Event()
    with t.rig.transport.lock:                                        # a register access in progress
        worker = threading.Thread(target=lambda: (t.rig.blk(VIRTIO_BLK_T_IN, 0, in_len=512), done.set()))
        worker.start()
        assert not done.wait(0.3)                                     # C waits behind the lock
    worker.join(10)
    assert done.is_set() and t.notifier.served == 1


def test_stop_ends_the_thread_and_close_is_idempotent(threaded):
    t = threaded
    t.rig.driver.init()
    t.notifier.start()
    assert t.notifier.native.running
    t.notifier.stop()
    assert not t.notifier.native.running
    t.notifier.close()
    t.notifier.close()


def test_a_thread_that_cannot_go_on_says_so_and_wakes_python_on_every_queue(memory):
    """An ioeventfd going bad (here a pipe whose writer closed: POLLHUP) ends the thread; it records why and writes
    every python_fd once, so the I/O thread takes its queues over (Machine._handed_on)."""
    rig = Rig(memory, VirtioBlk(FakeDisk(MiB, native=True)), notifier=True)
    reader, writer = os.pipe()
    notifier = Notifier()
    try:
        python_fd = notifier.add(reader, rig.transport, 0)
        notifier.start()
        os.close(writer)
        assert select.select([python_fd], [], [], 10)[0] == [python_fd]
        assert notifier.failed != 0 and notifier.watched == [(reader, rig.transport, 0)]
    finally:
        notifier.close()
        os.close(reader)


def test_the_interrupt_decision_moves_nothing_when_the_rings_are_unusable(memory):
    from cloudkvm.devices.virtio.queue import Virtqueue
    from cloudkvm.kvm.native import quick
    q = Virtqueue(memory, 8)
    q.size, q.avail_ring, q.used_ring = 8, memory.size + 0x1000, 0x2000   # the driver area outside RAM
    q.used_idx = 3
    assert memory.call_quick(quick.ckvm_vq_needs_interrupt, q._native_vq_address) == -1
    assert q._signalled_used == 0                                         # decided nothing
