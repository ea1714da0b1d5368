"""Issue 11's findings about instance folders, files and error paths, driven through the CLI as a user would:
private files whatever the umask, console logs that cannot be redirected, a refused start that leaves nothing,
`up --wait 0`, exposure warnings, a state folder that cannot be written, `rm` through a symlink, an overlay on
another base, and error paths that used to end in tracebacks."""
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cloudkvm.guests.build import build_flat
from cloudkvm.instances import Instance
from cloudkvm.kvm.system import kvm_available
from waits import wait_for

GUESTS = Path(__file__).parent / "guests"
needs_kvm = pytest.mark.skipif(not kvm_available()[0], reason=f"/dev/kvm unavailable: {kvm_available()[1]}")


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "CLOUDKVM_STATE_DIR": str(tmp_path / "state")}


def cli(env, *args, umask=None):
    return subprocess.run([sys.executable, "-m", "cloudkvm", *args], env=env, capture_output=True, text=True,
                          timeout=180, preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def flat_profile(tmp_path, name="vm", extra=""):
    guest = build_flat(GUESTS / "power_button.c")
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nmemory: 64M\nboot:\n  kernel: {guest}\n  format: flat\n{extra}")
    return path



@needs_kvm
def test_instance_files_are_private_whatever_the_umask(env, tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(1 << 20))
    profile = flat_profile(tmp_path, extra=f"disks:\n  - file: {base}\n    overlay: true\n")
    assert cli(env, "up", str(profile), umask=0).returncode == 0
    instance = Instance("vm", tmp_path / "state" / "vm")
    try:
        assert cli(env, "down", "vm", "--force").returncode == 0
        assert wait_for(lambda: instance.state() == "stopped", 60)
        folders = [tmp_path / "state", instance.dir, tmp_path / "state" / ".locks"]
        for folder in folders:
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
        files = [p for folder in folders for p in folder.iterdir() if not p.is_dir()]
        assert {p.name for p in files} >= {"console.log", "vmm.log", "vmm.pid", "instance.json", "result.json",
                                             "disk0.overlay.qcow2", "vm.lock"}
        for path in files:
            assert stat.S_IMODE(path.lstat().st_mode) == 0o600, path
    finally:
        cli(env, "rm", "vm", "--force")


@needs_kvm
def test_a_console_log_that_is_a_symlink_is_refused_and_nothing_is_left(env, tmp_path):
    target = tmp_path / "elsewhere"
    (tmp_path / "console.log").symlink_to(target)
    profile = flat_profile(tmp_path, extra=f"console:\n  log: {tmp_path / 'console.log'}\n")
    one_line_error(cli(env, "up", str(profile)), "symlink")
    assert not target.exists()
    assert not (tmp_path / "state" / "vm").exists()


@needs_kvm
def test_up_refused_by_a_disk_leaves_no_instance_folder(env, tmp_path):
    (tmp_path / "d").mkdir()
    top = tmp_path / "d" / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/etc/hostname", "-F", "raw", str(top),
                    "1M"], check=True)
    one_line_error(cli(env, "up", str(flat_profile(tmp_path, extra=f"disks:\n  - file: {top}\n"))), "absolute path")
    assert not (tmp_path / "state" / "vm").exists()


@needs_kvm
def test_up_wait_0_does_not_say_a_running_vm_did_not_start(env, tmp_path):
    proc = cli(env, "up", str(flat_profile(tmp_path)), "--wait", "0")
    try:
        assert proc.returncode == 0, proc.stderr
        assert "still starting" in proc.stdout or "running" in proc.stdout
        assert "did not start" not in proc.stdout + proc.stderr
        assert wait_for(lambda: Instance("vm", tmp_path / "state" / "vm").state() == "running", 60)
    finally:
        cli(env, "rm", "vm", "--force")


def test_forwards_on_every_address_and_far_away_console_logs_are_warned_about(env, tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("name: p\nboot:\n  kernel: /bin/true\nnetwork:\n  mode: user\n  forwards:\n"
                       "    - tcp:0.0.0.0:2222-:22\n    - tcp:127.0.0.1:2223-:22\nconsole:\n  log: /var/tmp/p.log\n")
    proc = cli(env, "validate", str(profile))
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 2, proc.stderr
    assert f"{profile}:7:" in warnings[0] and "0.0.0.0" in warnings[0] and "other hosts" in warnings[0]
    assert f"{profile}:10:" in warnings[1] and "/var/tmp/p.log" in warnings[1]
    proc = cli(env, "import-qemu", "--", "qemu-system-x86_64", "-kernel", "/bin/true", "-netdev",
               "user,id=n,hostfwd=tcp::2222-:22", "-device", "virtio-net-pci,netdev=n")
    assert proc.returncode == 0 and "warning: forward tcp:0.0.0.0:2222-:22" in proc.stderr


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


@needs_kvm
def test_a_read_only_state_folder_is_a_one_line_error(tmp_path, small_tmpfs):
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    env = {**os.environ, "CLOUDKVM_STATE_DIR": str(small_tmpfs / "state")}
    one_line_error(cli(env, "up", str(flat_profile(tmp_path))), "cannot write the instance folder")


@needs_kvm
def test_a_full_state_folder_is_a_one_line_error_and_leaves_nothing(tmp_path, small_tmpfs):
    (small_tmpfs / "state").mkdir()
    try:
        with open(small_tmpfs / "state" / "filler", "wb") as f:
            while True:
                f.write(bytes(4096))
                f.flush()
    except OSError as err:
        assert err.errno == 28  # ENOSPC: the folder is full
    env = {**os.environ, "CLOUDKVM_STATE_DIR": str(small_tmpfs / "state")}
    one_line_error(cli(env, "up", str(flat_profile(tmp_path))), "cannot write the instance folder")
    assert not (small_tmpfs / "state" / "vm").exists()


def test_rm_never_follows_an_instance_folder_that_is_a_symlink(env, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "instance.json").write_text("{}")
    (victim / "precious").write_text("keep me")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "evil").symlink_to(victim)
    one_line_error(cli(env, "rm", "evil"), "symlink")
    assert (victim / "precious").read_text() == "keep me"


@needs_kvm
def test_an_instance_name_reused_with_another_base_is_refused_not_silently_reused(env, tmp_path):
    for name in ("a.raw", "b.raw"):
        (tmp_path / name).write_bytes(bytes(1 << 20))
    profile = flat_profile(tmp_path, extra=f"disks:\n  - file: {tmp_path / 'a.raw'}\n    overlay: true\n")
    assert cli(env, "up", str(profile)).returncode == 0
    try:
        assert cli(env, "down", "vm", "--force").returncode == 0
        assert wait_for(lambda: Instance("vm", tmp_path / "state" / "vm").state() == "stopped", 60)
        profile.write_text(profile.read_text().replace("a.raw", "b.raw"))
        one_line_error(cli(env, "up", str(profile)), "already has an overlay on", str(tmp_path / "a.raw"), "rm vm")
        profile.write_text(profile.read_text().replace("b.raw", "a.raw"))
        assert cli(env, "up", str(profile)).returncode == 0  # the same base still runs on its overlay
    finally:
        cli(env, "rm", "vm", "--force")


def test_boot_with_a_folder_as_kernel_is_a_one_line_error(env, tmp_path):
    one_line_error(cli(env, "boot", "--kernel", str(tmp_path)), "not a regular file")


def test_import_qemu_with_an_unclosed_quote_is_a_one_line_error(env):
    one_line_error(cli(env, "import-qemu", "--", "qemu-system-x86_64 -append 'console=ttyS0"), "No closing quotation")


def test_terminal_escape_sequences_from_a_profile_are_not_echoed_raw(env, tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text('name: "\\e]0;owned\\a\\e[2J"\nboot:\n  kernel: /bin/true\n')
    proc = cli(env, "validate", str(profile))
    assert proc.returncode == 2
    assert "\x1b" not in proc.stderr and "\x07" not in proc.stderr
    assert "\\x1b" in proc.stderr


def test_kvm_available_answers_for_a_folder_and_a_node_without_a_driver(tmp_path):
    ok, why = kvm_available(str(tmp_path))
    assert ok is False and "Is a directory" in why
    node = tmp_path / "kvm"
    try:
        os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(240, 0))  # a local/experimental major: no driver
    except OSError as err:
        pytest.skip(f"cannot make a device node here: {err}")
    ok, why = kvm_available(str(node))
    assert ok is False and ("No such device" in why or "No such device or address" in why), why


def test_a_backing_file_name_from_an_image_is_not_echoed_raw(env, tmp_path):
    """Backing names come from image headers, so `validate` and `show` print them escaped."""
    name = "b\x1b]0;owned\x07.raw"
    (tmp_path / name).write_bytes(bytes(1 << 20))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", name, "-F", "raw", str(tmp_path / "top.qcow2")],
                   check=True)
    profile = tmp_path / "p.yaml"
    profile.write_text("name: p\nboot:\n  kernel: /bin/true\ndisks:\n  - file: top.qcow2\n")
    for command in ("validate", "show"):
        proc = cli(env, command, str(profile))
        assert proc.returncode == 0, proc.stderr
        assert "b\\x1b]0;owned\\x07.raw" in proc.stdout and "\x1b" not in proc.stdout and "\x07" not in proc.stdout


def test_logs_never_blocks_on_a_fifo_or_follows_a_symlink_planted_as_the_console_log(env, tmp_path):
    folder = tmp_path / "state" / "planted"
    folder.mkdir(parents=True)
    (folder / "instance.json").write_text("{}")
    os.mkfifo(folder / "console.log")
    one_line_error(cli(env, "logs", "planted"), "no console log")  # before: blocked on the FIFO for good
    (folder / "console.log").unlink()
    (tmp_path / "secret").write_text("not the guest's console\n")
    (folder / "console.log").symlink_to(tmp_path / "secret")
    proc = cli(env, "logs", "planted")
    assert proc.returncode == 2 and "not the guest's console" not in proc.stdout
