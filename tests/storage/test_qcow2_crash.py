"""Crash safety: a child process storms writes with periodic flush() and is SIGKILLed at a random moment.
`qemu-img check` must find no corruption (leaked clusters are allowed) and every write covered by the last
recorded flush must read back intact (bytes that later, unflushed writes may have touched are not compared)."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloudkvm.storage import open_disk

sys.path.insert(0, str(Path(__file__).parent))
from crash_child import storm  # noqa: E402

CHILD = Path(__file__).with_name("crash_child.py")
FLUSH_EVERY = 8
MiB = 1 << 20


def run_and_kill(img: Path, log: Path, seed: int, delay: float) -> int:
    """Start the storm, kill it `delay` seconds after it opened the image; the last completed flush's count."""
    log.unlink(missing_ok=True)
    child = subprocess.Popen([sys.executable, str(CHILD), str(img), str(log), str(seed), str(FLUSH_EVERY)],
                             stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not (log.exists() and log.read_bytes().startswith(b"start\n")):
        assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline, "crash child did not start"
        time.sleep(0.005)
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()
    child.stderr.close()
    done = [int(x) for x in log.read_text().split()[1:]]
    return done[-1] if done else 0


@pytest.mark.parametrize("cluster_size,backing,delays", [
    (512, False, (0.15, 0.6)),      # tiny clusters: refcount blocks and table moves under the knife
    (4096, True, (0.05, 0.4)),      # copy-on-write from a backing file
    (65536, False, (0.3, 0.9)),
])
def test_sigkill_during_write_storm(qemu, tmp_path, cluster_size, backing, delays):
    size = 24 * MiB
    flushed_any = False
    for run, delay in enumerate(delays):
        rng = random.Random(run * 1000 + cluster_size)
        delay = delay * (0.75 + rng.random() / 2)
        img = tmp_path / f"crash{run}.qcow2"
        if backing:
            base = qemu.create(tmp_path / "base.qcow2", "24M")
            qemu.io(base, "write -P 0x5b 0 20M")
            qemu.create(img, str(size), backing="base.qcow2", cluster_size=cluster_size)
        else:
            qemu.create(img, str(size), cluster_size=cluster_size)
        expect = bytearray(qemu.to_raw(img, tmp_path))
        seed = rng.randrange(1 << 30)
        flushed = run_and_kill(img, tmp_path / "log", seed, delay)
        flushed_any |= flushed > 0
        qemu.check_no_corruption(img)
        maybe = bytearray(size)  # bytes that unflushed writes may or may not have reached
        for i, (kind, off, arg) in enumerate(storm(seed, size), start=1):
            if i > flushed + FLUSH_EVERY:
                break
            data = arg if kind == "write" else bytes(arg)
            if i <= flushed:
                expect[off:off + len(data)] = data
            else:
                maybe[off:off + len(data)] = b"\1" * len(data)
        got = qemu.to_raw(img, tmp_path)
        for start in range(0, size, MiB):
            a, b, m = got[start:start + MiB], expect[start:start + MiB], maybe[start:start + MiB]
            if a != b:
                bad = [k for k in range(len(a)) if a[k] != b[k] and not m[k]]
                assert not bad, f"run {run}: flushed data lost at {start + bad[0]:#x} ({len(bad)} bytes, " \
                                f"{flushed} writes flushed)"
        with open_disk(img) as d:  # the survivor opens, reads like qemu and takes more writes
            assert d.pread(size, 0) == got
            d.pwrite(b"after the crash", size // 2)
        qemu.check_no_corruption(img)
        os.unlink(img)
    assert flushed_any, "no flush completed before any kill: the test proves nothing"
