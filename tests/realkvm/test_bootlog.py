"""The boot-log comparison itself, on hand-written logs (no test host needed)."""
from bootlog import normalise, only_in, warning_lines

QEMU = """[    0.000000] Linux version 6.1.0-57-cloud-amd64
[    0.012000] CPU MTRRs all blank - virtualized system.
[    0.250000] ------------[ cut here ]------------
[    0.250001] XSAVE consistency problem: size 2696 != kernel_size 576
[    0.250002] WARNING: CPU: 0 PID: 0 at arch/x86/kernel/fpu/xstate.c:814 fpu__init_system_xstate+0x4a/0x8c0
[    0.250100] Call Trace:
[    1.100000] tsc: Marking TSC unstable due to TSCs unsynchronized
"""
OURS = """[    0.000000] Linux version 6.1.0-57-cloud-amd64
[    0.011000] mtrr: your CPUs had inconsistent MTRRdefType settings
[    0.240000] XSAVE consistency problem: size 2696 != kernel_size 576
[    0.240002] WARNING: CPU: 0 PID: 0 at arch/x86/kernel/fpu/xstate.c:814 fpu__init_system_xstate+0x4a/0x8c0
[    0.240100] Call Trace:
[    1.300000] tsc: Marking TSC unstable due to TSCs unsynchronized
"""


def test_numbers_and_timestamps_do_not_make_a_line_new():
    assert normalise("[    0.240002] WARNING: CPU: 1 PID: 7 at x.c:814 f+0x4a/0x8c0") == \
        normalise("[   12.000000] WARNING: CPU: 0 PID: 0 at x.c:815 f+0x4b/0x8c1")


def test_only_the_line_the_reference_lacks_is_reported():
    assert only_in(OURS, QEMU) == ["[    0.011000] mtrr: your CPUs had inconsistent MTRRdefType settings"]
    assert only_in(QEMU, QEMU) == []


def test_plain_lines_are_not_warnings():
    assert warning_lines("[ 0.1] Run /init as init process\n[ 0.2] smp: Brought up 1 node, 2 CPUs\n") == {}
    assert len(warning_lines(QEMU)) == 3  # the XSAVE WARNING, its Call Trace, the TSC line
