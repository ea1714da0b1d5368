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

from net_rig import RAM, FakeBackend, LinkBackend, NetRig  # noqa: E402
from virtio_fixtures import guest_memory_fixture, no_unexpected_exceptions  # noqa: E402,F401


memory = guest_memory_fixture(RAM)


@pytest.fixture(params=["python", "c", "link", "notifier"])
def path(request) -> str:
    """Which way frames go: "python" (net.py alone), "c" (plain receive chains filled by kvm/virtio_net.c), "link"
    (the backend's frames into C directly and transmitted frames out of C: the frame path net/slirp.py uses),
    "notifier" (the link, and receive notifications served in C: devices/virtio/notifier.py)."""
    return request.param


@pytest.fixture
def backend(path):
    return LinkBackend() if path in ("link", "notifier") else FakeBackend()


@pytest.fixture
def make_net(path, memory, backend):
    """make_net(mtu=None, accept=~0, queue_size=None, init=True) → NetRig on the `path` under test."""
    def make(**kwargs) -> NetRig:
        rig = NetRig(memory, backend, notifier=path == "notifier", **kwargs)
        rig.device.rx_in_c = path != "python"
        return rig
    return make


@pytest.fixture
def net(make_net) -> NetRig:
    """A virtio-net whose driver accepted every offered feature (MRG_RXBUF, CSUM, GUEST_CSUM, EVENT_IDX, ...)."""
    return make_net()
