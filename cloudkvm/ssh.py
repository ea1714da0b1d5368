"""`cloudkvm ssh` and `up --wait ssh`: the system OpenSSH client into an instance through its forwarded port, with
the instance's own key and a known_hosts file of its own (the user's ~/.ssh/known_hosts is never read or written;
the guest's host key is learnt on first use and checked afterwards, until `cloudkvm rm`)."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import CloudkvmError, printable
from .images.cloudinit import USER_NAME
from .instances import Instance
from .fsutil import tail_regular

KNOWN_HOSTS = "known_hosts"
BANNER_PREFIX = b"SSH-"  # RFC 4253 §4.2: the server's identification string comes first
POLL_SECONDS = 1.0
BANNER_SECONDS = 5.0  # how long one look at the port waits for the server's identification string


@dataclass(frozen=True)
class SshTarget:
    """Where and as whom `ssh` logs in to one instance."""

    user: str
    host: str
    port: int
    key: Path
    known_hosts: Path


def target(instance: Instance) -> SshTarget:
    """The instance's ssh target from what `up` recorded (checked: instance.json is a file on disk), with the
    instance folder's own key and known_hosts; a one-line error when it has no seed user or no forward to the
    guest's port 22."""
    from .cloudimage import SSH_KEY
    from .net.config import ipv4_address

    info = instance.info().get("ssh")
    if not isinstance(info, dict) or not isinstance(info.get("user"), str) or not USER_NAME.fullmatch(info["user"]):
        raise CloudkvmError(f"instance '{instance.name}' has no cloud-init user to log in as",
                            "ssh needs a profile with images: (or cloud_init:), started by this version of cloudkvm")
    port, host = info.get("port"), info.get("host")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536 or not isinstance(host, str):
        raise CloudkvmError(f"instance '{instance.name}' forwards no host port to the guest's port 22",
                            "add a forward such as tcp:127.0.0.1:2222-:22 under network.forwards")
    try:
        host = ipv4_address(host)
    except (ValueError, CloudkvmError):
        raise CloudkvmError(f"{instance.info_file}: ssh.host is not an IPv4 address",
                            f"`cloudkvm up` writes it again; or `cloudkvm rm {instance.name}`") from None
    return SshTarget(info["user"], host, port, instance.dir / SSH_KEY, instance.dir / KNOWN_HOSTS)


def ssh_client() -> str:
    path = shutil.which("ssh")
    if path is None:
        raise CloudkvmError("no ssh client on this host", "install OpenSSH's client (Debian: apt install "
                                                           "openssh-client)")
    return path


def command(to: SshTarget, args: list[str], *, batch: bool = False, connect_timeout: int | None = None) -> list[str]:
    """The `ssh` argv: the instance key only (no agent keys offered), its own known_hosts, then `args`."""
    argv = [ssh_client(), "-i", str(to.key), "-p", str(to.port),
            "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
            "-o", f"UserKnownHostsFile={to.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=accept-new", "-o", "LogLevel=ERROR"]
    if batch:
        argv += ["-o", "BatchMode=yes"]
    if connect_timeout is not None:
        argv += ["-o", f"ConnectTimeout={connect_timeout}"]
    return argv + ["--", f"{to.user}@{to.host}", *args]


def banner(host: str, port: int, timeout: float | None = None) -> bytes:
    """The first bytes the forwarded port sends (user networking accepts every connection, so only a banner
    says that the guest's sshd answered); b"" when nothing came."""
    timeout = BANNER_SECONDS if timeout is None else timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            return conn.recv(256)
    except OSError:
        return b""


def console_tail(instance: Instance, lines: int = 8) -> str:
    """The console log's last lines, on one line, control characters shown as escapes."""
    try:
        text = tail_regular(instance.console_log).decode(errors="replace")
    except OSError:
        return "no console log"
    tail = [printable(line.strip()) for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(tail) or "empty console log"


def _logs_in(to: SshTarget) -> bool:
    try:
        done = subprocess.run(command(to, ["true"], batch=True, connect_timeout=10), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def wait(instance: Instance, to: SshTarget, timeout: float, running=None) -> float:
    """Block until a login with the instance key runs `true` in the guest; the seconds it took. A one-line error
    with the console's last lines when the VM stops or `timeout` passes first."""
    running = running or (lambda: instance.state() == "running")
    start = time.monotonic()
    while True:
        if not running():
            raise CloudkvmError(f"instance '{instance.name}' stopped before ssh answered ({instance.state()})",
                                f"console: {console_tail(instance)}")
        if banner(to.host, to.port).startswith(BANNER_PREFIX):
            if _logs_in(to):
                return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise CloudkvmError(f"instance '{instance.name}': ssh did not answer on {to.host}:{to.port} within "
                                f"{timeout:g} s", f"console: {console_tail(instance)}")
        time.sleep(POLL_SECONDS)
