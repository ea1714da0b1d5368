"""ACPI tables and the AML encoder, checked by parsing and by ACPICA's iasl/acpiexec as external oracles."""

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudkvm.boot import acpi, aml
from cloudkvm.boot.acpi import AcpiConfig, VirtioMmioSlot, build_tables

BASE = 0xE0000
SLOTS = [VirtioMmioSlot(0xD0000000, 0x1000, 5), VirtioMmioSlot(0xD0001000, 0x1000, 6),
         VirtioMmioSlot(0xD0002000, 0x200, 11)]


def full_config(cpus: int = 2) -> AcpiConfig:
    return AcpiConfig(cpus=cpus, virtio_mmio=list(SLOTS))


def table_at(tables, gpa: int) -> bytes:
    for addr, data in tables.blobs:
        if addr == gpa:
            return data
    raise AssertionError(f"no table at {gpa:#x}")


def madt_entries(madt: bytes):
    off, out = 44, []
    while off < len(madt):
        kind, length = madt[off], madt[off + 1]
        assert length >= 2
        out.append((kind, madt[off:off + length]))
        off += length
    assert off == len(madt)
    return out


def gas(data: bytes, offset: int):
    return struct.unpack_from("<BBBBQ", data, offset)


# --- table structure -------------------------------------------------------------

@pytest.mark.parametrize("cpus", [1, 2, 8])
def test_checksums_alignment_and_layout(cpus):
    t = build_tables(full_config(cpus), BASE)
    assert t.rsdp_addr == BASE and t.rsdp_addr % 16 == 0
    assert set(t.tables) == {"RSDP", "XSDT", "FACP", "APIC", "DSDT"}
    for name, data in t.tables.items():
        if name != "RSDP":
            assert data[:4].decode() == name
            assert struct.unpack_from("<I", data, 4)[0] == len(data)
            assert sum(data) % 256 == 0, name
    spans = sorted((gpa, gpa + len(d)) for gpa, d in t.blobs)
    assert spans[0][0] == BASE and spans[-1][1] <= BASE + 128 * 1024
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start and start % 8 == 0
    assert dict((t.addresses[k], v) for k, v in t.tables.items()) == dict(t.blobs)


def test_rsdp():
    t = build_tables(full_config(), BASE)
    rsdp = t.tables["RSDP"]
    assert len(rsdp) == 36 and rsdp[:8] == b"RSD PTR "
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    oem, rev, rsdt, length, xsdt = struct.unpack_from("<6sBIIQ", rsdp, 9)
    assert (oem, rev, rsdt, length) == (b"CLDKVM", 2, 0, 36)
    assert table_at(t, xsdt)[:4] == b"XSDT"


def test_xsdt_points_at_facp_and_apic_and_fadt_at_dsdt():
    t = build_tables(full_config(), BASE)
    xsdt = t.tables["XSDT"]
    entries = struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    assert [table_at(t, a)[:4] for a in entries] == [b"FACP", b"APIC"]
    fadt = t.tables["FACP"]
    (dsdt32,) = struct.unpack_from("<I", fadt, 40)
    (x_dsdt,) = struct.unpack_from("<Q", fadt, 140)
    assert dsdt32 == x_dsdt == t.addresses["DSDT"] and table_at(t, x_dsdt)[:4] == b"DSDT"


@pytest.mark.parametrize("cpus", [1, 2, 8])
def test_madt(cpus):
    madt = build_tables(full_config(cpus), BASE).tables["APIC"]
    assert struct.unpack_from("<II", madt, 36) == (0xFEE00000, 1)  # LAPIC address, PCAT_COMPAT
    entries = madt_entries(madt)
    lapics = [struct.unpack("<BBBBI", e) for k, e in entries if k == 0]
    assert [(uid, apic_id) for _, _, uid, apic_id, flags in lapics if flags & 1] == [(i, i) for i in range(cpus)]
    assert len(lapics) == cpus
    ioapics = [struct.unpack("<BBBBII", e) for k, e in entries if k == 1]
    assert ioapics == [(1, 12, cpus, 0, 0xFEC00000, 0)]
    assert [struct.unpack("<BBBBIH", e) for k, e in entries if k == 2] == [(2, 10, 0, 0, 2, 0)]
    assert [struct.unpack("<BBBHB", e) for k, e in entries if k == 4] == [(4, 6, 0xFF, 0, 1)]


def test_fadt_fields_at_spec_offsets():
    cfg = full_config()
    t = build_tables(cfg, BASE)
    fadt = t.tables["FACP"]
    assert len(fadt) == 276 and fadt[8] == 6 and fadt[131] == 4  # major 6, minor 4
    (flags,) = struct.unpack_from("<I", fadt, 112)
    assert flags & (1 << 20)  # HW_REDUCED_ACPI
    assert flags & (1 << 4) and flags & (1 << 5) and flags & (1 << 10)  # PWR/SLP_BUTTON, RESET_REG_SUP
    (boot_arch,) = struct.unpack_from("<H", fadt, 109)
    assert boot_arch == 1 << 2  # VGA not present; 8042, MSI-not-supported, CMOS-RTC-not-present all clear
    assert gas(fadt, 116) == (1, 8, 0, 1, cfg.reset_port) and fadt[128] == cfg.reset_value
    assert gas(fadt, 244) == (1, 8, 0, 1, 0x600)  # SLEEP_CONTROL_REG
    assert gas(fadt, 256) == (1, 8, 0, 1, 0x601)  # SLEEP_STATUS_REG
    assert struct.unpack_from("<Q", fadt, 140)[0] == t.addresses["DSDT"]
    assert fadt[268:276] == b"CLDKVM\0\0"


def test_errors():
    with pytest.raises(ValueError):
        build_tables(full_config(), BASE + 8)
    with pytest.raises(ValueError):
        build_tables(AcpiConfig(cpus=0), BASE)
    with pytest.raises(ValueError):
        build_tables(AcpiConfig(cpus=1, oem_id=b"TOOLONGID"), BASE)
    with pytest.raises(ValueError):
        build_tables(AcpiConfig(cpus=1, virtio_mmio=[VirtioMmioSlot(0xFFFFF000, 0x2000, 5)]), BASE)


def test_raises_when_region_too_small(monkeypatch):
    monkeypatch.setattr(acpi, "ACPI_REGION_SIZE", 512)
    with pytest.raises(ValueError, match="more than"):
        build_tables(full_config(8), BASE)


def test_ioapic_id_override_and_no_com1():
    t = build_tables(AcpiConfig(cpus=4, ioapic_id=0, com1=None), BASE)
    ioapic = [e for k, e in madt_entries(t.tables["APIC"]) if k == 1][0]
    assert ioapic[2] == 0 and b"COM1" not in t.tables["DSDT"]


@settings(max_examples=200, deadline=None)
@given(cpus=st.integers(1, 64),
       slots=st.lists(st.builds(VirtioMmioSlot, base=st.integers(0, 0xFFFF_0000 // 0x1000).map(lambda p: p * 0x1000),
                                size=st.sampled_from([0x200, 0x1000, 0x10000]), gsi=st.integers(0, 255)),
                      max_size=8),
       base=st.integers(0, 0xFFFF).map(lambda p: p * 16),
       com1=st.none() | st.just((0x3F8, 4)))
def test_random_configs_have_good_checksums_and_fit(cpus, slots, base, com1):
    t = build_tables(AcpiConfig(cpus=cpus, virtio_mmio=slots, com1=com1), base)
    for name, data in t.tables.items():
        assert sum(data[:20] if name == "RSDP" else data) % 256 == 0
        assert sum(data) % 256 == 0
    assert t.rsdp_addr == base and t.end - base <= 128 * 1024
    madt = t.tables["APIC"]
    assert sum(1 for k, e in madt_entries(madt) if k == 0 and e[4] & 1) == cpus
    assert all(t.tables["DSDT"].count(f"VR{n:02X}".encode()) == 1 for n in range(len(slots)))


# --- AML encoder -----------------------------------------------------------------

@pytest.mark.parametrize("total,encoded", [
    (0, b"\x00"), (63, b"\x3f"),
    (64, bytes([0x40, 0x04])), (4095, bytes([0x4F, 0xFF])),
    (4096, bytes([0x80, 0x00, 0x01])), ((1 << 20) - 1, bytes([0x8F, 0xFF, 0xFF])),
    (1 << 20, bytes([0xC0, 0x00, 0x00, 0x01])), ((1 << 28) - 1, bytes([0xCF, 0xFF, 0xFF, 0xFF])),
])
def test_pkg_length_boundaries(total, encoded):
    assert aml.pkg_length(total) == encoded


def test_pkg_length_out_of_range():
    with pytest.raises(ValueError):
        aml.pkg_length(1 << 28)
    with pytest.raises(ValueError):
        aml.pkg_length(-1)


@pytest.mark.parametrize("body_len,prefix_len", [
    (62, 1), (63, 2), (4093, 2), (4094, 3), ((1 << 20) - 4, 3), ((1 << 20) - 3, 4)])
def test_with_pkg_length_counts_itself(body_len, prefix_len):
    out = aml.with_pkg_length(bytes(body_len))
    assert len(out) == body_len + prefix_len
    lead = out[0]
    n = lead >> 6
    value = lead & 0x3F if n == 0 else (lead & 0x0F) | int.from_bytes(out[1:1 + n], "little") << 4
    assert n + 1 == prefix_len and value == len(out)


@pytest.mark.parametrize("value,encoded", [
    (0, b"\x00"), (1, b"\x01"), (2, b"\x0a\x02"), (0xFF, b"\x0a\xff"), (0x100, b"\x0b\x00\x01"),
    (0xFFFF, b"\x0b\xff\xff"), (0x10000, b"\x0c\x00\x00\x01\x00"), (0xFFFFFFFF, b"\x0c\xff\xff\xff\xff"),
    (1 << 32, b"\x0e" + (1 << 32).to_bytes(8, "little")), ((1 << 64) - 1, b"\x0e" + b"\xff" * 8),
])
def test_integer_smallest_encoding(value, encoded):
    assert aml.integer(value) == encoded


def test_integer_range():
    for bad in (-1, 1 << 64):
        with pytest.raises(ValueError):
            aml.integer(bad)


def test_names():
    assert aml.name_string("COM1") == b"COM1"
    assert aml.name_string("_S5") == b"_S5_"
    assert aml.name_string("\\") == b"\\\x00"
    assert aml.name_string("\\_SB_.COM1") == b"\\\x2e_SB_COM1"
    assert aml.name_string("\\_SB_.PCI0.ISA_") == b"\\\x2f\x03_SB_PCI0ISA_"
    assert aml.name_string("^^FOO") == b"^^FOO_"
    for bad in ("1ABC", "TOOLONG", "a b", ""):
        with pytest.raises(ValueError):
            aml.name_seg(bad)


def test_misc_encodings():
    assert aml.eisa_id("PNP0501") == b"\x0c\x41\xd0\x05\x01"  # 0x0105D041
    assert aml.string_("LNRO0005") == b"\x0dLNRO0005\x00"
    assert aml.package(5, 0) == b"\x12\x05\x02\x0a\x05\x00"
    assert aml.method("_STA", aml.return_(0x0F), args=2, serialized=True) == b"\x14\x09_STA\x0a\xa4\x0a\x0f"
    assert aml.io(0x3F8, 0x3F8, 1, 8) == b"\x47\x01\xf8\x03\xf8\x03\x01\x08"
    assert aml.irq_no_flags(4) == b"\x22\x10\x00"
    assert aml.memory32_fixed(0xD0000000, 0x1000) == b"\x86\x09\x00\x01" + bytes.fromhex("000000d000100000")
    assert aml.extended_interrupt(5) == b"\x89\x06\x00\x03\x01\x05\x00\x00\x00"
    assert aml.end_tag() == b"\x79\x00"


# --- ACPICA oracles (iasl, acpiexec) ---------------------------------------------

def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        print(f"{name} not installed (apt-get install acpica-tools): ACPICA oracle tests skipped")
        pytest.skip(f"{name} is not installed (apt-get install acpica-tools)")
    return path


def _run(args, cwd: Path) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return out


def disassemble(tmp_path: Path, cfg: AcpiConfig) -> dict[str, str]:
    """Write each SDT as NAME.dat, run `iasl -d`, and return the .dsl texts keyed by signature."""
    iasl = _tool("iasl")
    t = build_tables(cfg, BASE)
    dsl = {}
    for sig in ("XSDT", "FACP", "APIC", "DSDT"):
        dat = tmp_path / f"{sig.lower()}.dat"
        dat.write_bytes(t.tables[sig])
        out = _run([iasl, "-d", dat.name], tmp_path)
        assert "Error" not in out and "Warning" not in out, out
        dsl[sig] = dat.with_suffix(".dsl").read_text()
    return dsl


@pytest.mark.parametrize("cpus", [1, 2, 8])
def test_iasl_disassembles_all_tables(tmp_path, cpus):
    cfg = full_config(cpus)
    t = build_tables(cfg, BASE)
    dsl = disassemble(tmp_path, cfg)

    facp = dsl["FACP"]
    assert re.search(r"Hardware Reduced \((?:V5|ACPI 5)\)\s*: 1", facp)
    sleep_ctl = re.search(r"Sleep Control Register : \[Generic Address Structure\](.*?)\n\n", facp, re.S).group(1)
    assert re.search(r"Space ID : 01 \[SystemIO\]", sleep_ctl)
    assert re.search(r"Address : 0000000000000600", sleep_ctl)
    assert re.search(r"Reset Register Supported \(V2\)\s*: 1", facp)
    assert f"DSDT Address : {t.addresses['DSDT']:016X}" in facp

    apic = dsl["APIC"]
    assert apic.count("[Processor Local APIC]") == cpus
    assert apic.count("[I/O APIC]") == 1 and "[Interrupt Source Override]" in apic and "[Local APIC NMI]" in apic

    xsdt = dsl["XSDT"]
    assert f"{t.addresses['FACP']:016X}" in xsdt and f"{t.addresses['APIC']:016X}" in xsdt

    dsdt = dsl["DSDT"]
    assert 'EisaId ("PNP0501")' in dsdt and "IRQNoFlags ()\n                    {4}" in dsdt
    assert "IO (Decode16,\n                    0x03F8,             // Range Minimum" in dsdt
    assert dsdt.count('Name (_HID, "LNRO0005")') == len(SLOTS)
    for slot in SLOTS:
        assert f"Memory32Fixed (ReadWrite,\n                    0x{slot.base:08X}," in dsdt
        assert f"0x{slot.size:08X},         // Address Length" in dsdt
        assert re.search(r"Interrupt \(ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, \)\s*\{\s*"
                         rf"0x{slot.gsi:08X},", dsdt)
    assert "_S5_" in dsdt and re.search(r"Name \(\\_S5, Package \(0x04\)[^{]*\{\s*0x05,\s*Zero,", dsdt)


def test_iasl_recompiles_dsdt_to_identical_aml(tmp_path):
    """iasl's own compiler (optimizations off) turns its disassembly of our DSDT back into our exact AML."""
    iasl = _tool("iasl")
    dsdt = build_tables(full_config(), BASE).tables["DSDT"]
    (tmp_path / "dsdt.dat").write_bytes(dsdt)
    _run([iasl, "-d", "dsdt.dat"], tmp_path)
    _run([iasl, "-oa", "-p", "again", "dsdt.dsl"], tmp_path)
    assert (tmp_path / "again.aml").read_bytes()[36:] == dsdt[36:]


def test_iasl_compiles_same_aml_as_encoder(tmp_path):
    """Integers, root/dual names, and buffers across every PkgLength size boundary, compiled by iasl."""
    iasl = _tool("iasl")
    ints = [0, 1, 2, 0xFF, 0x100, 0xFFFF, 0x10000, 0xFFFFFFFF, 1 << 32, (1 << 64) - 2]
    sizes = [58, 59, 60, 61, 4087, 4088, 4089, 4090, 4091]  # Buffer body = BufferSize + bytes crosses 63 / 4095
    asl, ours = [], b""
    for i, v in enumerate(ints):
        asl.append(f"Name (I{i:03d}, 0x{v:X})")
        ours += aml.name(f"I{i:03d}", v)
    for i, n in enumerate(sizes):
        data = bytes((i + k) & 0xFF for k in range(n))
        asl.append(f"Name (B{i:03d}, Buffer () {{{', '.join(f'0x{b:02X}' for b in data)}}})")
        ours += aml.name(f"B{i:03d}", aml.buffer(data))
    asl.append('Scope (\\_SB) { Device (VR00) { Name (_HID, "LNRO0005") Name (_UID, 0x07) } }')
    ours += aml.scope("\\_SB_", aml.device("VR00", aml.name("_HID", "LNRO0005"), aml.name("_UID", 7)))
    asl.append('Name (\\_SB.VR00.ABCD, EisaId ("PNP0501"))')
    ours += aml.name("\\_SB_.VR00.ABCD", aml.eisa_id("PNP0501"))
    source = 'DefinitionBlock ("", "SSDT", 2, "CLDKVM", "CLOUDKVM", 1)\n{\n' + "\n".join(asl) + "\n}\n"
    (tmp_path / "t.asl").write_text(source)
    _run([iasl, "t.asl"], tmp_path)
    assert (tmp_path / "t.aml").read_bytes()[36:] == ours


def test_iasl_compiles_resource_templates_like_encoder(tmp_path):
    iasl = _tool("iasl")
    source = """DefinitionBlock ("", "SSDT", 2, "CLDKVM", "CLOUDKVM", 1)
{
    Name (RES0, ResourceTemplate () { IO (Decode16, 0x2F8, 0x2F8, 1, 8) IRQNoFlags () {3} })
    Name (RES1, ResourceTemplate () {
        Memory32Fixed (ReadWrite, 0xD0000000, 0x1000)
        Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) {33}
        Interrupt (ResourceConsumer, Level, ActiveLow, Shared) {7, 9}
    })
}
"""
    ours = (aml.name("RES0", aml.resource_template(aml.io(0x2F8, 0x2F8, 1, 8), aml.irq_no_flags(3)))
            + aml.name("RES1", aml.resource_template(
                aml.memory32_fixed(0xD0000000, 0x1000), aml.extended_interrupt(33),
                aml.extended_interrupt(7, 9, edge=False, active_low=True, shared=True))))
    (tmp_path / "r.asl").write_text(source)
    _run([iasl, "r.asl"], tmp_path)
    # iasl computes a real end-tag checksum only with -ve; by default it writes 0 like we do
    assert (tmp_path / "r.aml").read_bytes()[36:] == ours


def test_acpiexec_loads_tables_and_evaluates(tmp_path):
    """ACPICA's interpreter (the one in Linux) loads FACP+APIC+DSDT and evaluates the objects we define."""
    acpiexec = _tool("acpiexec")
    t = build_tables(full_config(), BASE)
    names = []
    for sig in ("FACP", "APIC", "DSDT"):
        (tmp_path / f"{sig.lower()}.dat").write_bytes(t.tables[sig])
        names.append(f"{sig.lower()}.dat")
    cmds = "evaluate \\_S5; evaluate \\_SB.COM1._STA; evaluate \\_SB.COM1._HID; resources \\_SB.VR02"
    out = _run([acpiexec, "-b", cmds, *names], tmp_path)
    assert "Error" not in out and "Warning" not in out and "AE_" not in out.replace("AE_NOT_FOUND", ""), out
    assert re.search(r"\[Package\] Contains 4 Elements:\s*\[Integer\] = 0000000000000005", out)
    assert "[Integer] = 000000000000000F" in out
    assert "[Integer] = 000000000105D041" in out
    assert re.search(r"Address : D0002000\s*Address Length : 00000200", out)
    assert re.search(r"Triggering : Edge\s*Polarity : ActiveHigh\s*Sharing : Exclusive", out)
    assert "Dword00 : 0000000B" in out


def test_power_button_ged_disassembles_and_notifies_the_button(tmp_path):
    """A Generic Event Device (ACPI0013) whose _EVT notifies the PNP0C0C power button for its GSI."""
    from cloudkvm.boot.acpi import AcpiConfig, build_tables

    dsdt = build_tables(AcpiConfig(cpus=1, power_button_gsi=9), 0xE0000).tables["DSDT"]
    assert sum(dsdt) % 256 == 0
    if shutil.which("iasl") is None:
        pytest.skip("iasl is not installed (apt-get install acpica-tools)")
    (tmp_path / "dsdt.dat").write_bytes(dsdt)
    out = subprocess.run(["iasl", "-d", "dsdt.dat"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and "Error" not in out.stdout + out.stderr
    dsl = (tmp_path / "dsdt.dsl").read_text()
    assert 'EisaId ("PNP0C0C")' in dsl and '"ACPI0013"' in dsl
    assert "Method (_EVT, 1, Serialized)" in dsl and "If ((Arg0 == 0x09))" in dsl
    assert "Notify (\\_SB.PWRB, 0x80)" in dsl
    assert "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )" in dsl and "0x00000009," in dsl


def test_the_cmos_rtc_is_described_for_rtc_cmos(tmp_path):
    from cloudkvm.boot.acpi import AcpiConfig, build_tables

    dsdt = build_tables(AcpiConfig(cpus=1), 0xE0000).tables["DSDT"]
    if shutil.which("iasl") is None:
        pytest.skip("iasl is not installed (apt-get install acpica-tools)")
    (tmp_path / "dsdt.dat").write_bytes(dsdt)
    subprocess.run(["iasl", "-d", "dsdt.dat"], cwd=tmp_path, capture_output=True, check=True)
    dsl = (tmp_path / "dsdt.dsl").read_text()
    assert 'EisaId ("PNP0B00")' in dsl and "IO (Decode16,\n                    0x0070,             // Range Minimum" in dsl
