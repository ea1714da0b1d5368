"""Crash-consistency rounds for the qcow2 backend (issue 11): a writer is SIGKILLed at a random moment; then
`qemu-img check` must find no corruption (leaked clusters are counted, not failures), every write that an
acknowledged flush covered must read back (bytes that later, unacknowledged writes may have touched are not
compared; every other byte must be what it was before), and cloudkvm must reopen the image and write on.

Two kinds of writer:
- `backend`: crash_child.py storms a Qcow2Disk directly (writes, write_zeroes with unmap, discards), recording
  each completed flush in a log file;
- `vm`: vm_crash_child.py runs crash_guest.c in a VM whose virtio-blk disk is the image; the guest storms it
  (writes, WRITE_ZEROES with unmap) and reports each acknowledged FLUSH on the serial console.
qemu-img (Debian qemu-utils) is the oracle for the image's structure and content. Used by test_qcow2_crash.py
(a few rounds) and scripts/crashrun (the long run)."""
from __future__ import annotations

import json
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from crash_child import storm  # noqa: E402

MiB = 1 << 20
SECTOR = 512
BACKEND_FLUSH_EVERY = 8
CLUSTER_SIZES = (512, 4096, 65536)  # tiny clusters put refcount blocks and table moves under the knife

# The VM storm (crash_guest.c): its config in sector 0, and the stream it derives from it
VM_SIZE = 32 * MiB
VM_FLUSH_EVERY = 6
VM_MAX_SECTORS = 64
VM_FIRST_SECTOR = 8
VM_MAX_OPS = 200_000
_CONFIG = struct.Struct("<8sQIIQQQ")  # magic, seed, flush_every, max_sectors, first_sector, last_sector, max_ops
_M64 = (1 << 64) - 1


class HarnessError(Exception):
    """The round could not be run as planned (a child failed before the kill): not a finding about the image."""


@dataclass
class Round:
    kind: str
    cluster_size: int
    backing: bool
    seed: int
    delay: float
    flushes: int = 0            # acknowledged flushes
    ops_flushed: int = 0        # operations the last acknowledged flush covers (all of them verified)
    leaks: int = 0              # leaked clusters (qemu-img check), allowed
    corruptions: int = 0        # qemu-img check corruptions + check errors, after the crash or after reopening
    lost_sectors: int = 0       # sectors with a byte that differs from what acknowledged flushes (or the untouched
                                # image) say
    first_lost: int | None = None
    notes: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.corruptions or self.lost_sectors)

    def line(self) -> str:
        lost = f" lost_sectors={self.lost_sectors} first at {self.first_lost:#x}" if self.lost_sectors else ""
        return (f"{self.kind} cluster={self.cluster_size} backing={int(self.backing)} seed={self.seed} "
                f"delay={self.delay:.3f}s flushes={self.flushes} ops_flushed={self.ops_flushed} "
                f"leaks={self.leaks} corruptions={self.corruptions}{lost}"
                + (f" ({'; '.join(self.notes)})" if self.notes else ""))


# ------------------------------------------------------------------------------------------------ qemu-img
def qemu(*args, ok=(0,)) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300)
    if r.returncode not in ok:
        raise HarnessError(f"{' '.join(map(str, args))} -> {r.returncode}: {r.stdout}{r.stderr}")
    return r


def qemu_check(img) -> dict:
    """`qemu-img check --output=json`: 0 clean, 2 corruptions, 3 leaks only; 1 means it could not check."""
    r = qemu("qemu-img", "check", "--output=json", img, ok=(0, 1, 2, 3))
    try:
        info = json.loads(r.stdout)
    except ValueError:
        info = {"check-errors": 1}
    if r.returncode == 1:
        info["check-errors"] = max(1, info.get("check-errors", 0))
    info.setdefault("stderr", r.stderr.strip())
    return info


def to_raw(img, scratch: Path) -> bytes:
    out = scratch / (Path(img).name + ".raw")
    qemu("qemu-img", "convert", "-O", "raw", img, out)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def make_image(workdir: Path, size: int, cluster_size: int, backing: bool) -> Path:
    img = workdir / "crash.qcow2"
    img.unlink(missing_ok=True)
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}"]
    if backing:
        base = workdir / "base.qcow2"
        base.unlink(missing_ok=True)
        qemu("qemu-img", "create", "-q", "-f", "qcow2", base, size)
        qemu("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5b 0 {size * 5 // 6 & ~0xFFFF}", base)
        args += ["-b", "base.qcow2", "-F", "qcow2"]
    qemu(*args, img, size)
    return img


# ------------------------------------------------------------------------------------------------ checking
def lost_sectors(got: bytes, initial: bytes, certain, maybe) -> tuple[int, int | None]:
    """(count, first byte offset) of the 512-byte sectors of `got` holding a byte that is neither what the
    `certain` writes (offset, data) left over `initial` nor covered by a `maybe` write."""
    expect = bytearray(initial)
    uncertain = bytearray(len(initial))
    for off, data in certain:
        expect[off:off + len(data)] = data
    for off, data in maybe:
        uncertain[off:off + len(data)] = b"\1" * len(data)
    if len(got) != len(expect):
        return 1, min(len(got), len(expect))
    clear = bytes(SECTOR)
    count, first = 0, None
    for start in range(0, len(got), MiB):
        if got[start:start + MiB] == expect[start:start + MiB]:
            continue
        for s in range(start, min(start + MiB, len(got)), SECTOR):
            a, b, m = got[s:s + SECTOR], expect[s:s + SECTOR], uncertain[s:s + SECTOR]
            if a == b:
                continue
            bad = [k for k in range(SECTOR) if a[k] != b[k] and not m[k]] if m != clear else \
                [k for k in range(SECTOR) if a[k] != b[k]][:1]
            if bad:
                count += 1
                if first is None:
                    first = s + bad[0]
    return count, first


def judge(r: Round, img: Path, scratch: Path, initial: bytes, ops, flushed: int, maybe_count: int) -> Round:
    """qemu-img check, the acknowledged data, and a reopen-and-write by cloudkvm; the verdict goes into `r`."""
    from cloudkvm.storage import open_disk

    info = qemu_check(img)
    r.leaks = info.get("leaks", 0)
    r.corruptions = info.get("corruptions", 0) + info.get("check-errors", 0)
    if r.corruptions:
        r.notes.append(f"qemu-img check: {info}")
        return r
    certain, maybe = [], []
    for i, op in enumerate(ops, start=1):
        if i > flushed + maybe_count:
            break
        (certain if i <= flushed else maybe).append(op)
    got = to_raw(img, scratch)
    r.lost_sectors, r.first_lost = lost_sectors(got, initial, certain, maybe)
    with open_disk(img) as disk:  # the survivor opens, reads like qemu-img and takes more writes
        if disk.pread(disk.size, 0) != got:
            r.notes.append("cloudkvm reads the survivor differently from qemu-img")
            r.corruptions += 1
        disk.pwrite(b"after the crash", disk.size // 2 + 3)
    after = qemu_check(img)
    if after.get("corruptions", 0) or after.get("check-errors", 0):
        r.notes.append(f"qemu-img check after reopening: {after}")
        r.corruptions += after.get("corruptions", 0) + after.get("check-errors", 0)
    return r


# ------------------------------------------------------------------------------------------------ backend
def kill_after(child: subprocess.Popen, delay: float, why_early) -> None:
    """SIGKILL `child` `delay` seconds from now; HarnessError(why_early()) if it ended by itself first."""
    time.sleep(delay)
    if child.poll() is not None:
        raise HarnessError(why_early())
    child.send_signal(signal.SIGKILL)
    child.wait()


def reap(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.kill()
        child.wait()


def backend_ops(seed: int, size: int):
    """crash_child.storm as (offset, bytes the range then holds)."""
    for kind, off, arg in storm(seed, size):
        yield off, (arg if kind == "write" else bytes(arg))


def backend_round(workdir: Path, cluster_size: int, backing: bool, seed: int, delay: float,
                  size: int = 24 * MiB, min_flushes: int = 0) -> Round:
    """One round: the kill comes `delay` seconds after the child opened the image (and, with `min_flushes`, after
    it recorded that many flushes: a loaded machine cannot then make the round prove nothing)."""
    r = Round("backend", cluster_size, backing, seed, delay)
    img = make_image(workdir, size, cluster_size, backing)
    initial = to_raw(img, workdir)
    log = workdir / "flush.log"
    log.unlink(missing_ok=True)
    child = subprocess.Popen([sys.executable, str(HERE / "crash_child.py"), str(img), str(log), str(seed),
                              str(BACKEND_FLUSH_EVERY)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (log.exists() and log.read_bytes().startswith(b"start\n")
                   and log.read_bytes().count(b"\n") > min_flushes):
            if child.poll() is not None:
                raise HarnessError(f"crash child exited before it started: {child.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise HarnessError("crash child did not start within 60 s")
            time.sleep(0.005)
        kill_after(child, delay, lambda: f"crash child ended before the kill: {child.stderr.read().decode()}")
    finally:
        reap(child)
        child.stderr.close()
    done = [int(x) for x in log.read_text().split()[1:]]
    r.flushes = len(done)
    flushed = done[-1] if done else 0
    r.ops_flushed = flushed
    return judge(r, img, workdir, initial, backend_ops(seed, size), flushed, BACKEND_FLUSH_EVERY)


# ------------------------------------------------------------------------------------------------ VM
def _splitmix64(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & _M64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return state, z ^ (z >> 31)


def vm_ops(seed: int, size: int, write_zeroes: bool):
    """The crash guest's storm (crash_guest.c's comment), as (offset, bytes the range then holds)."""
    first, last = VM_FIRST_SECTOR, size // SECTOR
    body = struct.pack("<61Q", *(seed ^ k for k in range(2, 63)))
    rng = seed
    op = 0
    while True:
        op += 1
        rng, r = _splitmix64(rng)
        n = 1 + r % VM_MAX_SECTORS
        rng, r = _splitmix64(rng)
        sector = first + r % (last - first - n + 1)
        zero = False
        if write_zeroes:
            rng, r = _splitmix64(rng)
            zero = r % 16 == 0
        if zero:
            yield sector * SECTOR, bytes(n * SECTOR)
            continue
        rng, v = _splitmix64(rng)
        yield sector * SECTOR, b"".join(struct.pack("<QQ", op, s) + body + struct.pack("<Q", v ^ s)
                                        for s in range(sector, sector + n))


def crash_guest() -> Path:
    from cloudkvm.guests.build import build_flat
    return build_flat(HERE / "crash_guest.c", include_dirs=[HERE.parent / "guests"])


def vm_round(workdir: Path, cluster_size: int, backing: bool, seed: int, delay: float, guest: Path | None = None,
             size: int = VM_SIZE, min_flushes: int = 0) -> Round:
    """One round: the kill comes `delay` seconds after the guest's start line (and, with `min_flushes`, after it
    reported that many flushes)."""
    r = Round("vm", cluster_size, backing, seed, delay)
    guest = guest or crash_guest()
    img = make_image(workdir, size, cluster_size, backing)
    config = workdir / "config.bin"
    config.write_bytes(_CONFIG.pack(b"CKCRASH1", seed, VM_FLUSH_EVERY, VM_MAX_SECTORS, VM_FIRST_SECTOR,
                                    size // SECTOR, VM_MAX_OPS).ljust(SECTOR, b"\0"))
    qemu("qemu-io", "-f", "qcow2", "-c", f"write -s {config} 0 {SECTOR}", img)
    initial = to_raw(img, workdir)
    lines: list[str] = []
    started = threading.Event()
    vmm_log = workdir / "vmm.log"
    with open(vmm_log, "wb") as log:
        child = subprocess.Popen([sys.executable, str(HERE / "vm_crash_child.py"), str(img), str(guest)],
                                 stdout=subprocess.PIPE, stderr=log)

    def read_console():
        flushes = 0
        for raw in child.stdout:  # complete lines only: a line cut by the kill has no newline
            if raw.endswith(b"\n"):
                lines.append(raw.decode(errors="replace").rstrip("\n"))
                flushes += lines[-1].startswith("flush ")
                if lines[-1].startswith("crash_guest: start" if not min_flushes else "flush ") \
                        and flushes >= min_flushes:
                    started.set()
        started.set()  # EOF: the child is gone

    def log_tail() -> str:
        return vmm_log.read_text(errors="replace")[-2000:]

    reader = threading.Thread(target=read_console, daemon=True)
    reader.start()
    try:
        started.wait(120)
        if not any(ln.startswith("crash_guest: start") for ln in lines) or child.poll() is not None:
            raise HarnessError(f"the VM did not start the storm (or report {min_flushes} flushes): {lines[-3:]} "
                               f"{log_tail()}")
        kill_after(child, delay, lambda: f"the VMM ended before the kill: {lines[-3:]} {log_tail()}")
    finally:
        reap(child)
        reader.join(30)
        child.stdout.close()
    failed = [ln for ln in lines if "failed" in ln or "no valid config" in ln]
    if failed:  # the device answered an error: a finding, not a harness problem
        r.notes.append(failed[0])
        r.corruptions += 1
    zeroes = any(ln == "crash_guest: start write_zeroes=1" for ln in lines)
    done = [int(ln.split()[1]) for ln in lines if ln.startswith("flush ")]
    r.flushes = len(done)
    r.ops_flushed = done[-1] if done else 0
    # The guest prints "flush N" before its next operation starts, so at most VM_FLUSH_EVERY operations after the
    # last reported flush can have reached the disk.
    return judge(r, img, workdir, initial, vm_ops(seed, size, zeroes), r.ops_flushed, VM_FLUSH_EVERY)


# ------------------------------------------------------------------------------------------------ plans
def plan(kind: str, rounds: int, base_seed: int, max_delay: float) -> list[dict]:
    """`rounds` rounds' parameters: cluster sizes in turn, a backing file every other pair, delays and seeds drawn
    from `base_seed` (so a run can be repeated)."""
    rng = random.Random(f"{kind}:{base_seed}")
    return [dict(cluster_size=CLUSTER_SIZES[i % len(CLUSTER_SIZES)], backing=(i // 2) % 2 == 1,
                 seed=rng.randrange(1 << 62), delay=rng.uniform(0.02, max_delay)) for i in range(rounds)]


def tools_missing() -> str | None:
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install qemu-utils): it is the qcow2 oracle"
    return None


def clean(workdir: Path) -> None:
    for name in ("crash.qcow2", "base.qcow2", "flush.log", "config.bin", "vmm.log"):
        (workdir / name).unlink(missing_ok=True)
