"""The I/O thread: one `poll()` loop for host-side fds (console input, eventfds, sockets; readable and writable),
timers, queued calls and poll sources (libslirp's sockets).

Each turn of the loop: every poll source's `fill()` says which fds it wants watched (and how long it may wait at
most); the loop blocks in `poll()` until an fd is ready, the nearest timer or source timeout is due, or
`call_soon` wakes it (an eventfd); then it runs the ready fd callbacks, every poll source's `dispatch(revents)`,
the due timers and the queued calls. Nothing spins: an idle loop sleeps in `poll()`.

Work that needs no Python is done while waiting, in C (kvm/iowait.py, kvm/ioloop.c): the notifications of queues
handed over with `serve_in_c`, and the sockets of one libslirp (`add_slirp`: net/slirp.py). The wait then returns
only when one of the fds above is ready or a timer is due."""
from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import select
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable

log = logging.getLogger("cloudkvm.io")
MAX_POLL_MS = 3_600_000  # a far timer (a guest RTC alarm months ahead) wakes the loop hourly: poll() takes < 2^31 ms

_READABLE = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR
_WRITABLE = select.POLLOUT | select.POLLHUP | select.POLLERR

Fill = Callable[[], "tuple[Iterable[tuple[int, int]], float | None]"]
Dispatch = Callable[[dict[int, int]], None]


class TimerHandle:
    """A call scheduled with `IoThread.call_later`; `cancel()` it from any thread (a no-op once it ran)."""

    __slots__ = ("when", "fn", "cancelled", "_io")

    def __init__(self, when: float, fn: Callable[[], None], io: "IoThread"):
        self.when = when
        self.fn = fn
        self.cancelled = False
        self._io = io

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._io._timer_cancelled()

    def __repr__(self) -> str:
        return f"<TimerHandle in {self.when - time.monotonic():.3f}s{' cancelled' if self.cancelled else ''}>"


class PollSource:
    """fds that change every turn of the loop (see `IoThread.add_poll_source`)."""

    __slots__ = ("fill", "dispatch", "fds", "pairs", "filled", "removed")

    def __init__(self, fill: Fill, dispatch: Dispatch):
        self.fill = fill
        self.dispatch = dispatch
        self.fds: set[int] = set()
        self.pairs: list[tuple[int, int]] = []
        self.filled = False
        self.removed = False


class IoThread:
    """Runs callbacks when fds become readable, timers, poll sources; other threads hand it work with
    `call_soon`."""

    def __init__(self, name: str = "cloudkvm-io"):
        self._poll = select.poll()
        self._registered: dict[int, int] = {}       # fd -> events currently registered with poll()
        self._watch_version = 0                      # bumped whenever a reader, writer or source comes or goes
        self._prepared_version = -1                  # the version the registered set was built for
        self._readers: dict[int, Callable[[], None]] = {}
        self._writers: dict[int, Callable[[], None]] = {}
        self._sources: list[PollSource] = []
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._timer_seq = itertools.count()
        self._timer_lock = threading.Lock()
        self._cancelled = 0
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._calls: deque[Callable[[], None]] = deque()
        self._running = False
        self._closed = False
        self._closing = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._native = None                          # kvm/iowait.py NativeWait, once something is served in C
        self._native_stale = True                    # Python's fds changed since the native wait last had them
        self._native_waiting = False                 # the loop is in the native wait (a new timer must wake it)
        self._slirp = None                           # the libslirp (net/slirp.py backend) the native wait serves

    # --- fds ------------------------------------------------------------------------------------------------
    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call `callback()` on the I/O thread whenever `fd` is readable (or hung up / in error). A callback that
        raises is logged and removed."""
        def add():
            self._readers[fd] = callback
            self._watch_version += 1
        self.now_or_soon(add)

    def remove_reader(self, fd: int) -> None:
        """Stop watching `fd`. On the I/O thread this happens at once, so the fd can be closed right after."""
        def remove():
            self._readers.pop(fd, None)
            self._watch_version += 1
            self._forget_if_unwatched(fd)
        self.now_or_soon(remove)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        """Call `callback()` on the I/O thread whenever `fd` is writable (or hung up / in error), until
        `remove_writer`: for output a non-blocking fd could not take at once. A callback that raises is logged and
        removed."""
        def add():
            self._writers[fd] = callback
            self._watch_version += 1
        self.now_or_soon(add)

    def remove_writer(self, fd: int) -> None:
        """Stop waiting for `fd` to be writable (at once on the I/O thread, so the fd can be closed right after)."""
        def remove():
            self._writers.pop(fd, None)
            self._watch_version += 1
            self._forget_if_unwatched(fd)
        self.now_or_soon(remove)

    def _forget_if_unwatched(self, fd: int) -> None:
        if fd in self._registered and fd not in self._readers and fd not in self._writers \
                and not any(fd in s.fds for s in self._sources):
            self._unregister(fd)

    def add_poll_source(self, fill: Fill, dispatch: Dispatch) -> PollSource:
        """fds chosen anew every turn of the loop. Before each wait the loop calls `fill()`, which returns
        `(pairs, timeout)`: `(fd, events)` pairs (`select.POLLIN | POLLOUT | POLLPRI ...`) and the longest the loop
        may sleep in seconds (None: no limit). After each wait, timeout or not, it calls `dispatch(revents)` with
        `{fd: revents}` for that source's fds that had events (possibly empty). Both run on the I/O thread; one
        that raises is logged and the source removed. Returns a handle for `remove_poll_source`."""
        source = PollSource(fill, dispatch)

        def add():
            self._sources.append(source)
            self._watch_version += 1
        self.now_or_soon(add)
        return source

    def remove_poll_source(self, source: PollSource) -> None:
        """Stop calling the source (at once on the I/O thread)."""
        def remove():
            source.removed = True
            if source in self._sources:
                self._sources.remove(source)
            self._watch_version += 1
        self.now_or_soon(remove)

    # --- work served in C ----------------------------------------------------------------------------------------
    def _native_wait(self):
        if self._native is None:
            from .kvm.iowait import NativeWait  # noqa: PLC0415  (machines without C-served work never load it)
            self._native = NativeWait()
        return self._native

    @property
    def native(self):
        """The wait in C (kvm/iowait.py NativeWait, its counters), or None while nothing is served in C."""
        return self._native

    def serve_in_c(self, nq) -> bool:
        """Serve a queue's notifications in the wait (`nq`: a `struct ckvm_notify_queue`, kvm/notify.c), before the
        loop starts. False when no more fit: the caller watches its ioeventfd itself."""
        if self._running:
            raise RuntimeError("queues are handed to the I/O thread before it starts")
        return self._native_wait().add_queue(nq)

    def add_slirp(self, owner) -> None:
        """Serve a libslirp in the wait: `owner.hook` (a `struct ckvm_slirp_hook *`), with `owner.before_wait()` and
        `owner.after_wait()` run around each wait. One libslirp is served so; another owner's is polled the Python
        way, as a poll source of its `fill` and `dispatch`."""
        def add():
            if self._slirp is None:
                self._slirp = owner
                self._native_wait().set_slirp(owner.hook)
            else:
                owner.source = self.add_poll_source(owner.fill, owner.dispatch)
        self.now_or_soon(add)

    def remove_slirp(self, owner) -> None:
        """Stop serving `owner`'s libslirp (at once on the I/O thread)."""
        def remove():
            if self._slirp is owner:
                self._slirp = None
                self._native.set_slirp(None)
            elif owner.source is not None:
                self.remove_poll_source(owner.source)
                owner.source = None
        self.now_or_soon(remove)

    # --- calls and timers ---------------------------------------------------------------------------------------
    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the I/O thread (queued until it starts); once the loop has ended, run it here and now
        (e.g. a backend unregistering itself while the machine is being closed)."""
        with self._closing:
            if not self._closed:
                self._calls.append(fn)
                os.eventfd_write(self._wake, 1)
                return
        fn()

    def call_later(self, delay: float, fn: Callable[[], None]) -> TimerHandle:
        """Run `fn()` on the I/O thread after `delay` seconds (from any thread); the handle's `cancel()` undoes it."""
        handle = TimerHandle(time.monotonic() + max(0.0, delay), fn, self)
        with self._timer_lock:
            heapq.heappush(self._timers, (handle.when, next(self._timer_seq), handle))
        if self._native_waiting or not self.in_thread():
            os.eventfd_write(self._wake, 1)  # the loop may be sleeping past the new deadline
        return handle

    def run_sync(self, fn: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Run `fn()` on the I/O thread and return its result (or raise its exception). Runs `fn` directly when
        called on the I/O thread or while the loop is not running."""
        if self.in_thread() or not self.running:
            return fn()
        done = threading.Event()
        box: list = []

        def call():
            try:
                box.append((True, fn()))
            except BaseException as exc:  # handed to the caller
                box.append((False, exc))
            finally:
                done.set()
        self.call_soon(call)
        deadline = time.monotonic() + timeout
        while not done.wait(0.05):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the I/O thread did not run the call (stopped or busy)")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def in_thread(self) -> bool:
        """True when called on the I/O thread."""
        return threading.current_thread() is self._thread

    @property
    def running(self) -> bool:
        return self._running and self._thread.is_alive()

    def now_or_soon(self, fn: Callable[[], None]) -> None:
        """Run `fn` now when called on the I/O thread, else queue it there (call_soon)."""
        if self.in_thread():
            fn()
        else:
            self.call_soon(fn)

    def _timer_cancelled(self) -> None:
        with self._timer_lock:
            self._cancelled += 1
            if self._cancelled > 64 and self._cancelled > len(self._timers) // 2:
                self._timers = [entry for entry in self._timers if not entry[2].cancelled]
                heapq.heapify(self._timers)
                self._cancelled = 0

    # --- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._running = True
        self._thread.start()

    def stop(self) -> None:
        if self._running:
            self._running = False
            os.eventfd_write(self._wake, 1)
            self._thread.join(5)

    # --- the loop -----------------------------------------------------------------------------------------------
    def _register(self, fd: int, events: int) -> None:
        try:
            self._poll.register(fd, events)
            self._registered[fd] = events
            self._native_stale = True
        except (OSError, ValueError, TypeError):
            log.exception("cannot watch fd %r", fd)

    def _register_wanted(self) -> None:
        """poll() watches exactly what the readers, writers and sources want."""
        wanted: dict[int, int] = {self._wake: select.POLLIN}
        for fd in self._readers:
            wanted[fd] = wanted.get(fd, 0) | select.POLLIN
        for fd in self._writers:
            wanted[fd] = wanted.get(fd, 0) | select.POLLOUT
        for source in self._sources:
            for fd, events in source.pairs:
                wanted[fd] = wanted.get(fd, 0) | events
        for fd in [fd for fd in self._registered if fd not in wanted]:
            self._unregister(fd)
        for fd, events in wanted.items():
            if self._registered.get(fd) != events:
                self._register(fd, events)
        self._prepared_version = self._watch_version

    def _unregister(self, fd: int) -> None:
        self._registered.pop(fd, None)
        self._native_stale = True
        try:
            self._poll.unregister(fd)
        except (KeyError, ValueError, OSError):
            pass

    def _prepare(self) -> int:
        """Fill the poll set for this turn; returns the poll timeout in milliseconds (-1: none). The registered set
        is rebuilt only when a reader, writer or source came or went, or a source's fds changed (most turns of a
        busy VM change nothing: rebuilding cost each disk notification a few microseconds)."""
        limit: float | None = None
        changed = self._watch_version != self._prepared_version
        for source in list(self._sources):
            try:
                pairs, source_timeout = source.fill()
                if pairs != source.pairs:
                    source.pairs = list(pairs)
                    source.fds = {fd for fd, _ in source.pairs}
                    changed = True
            except Exception:
                log.exception("I/O poll source fill failed; removing it")
                self._sources.remove(source)
                source.removed = True
                self._watch_version += 1
                changed = True
                continue
            source.filled = True
            if source_timeout is not None:
                limit = source_timeout if limit is None else min(limit, source_timeout)
        if changed:
            self._register_wanted()
        if self._calls:
            return 0
        with self._timer_lock:
            while self._timers and self._timers[0][2].cancelled:
                heapq.heappop(self._timers)
                self._cancelled = max(0, self._cancelled - 1)
            if self._timers:
                due = self._timers[0][0] - time.monotonic()
                limit = due if limit is None else min(limit, due)
        if limit is None:
            return -1
        return max(0, min(MAX_POLL_MS, math.ceil(limit * 1000)))

    def _wait_in_c(self, native, timeout: int) -> list[tuple[int, int]]:
        """The turn's wait, with what is served in C served meanwhile (kvm/iowait.py). A libslirp owner whose hooks
        fail is logged and polled the Python way from then on; a wait that fails is logged and this turn's wait
        made by Python (at most 100 ms: what C serves waits meanwhile)."""
        if self._native_stale:
            native.set_fds(self._registered)
            self._native_stale = False
        owner = self._slirp
        try:
            if owner is not None:
                owner.before_wait()
            self._native_waiting = True
            try:
                return native.wait(timeout)
            finally:
                self._native_waiting = False
                if owner is not None:
                    owner.after_wait()
        except OSError:
            log.exception("the I/O thread's wait in C failed; this turn waits in Python")
        except Exception:
            log.exception("libslirp's hooks around the wait in C failed; it is polled the Python way from now on")
            if owner is not None:
                self._slirp = None
                native.set_slirp(None)
                owner.source = self.add_poll_source(owner.fill, owner.dispatch)
        return self._poll.poll(100 if timeout < 0 else min(timeout, 100))

    def _run_readers(self, revents: dict[int, int]) -> None:
        """The ready fds' reader callbacks, then their writer callbacks (each looked up when its turn comes: an
        earlier callback may have removed it)."""
        for fd, events in revents.items():
            for callbacks, ready in ((self._readers, _READABLE), (self._writers, _WRITABLE)):
                callback = callbacks.get(fd)
                if callback is None:
                    continue
                if events & select.POLLNVAL:
                    log.error("fd %d was closed while still watched; removing it", fd)
                    callbacks.pop(fd, None)
                    self._watch_version += 1
                    continue
                if not events & ready:
                    continue
                try:
                    callback()
                except Exception:
                    log.exception("I/O callback for fd %d failed; removing it", fd)
                    if callbacks.get(fd) is callback:
                        del callbacks[fd]
                        self._watch_version += 1

    def _run_sources(self, revents: dict[int, int]) -> None:
        for source in list(self._sources):
            if source.removed or not source.filled:
                continue
            mine = {fd: revents[fd] for fd in source.fds if fd in revents}
            try:
                source.dispatch(mine)
            except Exception:
                log.exception("I/O poll source dispatch failed; removing it")
                source.removed = True
                if source in self._sources:
                    self._sources.remove(source)
                self._watch_version += 1

    def _run_timers(self) -> None:
        now = time.monotonic()
        due: list[TimerHandle] = []
        with self._timer_lock:
            while self._timers and self._timers[0][0] <= now:
                handle = heapq.heappop(self._timers)[2]
                if handle.cancelled:
                    self._cancelled = max(0, self._cancelled - 1)
                else:
                    due.append(handle)
        for handle in due:
            if handle.cancelled:
                continue
            handle.cancelled = True  # ran: a later cancel() is a no-op
            try:
                handle.fn()
            except Exception:
                log.exception("I/O thread timer call failed")

    def _loop(self) -> None:
        while self._running:
            timeout = self._prepare()
            native = self._native
            events = self._wait_in_c(native, timeout) if native is not None and native.active \
                else self._poll.poll(timeout)
            revents: dict[int, int] = {}
            for fd, ev in events:
                if fd == self._wake:
                    try:
                        os.eventfd_read(self._wake)
                    except BlockingIOError:
                        pass
                    continue
                revents[fd] = ev
            if revents:
                self._run_readers(revents)
            self._run_sources(revents)
            self._run_timers()
            while self._calls:
                try:
                    self._calls.popleft()()
                except Exception:
                    log.exception("I/O thread call failed")
        for fd in list(self._registered):
            self._unregister(fd)
        with self._closing:
            self._closed = True
            os.close(self._wake)
        while self._calls:  # queued while the loop was ending
            try:
                self._calls.popleft()()
            except Exception:
                log.exception("I/O thread call failed")
