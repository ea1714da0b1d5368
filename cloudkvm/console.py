"""The serial console's host side: copies guest output to a file/fd, keeps a tail, lets callers wait for text."""
import os
import threading
import time


class ConsoleLog:
    """Guest console bytes: forwarded to `fd` (if any) and kept in a bounded in-memory tail."""

    TAIL_LIMIT = 1 << 20

    def __init__(self, fd: int | None = None, tail_limit: int = TAIL_LIMIT, writer=None):
        """Output goes to `fd` and to `writer.write(bytes)` (e.g. logfile.CappedLog), each when given."""
        self.fd = fd
        self.writer = writer
        self.tail_limit = tail_limit
        self._tail = bytearray()
        self._total = 0
        self._cond = threading.Condition()
        self._listeners: list = []

    def add_listener(self, fn) -> None:
        """`fn(bytes)` is called with every later chunk of output (e.g. an attached `cloudkvm console`)."""
        with self._cond:
            self._listeners.append(fn)

    def remove_listener(self, fn) -> None:
        with self._cond:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def write(self, data: bytes) -> None:
        if self.fd is not None:
            try:
                os.write(self.fd, data)
            except OSError:
                self.fd = None  # the reader went away; keep the VM running
        if self.writer is not None:
            self.writer.write(data)
        with self._cond:
            self._tail += data
            self._total += len(data)
            if len(self._tail) > self.tail_limit:
                del self._tail[:len(self._tail) - self.tail_limit]
            self._cond.notify_all()
            listeners = list(self._listeners)
        for fn in listeners:
            fn(data)

    def text(self) -> str:
        with self._cond:
            return self._tail.decode("utf-8", "replace")

    def wait_for(self, needle: bytes, timeout: float) -> bool:
        """Block until `needle` appears in the tail (True) or `timeout` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while needle not in self._tail:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True
