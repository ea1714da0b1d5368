"""The harnesses' oracles can fail: with a bug planted in the code under test (monkeypatched for one test), a seed
that exercises that code makes the harness raise, where the real code makes it return a documented outcome."""
import struct
from pathlib import Path

import pytest

import targets
from targets.oracle import Crash

SEEDS = Path(__file__).resolve().parents[2] / "fuzz" / "seeds"


def seed(target: str, name: str) -> bytes:
    return (SEEDS / target / name).read_bytes()


def test_virtqueue_chain_outside_ram_is_a_crash(monkeypatch):
    from cloudkvm.devices.virtio.queue import Chain, Virtqueue
    vq = targets.load("virtqueue")
    data = seed("virtqueue", "direct")
    assert vq.one_input(data) == "chains"
    real_walk = Virtqueue._walk

    def walk_past_ram(self, head):
        chain = real_walk(self, head)
        return Chain(chain.head, chain.segments + [(0x1FF0, 0x20, True)])   # runs into the hole between regions
    monkeypatch.setattr(Virtqueue, "_walk", walk_past_ram)
    with pytest.raises(Crash, match="not inside guest RAM"):
        vq.one_input(data)


def test_virtqueue_wrong_head_is_a_crash(monkeypatch):
    from cloudkvm.devices.virtio.queue import Virtqueue
    vq = targets.load("virtqueue")
    real_walk = Virtqueue._walk
    monkeypatch.setattr(Virtqueue, "_walk", lambda self, head: real_walk(self, (head + 1) % self.size))
    with pytest.raises(Crash, match="avail ring entry says"):
        vq.one_input(seed("virtqueue", "direct"))


def test_blk_own_exception_reported_as_a_disk_error_is_a_crash(monkeypatch):
    from cloudkvm.devices.virtio.blk import VirtioBlk
    blk = targets.load("virtio_blk")
    data = seed("virtio_blk", "read-write-flush-id")
    assert blk.one_input(data) == "served"

    def broken(self, *args):
        raise KeyError("planted")
    monkeypatch.setattr(VirtioBlk, "_execute", broken)   # not one of the request errors it catches itself
    with pytest.raises(Crash, match="swallowed an exception .*disk backend error.*KeyError"):
        blk.one_input(data)


def test_blk_exception_escaping_to_the_transport_is_a_crash(monkeypatch):
    from cloudkvm.devices.virtio.blk import VirtioBlk
    blk = targets.load("virtio_blk")

    def broken(self, queue, chain):
        raise IndexError("planted")
    monkeypatch.setattr(VirtioBlk, "_request", broken)
    with pytest.raises(Crash, match="swallowed an exception .*IndexError"):
        blk.one_input(seed("virtio_blk", "read-write-flush-id"))


def test_blk_request_past_the_disk_is_a_crash(monkeypatch):
    from cloudkvm.devices.virtio.blk import SECTOR, VirtioBlk
    blk = targets.load("virtio_blk")
    data = seed("virtio_blk", "read-only-out-of-range")     # reads sectors 127..128 of a 128-sector disk
    assert blk.one_input(data) == "served"
    monkeypatch.setattr(VirtioBlk, "_range", lambda self, sector, length: sector * SECTOR)   # no range check
    with pytest.raises(Crash, match="disk contract broken: .*outside the 65536-byte disk"):
        blk.one_input(data)


def test_net_oversized_frame_reaching_the_backend_is_a_crash(monkeypatch):
    from cloudkvm.devices.virtio.net import VirtioNet
    net = targets.load("virtio_net")
    data = seed("virtio_net", "mergeable-csum")
    assert net.one_input(data) == "sent"
    real = VirtioNet._tx_frame
    monkeypatch.setattr(VirtioNet, "_tx_frame", lambda self, queue, chain: (real(self, queue, chain) or b"") * 40)
    with pytest.raises(Crash, match="frame reached the backend"):
        net.one_input(data)


def test_qcow2_unexpected_exception_escapes(monkeypatch):
    from cloudkvm.storage import qcow2_header
    q = targets.load("qcow2")
    data = seed("qcow2", "v3-data")
    assert q.one_input(data) == "written"
    monkeypatch.setattr(qcow2_header, "parse", lambda *a: struct.unpack(">Q", b""))   # struct.error: not documented
    with pytest.raises(struct.error):
        q.one_input(data)


def test_qcow2_lost_write_is_a_crash(monkeypatch):
    from cloudkvm.storage.qcow2 import Qcow2Disk
    q = targets.load("qcow2")
    data = seed("qcow2", "v3-data")
    monkeypatch.setattr(Qcow2Disk, "_write", lambda self, off, view: None)   # drops every guest write
    with pytest.raises(Crash, match="reads? back"):
        q.one_input(data)


def test_profile_round_trip_loss_is_a_crash(monkeypatch):
    import cloudkvm.profile
    p = targets.load("profile")
    data = seed("profile", "profiles-vm2.yaml")
    assert p.one_input(data) == "loaded"
    real = cloudkvm.profile.profile_to_dict

    def forgetful(profile):
        out = real(profile)
        out["cpus"] = out["cpus"] + 1
        return out
    monkeypatch.setattr(targets.load("profile"), "profile_to_dict", forgetful)
    with pytest.raises(Crash, match="loads back as a different profile"):
        p.one_input(data)


def test_profile_multi_line_error_is_a_crash(monkeypatch):
    from cloudkvm.errors import CloudkvmError
    p = targets.load("profile")

    def refuse(*args, **kwargs):
        raise CloudkvmError("line one\nline two", "hint")
    monkeypatch.setattr(p, "load_profile", refuse)
    with pytest.raises(Crash, match="not one printable line"):
        p.one_input(seed("profile", "profiles-vm2.yaml"))


def test_qcow2_backing_file_outside_the_folder_is_a_crash(monkeypatch):
    from cloudkvm.storage.backing import BackingPolicy
    q = targets.load("qcow2")
    data = seed("qcow2", "backing-raw")
    assert q.one_input(data) == "written"
    outside = Path(q.folder()).parent / "cloudkvm-fuzz-outside.raw"
    outside.write_bytes(bytes(65536))
    try:
        monkeypatch.setattr(BackingPolicy, "resolve", lambda self, image, name: str(outside))   # follows anything
        with pytest.raises(Crash, match="outside the image's folder"):
            q.one_input(data)
    finally:
        outside.unlink()
