"""The foreground console: the host terminal in raw mode, with Ctrl-A x to stop the VM (as QEMU's -nographic)."""
import os
import termios
import tty
from contextlib import contextmanager

ESCAPE = 0x01  # Ctrl-A
QUIT = ord("x")


@contextmanager
def raw_terminal(fd: int):
    """Put `fd` in raw mode while the VM runs (no-op when it is not a terminal); always restore it."""
    if not os.isatty(fd):
        yield False
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class EscapeFilter:
    """Passes keystrokes through to the guest; Ctrl-A x calls `on_quit`, Ctrl-A Ctrl-A sends one Ctrl-A."""

    def __init__(self, on_quit):
        self.on_quit = on_quit
        self._armed = False

    def __call__(self, data: bytes) -> bytes:
        out = bytearray()
        for byte in data:
            if self._armed:
                self._armed = False
                if byte == QUIT:
                    self.on_quit()
                    return bytes(out)
                out.append(byte)
            elif byte == ESCAPE:
                self._armed = True
            else:
                out.append(byte)
        return bytes(out)
