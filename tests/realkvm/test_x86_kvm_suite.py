"""The purpose-built KVM test guests (tests/kvm: interrupts, SMP, virtio-blk, virtio-net, the KVM core, an
early Linux boot) on the x86_64 test host's real KVM."""
import re

import pytest

pytestmark = [pytest.mark.realkvm, pytest.mark.timeout(3000)]  # includes the test host's boot
MUST_PASS = ("test_x86_guests.py", "test_virtio_guest.py", "test_virtio_net_guest.py", "test_kvm_core.py",
             "test_linux_boot.py")


def test_the_kvm_suite_passes_on_the_real_kvm(testhost):
    # `slow` (the full boot) is deselected: test_x86_linux covers it, with the boot-log comparison
    result = testhost("x86_64").run("python3 -m pytest tests/kvm -q -rA -p no:cacheprovider -m 'not slow' "
                                    "--timeout 600", timeout=900)
    lines = result.output.splitlines()
    summary = lines[-1] if lines else ""
    assert result.status == 0, result.describe()
    assert re.search(r"\d+ passed", summary) and not re.search(r"\d+ (failed|errors?)\b", summary), summary
    passed = [ln for ln in lines if ln.startswith("PASSED ")]
    assert len(passed) >= 70, summary
    for module in MUST_PASS:
        assert any(module in ln for ln in passed), f"nothing passed in {module}: {summary}"
    xfailed = [ln for ln in lines if ln.startswith("XFAIL ")]
    assert all("hardware breakpoints never fire" in ln for ln in xfailed), xfailed
    skipped = [ln for ln in lines if ln.startswith("SKIPPED ")]  # only what is about the software KVM
    assert all("kvm_pvm" in ln or "emulates int3 itself" in ln for ln in skipped), skipped
