"""cloudkvm's KVM core alone (kvm/arm64.py, kvm/vgic.py; no board) on the arm64 test host's real KVM: a vGICv3, two
vCPUs with in-kernel PSCI 0.2 (vCPU 1 powered off until CPU_ON), MMIO exits from both, SYSTEM_OFF, ONE_REG reads,
and SPIs raised by an irqfd and by KVM_IRQ_LINE as the vGIC reports them.

The guest (tests/guests/kvm_arm64/psci_smp.S) is assembled here; tests/guests/kvm_arm64/drive_core.py runs it in
the test host and prints a JSON report that these tests judge."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.realkvm, pytest.mark.timeout(1800)]  # the first build, up to three boots

HERE = Path(__file__).resolve().parent
GUEST_DIR = HERE.parent / "guests" / "kvm_arm64"
LOAD = 0x4000_0000  # RAM's start: the guest is linked and loaded there
DTB_STAND_IN = 0x4400_0000  # drive_core.py's x0 for vCPU 0
CONTEXT_ID = 0x5EC0DE  # psci_smp.S's CPU_ON context id
MMIO = 0x0900_0000
KVM_SYSTEM_EVENT_SHUTDOWN = 1  # <linux/kvm.h>
KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_STOPPED = 0, 5  # <linux/kvm.h>


def build_guest(out: Path) -> tuple[Path, Path]:
    """psci_smp.S -> a flat binary linked at LOAD, and its symbols as JSON."""
    tools = {t: shutil.which(f"aarch64-linux-gnu-{t}") for t in ("as", "ld", "objcopy", "nm")}
    if None in tools.values():
        pytest.skip("aarch64-linux-gnu binutils are missing (scripts/install-deps --test)")
    obj, elf, flat = out / "psci_smp.o", out / "psci_smp.elf", out / "psci_smp.bin"
    subprocess.run([tools["as"], "-o", obj, GUEST_DIR / "psci_smp.S"], check=True)
    subprocess.run([tools["ld"], "-nostdlib", f"-Ttext=0x{LOAD:x}", "-e", "_start", "-o", elf, obj], check=True)
    subprocess.run([tools["objcopy"], "-O", "binary", elf, flat], check=True)
    nm = subprocess.run([tools["nm"], elf], check=True, capture_output=True, text=True).stdout
    symbols = {name: int(value, 16) for value, _kind, name in (line.split() for line in nm.splitlines())}
    (out / "symbols.json").write_text(json.dumps(symbols))
    return flat, out / "symbols.json"


@pytest.fixture(scope="module")
def report(testhost, tmp_path_factory):
    out = tmp_path_factory.mktemp("arm64-core")
    flat, symbols = build_guest(out)
    result = testhost("arm64").run(f"python3 {GUEST_DIR / 'drive_core.py'} {flat} {symbols}", writable=(out,),
                                   timeout=600)
    lines = [ln for ln in result.output.splitlines() if ln.startswith("RESULT ")]
    assert lines, result.describe()
    facts = json.loads(lines[-1].removeprefix("RESULT "))
    facts["symbols"] = json.loads(symbols.read_text())
    facts["status"] = result.status
    print(f"arm64 KVM core: test host {result.seconds:.0f} s, guest run {facts['run_seconds']} s, preferred target "
          f"{facts['preferred_target']} (recommended features {facts['recommended_features']}), IPA "
          f"{facts['ipa_bits']} bits, {facts['reg_list']['count']} ONE_REG registers, irqfd SPI pending after "
          f"{facts['interrupts']['irqfd_seconds']} s")
    return facts


def test_the_run_ended_by_itself(report):
    assert not report["timed_out"] and report["status"] == 0, report["events"]


def test_the_numbers_python_uses_are_the_ones_the_core_was_compiled_with(report):
    assert report["abi"]["checked"] >= 30
    assert report["abi"]["mismatches"] == [] and report["abi"]["offset_mismatches"] == []


def test_a_vgic_v3_two_vcpus_and_the_registers_set_before_the_run(report):
    assert report["vgic_version"] == 3
    assert report["ipa_bits"] >= 40
    vcpu0, vcpu1 = report["before"]
    assert vcpu0["pc"] == report["symbols"]["_start"] and vcpu0["x0"] == DTB_STAND_IN
    assert vcpu0["pstate"] == 0x3C5  # EL1h, DAIF masked (booting.rst)
    assert [v["mpidr"] & 0xFF_FFFF for v in report["before"]] == [0, 1]  # Aff0 = the vCPU index
    assert [v["mp_state"] for v in report["before"]] == [KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_STOPPED]
    assert report["reg_list"]["has_pc"] and report["reg_list"]["has_mpidr"]


def test_both_vcpus_reached_mmio_and_psci_cpu_on_and_affinity_info_answered(report):
    mmio = [tuple(e[1:]) for e in report["events"] if e[0] == "mmio"]  # (vCPU, address, is_write, data)
    assert (0, MMIO, 1, "30") in mmio  # '0' from vCPU 0
    assert (1, MMIO, 1, "31") in mmio  # '1' from vCPU 1, which only PSCI CPU_ON started
    assert (0, MMIO + 8, 1, bytes(8).hex()) in mmio  # CPU_ON returned SUCCESS (0)
    assert (0, MMIO + 16, 1, (1).to_bytes(8, "little").hex()) in mmio  # AFFINITY_INFO: vCPU 1 is OFF
    assert len(mmio) == 4, report["events"]
    assert report["flag"] == 1


def test_system_off_is_a_shutdown_system_event_from_vcpu_0(report):
    assert [e for e in report["events"] if e[0] != "mmio"] == [["system_event", 0, KVM_SYSTEM_EVENT_SHUTDOWN]]


def test_the_c_run_loop_returned_every_exit(report):
    # ckvm_run_loop completes port I/O only, so on arm64 every exit comes back to Python: vCPU 0's three MMIO writes
    # and the system event, vCPU 1's MMIO write (its kick out of KVM_RUN afterwards is -EINTR, not an exit)
    assert report["exit_counts"] == [4, 1]


def test_one_reg_reads_back_where_each_vcpu_stopped(report):
    vcpu0, vcpu1 = report["after"]
    assert vcpu0["pc"] == report["symbols"]["after_system_off"]  # the instruction after its HVC
    assert vcpu0["x19"] == DTB_STAND_IN  # the x0 it was entered with
    assert vcpu1["pc"] == report["symbols"]["after_cpu_off"]
    assert vcpu1["x19"] == CONTEXT_ID  # CPU_ON's context id arrived in its x0
    assert vcpu1["mp_state"] == KVM_MP_STATE_STOPPED


def test_an_irqfd_leaves_an_edge_spi_pending_and_irq_line_drives_a_level_one(report):
    irq = report["interrupts"]
    assert irq["icfgr_reset"] == 0xAAAA_AAAA  # KVM resets SPIs edge-triggered; a guest's GIC driver reconfigures
    assert not irq["edge_pending_before"] and irq["edge_pending_after_irqfd"]
    # a level-triggered SPI follows its line: high, then low, and nothing latched (arm-vgic-v3.rst)
    assert irq["level_line_high"] and not irq["level_line_low"]
    assert not irq["level_latch_while_high"] and not irq["level_latch_after"]
