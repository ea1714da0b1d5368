"""hostquirks: detecting kvm_pvm from a /sys/module directory and announcing active quirks once per process."""
import logging

import pytest

from cloudkvm import hostquirks
from cloudkvm.boards.x86.cpu import check_feature_names
from cloudkvm.hostquirks import PVM_QUIRKS, HostQuirks, announce, detect


@pytest.fixture(autouse=True)
def fresh_announcements(monkeypatch):
    monkeypatch.setattr(hostquirks, "_announced", set())


@pytest.fixture
def sys_module(tmp_path):
    d = tmp_path / "module"
    for name in ("kvm", "kvm_intel", "virtio_net"):
        (d / name).mkdir(parents=True)
    return d


def test_no_quirks_on_a_plain_kvm_host(sys_module):
    q = detect(str(sys_module))
    assert q == HostQuirks()
    assert not q.active
    assert q.cpuid_hide == () and q.linux_cmdline == () and q.notes == ()


def test_kvm_pvm_module_is_detected(sys_module):
    (sys_module / "kvm_pvm").mkdir()
    q = detect(str(sys_module))
    assert q is PVM_QUIRKS
    assert q.active
    assert q.name == "kvm_pvm"
    assert "cx16" in q.cpuid_hide            # lock cmpxchg16b stops its emulator
    assert "noxsave" in q.linux_cmdline      # so does xrstor
    assert "cryptomgr.notests" in q.linux_cmdline  # interpreted RSA self-tests outlast the kernel's 60 s wait
    assert q.boot_assists                    # guest kernel code is interpreted: clear_bss, user syscalls
    assert q.notes and "kvm_pvm" in q.notes[0]


def test_a_file_named_kvm_pvm_is_not_a_module(sys_module):
    (sys_module / "kvm_pvm").write_text("")
    assert not detect(str(sys_module)).active


def test_missing_sys_module_means_no_quirks(tmp_path):
    assert not detect(str(tmp_path / "does-not-exist")).active


def test_similar_module_names_do_not_trigger(sys_module):
    (sys_module / "kvm_pvm_helper").mkdir()
    (sys_module / "pvm").mkdir()
    assert not detect(str(sys_module)).active


def test_pvm_quirks_hide_only_known_cpu_features():
    check_feature_names(list(PVM_QUIRKS.cpuid_hide))  # a typo here would make every kvm_pvm VM fail to start
    assert len(set(PVM_QUIRKS.cpuid_hide)) == len(PVM_QUIRKS.cpuid_hide)


def test_quirks_are_immutable():
    with pytest.raises(AttributeError):
        PVM_QUIRKS.name = "other"  # type: ignore[misc]


def _records(caplog):
    return [r for r in caplog.records if r.name == "cloudkvm.hostquirks"]


def test_announce_logs_once(caplog):
    caplog.set_level(logging.DEBUG, logger="cloudkvm.hostquirks")
    announce(PVM_QUIRKS)
    announce(PVM_QUIRKS)
    announce(PVM_QUIRKS)
    recs = _records(caplog)
    assert len(recs) == 1
    assert recs[0].levelno == logging.WARNING
    msg = recs[0].getMessage()
    assert "kvm_pvm" in msg and "noxsave" in msg  # names the quirk set and what it adds to Linux command lines


def test_announce_logs_nothing_for_inactive_quirks(caplog):
    caplog.set_level(logging.DEBUG, logger="cloudkvm.hostquirks")
    announce(HostQuirks())
    announce(HostQuirks(cpuid_hide=("cx16",)))  # no name: not active, whatever else it says
    assert _records(caplog) == []


def test_each_quirk_set_is_announced_once(caplog):
    caplog.set_level(logging.DEBUG, logger="cloudkvm.hostquirks")
    other = HostQuirks(name="other")
    announce(PVM_QUIRKS)
    announce(other)
    announce(other)
    announce(PVM_QUIRKS)
    recs = _records(caplog)
    assert len(recs) == 2
    assert "kvm_pvm" in recs[0].getMessage()
    assert "other" in recs[1].getMessage() and "kvm_pvm" not in recs[1].getMessage()
