"""IoThread.add_writer / remove_writer: callbacks when an fd can take more output, next to readers on the same fd."""
import logging
import os
import socket
import threading
import time

import pytest

from cloudkvm.iothread import IoThread
from waits import wait_for

WAIT = 5.0


@pytest.fixture
def io():
    t = IoThread(name="test-io")
    t.start()
    yield t
    t.stop()


@pytest.fixture
def full_pipe():
    """A non-blocking pipe whose buffer is full: not writable until someone reads."""
    r, w = os.pipe2(os.O_NONBLOCK)
    filled = 0
    while True:
        try:
            filled += os.write(w, b"x" * 65536)
        except BlockingIOError:
            break
    yield r, w, filled
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def test_a_writer_runs_only_once_the_fd_can_take_output_and_on_the_io_thread(io, full_pipe):
    r, w, filled = full_pipe
    calls, ready = [], threading.Event()

    def writable():
        calls.append(threading.current_thread().name)
        io.remove_writer(w)
        ready.set()
    io.add_writer(w, writable)
    time.sleep(0.2)
    assert calls == []                      # full: no callback, and no spinning either
    drained = 0
    while drained < filled:
        drained += len(os.read(r, 1 << 20))
    assert ready.wait(WAIT)
    time.sleep(0.1)
    assert calls == ["test-io"]              # removed by itself: called once


def test_a_reader_and_a_writer_on_one_fd_and_removing_one_keeps_the_other(io):
    left, right = socket.socketpair()  # both directions on one fd
    try:
        left.setblocking(False)
        reads, writes = [], threading.Event()
        io.add_reader(left.fileno(), lambda: reads.append(left.recv(100)))
        io.add_writer(left.fileno(), writes.set)
        assert writes.wait(WAIT)            # an empty socket buffer: writable at once
        io.remove_writer(left.fileno())
        io.run_sync(lambda: None)
        writes.clear()
        right.send(b"ping")
        assert wait(lambda: reads == [b"ping"])
        assert not writes.is_set()          # the writer is gone, the reader stays
        io.remove_reader(left.fileno())
        io.add_writer(left.fileno(), writes.set)
        assert writes.wait(WAIT)            # a writer alone on the fd
        io.remove_writer(left.fileno())
        assert io.run_sync(lambda: left.fileno() not in io._registered)  # nothing left watching it
    finally:
        left.close()
        right.close()


def test_a_raising_writer_is_removed_and_the_loop_goes_on(io, caplog):
    caplog.set_level(logging.ERROR, logger="cloudkvm.io")
    r, w = os.pipe()
    try:
        calls = []

        def bad():
            calls.append(1)
            raise RuntimeError("writer bug")  # leaves the fd writable: level-triggered, would spin
        io.add_writer(w, bad)
        time.sleep(0.1)
        assert calls == [1]
        assert io.run_sync(lambda: 42) == 42
        assert any("removing it" in rec.getMessage() for rec in caplog.records if rec.name == "cloudkvm.io")
    finally:
        os.close(r)
        os.close(w)


def wait(predicate, timeout=WAIT) -> bool:
    return wait_for(predicate, timeout, interval=0.01)


def test_a_timer_months_ahead_does_not_stop_the_loop(io):
    """poll() takes at most 2^31-1 ms (24.8 days): a guest RTC alarm set 30 days ahead (PL031 MR, `rtcwake -s
    2592000`) must not end the I/O thread that serves disks, network, console and the control socket."""
    io.call_later(30 * 86400, lambda: None)
    ran = threading.Event()
    io.call_soon(ran.set)
    assert ran.wait(WAIT) and io.running
    time.sleep(0.2)  # the loop has gone round and polled with that timer due next
    ran.clear()
    io.call_soon(ran.set)
    assert ran.wait(WAIT) and io.running
