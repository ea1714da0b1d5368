"""ACPI tables for a hardware-reduced x86 guest (RSDP, XSDT, FADT, MADT, DSDT) per ACPI 6.4 §5.2."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from cloudkvm.boot import aml

# --- Layout ------------------------------------------------------------------------
ACPI_REGION_SIZE = 128 * 1024  # our budget: all tables must fit in 128 KiB from `base` (0xE0000-0xFFFFF)
RSDP_ALIGN = 16  # §5.2.5.1: the RSDP is found on a 16-byte boundary
TABLE_ALIGN = 8  # our choice: every other table starts 8-byte aligned

# --- Common header (§5.2.6) --------------------------------------------------------
HEADER_LEN = 36  # §5.2.6 Table 5.4: System Description Table Header length
CHECKSUM_OFFSET = 9  # §5.2.6 Table 5.4: Checksum byte offset
CREATOR_ID = b"CKVM"  # §5.2.6 Table 5.4: Creator ID (vendor of the table-building tool)
CREATOR_REVISION = 1  # §5.2.6 Table 5.4: Creator Revision
OEM_REVISION = 1  # §5.2.6 Table 5.4: OEM Revision

# --- RSDP (§5.2.5.3) -----------------------------------------------------------------
RSDP_SIGNATURE = b"RSD PTR "  # §5.2.5.3 Table 5.3: Signature
RSDP_REVISION = 2  # §5.2.5.3 Table 5.3: Revision 2 = ACPI 2.0+ (XSDT address present)
RSDP_V1_LEN = 20  # §5.2.5.3 Table 5.3: the first Checksum covers bytes 0-19
RSDP_LEN = 36  # §5.2.5.3 Table 5.3: Length of the whole RSDP

# --- XSDT (§5.2.8) -------------------------------------------------------------------
XSDT_REVISION = 1  # §5.2.8 Table 5.8: Revision 1

# --- Generic Address Structure (§5.2.3.2) -----------------------------------------
GAS_LEN = 12  # §5.2.3.2 Table 5.1: GAS length
GAS_SYSTEM_IO = 1  # §5.2.3.2 Table 5.1: Address Space ID 1 = System I/O
GAS_ACCESS_BYTE = 1  # §5.2.3.2 Table 5.1: Access Size 1 = byte access

# --- FADT (§5.2.9) -------------------------------------------------------------------
FADT_LEN = 276  # §5.2.9 Table 5.9: length of the ACPI 6.x FADT
FADT_REVISION = 6  # §5.2.9 Table 5.9: FADT Major Version 6
FADT_MINOR_REVISION = 4  # §5.2.9 Table 5.9: FADT Minor Version (ACPI 6.4)
FADT_DSDT = 40  # §5.2.9 Table 5.9: DSDT (32-bit) offset
FADT_PREFERRED_PM_PROFILE = 45  # §5.2.9 Table 5.9: Preferred_PM_Profile offset
FADT_IAPC_BOOT_ARCH = 109  # §5.2.9 Table 5.9: IAPC_BOOT_ARCH offset
FADT_FLAGS = 112  # §5.2.9 Table 5.9: Flags offset
FADT_RESET_REG = 116  # §5.2.9 Table 5.9: RESET_REG (GAS) offset
FADT_RESET_VALUE = 128  # §5.2.9 Table 5.9: RESET_VALUE offset
FADT_MINOR_VERSION = 131  # §5.2.9 Table 5.9: FADT Minor Version offset
FADT_X_DSDT = 140  # §5.2.9 Table 5.9: X_DSDT offset
FADT_SLEEP_CONTROL_REG = 244  # §5.2.9 Table 5.9: SLEEP_CONTROL_REG (GAS) offset
FADT_SLEEP_STATUS_REG = 256  # §5.2.9 Table 5.9: SLEEP_STATUS_REG (GAS) offset
FADT_HYPERVISOR_VENDOR_ID = 268  # §5.2.9 Table 5.9: Hypervisor Vendor Identity offset
HYPERVISOR_VENDOR_ID = b"CLDKVM\0\0"  # §5.2.9 Table 5.9: Hypervisor Vendor Identity (8 bytes)
PM_PROFILE_UNSPECIFIED = 0  # §5.2.9 Table 5.9: Preferred_PM_Profile 0 = Unspecified

FADT_F_PWR_BUTTON = 1 << 4  # §5.2.9.1 Table 5.10: power button is a control-method device (not fixed)
FADT_F_SLP_BUTTON = 1 << 5  # §5.2.9.1 Table 5.10: sleep button is a control-method device (or absent)
FADT_F_RESET_REG_SUP = 1 << 10  # §5.2.9.1 Table 5.10: RESET_REG is supported
FADT_F_HW_REDUCED_ACPI = 1 << 20  # §5.2.9.1 Table 5.10: hardware-reduced ACPI (no fixed hardware)

IAPC_LEGACY_DEVICES = 1 << 0  # §5.2.9.3 Table 5.11: user-visible LPC/ISA devices (left clear)
IAPC_8042 = 1 << 1  # §5.2.9.3 Table 5.11: an 8042 keyboard controller is present (left clear)
IAPC_VGA_NOT_PRESENT = 1 << 2  # §5.2.9.3 Table 5.11: do not probe VGA
IAPC_MSI_NOT_SUPPORTED = 1 << 3  # §5.2.9.3 Table 5.11: MSI must not be enabled (left clear)
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5  # §5.2.9.3 Table 5.11: no CMOS RTC (left clear: we have one at 0x70)

# --- MADT (§5.2.12) ------------------------------------------------------------------
MADT_REVISION = 5  # §5.2.12 Table 5.19: MADT Revision 5 (ACPI 6.4)
MADT_PCAT_COMPAT = 1 << 0  # §5.2.12 Table 5.20: a dual 8259 PIC is present too
MADT_LOCAL_APIC = 0  # §5.2.12 Table 5.21: type 0, Processor Local APIC
MADT_IO_APIC = 1  # §5.2.12 Table 5.21: type 1, I/O APIC
MADT_INT_SRC_OVERRIDE = 2  # §5.2.12 Table 5.21: type 2, Interrupt Source Override
MADT_LOCAL_APIC_NMI = 4  # §5.2.12 Table 5.21: type 4, Local APIC NMI
LAPIC_ENABLED = 1 << 0  # §5.2.12.2 Table 5.23: Local APIC Flags, Enabled
ALL_PROCESSORS = 0xFF  # §5.2.12.7 Table 5.30: ACPI Processor UID 0xFF = all processors
ISA_BUS = 0  # §5.2.12.5 Table 5.26: Bus 0 = ISA
MPS_INTI_CONFORMS = 0  # §5.2.12.5 Table 5.27: MPS INTI flags 0 = conforms to the bus (ISA: edge, high)
PIT_IRQ, PIT_GSI = 0, 2  # §5.2.12.5: the PIT's ISA IRQ 0 is wired to IOAPIC pin 2 (as on a PC)
LINT1 = 1  # §5.2.12.7 Table 5.30: Local APIC LINT# the NMI is wired to

# --- DSDT (§5.2.11.1) ----------------------------------------------------------------
DSDT_REVISION = 2  # §5.2.11.1 Table 5.17: revision >= 2 means 64-bit AML integers
STA_PRESENT_ENABLED_SHOWN_OK = 0x0F  # §6.3.7: _STA bits 0-3 (present, enabled, shown, functioning)
VIRTIO_MMIO_HID = "LNRO0005"  # Linux drivers/virtio/virtio_mmio.c ACPI match id for virtio-mmio
COM_HID = "PNP0501"  # §6.1.5 _HID: 16550A-compatible serial port (PNP ID)
CCA_COHERENT = 1  # §6.2.17 _CCA: DMA is cache-coherent
COM_PORT_SPAN = 8  # a 16550 UART decodes 8 consecutive I/O ports


@dataclass
class VirtioMmioSlot:
    """One virtio-mmio device window: MMIO base, window size, and its GSI on the IOAPIC."""

    base: int
    size: int
    gsi: int


@dataclass
class AcpiConfig:
    """What the guest's ACPI tables describe; `ioapic_id` defaults to `cpus` (after the LAPIC ids)."""

    cpus: int
    ioapic_addr: int = 0xFEC00000
    ioapic_id: int | None = None
    lapic_addr: int = 0xFEE00000
    sleep_control_port: int = 0x600
    sleep_status_port: int = 0x601
    reset_port: int = 0x602
    reset_value: int = 1
    s5_slp_typ: int = 5
    com1: tuple[int, int] | None = (0x3F8, 4)  # (I/O port, ISA IRQ)
    rtc_port: int | None = 0x70  # the CMOS RTC's index/data ports (no alarm IRQ is wired)
    virtio_mmio: list[VirtioMmioSlot] = field(default_factory=list)
    power_button_gsi: int | None = None  # a Generic Event Device that notifies the power button on this GSI
    oem_id: bytes = b"CLDKVM"
    oem_table_id: bytes = b"CLOUDKVM"

    def __post_init__(self) -> None:
        if self.ioapic_id is None:
            self.ioapic_id = self.cpus


@dataclass
class AcpiTables:
    """The laid-out tables: RSDP address, (gpa, bytes) blobs to copy, and each table by signature."""

    rsdp_addr: int
    blobs: list[tuple[int, bytes]]
    tables: dict[str, bytes]  # "RSDP", "XSDT", "FACP", "APIC", "DSDT" -> bytes
    addresses: dict[str, int]  # same keys -> guest-physical address

    @property
    def end(self) -> int:
        """First guest-physical address past the last table."""
        return max(gpa + len(data) for gpa, data in self.blobs)


def checksum(data: bytes) -> int:
    """The byte that makes `data` (with that byte zero) sum to 0 mod 256 (§5.2.6)."""
    return (-sum(data)) & 0xFF


def _pad(value: bytes, width: int, what: str) -> bytes:
    if len(value) > width:
        raise ValueError(f"{what} {value!r} is longer than {width} bytes")
    return value.ljust(width, b" ")


def _sdt(signature: bytes, revision: int, body: bytes, cfg: AcpiConfig) -> bytes:
    """A table with the §5.2.6 header and its checksum filled in."""
    header = struct.pack("<4sIBB6s8sI4sI", signature, HEADER_LEN + len(body), revision, 0,
                         _pad(cfg.oem_id, 6, "oem_id"), _pad(cfg.oem_table_id, 8, "oem_table_id"),
                         OEM_REVISION, CREATOR_ID, CREATOR_REVISION)
    table = bytearray(header + body)
    table[CHECKSUM_OFFSET] = checksum(table)
    return bytes(table)


def _gas_io(port: int) -> bytes:
    """A Generic Address Structure for one 8-bit System I/O register (§5.2.3.2)."""
    return struct.pack("<BBBBQ", GAS_SYSTEM_IO, 8, 0, GAS_ACCESS_BYTE, port)


def build_rsdp(cfg: AcpiConfig, xsdt_addr: int) -> bytes:
    """RSDP revision 2: RSDT address 0, XSDT address, both checksums (§5.2.5.3)."""
    rsdp = bytearray(struct.pack("<8sB6sBIIQB3x", RSDP_SIGNATURE, 0, _pad(cfg.oem_id, 6, "oem_id"),
                                 RSDP_REVISION, 0, RSDP_LEN, xsdt_addr, 0))
    rsdp[8] = checksum(rsdp[:RSDP_V1_LEN])
    rsdp[32] = checksum(rsdp)
    return bytes(rsdp)


def build_xsdt(cfg: AcpiConfig, entries: list[int]) -> bytes:
    """XSDT: the header then one 64-bit table address per entry (§5.2.8)."""
    return _sdt(b"XSDT", XSDT_REVISION, b"".join(struct.pack("<Q", a) for a in entries), cfg)


def build_fadt(cfg: AcpiConfig, dsdt_addr: int) -> bytes:
    """FADT revision 6.4 for a hardware-reduced platform (§5.2.9)."""
    body = bytearray(FADT_LEN - HEADER_LEN)

    def put(offset: int, fmt: str, *values) -> None:
        struct.pack_into(fmt, body, offset - HEADER_LEN, *values)

    put(FADT_DSDT, "<I", dsdt_addr if dsdt_addr < 1 << 32 else 0)
    put(FADT_PREFERRED_PM_PROFILE, "<B", PM_PROFILE_UNSPECIFIED)
    put(FADT_IAPC_BOOT_ARCH, "<H", IAPC_VGA_NOT_PRESENT)
    put(FADT_FLAGS, "<I", FADT_F_HW_REDUCED_ACPI | FADT_F_PWR_BUTTON | FADT_F_SLP_BUTTON | FADT_F_RESET_REG_SUP)
    put(FADT_RESET_REG, "12s", _gas_io(cfg.reset_port))
    put(FADT_RESET_VALUE, "<B", cfg.reset_value)
    put(FADT_MINOR_VERSION, "<B", FADT_MINOR_REVISION)
    put(FADT_X_DSDT, "<Q", dsdt_addr)
    put(FADT_SLEEP_CONTROL_REG, "12s", _gas_io(cfg.sleep_control_port))
    put(FADT_SLEEP_STATUS_REG, "12s", _gas_io(cfg.sleep_status_port))
    put(FADT_HYPERVISOR_VENDOR_ID, "8s", HYPERVISOR_VENDOR_ID)
    return _sdt(b"FACP", FADT_REVISION, bytes(body), cfg)


def build_madt(cfg: AcpiConfig) -> bytes:
    """MADT: LAPIC address, PCAT_COMPAT, one LAPIC per CPU, the IOAPIC, IRQ0->GSI2, LINT1 NMI (§5.2.12)."""
    parts = [struct.pack("<II", cfg.lapic_addr, MADT_PCAT_COMPAT)]
    for cpu in range(cfg.cpus):  # §5.2.12.2: type, length 8, processor UID, APIC ID, flags
        parts.append(struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, LAPIC_ENABLED))
    # §5.2.12.3: type, length 12, I/O APIC ID, reserved, address, GSI base
    parts.append(struct.pack("<BBBBII", MADT_IO_APIC, 12, cfg.ioapic_id, 0, cfg.ioapic_addr, 0))
    # §5.2.12.5: type, length 10, bus, source IRQ, GSI, MPS INTI flags
    parts.append(struct.pack("<BBBBIH", MADT_INT_SRC_OVERRIDE, 10, ISA_BUS, PIT_IRQ, PIT_GSI, MPS_INTI_CONFORMS))
    # §5.2.12.7: type, length 6, processor UID, MPS INTI flags, LINT#
    parts.append(struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, MPS_INTI_CONFORMS, LINT1))
    return _sdt(b"APIC", MADT_REVISION, b"".join(parts), cfg)


RTC_HID = "PNP0B00"  # PNP ID of an AT-compatible real-time clock (Microsoft PNP ID list)
POWER_BUTTON_HID = "PNP0C0C"  # §4.8.2.2.1.2: control-method power button
GED_HID = "ACPI0013"  # §5.6.9: Generic Event Device
NOTIFY_POWER_BUTTON = 0x80  # §5.6.6 Table 5.187: power button pressed (device-specific notification 0x80)


def build_dsdt(cfg: AcpiConfig) -> bytes:
    """DSDT: \\_SB_ with COM1 and the virtio-mmio devices, and \\_S5_ (§5.2.11.1, §7.4.2)."""
    devices = []
    if cfg.com1 is not None:
        port, irq = cfg.com1
        devices.append(aml.device(
            "COM1",
            aml.name("_HID", aml.eisa_id(COM_HID)),  # §6.1.5
            aml.name("_UID", 1),  # §6.1.12
            aml.method("_STA", aml.return_(STA_PRESENT_ENABLED_SHOWN_OK)),  # §6.3.7
            aml.name("_CRS", aml.resource_template(  # §6.2.2
                aml.io(port, port, 1, COM_PORT_SPAN), aml.irq_no_flags(irq))),
        ))
    if cfg.rtc_port is not None:
        devices.append(aml.device(
            "RTC0",
            aml.name("_HID", aml.eisa_id(RTC_HID)),  # PNP0B00: AT real-time clock (rtc_cmos binds to it)
            aml.name("_CRS", aml.resource_template(aml.io(cfg.rtc_port, cfg.rtc_port, 1, 2))),
        ))
    for n, slot in enumerate(cfg.virtio_mmio):
        devices.append(aml.device(
            f"VR{n:02X}",
            aml.name("_HID", VIRTIO_MMIO_HID),
            aml.name("_UID", n),
            aml.name("_CCA", CCA_COHERENT),
            aml.name("_CRS", aml.resource_template(
                aml.memory32_fixed(slot.base, slot.size, read_write=True),
                aml.extended_interrupt(slot.gsi, consumer=True, edge=True, active_low=False, shared=False))),
        ))
    if cfg.power_button_gsi is not None:
        gsi = cfg.power_button_gsi
        devices.append(aml.device("PWRB", aml.name("_HID", aml.eisa_id(POWER_BUTTON_HID)),  # §4.8.2.2.1.2
                                  aml.name("_UID", 0)))
        devices.append(aml.device(
            "GED0",
            aml.name("_HID", GED_HID),  # §5.6.9 Generic Event Device
            aml.name("_UID", 0),
            aml.name("_CRS", aml.resource_template(
                aml.extended_interrupt(gsi, consumer=True, edge=True, active_low=False, shared=False))),
            # §5.6.9.3: the OS calls _EVT with the GSI that fired; ours means "power button pressed" (0x80)
            aml.method("_EVT", aml.if_(aml.lequal(aml.arg(0), gsi),
                                       aml.notify("\\_SB_.PWRB", NOTIFY_POWER_BUTTON)), args=1, serialized=True),
        ))
    body = aml.scope("\\_SB_", *devices) + aml.name("\\_S5_", aml.package(cfg.s5_slp_typ, 0, 0, 0))
    return _sdt(b"DSDT", DSDT_REVISION, body, cfg)


def _validate(cfg: AcpiConfig) -> None:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(what)

    need(1 <= cfg.cpus <= 255, f"cpus must be 1..255 (xAPIC ids), got {cfg.cpus}")
    need(0 <= cfg.ioapic_id <= 0xFF, f"ioapic_id must fit a byte, got {cfg.ioapic_id}")
    need(0 <= cfg.ioapic_addr < 1 << 32 and 0 <= cfg.lapic_addr < 1 << 32, "APIC addresses must be 32-bit")
    for port in (cfg.sleep_control_port, cfg.sleep_status_port, cfg.reset_port):
        need(0 <= port <= 0xFFFF, f"I/O port {port:#x} out of range")
    need(0 <= cfg.reset_value <= 0xFF, "reset_value must fit a byte")
    need(0 <= cfg.s5_slp_typ <= 7, "s5_slp_typ is a 3-bit SLP_TYP value")
    if cfg.com1 is not None:
        port, irq = cfg.com1
        need(0 <= port <= 0x10000 - COM_PORT_SPAN and 0 <= irq <= 15, f"bad COM1 {cfg.com1!r}")
    need(len(cfg.virtio_mmio) <= 256, "at most 256 virtio-mmio slots (VR00..VRFF)")
    for slot in cfg.virtio_mmio:
        need(0 < slot.size and 0 <= slot.base and slot.base + slot.size <= 1 << 32,
             f"virtio-mmio window {slot!r} must be non-empty and below 4 GiB")
        need(0 <= slot.gsi < 1 << 32, f"bad GSI in {slot!r}")


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def build_tables(cfg: AcpiConfig, base: int) -> AcpiTables:
    """Lay out RSDP, XSDT, FACP, APIC, DSDT from `base` (16-aligned) within ACPI_REGION_SIZE bytes."""
    if base % RSDP_ALIGN or base < 0:
        raise ValueError(f"ACPI base {base:#x} must be {RSDP_ALIGN}-byte aligned")
    _validate(cfg)
    madt, dsdt = build_madt(cfg), build_dsdt(cfg)
    xsdt_len = HEADER_LEN + 8 * 2
    addresses: dict[str, int] = {}
    cursor = base
    for sig, size in (("RSDP", RSDP_LEN), ("XSDT", xsdt_len), ("FACP", FADT_LEN),
                      ("APIC", len(madt)), ("DSDT", len(dsdt))):
        addresses[sig] = cursor
        cursor = _align(cursor + size, TABLE_ALIGN)
    used = addresses["DSDT"] + len(dsdt) - base
    if used > ACPI_REGION_SIZE:
        raise ValueError(f"ACPI tables need {used} bytes, more than the {ACPI_REGION_SIZE}-byte region")
    tables = {
        "RSDP": build_rsdp(cfg, addresses["XSDT"]),
        "XSDT": build_xsdt(cfg, [addresses["FACP"], addresses["APIC"]]),
        "FACP": build_fadt(cfg, addresses["DSDT"]),
        "APIC": madt,
        "DSDT": dsdt,
    }
    assert len(tables["XSDT"]) == xsdt_len
    return AcpiTables(rsdp_addr=addresses["RSDP"],
                      blobs=[(addresses[k], tables[k]) for k in tables],
                      tables=tables, addresses=addresses)
