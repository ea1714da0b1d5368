"""On the arm64 test host's real KVM (VHE, vGICv3): cloudkvm imports, opens /dev/kvm through its own
cross-built cffi core, and `cloudkvm doctor` finds what the aarch64 virt board needs."""
import pytest

pytestmark = [pytest.mark.realkvm, pytest.mark.timeout(1800)]  # the first build, up to three boots


@pytest.fixture(scope="module")
def doctor(testhost):
    result = testhost("arm64").run("uname -m; python3 -m cloudkvm doctor", timeout=400)
    assert result.status == 0, result.describe()
    return result.output


def test_it_is_an_arm64_host_with_its_own_kvm(doctor):
    assert doctor.splitlines()[0] == "aarch64"
    assert "/dev/kvm: API 12" in doctor
    assert "KVM capabilities for aarch64 boards:" in doctor
    assert "host quirks: none" in doctor


@pytest.mark.parametrize("capability", ["psci-0.2", "one-reg", "device-ctrl", "vgic-v3", "irqfd", "ioeventfd",
                                        "immediate-exit", "mp-state"])
def test_the_virt_board_has_what_it_needs(doctor, capability):
    assert f"  {capability}: yes" in doctor, doctor


def test_the_guest_physical_address_space_is_at_least_40_bits(doctor):
    (line,) = [ln for ln in doctor.splitlines() if "ipa-size-bits:" in ln]
    assert int(line.split(":")[1]) >= 40, line
