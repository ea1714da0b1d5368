"""Shared test setup: KVM availability (skips print why), the slow marker, and test-guest helpers."""
import os
from pathlib import Path

import pytest
from hypothesis import settings

from cloudkvm.kvm.system import kvm_available

# Property tests check results, never speed: a busy 2-core CI machine must not fail them on hypothesis' 200 ms
# per-example deadline (speed lives in bench/).
settings.register_profile("cloudkvm", deadline=None)
settings.load_profile("cloudkvm")

GUESTS = Path(__file__).parent / "guests"
# QEMU TCG's SVM VMRUN loads the guest's DR7 from the VMCB without arming its breakpoints (target/i386/tcg/
# sysemu/svm_helper.c, helper_vmrun), so in the x86_64 test host KVM's guest-debug breakpoints never fire.
NO_NESTED_HW_BREAKPOINTS = ("in the emulated x86_64 test host, KVM_SET_GUEST_DEBUG hardware breakpoints never "
                            "fire: QEMU TCG's nested SVM loads DR7 without arming them")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow even without VMX/SVM")


def hardware_virtualization() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " vmx" in flags or " svm" in flags


def pytest_report_header(config):
    ok, why = kvm_available()
    return [f"cloudkvm: /dev/kvm {'usable' if ok else 'NOT usable: ' + why}; "
            f"hardware virtualization: {'yes' if hardware_virtualization() else 'no (slow tests skipped)'}"]


def pytest_collection_modifyitems(config, items):
    ok, why = kvm_available()
    run_slow = config.getoption("--run-slow") or hardware_virtualization() or os.environ.get("CLOUDKVM_RUN_SLOW")
    for item in items:
        if f"{os.sep}tests{os.sep}kvm{os.sep}" in str(item.fspath):
            item.add_marker(pytest.mark.kvm)  # everything in tests/kvm/ runs real guests
        if "kvm" in item.keywords and not ok:
            item.add_marker(pytest.mark.skip(reason=f"/dev/kvm unavailable: {why}"))
        if "hw_breakpoints" in item.keywords and os.environ.get("CLOUDKVM_TESTHOST") == "x86_64":
            item.add_marker(pytest.mark.xfail(strict=True, reason=NO_NESTED_HW_BREAKPOINTS))
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: needs VMX/SVM or --run-slow"))


@pytest.fixture(scope="session")
def guest_binary():
    """Build (or take from the cache) a purpose-built guest from tests/guests/NAME.S."""
    from cloudkvm.guests.build import build_flat

    def build(name: str) -> Path:
        source = GUESTS / f"{name}.S"
        return build_flat(source if source.exists() else GUESTS / f"{name}.c")
    return build
