"""Small legacy PC port devices: the POST port sink and a PCI configuration mechanism #1 with no devices."""


class PortSink:
    """Accepts and ignores writes; reads float high (e.g. the POST diagnostic port 0x80)."""

    c_sink = True  # the C run loop may complete these accesses itself (see Bus.c_table)

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        pass


class PciConfigNoDevices:
    """PCI Local Bus Spec 3.0 §3.2.2.3.2 mechanism #1 at 0xCF8-0xCFF: CONFIG_ADDRESS latches, data reads all ones."""

    def __init__(self):
        self.address = 0

    def read(self, offset: int, size: int) -> int:
        if offset == 0 and size == 4:
            return self.address
        return (1 << (8 * size)) - 1  # no function answers: vendor ID 0xFFFF

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 4:
            self.address = value & 0x80FFFFFC
