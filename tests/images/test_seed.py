"""The cloud-init NoCloud seed ISO, read back by other readers: `isoinfo` (genisoimage) for the volume label and the
Rock Ridge, Joliet and ISO 9660 names and contents, `blkid` (how cloud-init finds a seed: LABEL=cidata), pycdlib
opened afresh, and the kernel's isofs by a loop mount where this kernel has isofs."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import pycdlib
import pytest

from cloudkvm.errors import CloudkvmError
from cloudkvm.images.seed import read_seed, write_seed

FILES = {
    "meta-data": b"instance-id: iid-vm1-0001\nlocal-hostname: vm1\n",
    "user-data": "#cloud-config\nhostname: vm1\nwrite_files:\n- content: 'h\u00e9llo \u2603'\n  path: /x\n".encode(),
    "network-config": b"version: 2\nethernets:\n  all:\n    match: {name: 'e*'}\n    dhcp4: true\n",
}


def tool(name: str, package: str) -> str:
    """The path of an oracle tool; its absence fails the test (scripts/install-deps --test installs it)."""
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: apt-get install {package} (scripts/install-deps --test)")
    return found


def isoinfo(*args: str) -> str:
    return subprocess.run([tool("isoinfo", "genisoimage"), *args], capture_output=True, check=True,
                          timeout=30).stdout.decode("utf-8", "replace")


def listed_names(listing: str) -> list[str]:
    """File names of an `isoinfo -l` listing of the root (the last column; . and .. left out)."""
    names = []
    for line in listing.splitlines():
        if line.startswith("-"):  # a file, not a directory
            names.append(line.split("]", 1)[1].strip())
    return sorted(names)


@pytest.fixture
def seed(tmp_path) -> Path:
    path = tmp_path / "seed.iso"
    assert write_seed(path, FILES) is True
    return path


def test_isoinfo_sees_the_cidata_label_joliet_and_rock_ridge(seed):
    info = isoinfo("-d", "-i", str(seed))
    assert "Volume id: cidata\n" in info
    assert "Joliet with UCS level 3 found" in info
    assert "Rock Ridge signatures version 1 found" in info


def test_blkid_finds_label_cidata_as_cloud_init_does(seed):
    out = subprocess.run([tool("blkid", "util-linux"), "-p", "-o", "export", str(seed)], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    assert "LABEL=cidata\n" in out and "TYPE=iso9660\n" in out


@pytest.mark.parametrize("flag", ["-R", "-J"])
def test_rock_ridge_and_joliet_names_are_exact_and_contents_identical(seed, flag):
    assert listed_names(isoinfo(flag, "-l", "-i", str(seed))) == sorted(FILES)
    for name, data in FILES.items():
        assert subprocess.run([tool("isoinfo", "genisoimage"), flag, "-i", str(seed), "-x", f"/{name}"],
                              capture_output=True, check=True, timeout=30).stdout == data


def test_plain_iso9660_names_are_upper_case_stand_ins(seed):
    assert listed_names(isoinfo("-l", "-i", str(seed))) == ["META_DATA.;1", "NETWORK_CONFIG.;1", "USER_DATA.;1"]


def test_rock_ridge_gives_read_only_regular_files(seed):
    modes = {line.split()[-1]: line.split()[0] for line in isoinfo("-R", "-l", "-i", str(seed)).splitlines()
             if line.startswith("-")}
    assert modes == {name: "-r--r--r--" for name in FILES}


def test_pycdlib_opened_afresh_reads_label_names_and_contents(seed):
    iso = pycdlib.PyCdlib()
    iso.open(str(seed))
    try:
        assert iso.pvd.volume_identifier.rstrip(b" ") == b"cidata"
        names = sorted(r.rock_ridge.name().decode() for r in iso.list_children(rr_path="/")
                       if r.is_file())
        assert names == sorted(FILES)
        joliet = sorted(r.file_identifier().decode("utf-16-be").removesuffix(";1")
                        for r in iso.list_children(joliet_path="/") if r.is_file())
        assert joliet == sorted(FILES)
        for name, data in FILES.items():
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
            assert out.getvalue() == data
    finally:
        iso.close()


def test_read_seed_returns_the_files(seed):
    assert read_seed(seed) == FILES


def test_seed_is_private_and_no_temp_file_is_left(seed):
    assert seed.stat().st_mode & 0o777 == 0o600
    assert os.listdir(seed.parent) == ["seed.iso"]


def test_only_the_files_given_are_written_vendor_data_included(tmp_path):
    path = tmp_path / "seed.iso"
    files = {"meta-data": b"instance-id: a\n", "user-data": b"#cloud-config\n", "vendor-data": b"#cloud-config\n"}
    write_seed(path, files)
    assert listed_names(isoinfo("-R", "-l", "-i", str(path))) == ["meta-data", "user-data", "vendor-data"]
    assert read_seed(path) == files


def test_an_unchanged_seed_is_left_byte_identical(seed):
    before, data = seed.stat(), seed.read_bytes()
    os.chmod(seed, 0o644)
    assert write_seed(seed, dict(FILES)) is False
    after = seed.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert seed.read_bytes() == data
    assert after.st_mode & 0o777 == 0o600  # the mode is still put right


def test_a_changed_seed_is_replaced(seed):
    changed = {**FILES, "user-data": b"#cloud-config\npackages: [jq]\n"}
    assert write_seed(seed, changed) is True
    assert read_seed(seed) == changed
    without_network = {k: v for k, v in FILES.items() if k != "network-config"}
    assert write_seed(seed, without_network) is True
    assert listed_names(isoinfo("-R", "-l", "-i", str(seed))) == ["meta-data", "user-data"]


def test_a_different_label_rewrites(seed):
    assert write_seed(seed, FILES, label="CIDATA") is True
    assert "Volume id: CIDATA\n" in isoinfo("-d", "-i", str(seed))


def test_a_symlink_at_the_seed_path_is_replaced_not_written_through(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep me")
    link = tmp_path / "seed.iso"
    link.symlink_to(target)
    assert write_seed(link, FILES) is True
    assert not link.is_symlink() and target.read_bytes() == b"keep me"
    assert read_seed(link) == FILES


@pytest.mark.parametrize("files, label, words", [
    ({"user-data": b""}, "cidata", "needs meta-data"),
    ({"meta-data": b""}, "cidata", "needs user-data"),
    ({"meta-data": b"", "user-data": b"", "../x": b""}, "cidata", "not a NoCloud seed file"),
    ({"meta-data": b"", "user-data": b""}, "a b", "seed label"),
    ({"meta-data": b"", "user-data": b""}, "x" * 17, "seed label"),
])
def test_programming_errors_are_refused(tmp_path, files, label, words):
    with pytest.raises(ValueError, match=words):
        write_seed(tmp_path / "seed.iso", files, label)
    assert not (tmp_path / "seed.iso").exists()


def test_read_seed_errors_are_one_line(tmp_path):
    junk = tmp_path / "junk.iso"
    junk.write_bytes(b"\0" * 40000)
    with pytest.raises(CloudkvmError, match=r"junk.iso: not a cloud-init seed ISO") as exc:
        read_seed(junk)
    assert "\n" not in str(exc.value)
    with pytest.raises(CloudkvmError, match=r"missing.iso: cannot read the cloud-init seed: No such file"):
        read_seed(tmp_path / "missing.iso")
    huge = tmp_path / "huge.iso"
    with open(huge, "wb") as f:
        f.truncate(65 << 20)  # sparse
    with pytest.raises(CloudkvmError, match=r"too large for a cloud-init seed"):
        read_seed(huge)


def test_read_seed_does_not_follow_a_symlink(seed, tmp_path):
    link = tmp_path / "link.iso"
    link.symlink_to(seed)
    with pytest.raises(CloudkvmError, match="cannot read the cloud-init seed"):
        read_seed(link)


def test_a_truncated_seed_is_an_error_and_is_rewritten(seed):
    seed.write_bytes(seed.read_bytes()[:20000])
    with pytest.raises(CloudkvmError, match="not a cloud-init seed ISO"):
        read_seed(seed)
    assert write_seed(seed, FILES) is True
    assert read_seed(seed) == FILES


# Linux mounting the seed is the x86_64 test host's guest doing it (tests/realkvm/test_cloud_image.py: cloud-init
# reads it as DataSourceNoCloud); this machine's kernel has no isofs.
