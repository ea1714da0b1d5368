"""virtio-net identity, features, configuration space, link status, and the backend/life-cycle plumbing."""
import pytest

from cloudkvm.devices.virtio import mmio
from cloudkvm.devices.virtio.device import VIRTIO_F_VERSION_1
from cloudkvm.devices.virtio.net import (VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MAC,
                                         VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VirtioNet)
from cloudkvm.errors import CloudkvmError
from net_rig import GUEST_MAC, FakeBackend, NetRig

# virtio 1.2 §5.1.3 bits that must NOT be offered: segmentation offloads both ways, control queue, multiqueue.
NOT_OFFERED = {"GUEST_TSO4": 7, "GUEST_TSO6": 8, "GUEST_ECN": 9, "GUEST_UFO": 10, "HOST_TSO4": 11, "HOST_TSO6": 12,
               "HOST_ECN": 13, "HOST_UFO": 14, "CTRL_VQ": 17, "CTRL_RX": 18, "GUEST_ANNOUNCE": 21, "MQ": 22,
               "CTRL_MAC_ADDR": 23, "GUEST_USO4": 54, "GUEST_USO6": 55, "HOST_USO": 56, "HASH_REPORT": 57,
               "RSS": 60, "SPEED_DUPLEX": 63, "GSO (legacy)": 6}


def test_identity_and_queues(make_net):
    rig = make_net(init=False)
    d = rig.driver
    assert d.probe() == 1                          # §5.1.1 network device
    for index in (0, 1):
        d.write(mmio.QUEUE_SEL, index)
        assert d.read(mmio.QUEUE_NUM_MAX) == 256
    d.write(mmio.QUEUE_SEL, 2)                     # no control queue
    assert d.read(mmio.QUEUE_NUM_MAX) == 0


@pytest.mark.parametrize("mtu", [None, 1500, 9000])
def test_features_offered(make_net, mtu):
    rig = make_net(mtu=mtu, init=False)
    offered = rig.driver.device_features()
    for bit in (VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_CSUM,
                VIRTIO_NET_F_GUEST_CSUM, VIRTIO_F_VERSION_1):
        assert offered >> bit & 1, bit
    for name, bit in NOT_OFFERED.items():
        assert not offered >> bit & 1, name
    assert bool(offered >> VIRTIO_NET_F_MTU & 1) == (mtu is not None)


@pytest.mark.parametrize("mtu", [None, 1280, 9000])
def test_config_space(make_net, mtu):
    rig = make_net(mtu=mtu)
    d = rig.driver
    assert bytes(d.config(i, 1) for i in range(6)) == GUEST_MAC     # Linux reads the MAC byte by byte
    assert d.config(6, 2) == 1                                       # status: VIRTIO_NET_S_LINK_UP
    assert d.config(8, 2) == 1                                       # max_virtqueue_pairs
    assert d.config(10, 2) == (mtu or 1500)
    assert d.config(0, 4) == int.from_bytes(GUEST_MAC[:4], "little")
    assert d.config(12, 1) == 0                                      # nothing beyond mtu


def test_config_is_read_only(net, caplog):
    net.driver.t.write(mmio.CONFIG, 1, 0xFF)
    assert net.driver.config(0, 1) == GUEST_MAC[0]
    assert "ignored" in caplog.text


def test_minimal_driver_accepting_only_the_mac(make_net, backend):
    rig = make_net(accept=1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_F_VERSION_1)
    assert rig.device.acked_features == 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_F_VERSION_1


def test_link_status_change_notifies_the_driver(net):
    d = net.driver
    d.ack_interrupt()
    generation = d.read(mmio.CONFIG_GENERATION)
    net.device.set_link(False)
    assert d.config(6, 2) == 0
    assert d.read(mmio.INTERRUPT_STATUS) & mmio.INT_CONFIG
    assert d.read(mmio.CONFIG_GENERATION) != generation
    d.ack_interrupt()
    net.device.set_link(False)                    # no change, no notification
    assert not d.read(mmio.INTERRUPT_STATUS) & mmio.INT_CONFIG
    net.device.set_link(True)
    assert d.config(6, 2) == 1 and net.device.link_up


@pytest.mark.parametrize("mac, mtu, message", [
    (b"\x02\x00\x00\x00\x00", None, "not 6 bytes"),
    (b"\x02\x00\x00\x00\x00\x00\x00", None, "not 6 bytes"),
    (b"\x01\x00\x5e\x00\x00\x01", None, "multicast"),
    (GUEST_MAC, 67, "outside 68..65535"),
    (GUEST_MAC, 65536, "outside 68..65535"),
])
def test_bad_construction_is_a_user_error(mac, mtu, message):
    with pytest.raises(CloudkvmError, match=message):
        VirtioNet(FakeBackend(), mac, mtu)


def test_backend_connected_once_and_closed_with_the_device(memory, backend):
    rig = NetRig(memory, backend)
    assert backend.connects == 1 and backend.deliver == rig.device.deliver
    rig.device.close()
    rig.device.close()
    assert backend.closed == 1


def test_deliver_before_driver_ok_is_refused_quietly(make_net, backend, caplog):
    rig = make_net(init=False)
    assert backend.inject(b"\xff" * 60) is False
    rig.driver.negotiate()
    assert backend.inject(b"\xff" * 60) is False
    assert backend.held and caplog.records == []


def test_deliver_without_a_transport_keeps_the_frame(caplog):
    backend = FakeBackend()
    VirtioNet(backend, GUEST_MAC)
    assert backend.inject(b"\xff" * 60) is False
    assert "no transport" in caplog.text


def test_frames_kept_across_a_reset_arrive_after_reinitialisation(net, backend):
    assert backend.inject(b"\x02" * 60) is False             # no buffers yet
    net.driver.reset()
    assert backend.inject(b"\x03" * 60) is False             # device not live
    net.init()
    posted = net.post_rx(1526, count=4)
    assert backend.held == []
    assert [f for _, f in net.received(posted)] == [b"\x02" * 60, b"\x03" * 60]
