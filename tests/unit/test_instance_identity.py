"""An instance's daemon is named by its pid *and* its start time: a reused pid or a forged pid file never makes
`ls` say running or `down` send a signal (issue 11: `down` must never signal a stranger)."""
import os
import subprocess
import sys

import pytest

from cloudkvm import launcher
from cloudkvm.instances import Instance, pid_record, process_start_time


@pytest.fixture
def instance(tmp_path):
    inst = Instance.named("vm", root=tmp_path)
    inst.dir.mkdir()
    return inst


@pytest.fixture
def stranger():
    """A live process that is not a cloudkvm daemon."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def signals(monkeypatch):
    sent = []
    monkeypatch.setattr(launcher.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    return sent


def test_the_start_time_is_read_from_proc_and_differs_between_processes(stranger):
    ours, theirs = process_start_time(os.getpid()), process_start_time(stranger.pid)
    assert ours is not None and theirs is not None and theirs >= ours
    assert pid_record(stranger.pid) == f"{stranger.pid} {theirs}\n"


def test_a_live_daemon_with_its_own_start_time_is_running(instance, stranger):
    instance.pid_file.write_text(pid_record(stranger.pid))
    assert instance.pid() == stranger.pid and instance.state() == "running"


@pytest.mark.parametrize("text", ["-1 5\n", "0 5\n", "1 5\n", "{pid}\n", "{pid} x\n", "{pid} {wrong}\n", "junk\n"])
def test_a_pid_file_that_does_not_name_the_daemon_for_sure_is_a_crash_and_down_signals_nobody(
        instance, stranger, signals, text):
    instance.pid_file.write_text(text.format(pid=stranger.pid, wrong=process_start_time(stranger.pid) + 1))
    assert instance.pid() is None
    assert instance.state() == "crashed"
    assert launcher.status(instance)["reason"].startswith("the VM process died without recording a result")
    assert launcher.down(instance, force=True) == "vm is not running"
    assert signals == [] and stranger.poll() is None


@pytest.mark.timeout(10)
def test_a_fifo_or_symlink_planted_as_the_pid_file_is_never_read_through(instance, stranger, signals, tmp_path):
    os.mkfifo(instance.pid_file)  # reading it would block until a writer came
    assert instance.pid() is None and instance.state() == "crashed"
    instance.pid_file.unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text(pid_record(stranger.pid))  # a valid record, but not in the instance's own file
    instance.pid_file.symlink_to(elsewhere)
    assert instance.pid() is None and instance.state() == "crashed"
    assert launcher.down(instance, force=True) == "vm is not running" and signals == []
