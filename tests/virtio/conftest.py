"""Fixtures for the virtio tests: guest memory (an mmap, no KVM), a transport with a device, and the test driver."""
import sys
from pathlib import Path

import pytest

from cloudkvm.devices.virtio import VirtioBlk, VirtioRng
sys.path.insert(0, str(Path(__file__).parent))   # the helper module beside this file, whatever the import mode
from virtio_driver import MiB, FakeDisk, Rig  # noqa: E402
from virtio_fixtures import guest_memory_fixture, no_unexpected_exceptions  # noqa: E402,F401

RAM = 4 * MiB


memory = guest_memory_fixture(RAM)


@pytest.fixture(params=["python", "c", "notifier"])
def path(request) -> str:
    """How requests are served: "python" (blk.py alone), "c" (reads and writes on the C data path), "notifier"
    (the C data path behind notifications served in C, devices/virtio/notifier.py)."""
    return request.param


@pytest.fixture
def disk(path):
    """A 1 MiB fake disk on the `path` under test."""
    d = FakeDisk(1 * MiB, native=path != "python")
    yield d
    assert d.violations == []
    d.close()


@pytest.fixture
def make_rig(memory, request):
    """make_rig(device) → Rig; on the "notifier" path when the test runs on one (through the `disk` fixture)."""
    on_notifier = "path" in request.fixturenames and request.getfixturevalue("path") == "notifier"

    def make(device) -> Rig:
        return Rig(memory, device, notifier=on_notifier)
    return make


@pytest.fixture
def blk(make_rig, disk) -> Rig:
    """A virtio-blk over a 1 MiB fake disk on the `path` under test, initialised by the driver with every offered
    feature."""
    rig = make_rig(VirtioBlk(disk, serial="ckvm-serial-0001"))
    rig.driver.init()
    return rig


@pytest.fixture
def rng(make_rig) -> Rig:
    rig = make_rig(VirtioRng())
    rig.driver.init()
    return rig
