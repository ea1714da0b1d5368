"""The test-host harness's own logic (tests/testhosts), without booting one."""
import os
import time
from pathlib import Path

import pytest

from cloudkvm.boot.cpio import read_newc
from testhosts import build, kmod
from testhosts.host import _stale


def test_modules_load_after_what_they_depend_on(monkeypatch):
    deps = {"9p": ["9pnet", "netfs", "fscache"], "9pnet": [], "netfs": [], "fscache": ["netfs"],
            "kvm_amd": ["kvm", "ccp"], "kvm": ["irqbypass"], "irqbypass": [], "ccp": []}
    index = {name: Path(f"/m/{name.replace('_', '-')}.ko") for name in deps}
    monkeypatch.setattr(kmod, "modinfo_depends", lambda ko: deps[kmod.module_name(ko)])
    order = [kmod.module_name(p) for p in kmod.load_order(["9p", "kvm-amd"], index)]
    assert sorted(order) == sorted(deps) and len(order) == len(set(order))
    for name, needs in deps.items():
        assert all(order.index(d) < order.index(name) for d in needs), name


def test_an_unknown_module_names_who_needed_it(monkeypatch):
    monkeypatch.setattr(kmod, "modinfo_depends", lambda ko: ["missing_one"])
    with pytest.raises(ValueError, match="missing_one not found .needed by kvm"):
        kmod.load_order(["kvm"], {"kvm": Path("/m/kvm.ko")})


def test_the_initramfs_has_the_init_the_applets_and_the_modules_numbered_in_load_order(tmp_path):
    mods = [tmp_path / "virtio.ko", tmp_path / "kvm-amd.ko"]
    for m in mods:
        m.write_bytes(b"\x7fELF" + m.name.encode())
    entries = {e.name: e for e in read_newc(build.render_initramfs(b"\x7fELFbusybox", mods))}
    assert entries["init"].data == build.INIT_SCRIPT.encode() and entries["init"].mode & 0o111
    assert entries["modules/00-virtio.ko"].data == b"\x7fELFvirtio.ko"
    assert entries["modules/01-kvm-amd.ko"].data == b"\x7fELFkvm-amd.ko"
    assert all(entries[f"bin/{a}"].data == b"busybox" for a in build.APPLETS)


def test_a_heartbeat_is_stale_only_once_it_exists_and_is_old(tmp_path):
    beat = tmp_path / "heartbeat"
    assert not _stale(beat, 90)  # still booting
    beat.touch()
    assert not _stale(beat, 90)
    old = time.time() - 120
    os.utime(beat, (old, old))
    assert _stale(beat, 90)


def test_the_foreign_root_gets_only_the_requirements_whose_markers_hold_on_its_machine():
    """pip --platform evaluates markers for this machine, not the target: an x86_64-only test tool (atheris has
    no arm64 wheel) made the arm64 root's pip install fail."""
    from testhosts.build import runtime_requirements

    arm64, x86 = runtime_requirements("aarch64"), runtime_requirements("x86_64")
    assert not any(text.startswith("atheris") for text in arm64)
    assert any(text.startswith("atheris") for text in x86)
    assert set(arm64) < set(x86) and "pytest>=8" in arm64 and "cffi>=1.16" in arm64
