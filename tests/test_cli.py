"""The command line as a user meets it: exit codes, one-line errors, the files it writes."""
import os
import shutil
import subprocess
import sys

import pytest

from cloudkvm.kvm.system import kvm_available


def cloudkvm(*args, **kw):
    return subprocess.run([sys.executable, "-m", "cloudkvm", *args], capture_output=True, text=True, timeout=300,
                          **kw)


def one_line_error(proc):
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc
    assert len(lines) == 1 and lines[0].startswith("cloudkvm: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize("content,expect", [
    (b"", "is empty"),
    (b"\x7fELF\x02\x01\x01" + bytes(9) + b"\x02\x00\xb7\x00" + bytes(44), "aarch64"),
    (bytes(0x1F0), "truncated"),
    (bytes(0x1FE) + b"\x55\xaa" + b"\xeb\x66" + b"HdrS" + b"\x00\x02" + bytes(0x300), "protocol"),
], ids=["empty", "arm64-elf", "truncated", "old-protocol"])
def test_boot_refuses_a_malformed_kernel_with_one_line_and_exit_2(tmp_path, content, expect):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(content)
    line = one_line_error(cloudkvm("boot", "--kernel", str(kernel)))
    assert str(kernel) in line and expect in line


def test_boot_refuses_a_missing_kernel_and_initrd(tmp_path):
    assert "No such file" in one_line_error(cloudkvm("boot", "--kernel", str(tmp_path / "nope")))
    kernel = tmp_path / "k"
    kernel.write_bytes(b"x")
    line = one_line_error(cloudkvm("boot", "--kernel", str(kernel), "--initrd", str(tmp_path / "nope")))
    assert "initrd" in line


def test_bad_memory_size_is_a_one_line_error(tmp_path):
    assert "--memory" in one_line_error(cloudkvm("boot", "--kernel", "/dev/null", "--memory", "lots"))


def test_unknown_command_exits_2():
    assert cloudkvm("frobnicate").returncode == 2


def test_inspect_acpi_writes_tables_that_iasl_disassembles(tmp_path):
    proc = cloudkvm("inspect", "acpi", "--cpus", "4", "-o", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["apic.dat", "dsdt.dat", "facp.dat", "rsdp.dat", "xsdt.dat"]
    if shutil.which("iasl") is None:
        pytest.skip("iasl is not installed (apt-get install acpica-tools)")
    for table in ("apic", "dsdt", "facp", "xsdt"):
        out = subprocess.run(["iasl", "-d", f"{table}.dat"], cwd=tmp_path, capture_output=True, text=True)
        assert out.returncode == 0 and "Error" not in out.stdout + out.stderr, out
    assert (tmp_path / "apic.dsl").read_text().count("Processor Local APIC") == 4


@pytest.mark.skipif(not kvm_available()[0], reason=f"/dev/kvm unavailable: {kvm_available()[1]}")
def test_demo_runs_the_built_in_guest_and_exits_0():
    proc = cloudkvm("demo", "--cpus", "2")
    assert proc.returncode == 0, proc.stderr
    assert "hello from vCPU 0 of 2" in proc.stdout and "hello from vCPU 1 of 2" in proc.stdout
    assert "VM ended: poweroff" in proc.stderr


SEED = ("qemu-system-aarch64 -name vm2 -daemonize -enable-kvm -M virt -cpu host -smp 2 -m 4096 "
        "-global virtio-blk-device.scsi=off -device virtio-scsi-device,id=scsi -kernel vmlinuz-4.18 "
        "--append console=ttyAMA0 root=UUID=6a09973e-e8fd-4a6d-a8c0-1deb9556f477 -initrd initramfs-4.18 "
        "-drive file=vhuser-test1.qcow2 -netdev user,id=unet,hostfwd=tcp:127.0.0.1:1122-:22 "
        "-device virtio-net-device,netdev=unet -vnc :10")
PROFILES = __import__("pathlib").Path(__file__).resolve().parent.parent / "profiles"


def test_import_qemu_of_the_seed_means_profiles_vm2(tmp_path):
    from cloudkvm.profile import load_profile

    out = tmp_path / "vm2.yaml"
    proc = subprocess.run([sys.executable, "-m", "cloudkvm", "import-qemu", "-o", str(out), "--", SEED],
                          capture_output=True, text=True, cwd=PROFILES, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "not mapped: -vnc :10" in proc.stderr and "virtio-scsi-device" in proc.stderr
    assert load_profile(out, check_files=False) == load_profile(PROFILES / "vm2.yaml", check_files=False)


def test_schema_command_prints_the_committed_schema():
    proc = cloudkvm("schema")
    assert proc.returncode == 0 and proc.stdout == (PROFILES / "schema.json").read_text()


def test_show_qemu_prints_an_equivalent_command_line():
    proc = cloudkvm("show", str(PROFILES / "vm2.yaml"), "--qemu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("qemu-system-aarch64 ") and "hostfwd=tcp:127.0.0.1:1122-:22" in proc.stdout


@pytest.mark.skipif(__import__("platform").machine() not in ("x86_64", "amd64"), reason="needs an x86_64 host")
def test_up_of_profiles_vm2_on_an_x86_64_host_says_aarch64_needs_an_arm64_host(tmp_path):
    """Said before anything about the profile's files (vm2's are not in the repository) and before any instance
    folder exists."""
    import os

    state = tmp_path / "state"
    proc = cloudkvm("up", str(PROFILES / "vm2.yaml"), env={**os.environ, "CLOUDKVM_STATE_DIR": str(state)})
    line = one_line_error(proc)
    assert "vm2: aarch64 guests need an arm64 host with KVM" in line and "this host is x86_64" in line
    assert not state.exists() or not any(state.iterdir())


def test_validate_names_file_and_line_of_a_bad_profile(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmemroy: 4G\nboot:\n  kernel: /dev/null\n")
    line = one_line_error(cloudkvm("validate", str(bad)))
    assert f"{bad}:2:" in line and "memory" in line


@pytest.mark.skipif(not kvm_available()[0], reason=f"/dev/kvm unavailable: {kvm_available()[1]}")
@pytest.mark.parametrize("memory,expect", [("1.5K", "whole number of MiB"), ("8M", "at least 16 MiB"),
                                           ("64G", "cannot reserve")])
def test_impossible_memory_sizes_are_one_line_errors(memory, expect):
    from cloudkvm.guests.debian import fetch_debian_kernel

    line = one_line_error(cloudkvm("boot", "--kernel", str(fetch_debian_kernel()), "--memory", memory))
    assert line.startswith("cloudkvm: error: memory:") and expect in line


@pytest.mark.skipif(not kvm_available()[0], reason=f"/dev/kvm unavailable: {kvm_available()[1]}")
def test_more_vcpus_than_the_board_describes_is_a_one_line_error():
    from cloudkvm.guests.debian import fetch_debian_kernel

    line = one_line_error(cloudkvm("boot", "--kernel", str(fetch_debian_kernel()), "--cpus", "300"))
    assert "at most 255 vCPUs" in line


def test_up_wait_ssh_without_a_seed_or_forward_is_refused_before_anything_starts(tmp_path):
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "p.yaml").write_text("name: nossh\nboot: {kernel: vmlinuz}\n")
    env = {**os.environ, "CLOUDKVM_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.run([sys.executable, "-m", "cloudkvm", "up", "--wait", "ssh", str(tmp_path / "p.yaml")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "--wait ssh needs a cloud-init user and a forward to the guest's port 22" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "state").exists()
