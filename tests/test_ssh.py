"""`cloudkvm ssh` / `up --wait ssh` without a guest: the ssh command line as OpenSSH itself reads it (`ssh -G`, the
client's own resolved configuration, is the oracle), and the waits' refusals (a VM that stopped, a port whose other
end never speaks SSH) naming the console's last lines."""
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from cloudkvm import ssh
from cloudkvm.errors import CloudkvmError
from cloudkvm.instances import Instance


def resolved(argv: list[str]) -> dict[str, str]:
    """OpenSSH's own reading of an argv (ssh -G prints the configuration it would use, connecting nowhere); a key
    given several times (identityfile) maps to its values joined by spaces."""
    dashdash = argv.index("--")
    out = subprocess.run([argv[0], "-G", *argv[1:dashdash], *argv[dashdash + 1:dashdash + 2]], capture_output=True,
                         text=True, check=True, env={"HOME": "/nonexistent", "PATH": "/usr/bin:/bin"}).stdout
    config: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        config[key] = f"{config[key]} {value}" if key in config else value
    return config


def test_the_ssh_command_uses_only_the_instance_key_and_known_hosts(tmp_path):
    (tmp_path / "ssh_key").write_text("a key\n")  # ssh falls back to ~/.ssh/id_* when the file is missing
    to = ssh.SshTarget("alice", "127.0.0.1", 2212, tmp_path / "ssh_key", tmp_path / "known_hosts")
    argv = ssh.command(to, ["id", "-un"])
    config = resolved(argv)
    assert config["user"] == "alice" and config["hostname"] == "127.0.0.1" and config["port"] == "2212"
    assert config["identityfile"] == str(tmp_path / "ssh_key") and config["identitiesonly"] == "yes"
    assert config["identityagent"] == "none"
    assert config["userknownhostsfile"] == str(tmp_path / "known_hosts")  # never the user's ~/.ssh/known_hosts
    assert config["globalknownhostsfile"] == "/dev/null"
    assert config["stricthostkeychecking"] == "accept-new"  # learnt once, checked afterwards
    assert argv[-3:] == ["alice@127.0.0.1", "id", "-un"] and argv[-4] == "--"


def test_batch_mode_for_waiting(tmp_path):
    to = ssh.SshTarget("u", "127.0.0.1", 22, tmp_path / "k", tmp_path / "kh")
    config = resolved(ssh.command(to, ["true"], batch=True, connect_timeout=7))
    assert config["batchmode"] == "yes" and config["connecttimeout"] == "7"


def _instance(tmp_path, console: str) -> Instance:
    folder = tmp_path / "vm"
    folder.mkdir()
    instance = Instance("vm", folder)
    instance.console_log.write_text(console)
    return instance


def test_wait_fails_at_once_when_the_vm_stopped_showing_the_console(tmp_path):
    instance = _instance(tmp_path, "[    1.0] booting\nKernel panic - not syncing: VFS: Unable to mount root fs\n")
    to = ssh.SshTarget("u", "127.0.0.1", 9, tmp_path / "k", tmp_path / "kh")
    with pytest.raises(CloudkvmError) as info:
        ssh.wait(instance, to, 30.0, running=lambda: False)
    assert "stopped before ssh answered" in info.value.message
    assert "Unable to mount root fs" in info.value.hint


@pytest.fixture
def silent_port():
    """A port that accepts and says nothing (what user networking looks like before the guest's sshd runs)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    stop = threading.Event()

    def serve():
        held = []
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue
        for conn in held:
            conn.close()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


def test_wait_gives_up_after_its_timeout_when_no_banner_comes(tmp_path, silent_port, monkeypatch):
    monkeypatch.setattr(ssh, "BANNER_SECONDS", 0.3)
    instance = _instance(tmp_path, "cloud-init[400]: running modules\n")
    to = ssh.SshTarget("u", "127.0.0.1", silent_port, tmp_path / "k", tmp_path / "kh")
    with pytest.raises(CloudkvmError) as info:
        ssh.wait(instance, to, 1.0, running=lambda: True)
    assert f"did not answer on 127.0.0.1:{silent_port} within 1 s" in info.value.message
    assert "cloud-init[400]: running modules" in info.value.hint


def test_target_needs_a_forward_to_port_22(tmp_path):
    instance = _instance(tmp_path, "")
    instance.write_json(instance.info_file, {"ssh": {"user": "u", "host": None, "port": None}})
    with pytest.raises(CloudkvmError, match="forwards no host port to the guest's port 22"):
        ssh.target(instance)
    instance.write_json(instance.info_file, {})
    with pytest.raises(CloudkvmError, match="no cloud-init user"):
        ssh.target(instance)
    instance.write_json(instance.info_file, {"ssh": {"user": "u", "host": "127.0.0.1", "port": 2222}})
    assert ssh.target(instance) == ssh.SshTarget("u", "127.0.0.1", 2222, Path(instance.dir) / "ssh_key",
                                                 Path(instance.dir) / "known_hosts")


@pytest.mark.parametrize("recorded, words", [
    ({"user": "-oProxyCommand=x", "host": "127.0.0.1", "port": 22}, "no cloud-init user"),
    ({"user": "u", "host": "127.0.0.1", "port": True}, "forwards no host port"),
    ({"user": "u", "host": "127.0.0.1", "port": 70000}, "forwards no host port"),
    ({"user": "u", "host": "-oProxyCommand=x", "port": 22}, "ssh.host is not an IPv4 address"),
])
def test_what_instance_json_says_is_checked_before_ssh_sees_it(tmp_path, recorded, words):
    instance = _instance(tmp_path, "")
    instance.write_json(instance.info_file, {"ssh": recorded})
    with pytest.raises(CloudkvmError, match=words):
        ssh.target(instance)
