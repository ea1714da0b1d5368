"""ConsoleLog (forwarding, bounded tail, waiting for text) and IoThread (fd callbacks and queued calls)."""
import logging
import os
import select
import threading
import time

import pytest

from cloudkvm.console import ConsoleLog
from cloudkvm.iothread import IoThread

WAIT = 5.0  # generous upper bound for cross-thread events; the tests normally finish in milliseconds


@pytest.fixture
def pipe():
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


# --- ConsoleLog -------------------------------------------------------------------------------------------

def test_console_forwards_every_byte_to_the_fd(pipe):
    r, w = pipe
    log = ConsoleLog(fd=w)
    log.write(b"hello ")
    log.write(b"\x00\xffworld\n")
    assert os.read(r, 100) == b"hello \x00\xffworld\n"
    assert log.text() == "hello \x00\ufffdworld\n"   # invalid UTF-8 is replaced, not fatal


def test_console_without_fd_only_keeps_the_tail():
    log = ConsoleLog()
    log.write(b"abc")
    assert log.text() == "abc"


def test_tail_is_bounded_and_keeps_the_newest_bytes():
    log = ConsoleLog(tail_limit=8)
    log.write(b"0123")
    assert log.text() == "0123"
    log.write(b"456789")
    assert log.text() == "23456789"
    log.write(b"ABCDEFGHIJKL")  # a single write longer than the limit
    assert log.text() == "EFGHIJKL"
    assert len(log._tail) == 8


def test_tail_limit_does_not_limit_forwarding(pipe):
    r, w = pipe
    log = ConsoleLog(fd=w, tail_limit=4)
    log.write(b"0123456789")
    assert os.read(r, 100) == b"0123456789"
    assert log.text() == "6789"


def test_wait_for_text_already_there_returns_at_once():
    log = ConsoleLog()
    log.write(b"login: ")
    start = time.monotonic()
    assert log.wait_for(b"login", 0) is True
    assert log.wait_for(b"login", 10) is True
    assert time.monotonic() - start < 1


def test_wait_for_text_written_by_another_thread():
    log = ConsoleLog()

    def writer():
        time.sleep(0.05)
        log.write(b"booting... rea")
        time.sleep(0.05)
        log.write(b"dy\n")      # the needle is split across two writes
    t = threading.Thread(target=writer)
    start = time.monotonic()
    t.start()
    assert log.wait_for(b"ready", WAIT) is True
    assert time.monotonic() - start < WAIT
    t.join()


def test_wait_for_times_out():
    log = ConsoleLog()
    log.write(b"nothing interesting")
    start = time.monotonic()
    assert log.wait_for(b"ready", 0.2) is False
    elapsed = time.monotonic() - start
    assert 0.19 <= elapsed < 2


def test_wait_for_keeps_waiting_through_unrelated_output():
    log = ConsoleLog()
    stop = threading.Event()

    def chatter():
        while not stop.is_set():
            log.write(b".")
            time.sleep(0.01)
    t = threading.Thread(target=chatter)
    t.start()
    try:
        start = time.monotonic()
        assert log.wait_for(b"done", 0.3) is False
        assert time.monotonic() - start >= 0.29
    finally:
        stop.set()
        t.join()


def test_text_that_fell_out_of_the_tail_is_not_found():
    log = ConsoleLog(tail_limit=4)
    log.write(b"ready....")
    assert log.wait_for(b"ready", 0) is False


def test_closed_reader_does_not_raise_and_stops_forwarding(pipe):
    r, w = pipe
    log = ConsoleLog(fd=w)
    os.close(r)
    log.write(b"into the void")      # EPIPE: swallowed
    assert log.fd is None
    log.write(b" and more")
    assert log.text() == "into the void and more"


def test_closed_fd_does_not_raise(pipe):
    r, w = pipe
    log = ConsoleLog(fd=w)
    os.close(w)
    log.write(b"x")                  # EBADF: swallowed
    assert log.fd is None
    assert log.text() == "x"


# --- IoThread ---------------------------------------------------------------------------------------------

@pytest.fixture
def io():
    t = IoThread(name="test-io")
    t.start()
    yield t
    t.stop()


def test_add_reader_runs_the_callback_on_the_io_thread(io, pipe):
    r, w = pipe
    got, threads, done = [], [], threading.Event()

    def on_readable():
        got.append(os.read(r, 100))
        threads.append(threading.current_thread().name)
        done.set()
    io.add_reader(r, on_readable)
    os.write(w, b"ping")
    assert done.wait(WAIT)
    assert got == [b"ping"]
    assert threads == ["test-io"]
    done.clear()
    os.write(w, b"again")
    assert done.wait(WAIT)
    assert got == [b"ping", b"again"]


def test_call_soon_runs_in_order_on_the_io_thread(io):
    ran, done = [], threading.Event()
    for i in range(5):
        io.call_soon(lambda i=i: ran.append((i, threading.current_thread().name)))
    io.call_soon(done.set)
    assert done.wait(WAIT)
    assert ran == [(i, "test-io") for i in range(5)]


def test_calls_queued_before_start_run_after_start():
    t = IoThread(name="late-io")
    done = threading.Event()
    t.call_soon(done.set)
    assert not done.wait(0.05)
    t.start()
    try:
        assert done.wait(WAIT)
    finally:
        t.stop()


def test_remove_reader_stops_callbacks(io, pipe):
    r, w = pipe
    calls, removed = [], threading.Event()
    io.add_reader(r, lambda: calls.append(os.read(r, 100)))
    io.remove_reader(r)
    io.call_soon(removed.set)
    assert removed.wait(WAIT)
    os.write(w, b"unheard")
    flushed = threading.Event()
    time.sleep(0.05)
    io.call_soon(flushed.set)
    assert flushed.wait(WAIT)
    assert calls == []
    io.remove_reader(r)            # removing twice is harmless
    io.remove_reader(12345)        # so is removing an fd never added
    still_alive = threading.Event()
    io.call_soon(still_alive.set)
    assert still_alive.wait(WAIT)


def test_a_raising_callback_is_removed_and_others_keep_being_served(io, caplog):
    caplog.set_level(logging.ERROR, logger="cloudkvm.io")
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        bad_calls, good = [], []
        good_event = threading.Event()

        def bad():
            bad_calls.append(1)
            raise RuntimeError("device model bug")  # leaves the data unread: level-triggered, would spin

        def fine():
            good.append(os.read(r2, 100))
            good_event.set()
        io.add_reader(r1, bad)
        io.add_reader(r2, fine)
        os.write(w1, b"boom")
        for i in range(3):
            good_event.clear()
            os.write(w2, b"%d" % i)
            assert good_event.wait(WAIT)
        assert b"".join(good) == b"012"
        assert bad_calls == [1]     # called once, then unregistered
        assert any("removing it" in r.getMessage() and r.exc_info for r in caplog.records
                   if r.name == "cloudkvm.io")
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)


def test_a_raising_call_does_not_stop_the_loop(io, caplog):
    caplog.set_level(logging.ERROR, logger="cloudkvm.io")
    done = threading.Event()

    def boom():
        raise ValueError("queued call bug")
    io.call_soon(boom)
    io.call_soon(done.set)
    assert done.wait(WAIT)
    later = threading.Event()
    io.call_soon(later.set)
    assert later.wait(WAIT)
    assert any("call failed" in r.getMessage() for r in caplog.records if r.name == "cloudkvm.io")


def test_stop_joins_the_thread_and_closes_the_wake_fd():
    t = IoThread(name="stop-io")
    t.start()
    assert t._thread.is_alive()
    wake = t._wake
    t.stop()
    assert not t._thread.is_alive()
    with pytest.raises(OSError):
        os.fstat(wake)
    t.stop()                        # a second stop is a no-op


def test_stop_without_start_is_a_no_op():
    t = IoThread(name="never-started")
    t.stop()
    assert not t._thread.is_alive()
    os.close(t._wake)


# --- IoThread: timers, poll sources, run_sync ---------------------------------------------------------------

def test_call_later_runs_after_the_delay_in_deadline_order(io):
    ran, done = [], threading.Event()
    start = time.monotonic()
    io.call_later(0.10, lambda: (ran.append("b"), done.set()))
    io.call_later(0.05, lambda: ran.append(("a", threading.current_thread().name, time.monotonic() - start)))
    assert done.wait(WAIT)
    assert ran[0][0:2] == ("a", "test-io") and ran[0][2] >= 0.045
    assert ran[1] == "b"


def test_call_later_wakes_a_sleeping_loop_promptly(io):
    time.sleep(0.05)                           # the loop sleeps in poll() with nothing to do
    done = threading.Event()
    start = time.monotonic()
    io.call_later(0.02, done.set)
    assert done.wait(WAIT)
    assert time.monotonic() - start < 0.5


def test_a_cancelled_timer_does_not_run(io):
    ran, later = [], threading.Event()
    handle = io.call_later(0.05, lambda: ran.append(1))
    handle.cancel()
    handle.cancel()                            # twice is harmless
    io.call_later(0.1, later.set)
    assert later.wait(WAIT)
    assert ran == []


def test_timers_set_on_the_io_thread_and_raising_timers(io, caplog):
    caplog.set_level(logging.ERROR, logger="cloudkvm.io")
    done = threading.Event()

    def boom():
        raise RuntimeError("timer bug")
    io.call_soon(lambda: io.call_later(0.01, boom))
    io.call_soon(lambda: io.call_later(0.03, done.set))
    assert done.wait(WAIT)
    assert any("timer call failed" in r.getMessage() for r in caplog.records if r.name == "cloudkvm.io")


def test_poll_source_sees_its_fds_and_is_dispatched_after_every_wait(io, pipe):
    r, w = pipe
    fills, dispatched, got = [], [], threading.Event()

    def fill():
        fills.append(1)
        return [(r, select.POLLIN)], 0.05

    def dispatch(revents):
        dispatched.append(dict(revents))
        if revents.get(r, 0) & select.POLLIN:
            os.read(r, 100)
            got.set()
    io.add_poll_source(fill, dispatch)
    time.sleep(0.3)
    idle = [d for d in dispatched if not d]
    assert 3 <= len(idle) <= 12                # woken by the source's 50 ms timeout: no spinning, no oversleeping
    os.write(w, b"x")
    assert got.wait(WAIT)
    assert any(d.get(r, 0) & select.POLLIN for d in dispatched)


def test_an_idle_loop_sleeps(io):
    fills = []
    io.add_poll_source(lambda: (fills.append(1) or [], None), lambda revents: None)
    time.sleep(0.3)
    assert 1 <= len(fills) <= 3                # nothing to do: one wait, no busy polling


def test_remove_poll_source_stops_calls(io, pipe):
    r, w = pipe
    calls = []
    source = io.add_poll_source(lambda: ([(r, select.POLLIN)], 0.01), lambda rev: calls.append(rev))
    time.sleep(0.05)
    io.remove_poll_source(source)
    io.run_sync(lambda: None)
    count = len(calls)
    time.sleep(0.1)
    assert len(calls) == count and count > 0


def test_a_raising_poll_source_is_removed_and_the_loop_goes_on(io, caplog):
    caplog.set_level(logging.ERROR, logger="cloudkvm.io")
    bad_fills, bad_dispatches = [], []

    def bad_fill():
        bad_fills.append(1)
        raise RuntimeError("fill bug")

    def bad_dispatch(revents):
        bad_dispatches.append(1)
        raise RuntimeError("dispatch bug")
    io.add_poll_source(bad_fill, lambda revents: None)
    io.add_poll_source(lambda: ([], 0.01), bad_dispatch)
    time.sleep(0.1)
    assert bad_fills == [1] and bad_dispatches == [1]
    assert io.run_sync(lambda: 42) == 42
    messages = [r.getMessage() for r in caplog.records if r.name == "cloudkvm.io"]
    assert any("fill failed" in m for m in messages) and any("dispatch failed" in m for m in messages)


def test_run_sync_returns_values_and_raises_exceptions(io):
    assert io.run_sync(lambda: threading.current_thread().name) == "test-io"
    with pytest.raises(ZeroDivisionError):
        io.run_sync(lambda: 1 / 0)
    assert io.run_sync(lambda: io.run_sync(lambda: "nested")) == "nested"   # on the I/O thread: direct


def test_run_sync_without_a_running_loop_runs_directly():
    t = IoThread(name="idle-io")
    try:
        assert t.run_sync(lambda: threading.current_thread().name) == threading.current_thread().name
    finally:
        os.close(t._wake)


def test_a_reader_whose_fd_was_closed_is_dropped(io, caplog):
    caplog.set_level(logging.ERROR, logger="cloudkvm.io")
    r, w = os.pipe()
    io.add_reader(r, lambda: os.read(r, 100))
    io.run_sync(lambda: None)
    os.close(r)
    os.close(w)
    io.call_soon(lambda: None)                 # a turn of the loop sees POLLNVAL
    time.sleep(0.05)
    assert io.run_sync(lambda: r not in io._readers)
    assert any("closed while still watched" in rec.getMessage() for rec in caplog.records)
