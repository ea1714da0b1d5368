"""guests/debian.py for arm64: Debian's arm64 cloud kernel with its modules and an arm64 busybox initramfs, cached
apart from the amd64 guest, which stays as it was."""
from __future__ import annotations

import gzip
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from cloudkvm.boot.cpio import read_newc
from cloudkvm.errors import CloudkvmError
from cloudkvm.guests import debian

EM_AARCH64 = 183
WANTED = ("virtio_mmio", "virtio_blk")


def _need_apt() -> None:
    missing = [t for t in ("apt-get", "apt-cache", "dpkg-deb", "dpkg") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} missing: the arm64 guest is built from Debian packages")


@pytest.fixture(scope="session")
def kernel() -> Path:
    _need_apt()
    return debian.fetch_debian_kernel(arch="arm64")


@pytest.fixture(scope="session")
def initramfs(kernel) -> Path:
    return debian.build_busybox_initramfs(arch="aarch64", modules=WANTED)


@pytest.fixture
def no_apt(monkeypatch):
    real_run = subprocess.run

    def guarded(cmd, *args, **kwargs):
        if Path(cmd[0]).name in ("apt-get", "apt-cache", "dpkg", "dpkg-deb"):
            raise AssertionError(f"unexpected apt call: {cmd}")
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(debian.subprocess, "run", guarded)


def _readelf_depends(ko: Path) -> list[str]:
    """binutils' view of a module's .modinfo `depends=` (independent of the pyelftools reader under test)."""
    out = subprocess.run(["readelf", "-p", ".modinfo", str(ko)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if "depends=" in line:
            return [d for d in line.split("depends=", 1)[1].strip().split(",") if d]
    return []


def test_the_arm64_kernel_is_cached_apart_with_its_modules(kernel):
    cache = debian.cache_dir()
    assert kernel.parent.parent == cache / "debian" / "arm64" and kernel.name == "vmlinuz"
    assert kernel.read_bytes()[0x38:0x3C] == b"ARM\x64"
    assert kernel.parent.name.endswith("-cloud-arm64")
    assert (kernel.parent / "package").read_text().startswith("linux-image-")
    assert (kernel.parent / "modules").is_dir() and (kernel.parent / "config").is_file()
    assert debian.read_kernel_config(kernel)["CONFIG_VIRTIO_MMIO"] == "m"


def test_modules_come_after_their_dependencies(kernel):
    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) is not installed")
    order = debian.kernel_modules(kernel, list(WANTED))
    names = [p.name.removesuffix(".ko").replace("-", "_") for p in order]
    assert set(WANTED) <= set(names)
    for i, ko in enumerate(order):
        for dep in _readelf_depends(ko):
            assert dep in names[:i], f"{ko.name} needs {dep} first: {names}"
    assert {"virtio", "virtio_ring"} <= set(names)
    assert len(names) == len(set(names))


def test_unknown_module_is_a_user_error(kernel):
    with pytest.raises(CloudkvmError, match="no_such_module"):
        debian.kernel_modules(kernel, ["no_such_module"])


def test_the_initramfs_holds_arm64_busybox_modules_and_init(initramfs, kernel):
    assert initramfs.parent == debian.cache_dir() / "debian" / "arm64"
    entries = {e.name: e for e in read_newc(gzip.decompress(initramfs.read_bytes()))}
    busybox = entries["bin/busybox"].data
    assert busybox[:4] == b"\x7fELF" and struct.unpack_from("<H", busybox, 18)[0] == EM_AARCH64
    for applet in (*debian.REQUIRED_APPLETS, "insmod", "head"):
        assert entries[f"bin/{applet}"].is_symlink and entries[f"bin/{applet}"].data == b"busybox"
    modules = sorted(n for n in entries if n.startswith("modules/"))
    expected = [p.name for p in debian.kernel_modules(kernel, list(WANTED))]
    assert [m.split("-", 1)[1] for m in modules] == expected
    assert all(entries[m].data[:4] == b"\x7fELF" for m in modules)
    assert entries["init"].data == debian.DEFAULT_INIT_SCRIPT.encode()


def test_second_calls_use_the_cache(kernel, initramfs, no_apt):
    assert debian.fetch_debian_kernel(arch="arm64") == kernel
    assert debian.build_busybox_initramfs(arch="arm64", modules=WANTED) == initramfs


def test_amd64_and_arm64_caches_do_not_mix(tmp_path, no_apt):
    """A cached arm64 kernel with a 'newer' release name is never the amd64 guest's kernel, and vice versa."""
    amd = tmp_path / "debian" / "6.1.0-1-cloud-amd64" / "vmlinuz"
    arm = tmp_path / "debian" / "arm64" / "6.1.0-9-cloud-arm64" / "vmlinuz"
    for p in (amd, arm):
        p.parent.mkdir(parents=True)
        p.write_bytes(b"k")
    assert debian.fetch_debian_kernel(tmp_path) == amd
    assert debian.fetch_debian_kernel(tmp_path, arch="arm64") == arm
    assert debian.fetch_debian_kernel(tmp_path, arch="aarch64") == arm


def _fake_run(monkeypatch, answers):
    calls = []

    def run(cmd, *args, **kwargs):
        calls.append(list(cmd))
        for match, rc, out in answers:
            if match(cmd):
                return subprocess.CompletedProcess(cmd, rc, out, "E: not root\n" if rc else "")
        raise AssertionError(f"unexpected command {cmd}")

    monkeypatch.setattr(debian.subprocess, "run", run)
    return calls


def test_ensure_architecture(monkeypatch):
    calls = _fake_run(monkeypatch, [(lambda c: c[:2] == ["dpkg", "--print-architecture"], 0, "amd64\n"),
                                    (lambda c: c[:2] == ["dpkg", "--print-foreign-architectures"], 0, "arm64\n")])
    debian.ensure_architecture("arm64")
    assert [c[1] for c in calls] == ["--print-architecture", "--print-foreign-architectures"]

    calls = _fake_run(monkeypatch, [(lambda c: c[0] == "dpkg" and c[1].startswith("--print"), 0, "amd64\n"),
                                    (lambda c: c[:2] == ["dpkg", "--add-architecture"], 0, ""),
                                    (lambda c: c[:2] == ["apt-get", "update"], 0, "")])
    debian.ensure_architecture("aarch64")
    assert calls[2:] == [["dpkg", "--add-architecture", "arm64"], ["apt-get", "update"]]

    _fake_run(monkeypatch, [(lambda c: c[0] == "dpkg" and c[1].startswith("--print"), 0, "amd64\n"),
                            (lambda c: c[:2] == ["dpkg", "--add-architecture"], 2, "")])
    with pytest.raises(CloudkvmError, match="add-architecture arm64"):
        debian.ensure_architecture("arm64")

    calls = _fake_run(monkeypatch, [])
    debian.ensure_architecture("amd64")  # the amd64 path never asks dpkg
    assert calls == []


def test_unknown_architectures_are_refused(tmp_path, no_apt):
    with pytest.raises(CloudkvmError, match="riscv64"):
        debian.fetch_debian_kernel(tmp_path, arch="riscv64")


def test_amd64_modules_come_from_the_kernels_own_package_once(tmp_path, monkeypatch):
    """Debian's amd64 cloud kernel has its virtio drivers as modules: they are extracted beside the cached kernel
    from the versioned package its folder names, on first use only."""
    kernel = tmp_path / "debian" / "6.1.0-99-cloud-amd64" / "vmlinuz"
    kernel.parent.mkdir(parents=True)
    kernel.write_bytes(b"kernel")
    asked = []

    def fake_download(package, workdir):
        asked.append(package)
        ko = workdir / "root" / "lib" / "modules" / "6.1.0-99-cloud-amd64" / "kernel" / "virtio_blk.ko"
        ko.parent.mkdir(parents=True)
        ko.write_bytes(b"\x7fELF")
        return workdir / "root", "6.1.99-1"

    monkeypatch.setattr(debian, "download_and_extract", fake_download)
    folder = debian.ensure_kernel_modules(kernel)
    assert (folder / "kernel" / "virtio_blk.ko").read_bytes() == b"\x7fELF"
    assert debian.ensure_kernel_modules(kernel) == folder and asked == ["linux-image-6.1.0-99-cloud-amd64"]
    assert sorted(p.name for p in kernel.parent.iterdir()) == ["modules", "vmlinuz"]  # no staging left behind
