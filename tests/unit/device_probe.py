"""Shared by the device-model tests: a recording interrupt line (the `IrqLine` interface of devices/irq.py) and
the accesses a malicious guest makes (any offset, any size, any value)."""
from hypothesis import strategies as st

SIZES = [0, 1, 2, 3, 4, 8, 16]


class LevelLine:
    def __init__(self):
        self.changes: list[bool] = []

    def set_level(self, high: bool) -> None:
        assert not self.changes or self.changes[-1] != high, "a device set the line to the level it already had"
        self.changes.append(high)

    @property
    def level(self) -> bool:
        return self.changes[-1] if self.changes else False


def hostile_accesses(registers, window=0x1000):
    """("read", offset, size) and ("write", offset, size, value) anywhere around a `window`-byte device, with
    extra weight on its real `registers` at the sizes drivers use."""
    return st.one_of(
        st.tuples(st.just("read"), st.integers(-8, window + 16), st.sampled_from(SIZES)),
        st.tuples(st.just("write"), st.integers(-8, window + 16), st.sampled_from(SIZES),
                  st.integers(-(1 << 70), 1 << 70)),
        st.tuples(st.just("read"), st.sampled_from(registers), st.sampled_from([1, 2, 4])),
        st.tuples(st.just("write"), st.sampled_from(registers), st.sampled_from([1, 2, 4]),
                  st.integers(0, 0xFFFFFFFF)),
    )


def access(device, op) -> bool:
    """Perform a read/write op on `device` (checking a read's value fits its size); False for other ops."""
    if op[0] == "read":
        _, offset, size = op
        assert 0 <= device.read(offset, size) < 1 << (8 * max(size, 1))
        return True
    if op[0] == "write":
        _, offset, size, value = op
        device.write(offset, size, value)
        return True
    return False
