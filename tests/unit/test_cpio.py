"""The newc cpio writer/reader: round trips, alignment, determinism, and GNU cpio as an external oracle."""

import os
import shutil
import stat
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudkvm.boot.cpio import HEADER_LEN, NewcWriter, read_newc


def sample_writer() -> NewcWriter:
    w = NewcWriter()
    w.add_dir("/bin")
    w.add_dir("dev", mode=0o750, uid=1, gid=2, mtime=1234567890)
    w.add_dir("tmp", mode=0o1777)
    w.add_file("/bin/tool", b"\x7fELF" + bytes(range(256)) * 3, mode=0o755)
    w.add_file("bin/empty", b"")
    w.add_file("bin/odd", b"abc", uid=1000, gid=1000, mtime=42)
    w.add_symlink("bin/sh", "tool")
    w.add_chardev("/dev/console", 5, 1)
    w.add_chardev("dev/null", 1, 3, mode=0o666)
    w.add_file("init", b"#!/bin/sh\necho hi\n", mode=0o755)
    return w


def test_round_trip():
    entries = {e.name: e for e in read_newc(sample_writer().to_bytes())}
    assert list(entries) == ["bin", "dev", "tmp", "bin/tool", "bin/empty", "bin/odd", "bin/sh",
                             "dev/console", "dev/null", "init"]
    assert entries["bin"].is_dir and stat.S_IMODE(entries["bin"].mode) == 0o755 and entries["bin"].nlink == 2
    dev = entries["dev"]
    assert (stat.S_IMODE(dev.mode), dev.uid, dev.gid, dev.mtime) == (0o750, 1, 2, 1234567890)
    assert stat.S_IMODE(entries["tmp"].mode) == 0o1777
    assert entries["bin/tool"].is_file and entries["bin/tool"].data == b"\x7fELF" + bytes(range(256)) * 3
    assert stat.S_IMODE(entries["bin/tool"].mode) == 0o755
    assert entries["bin/empty"].data == b""
    odd = entries["bin/odd"]
    assert (odd.data, odd.uid, odd.gid, odd.mtime) == (b"abc", 1000, 1000, 42)
    assert entries["bin/sh"].is_symlink and entries["bin/sh"].data == b"tool"
    con = entries["dev/console"]
    assert con.is_chardev and (con.rdevmajor, con.rdevminor) == (5, 1) and stat.S_IMODE(con.mode) == 0o600
    null = entries["dev/null"]
    assert null.is_chardev and (null.rdevmajor, null.rdevminor) == (1, 3) and stat.S_IMODE(null.mode) == 0o666
    assert all(e.mtime == 0 for n, e in entries.items() if n not in ("dev", "bin/odd"))
    assert len({e.ino for e in entries.values()}) == len(entries)


def test_deterministic_and_golden_bytes():
    assert sample_writer().to_bytes() == sample_writer().to_bytes()
    w = NewcWriter()
    w.add_file("a", b"xy", mode=0o644)
    data = w.to_bytes()
    # header (110) + "a\0" = 112, already aligned; data "xy" + 2 pad bytes
    expected = (b"070701" + b"00000001" + b"000081A4" + b"00000000" * 2 + b"00000001" + b"00000000"
                + b"00000002" + b"00000000" * 4 + b"00000002" + b"00000000" + b"a\0" + b"xy\0\0")
    trailer = (b"070701" + b"00000000" * 4 + b"00000001" + b"00000000" * 6 + b"0000000B" + b"00000000"
               + b"TRAILER!!!\0" + b"\0" * 3)
    assert data == expected + trailer


def _walk_offsets(data: bytes) -> list[tuple[int, int, int]]:
    """(header offset, data offset, data end) of every record, trailer included."""
    out, off = [], 0
    while True:
        namesize = int(data[off + 94:off + 102], 16)
        filesize = int(data[off + 54:off + 62], 16)
        body = off + HEADER_LEN + namesize
        body += (-body) % 4
        out.append((off, body, body + filesize))
        name = data[off + HEADER_LEN:off + HEADER_LEN + namesize - 1]
        off = body + filesize + (-filesize) % 4
        if name == b"TRAILER!!!":
            return out


def test_alignment_for_all_name_and_data_lengths():
    w = NewcWriter()
    for n in range(1, 9):
        for size in range(0, 9):
            w.add_file("f" * n + f"-{size}", b"z" * size)
    data = w.to_bytes()
    assert len(data) % 4 == 0
    for head, body, end in _walk_offsets(data):
        assert head % 4 == 0 and body % 4 == 0
        assert data[end:end + (-end) % 4] == b"\0" * ((-end) % 4)
    assert len(read_newc(data)) == 8 * 9


def test_rejects_bad_input():
    w = NewcWriter()
    w.add_dir("a")
    with pytest.raises(ValueError, match="duplicate"):
        w.add_dir("/a")
    with pytest.raises(ValueError):
        w.add_file("", b"")
    with pytest.raises(ValueError, match="magic"):
        read_newc(b"070707" + b"0" * 200)
    with pytest.raises(ValueError, match="truncated"):
        read_newc(sample_writer().to_bytes()[:300])


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.text("abcxyz._-", min_size=1, max_size=20), st.binary(max_size=70), max_size=12),
       st.integers(0, 2**32 - 1))
def test_round_trip_property(files, mtime):
    w = NewcWriter()
    for name, blob in files.items():
        w.add_file(name, blob, mtime=mtime)
    data = w.to_bytes()
    assert {e.name: (e.data, e.mtime) for e in read_newc(data)} == {n: (b, mtime) for n, b in files.items()}
    assert data == w.to_bytes()


def _gnu_cpio() -> str:
    path = shutil.which("cpio") or ("/usr/bin/cpio" if os.path.exists("/usr/bin/cpio") else None)
    if path is None:
        print("GNU cpio not installed (apt-get install cpio): oracle tests skipped")
        pytest.skip("GNU cpio is not installed (apt-get install cpio)")
    return path


def test_gnu_cpio_lists_our_archive():
    cpio = _gnu_cpio()
    data = sample_writer().to_bytes()
    names = subprocess.run([cpio, "-t", "--quiet"], input=data, capture_output=True, check=True).stdout
    assert names.decode().splitlines() == [e.name for e in read_newc(data)]
    verbose = subprocess.run([cpio, "-tv", "--quiet"], input=data, capture_output=True, check=True).stdout.decode()
    console = next(line.split() for line in verbose.splitlines() if line.endswith("dev/console"))
    assert console[0] == "crw-------" and console[4:6] == ["5,", "1"]
    assert any(line.startswith("lrwxrwxrwx") and line.endswith("bin/sh -> tool") for line in verbose.splitlines())


def test_gnu_cpio_extracts_our_archive(tmp_path):
    cpio = _gnu_cpio()
    w = NewcWriter()  # no device nodes: mknod may be refused in containers
    w.add_dir("bin")
    w.add_file("bin/tool", bytes(range(256)) * 5 + b"tail", mode=0o755, mtime=1_000_000)
    w.add_file("bin/odd", b"abc")
    w.add_symlink("bin/sh", "tool")
    w.add_file("init", b"#!/bin/sh\n", mode=0o750)
    subprocess.run([cpio, "-idm", "--quiet", "--no-absolute-filenames"], input=w.to_bytes(), cwd=tmp_path,
                   capture_output=True, check=True)
    assert (tmp_path / "bin/tool").read_bytes() == bytes(range(256)) * 5 + b"tail"
    assert (tmp_path / "bin/odd").read_bytes() == b"abc"
    assert os.readlink(tmp_path / "bin/sh") == "tool"
    assert stat.S_IMODE((tmp_path / "init").stat().st_mode) == 0o750
    assert (tmp_path / "bin/tool").stat().st_mtime == 1_000_000


def test_read_newc_parses_gnu_cpio_output(tmp_path):
    cpio = _gnu_cpio()
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"hello world")
    (src / "g").write_bytes(b"")
    os.symlink("d/f", src / "l")
    listing = "\n".join(["d", "d/f", "g", "l"]) + "\n"
    data = subprocess.run([cpio, "-o", "-H", "newc", "--quiet"], input=listing.encode(), cwd=src,
                          capture_output=True, check=True).stdout
    entries = {e.name: e for e in read_newc(data)}
    assert set(entries) == {"d", "d/f", "g", "l"}
    assert entries["d"].is_dir and entries["d/f"].data == b"hello world" and entries["g"].data == b""
    assert entries["l"].is_symlink and entries["l"].data == b"d/f"
