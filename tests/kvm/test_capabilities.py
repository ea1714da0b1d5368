"""`cloudkvm doctor`'s capability report, on this host's KVM (the arm64 one runs in tests/realkvm)."""
import platform

import pytest
from typer.testing import CliRunner

from cloudkvm import cli
from cloudkvm.kvm.capabilities import Capability, host_capabilities
from cloudkvm.kvm.system import Kvm


def test_every_needed_capability_of_this_architecture_is_probed_and_present():
    kvm = Kvm()
    try:
        caps = {c.name: c for c in host_capabilities(kvm)}
    finally:
        kvm.close()
    assert {"irqfd", "ioeventfd", "immediate-exit", "memory-slots"} <= set(caps)
    if platform.machine() == "x86_64":
        assert caps["in-kernel-irqchip"].value == 1
    assert caps["memory-slots"].value > 1  # a count, not a yes
    assert [c.name for c in caps.values() if c.needed and not c.value] == []


def test_describe_says_yes_no_or_the_number():
    assert Capability("psci-0.2", 1, True).describe() == "psci-0.2: yes"
    assert Capability("vgic-v3", 0, True).describe() == "vgic-v3: no  (NEEDED)"
    assert Capability("pmu-v3", 0, False).describe() == "pmu-v3: no"
    assert Capability("ipa-size-bits", 40, False).describe() == "ipa-size-bits: 40"


def test_doctor_lists_the_capabilities():
    result = CliRunner().invoke(cli.app, ["doctor"])
    assert result.exit_code == 0, result.output
    assert f"KVM capabilities for {platform.machine()} boards:" in result.output
    assert "  irqfd: yes" in result.output


def test_doctor_fails_in_one_line_naming_what_is_missing(monkeypatch, capsys):
    monkeypatch.setattr("cloudkvm.kvm.capabilities.host_capabilities",
                        lambda kvm: [Capability("irqfd", 0, True), Capability("pmu-v3", 0, False)])
    monkeypatch.setattr("sys.argv", ["cloudkvm", "doctor"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2
    assert err.startswith("cloudkvm: error: this KVM lacks irqfd, which cloudkvm needs") and "\n" not in err


def test_a_vm_that_cannot_be_made_means_no_vgic_not_a_traceback(monkeypatch):
    def refuse(kvm):
        raise OSError(12, "Cannot allocate memory")
    monkeypatch.setattr("cloudkvm.kvm.capabilities.Vm", refuse)
    kvm = Kvm()
    try:
        caps = {c.name: c for c in host_capabilities(kvm, machine="aarch64")}
    finally:
        kvm.close()
    assert caps["vgic-v3"].value == 0 and caps["vgic-v3"].needed
