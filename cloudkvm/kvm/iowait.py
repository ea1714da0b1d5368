"""The I/O thread's wait in C (kvm/ioloop.c): poll(2) on the I/O thread's fds, on the ioeventfds of queues it serves
in C, and on one libslirp's sockets, returning to Python only when Python has something to do.

`NativeWait` keeps the `struct pollfd` array C polls: Python's fds first (`set_fds`, whenever the I/O thread's set
changes), then the queues' ioeventfds, then whatever libslirp asks for in each turn."""
from __future__ import annotations

import errno
import logging
import os

from .native import ffi, lib

log = logging.getLogger("cloudkvm.io")
SLIRP_FDS = 64             # room for libslirp's sockets at first (C grows the array as libslirp asks for more)


class NativeWait:
    """One I/O thread's wait in C. `add_queue` (a `struct ckvm_notify_queue` whose ioeventfd the wait serves),
    `set_slirp` (a `struct ckvm_slirp_hook`), `set_fds` (Python's fds and events), then `wait`."""

    def __init__(self):
        # the array lives in C (grown there when libslirp asks for more room), freed with this struct
        self.native = ffi.gc(ffi.new("struct ckvm_iowait *"), lib.ckvm_iowait_free)
        self.native.failed_queue = -1
        self.queues: list = []
        self._py: list[tuple[int, int]] = []
        self._layout()

    @property
    def active(self) -> bool:
        """Whether there is anything to serve in C (else a plain poll does)."""
        return bool(self.queues) or self.native.slirp != ffi.NULL

    def add_queue(self, nq) -> bool:
        """Serve the queue's notifications in C (notify.c ckvm_notify_serve); False when the table is full."""
        if len(self.queues) >= lib.CKVM_IOWAIT_MAX_QUEUES:
            return False
        self.native.queues[len(self.queues)] = nq
        self.queues.append(nq)
        self.native.nqueues = len(self.queues)
        self._layout()
        return True

    def set_slirp(self, hook) -> None:
        """Serve this libslirp's sockets (`struct ckvm_slirp_hook *`), or none (None)."""
        self.native.slirp = ffi.NULL if hook is None else hook

    def set_fds(self, registered: dict[int, int]) -> None:
        """Python's fds and their poll events (the I/O thread's registered set)."""
        self._py = list(registered.items())
        self._layout()

    def _layout(self) -> None:
        if lib.ckvm_iowait_reserve(self.native, len(self._py) + len(self.queues) + SLIRP_FDS) < 0:
            raise MemoryError("no memory for the I/O thread's poll set")
        fds = self.native.fds
        for i, (fd, events) in enumerate(self._py):
            fds[i].fd, fds[i].events = fd, events
        base = len(self._py)
        for i, nq in enumerate(self.queues):
            fds[base + i].fd, fds[base + i].events = nq.efd, 1   # POLLIN
        self.native.n_py = base

    def wait(self, timeout_ms: int) -> list[tuple[int, int]]:
        """Serve C's work until Python has some, at most `timeout_ms` (-1: no limit); returns Python's ready fds as
        `(fd, revents)`, like `select.poll().poll`."""
        n = lib.ckvm_io_wait(self.native, timeout_ms)
        if n < 0:
            self._failed(-n)
            return []
        if n == 0:
            return []
        fds = self.native.fds
        return [(fds[i].fd, fds[i].revents) for i in range(self.native.n_py) if fds[i].revents]

    def _failed(self, err: int) -> None:
        if err == errno.EINTR:
            return
        index = self.native.failed_queue
        if 0 <= index < len(self.queues):
            nq = self.queues.pop(index)
            for i, other in enumerate(self.queues):
                self.native.queues[i] = other
            self.native.nqueues = len(self.queues)
            self.native.failed_queue = -1
            self._layout()
            log.error("the ioeventfd %d of a queue served in C was closed; no longer watched", nq.efd)
            return
        raise OSError(err, f"the I/O thread's wait failed: {os.strerror(err)}")

    @property
    def turns(self) -> int:
        """Turns of the wait (each a poll) so far."""
        return self.native.turns

    @property
    def waits(self) -> int:
        """Calls from Python so far (each ends in a return to it)."""
        return self.native.waits

    @property
    def slirp_calls(self) -> int:
        """libslirp fills and polls made in C."""
        return self.native.slirp_calls
