"""Issue 11's serious findings, end to end through the CLI with purpose-built guests: a guest cannot make cloudkvm
open a host file by writing a qcow2 header into its raw disk, and concurrent `up`s of one name start one VM."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cloudkvm.guests.build import build_flat
from cloudkvm.instances import Instance
from cloudkvm.kvm.system import kvm_available
from waits import processes_naming, wait_for

GUESTS = Path(__file__).parent / "guests"
pytestmark = pytest.mark.skipif(not kvm_available()[0], reason=f"/dev/kvm unavailable: {kvm_available()[1]}")
SECRET = b"TOP-SECRET-HOST-FILE-0123456789"


@pytest.fixture
def secret():
    """A root-only host file at a short path (its name must fit in the qcow2 header's first sector)."""
    folder = Path(tempfile.mkdtemp(prefix="ck", dir="/tmp"))
    path = folder / "s"
    path.write_bytes(SECRET * 64)
    path.chmod(0o400)
    yield path
    shutil.rmtree(folder)


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "CLOUDKVM_STATE_DIR": str(tmp_path / "state")}


def cli(env, *args):
    return subprocess.run([sys.executable, "-m", "cloudkvm", *args], env=env, capture_output=True, text=True,
                          timeout=180)



def attack_disk(tmp_path: Path, secret: Path) -> tuple[Path, bytes]:
    """A raw disk whose sector 1 holds a qcow2 header (made by qemu-img) naming a root-only host file as its
    backing file, with the rest of that qcow2 image's tables where the header says; sector 0 is zeros."""
    made = tmp_path / "made.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", str(secret), "-F", "raw",
                    str(made), "1M"],
                   check=True)
    image = bytearray(made.read_bytes())
    header = bytes(image[:512])
    assert image[512:1024] == bytes(512), "the header spills into sector 1"
    image[512:1024], image[:512] = header, bytes(512)
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(image).ljust(1 << 20, b"\0"))
    return disk, header


def run_guest(env, profile: Path, state: Path, runs: int) -> list[dict]:
    """`up` the sector_copy guest until it has ended `runs` times in all; what each run printed."""
    assert cli(env, "up", str(profile)).returncode == 0
    instance = Instance(state.name, state)
    assert wait_for(lambda: instance.state() == "stopped", 60), (state / "vmm.log").read_text()
    text = (state / "console.log").read_text()
    seen = [{"sector 0": chunk.split()[0], **dict(re.findall(r"sector_copy: (.+?) status (\d+)", chunk))}
            for chunk in text.split("sector_copy: sector 0 starts ")[1:]]
    assert len(seen) == runs, text
    return seen


def test_a_guest_cannot_turn_its_raw_disk_into_a_qcow2_naming_a_host_file(env, tmp_path, secret):
    disk, header = attack_disk(tmp_path, secret)
    guest = build_flat(GUESTS / "sector_copy.c")
    profile = tmp_path / "probe.yaml"
    profile.write_text(f"name: probe\nmemory: 64M\nboot:\n  kernel: {guest}\n  format: flat\n"
                       f"disks:\n  - file: {disk}\n")
    state = tmp_path / "state" / "probe"
    first = run_guest(env, profile, state, 1)[0]
    assert first["sector 0"] == "00" * 24
    assert first["write sector 0"] == "1", first  # VIRTIO_BLK_S_IOERR: the write would change the probed format
    assert disk.read_bytes()[:512] == bytes(512)
    info = json.loads((state / "instance.json").read_text())
    assert info["probed_formats"][str(disk)]["format"] == "raw"

    # next start: still raw for the guest, whatever its sector 0 says (here written by a host tool meanwhile)
    with open(disk, "r+b") as f:
        f.write(header)
    (state / "result.json").unlink()
    second = run_guest(env, profile, state, 2)[1]
    assert second["sector 0"] == header[:24].hex()
    assert SECRET[:24].hex() not in (state / "console.log").read_text()


def test_validate_prints_the_backing_chain_and_refuses_an_absolute_backing_name(env, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    (tmp_path / "vm").mkdir()
    top = tmp_path / "vm" / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(top), "1M"],
                   check=True)
    profile = tmp_path / "vm" / "p.yaml"
    profile.write_text("name: p\nboot:\n  kernel: /bin/true\ndisks:\n  - file: top.qcow2\n")
    proc = cli(env, "validate", str(profile))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{profile}:5:" in proc.stderr and "absolute path" in proc.stderr and "trust_backing" in proc.stderr
    profile.write_text(profile.read_text() + "    trust_backing: true\n")
    proc = cli(env, "validate", str(profile))
    assert proc.returncode == 0, proc.stderr
    assert f"disks.0: {top} (qcow2, probed) <- {secret} (raw)" in proc.stdout



def test_four_concurrent_ups_of_one_name_start_one_vm(env, tmp_path):
    guest = build_flat(GUESTS / "power_button.c")
    profile = tmp_path / "race-profile.yaml"
    with socket.socket() as probe:  # a forward: a loser must not report the winner's port as "in use"
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    profile.write_text(f"name: race\nmemory: 64M\nboot:\n  kernel: {guest}\n  format: flat\n"
                       f"network:\n  mode: user\n  forwards: [tcp:127.0.0.1:{port}-:22]\n")
    procs = [subprocess.Popen([sys.executable, "-m", "cloudkvm", "up", str(profile)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [(p.wait(timeout=180), *p.communicate()) for p in procs]
    try:
        winners = [r for r in results if r[0] == 0]
        assert len(winners) == 1, results
        for code, _, err in results:
            if code:
                assert code == 2 and err.count("\n") == 1, err
                assert "already running" in err or "being started" in err, err
        assert len(processes_naming(str(profile))) == 1
        late = cli(env, "up", str(profile))  # after the winner runs: its own forward is no reason
        assert late.returncode == 2 and "already running" in late.stderr, late.stderr
    finally:
        cli(env, "down", "race", "--force")
    assert wait_for(lambda: not processes_naming(str(profile)), 30)


@pytest.mark.parametrize("record", ["reused", "minus-one", "one"])
def test_down_never_signals_a_process_that_is_not_the_vm(env, tmp_path, record):
    """The daemon dies; its pid file then names another process: the same pid reused (as after a reboot: the
    recorded start time no longer matches), or -1 / 1. `ls` says crashed, `down` signals nobody, `up` starts."""
    guest = build_flat(GUESTS / "power_button.c")
    profile = tmp_path / "pid.yaml"
    profile.write_text(f"name: pid\nmemory: 64M\nboot:\n  kernel: {guest}\n  format: flat\n")
    state = tmp_path / "state" / "pid"
    assert cli(env, "up", str(profile)).returncode == 0
    daemon_pid, started = map(int, (state / "vmm.pid").read_text().split())
    os.kill(daemon_pid, 9)
    assert wait_for(lambda: not Path(f"/proc/{daemon_pid}").exists() or
                    "Z" in Path(f"/proc/{daemon_pid}/stat").read_text().split(")")[1][:3])
    stranger = subprocess.Popen(["sleep", "300"])
    try:
        text = {"reused": f"{stranger.pid} {started}", "minus-one": f"-1 {started}", "one": f"1 {started}"}[record]
        (state / "vmm.pid").write_text(text + "\n")
        status = json.loads(cli(env, "status", "pid", "--json").stdout)
        assert status["state"] == "crashed" and "died without recording a result" in status["reason"]
        assert "crashed" in cli(env, "ls").stdout
        down = cli(env, "down", "pid")
        assert down.returncode == 0 and "not running" in down.stdout
        assert stranger.poll() is None  # the stranger was never signalled
        assert cli(env, "up", str(profile)).returncode == 0  # and the instance starts again
    finally:
        stranger.kill()
        cli(env, "rm", "pid", "--force")
