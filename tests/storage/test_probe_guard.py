"""Format probing (issue 11, serious 1): a probed raw image refuses writes that would make it probe as another
format; signatures of formats cloudkvm cannot read are named, never opened as raw."""
import subprocess

import pytest

from cloudkvm.errors import CloudkvmError
from cloudkvm.storage import open_disk, probe_format
from cloudkvm.storage.errors import FormatChangeRefused

QCOW2_HEAD = b"QFI\xfb\x00\x00\x00\x03"


@pytest.fixture
def raw(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(1 << 20))
    return path


def test_a_probed_raw_image_refuses_a_qcow2_header_in_sector_0(raw):
    with open_disk(raw) as disk:  # format probed
        assert disk.format == "raw"
        with pytest.raises(FormatChangeRefused, match="first sector"):
            disk.pwrite(QCOW2_HEAD + bytes(504), 0)
        with pytest.raises(FormatChangeRefused):
            disk.pwrite(b"QFI\xfb", 0)
        disk.pwrite(b"plain data", 0)          # ordinary writes to sector 0 go through
        disk.pwrite(QCOW2_HEAD, 512)           # the magic anywhere else is just data
    assert raw.read_bytes()[:10] == b"plain data"
    assert probe_format(raw) == "raw"


def test_the_magic_cannot_be_assembled_byte_by_byte(raw):
    with open_disk(raw) as disk:
        disk.pwrite(b"QF", 0)
        disk.pwrite(b"I", 2)
        with pytest.raises(FormatChangeRefused):
            disk.pwrite(b"\xfb", 3)
    assert probe_format(raw) == "raw"


def test_zeroing_or_discarding_cannot_complete_a_signature(raw):
    with open(raw, "r+b") as f:
        f.write(b"QED\x01")  # one byte away from the QED magic "QED\0"
    with open_disk(raw) as disk:
        with pytest.raises(FormatChangeRefused):
            disk.write_zeroes(1, 3)
        with pytest.raises(FormatChangeRefused):
            disk.discard(1, 3)
    assert raw.read_bytes()[:4] == b"QED\x01"


def test_other_formats_signatures_are_guarded_too(raw):
    with open_disk(raw) as disk:
        for head, offset in ((b"KDMV", 0), (b"vhdxfile", 0), (b"conectix", 0), (b"\x7f\x10\xda\xbe", 0x40),
                             (b"LUKS\xba\xbe", 0)):
            with pytest.raises(FormatChangeRefused):
                disk.pwrite(head, offset)


def test_a_raw_format_the_user_gave_allows_any_first_sector(raw):
    with open_disk(raw, format="raw") as disk:
        disk.pwrite(QCOW2_HEAD, 0)
    assert raw.read_bytes()[:8] == QCOW2_HEAD


def test_a_recorded_probe_keeps_guarding(raw):
    with open_disk(raw, format="raw", probed=True) as disk:
        with pytest.raises(FormatChangeRefused):
            disk.pwrite(QCOW2_HEAD, 0)


@pytest.mark.parametrize("fmt", ["vmdk", "vdi", "vhdx", "vpc", "qed"])
def test_an_image_of_a_format_cloudkvm_cannot_read_is_named_not_opened_as_raw(tmp_path, fmt):
    path = tmp_path / f"x.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), "1M"], check=True)
    with pytest.raises(CloudkvmError, match=f"looks like a {fmt} image"):
        open_disk(path)
    assert open_disk(path, format="raw").format == "raw"  # the user may still say it is raw


def test_two_writes_that_each_keep_it_raw_cannot_assemble_a_signature_together(raw, monkeypatch):
    """The second write's check must see the first write's bytes: check and write under one lock. The first
    write is held inside its pwrite while the second arrives."""
    import threading
    import time

    from cloudkvm.storage import raw as raw_module

    real = raw_module.pwrite_full

    def slow_pwrite(fd, data, offset):
        time.sleep(0.2)
        real(fd, data, offset)
    monkeypatch.setattr(raw_module, "pwrite_full", slow_pwrite)
    outcome = {}
    with open_disk(raw) as disk:
        def write(name, data, offset):
            try:
                disk.pwrite(data, offset)
                outcome[name] = "written"
            except FormatChangeRefused:
                outcome[name] = "refused"
        first = threading.Thread(target=write, args=("first", b"QF", 0))
        first.start()
        time.sleep(0.05)  # the first write has passed its check and sleeps in pwrite
        write("second", b"I\xfb", 2)
        first.join()
    assert probe_format(raw) == "raw"
    assert outcome == {"first": "written", "second": "refused"}
