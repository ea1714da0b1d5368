"""virtio-net transmit: frames reach the backend without the header, partial checksums completed (§5.1.6.2)."""
import logging
import random
import struct

import pytest

from cloudkvm.devices.virtio import mmio
from cloudkvm.devices.virtio.device import VIRTIO_F_VERSION_1
from cloudkvm.devices.virtio.net import VIRTIO_NET_F_CSUM, VIRTIO_NET_F_MRG_RXBUF, ones_complement_sum
from net_rig import (HDR, NEEDS_CSUM, LinkBackend, arp_frame, l4_checksum_ok, l4_frame, ref_checksum, ref_sum)


@pytest.mark.parametrize("split, indirect", [
    (None, False),              # header and frame in one descriptor (Linux when there is headroom)
    ([12], False),              # header alone, then the frame
    ([12, 14, 20], False),      # scattered
    ([5, 1, 30], True),         # header cut in two, through an indirect table
])
def test_simple_frame(net, backend, split, indirect):
    frame = arp_frame()
    irqs = net.irqs
    head = net.transmit(frame, split=split, indirect=indirect)
    assert backend.sent == [frame]
    assert net.txq.get_used() == [(head, 0)]        # nothing written into a transmit buffer
    assert net.irqs == irqs + 1
    assert net.device.stats["tx_frames"] == 1
    assert net.device.tx_frames_in_c == int(isinstance(backend, LinkBackend))   # sent by kvm/virtio_net.c


def test_many_frames_in_one_notification(net, backend):
    frames = [arp_frame()[:-1] + bytes([i]) for i in range(20)]
    for f in frames:
        net.transmit(f, kick=False)
    net.txq.kick()
    assert backend.sent == frames
    assert len(net.txq.get_used()) == 20


def test_full_size_frame(net, backend):
    frame, _, _ = l4_frame(4, 6, bytes(range(256)) * 5 + bytes(1460 - 1280))
    assert len(frame) == 1514
    net.transmit(frame)
    assert backend.sent == [frame]


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("proto", [6, 17])
@pytest.mark.parametrize("size", [0, 1, 2, 13, 100, 1400])
def test_partial_checksum_is_completed(net, backend, version, proto, size):
    payload = bytes((i * 7 + size) & 0xFF for i in range(size))
    partial, csum_start, csum_offset = l4_frame(version, proto, payload, "partial")
    full, _, _ = l4_frame(version, proto, payload, "full")
    net.transmit(partial, flags=NEEDS_CSUM, csum_start=csum_start, csum_offset=csum_offset, split=[12, 30])
    [sent] = backend.sent
    assert l4_checksum_ok(sent, version, proto)
    field = csum_start + csum_offset
    ours, expected = sent[field:field + 2], full[field:field + 2]
    if expected == b"\0\0" and proto == 6:
        assert ours in (b"\0\0", b"\xff\xff")      # the same value in ones' complement
    else:
        assert ours == expected
    assert sent[:field] == full[:field] and sent[field + 2:] == full[field + 2:]
    assert net.device.tx_frames_in_c == int(isinstance(backend, LinkBackend))


def test_partial_checksum_behind_a_vlan_tag(net, backend):
    partial, csum_start, csum_offset = l4_frame(4, 6, b"tagged", "partial", vlan=5)
    net.transmit(partial, flags=NEEDS_CSUM, csum_start=csum_start, csum_offset=csum_offset)
    assert l4_checksum_ok(backend.sent[0], 4, 6, vlan=True)


def test_udp_checksum_that_computes_to_zero_is_sent_as_ffff(net, backend):
    """RFC 768: a computed UDP checksum of 0 is transmitted as all ones (0 means "no checksum")."""
    base, csum_start, csum_offset = l4_frame(4, 17, b"\0\0", "partial")
    field = csum_start + csum_offset
    # choose the last two payload bytes so that the complete checksum comes out as 0
    pseudo_sum = base[field:field + 2]
    seg = bytearray(base[csum_start:])
    seg[-2:] = b"\0\0"
    rest = ref_sum(bytes(seg))                    # includes the pseudo-header sum already in the field
    seg[-2:] = struct.pack(">H", ~rest & 0xFFFF)  # now the segment sums to 0xFFFF → checksum 0
    frame = base[:csum_start] + bytes(seg)
    assert ref_checksum(frame[csum_start:]) == 0 and frame[field:field + 2] == pseudo_sum
    net.transmit(frame, flags=NEEDS_CSUM, csum_start=csum_start, csum_offset=csum_offset)
    assert backend.sent[0][field:field + 2] == b"\xff\xff"
    assert l4_checksum_ok(backend.sent[0], 4, 17)


def test_ones_complement_sum_matches_the_reference():
    """kvm/checksum.c against the word-by-word reference: planned edge cases, then random lengths (odd and even,
    every alignment) and contents biased to 0x00/0xFF words, where end-around carries happen."""
    for data in (b"", b"\x00", b"\xff", b"\xff\xff", b"\xff\xff\xff\xff", b"\x12\x34\x56", bytes(range(256)) * 3,
                 b"\x00\x00\x00\x01", b"\xff\xfe\x00\x01"):
        assert ones_complement_sum(data) == ref_sum(data), data
    rng = random.Random(7)
    for _ in range(2000):
        data = bytes(rng.choice((0, 0xFF, rng.randrange(256))) for _ in range(rng.randrange(70)))
        assert ones_complement_sum(data) == ref_sum(data), data
        assert ones_complement_sum(memoryview(bytearray(data))[1:]) == ref_sum(data[1:]), data


def test_flags_without_needs_csum_leave_the_frame_alone(net, backend):
    frame, csum_start, csum_offset = l4_frame(4, 6, b"x", "bad")
    # DATA_VALID and unknown bits are ignored on transmit (§5.1.6.2.2), csum fields unused without NEEDS_CSUM
    net.transmit(frame, flags=0x02 | 0x40, csum_start=5000, csum_offset=7)
    assert backend.sent == [frame]


def bad_then_good(net, backend, caplog, expected: str, **kwargs):
    frame = arp_frame()
    for _ in range(3):
        head = net.transmit(frame, **kwargs)
        assert net.txq.get_used() == [(head, 0)]
    assert backend.sent == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and expected in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]    # logged once per kind
    assert net.device.stats["tx_dropped"] == 3
    net.transmit(frame)
    assert backend.sent == [frame] and not net.needs_reset


@pytest.mark.parametrize("gso_type", [1, 3, 4, 5, 0x80, 0x81])
def test_gso_is_refused(net, backend, caplog, gso_type):
    bad_then_good(net, backend, caplog, "segmentation", flags=NEEDS_CSUM, gso_type=gso_type, csum_start=34,
                  csum_offset=16)


@pytest.mark.parametrize("csum_start, csum_offset", [(41, 0), (40, 1), (0xFFFF, 0xFFFF), (0, 0xFFFF), (100, 0)])
def test_checksum_position_outside_the_frame(net, backend, caplog, csum_start, csum_offset):
    assert len(arp_frame()) == 42
    bad_then_good(net, backend, caplog, "outside the", flags=NEEDS_CSUM, csum_start=csum_start,
                  csum_offset=csum_offset)


def test_checksum_at_the_very_end_is_fine(net, backend):
    frame = arp_frame()[:-2] + b"\0\0"          # a "pseudo-header sum" of 0
    net.transmit(frame, flags=NEEDS_CSUM, csum_start=0, csum_offset=40)
    sent = backend.sent[0]
    assert ref_checksum(sent) == 0


def test_needs_csum_without_the_feature(make_net, backend, caplog):
    rig = make_net(accept=~(1 << VIRTIO_NET_F_CSUM))
    bad_then_good(rig, backend, caplog, "without VIRTIO_NET_F_CSUM", flags=NEEDS_CSUM, csum_start=14,
                  csum_offset=0)


def test_chains_shorter_than_header_and_ethernet_header(net, backend, caplog):
    for header, frame in ((None, b""), (None, b"\x01" * 13), (b"\0" * 11, b""), (b"\0" * 5, b"")):
        head = net.transmit(frame, header=header)
        assert net.txq.get_used() == [(head, 0)]
    assert backend.sent == [] and "less than a header" in caplog.text
    assert not net.needs_reset


@pytest.mark.parametrize("mtu, size, ok", [(None, 1518, True), (None, 1519, False), (9000, 9018, True),
                                           (9000, 9019, False), (576, 594, True), (576, 595, False)])
def test_frames_larger_than_the_mtu_are_dropped(make_net, backend, caplog, mtu, size, ok):
    rig = make_net(mtu=mtu)
    frame = arp_frame() + bytes(size - 42)
    head = rig.transmit(frame, split=[12, 1000] if size > 1100 else None)
    assert rig.txq.get_used() == [(head, 0)]
    assert backend.sent == ([frame] if ok else [])
    assert ("exceeds" in caplog.text) == (not ok)


def test_legacy_style_split_header_with_minimal_features(make_net, backend):
    rig = make_net(accept=1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MRG_RXBUF)
    rig.transmit(arp_frame(), split=[12])
    assert backend.sent == [arp_frame()]


def test_writable_buffers_in_a_transmit_chain_are_ignored(net, backend, caplog):
    frame = arp_frame()
    data = HDR.pack(0, 0, 0, 0, 0, 0, 0) + frame
    gpa = net.alloc.alloc(len(data))
    net.memory.write(gpa, data)
    extra = net.alloc.alloc(64, fill=0x5A)
    head = net.txq.submit([(gpa, len(data), False), (extra, 64, True)])
    assert net.txq.get_used() == [(head, 0)]
    assert backend.sent == [frame]
    assert net.memory.read(extra, 64) == b"\x5a" * 64
    assert "device-writable" in caplog.text


@pytest.mark.parametrize("path", ["python", "c"])  # libslirp's slirp_input, the link's way out, cannot fail
def test_backend_failure_drops_the_frame_only(net, backend, caplog):
    def boom(frame):
        raise OSError("host network is down")
    backend.on_send = boom
    net.transmit(arp_frame())
    net.transmit(arp_frame())
    assert len(backend.sent) == 2 and len(net.txq.get_used()) == 2
    assert not net.needs_reset
    assert caplog.text.count("backend send failed") == 1


def test_tx_interrupt_suppression(make_net, backend):
    rig = make_net(accept=~(1 << 29))      # without EVENT_IDX: VIRTQ_AVAIL_F_NO_INTERRUPT
    rig.txq.set_no_interrupt(True)
    irqs = rig.irqs
    rig.transmit(arp_frame())
    assert rig.irqs == irqs and backend.sent
    assert not rig.driver.read(mmio.INTERRUPT_STATUS) & mmio.INT_VRING
