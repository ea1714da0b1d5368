"""`cloudkvm up` / ls / status / console / logs / down / rm on a purpose-built guest, driven as a user would:
as subprocesses (the VM daemonizes) and through typer's runner for the read-only commands."""
import json
import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from cloudkvm.cli import app
from cloudkvm.guests.build import build_flat
from cloudkvm.kvm.system import kvm_available
from waits import wait_for

GUESTS = os.path.join(os.path.dirname(__file__), "guests")
pytestmark = pytest.mark.skipif(not kvm_available()[0], reason=f"/dev/kvm unavailable: {kvm_available()[1]}")


@pytest.fixture
def env(tmp_path, monkeypatch):
    state = tmp_path / "state"
    monkeypatch.setenv("CLOUDKVM_STATE_DIR", str(state))
    return {**os.environ, "CLOUDKVM_STATE_DIR": str(state)}


@pytest.fixture
def profile(tmp_path):
    guest = build_flat(os.path.join(GUESTS, "power_button.c"))
    path = tmp_path / "pb.yaml"
    path.write_text(f"name: pb\narch: x86_64\ncpus: 1\nmemory: 64M\nboot:\n  kernel: {guest}\n  format: flat\n")
    return path


def cli(env, *args, **kw):
    return subprocess.run([sys.executable, "-m", "cloudkvm", *args], env=env, capture_output=True, text=True,
                          timeout=120, **kw)



def test_up_ls_status_console_logs_down_rm(env, profile, tmp_path):
    started = cli(env, "up", str(profile))
    assert started.returncode == 0, started.stderr
    assert "pb: running" in started.stdout
    state = tmp_path / "state" / "pb"
    pid = int((state / "vmm.pid").read_text().split()[0])
    try:
        runner = CliRunner()
        listed = runner.invoke(app, ["ls"])
        assert listed.exit_code == 0 and "pb" in listed.output and "running" in listed.output
        status = json.loads(runner.invoke(app, ["status", "pb", "--json"]).output)
        assert status["state"] == "running" and status["pid"] == pid and status["cpus"] == 1
        assert (state / "control.sock").stat().st_mode & 0o777 == 0o600

        assert wait_for(lambda: b"power_button: ready" in (state / "console.log").read_bytes())
        console = subprocess.Popen([sys.executable, "-m", "cloudkvm", "console", "pb"], env=env,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out = b""
            deadline = time.monotonic() + 30
            while b"power_button: waiting" not in out and time.monotonic() < deadline:
                out += os.read(console.stdout.fileno(), 4096)
            assert b"power_button: waiting" in out
            console.stdin.write(b"\x1d")  # Ctrl-] detaches
            console.stdin.flush()
            assert console.wait(10) == 0
        finally:
            console.kill()
        logs = cli(env, "logs", "pb")
        assert logs.returncode == 0 and "power_button: ready" in logs.stdout

        down = cli(env, "down", "pb", "--timeout", "30")
        assert down.returncode == 0 and "powered off" in down.stdout, down
        status = json.loads(runner.invoke(app, ["status", "pb", "--json"]).output)
        assert status["state"] == "stopped" and status["result"]["reason"] == "poweroff"
        assert "pressed, powering off" in (state / "console.log").read_text()
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10), "the VMM process is still there"
    removed = cli(env, "rm", "pb")
    assert removed.returncode == 0 and not state.exists()


def test_rm_refuses_a_running_vm_and_down_force_stops_it(env, profile, tmp_path):
    assert cli(env, "up", str(profile)).returncode == 0
    pid = int((tmp_path / "state" / "pb" / "vmm.pid").read_text().split()[0])
    try:
        refused = cli(env, "rm", "pb")
        assert refused.returncode == 2 and "is running" in refused.stderr
        again = cli(env, "up", str(profile))
        assert again.returncode == 2 and "already running" in again.stderr
        forced = cli(env, "down", "pb", "--force")
        assert forced.returncode == 0 and "stopped" in forced.stdout
        assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10)
        status = json.loads(CliRunner().invoke(app, ["status", "pb", "--json"]).output)
        assert status["state"] == "stopped" and status["result"]["reason"] == "stopped"
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def test_a_dead_daemon_is_crashed_never_running(env, profile, tmp_path):
    assert cli(env, "up", str(profile)).returncode == 0
    pid = int((tmp_path / "state" / "pb" / "vmm.pid").read_text().split()[0])
    os.kill(pid, 9)
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10)
    status = json.loads(CliRunner().invoke(app, ["status", "pb", "--json"]).output)
    assert status["state"] == "crashed" and status["pid"] is None
    assert "reason" in status


def test_up_of_an_aarch64_profile_fails_with_one_line_after_validation(env, tmp_path):
    kernel = tmp_path / "Image"
    kernel.write_bytes(b"\0" * 64)
    path = tmp_path / "arm.yaml"
    path.write_text(f"name: arm\narch: aarch64\nboot:\n  kernel: {kernel}\n")
    proc = cli(env, "up", str(path))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "virt" in proc.stderr
    assert not (tmp_path / "state" / "arm").exists()


def test_up_with_a_qcow2_overlay_leaves_the_original_untouched(env, tmp_path):
    import shutil

    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img missing (apt-get install qemu-utils)")
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    pristine = tmp_path / "pristine.qcow2"
    shutil.copy(base, pristine)
    guest = build_flat(os.path.join(GUESTS, "virtio_blk.c"))
    profile = tmp_path / "blk.yaml"
    profile.write_text(f"name: blk\narch: x86_64\nmemory: 64M\nboot:\n  kernel: {guest}\n  format: flat\n"
                       f"disks:\n  - file: base.qcow2\n    overlay: true\n    size: 128M\n")
    assert cli(env, "up", str(profile)).returncode == 0
    state = tmp_path / "state" / "blk"
    assert wait_for(lambda: (state / "result.json").exists(), 60)
    result = json.loads((state / "result.json").read_text())
    console = (state / "console.log").read_text()
    assert result["reason"] == "poweroff", (result, console)
    assert "virtio_blk: write+read ok" in console and "virtio_blk: capacity 262144 sectors" in console
    overlay = state / "disk0.overlay.qcow2"
    check = subprocess.run(["qemu-img", "check", str(overlay)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(overlay)], capture_output=True,
                                     text=True).stdout)
    assert info["backing-filename"] == str(base) and info["virtual-size"] == 128 << 20
    same = subprocess.run(["qemu-img", "compare", str(base), str(pristine)], capture_output=True, text=True)
    assert same.returncode == 0, "the original image changed"
    differs = subprocess.run(["qemu-img", "compare", str(overlay), str(pristine)], capture_output=True)
    assert differs.returncode == 1  # the guest's writes live in the overlay


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_vms_asking_for_the_same_host_port_the_second_fails_and_the_first_is_untouched(env, tmp_path):
    import socket

    guest = build_flat(os.path.join(GUESTS, "power_button.c"))
    port = _free_port()
    for name in ("first", "second"):
        (tmp_path / f"{name}.yaml").write_text(
            f"name: {name}\narch: x86_64\nmemory: 64M\nboot:\n  kernel: {guest}\n  format: flat\n"
            f"network:\n  mode: user\n  forwards: ['tcp:127.0.0.1:{port}-:22']\n")
    assert cli(env, "up", str(tmp_path / "first.yaml")).returncode == 0
    pid = int((tmp_path / "state" / "first" / "vmm.pid").read_text().split()[0])
    try:
        second = cli(env, "up", str(tmp_path / "second.yaml"))
        assert second.returncode == 2, second
        lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0]
        assert not (tmp_path / "state" / "second" / "vmm.pid").exists()
        status = json.loads(CliRunner().invoke(app, ["status", "first", "--json"]).output)
        assert status["state"] == "running" and status["forwards"] == [f"tcp:127.0.0.1:{port}-:22"]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # the first VM's forward still listens (on loopback)
        listening = [line.split()[1] for line in open("/proc/net/tcp").read().splitlines()[1:]
                     if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16) == port]
        assert listening == [f"0100007F:{port:04X}"]  # 127.0.0.1 only, never 0.0.0.0
    finally:
        cli(env, "down", "first", "--force")
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def test_long_work_shows_progress_on_a_terminal_and_stays_quiet_when_piped(env, profile):
    import pty

    piped = cli(env, "up", str(profile))
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr
    cli(env, "down", "pb", "--force")
    master, slave = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "cloudkvm", "up", str(profile)], env=env, stdout=subprocess.PIPE,
                              stderr=slave, timeout=120)
        os.close(slave)
        shown = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
        cli(env, "down", "pb", "--force")
    assert proc.returncode == 0
    assert b"cloudkvm: starting pb ..." in shown and b"done (" in shown


def test_the_serial_log_goes_where_the_profile_says(env, tmp_path):
    guest = build_flat(os.path.join(GUESTS, "power_button.c"))
    profile = tmp_path / "log.yaml"
    profile.write_text(f"name: logged\narch: x86_64\nmemory: 64M\nboot:\n  kernel: {guest}\n  format: flat\n"
                       f"console:\n  log: serial.txt\n")
    assert cli(env, "up", str(profile)).returncode == 0
    try:
        assert wait_for(lambda: (tmp_path / "serial.txt").exists()
                        and b"power_button: ready" in (tmp_path / "serial.txt").read_bytes())
        assert not (tmp_path / "state" / "logged" / "console.log").exists()
        logs = cli(env, "logs", "logged")
        assert "power_button: ready" in logs.stdout
    finally:
        cli(env, "down", "logged", "--force")


def test_up_foreground_runs_attached_with_the_console_here(env, tmp_path):
    guest = build_flat(os.path.join(GUESTS, "c_hello.c"))
    profile = tmp_path / "fg.yaml"
    profile.write_text(f"name: fg\narch: x86_64\ncpus: 2\nmemory: 64M\nboot:\n  kernel: {guest}\n  format: flat\n")
    proc = cli(env, "up", "--foreground", str(profile), stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "c_hello: vCPU 1 of 2" in proc.stdout and "VM ended: poweroff" in proc.stderr
    assert not (tmp_path / "state" / "fg" / "vmm.pid").exists()  # nothing was daemonized


def test_console_to_a_vm_whose_socket_is_gone_is_a_one_line_error(env, profile, tmp_path):
    assert cli(env, "up", str(profile)).returncode == 0
    state = tmp_path / "state" / "pb"
    try:
        (state / "control.sock").unlink()  # the daemon lives on, its socket does not
        proc = cli(env, "console", "pb", stdin=subprocess.DEVNULL)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and "control socket" in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        cli(env, "down", "pb", "--force")
