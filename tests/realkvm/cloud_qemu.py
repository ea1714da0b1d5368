"""Booting the test cloud image (tests/testhosts/cloudimage.py) to an answering ssh, under QEMU or any other VMM.

The pieces are shared by both sides of the comparison: the same NoCloud seed (cloudkvm's own `meta-data` and
`user-data` writers, cloudkvm's `write_seed`), the same qcow2 overlay on the image grown to 4G, the same ssh check,
and the same clock, started just before the VMM's process and stopped when ssh first runs a command in the guest.
`qemu_command` is the reference: QEMU q35 with KVM and direct kernel boot, virtio-blk disks, virtio-net with a
user-network forward to the guest's port 22.

Run as a script (inside the x86_64 test host, by tests/realkvm/test_cloud_image_qemu.py), it stages the image in
a tmpfs, boots it under QEMU and writes `result.json` (timings, the check's output) and the guest's console log to
`--out`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cloudkvm.images.cloudinit import meta_data, user_data
from cloudkvm.images.seed import write_seed

USER = "cloudkvm"
OVERLAY_SIZE = "4G"
SSH_CHECK = "id -un; df -h /; cat /run/cloud-init/result.json"
# cloud-init writes result.json when its last stage ends; waiting for it inside the guest costs one login
SSH_WAIT_THEN_CHECK = "until [ -e /run/cloud-init/result.json ]; do sleep 1; done; " + SSH_CHECK
# where the guest's boot time went (kernel, initrd, user space; the slowest units), read after the check
BOOT_ANALYSIS = "systemd-analyze; systemd-analyze blame --no-pager | head -n 15"
SSH_ERROR = 255  # ssh(1): the status of a failed connection or login, as opposed to the remote command's
BANNER_PREFIX = b"SSH-"  # RFC 4253 §4.2: the server's identification string comes first
QEMU_MEMORY_MIB, QEMU_CPUS = 1024, 1


@dataclass(frozen=True)
class GuestFiles:
    """What one boot of the image needs beside the image: its overlay, seed ISO and ssh key."""
    overlay: Path
    seed: Path
    key: Path  # the private key; `key.with_suffix(".pub")` is the public half


@dataclass
class SshReady:
    """How a boot went: seconds from the VMM's start to ssh running a command, and to the check's full answer."""
    ssh_seconds: float | None = None       # the first login that ran `true` in the guest
    finished_seconds: float | None = None  # the check found cloud-init's result.json (cloud-init finished)
    check_output: str = ""                 # the last output of SSH_CHECK
    analysis: str = ""                     # BOOT_ANALYSIS's output, once the check is done
    vmm_exit: int | None = None            # the VMM's exit status when it ended before that
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CheckResult:
    """SSH_CHECK's answer, read: the login user, the root file system's size, cloud-init's errors."""
    user: str
    root_size_bytes: int | None
    cloud_init_errors: list | None  # None: no result.json (cloud-init not finished)
    datasource: str | None


def make_ssh_key(folder: Path) -> Path:
    """A new passphrase-less ed25519 key pair in `folder` (ssh-keygen); returns the private key's path."""
    key = folder / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "cloudkvm-test", "-f", str(key)],
                   check=True, stdin=subprocess.DEVNULL, capture_output=True)
    return key


def seed_files(public_key: str, *, instance_id: str = "cloudkvm-test-1", hostname: str = "cloudimg",
               network_config: bytes | None = None) -> dict[str, bytes]:
    """The NoCloud files: user USER with `public_key` and passwordless sudo, ed25519 host keys only."""
    files = {"meta-data": meta_data(instance_id, hostname).encode(),
             "user-data": user_data(user=USER, authorized_keys=[public_key.strip()], hostname=hostname, packages=[],
                                    extra=[], ssh_genkeytypes=["ed25519"]).encode()}
    if network_config is not None:
        files["network-config"] = network_config
    return files


def make_overlay(base: Path, overlay: Path, size: str = OVERLAY_SIZE) -> Path:
    """A qcow2 overlay on `base` (the image is never written), grown to `size`: `qemu-img create -b`."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay), size],
                   check=True, capture_output=True)
    return overlay


def prepare_guest(base: Path, folder: Path, size: str = OVERLAY_SIZE) -> GuestFiles:
    """Key, seed ISO (label cidata) and overlay for one boot of `base`, all in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    key = make_ssh_key(folder)
    seed = folder / "seed.iso"
    write_seed(seed, seed_files(key.with_suffix(".pub").read_text()))
    return GuestFiles(make_overlay(base, folder / "overlay.qcow2", size), seed, key)


def stage(files: list[Path], folder: Path) -> list[Path]:
    """Copies of `files` in `folder` (a tmpfs in the test host: every VMM then reads them from memory, not
    through the test host's 9p share)."""
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copyfile(f, folder / f.name)) for f in files]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_loopback() -> None:
    """Bring `lo` up (a fresh network namespace or test host may have it down; every forward listens there). Its
    state is read from sysfs (IFF_UP in `flags`): the arm64 test host's root has no `ip`."""
    if not int(Path("/sys/class/net/lo/flags").read_text(), 16) & 1:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def qemu_command(kernel: Path, initrd: Path, cmdline: str, guest: GuestFiles, port: int, console_log: Path,
                 qemu: str = "qemu-system-x86_64") -> list[str]:
    """QEMU q35 with KVM, direct kernel boot, the overlay and seed on virtio-blk, virtio-net with user networking
    forwarding 127.0.0.1:`port` to the guest's port 22, a virtio-rng (as cloudkvm gives every VM)."""
    return [qemu, "-M", "q35", "-enable-kvm", "-cpu", "host", "-m", str(QEMU_MEMORY_MIB), "-smp", str(QEMU_CPUS),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", f"file:{console_log}",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
            "-drive", f"file={guest.overlay},if=virtio,format=qcow2,discard=unmap",
            "-drive", f"file={guest.seed},if=virtio,format=raw,readonly=on",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22", "-device", "virtio-net-pci,netdev=n0",
            "-device", "virtio-rng-pci"]


def ssh_command(key: Path, port: int, remote: str, user: str = USER) -> list[str]:
    """ssh to the guest through the forward, with `key` only, learning no host key, never prompting."""
    return ["ssh", "-i", str(key), "-p", str(port), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", "ConnectTimeout=20", "-o", "LogLevel=ERROR", f"{user}@127.0.0.1", remote]


def sshd_banner(port: int, timeout: float = 5.0) -> bool:
    """Whether the forwarded port answers with an ssh identification string (user networking accepts every
    connection, so only a banner says that the guest's sshd is there)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            return conn.recv(64).startswith(BANNER_PREFIX)
    except OSError:
        return False


def boot_to_ssh(vmm: list[str], key: Path, port: int, timeout: float, *, log: Path,
                poll: float = 1.0) -> SshReady:
    """Start `vmm` (any VMM's command line booting the image with the forward to `port`), then wait for ssh:
    the time to the first login that runs a command, then (one more login) to cloud-init's result and
    SSH_CHECK's answer. The VMM is killed at the end; its stdout and stderr go to `log`."""
    result = SshReady()
    start = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(vmm, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        while time.monotonic() - start < timeout:
            if proc.poll() is not None:
                result.vmm_exit = proc.returncode
                result.notes.append(f"the VMM exited with status {proc.returncode} after "
                                    f"{time.monotonic() - start:.0f} s")
                break
            if result.ssh_seconds is None:
                if sshd_banner(port) and _run_ssh(key, port, "true", timeout=60)[0] == 0:
                    result.ssh_seconds = time.monotonic() - start
                    continue
            else:  # one login that waits in the guest: each login costs the guest a session while cloud-init runs
                left = timeout - (time.monotonic() - start)
                status, output = _run_ssh(key, port, SSH_WAIT_THEN_CHECK, timeout=max(left, 1))
                if status != SSH_ERROR:
                    result.check_output = output
                    if status == 0:
                        result.finished_seconds = time.monotonic() - start
                        result.analysis = _run_ssh(key, port, BOOT_ANALYSIS, timeout=120)[1]
                    else:
                        result.notes.append(f"the check exited with status {status}")
                    break
            time.sleep(poll)
        else:
            result.notes.append(f"not finished within {timeout:g} s")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return result


def _run_ssh(key: Path, port: int, remote: str, timeout: float) -> tuple[int, str]:
    try:
        done = subprocess.run(ssh_command(key, port, remote), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return SSH_ERROR, ""
    return done.returncode, done.stdout + done.stderr


def read_check(output: str) -> CheckResult:
    """SSH_CHECK's output read: `id -un`'s user, `df -h /`'s size in bytes, result.json's errors."""
    lines = output.splitlines()
    user = lines[0].strip() if lines else ""
    size = None
    for line in lines:
        words = line.split()
        if len(words) >= 6 and words[5] == "/":
            size = human_bytes(words[1])
    errors, datasource = None, None
    brace = output.find("{")
    if brace >= 0:
        try:
            v1 = json.loads(output[brace:])["v1"]
            errors, datasource = v1.get("errors"), v1.get("datasource")
        except (ValueError, KeyError, TypeError):
            pass
    return CheckResult(user, size, errors, datasource)


def human_bytes(text: str) -> int:
    """`df -h`'s size (`3.9G`, `512M`, `980K`) in bytes (powers of 1024, as df -h prints them)."""
    m = re.fullmatch(r"([\d.]+)([KMGTP]?)", text)
    if not m:
        raise ValueError(f"not a df -h size: {text!r}")
    return int(float(m.group(1)) * 1024 ** " KMGTP".index(m.group(2) or " "))


def sha256_of(path: Path) -> str:
    """The file's SHA-256, hex (to show a base image was never written)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def bench_line(cloudkvm_seconds: float | None, qemu_seconds: float | None) -> str:
    """`BENCH cloud_image_ssh_ready cloudkvm=…s qemu=…s speedup=…`, or a `#` line naming who did not get there."""
    if cloudkvm_seconds is None or qemu_seconds is None:
        missing = " and ".join(n for n, v in (("cloudkvm", cloudkvm_seconds), ("qemu", qemu_seconds)) if v is None)
        return f"# cloud_image_ssh_ready: ssh never answered under {missing}"
    return (f"BENCH cloud_image_ssh_ready cloudkvm={cloudkvm_seconds:.1f}s qemu={qemu_seconds:.1f}s "
            f"speedup={qemu_seconds / cloudkvm_seconds:.2f}")


def qemu_reference(qcow2: Path, kernel: Path, initrd: Path, cmdline: str, work: Path, out: Path,
                   timeout: float) -> dict:
    """The whole QEMU side: stage the image in `work` (a tmpfs), make key, seed and overlay, boot to ssh, and
    report (SshReady's fields, the check read, the base image's SHA-256 before and after); the guest's console
    and QEMU's own output go to `out` as console.log and qemu.log."""
    ensure_loopback()
    start = time.monotonic()
    qcow2, kernel, initrd = stage([qcow2, kernel, initrd], work)
    staged = time.monotonic() - start
    guest = prepare_guest(qcow2, work / "guest")
    before = sha256_of(qcow2)
    port = free_port()
    console = work / "console.log"
    cmd = qemu_command(kernel, initrd, cmdline, guest, port, console)
    ready = boot_to_ssh(cmd, guest.key, port, timeout, log=out / "qemu.log")
    if console.is_file():
        shutil.copyfile(console, out / "console.log")
    return {**asdict(ready), "stage_seconds": round(staged, 1), "command": cmd,
            "base_sha256_before": before, "base_sha256_after": sha256_of(qcow2),
            "check": asdict(read_check(ready.check_output)) if ready.check_output else None}


def main() -> int:
    """Inside the test host: qemu_reference, its report written to --out as result.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qcow2", type=Path, required=True)
    parser.add_argument("--kernel", type=Path, required=True)
    parser.add_argument("--initrd", type=Path, required=True)
    parser.add_argument("--cmdline", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stage", type=Path, default=Path("/tmp/cloudimage"))
    parser.add_argument("--timeout", type=float, default=420)
    args = parser.parse_args()
    report = qemu_reference(args.qcow2, args.kernel, args.initrd, args.cmdline, args.stage, args.out, args.timeout)
    (args.out / "result.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0 if report["finished_seconds"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
