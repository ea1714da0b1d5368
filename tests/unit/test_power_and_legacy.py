"""AcpiPowerControl (ACPI 6.4 §4.8.3.6-4.8.3.8), PortSink and PCI configuration mechanism #1 with no devices."""
import pytest

from cloudkvm.devices.acpi_power import (RESET, RESET_VALUE, S5_SLP_TYP, SLEEP_CONTROL, SLEEP_STATUS, SLP_EN,
                                         AcpiPowerControl)
from cloudkvm.devices.bus import Bus
from cloudkvm.devices.legacy import PciConfigNoDevices, PortSink


class Calls:
    def __init__(self):
        self.poweroff = 0
        self.reset = 0


@pytest.fixture
def acpi():
    calls = Calls()

    def poweroff():
        calls.poweroff += 1

    def reset():
        calls.reset += 1
    return AcpiPowerControl(poweroff, reset), calls


def slp(typ: int, enable: bool = True) -> int:
    return (typ << 2) | (SLP_EN if enable else 0)


def test_register_layout_constants():
    assert (SLEEP_CONTROL, SLEEP_STATUS, RESET) == (0, 1, 2)
    assert SLP_EN == 0x20 and RESET_VALUE == 1 and S5_SLP_TYP == 5


def test_s5_with_slp_en_powers_off(acpi):
    dev, calls = acpi
    dev.write(SLEEP_CONTROL, 1, slp(5))
    assert (calls.poweroff, calls.reset) == (1, 0)
    assert slp(5) == 0x34


def test_s5_with_other_bits_set_still_powers_off(acpi):
    dev, calls = acpi
    dev.write(SLEEP_CONTROL, 1, slp(5) | 0x83)  # bits 0,1,7 are not part of SLP_TYP/SLP_EN
    assert calls.poweroff == 1


def test_only_the_low_byte_counts(acpi):
    dev, calls = acpi
    dev.write(SLEEP_CONTROL, 4, 0xFFFFFF00 | slp(5))
    assert calls.poweroff == 1
    dev.write(SLEEP_CONTROL, 4, slp(5) << 8)  # S5 in the second byte is not a sleep request
    assert calls.poweroff == 1
    dev.write(RESET, 2, 0xFF00 | RESET_VALUE)  # the 8-bit reset register ignores the upper byte
    assert calls.reset == 1
    dev.write(RESET, 2, RESET_VALUE << 8)
    assert calls.reset == 1


@pytest.mark.parametrize("typ", [0, 1, 2, 3, 4, 6, 7])
def test_other_sleep_types_do_nothing(acpi, typ):
    dev, calls = acpi
    dev.write(SLEEP_CONTROL, 1, slp(typ))
    assert (calls.poweroff, calls.reset) == (0, 0)


def test_s5_without_slp_en_does_nothing(acpi):
    dev, calls = acpi
    dev.write(SLEEP_CONTROL, 1, slp(5, enable=False))
    assert (calls.poweroff, calls.reset) == (0, 0)


def test_s5_value_at_the_wrong_register_does_nothing(acpi):
    dev, calls = acpi
    dev.write(RESET, 1, slp(5))
    dev.write(3, 1, slp(5))
    assert (calls.poweroff, calls.reset) == (0, 0)


def test_reset_value_resets(acpi):
    dev, calls = acpi
    dev.write(RESET, 1, RESET_VALUE)
    assert (calls.poweroff, calls.reset) == (0, 1)
    dev.write(RESET, 1, RESET_VALUE)
    assert calls.reset == 2


@pytest.mark.parametrize("value", [0, 2, 3, 0x06, 0x0E, 0xFE, 0xFF])
def test_other_reset_values_do_nothing(acpi, value):
    dev, calls = acpi
    dev.write(RESET, 1, value)
    assert (calls.poweroff, calls.reset) == (0, 0)


def test_reset_value_at_sleep_control_does_nothing(acpi):
    dev, calls = acpi
    dev.write(SLEEP_CONTROL, 1, RESET_VALUE)
    assert (calls.poweroff, calls.reset) == (0, 0)


def test_status_is_write_one_to_clear(acpi):
    dev, calls = acpi
    assert dev.read(SLEEP_STATUS, 1) == 0
    dev.status = 0x81  # WAK_STS and one more bit set by the platform
    assert dev.read(SLEEP_STATUS, 1) == 0x81
    dev.write(SLEEP_STATUS, 1, 0x00)   # writing zeros changes nothing
    assert dev.read(SLEEP_STATUS, 1) == 0x81
    dev.write(SLEEP_STATUS, 1, 0x01)
    assert dev.read(SLEEP_STATUS, 1) == 0x80
    dev.write(SLEEP_STATUS, 1, 0x80)
    assert dev.read(SLEEP_STATUS, 1) == 0
    dev.write(SLEEP_STATUS, 1, 0xFF)   # writing ones never sets anything
    assert dev.read(SLEEP_STATUS, 1) == 0
    assert (calls.poweroff, calls.reset) == (0, 0)


def test_status_write_with_s5_pattern_does_not_power_off(acpi):
    dev, calls = acpi
    dev.write(SLEEP_STATUS, 1, slp(5))
    assert calls.poweroff == 0


def test_control_and_reset_read_as_zero(acpi):
    dev, _ = acpi
    dev.status = 0x80
    assert dev.read(SLEEP_CONTROL, 1) == 0
    assert dev.read(RESET, 1) == 0


# --- PortSink ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size,ones", [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFFFFFF)])
def test_port_sink_reads_all_ones(size, ones):
    sink = PortSink()
    assert sink.read(0, size) == ones
    sink.write(0, size, 0x12)          # writes are dropped
    assert sink.read(0, size) == ones


def test_port_sink_is_a_c_sink():
    assert PortSink.c_sink is True
    bus = Bus("pio", sink_ports=0x10000)
    bus.add(0x80, 1, PortSink(), "post")
    assert bus.c_table[0x80] == 1


# --- PCI configuration mechanism #1 -----------------------------------------------------------------------

def test_config_address_latch_round_trip():
    pci = PciConfigNoDevices()
    assert pci.read(0, 4) == 0
    addr = 0x8000_0000 | (1 << 16) | (2 << 11) | (3 << 8) | 0x10  # enable, bus 1, dev 2, fn 3, reg 0x10
    pci.write(0, 4, addr)
    assert pci.read(0, 4) == addr


@pytest.mark.parametrize("written,latched", [
    (0xFFFFFFFF, 0x80FFFFFC),   # reserved bits 30:24 and the two low bits do not latch
    (0x80000003, 0x80000000),
    (0x7F000000, 0x00000000),
    (0x8000F8FD, 0x8000F8FC),
])
def test_config_address_masking(written, latched):
    pci = PciConfigNoDevices()
    pci.write(0, 4, written)
    assert pci.read(0, 4) == latched


def test_partial_writes_do_not_touch_the_latch():
    pci = PciConfigNoDevices()
    pci.write(0, 4, 0x80000010)
    pci.write(0, 1, 0x00)   # byte write to 0xCF8 (e.g. the mechanism #2 probe)
    pci.write(0, 2, 0x0000)
    pci.write(4, 4, 0x12345678)  # config data
    assert pci.read(0, 4) == 0x80000010


@pytest.mark.parametrize("offset,size,ones", [(4, 4, 0xFFFFFFFF), (4, 2, 0xFFFF), (6, 2, 0xFFFF), (4, 1, 0xFF),
                                              (7, 1, 0xFF)])
def test_config_data_reads_all_ones(offset, size, ones):
    pci = PciConfigNoDevices()
    pci.write(0, 4, 0x80000000)  # bus 0, device 0, function 0, vendor ID
    assert pci.read(offset, size) == ones


@pytest.mark.parametrize("size,ones", [(1, 0xFF), (2, 0xFFFF)])
def test_partial_reads_of_config_address_float_high(size, ones):
    pci = PciConfigNoDevices()
    pci.write(0, 4, 0x80000000)
    assert pci.read(0, size) == ones
