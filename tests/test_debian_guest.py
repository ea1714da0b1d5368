"""The default Debian guest: cloud kernel + busybox initramfs fetched with apt (needs apt and deb.debian.org).

Uses the real cache ($CLOUDKVM_CACHE or ~/.cache/cloudkvm) so repeated runs do not download again.
"""

import gzip
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from cloudkvm.boot.cpio import read_newc
from cloudkvm.errors import CloudkvmError
from cloudkvm.guests import debian


def _need_apt() -> None:
    missing = [tool for tool in ("apt-get", "apt-cache", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        print(f"not a Debian host ({', '.join(missing)} missing): Debian guest tests skipped")
        pytest.skip(f"{', '.join(missing)} not installed: the default guest is built from Debian packages")


@pytest.fixture(scope="session")
def cache() -> Path:
    return debian.cache_dir()


@pytest.fixture(scope="session")
def kernel(cache) -> Path:
    _need_apt()
    return debian.fetch_debian_kernel(cache)


@pytest.fixture(scope="session")
def initramfs(cache) -> Path:
    _need_apt()
    return debian.build_busybox_initramfs(cache)


@pytest.fixture
def no_apt(monkeypatch):
    """Fail the test if anything runs apt/dpkg; other commands (busybox --list) still run."""
    real_run = subprocess.run
    calls: list[list[str]] = []

    def guarded(cmd, *args, **kwargs):
        calls.append(list(cmd))
        if Path(cmd[0]).name in ("apt-get", "apt-cache", "dpkg", "dpkg-deb"):
            raise AssertionError(f"unexpected apt call: {cmd}")
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(debian.subprocess, "run", guarded)
    return calls


def test_kernel_is_a_bzimage(kernel, cache):
    assert kernel.name == "vmlinuz" and kernel.parent.parent == cache / "debian"
    head = kernel.read_bytes()[:0x400]
    assert head[0x1FE:0x200] == b"\x55\xaa"
    assert head[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<H", head, 0x206)[0] >= 0x20C
    assert (kernel.parent / "config").is_file()


def test_kernel_config_is_readable(kernel):
    config = debian.read_kernel_config(kernel)
    assert config["CONFIG_X86_64"] == "y"
    assert config["CONFIG_LOCALVERSION_AUTO"] in ("y", "n")
    assert config["CONFIG_BLK_DEV_INITRD"] == "y"


def test_initramfs_contents(initramfs, cache):
    assert initramfs.parent == cache / "debian" and initramfs.name.endswith(".cpio.gz")
    raw = initramfs.read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\0\0\0\0"  # gzip, mtime 0
    entries = {e.name: e for e in read_newc(gzip.decompress(raw))}
    init = entries["init"]
    assert init.is_file and init.mode & 0o111 == 0o111
    assert init.data.startswith(b"#!/bin/sh\n") and debian.INIT_MARKER.encode() in init.data
    assert b"poweroff -f" in init.data
    assert entries["bin/busybox"].is_file and entries["bin/busybox"].data[:4] == b"\x7fELF"
    console = entries["dev/console"]
    assert console.is_chardev and (console.rdevmajor, console.rdevminor) == (5, 1)
    null = entries["dev/null"]
    assert null.is_chardev and (null.rdevmajor, null.rdevminor) == (1, 3)
    for d in ("proc", "sys", "dev", "tmp", "etc", "bin"):
        assert entries[d].is_dir, d
    for applet in debian.REQUIRED_APPLETS:
        assert entries[f"bin/{applet}"].is_symlink and entries[f"bin/{applet}"].data == b"busybox", applet
    assert len([e for e in entries.values() if e.is_symlink]) > 100  # `busybox --list` ran
    # every parent directory precedes its children (the kernel's unpacker needs that)
    seen: set[str] = set()
    for name in entries:
        parent = name.rpartition("/")[0]
        assert not parent or parent in seen, name
        seen.add(name)


def test_second_call_uses_cache(kernel, initramfs, cache, no_apt):
    assert debian.fetch_debian_kernel(cache) == kernel
    assert debian.build_busybox_initramfs(cache) == initramfs
    assert debian.default_guest(cache) == (kernel, initramfs)
    assert no_apt == []


def test_custom_init_script_gets_its_own_image(initramfs, cache, no_apt):
    script = "#!/bin/sh\necho custom-init-for-test\npoweroff -f\n"
    custom = debian.build_busybox_initramfs(cache, init_script=script)
    assert custom != initramfs and custom.is_file()
    entries = {e.name: e for e in read_newc(gzip.decompress(custom.read_bytes()))}
    assert entries["init"].data == script.encode()
    assert debian.build_busybox_initramfs(cache, init_script=script) == custom
    assert not [p for p in custom.parent.iterdir() if p.name.startswith(".")]  # no half-written leftovers
    custom.unlink()
    with pytest.raises(CloudkvmError, match="#!"):
        debian.build_busybox_initramfs(cache, init_script="echo no shebang\n")


def test_programs_go_into_bin_and_into_the_cache_key(initramfs, cache, no_apt):
    one = debian.build_busybox_initramfs(cache, programs={"gio": b"\x7fELF one"})
    two = debian.build_busybox_initramfs(cache, programs={"gio": b"\x7fELF two"})
    assert len({one, two, initramfs}) == 3
    entries = {e.name: e for e in read_newc(gzip.decompress(two.read_bytes()))}
    assert entries["bin/gio"].data == b"\x7fELF two" and entries["bin/gio"].mode & 0o777 == 0o755
    for path in (one, two):
        path.unlink()
    with pytest.raises(CloudkvmError, match="plain file name"):
        debian.build_busybox_initramfs(cache, programs={"../init": b"x"})


# --- apt failure handling, with subprocess faked (no network) -------------------------------------------------


def _fake_apt(monkeypatch, responses):
    """responses: list of (predicate on cmd, returncode, stdout, stderr); records the commands run."""
    calls: list[list[str]] = []

    def fake_run(cmd, *args, **kwargs):
        calls.append(list(cmd))
        for match, rc, out, err in responses:
            if match(cmd):
                return subprocess.CompletedProcess(cmd, rc, out, err)
        raise AssertionError(f"unexpected command {cmd}")

    monkeypatch.setattr(debian.subprocess, "run", fake_run)
    return calls


def test_apt_failure_is_a_user_error(monkeypatch, tmp_path):
    _fake_apt(monkeypatch, [(lambda c: c[0] == "apt-cache", 100, "", "E: Could not open lock file\n")])
    with pytest.raises(CloudkvmError) as info:
        debian.fetch_debian_kernel(tmp_path)
    assert "apt-cache depends linux-image-cloud-amd64" in info.value.message and "lock" in info.value.message
    assert "\n" not in info.value.message and "apt-get update" in info.value.hint
    assert not list((tmp_path / "debian").iterdir())


def test_unknown_package_runs_apt_update_once(monkeypatch, tmp_path):
    calls = _fake_apt(monkeypatch, [
        (lambda c: c[0] == "apt-cache", 0, "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-99-cloud-amd64\n", ""),
        (lambda c: c[:2] == ["apt-get", "update"], 0, "", ""),
        (lambda c: c[:2] == ["apt-get", "download"], 100, "", "E: Unable to locate package linux-image-6.1.0-99\n"),
    ])
    with pytest.raises(CloudkvmError, match="Unable to locate package") as info:
        debian.fetch_debian_kernel(tmp_path)
    assert calls == [
        ["apt-cache", "depends", "linux-image-cloud-amd64"],
        ["apt-get", "download", "linux-image-6.1.0-99-cloud-amd64"],
        ["apt-get", "update"],
        ["apt-get", "download", "linux-image-6.1.0-99-cloud-amd64"],
    ]
    assert "apt-get update" in info.value.hint


def test_other_download_failures_do_not_update(monkeypatch, tmp_path):
    calls = _fake_apt(monkeypatch, [
        (lambda c: c[:2] == ["apt-get", "download"], 100, "", "E: Failed to fetch http://deb.debian.org/x 404\n"),
    ])
    with pytest.raises(CloudkvmError, match="Failed to fetch"):
        debian.fetch_busybox(tmp_path)
    assert calls == [["apt-get", "download", "busybox-static"]]


def test_cache_dir_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("CLOUDKVM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert debian.cache_dir() == tmp_path / "xdg" / "cloudkvm"
    monkeypatch.setenv("CLOUDKVM_CACHE", str(tmp_path / "ck"))
    assert debian.cache_dir() == tmp_path / "ck"
    monkeypatch.delenv("CLOUDKVM_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert debian.cache_dir() == tmp_path / "home" / ".cache" / "cloudkvm"


def test_busybox_is_static_x86_64(initramfs, cache):
    busybox = debian.fetch_busybox(cache)
    elf = busybox.read_bytes()[:64]
    assert elf[:4] == b"\x7fELF" and elf[4] == 2 and struct.unpack_from("<H", elf, 18)[0] == 0x3E  # ELF64 x86-64
    assert stat.S_IMODE(busybox.stat().st_mode) == 0o755


def test_the_busybox_initramfs_expands_host_side_to_a_cpio_with_init(tmp_path, monkeypatch):
    from cloudkvm.boot.cpio import read_newc
    from cloudkvm.boot.initrd import expanded_initrd

    _, initramfs = debian.default_guest()
    monkeypatch.setenv("CLOUDKVM_CACHE", str(tmp_path))
    packed = initramfs.read_bytes()
    expanded = expanded_initrd(packed, str(initramfs))
    assert expanded != packed
    names = {e.name for e in read_newc(expanded)}
    assert "init" in names and "bin/busybox" in names


def test_the_kernels_bss_clears_are_found_for_the_boot_assist(kernel):
    """Debian's kernel clears .bss and .brk with inlined `rep stos` (head64.c clear_bss); both are found, each
    right after the region's start address is loaded."""
    from elftools.elf.elffile import ELFFile

    from cloudkvm.boot.linux_bss import REP_STOS, bss_clear_sites
    from cloudkvm.boot.linux_x86 import vmlinux_cache

    vmlinux = vmlinux_cache(kernel).read_bytes()
    sites = bss_clear_sites(vmlinux)
    assert len(sites) == 2
    with open(vmlinux_cache(kernel), "rb") as f:
        text = ELFFile(f).get_section_by_name(".init.text")
        code, base = text.data(), text["sh_addr"]
    for site in sites:
        assert any(code[site - base:].startswith(op) for op in REP_STOS)
