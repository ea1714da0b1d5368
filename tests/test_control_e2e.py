"""The control socket under clients that never read, end to end: a daemonized purpose-built guest (tests/guests/
power_button.c, which prints a heartbeat), a console client that never reads, a client that pipelines thousands
of requests and never reads a reply, and `cloudkvm down` as a user runs it."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from cloudkvm.guests.build import build_flat
from cloudkvm.kvm.system import kvm_available
from waits import wait_for

GUESTS = os.path.join(os.path.dirname(__file__), "guests")
pytestmark = pytest.mark.skipif(not kvm_available()[0], reason=f"/dev/kvm unavailable: {kvm_available()[1]}")
PIPELINED = 5000           # {"cmd": "status"} requests sent without reading one reply
PROMPT = 15.0              # `down` takes ~1-4 s here (mostly CLI start-up under load); it took 33 s, "killed"


def cli(env, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "cloudkvm", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)



def flood(path) -> socket.socket:
    """Connect and pipeline up to PIPELINED status requests, one write each (so each one arrives on its own),
    without reading a reply; returns the still-open socket once the VMM dropped it or 5 s passed."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    sock.settimeout(1)
    deadline = time.monotonic() + 5
    try:
        for _ in range(PIPELINED):
            sock.sendall(b'{"cmd": "status"}\n')
            time.sleep(0.0005)
            if time.monotonic() > deadline:
                break
    except OSError:
        pass            # dropped by the VMM (EPIPE / ECONNRESET), or it stopped reading
    return sock


def test_down_powers_off_promptly_while_a_client_pipelines_and_never_reads(tmp_path):
    state = tmp_path / "state"
    env = {**os.environ, "CLOUDKVM_STATE_DIR": str(state)}
    guest = build_flat(os.path.join(GUESTS, "power_button.c"))
    profile = tmp_path / "pb.yaml"
    profile.write_text(f"name: pb\narch: x86_64\ncpus: 1\nmemory: 64M\nboot:\n  kernel: {guest}\n  format: flat\n")
    started = cli(env, "up", str(profile))
    assert started.returncode == 0, started.stderr
    folder = state / "pb"
    pid = int((folder / "vmm.pid").read_text().split()[0])
    hog = lazy = None
    try:
        assert wait_for(lambda: b"power_button: ready" in (folder / "console.log").read_bytes())
        lazy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lazy.connect(str(folder / "control.sock"))
        lazy.sendall(b'{"cmd": "console"}\n')  # and never reads the guest's output
        hog = flood(folder / "control.sock")
        begun = time.monotonic()
        down = cli(env, "down", "pb", "--timeout", "30")
        took = time.monotonic() - begun
        assert down.returncode == 0 and "powered off" in down.stdout, (down.stdout, down.stderr, took)
        assert took < PROMPT, f"down took {took:.1f} s"
        result = json.loads((folder / "result.json").read_text())
        assert result["reason"] == "poweroff"
        assert "pressed, powering off" in (folder / "console.log").read_text()
        assert "dropped" in (folder / "vmm.log").read_text()  # the VMM said why the client went away
        hog.settimeout(5)
        try:
            while hog.recv(1 << 16):  # the replies it was sent before it was dropped, then end of file
                pass
        except ConnectionResetError:  # or this: Linux's word for a close with our requests still unread
            pass
    finally:
        for sock in (hog, lazy):
            if sock is not None:
                sock.close()
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10), "the VMM process is still there"
