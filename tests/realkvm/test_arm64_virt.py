"""The aarch64 virt board on the arm64 test host's real KVM (VHE, vGICv3): `cloudkvm demo` (every vCPU says hello
through the PL011, then PSCI SYSTEM_OFF), and `cloudkvm up` of a vm2-like profile — Debian's arm64 cloud kernel,
an initramfs loading virtio_mmio/virtio_blk/virtio_net from it, a qcow2 disk whose marker file the guest reads,
user networking with the seed's forward tcp:127.0.0.1:1122-:22 — then a TCP connection through the forward, the
console both ways, `logs`, `status`, and `down`; and `down` of a guest whose kernel has gpio-keys (Debian's generic
arm64 kernel) powering it off gracefully through the PL061 power key, as QEMU's system_powerdown does."""
import json
import shlex

import pytest

import arm64_vm
from cloudkvm.boards import registry

pytestmark = [pytest.mark.realkvm, pytest.mark.timeout(2400)]  # includes the test host's boots

PROFILE = """name: vm2t
arch: aarch64
machine: virt
cpu: host
cpus: 2
memory: 512M
boot:
  kernel: {kernel}
  initrd: {initrd}
  cmdline: console=ttyAMA0 earlycon panic=-1
disks:
  - file: disk.qcow2
    overlay: true
network:
  mode: user
  forwards:
    - tcp:127.0.0.1:1122-:22
"""
KEY_PROFILE = """name: pk
arch: aarch64
cpus: 1
memory: 512M
boot:
  kernel: {kernel}
  initrd: {initrd}
  cmdline: console=ttyAMA0 panic=-1
network: none
"""

# Inside the test host, from the shared scratch folder {out}: the demo, then the VM's whole life.
SCRIPT = """
set -u
cd {out}
export CLOUDKVM_STATE_DIR=/tmp/state  # a tmpfs: a Unix socket (control.sock) cannot be made on the 9p share
python3 -m cloudkvm demo --cpus 2 > demo.out 2> demo.err; echo $? > demo.rc
python3 -m cloudkvm up vm.yaml > up.out 2> up.err; echo $? > up.rc
[ "$(cat up.rc)" = 0 ] || {{ cp /tmp/state/vm2t/vmm.log vmm.log; exit 0; }}
python3 - <<'EOF' > net.out 2>&1
import pathlib, socket, time
log = pathlib.Path("/tmp/state/vm2t/console.log")
deadline = time.monotonic() + 900
while {ready!r} not in (log.read_text(errors="replace") if log.exists() else "") and time.monotonic() < deadline:
    time.sleep(1)
print("ready after", round(900 - (deadline - time.monotonic())), "s")
with socket.create_connection(("127.0.0.1", 1122), timeout=60) as sock:
    print("answer:", sock.makefile().readline().strip())
EOF
python3 - <<'EOF'
# `cloudkvm console` with its input open until the answer came (importing cloudkvm takes seconds there)
import os, subprocess, sys, time
con = subprocess.Popen([sys.executable, "-m", "cloudkvm", "console", "vm2t"], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
os.set_blocking(con.stdout.fileno(), False)
os.set_blocking(con.stderr.fileno(), False)
out = err = b""
def pump(until, what, limit=180):
    global out, err
    deadline = time.monotonic() + limit
    while until not in what() and time.monotonic() < deadline and con.poll() is None:
        out += con.stdout.read() or b""
        err += con.stderr.read() or b""
        time.sleep(0.2)
pump(b"attached", lambda: err)
con.stdin.write(b"echo con$((6*7))\\n")
con.stdin.flush()
pump(b"con42", lambda: out)
con.stdin.close()  # end of input: the console detaches
try:
    con.wait(60)
except subprocess.TimeoutExpired:
    con.kill()
out += con.stdout.read() or b""
err += con.stderr.read() or b""
open("console.out", "wb").write(out)
open("console.err", "wb").write(err + f"\\nexit status {{con.returncode}}\\n".encode())
EOF
python3 -m cloudkvm logs vm2t > logs.out 2> logs.err
python3 -m cloudkvm status vm2t --json > status.json 2> status.err
python3 -m cloudkvm down vm2t --timeout 20 > down.out 2> down.err; echo $? > down.rc
python3 -m cloudkvm status vm2t --json > status-after.json 2>&1
cp /tmp/state/vm2t/vmm.log vmm.log
python3 -m cloudkvm up pk.yaml > pk-up.out 2> pk-up.err; echo $? > pk-up.rc
python3 - <<'EOF' > pk-wait.out 2>&1
import pathlib, time
log = pathlib.Path("/tmp/state/pk/console.log")
deadline = time.monotonic() + 900
while {key_ready!r} not in (log.read_text(errors="replace") if log.exists() else "") and time.monotonic() < deadline:
    time.sleep(1)
EOF
python3 -m cloudkvm down pk --timeout 120 > pk-down.out 2> pk-down.err; echo $? > pk-down.rc
python3 -m cloudkvm status pk --json > pk-status.json 2>&1
cp /tmp/state/pk/console.log pk-console.log
"""


@pytest.fixture(scope="module")
def run(testhost, tmp_path_factory):
    registry.named("virt").demo_guest()  # built here (cross toolchain); the test host reads the shared cache
    kernel, initrd = arm64_vm.guest()
    out = tmp_path_factory.mktemp("arm64-virt")
    arm64_vm.marker_disk(out)
    (out / "vm.yaml").write_text(PROFILE.format(kernel=kernel, initrd=initrd))
    key_kernel, key_initrd = arm64_vm.power_key_guest()
    (out / "pk.yaml").write_text(KEY_PROFILE.format(kernel=key_kernel, initrd=key_initrd))
    result = testhost("arm64").run(SCRIPT.format(out=shlex.quote(str(out)), ready=arm64_vm.READY,
                                                 key_ready=arm64_vm.KEY_READY),
                                   writable=(out,), timeout=1500)
    assert result.status == 0, result.describe()
    return {f.name: f.read_text(errors="replace") for f in out.iterdir() if f.is_file()}


def test_the_demo_says_hello_from_every_vcpu_and_powers_off(run):
    assert run["demo.rc"].strip() == "0", run["demo.err"]
    assert "cloudkvm: hello from vCPU 0 of 2" in run["demo.out"]
    assert "cloudkvm: hello from vCPU 1 of 2" in run["demo.out"]
    assert "VM ended: poweroff" in run["demo.err"]


def test_up_starts_the_daemonized_vm(run):
    assert run["up.rc"].strip() == "0", run["up.out"] + run["up.err"]
    status = json.loads(run["status.json"])
    assert status["state"] == "running", status


def test_the_guest_boots_on_both_vcpus_and_reads_its_qcow2_disk(run):
    log = run["logs.out"]
    assert "Booting Linux on physical CPU 0x0000000000" in log and "GICv3" in log, log[-3000:]
    assert "smp: Brought up 1 node, 2 CPUs" in log
    assert "cpus online: 0-1" in log
    assert f"disk marker: {arm64_vm.DISK_MARKER}" in log, log[-3000:]


def test_a_tcp_connection_through_the_forward_reaches_the_guest(run):
    assert f"answer: {arm64_vm.RESPONDER_LINE}" in run["net.out"], run["net.out"] + run["logs.out"][-3000:]


def test_the_console_carries_input_and_output_through_the_pl011(run):
    assert "con42" in run["console.out"], run["console.out"] + run["console.err"]


def test_the_guest_has_its_virtio_entropy_source_and_printed_early_through_earlycon(run):
    log = run["logs.out"]
    assert "rng: virtio_rng" in log, log[-3000:]
    assert "earlycon: pl11 at MMIO 0x0000000009000000" in log, log[:3000]


def test_down_ends_the_vm(run):
    assert run["down.rc"].strip() == "0", run["down.out"] + run["down.err"]
    after = json.loads(run["status-after.json"])
    # Debian's cloud arm64 kernel has no gpio-keys driver: the power key goes unheard, as it would under QEMU with a
    # device tree, and `down` stops the VM after --timeout (the graceful path: the next test, generic kernel)
    assert after["state"] == "stopped" and after["result"]["reason"] == "stopped", after


def test_down_powers_a_guest_with_gpio_keys_off_through_the_power_key(run):
    assert run["pk-up.rc"].strip() == "0", run["pk-up.out"] + run["pk-up.err"]
    log = run["pk-console.log"]
    assert arm64_vm.KEY_READY in log and arm64_vm.KEY_PRESSED in log, log[-3000:]
    assert run["pk-down.rc"].strip() == "0" and "powered off" in run["pk-down.out"], run["pk-down.out"]
    status = json.loads(run["pk-status.json"])
    assert status["state"] == "stopped" and status["result"]["reason"] == "poweroff", status
