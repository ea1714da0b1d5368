"""Crash-test child: a deterministic write storm (with some write_zeroes and discards) on a qcow2 image with a flush every FLUSH_EVERY writes; after each
flush returns, the number of writes it covers is appended to LOG and fsync'd. The parent SIGKILLs it at random.
CRASHRUN_SABOTAGE=no-flush makes flush() do nothing (crashrun's self-test: lost data must be caught)."""
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from cloudkvm.storage import open_disk  # noqa: E402


def storm(seed: int, size: int):
    """The operation sequence, the same in child and parent: ("write", offset, data), or ("zero", offset, length)
    for write_zeroes with unmap and for discards of whole 64 KiB-aligned ranges (both then read as zeros)."""
    rng = random.Random(seed)
    while True:
        kind = rng.random()
        if kind < 0.06:
            n = rng.randrange(1, 200_000)
            yield "unmap", rng.randrange(size - n + 1), n
        elif kind < 0.1:
            n = rng.randrange(1, 4) << 16
            yield "discard", rng.randrange((size - n) >> 16) << 16, n
        else:
            n = rng.choice([rng.randrange(1, 2000), 4096, rng.randrange(1, 120_000)])
            yield "write", rng.randrange(size - n + 1), rng.randbytes(n)


def main() -> None:
    img, log, seed, flush_every = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    disk = open_disk(img)
    if os.environ.get("CRASHRUN_SABOTAGE") == "no-flush":  # the harness's self-test: flushes persist nothing
        disk.flush = lambda: None
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, b"start\n")
    os.fsync(fd)
    for i, (kind, off, arg) in enumerate(storm(seed, disk.size), start=1):
        if kind == "write":
            disk.pwrite(arg, off)
        elif kind == "unmap":
            disk.write_zeroes(arg, off, unmap=True)
        else:
            disk.discard(arg, off)
        if i % flush_every == 0:
            disk.flush()
            os.write(fd, b"%d\n" % i)
            os.fsync(fd)


if __name__ == "__main__":
    main()
