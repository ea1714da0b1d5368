"""`cloudkvm down` (launcher.down): the board's power button first; for an instance cloudkvm can log into, after
POWER_BUTTON_GRACE seconds also `systemctl poweroff` over ssh with the instance's own key (a guest kernel without
a driver for the button: Debian's arm64 cloud kernel); never ssh when the button did it, or with no ssh target."""
import subprocess
from pathlib import Path

import pytest

from cloudkvm import launcher, ssh
from cloudkvm.errors import CloudkvmError


class FakeInstance:
    """A running instance as down() sees it (its power-off is played by the fake _wait_gone)."""
    name = "vm"
    control_socket = Path("/nonexistent/control.sock")

    def state(self) -> str:
        return "running"


@pytest.fixture
def rig(monkeypatch):
    calls = {"requests": [], "ssh": [], "waits": []}
    monkeypatch.setattr(launcher.control, "request", lambda sock, what, **kw: calls["requests"].append(what)
                        or {"ok": True})

    def run(argv, **kwargs):
        calls["ssh"].append(argv)
        return subprocess.CompletedProcess(argv, 0)
    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(ssh, "ssh_client", lambda: "/usr/bin/ssh")
    return calls


def _waits(monkeypatch, calls, results):
    answers = iter(results)

    def wait_gone(instance, timeout):
        calls["waits"].append(timeout)
        return next(answers)
    monkeypatch.setattr(launcher, "_wait_gone", wait_gone)


def _target(monkeypatch):
    to = ssh.SshTarget("cloudkvm", "127.0.0.1", 2222, Path("/inst/id_ed25519"), Path("/inst/known_hosts"))
    monkeypatch.setattr(ssh, "target", lambda instance: to)


def test_a_guest_the_button_powers_off_is_never_asked_over_ssh(rig, monkeypatch):
    _waits(monkeypatch, rig, [True])
    _target(monkeypatch)
    assert launcher.down(FakeInstance(), timeout=60) == "vm powered off"
    assert rig["requests"] == ["shutdown"] and rig["ssh"] == []
    assert rig["waits"] == [launcher.POWER_BUTTON_GRACE]


def test_a_guest_deaf_to_the_button_is_asked_over_ssh_with_the_instance_key(rig, monkeypatch):
    _waits(monkeypatch, rig, [False, True])
    _target(monkeypatch)
    assert launcher.down(FakeInstance(), timeout=60) == "vm powered off (asked over ssh)"
    (argv,) = rig["ssh"]
    assert argv[:5] == ["/usr/bin/ssh", "-i", "/inst/id_ed25519", "-p", "2222"]
    assert "UserKnownHostsFile=/inst/known_hosts" in argv and "BatchMode=yes" in argv
    assert argv[-5:] == ["cloudkvm@127.0.0.1", "sudo", "-n", "systemctl", "poweroff"]
    assert rig["waits"] == [launcher.POWER_BUTTON_GRACE, 60 - launcher.POWER_BUTTON_GRACE]


def test_an_instance_without_an_ssh_target_is_stopped_after_the_timeout(rig, monkeypatch):
    _waits(monkeypatch, rig, [False, False, True])   # button, the rest of the timeout, then the stop request

    def no_target(instance):
        raise CloudkvmError("instance 'vm' has no cloud-init user to log in as")
    monkeypatch.setattr(ssh, "target", no_target)
    assert launcher.down(FakeInstance(), timeout=60) == "vm stopped"
    assert rig["ssh"] == [] and rig["requests"] == ["shutdown", "stop"]


@pytest.mark.parametrize("text", ["[1, 2]", "\"ssh\"", "not json"])
def test_an_instance_json_that_is_not_an_object_means_no_ssh_target(tmp_path, text):
    """instance.json is cloudkvm's own file, but one that is not a JSON object reads as empty, not as a crash."""
    from cloudkvm.instances import Instance

    instance = Instance("vm", tmp_path / "vm")
    instance.dir.mkdir()
    instance.info_file.write_text(text)
    assert instance.info() == {}
    with pytest.raises(CloudkvmError, match="no cloud-init user"):
        ssh.target(instance)
