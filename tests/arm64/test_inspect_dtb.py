"""`cloudkvm inspect dtb PROFILE -o FILE`: the device tree an aarch64 profile's VM gets, checked with dtc/fdtget;
placeholders (said on stderr) where the profile's kernel or initrd is absent; one-line refusal for x86."""
import subprocess
import sys
from pathlib import Path

from dtc_oracle import decompile, fdtget, need_dtc

PROFILES = Path(__file__).resolve().parents[2] / "profiles"


def inspect(profile, out) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cloudkvm", "inspect", "dtb", str(profile), "-o", str(out)],
                          capture_output=True, text=True, timeout=120)


def test_the_seed_profile_gets_a_virt_tree_with_its_command_line_and_devices(tmp_path):
    need_dtc()
    out = tmp_path / "vm2.dtb"
    result = inspect(PROFILES / "vm2.yaml", out)
    assert result.returncode == 0, result.stderr
    assert "the kernel" in result.stderr and "placeholder" in result.stderr  # vm2's files are not in the repo
    dts = decompile(out)
    assert fdtget(out, "/chosen", "bootargs", "s") == "console=ttyAMA0 root=UUID=6a09973e-e8fd-4a6d-a8c0-1deb9556f477"
    assert fdtget(out, "/memory@40000000", "reg", "x").split() == ["0", "40000000", "1", "0"]  # 4 GiB
    assert fdtget(out, "/cpus", None) is not None and dts.count("enable-method = \"psci\"") == 2
    assert dts.count("virtio,mmio") == 3  # its disk, its NIC, the entropy source
    assert fdtget(out, "/chosen", "linux,initrd-start") is not None


def test_an_x86_profile_has_no_device_tree(tmp_path):
    profile = tmp_path / "x.yaml"
    profile.write_text("name: x\narch: x86_64\nboot:\n  kernel: k\n")
    result = inspect(profile, tmp_path / "x.dtb")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "no device tree" in result.stderr and not (tmp_path / "x.dtb").exists()


def test_the_aarch64_demo_profile_gets_the_arm64_demo_guest(tmp_path):
    need_dtc()
    out = tmp_path / "demo.dtb"
    result = inspect(PROFILES / "demo-aarch64.yaml", out)  # fetches Debian's arm64 guest on first use
    assert result.returncode == 0 and "placeholder" not in result.stderr, result.stderr
    assert fdtget(out, "/chosen", "bootargs", "s") == "console=ttyAMA0"
    assert fdtget(out, "/chosen", "linux,initrd-start") is not None  # the arm64 initramfs's real size placed
