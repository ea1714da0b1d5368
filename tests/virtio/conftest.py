"""Fixtures for the virtio tests: guest memory (an mmap, no KVM), a transport with a device, and the test driver."""
import logging
import sys
from pathlib import Path

import pytest

from cloudkvm.devices.virtio import VirtioBlk, VirtioRng
from cloudkvm.kvm.memory import GuestMemory

sys.path.insert(0, str(Path(__file__).parent))   # the helper module beside this file, whatever the import mode
from virtio_driver import MiB, FakeDisk, Rig  # noqa: E402

RAM = 4 * MiB


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
def disk():
    d = FakeDisk(1 * MiB)
    yield d
    assert d.violations == []


@pytest.fixture
def make_rig(memory):
    def make(device) -> Rig:
        return Rig(memory, device)
    return make


@pytest.fixture
def blk(make_rig, disk) -> Rig:
    """A virtio-blk over a 1 MiB fake disk, initialised by the driver with every offered feature."""
    rig = make_rig(VirtioBlk(disk, serial="ckvm-serial-0001"))
    rig.driver.init()
    return rig


@pytest.fixture
def rng(make_rig) -> Rig:
    rig = make_rig(VirtioRng())
    rig.driver.init()
    return rig
