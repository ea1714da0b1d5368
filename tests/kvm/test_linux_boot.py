"""Debian's stock cloud kernel booted directly by `cloudkvm boot` (64-bit entry, host-decompressed vmlinux,
ACPI, 2 vCPUs), checked at early-boot milestones in its own log; a full boot to the initramfs' init is `slow`."""
import os
import re
import select
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from cloudkvm.boards.x86.board import X86Board, memory_layout
from cloudkvm.boards.x86.cpu import CpuPolicy
from cloudkvm.guests.debian import INIT_MARKER, default_guest
from cloudkvm.hostquirks import HostQuirks
from cloudkvm.machine import LinuxBoot, Machine, MachineSpec
from cloudkvm.vcpu_loop import VmResult

CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0 lpj=4000000 tsc=reliable no_timer_check nowatchdog"
E820_LINE = re.compile(r"BIOS-e820: \[mem 0x([0-9a-f]{16})-0x([0-9a-f]{16})\] (\w+)")
E820_NAMES = {1: "usable", 2: "reserved", 3: "ACPI", 4: "ACPI"}


def boot_until(needles: list[bytes], cpus: int, timeout: float, memory: int = 512 << 20):
    """Boot the default Debian guest until every needle is in the console (then stop it) or `timeout`."""
    kernel, initrd = default_guest()
    spec = MachineSpec(payload=LinuxBoot(kernel, initrd, CMDLINE), cpus=cpus, memory=memory)
    with Machine(spec) as machine:
        def watch():
            if all(machine.console.wait_for(n, timeout) for n in needles):
                machine.end(VmResult("stopped", "milestones reached"))
        threading.Thread(target=watch, daemon=True).start()
        result = machine.run(timeout=timeout + 5)
        return result, machine.console.text(), machine.board.e820_map(machine.memory)


def cli_boot_until(needles: list[bytes], cpus: int, timeout: float, memory: str = "512M", verbose=False):
    """`cloudkvm boot` as a user runs it, read until every needle appeared, then stopped with Ctrl-A x."""
    kernel, initrd = default_guest()
    proc = subprocess.Popen([sys.executable, "-m", "cloudkvm", "boot", "--kernel", str(kernel), "--initrd",
                             str(initrd), "--append", CMDLINE, "--cpus", str(cpus), "--memory", memory]
                            + ["--verbose"] * verbose,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, deadline = b"", time.monotonic() + timeout
    try:
        while not all(n in out for n in needles) and time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 1)[0]:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                out += chunk
        proc.stdin.write(b"\x01x")  # Ctrl-A x: stop the VM, as on a terminal
        proc.stdin.flush()
        rest, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    return proc.returncode, (out + rest).decode(errors="replace"), err.decode(errors="replace")


@pytest.fixture(scope="module")
def early_boot():
    needles = [b"ACPI: DSDT", b"smpboot: Allowing 2 CPUs, 0 hotplug CPUs"]
    code, console, stderr = cli_boot_until(needles, cpus=2, timeout=400, verbose=True)
    memory = SimpleNamespace(regions=[SimpleNamespace(gpa=g, size=n) for g, n in memory_layout(512 << 20)])
    e820 = X86Board(2, CpuPolicy(), HostQuirks()).e820_map(memory)
    return SimpleNamespace(code=code, stderr=stderr, reason=stderr), console, e820


def test_the_kernels_bss_clear_is_finished_by_the_vmm_where_kernel_code_is_interpreted(early_boot):
    """Boot assist (docs/host-quirks.md): both `rep stos` of clear_bss hit their breakpoints and are finished by
    the VMM on kvm_pvm; elsewhere no breakpoint is armed. The kernel booting on past it shows the result is right."""
    from cloudkvm.hostquirks import detect

    result, console, _ = early_boot
    finished = re.findall(r"boot assist at 0xffffffff[0-9a-f]{8}: finished", result.stderr)
    assert len(finished) == (2 if detect().boot_assists else 0), result.stderr[-3000:]
    assert "boot assist" not in result.stderr or "left to the guest" not in result.stderr


def test_the_kernel_prints_the_e820_map_we_gave(early_boot):
    result, console, e820 = early_boot
    assert "Linux version 6.1" in console, (result, console[-2000:])
    printed = [(int(a, 16), int(b, 16) - int(a, 16) + 1, kind) for a, b, kind in E820_LINE.findall(console)]
    assert printed == [(addr, size, E820_NAMES[t]) for addr, size, t in e820], console[-3000:]


def test_the_kernel_finds_every_acpi_table(early_boot):
    result, console, _ = early_boot
    for table in ("RSDP", "XSDT", "FACP", "APIC", "DSDT"):
        assert re.search(rf"ACPI: {table} 0x00000000000E[0-9A-F]{{4}}", console), (table, console[-3000:])


def test_the_kernel_allows_two_cpus_from_the_madt(early_boot):
    result, console, _ = early_boot
    assert "ACPI: Using ACPI (MADT) for SMP configuration information" in console
    assert "smpboot: Allowing 2 CPUs, 0 hotplug CPUs" in console
    assert "VM ended: stopped" in result.stderr and "Ctrl-A x" in result.stderr, result.stderr
    assert result.code == 0


@pytest.mark.slow
@pytest.mark.timeout(4000)
def test_full_boot_runs_the_initramfs_init_in_user_mode_and_powers_off():
    """The whole boot: every initcall, `Run /init`, busybox's /init in user mode (its marker, `uname -a`), and its
    `poweroff -f` through ACPI S5. On kvm_pvm (~15 min here) only with the syscall boot assist."""
    from cloudkvm.hostquirks import detect

    kernel, initrd = default_guest()
    with Machine(MachineSpec(payload=LinuxBoot(kernel, initrd, CMDLINE), cpus=2, memory=512 << 20)) as machine:
        result = machine.run(timeout=3600)
        console, syscalls = machine.console.text(), machine.board.assists.completed.get("syscall", 0)
    assert INIT_MARKER in console and "Linux (none) 6.1" in console, (result, console[-3000:])
    assert "smpboot: Total of 2 processors activated" in console
    assert result.reason == "poweroff", (result, console[-3000:])
    assert (syscalls > 0) == detect().boot_assists, syscalls
