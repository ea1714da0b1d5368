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
