"""The I/O thread's wait in C (kvm/iowait.py, kvm/ioloop.c) without libslirp: Python's fds, time-outs, a queue's
ioeventfd served in C (notify.c), a queue whose ioeventfd was closed, and an IoThread whose loop waits there."""
import logging
import os
import select
import threading
import time

from cloudkvm.iothread import IoThread
from cloudkvm.kvm.iowait import NativeWait
from cloudkvm.kvm.native import ffi


def _queue(efd: int, python_fd: int):
    """A notify queue whose serve always hands on to Python (no transport live: nothing else is touched)."""
    transport = ffi.new("struct ckvm_transport *")
    nq = ffi.new("struct ckvm_notify_queue *", {"efd": efd, "python_fd": python_fd, "kind": 0, "t": transport})
    return nq, transport


def test_a_ready_python_fd_is_returned_with_its_events():
    r, w = os.pipe()
    try:
        wait = NativeWait()
        wait.set_fds({r: select.POLLIN})
        os.write(w, b"x")
        assert wait.wait(1000) == [(r, select.POLLIN)]
    finally:
        os.close(r)
        os.close(w)


def test_nothing_ready_returns_after_the_time_out():
    r, w = os.pipe()
    try:
        wait = NativeWait()
        wait.set_fds({r: select.POLLIN})
        start = time.monotonic()
        assert wait.wait(60) == []
        assert time.monotonic() - start >= 0.055
    finally:
        os.close(r)
        os.close(w)


def test_a_queue_notification_is_served_in_c_and_what_it_hands_on_wakes_python():
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    python_fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        nq, _transport = _queue(efd, python_fd)
        wait = NativeWait()
        assert wait.add_queue(nq) and wait.active
        wait.set_fds({python_fd: select.POLLIN})
        os.eventfd_write(efd, 1)
        assert wait.wait(2000) == [(python_fd, select.POLLIN)]   # served in C, handed on, then Python's fd fired
        assert nq.forwarded == 1 and os.eventfd_read(python_fd) == 1
        assert wait.turns >= 2 and wait.waits == 1
    finally:
        os.close(efd)
        os.close(python_fd)


def test_a_queue_whose_ioeventfd_was_closed_is_dropped_with_an_error(caplog):
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    nq, _transport = _queue(efd, -1)
    wait = NativeWait()
    wait.add_queue(nq)
    os.close(efd)
    with caplog.at_level(logging.ERROR, logger="cloudkvm.io"):
        assert wait.wait(1000) == []
    assert wait.queues == [] and not wait.active
    assert "was closed" in caplog.text


def test_an_io_thread_waiting_in_c_runs_readers_timers_and_calls():
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    python_fd = os.eventfd(0, os.EFD_NONBLOCK)
    r, w = os.pipe()
    io = IoThread(name="iowait-test")
    try:
        nq, _transport = _queue(efd, python_fd)
        assert io.serve_in_c(nq)
        got, timer_fired, called = [], threading.Event(), threading.Event()
        io.add_reader(r, lambda: got.append(os.read(r, 10)))
        io.start()
        os.write(w, b"ping")
        # a timer made on the I/O thread while it waits in C wakes it (call_later writes the wake eventfd)
        io.call_soon(lambda: io.call_later(0.05, timer_fired.set))
        assert timer_fired.wait(5)
        io.call_soon(called.set)
        assert called.wait(5)
        deadline = time.monotonic() + 5
        while got != [b"ping"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got == [b"ping"]
        assert io.native.waits >= 2
    finally:
        io.stop()
        for fd in (efd, python_fd, r, w):
            os.close(fd)


class _BrokenOwner:
    """A libslirp owner whose hook before the wait raises: the I/O thread must go on polling it the Python way."""

    def __init__(self):
        self.hook = ffi.new("struct ckvm_slirp_hook *")   # no libslirp in it: C would skip it anyway
        self.source = None
        self.fills = threading.Event()

    def before_wait(self):
        raise RuntimeError("broken on purpose")

    def after_wait(self):
        pass

    def fill(self):
        self.fills.set()
        return (), None

    def dispatch(self, revents):
        pass


def test_a_libslirp_owner_whose_hooks_fail_is_polled_the_python_way(caplog):
    owner = _BrokenOwner()
    io = IoThread(name="iowait-broken")
    try:
        with caplog.at_level(logging.ERROR, logger="cloudkvm.io"):
            io.add_slirp(owner)
            io.start()
            assert owner.fills.wait(5)            # its fill runs as a poll source now
        assert owner.source is not None
        assert "polled the Python way" in caplog.text
        assert io.run_sync(lambda: io.native.active) is False
    finally:
        io.stop()


def test_libslirps_poll_events_convert_both_ways_as_libslirp_h_and_poll_2_define_them():
    """SLIRP_POLL_IN/OUT/PRI/ERR/HUP are 1/2/4/8/16 (libslirp.h); a closed fd (POLLNVAL) is an error for libslirp."""
    from cloudkvm.kvm.native import lib

    pairs = ((1, select.POLLIN), (2, select.POLLOUT), (4, select.POLLPRI), (8, select.POLLERR), (16, select.POLLHUP))
    for slirp_bit, poll_bit in pairs:
        assert lib.ckvm_slirp_to_poll(slirp_bit) == poll_bit
        assert lib.ckvm_poll_to_slirp(poll_bit) == slirp_bit
    assert lib.ckvm_slirp_to_poll(31) == select.POLLIN | select.POLLOUT | select.POLLPRI | select.POLLERR | select.POLLHUP
    assert lib.ckvm_poll_to_slirp(select.POLLNVAL) == 8
    assert lib.ckvm_poll_to_slirp(select.POLLIN | select.POLLNVAL | select.POLLHUP) == 1 | 8 | 16
