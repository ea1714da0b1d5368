"""boards/virt/dtb.py: the virt VM's device tree, read back with fdtget and compared with the tree QEMU's own
`-M virt` dumps (`dumpdtb=`). Expected addresses and interrupts are QEMU's (hw/arm/virt.c), written out here."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from cloudkvm.boards.virt.dtb import VirtDtbConfig, build_dtb, write_virt_dtb
from dtc_oracle import cells, compile_dts, decompile, fdtget, need_dtc, raw, strings, subnodes

RNG = bytes(range(100, 164))
KASLR = bytes.fromhex("0123456789abcdef")
GiB = 1 << 30


@pytest.fixture(autouse=True)
def _tools():
    need_dtc()


def _config(**kw) -> VirtDtbConfig:
    base = dict(cpus=2, memory_size=GiB, rng_seed=RNG, kaslr_seed=KASLR, gic_version=3,
                cmdline="console=ttyAMA0 root=/dev/vda", initrd=(0x4800_0000, 0x4812_3457))
    return VirtDtbConfig(**{**base, **kw})


def _write(tmp_path: Path, config: VirtDtbConfig, name: str = "virt.dtb") -> Path:
    return write_virt_dtb(config, tmp_path / name)


def _phandle_of(dtb: Path, path: str) -> int:
    value = cells(dtb, path, "phandle")
    assert value is not None and len(value) == 1, f"{path} has no phandle"
    return value[0]


@pytest.mark.parametrize("gic", [2, 3])
def test_decompiles_without_warnings_and_round_trips_through_dtc(tmp_path, gic):
    """(Not byte for byte: dtc stores "method" inside "enable-method" in its strings block, we store both.)"""
    dtb = _write(tmp_path, _config(gic_version=gic))
    dts = decompile(dtb)
    compile_dts(dts, tmp_path / "dtc.dtb")
    assert decompile(tmp_path / "dtc.dtb") == dts


def test_root_cpus_psci_memory(tmp_path):
    dtb = _write(tmp_path, _config(cpus=20, memory_size=3 * GiB + (4 << 20)))
    assert strings(dtb, "/", "compatible") == ["linux,dummy-virt"]
    assert cells(dtb, "/", "#address-cells") == [2] and cells(dtb, "/", "#size-cells") == [2]
    assert cells(dtb, "/", "interrupt-parent") == [_phandle_of(dtb, "/intc@8000000")]
    assert cells(dtb, "/cpus", "#address-cells") == [1] and cells(dtb, "/cpus", "#size-cells") == [0]
    # KVM's MPIDR: Aff0 = vCPU id bits 0-3, Aff1 = bits 4-11 (sys_regs.c reset_mpidr)
    mpidrs = list(range(16)) + [0x100, 0x101, 0x102, 0x103]
    assert subnodes(dtb, "/cpus") == [f"cpu@{m:x}" for m in mpidrs]
    for m in mpidrs:
        cpu = f"/cpus/cpu@{m:x}"
        assert cells(dtb, cpu, "reg") == [m]
        assert strings(dtb, cpu, "compatible") == ["arm,arm-v8"]
        assert fdtget(dtb, cpu, "device_type", "s") == "cpu" and fdtget(dtb, cpu, "enable-method", "s") == "psci"
    assert strings(dtb, "/psci", "compatible") == ["arm,psci-0.2"] and fdtget(dtb, "/psci", "method", "s") == "hvc"
    assert fdtget(dtb, "/memory@40000000", "device_type", "s") == "memory"
    assert cells(dtb, "/memory@40000000", "reg") == [0, 0x4000_0000, 0, 0xC040_0000]


def test_gic_v3(tmp_path):
    dtb = _write(tmp_path, _config(cpus=3, gic_version=3))
    gic = "/intc@8000000"
    assert strings(dtb, gic, "compatible") == ["arm,gic-v3"]
    assert fdtget(dtb, gic, "interrupt-controller") == "" and cells(dtb, gic, "#interrupt-cells") == [3]
    assert cells(dtb, gic, "reg") == [0, 0x0800_0000, 0, 0x1_0000, 0, 0x080A_0000, 0, 3 * 0x2_0000]
    assert cells(dtb, gic, "#redistributor-regions") == [1]
    timer = cells(dtb, "/timer", "interrupts")
    assert timer == [1, 13, 4, 1, 14, 4, 1, 11, 4, 1, 10, 4]  # PPIs, level-high as QEMU's virt says
    assert "arm,armv8-timer" in strings(dtb, "/timer", "compatible")


def test_gic_v2_and_its_timer_cpu_mask(tmp_path):
    dtb = _write(tmp_path, _config(cpus=3, gic_version=2))
    gic = "/intc@8000000"
    assert strings(dtb, gic, "compatible") == ["arm,cortex-a15-gic"]
    assert fdtget(dtb, gic, "interrupt-controller") == "" and cells(dtb, gic, "#interrupt-cells") == [3]
    assert cells(dtb, gic, "reg") == [0, 0x0800_0000, 0, 0x1_0000, 0, 0x0801_0000, 0, 0x1_0000]
    assert fdtget(dtb, gic, "#redistributor-regions") is None
    flags = 0b111 << 8 | 4  # CPUs 0-2 in bits 8-15, level-high
    assert cells(dtb, "/timer", "interrupts") == [1, 13, flags, 1, 14, flags, 1, 11, flags, 1, 10, flags]


def test_primecells_clock_and_power_key(tmp_path):
    dtb = _write(tmp_path, _config())
    clock = _phandle_of(dtb, "/apb-pclk")
    assert strings(dtb, "/apb-pclk", "compatible") == ["fixed-clock"]
    assert cells(dtb, "/apb-pclk", "clock-frequency") == [24_000_000] and cells(dtb, "/apb-pclk", "#clock-cells") == [0]

    uart = "/pl011@9000000"
    assert strings(dtb, uart, "compatible") == ["arm,pl011", "arm,primecell"]
    assert cells(dtb, uart, "reg") == [0, 0x0900_0000, 0, 0x1000]
    assert cells(dtb, uart, "interrupts") == [0, 1, 4]
    assert cells(dtb, uart, "clocks") == [clock, clock]
    assert strings(dtb, uart, "clock-names") == ["uartclk", "apb_pclk"]

    rtc = "/pl031@9010000"
    assert strings(dtb, rtc, "compatible") == ["arm,pl031", "arm,primecell"]
    assert cells(dtb, rtc, "reg") == [0, 0x0901_0000, 0, 0x1000] and cells(dtb, rtc, "interrupts") == [0, 2, 4]
    assert cells(dtb, rtc, "clocks") == [clock] and strings(dtb, rtc, "clock-names") == ["apb_pclk"]

    gpio = "/pl061@9030000"
    assert strings(dtb, gpio, "compatible") == ["arm,pl061", "arm,primecell"]
    assert cells(dtb, gpio, "reg") == [0, 0x0903_0000, 0, 0x1000] and cells(dtb, gpio, "interrupts") == [0, 7, 4]
    assert fdtget(dtb, gpio, "gpio-controller") == "" and cells(dtb, gpio, "#gpio-cells") == [2]
    assert cells(dtb, gpio, "clocks") == [clock]

    assert strings(dtb, "/gpio-keys", "compatible") == ["gpio-keys"]
    assert subnodes(dtb, "/gpio-keys") == ["poweroff"]
    assert cells(dtb, "/gpio-keys/poweroff", "linux,code") == [116]  # KEY_POWER
    assert cells(dtb, "/gpio-keys/poweroff", "gpios") == [_phandle_of(dtb, gpio), 3, 0]


@pytest.mark.parametrize("slots", [0, 1, 5, 32])
def test_virtio_mmio_slots(tmp_path, slots):
    dtb = _write(tmp_path, _config(virtio_slots=slots))
    nodes = [n for n in subnodes(dtb, "/") if n.startswith("virtio_mmio@")]
    assert nodes == [f"virtio_mmio@{0x0A00_0000 + 0x200 * i:x}" for i in range(slots)]
    for i, node in enumerate(nodes):
        path = f"/{node}"
        assert strings(dtb, path, "compatible") == ["virtio,mmio"]
        assert cells(dtb, path, "reg") == [0, 0x0A00_0000 + 0x200 * i, 0, 0x200]
        assert cells(dtb, path, "interrupts") == [0, 16 + i, 1]  # SPI 16 + slot, edge rising
        assert fdtget(dtb, path, "dma-coherent") == ""


def test_chosen(tmp_path):
    dtb = _write(tmp_path, _config())
    assert fdtget(dtb, "/chosen", "bootargs", "s") == "console=ttyAMA0 root=/dev/vda"
    stdout = fdtget(dtb, "/chosen", "stdout-path", "s")
    assert stdout == "/pl011@9000000" and "arm,pl011" in strings(dtb, stdout, "compatible")
    assert cells(dtb, "/chosen", "linux,initrd-start") == [0, 0x4800_0000]
    assert cells(dtb, "/chosen", "linux,initrd-end") == [0, 0x4812_3457]
    assert raw(dtb, "/chosen", "rng-seed") == RNG and raw(dtb, "/chosen", "kaslr-seed") == KASLR

    without = _write(tmp_path, _config(initrd=None, cmdline=""), "no-initrd.dtb")
    assert fdtget(without, "/chosen", "linux,initrd-start") is None
    assert fdtget(without, "/chosen", "linux,initrd-end") is None
    assert raw(without, "/chosen", "bootargs") == b"\0"


def test_the_largest_tree_is_far_below_the_2_mib_limit(tmp_path):
    dtb = build_dtb(_config(cpus=123, memory_size=255 * GiB, cmdline="x" * 2047))
    assert len(dtb) < 64 << 10
    (tmp_path / "big.dtb").write_bytes(dtb)
    decompile(tmp_path / "big.dtb")
    assert len(subnodes(tmp_path / "big.dtb", "/cpus")) == 123


def test_the_tree_is_a_pure_function_of_the_config(tmp_path):
    assert build_dtb(_config()) == build_dtb(_config())
    assert build_dtb(_config()) != build_dtb(_config(rng_seed=bytes(64)))
    assert _write(tmp_path, _config()).read_bytes() == build_dtb(_config())


@pytest.mark.parametrize("change, words", [
    (dict(gic_version=4), "gic_version"),
    (dict(cpus=0), "vCPUs"),
    (dict(cpus=9, gic_version=2), "GICv2"),
    (dict(cpus=124), "GICv3"),
    (dict(memory_size=GiB + 1), "4 KiB"),
    (dict(memory_size=256 * GiB), "255 GiB"),
    (dict(virtio_slots=33), "virtio"),
    (dict(rng_seed=bytes(32)), "rng_seed"),
    (dict(kaslr_seed=bytes(4)), "kaslr_seed"),
    (dict(cmdline="a\0b"), "NUL"),
    (dict(initrd=(0x3000_0000, 0x4100_0000)), "initrd"),
    (dict(initrd=(0x7FFF_F000, 0x8000_1000)), "initrd"),
])
def test_impossible_configs_are_refused(change, words):
    with pytest.raises(ValueError, match=words):
        build_dtb(_config(**change))


# --- QEMU's own virt tree as the oracle for everything both trees describe ----------------------------------------

# Where ours differs from QEMU's on purpose: (node, property) -> why
_DIFFERENT = {
    ("/intc@8000000", "reg"): "QEMU reserves the whole 123-CPU redistributor region; ours covers the vCPUs there are",
    ("/intc@8000000", "#address-cells"): "QEMU's GIC has an ITS/v2m child (2 cells); ours has none (0)",
    ("/psci", "compatible"): "QEMU also lists arm,psci-1.0 and arm,psci; ours says 0.2, whose IDs Linux probes up",
    ("/chosen", "rng-seed"): "random per boot",
    ("/chosen", "kaslr-seed"): "random per boot",
}
_CPU_DIFFERENT = {"compatible"}  # QEMU names the emulated model (arm,cortex-a57); ours the architecture
_PHANDLE_PROPS = {"interrupt-parent": 1, "clocks": 1, "gpios": 3}  # property -> cells per phandle reference


def _walk(dtb: Path, path: str = "/") -> list[str]:
    paths = [path]
    for child in subnodes(dtb, path):
        paths += _walk(dtb, f"{path.rstrip('/')}/{child}")
    return paths


def _phandle_owner(dtb: Path, phandle: int, nodes: list[str]) -> str:
    owners = [n for n in nodes if cells(dtb, n, "phandle") == [phandle]]
    assert len(owners) == 1, (dtb, phandle, owners)
    return owners[0]


@pytest.mark.parametrize("gic", [2, 3])
def test_every_node_and_property_matches_qemus_virt(tmp_path, gic):
    qemu = shutil.which("qemu-system-aarch64")
    if qemu is None:
        pytest.skip("qemu-system-aarch64 is not installed (apt-get install qemu-system-arm)")
    theirs = tmp_path / "qemu.dtb"
    proc = subprocess.run([qemu, "-M", f"virt,gic-version={gic},dumpdtb={theirs}", "-cpu", "cortex-a57",
                           "-smp", "2", "-m", "1024", "-display", "none"], capture_output=True, text=True, timeout=60)
    assert theirs.is_file(), proc.stderr
    ours = _write(tmp_path, _config(cmdline="", initrd=None, gic_version=gic))
    our_nodes, their_nodes = _walk(ours), _walk(theirs)
    assert set(our_nodes) - set(their_nodes) == set(), "nodes QEMU's virt does not have"
    compared = 0
    for node in our_nodes:
        for prop in fdtget(ours, node).split():
            if (node, prop) in _DIFFERENT or prop == "phandle" or (
                    node.startswith("/cpus/cpu@") and prop in _CPU_DIFFERENT):
                continue
            if node == "/chosen" and prop == "bootargs":
                continue  # QEMU has none without -append
            mine, qemus = raw(ours, node, prop), raw(theirs, node, prop)
            assert qemus is not None, f"QEMU's {node} has no {prop}"
            if prop in _PHANDLE_PROPS:
                a, b = cells(ours, node, prop), cells(theirs, node, prop)
                step = _PHANDLE_PROPS[prop]
                assert len(a) == len(b)
                for i in range(len(a)):
                    if i % step == 0:
                        assert _phandle_owner(ours, a[i], our_nodes) == _phandle_owner(theirs, b[i], their_nodes)
                    else:
                        assert a[i] == b[i], (node, prop)
            else:
                assert mine == qemus, f"{node} {prop}: ours {mine.hex()} QEMU {qemus.hex()}"
            compared += 1
    assert compared > 160  # 32 virtio slots x 4 properties alone are 128
