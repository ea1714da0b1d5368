"""Progress for long work: a line on a terminal, nothing when stderr is piped (scripts and CI stay quiet)."""
import sys
import time
from contextlib import contextmanager


@contextmanager
def step(message: str, stream=None):
    """`with step("fetching the Debian kernel"):` prints "message ..." then "done (1.2 s)" on a terminal."""
    stream = stream or sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty()
    start = time.monotonic()
    if tty:
        stream.write(f"cloudkvm: {message} ...")
        stream.flush()
    ok = False
    try:
        yield
        ok = True
    finally:
        if tty:
            stream.write(f" {'done' if ok else 'failed'} ({time.monotonic() - start:.1f} s)\n")
            stream.flush()
