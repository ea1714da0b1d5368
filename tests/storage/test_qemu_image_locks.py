"""cloudkvm and QEMU keep out of each other's images: cloudkvm takes QEMU's image locks (storage/locks.py), so
qemu-img, qemu-io and QEMU refuse an image cloudkvm writes, and cloudkvm refuses one they write. QEMU itself is the
oracle: the lock bytes it takes (read from /proc/locks) and whether its tools open the image."""
import hashlib
import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from cloudkvm.errors import CloudkvmError
from cloudkvm.storage import locks, open_disk, qcow2

QEMU_IO = shutil.which("qemu-io")
QEMU_SYSTEM = shutil.which("qemu-system-x86_64")
MiB = 1 << 20


def ofd_locks(path) -> list[tuple[str, int, int]]:
    """The open-file-description locks on `path`, from /proc/locks (proc(5)): (READ|WRITE, start, end)."""
    st = os.stat(path)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    found = []
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()
        if f[0] == "->":  # a waiter on the lock above: none here, non-blocking locks never wait
            continue
        if f[1] == "OFDLCK" and f[5] == ident:
            found.append((f[3], int(f[6]), int(f[7])))
    return sorted(found)


def wait_locked(path, proc: subprocess.Popen, timeout: float = 20) -> list:
    deadline = time.monotonic() + timeout
    while not (held := ofd_locks(path)):
        assert proc.poll() is None, f"{proc.args[0]} exited: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{proc.args[0]} never locked {path}"
        time.sleep(0.02)
    return held


@contextmanager
def qemu_io_holding(path, fmt="qcow2", read_only=False):
    """qemu-io with `path` open (waiting for commands on stdin) for the duration; yields the locks it took."""
    proc = subprocess.Popen([QEMU_IO, *(["-r"] if read_only else []), "-f", fmt, str(path)],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield wait_locked(path, proc)
    finally:
        proc.stdin.close()  # end of input: qemu-io quits
        proc.wait(timeout=20)
        proc.stderr.close()


def qemu_drive(img) -> subprocess.CompletedProcess:
    """QEMU (no machine, stopped) with `img` as a writable drive; once its monitor is up the drive is open, and it
    is told to quit. A drive it cannot open ends it at once with the error."""
    args = [QEMU_SYSTEM, "-nodefaults", "-machine", "none", "-display", "none", "-S", "-monitor", "stdio",
            "-drive", f"file={img},format=qcow2,if=none"]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = proc.stdout.readline()
        if banner.startswith("QEMU"):
            proc.stdin.write("quit\n")
            proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(args, proc.returncode, banner + out, err)


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def refused(result: subprocess.CompletedProcess) -> bool:
    return result.returncode != 0 and "lock" in result.stderr


def written_qcow2(qemu, tmp_path, name="disk.qcow2", backing=None) -> Path:
    img = qemu.create(tmp_path / name, "16M", backing=backing)
    qemu.io(img, "write -P 0x11 0 64k")
    return img


# ------------------------------------------------------------------------------------------- the lock bytes
@pytest.mark.parametrize("read_only", [False, True], ids=["writer", "reader"])
def test_cloudkvm_takes_the_lock_bytes_qemu_takes_for_a_qcow2_image(qemu, tmp_path, read_only):
    img = written_qcow2(qemu, tmp_path)
    with qemu_io_holding(img, read_only=read_only) as by_qemu:
        pass
    assert ofd_locks(img) == []
    with open_disk(img, read_only=read_only):
        by_cloudkvm = ofd_locks(img)
    assert by_cloudkvm == by_qemu and by_qemu  # every range QEMU's qcow2 driver locks on its file, and no other
    assert ofd_locks(img) == []  # closing releases them


def test_creating_a_qcow2_image_holds_the_writer_locks_qemu_would_take(qemu, tmp_path, monkeypatch):
    img = written_qcow2(qemu, tmp_path)
    with qemu_io_holding(img) as by_qemu_writer:
        pass
    seen = []
    real_fsync = os.fsync

    def fsync_looking_at_locks(fd):  # the last step of create, with the new image written
        seen.append(ofd_locks(img))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync_looking_at_locks)
    qcow2.create(img, 8 * MiB)
    assert seen == [by_qemu_writer]  # qemu-img/QEMU are kept out while the image is rewritten
    assert ofd_locks(img) == []


# -------------------------------------------------------------------- QEMU refuses what cloudkvm writes
def _qemu_img(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command", ["snapshot", "resize", "commit", "qemu-io write", "qemu -drive"])
def test_qemu_refuses_a_qcow2_image_that_cloudkvm_writes(qemu, tmp_path, command):
    base = written_qcow2(qemu, tmp_path, "base.qcow2")
    img = qemu.create(tmp_path / "disk.qcow2", "16M", backing="base.qcow2")
    run = {"snapshot": lambda: _qemu_img("snapshot", "-c", "s1", img),
           "resize": lambda: _qemu_img("resize", img, "32M"),
           "commit": lambda: _qemu_img("commit", img),
           "qemu-io write": lambda: subprocess.run([QEMU_IO, "-f", "qcow2", "-c", "write -P 0x77 0 1M", str(img)],
                                                   capture_output=True, text=True, timeout=60),
           "qemu -drive": lambda: qemu_drive(img)}[command]
    if command == "qemu -drive" and QEMU_SYSTEM is None:
        pytest.skip("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
    with open_disk(img) as disk:
        disk.pwrite(b"\x22" * 70000, 3 * MiB + 5)
        disk.flush()
        before, base_before = sha(img), sha(base)
        result = run()
        assert refused(result), (result.returncode, result.stdout, result.stderr)
        assert sha(img) == before and sha(base) == base_before
    qemu.check(img)
    qemu.check(base)
    assert qemu.info(img)["virtual-size"] == 16 * MiB and "snapshots" not in qemu.info(img)
    got = qemu.to_raw(img, tmp_path)
    assert got[3 * MiB + 5:3 * MiB + 70005] == b"\x22" * 70000 and got[:65536] == b"\x11" * 65536
    # the refusal was the lock's: with cloudkvm gone, the same command goes through
    result = run()
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("command", ["resize", "qemu-io write"])
def test_qemu_refuses_a_raw_image_that_cloudkvm_writes(qemu, tmp_path, command):
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(4 * MiB))
    run = {"resize": lambda: _qemu_img("resize", "-f", "raw", img, "8M"),
           "qemu-io write": lambda: subprocess.run([QEMU_IO, "-f", "raw", "-c", "write -P 0x77 0 1M", str(img)],
                                                   capture_output=True, text=True, timeout=60)}[command]
    with open_disk(img, format="raw") as disk:
        disk.pwrite(b"\x33" * 4096, MiB)
        disk.flush()
        result = run()
        assert refused(result), (result.returncode, result.stdout, result.stderr)
    data = img.read_bytes()
    assert len(data) == 4 * MiB and data[MiB:MiB + 4096] == b"\x33" * 4096 and data[:MiB] == bytes(MiB)


def test_a_cloudkvm_reader_lets_qemu_readers_in_and_keeps_writers_out(qemu, tmp_path):
    img = written_qcow2(qemu, tmp_path)
    with open_disk(img, read_only=True):
        info = _qemu_img("info", "--output=json", img)  # no -U (force share): a real shared open
        assert info.returncode == 0, info.stderr
        read = subprocess.run([QEMU_IO, "-r", "-f", "qcow2", "-c", "read -P 0x11 0 64k", str(img)],
                              capture_output=True, text=True, timeout=60)
        assert read.returncode == 0 and "Pattern verification failed" not in read.stdout, read.stdout + read.stderr
        with open_disk(img, read_only=True) as second:
            assert second.pread(4, 0) == b"\x11" * 4
        write = subprocess.run([QEMU_IO, "-f", "qcow2", "-c", "write -P 0x77 0 64k", str(img)],
                               capture_output=True, text=True, timeout=60)
        assert refused(write), (write.returncode, write.stdout, write.stderr)
    assert qemu.to_raw(img, tmp_path)[:65536] == b"\x11" * 65536


# ------------------------------------------------------------------ cloudkvm refuses what QEMU writes
def _one_line_in_use(err: CloudkvmError, path) -> None:
    text = str(err)
    assert str(path) in text and "\n" not in text and "in use" in text, text


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_cloudkvm_refuses_an_image_qemu_io_holds_for_writing(qemu, tmp_path, fmt):
    if fmt == "qcow2":
        img = written_qcow2(qemu, tmp_path)
    else:
        img = tmp_path / "disk.raw"
        img.write_bytes(b"\x11" * MiB)
    with qemu_io_holding(img, fmt=fmt):
        with pytest.raises(CloudkvmError) as writer:
            open_disk(img, format=fmt)
        _one_line_in_use(writer.value, img)
        if fmt == "qcow2":  # QEMU's qcow2 writer shares nothing but reads: its metadata is in flux
            with pytest.raises(CloudkvmError) as reader:
                open_disk(img, read_only=True)
            _one_line_in_use(reader.value, img)
        with pytest.raises(CloudkvmError) as create:  # never truncate an image QEMU is using
            qcow2.create(img, 8 * MiB)
        _one_line_in_use(create.value, img)
        assert "lock" in writer.value.message and create.value.hint
        before = sha(img)
    assert sha(img) == before
    assert ofd_locks(img) == []  # a refused open left no lock behind
    with open_disk(img, format=fmt) as disk:  # and with QEMU gone the image opens
        assert disk.pread(4, 0) == b"\x11" * 4


def test_cloudkvm_refuses_an_image_a_running_qemu_writes(qemu, tmp_path):
    if QEMU_SYSTEM is None:
        pytest.skip("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
    img = written_qcow2(qemu, tmp_path)
    vm = subprocess.Popen([QEMU_SYSTEM, "-nodefaults", "-machine", "none", "-display", "none", "-S",
                           "-drive", f"file={img},format=qcow2,if=none"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_locked(img, vm)
        with pytest.raises(CloudkvmError) as err:
            open_disk(img)
        _one_line_in_use(err.value, img)
    finally:
        vm.terminate()
        vm.wait(timeout=20)
        vm.stderr.close()
    with open_disk(img):
        pass


def test_a_cloudkvm_reader_shares_with_a_qemu_reader(qemu, tmp_path):
    img = written_qcow2(qemu, tmp_path)
    with qemu_io_holding(img, read_only=True):
        with open_disk(img, read_only=True) as disk:
            assert disk.pread(4, 0) == b"\x11" * 4


def test_without_ofd_locks_the_image_opens_unlocked(qemu, tmp_path, monkeypatch):
    """A file system without OFD locks (the kernel answers ENOLCK) runs unlocked, as before."""
    import errno
    import fcntl as real

    class NoOfdLocks:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def fcntl(fd, cmd, arg=0):
            if cmd in (locks.F_OFD_SETLK, locks.F_OFD_GETLK):
                raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
            return real.fcntl(fd, cmd, arg)

    monkeypatch.setattr(locks, "fcntl", NoOfdLocks())
    img = written_qcow2(qemu, tmp_path)
    with open_disk(img) as disk:
        disk.pwrite(b"x", 0)
        assert ofd_locks(img) == []
