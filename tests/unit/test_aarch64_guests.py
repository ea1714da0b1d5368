"""The purpose-built aarch64 guests (tests/guests/aarch64/): they build with the cross toolchain, are arm64 Images that
run at any address, make the PSCI calls they should (read back with aarch64-linux-gnu-objdump), and do what they
say under QEMU's TCG `virt` machine, the oracle until cloudkvm's own virt board runs them."""
import re
import shutil
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from cloudkvm.errors import CloudkvmError
from cloudkvm.guests.build import GUEST_SOURCES, build_flat

GUESTS = Path(__file__).parent.parent / "guests" / "aarch64"
PACKAGED = GUEST_SOURCES / "aarch64"  # the `cloudkvm demo` guest and the includes every aarch64 guest uses
TOOLS = ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-ld", "aarch64-linux-gnu-objcopy", "aarch64-linux-gnu-objdump")
QEMU = "qemu-system-aarch64"
pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                                reason="needs the aarch64 cross toolchain (gcc-aarch64-linux-gnu)")
needs_qemu = pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"needs {QEMU}")

# PSCI function IDs (Arm DEN 0022)
CPU_OFF, CPU_ON, SYSTEM_OFF, SYSTEM_RESET = 0x84000002, 0xC4000003, 0x84000008, 0x84000009
PSCI_CALLS = {
    "hello": {CPU_ON, CPU_OFF, SYSTEM_OFF},
    "serial_echo": {SYSTEM_OFF},
    "unmapped_mmio": {SYSTEM_OFF},
    "reset": {SYSTEM_RESET},
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def build(name, cache, **kwargs):
    source = PACKAGED / f"{name}.S" if (PACKAGED / f"{name}.S").exists() else GUESTS / f"{name}.S"
    return build_flat(source, cache=cache, arch="aarch64", **kwargs)


def disassemble(binary: Path, vma: int = 0x40080000) -> list[tuple[int, str]]:
    """(address, instruction text) for every word of a flat image, as aarch64-linux-gnu-objdump decodes it."""
    proc = subprocess.run(["aarch64-linux-gnu-objdump", "-D", "-b", "binary", "-m", "aarch64",
                           f"--adjust-vma=0x{vma:x}", str(binary)], capture_output=True, text=True, check=True)
    lines = []
    for line in proc.stdout.splitlines():
        m = re.match(r"\s*([0-9a-f]+):\s+[0-9a-f]{8}\s+(.*)$", line)
        if m:
            lines.append((int(m.group(1), 16), m.group(2).split("//")[0].strip()))
    return lines


def hvc_function_ids(code: list[tuple[int, str]]) -> list[int]:
    """The PSCI function ID in w0 at each `hvc #0x0`, from the mov/movk pair that sets it just before."""
    ids = []
    for i, (_, text) in enumerate(code):
        if text != "hvc\t#0x0":
            continue
        low = re.fullmatch(r"mov\tw0, #0x([0-9a-f]+)", code[i - 2][1])
        high = re.fullmatch(r"movk\tw0, #0x([0-9a-f]+), lsl #16", code[i - 1][1])
        assert low and high, (code[i - 2], code[i - 1])
        ids.append(int(high.group(1), 16) << 16 | int(low.group(1), 16))
    return ids


# --- building -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PSCI_CALLS))
def test_guest_builds_into_an_arm64_image(name, cache):
    image = build(name, cache).read_bytes()
    code0, code1, text_offset, image_size, flags = struct.unpack_from("<IIQQQ", image, 0)
    magic, res5 = struct.unpack_from("<4sI", image, 0x38)
    assert magic == b"ARM\x64" and res5 == 0  # Documentation/arch/arm64/booting.rst
    assert text_offset == 0x80000 and flags == 0
    assert image_size == len(image)  # nothing (no .bss) beyond the file
    entry = disassemble(build(name, cache))[0]
    assert re.fullmatch(r"b\t0x4008[0-9a-f]{4}", entry[1])  # code0 branches forward into the image
    assert 0x40080040 <= int(entry[1].split("0x")[1], 16) < 0x40080000 + len(image)


@pytest.mark.parametrize("name", sorted(PSCI_CALLS))
def test_objdump_shows_the_psci_calls_over_hvc(name, cache):
    code = disassemble(build(name, cache))
    assert set(hvc_function_ids(code)) == PSCI_CALLS[name]
    assert not [text for _, text in code if text.startswith(("smc", "hvc\t#0x1", "svc"))]


@pytest.mark.parametrize("name", sorted(PSCI_CALLS))
def test_guest_is_position_independent(name, cache):
    # Linked at two addresses, the bytes are the same: nothing in the image depends on where a loader puts it.
    assert build(name, cache).read_bytes() == build(name, cache, load_addr=0x48000000).read_bytes()


def test_aarch64_builds_are_cached_apart_from_x86(cache, monkeypatch):
    first = build("hello", cache)
    assert first.name.startswith("hello-aarch64-") and first.parent == cache / "guests"

    def refuse(*args, **kwargs):
        raise AssertionError("toolchain run although the binary is cached")

    monkeypatch.setattr(subprocess, "run", refuse)
    assert build("hello", cache) == first


def test_aarch64_c_guests_are_refused(tmp_path, cache):
    src = tmp_path / "x.c"
    src.write_text("void _start(void) {}\n")
    with pytest.raises(CloudkvmError, match="assembly"):
        build_flat(src, cache=cache, arch="aarch64")


def test_unknown_architecture_is_refused(cache):
    with pytest.raises(CloudkvmError, match="riscv64"):
        build_flat(PACKAGED / "hello.S", cache=cache, arch="riscv64")


def test_missing_cross_tool_is_reported_with_the_package(tmp_path, monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "aarch64-linux-gnu-ld" else real_which(name))
    with pytest.raises(CloudkvmError) as exc:
        build_flat(PACKAGED / "hello.S", cache=tmp_path, arch="aarch64")
    assert "'aarch64-linux-gnu-ld'" in exc.value.message and "hello.S" in exc.value.message
    assert "binutils-aarch64-linux-gnu" in exc.value.hint


def test_assembly_error_names_the_file(tmp_path):
    src = tmp_path / "broken.S"
    src.write_text(".globl _start\n_start: mov x0, %%nonsense\n")
    with pytest.raises(CloudkvmError, match="broken.S"):
        build_flat(src, cache=tmp_path / "cache", arch="aarch64")


# --- under QEMU TCG -----------------------------------------------------------------------------------------------

def run_qemu(image: Path, cpus: int = 1, gic: int = 3, extra=(), answer=None, timeout: float = 60):
    """Boot `image` as QEMU's -kernel on `virt` (no EL2/EL3: QEMU provides PSCI over hvc, its DTB says so) and
    return (exit status, console text). `answer` = (prompt, input): type `input` once `prompt` has appeared."""
    cmd = [QEMU, "-M", f"virt,gic-version={gic}", "-cpu", "cortex-a57", "-smp", str(cpus), "-m", "256",
           "-display", "none", "-monitor", "none", "-serial", "stdio", "-kernel", str(image), *extra]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    out = bytearray()
    try:
        while True:
            chunk = proc.stdout.read1(4096)
            if not chunk:
                break
            out += chunk
            if answer and answer[0] in out:
                proc.stdin.write(answer[1])
                proc.stdin.flush()
                answer = None
        status = proc.wait()
    finally:
        killer.cancel()
        proc.kill()
        proc.wait()
    return status, out.decode(errors="replace")


@needs_qemu
@pytest.mark.parametrize("cpus, gic", [(1, 3), (2, 3), (4, 3), (17, 3), (3, 2)])
def test_hello_every_vcpu_says_hello_and_qemu_powers_off(cpus, gic, cache):
    status, console = run_qemu(build("hello", cache), cpus=cpus, gic=gic)
    assert status == 0, console  # QEMU ended by itself: PSCI SYSTEM_OFF (a timeout kills it: -9)
    lines = console.splitlines()
    assert lines == [f"cloudkvm: hello from vCPU {n} of {cpus}" for n in range(cpus)] + [
        "cloudkvm: all vCPUs said hello, powering off"]


@needs_qemu
@pytest.mark.parametrize("gic", [3, 2])
def test_serial_echo_receives_through_the_uart_interrupt(gic, cache):
    status, console = run_qemu(build("serial_echo", cache), gic=gic, answer=(b"serial_echo: ready\n", b"hello q"))
    assert status == 0, console
    assert console == "serial_echo: ready\nHELLO Q\nserial_echo: bye\n"


@needs_qemu
def test_unmapped_mmio_write_goes_on_where_the_machine_ignores_it(cache):
    # QEMU's virt has its (empty) PCIe window there and drops the write; cloudkvm's board has nothing there.
    status, console = run_qemu(build("unmapped_mmio", cache))
    assert status == 0, console
    assert console == "unmapped_mmio: writing 0x20000000\nunmapped_mmio: the write returned\n"


@needs_qemu
def test_reset_asks_psci_for_a_system_reset(cache):
    status, console = run_qemu(build("reset", cache), extra=["-no-reboot"])  # QEMU exits on a reset request
    assert status == 0, console
    assert console == "reset: PSCI SYSTEM_RESET\n"
