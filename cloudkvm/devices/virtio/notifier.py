"""Available buffer notifications served in C (virtio 1.2 §2.7.13; kvm/notify.c): a thread that polls the
ioeventfds of the queues a device serves in C, runs that path under the transport's lock and raises the used
buffer notification itself, and hands every notification it cannot finish to Python through an eventfd the I/O
thread watches (where the transport handles it as before).

`TransportState` is a transport's share of it: the lock (a recursive mutex both sides take: mmio.py's one lock),
whether the transport is live, its InterruptStatus cell and irqfd."""
from __future__ import annotations

import os

from ...kvm.native import address, ffi, lib, quick

_trylock, _unlock = quick.ckvm_transport_trylock, quick.ckvm_transport_unlock


class TransportState:
    """A transport's `struct ckvm_transport`: `acquire`/`release` (also `with`) take its recursive mutex — tried
    first with the GIL held, waited for only with it released (kvm/native.py `quick`), so neither a C thread nor
    another Python thread ever waits for what the owner holds; `live` and `irqfd` are what C reads under it."""

    def __init__(self, isr_cell, irqfd: int | None):
        self.native = ffi.new("struct ckvm_transport *")
        rc = lib.ckvm_transport_init(self.native)
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))
        self.native.isr = isr_cell
        self.native.irqfd = -1 if irqfd is None else irqfd
        self._address = address(self.native)

    def acquire(self) -> bool:
        if not _trylock(self._address):
            lib.ckvm_transport_lock(self.native)
        return True

    def release(self) -> None:
        _unlock(self._address)

    def __enter__(self) -> "TransportState":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        _unlock(self._address)

    def set_live(self, live: bool) -> None:
        self.native.live = live

    def __del__(self):
        native = getattr(self, "native", None)
        if native is not None:
            lib.ckvm_transport_destroy(native)


# Kinds served where libslirp lives, in the I/O thread's wait in C (iothread.py serve_in_c), not on this thread.
_ON_IO_THREAD = {lib.CKVM_SERVE_NET_TX}


class Notifier:
    """The C thread for one machine's queues. `add` each queue whose device serves it in C (before `start`);
    `serve(queue)` runs one notification synchronously as the thread would (tests)."""

    def __init__(self):
        self.native = ffi.new("struct ckvm_notifier *")
        self.native.stop_fd = -1
        self._fds: list[int] = []       # the eventfds this made (closed by close)
        self.queues: list = []          # struct ckvm_notify_queue, in registration order
        self.watched: list = []         # (ioeventfd, transport, queue index) of each, for a caller taking over
        self._keep: list = []           # what the C structs point to: transports, queues, devices' contexts

    def add(self, efd: int, transport, index: int, io=None) -> int | None:
        """Serve queue `index` of `transport` from its ioeventfd `efd`: on this thread, or for a transmit queue into
        libslirp, in `io`'s wait (`io.serve_in_c(nq)`, the machine's I/O thread). Returns the eventfd through which
        the notifications C cannot finish reach Python (the caller watches it as it would have watched `efd`), or
        None when the device has no C path for the queue, the transport no irqfd, or no table has room."""
        native = transport.device.native_serve(index)
        if native is None or transport.state.native.irqfd < 0 or len(self.queues) >= lib.CKVM_MAX_NOTIFY:
            return None
        if self.native.running:
            raise RuntimeError("queues are added before the notifier starts")
        kind, ctx = native
        on_io = kind in _ON_IO_THREAD
        if on_io and io is None:
            return None
        queue = transport.queues[index]
        python_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._fds.append(python_fd)
        nq = ffi.new("struct ckvm_notify_queue *", {
            "efd": efd, "python_fd": python_fd, "kind": kind, "t": transport.state.native,
            "mem": transport.memory.native, "q": queue._native_vq, "w": queue._native_walk, "ctx": ctx})
        if on_io:
            if not io.serve_in_c(nq):
                self._fds.remove(python_fd)
                os.close(python_fd)
                return None
        else:
            self.native.queues[self.native.count] = nq
            self.native.count += 1
            self.watched.append((efd, transport, index))
        self.queues.append(nq)
        self._keep.append((transport, queue, native))
        return python_fd

    @property
    def fds(self) -> list[int]:
        """The eventfds this made (python_fds, the stop eventfd), which `close` closes."""
        return list(self._fds)

    @property
    def failed(self) -> int:
        """Non-zero when the thread ended by itself (an errno, or -1): its queues' ioeventfds are no longer read,
        and the caller must watch them (`watched`) itself; every python_fd was written once to say so."""
        return self.native.failed

    def start(self) -> None:
        if self.native.count and not self.native.running:
            if self.native.stop_fd < 0:
                self.native.stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self._fds.append(self.native.stop_fd)
            rc = lib.ckvm_notifier_start(self.native)
            if rc < 0:
                raise OSError(-rc, f"cannot start the notification thread: {os.strerror(-rc)}")

    @property
    def thread_id(self) -> int:
        """The thread's id (0 until it runs): its scheduling is the host's to read (/proc/self/task/ID)."""
        return self.native.tid

    def stop(self) -> None:
        """Stop the thread and wait for it; call without any transport's lock held."""
        lib.ckvm_notifier_stop(self.native)

    def close(self) -> None:
        """Stop the thread, then close the eventfds this made."""
        self.stop()
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    @staticmethod
    def serve(nq) -> bool:
        """One notification for `nq` as the thread serves it: True when it went on to Python (`python_fd`)."""
        return bool(lib.ckvm_notify_serve(nq))

    @property
    def served(self) -> int:
        """Notifications C finished, every queue's (on this thread and in the I/O thread's wait)."""
        return sum(nq.served for nq in self.queues)

    @property
    def forwarded(self) -> int:
        """Notifications handed on to Python."""
        return sum(nq.forwarded for nq in self.queues)
