"""The I/O thread: one selectors loop for host-side fds (console input, eventfds, sockets) and queued calls."""
import logging
import os
import selectors
import threading
from collections import deque
from typing import Callable

log = logging.getLogger("cloudkvm.io")


class IoThread:
    """Runs callbacks when fds become readable; other threads hand it work with `call_soon`."""

    def __init__(self, name: str = "cloudkvm-io"):
        self._sel = selectors.DefaultSelector()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._sel.register(self._wake, selectors.EVENT_READ, None)
        self._calls: deque[Callable[[], None]] = deque()
        self._running = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._now_or_soon(lambda: self._sel.register(fd, selectors.EVENT_READ, callback))

    def remove_reader(self, fd: int) -> None:
        """Stop watching `fd`. On the I/O thread this happens at once, so the fd can be closed right after."""
        def remove():
            try:
                self._sel.unregister(fd)
            except (KeyError, ValueError):
                pass
        self._now_or_soon(remove)

    def _now_or_soon(self, fn: Callable[[], None]) -> None:
        if threading.current_thread() is self._thread:
            fn()
        else:
            self.call_soon(fn)

    def call_soon(self, fn: Callable[[], None]) -> None:
        self._calls.append(fn)
        os.eventfd_write(self._wake, 1)

    def start(self) -> None:
        self._running = True
        self._thread.start()

    def stop(self) -> None:
        if self._running:
            self._running = False
            os.eventfd_write(self._wake, 1)
            self._thread.join(5)

    def _loop(self) -> None:
        while self._running:
            for key, _ in self._sel.select():
                if key.data is None:
                    try:
                        os.eventfd_read(self._wake)
                    except BlockingIOError:
                        pass
                    continue
                try:
                    key.data()
                except Exception:
                    log.exception("I/O callback for fd %d failed; removing it", key.fd)
                    self._sel.unregister(key.fd)
            while self._calls:
                try:
                    self._calls.popleft()()
                except Exception:
                    log.exception("I/O thread call failed")
        self._sel.close()
        os.close(self._wake)
