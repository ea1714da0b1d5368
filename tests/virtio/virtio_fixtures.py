"""Fixtures both virtio test folders use (imported into their conftest.py files)."""
import logging

import pytest

from cloudkvm.kvm.memory import GuestMemory


@pytest.fixture(autouse=True)
def no_unexpected_exceptions(caplog, request):
    """The transport catches everything; an ERROR record means one of our own exceptions was swallowed."""
    caplog.set_level(logging.WARNING, logger="cloudkvm.virtio")
    yield
    if request.node.get_closest_marker("allow_errors") is None:
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("cloudkvm.virtio")]
        assert errors == [], [r.getMessage() for r in errors]


def guest_memory_fixture(size: int):
    """A `memory` fixture: `size` bytes of guest RAM at 0 (an mmap, no KVM)."""
    @pytest.fixture
    def memory():
        m = GuestMemory([(0, size)])
        yield m
        m.close()
    return memory


def snapshot(memory) -> list[bytes]:
    """A copy of every RAM region, to compare with after an operation."""
    return [bytes(r.view) for r in memory.regions]


def assert_only_changed(memory, before: list[bytes], allowed: list[tuple[int, int]]) -> None:
    """Every byte that differs from `before` lies in one of the `allowed` (gpa, length) ranges."""
    for region, old in zip(memory.regions, before):
        new = bytes(region.view)
        if new == old:
            continue
        mask = bytearray(region.size)
        for gpa, length in allowed:
            lo, hi = max(gpa, region.gpa), min(gpa + length, region.end)
            if lo < hi:
                mask[lo - region.gpa:hi - region.gpa] = b"\x01" * (hi - lo)
        for block in range(0, len(old), 4096):
            if old[block:block + 4096] == new[block:block + 4096] or mask[block:block + 4096].count(0) == 0:
                continue
            for i in range(block, block + 4096):
                if old[i] != new[i]:
                    assert mask[i], f"unexpected write at 0x{region.gpa + i:x}"


def used_area(q) -> tuple[int, int]:
    """The used ring of queue `q` as a (gpa, length) range."""
    from cloudkvm.devices.virtio.queue import used_ring_size

    return (q.used, used_ring_size(q.size))
