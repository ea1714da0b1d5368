"""Fixtures for the virtio-net tests: guest memory (an mmap, no KVM), a fake backend, and a rig that drives a
VirtioNet through the virtio-mmio transport with the test driver from tests/virtio."""
import logging
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
# The virtio test driver (tests/virtio/virtio_driver.py) and our helpers, whatever the import mode.
for folder in (HERE.parent / "virtio", HERE):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from cloudkvm.kvm.memory import GuestMemory  # noqa: E402
from net_rig import RAM, FakeBackend, NetRig  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "allow_errors: the test expects ERROR log records from the virtio code")


@pytest.fixture(autouse=True)
def no_unexpected_exceptions(caplog, request):
    """The transport catches everything; an ERROR record means one of our own exceptions was swallowed."""
    caplog.set_level(logging.WARNING, logger="cloudkvm.virtio")
    yield
    if request.node.get_closest_marker("allow_errors") is None:
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("cloudkvm.virtio")]
        assert errors == [], [r.getMessage() for r in errors]


@pytest.fixture
def memory():
    m = GuestMemory([(0, RAM)])
    yield m
    m.close()


@pytest.fixture
def backend():
    return FakeBackend()


@pytest.fixture
def make_net(memory, backend):
    """make_net(mtu=None, accept=~0, queue_size=None, init=True) → NetRig."""
    def make(**kwargs) -> NetRig:
        return NetRig(memory, backend, **kwargs)
    return make


@pytest.fixture
def net(make_net) -> NetRig:
    """A virtio-net whose driver accepted every offered feature (MRG_RXBUF, CSUM, GUEST_CSUM, EVENT_IDX, ...)."""
    return make_net()
