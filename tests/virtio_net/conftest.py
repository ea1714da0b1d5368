"""Fixtures for the virtio-net tests: guest memory (an mmap, no KVM), a fake backend, and a rig that drives a
VirtioNet through the virtio-mmio transport with the test driver from tests/virtio."""
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
# The virtio test driver (tests/virtio/virtio_driver.py) and our helpers, whatever the import mode.
for folder in (HERE.parent / "virtio", HERE):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from net_rig import RAM, FakeBackend, NetRig  # noqa: E402
from virtio_fixtures import guest_memory_fixture, no_unexpected_exceptions  # noqa: E402,F401


memory = guest_memory_fixture(RAM)


@pytest.fixture
def backend():
    return FakeBackend()


@pytest.fixture(params=["python", "c"])
def make_net(request, memory, backend):
    """make_net(mtu=None, accept=~0, queue_size=None, init=True) → NetRig; once receiving by net.py alone, once with
    plain receive chains filled by kvm/virtio_net.c."""
    def make(**kwargs) -> NetRig:
        rig = NetRig(memory, backend, **kwargs)
        rig.device.rx_in_c = request.param == "c"
        return rig
    return make


@pytest.fixture
def net(make_net) -> NetRig:
    """A virtio-net whose driver accepted every offered feature (MRG_RXBUF, CSUM, GUEST_CSUM, EVENT_IDX, ...)."""
    return make_net()
