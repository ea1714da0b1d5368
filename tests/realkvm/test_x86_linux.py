"""On the x86_64 test host's real KVM (nested SVM): Debian's cloud kernel boots to /init, runs user-mode
commands and powers off through ACPI with no host quirks, and its log is as clean as under QEMU -M microvm
(the same kernel, initrd and command line, in the same test host, as the reference)."""
import shlex

import pytest

from bootlog import only_in
from cloudkvm.boot.linux_x86 import vmlinux_cache
from cloudkvm.guests.debian import INIT_MARKER, default_guest

pytestmark = [pytest.mark.realkvm, pytest.mark.timeout(2700)]  # includes the test host's boot
APPEND = "console=ttyS0 panic=-1"


@pytest.fixture(scope="module")
def boots(testhost, tmp_path_factory):
    """One test host run: `cloudkvm doctor`, then the guest under cloudkvm, then under QEMU microvm."""
    host = testhost("x86_64")
    kernel, initrd = default_guest()
    vmlinux_cache(kernel)  # decompressed here once; the test host reads it from the shared cache
    out = tmp_path_factory.mktemp("x86-boot")
    k, i, o, a = (shlex.quote(str(x)) for x in (kernel, initrd, out, APPEND))
    script = f"""
python3 -m cloudkvm doctor > {o}/doctor.txt 2>&1
python3 -m cloudkvm boot --kernel {k} --initrd {i} --cpus 2 --memory 512M --append {a} --timeout 400 \\
    > {o}/cloudkvm.log 2> {o}/cloudkvm.err
echo $? > {o}/cloudkvm.rc
for attempt in 1 2 3; do  # the reference only: QEMU's guest here now and then stops mid-boot (nested TCG SVM)
    echo $attempt > {o}/qemu.attempts
    timeout 300 qemu-system-x86_64 -M microvm -enable-kvm -cpu host -smp 2 -m 512 -nodefaults -no-user-config \\
        -display none -no-reboot -serial file:{o}/qemu.log -kernel {k} -initrd {i} -append {a} > {o}/qemu.err 2>&1
    grep -q "reboot: Power down" {o}/qemu.log && break
done
"""
    result = host.run(script, writable=(out,), timeout=1200)
    assert result.status == 0, result.describe()
    return {f.name: f.read_text(errors="replace") for f in out.iterdir()}


def test_doctor_reports_a_real_kvm_with_no_host_quirks(boots):
    assert "host quirks: none" in boots["doctor.txt"], boots["doctor.txt"]


def test_the_kernel_runs_init_in_user_mode_on_two_cpus_and_powers_off(boots):
    log, err = boots["cloudkvm.log"], boots["cloudkvm.err"]
    assert "host quirks for" not in err, err
    assert INIT_MARKER in log, log[-4000:] + err[-2000:]
    assert "GNU/Linux" in log.split(INIT_MARKER, 1)[1]  # `uname -a` ran after the marker: user mode works
    assert "smp: Brought up 1 node, 2 CPUs" in log
    assert "reboot: Power down" in log
    assert "VM ended: poweroff" in err and boots["cloudkvm.rc"].strip() == "0", err[-2000:]


def test_the_reference_boot_under_qemu_microvm_completed(boots):
    assert INIT_MARKER in boots["qemu.log"] and "reboot: Power down" in boots["qemu.log"], \
        boots["qemu.log"][-3000:] + boots["qemu.err"]


def test_the_boot_log_has_no_warning_that_qemu_microvm_does_not_have(boots):
    assert only_in(boots["cloudkvm.log"], boots["qemu.log"]) == []
