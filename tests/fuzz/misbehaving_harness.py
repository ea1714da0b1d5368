"""A harness that misbehaves on purpose, to show that fuzz/run reports what a real harness would find: an input
starting with CRASH raises, one starting with HANG never returns; everything else is fine."""
import time

MAX_LEN = 64
TIMEOUT = 2
INSTRUMENT = ["json"]   # something small to instrument; this harness has no code under test


def one_input(data: bytes) -> str:
    if data.startswith(b"CRASH"):
        raise RuntimeError("the planted crash")
    if data.startswith(b"HANG"):
        time.sleep(3600)
    return "fine"
