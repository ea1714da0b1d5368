"""virtio-net receive: header + frame into posted buffers, mergeable or not (§5.1.6.3–4), DATA_VALID, flow control
with the backend (deliver → False, rx_ready() after the driver posts buffers), drops."""
import logging

import pytest

from cloudkvm.devices.virtio import mmio
from cloudkvm.devices.virtio.net import (VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MRG_RXBUF, l4_checksum_valid)
from cloudkvm.devices.virtio.queue import VIRTIO_F_EVENT_IDX
from net_rig import DATA_VALID, HDR_SIZE, LinkBackend, arp_frame, l4_frame

NO_MRG = ~(1 << VIRTIO_NET_F_MRG_RXBUF)


def frame_of(size: int, seed: int = 0) -> bytes:
    base = arp_frame()
    if size <= len(base):
        return base[:size]
    return base + bytes((i * 31 + seed) & 0xFF for i in range(size - len(base)))


def test_frame_into_a_big_buffer_without_mrg_rxbuf(make_net, backend):
    rig = make_net(accept=NO_MRG)
    posted = rig.post_rx(1526, count=2)
    irqs = rig.irqs
    frame = frame_of(1514)
    assert backend.inject(frame) is True
    assert rig.irqs == irqs + 1
    used = rig.rxq.used_idx
    [(hdr, got)] = rig.received(posted)
    assert got == frame
    assert hdr == (0, 0, 0, 0, 0, 0, 1)            # flags 0, GSO_NONE, num_buffers 1 (§5.1.6.4.1)
    assert used == 1
    assert rig.device.rx_frames_in_c == int(rig.device.rx_in_c)   # the C path placed it when it is on
    assert rig.device.rx_frames_by_link == int(isinstance(backend, LinkBackend))   # straight from the backend


@pytest.mark.parametrize("split", [[12], [10, 500], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 100]])
def test_frame_into_a_buffer_cut_in_descriptors(make_net, backend, split):
    rig = make_net(accept=NO_MRG)
    posted = rig.post_rx(1526, split=split)
    frame = frame_of(1000, 3)
    assert backend.inject(frame)
    [(hdr, got)] = rig.received(posted)
    assert got == frame and hdr[6] == 1
    assert rig.device.rx_frames_in_c == int(rig.device.rx_in_c)


def test_used_length_counts_header_and_frame(net, backend):
    posted = net.post_rx(2048)
    backend.inject(frame_of(60))
    [(head, length)] = net.rxq.get_used()
    assert head == posted[0][0] and length == HDR_SIZE + 60
    # bytes after the frame are untouched
    gpa = posted[0][1][0][0]
    assert net.memory.read(gpa + HDR_SIZE + 60, 16) == b"\xee" * 16


@pytest.mark.parametrize("buffer, frame_size, expected", [
    (600, 1514, 3),        # 1526 bytes over 600 + 600 + 326
    (763, 1514, 2),        # exactly two full buffers
    (1526, 1514, 1),
    (12 + 60, 60, 1),
    (12, 60, 6),           # header alone in the first buffer
    (100, 1514, 16),
])
def test_mergeable_buffers(net, backend, buffer, frame_size, expected):
    posted = net.post_rx(buffer, count=20)
    frame = frame_of(frame_size, 7)
    assert backend.inject(frame) is True
    [(hdr, got)] = net.received(posted)
    assert hdr[6] == expected and got == frame
    used = net.last_used
    assert len(used) == expected
    # §5.1.6.4.1: every buffer but the last used completely; the last holds the rest
    assert [length for _, length in used[:-1]] == [buffer] * (expected - 1)
    assert sum(length for _, length in used) == HDR_SIZE + frame_size
    assert net.device.rx_frames_in_c == int(net.device.rx_in_c)
    assert net.device.rx_frames_by_link == int(isinstance(backend, LinkBackend))


def test_mergeable_buffers_of_several_descriptors(net, backend):
    posted = net.post_rx(700, count=4, split=[100, 300])
    frames = [frame_of(1514, 1), frame_of(200, 2), frame_of(1514, 3)]
    assert [backend.inject(f) for f in frames] == [True, True, False]
    got = net.received(posted)
    assert [g for _, g in got] == frames[:2]
    assert [h[6] for h, _ in got] == [3, 1]
    assert backend.held == [frames[2]]               # no room for the third: kept by the backend


def test_no_buffer_then_rx_ready_after_the_driver_posts(net, backend):
    frames = [frame_of(100, i) for i in range(3)]
    for f in frames:
        assert backend.inject(f) is False
    assert backend.held == frames and backend.rx_ready_calls == 0
    irqs = net.irqs
    posted = net.post_rx(1526, count=2)              # the driver posts and notifies
    assert backend.rx_ready_calls == 1
    assert [g for _, g in net.received(posted)] == frames[:2]
    assert backend.held == frames[2:]
    assert net.irqs == irqs + 1                      # one interrupt for the batch
    posted += net.post_rx(1526)
    assert [g for _, g in net.received(posted)] == frames[2:]
    assert backend.held == []


def test_not_enough_mergeable_buffers_consumes_none(net, backend, path):
    posted = net.post_rx(600, count=2)               # 1200 bytes: not enough for 1526
    frame = frame_of(1514)
    assert backend.inject(frame) is False
    assert net.rxq.get_used() == []                  # both buffers still the driver's... and still available
    posted += net.post_rx(600)
    # once per receive notification (served in C, only those made while the backend keeps a frame)
    assert backend.rx_ready_calls == (1 if path == "notifier" else 2)
    [(hdr, got)] = net.received(posted)
    assert got == frame and hdr[6] == 3
    # and the next frame starts at the next buffer
    posted += net.post_rx(600)
    assert backend.inject(frame_of(100))
    assert [g for _, g in net.received(posted)] == [frame_of(100)]


@pytest.mark.parametrize("event_idx", [True, False])
def test_notification_asked_for_after_running_out(make_net, backend, event_idx):
    rig = make_net(accept=~0 if event_idx else ~(1 << VIRTIO_F_EVENT_IDX))
    posted = rig.post_rx(1526)
    assert backend.inject(frame_of(60))
    assert backend.inject(frame_of(61)) is False
    if event_idx:
        assert rig.rxq.avail_event == 1              # "notify me when you add entry 1"
    posted += rig.post_rx(1526)
    assert [len(g) for _, g in rig.received(posted)] == [60, 61]


def test_frame_too_big_for_a_non_mergeable_buffer_is_dropped(make_net, backend, caplog):
    rig = make_net(accept=NO_MRG)
    posted = rig.post_rx(1000)
    for _ in range(3):
        assert backend.inject(frame_of(1514)) is True     # dropped for good: the backend must not keep it
    assert rig.rxq.get_used() == []                        # the buffer is left for a frame that fits
    assert backend.held == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "does not fit" in r.getMessage()]
    assert len(warnings) == 1
    assert rig.device.stats["rx_dropped"] == 3
    assert backend.inject(frame_of(500)) is True
    assert [g for _, g in rig.received(posted)] == [frame_of(500)]


@pytest.mark.parametrize("mtu, size, ok", [(None, 1514, True), (None, 1515, False), (9000, 9014, True),
                                           (9000, 9015, False), (1280, 1294, True), (1280, 1295, False)])
def test_frames_beyond_the_mtu_are_dropped(make_net, backend, caplog, mtu, size, ok):
    rig = make_net(mtu=mtu)
    posted = rig.post_rx(4096, count=4)
    assert backend.inject(frame_of(size)) is True
    got = rig.received(posted)
    assert len(got) == int(ok)
    assert ("dropped" in caplog.text) == (not ok)


def test_vlan_tagged_frame_may_be_four_bytes_longer(net, backend):
    posted = net.post_rx(2048, count=2)
    tagged = arp_frame()[:12] + b"\x81\x00\x00\x05" + arp_frame()[12:] + bytes(1514 - 42)
    assert len(tagged) == 1518
    assert backend.inject(tagged)
    assert [g for _, g in net.received(posted)] == [tagged]


@pytest.mark.parametrize("size", [0, 1, 13])
def test_runt_frames_are_dropped(net, backend, size):
    posted = net.post_rx(1526)
    assert backend.inject(b"\x01" * size) is True
    assert net.received(posted) == []


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("proto", [6, 17])
@pytest.mark.parametrize("guest_csum", [True, False])
def test_data_valid_only_with_guest_csum(make_net, backend, version, proto, guest_csum):
    rig = make_net(accept=~0 if guest_csum else ~(1 << VIRTIO_NET_F_GUEST_CSUM))
    posted = rig.post_rx(1526, count=4)
    good, _, _ = l4_frame(version, proto, b"hello, guest")
    bad, _, _ = l4_frame(version, proto, b"hello, guest", "bad")
    for f in (good, bad, arp_frame()):
        assert backend.inject(f)
    flags = [h[0] for h, _ in rig.received(posted)]
    assert flags == ([DATA_VALID, 0, 0] if guest_csum else [0, 0, 0])


def test_data_valid_for_ipv4_udp_without_checksum(net, backend):
    posted = net.post_rx(1526, count=2)
    for version in (4, 6):
        frame, _, _ = l4_frame(version, 17, b"no checksum", "zero")
        backend.inject(frame)
    assert [h[0] for h, _ in net.received(posted)] == [DATA_VALID, 0]   # IPv6 UDP must have one (RFC 8200)


def test_checksum_validation_cases():
    good4, _, _ = l4_frame(4, 6, b"payload")
    assert l4_checksum_valid(good4)
    assert l4_checksum_valid(l4_frame(4, 6, b"payload", vlan=7)[0])
    assert l4_checksum_valid(l4_frame(6, 17, b"x" * 999)[0])
    assert l4_checksum_valid(good4 + bytes(20))               # Ethernet padding after the IP packet
    fragment = bytearray(good4)
    fragment[14 + 6] |= 0x20                                  # more fragments
    assert not l4_checksum_valid(bytes(fragment))
    assert not l4_checksum_valid(good4[:-1])                  # truncated: shorter than the IP total length
    assert not l4_checksum_valid(arp_frame())
    assert not l4_checksum_valid(good4[:20])
    icmp = bytearray(good4)
    icmp[14 + 9] = 1
    assert not l4_checksum_valid(bytes(icmp))


def test_reply_sent_from_inside_transmit_reaches_the_guest(net, backend):
    """A backend may answer inside send() (slirp answers ARP at once): deliver re-enters the transport."""
    posted = net.post_rx(1526)
    backend.on_send = lambda frame: backend.inject(b"\x02" * 6 + frame[6:])
    net.driver.ack_interrupt()
    net.transmit(arp_frame())
    assert [g[:6] for _, g in net.received(posted)] == [b"\x02" * 6]
    assert net.driver.read(mmio.INTERRUPT_STATUS) & mmio.INT_VRING


def test_reply_from_inside_transmit_without_buffers_is_kept_then_delivered(net, backend):
    """The same answer while no receive buffer is posted: C leaves it (on the link path, from inside the C transmit
    path's call into the backend) to net.py, which the backend keeps it for; posted buffers bring it in."""
    backend.on_send = lambda frame: backend.inject(b"\x02" * 6 + frame[6:])
    net.transmit(arp_frame())
    assert len(backend.held) == 1 and net.device.stats["rx_frames"] == 0
    posted = net.post_rx(1526)
    assert [g[:6] for _, g in net.received(posted)] == [b"\x02" * 6]
    assert backend.held == []


def test_interrupt_suppressed_when_the_driver_asks(make_net, backend):
    rig = make_net(accept=~(1 << VIRTIO_F_EVENT_IDX))
    posted = rig.post_rx(1526, count=2)
    rig.rxq.set_no_interrupt(True)
    irqs = rig.irqs
    assert backend.inject(frame_of(60))
    assert rig.irqs == irqs
    rig.rxq.set_no_interrupt(False)
    assert backend.inject(frame_of(60))
    assert rig.irqs == irqs + 1
    assert len(rig.received(posted)) == 2


@pytest.mark.parametrize("path", ["python", "c", "link"])
def test_rx_ready_called_on_every_receive_notification(net, backend):
    net.post_rx(1526)
    net.post_rx(1526)
    assert backend.rx_ready_calls == 2
    net.driver.write(mmio.QUEUE_NOTIFY, 1)                    # a transmit notification is not one
    assert backend.rx_ready_calls == 2


@pytest.mark.parametrize("path", ["notifier"])
def test_receive_notifications_reach_python_only_while_frames_are_kept(net, backend):
    """Served in C (devices/virtio/notifier.py), a receive notification is nothing to do unless the backend keeps
    frames: then it reaches rx_ready, which delivers them."""
    posted = net.post_rx(1526)                                 # nothing kept: nothing to do, in C
    assert backend.rx_ready_calls == 0 and net.notifier.served == 1
    assert backend.inject(frame_of(100)) is True               # takes the posted buffer
    assert backend.inject(frame_of(101)) is False              # no buffer left: kept
    posted += net.post_rx(1526)                                # a frame is kept: on to Python
    assert backend.rx_ready_calls == 1 and net.notifier.forwarded == 1
    assert backend.held == [] and [g for _, g in net.received(posted)] == [frame_of(100), frame_of(101)]


def test_backend_failing_in_rx_ready(net, backend, caplog):
    def boom():
        raise RuntimeError("slirp hiccup")
    assert backend.inject(frame_of(100)) is False              # kept: receive notifications now go to rx_ready
    backend.rx_ready = boom
    net.post_rx(1526)
    net.post_rx(1526)
    assert not net.needs_reset
    assert caplog.text.count("rx_ready failed") == 1


@pytest.mark.parametrize("path", ["link"])
def test_the_c_path_stops_placing_frames_when_the_device_needs_a_reset_mid_call(net, backend):
    """A frame left to Python may put the device into DEVICE_NEEDS_RESET while libslirp is still handing over
    frames: C looks at the transport for every frame, so the later ones go the Python way (which keeps them)."""
    posted = net.post_rx(1526, count=4)
    with backend.section:                                     # one call into libslirp
        assert backend.inject(frame_of(100)) is True          # placed by C
        net.transport._need_reset("a test")                   # as a failing frame would
        assert backend.inject(frame_of(101)) is False         # not by C: kept
    assert net.device.rx_frames_by_link == 1 and backend.held == [frame_of(101)]
    assert len(net.received(posted)) == 1
