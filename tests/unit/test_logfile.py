"""Log files a VM writes (issue 11, "Files"): created 0600 whatever the umask, never through a symlink or into a
FIFO, and rotated at their cap so a chatty guest cannot fill the disk."""
import os
import stat

import pytest
from waits import wait_for

from cloudkvm.errors import CloudkvmError
from cloudkvm.logfile import CappedLog, open_log


def test_a_new_log_is_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        os.close(open_log(tmp_path / "a.log"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.log").stat().st_mode) == 0o600


def test_an_existing_readable_log_is_made_private(tmp_path):
    path = tmp_path / "b.log"
    path.write_text("old\n")
    path.chmod(0o644)
    os.close(open_log(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "old\n"


def test_a_symlink_fifo_or_folder_is_refused_without_blocking(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(CloudkvmError, match="symlink"):
        open_log(tmp_path / "link")
    assert not (tmp_path / "target").exists()
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(CloudkvmError, match="not a regular file|No such device"):
        open_log(tmp_path / "fifo")
    with pytest.raises(CloudkvmError, match="cannot open the log file"):
        open_log(tmp_path)


def test_the_log_is_rotated_at_its_cap_and_keeps_one_old_file(tmp_path):
    path = tmp_path / "console.log"
    log = CappedLog(path, limit=1000)
    for i in range(50):
        log.write(f"line {i:03d} ".encode() + b"x" * 50 + b"\n")
    log.close()
    current, old = path.read_bytes(), (tmp_path / "console.log.1").read_bytes()
    assert len(current) <= 1000 and len(old) <= 1000
    assert current.endswith(b"line 049 " + b"x" * 50 + b"\n")
    assert old.splitlines()[-1].startswith(b"line ") and current.splitlines()[0].startswith(b"line ")
    lines = [int(line.split()[1]) for line in (old + current).splitlines()]
    assert lines == list(range(lines[0], 50))  # nothing lost between the two files
    assert stat.S_IMODE((tmp_path / "console.log.1").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["console.log", "console.log.1"]


def test_logging_stops_rather_than_following_a_symlink_planted_at_rotation(tmp_path, monkeypatch):
    path = tmp_path / "console.log"
    log = CappedLog(path, limit=100)
    log.write(b"a" * 90)
    real_replace = os.replace

    def replace_then_plant(src, dst):  # the attacker plants a symlink between the rename and the reopen
        real_replace(src, dst)
        (tmp_path / "console.log").symlink_to(tmp_path / "stolen")
    monkeypatch.setattr(os, "replace", replace_then_plant)
    log.write(b"b" * 20)
    monkeypatch.setattr(os, "replace", real_replace)
    log.write(b"c" * 20)
    log.close()
    assert not (tmp_path / "stolen").exists()


def test_following_a_log_reads_every_byte_across_rotations(tmp_path):
    import threading

    from cloudkvm.logfile import follow

    path = tmp_path / "console.log"
    log = CappedLog(path, limit=1000)
    lines = [f"line {n:05d} {'x' * (n % 50)}\n".encode() for n in range(400)]  # ~25 KB: about 25 rotations
    log.write(lines[0])
    writing = threading.Event()
    writing.set()
    read = []
    reader = threading.Thread(target=lambda: read.extend(follow(path, writing.is_set, interval=0.001)))
    reader.start()
    written = len(lines[0])
    for n, line in enumerate(lines[1:], 1):
        log.write(line)
        written += len(line)
        if n % 7 == 0:  # bursts of under 1000 bytes (at most one rotation each) that the reader catches up with
            assert wait_for(lambda: sum(map(len, read)) == written, 10, interval=0.001)
    assert wait_for(lambda: sum(map(len, read)) == written, 10, interval=0.001)
    writing.clear()
    reader.join(10)
    log.close()
    assert not reader.is_alive()
    assert b"".join(read) == b"".join(lines)


def test_following_a_missing_log_fails_at_once(tmp_path):
    from cloudkvm.logfile import follow

    with pytest.raises(OSError):
        follow(tmp_path / "none.log", lambda: True)


def test_read_bounded_reads_a_regular_file_whole_and_refuses_more_than_its_limit(tmp_path):
    import errno

    from cloudkvm.fsutil import read_bounded

    (tmp_path / "k").write_bytes(b"x" * 100)
    (tmp_path / "link").symlink_to(tmp_path / "k")
    assert read_bounded(tmp_path / "k", 100) == b"x" * 100
    assert read_bounded(tmp_path / "link", 100, follow_symlinks=True) == b"x" * 100
    with pytest.raises(OSError) as err:
        read_bounded(tmp_path / "k", 99)
    assert err.value.errno == errno.EFBIG
    with pytest.raises(OSError):
        read_bounded(tmp_path / "link", 100)  # not followed unless asked
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OSError):
        read_bounded(tmp_path / "fifo", 100)  # refused, never blocks
