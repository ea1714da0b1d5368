"""Partition tables read through cloudkvm's storage layer (raw, compressed qcow2, a qcow2 overlay chain), checked
against `sfdisk --json` and `sfdisk --part-uuid` of images sfdisk wrote itself; and damaged tables, each a one-line
CloudkvmError naming the image."""
from __future__ import annotations

import struct

import pytest

from cloudkvm.errors import CloudkvmError
from cloudkvm.images.partitions import read_partitions
from cloudkvm.storage import BackingPolicy, open_disk

from diskmaker import (MiB, Part, garbage, make_disk, make_fs, need_tools, overlay, qcow2, run, sfdisk_json)

ESP, BIOS, XBOOTLDR = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "21686148-6449-6E6F-744E-656564454649", \
    "BC13C2FF-59E6-4262-A352-B275FD6F7172"
ROOT_X86, ROOT_ARM = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709", "B921B045-1DF0-41C3-AF44-4C6F280D3FAE"
LINUX, SWAP = "0FC63DAF-8483-4772-8E79-3D69D8477DE4", "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"
KIND_OF_SFDISK_NAME = {"EFI System": "esp", "BIOS boot": "bios-boot", "Linux extended boot": "xbootldr",
                       "Linux root (x86-64)": "root-x86_64", "Linux root (ARM-64)": "root-aarch64",
                       "Linux filesystem": "linux-data", "Linux swap": "swap"}


@pytest.fixture(autouse=True)
def tools():
    need_tools()


def read(path, fmt=None, base=None):
    policy = BackingPolicy(allowed=frozenset({str(base.resolve())})) if base else BackingPolicy()
    with open_disk(path, read_only=True, format=fmt, policy=policy) as disk:
        return read_partitions(disk, str(path))


def expect_error(path, *words, fmt=None):
    with pytest.raises(CloudkvmError) as caught:
        read(path, fmt)
    message = caught.value.message
    assert message.startswith(f"{path}: ") and "\n" not in message and caught.value.hint
    for word in words:
        assert word in message, message
    return message


def sfdisk_type_names() -> dict[str, str]:
    names = {}
    for line in run("sfdisk", "--list-types", "--label", "gpt").splitlines():
        guid, _, name = line.strip().partition("  ")
        if len(guid) == 36:
            names[guid.lower()] = name.strip()
    return names


def gpt_disk(tmp_path):
    parts = [Part(24, ROOT_X86, name="cloudimg-rootfs"), Part(4, BIOS, number=14),
             Part(8, ESP, name="UEFI", number=15), Part(8, XBOOTLDR, name="BOOT", number=16),
             Part(2, ROOT_ARM, name="arm root ü"), Part(2, SWAP), Part(2, LINUX)]
    return make_disk(tmp_path / "gpt.raw", 64, "gpt", parts, label_id="0CBE6E3A-45B6-4A8A-9C4E-6E7C2B0F3B11")


def check_against_sfdisk(table, disk, pristine=None) -> None:
    """`table` agrees with what sfdisk reads from the disk (or from its undamaged copy `pristine`)."""
    oracle = disk.table
    assert table.scheme == "gpt" and table.disk_id == oracle["id"].lower()
    names = sfdisk_type_names()
    ours = {p.number: p for p in table.partitions}
    assert sorted(ours) == sorted(int(p["node"][len(str(disk.path)):]) for p in oracle["partitions"])
    for entry in oracle["partitions"]:
        number = int(entry["node"][len(str(disk.path)):])
        part = ours[number]
        assert (part.start, part.size) == (entry["start"] * 512, entry["size"] * 512)
        assert part.type == entry["type"].lower() and part.uuid == entry["uuid"].lower()
        assert part.name == entry.get("name", "")
        assert part.kind == KIND_OF_SFDISK_NAME[names[part.type]]
        assert part.uuid == run("sfdisk", "--part-uuid", pristine or disk.path, number).strip().lower()


def test_gpt_read_as_sfdisk_reads_it_raw_compressed_and_through_an_overlay(tmp_path):
    disk = gpt_disk(tmp_path)
    check_against_sfdisk(read(disk.path, "raw"), disk)
    base = qcow2(disk.path, tmp_path / "base.qcow2")
    check_against_sfdisk(read(base), disk)
    check_against_sfdisk(read(overlay(base, tmp_path / "ov.qcow2"), base=base), disk)


def test_a_damaged_primary_gpt_is_read_from_the_backup(tmp_path):
    disk = gpt_disk(tmp_path)
    garbage(disk.path, 512 + 16, 4)  # the primary header's CRC32
    check_against_sfdisk(read(disk.path, "raw"), disk)
    assert sfdisk_json(disk.path)["partitions"] == disk.table["partitions"]  # sfdisk also reads the backup


def test_a_damaged_primary_entry_array_on_a_grown_disk_is_read_from_the_backup(tmp_path):
    disk = gpt_disk(tmp_path)
    pristine = tmp_path / "pristine.raw"
    pristine.write_bytes(disk.path.read_bytes())
    garbage(disk.path, 1024 + 128, 64)  # inside entry 2 of the primary array: its CRC no longer matches
    with open(disk.path, "r+b") as f:
        f.truncate(disk.path.stat().st_size + 32 * MiB)  # grown like an overlay: the backup is not at the end now
    check_against_sfdisk(read(disk.path, "raw"), disk, pristine)


def test_both_gpts_damaged_is_an_error(tmp_path):
    disk = gpt_disk(tmp_path)
    size = disk.path.stat().st_size
    garbage(disk.path, 512 + 16, 4)
    garbage(disk.path, size - 512 + 16, 4, seed="other")
    expect_error(disk.path, "no valid GPT", "header CRC32 mismatch", fmt="raw")


def test_a_gpt_partition_beyond_the_end_of_the_disk(tmp_path):
    disk = make_disk(tmp_path / "cut.raw", 64, "gpt", [Part(16), Part(32)])
    with open(disk.path, "r+b") as f:
        f.truncate(40 * MiB)  # partition 2 now runs past the end
    expect_error(disk.path, "GPT partition 2", "outside", fmt="raw")


def test_an_mbr_partition_beyond_the_end_of_the_disk(tmp_path):
    disk = make_disk(tmp_path / "cut.raw", 64, "dos", [Part(16), Part(32)])
    with open(disk.path, "r+b") as f:
        f.truncate(40 * MiB)
    expect_error(disk.path, "partition 2", "outside the disk", fmt="raw")


def test_a_huge_gpt_entry_count_is_refused(tmp_path):
    path = tmp_path / "huge.raw"
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
    run("sfdisk", "-q", path, input="label: gpt\ntable-length: 9000\n,8MiB,L\n")
    assert sfdisk_json(path)["table-length"] == "9000"
    expect_error(path, "9000 partition entries", fmt="raw")


def test_mbr_primary_extended_and_logical_partitions_as_sfdisk_reads_them(tmp_path):
    parts = [Part(8, "83"), Part(8, "ef"), Part(40, "5"), Part(8, "83", number=5), Part(8, "82", number=6),
             Part(8, "8e", number=7)]
    disk = make_disk(tmp_path / "dos.raw", 80, "dos", parts, label_id="0x1234abcd")
    for path, fmt, base in ((disk.path, "raw", None), (qcow2(disk.path, tmp_path / "dos.qcow2"), None, None)):
        table = read(path, fmt, base)
        assert table.scheme == "mbr" and table.disk_id == "1234abcd" == disk.table["id"][2:]
        ours = {p.number: p for p in table.partitions}
        assert sorted(ours) == [1, 2, 3, 5, 6, 7]
        for entry in disk.table["partitions"]:
            part = ours[int(entry["node"][len(str(disk.path)):])]
            assert (part.start, part.size) == (entry["start"] * 512, entry["size"] * 512)
            assert int(part.type, 16) == int(entry["type"], 16)
            assert part.uuid == f"1234abcd-{part.number:02x}"
        assert [ours[n].kind for n in (1, 2, 3, 5, 6, 7)] == ["linux-data", "esp", "extended", "linux-data", "swap",
                                                             "lvm"]


def test_an_extended_partition_chain_that_loops_is_refused(tmp_path):
    disk = make_disk(tmp_path / "loop.raw", 64, "dos", [Part(40, "5"), Part(8, number=5), Part(8, number=6)])
    ext_start = disk.partition(1)["start"]
    raw = disk.path.read_bytes()
    link_to_second = struct.unpack_from("<I", raw, ext_start * 512 + 446 + 16 + 8)[0]
    second = (ext_start + link_to_second) * 512
    with open(disk.path, "r+b") as f:  # the second EBR's link now names itself
        f.seek(second + 446 + 16)
        f.write(struct.pack("<B3xB3xII", 0, 0x05, link_to_second, 16))
    expect_error(disk.path, "loops", fmt="raw")


def test_a_whole_disk_file_system_has_no_table(tmp_path):
    fs = make_fs(tmp_path / "whole.raw", 16, {"etc": {}}, "9b3ad7e2-0c39-4c5e-9f6a-1a2b3c4d5e6f")
    table = read(fs, "raw")
    assert table.scheme == "none" and len(table.partitions) == 1
    whole = table.partitions[0]
    assert (whole.number, whole.start, whole.size, whole.kind) == (0, 0, 16 * MiB, "disk")


@pytest.mark.parametrize("fill", ["zeros", "garbage"])
def test_no_table_and_no_file_system(tmp_path, fill):
    path = tmp_path / "nothing.raw"
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
    if fill == "garbage":
        garbage(path, 0, 1 * MiB)
    expect_error(path, "no partition table", fmt="raw")


def test_a_tiny_image(tmp_path):
    path = tmp_path / "tiny.raw"
    path.write_bytes(b"\0" * 700)
    expect_error(path, "too small", fmt="raw")


def test_4k_sector_images_are_refused_with_a_reason(tmp_path):
    path = tmp_path / "4k.raw"
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
    run("fdisk", "-b", "4096", path, input="g\nn\n\n\n+8M\nw\n")  # sfdisk 2.38 has no --sector-size
    assert "Sector size (logical/physical): 4096 bytes" in run("fdisk", "-b", "4096", "-l", path)
    expect_error(path, "4096-byte sectors", fmt="raw")
