"""On the x86_64 test host's real KVM (nested SVM): Debian's cloud kernel boots to /init, runs user-mode
commands and powers off through ACPI with no host quirks, and its log is as clean as under QEMU -M microvm
(the same kernel, initrd and command line, in the same test host, as the reference)."""
import shlex

import pytest

from bootlog import only_in
from cloudkvm.boot.linux_x86 import vmlinux_cache
from cloudkvm.guests.debian import INIT_MARKER, default_guest

pytestmark = [pytest.mark.realkvm, pytest.mark.timeout(2400)]  # includes the test host's boots
APPEND = "console=ttyS0 panic=-1"


def run_in_testhost(testhost, tmp_path_factory, name: str, script: str) -> dict[str, str]:
    """`script` in its own test-host run (so an emulator hang re-runs only this boot); the files it wrote."""
    out = tmp_path_factory.mktemp(name)
    result = testhost("x86_64").run(script.format(out=shlex.quote(str(out))), writable=(out,), timeout=600)
    assert result.status == 0, result.describe()
    return {f.name: f.read_text(errors="replace") for f in out.iterdir()}


@pytest.fixture(scope="module")
def guest():
    kernel, initrd = default_guest()
    vmlinux_cache(kernel)  # decompressed here once; the test host reads it from the shared cache
    return shlex.quote(str(kernel)), shlex.quote(str(initrd)), shlex.quote(APPEND)


@pytest.fixture(scope="module")
def ours(testhost, tmp_path_factory, guest):
    """`cloudkvm doctor`, then the guest under `cloudkvm boot` (never retried: only a hung emulator is)."""
    k, i, a = guest
    return run_in_testhost(testhost, tmp_path_factory, "cloudkvm-boot", f"""
python3 -m cloudkvm doctor > {{out}}/doctor.txt 2>&1
python3 -m cloudkvm boot --kernel {k} --initrd {i} --cpus 2 --memory 512M --append {a} --timeout 400 \\
    > {{out}}/cloudkvm.log 2> {{out}}/cloudkvm.err
echo $? > {{out}}/cloudkvm.rc
""")


@pytest.fixture(scope="module")
def reference(testhost, tmp_path_factory, guest):
    """The same guest under QEMU -M microvm (-enable-kvm -cpu host), the reference log."""
    k, i, a = guest
    return run_in_testhost(testhost, tmp_path_factory, "qemu-boot", f"""
timeout 400 qemu-system-x86_64 -M microvm -enable-kvm -cpu host -smp 2 -m 512 -nodefaults -no-user-config \\
    -display none -no-reboot -serial file:{{out}}/qemu.log -kernel {k} -initrd {i} -append {a} \\
    > {{out}}/qemu.err 2>&1
""")


def test_doctor_reports_a_real_kvm_with_no_host_quirks(ours):
    assert "host quirks: none" in ours["doctor.txt"], ours["doctor.txt"]


def test_the_kernel_runs_init_in_user_mode_on_two_cpus_and_powers_off(ours):
    log, err = ours["cloudkvm.log"], ours["cloudkvm.err"]
    assert "host quirks for" not in err, err
    assert INIT_MARKER in log, log[-4000:] + err[-2000:]
    assert "GNU/Linux" in log.split(INIT_MARKER, 1)[1]  # `uname -a` ran after the marker: user mode works
    assert "smp: Brought up 1 node, 2 CPUs" in log
    assert "reboot: Power down" in log
    assert "VM ended: poweroff" in err and ours["cloudkvm.rc"].strip() == "0", err[-2000:]


def test_the_reference_boot_under_qemu_microvm_completed(reference):
    assert INIT_MARKER in reference["qemu.log"] and "reboot: Power down" in reference["qemu.log"], \
        reference["qemu.log"][-3000:] + reference["qemu.err"]


def test_the_boot_log_has_no_warning_that_qemu_microvm_does_not_have(ours, reference):
    assert INIT_MARKER in ours["cloudkvm.log"] and INIT_MARKER in reference["qemu.log"]  # two whole boots
    assert only_in(ours["cloudkvm.log"], reference["qemu.log"]) == []
