"""Hostile qcow2 headers and tables, crafted by hand with struct.pack: each is refused with a CloudkvmError naming
the file and the problem, quickly and without allocating memory in proportion to the hostile numbers."""
import struct
import time
import tracemalloc

import pytest

from cloudkvm.errors import CloudkvmError
from cloudkvm.storage import BackingPolicy, CorruptImage, open_disk

CB = 16
CS = 1 << CB
COPIED = 1 << 63


def craft(path, *, version=3, magic=b"QFI\xfb", cluster_bits=CB, size=1 << 20, crypt=0, l1_size=None,
          l1_offset=3 * CS, rt_offset=CS, rt_clusters=1, nb_snapshots=0, snapshots_offset=0, incompat=0,
          compat=0, autoclear=0, refcount_order=4, header_length=112, compression_type=0, exts=b"",
          backing=None, backing_offset=None, backing_size=None, l1=None, l2=None, rt=None, truncate=None):
    """A minimal image: header | refcount table | refcount block | L1 | L2 (| data). Valid by default."""
    cs = 1 << cluster_bits if 9 <= cluster_bits <= 21 else CS
    if l1_size is None:
        per_l1 = (cs // 8) * cs
        l1_size = max(1, (size + per_l1 - 1) // per_l1)
    name = backing or b""
    if backing is not None and backing_offset is None:
        backing_offset = header_length + len(exts) + 8
    head = struct.pack(">4sIQIIQIIQQIIQ", magic, version, backing_offset or 0,
                       len(name) if backing_size is None else backing_size, cluster_bits, size, crypt, l1_size,
                       l1_offset, rt_offset, rt_clusters, nb_snapshots, snapshots_offset)
    if version >= 3:
        head += struct.pack(">QQQII", incompat, compat, autoclear, refcount_order, header_length)
        head += bytes([compression_type]) + bytes(7)
    cluster0 = bytearray(cs)
    cluster0[:len(head)] = head
    p = len(head) if version >= 3 else 72
    p = header_length if version >= 3 and header_length < cs else p
    cluster0[p:p + len(exts)] = exts[:cs - p]
    if backing is not None and backing_offset + len(name) <= cs:
        cluster0[backing_offset:backing_offset + len(name)] = name
    img = bytearray(cluster0) + bytearray(5 * cs)
    rt = [2 * cs] if rt is None else rt
    img[cs:cs + 8 * len(rt)] = struct.pack(f">{len(rt)}Q", *rt)
    struct.pack_into(">6H", img, 2 * cs, 1, 1, 1, 1, 1, 1)  # refcounts for clusters 0..5
    l1 = [4 * cs | COPIED] if l1 is None else l1
    img[3 * cs:3 * cs + 8 * len(l1)] = struct.pack(f">{len(l1)}Q", *l1)
    l2 = [5 * cs | COPIED] if l2 is None else l2
    img[4 * cs:4 * cs + 8 * len(l2)] = struct.pack(f">{len(l2)}Q", *l2)
    img[5 * cs:6 * cs] = b"D" * cs
    if truncate is not None:
        img = img[:truncate]
    path.write_bytes(bytes(img))
    return path


def ext(etype, data, length=None):
    n = len(data) if length is None else length
    return struct.pack(">II", etype, n) + data + bytes(-len(data) % 8)


def refused(path, match, **kw):
    """open_disk raises a CloudkvmError naming the file and matching `match`, fast and small."""
    tracemalloc.start()
    t = time.perf_counter()
    try:
        with pytest.raises(CloudkvmError) as e:
            open_disk(path, **kw).close()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.perf_counter() - t < 2
    assert peak < 16 << 20, f"peak allocation {peak} bytes"
    assert str(path) in e.value.message and e.value.hint
    assert "\n" not in e.value.message
    assert e.type is CloudkvmError or issubclass(e.type, CloudkvmError)
    import re
    assert re.search(match, e.value.message), e.value.message
    return e.value


def test_crafted_image_is_valid(qemu, tmp_path):
    img = craft(tmp_path / "ok.qcow2")
    qemu.check(img)
    with open_disk(img, read_only=True) as d:
        assert d.pread(CS + 10, 0) == b"D" * CS + bytes(10)
    assert qemu.to_raw(img, tmp_path)[:CS] == b"D" * CS


@pytest.mark.parametrize("bits", [0, 8, 22, 63, 0xFFFFFFFF])
def test_cluster_bits(tmp_path, bits):
    refused(craft(tmp_path / "x.qcow2", cluster_bits=bits), rf"cluster_bits {bits} outside 9\.\.21")


@pytest.mark.parametrize("case,kw,match", [
    ("huge l1_size", dict(l1_size=0xFFFFFFFF), r"l1_size 4294967295 .* exceeds"),
    ("l1 too small", dict(size=1 << 40, l1_size=1), r"l1_size 1 is too small"),
    ("huge virtual size", dict(size=1 << 63, l1_size=1), r"virtual size"),
    ("l1 misaligned", dict(l1_offset=3 * CS + 8), r"l1_table_offset 0x30008"),
    ("l1 at 0", dict(l1_offset=0), r"l1_table_offset 0x0"),
    ("l1 past EOF", dict(l1_offset=1 << 50), r"L1 table at 0x4000000000000 .* past the end"),
    ("refcount table past EOF", dict(rt_offset=1 << 40), r"refcount table at .* past the end"),
    ("refcount table misaligned", dict(rt_offset=CS + 512), r"refcount_table_offset 0x10200"),
    ("huge refcount table", dict(rt_clusters=0xFFFFFFFF), r"refcount_table_clusters 4294967295"),
    ("no refcount table", dict(rt_clusters=0), r"refcount_table_clusters 0"),
    ("tables overlap", dict(l1_offset=CS), r"overlap"),
    ("refcount_order 7", dict(refcount_order=7), r"refcount_order 7"),
    ("header_length odd", dict(header_length=108), r"header_length 108"),
    ("header_length huge", dict(header_length=1 << 30), r"header_length 1073741824"),
    ("backing name too long", dict(backing=b"b" * 1024), r"backing_file_size 1024 exceeds 1023"),
    ("backing name outside cluster", dict(backing=b"base", backing_offset=CS - 2), r"outside the header cluster"),
    ("backing name huge", dict(backing=b"x", backing_size=0xFFFFFFFF), r"backing_file_size 4294967295"),
    ("extension past cluster", dict(exts=ext(0x12345678, b"abc", length=0x7FFFFFF0)),
     r"extension 0x12345678 at offset 0x70: length 2147483632 runs past"),
    ("extension just past cluster", dict(exts=ext(0xE2792ACA, b"qcow2", length=CS - 112 - 7)),
     r"extension 0xe2792aca"),
    ("too many snapshots", dict(nb_snapshots=1 << 31, snapshots_offset=CS), r"nb_snapshots 2147483648"),
    ("snapshots misaligned", dict(nb_snapshots=1, snapshots_offset=100), r"snapshots_offset 0x64"),
    ("truncated", dict(truncate=50), r"truncated"),
    ("truncated v3", dict(truncate=90), r"truncated"),
])
def test_bad_header_fields(tmp_path, case, kw, match):
    refused(craft(tmp_path / "x.qcow2", **kw), match)


@pytest.mark.parametrize("case,kw,match", [
    ("version 1", dict(version=1), r"version 1 is not supported"),
    ("version 4", dict(version=4), r"version 4 is not supported"),
    ("encryption", dict(crypt=2), r"encryption \(crypt_method 2\)"),
    ("external data", dict(incompat=1 << 2), r"external data files"),
    ("unknown bit", dict(incompat=1 << 5), r"incompatible feature\(s\) not supported: bit 5"),
    ("unknown named bit", dict(incompat=1 << 40, exts=ext(0x6803F857, bytes([0, 40]) + b"frobnicate".ljust(46, b"\0"))),
     r"bit 40 \('frobnicate'\)"),
    ("compression bit without type", dict(incompat=1 << 3), r"compression_type 0 does not match"),
    ("compression type without bit", dict(compression_type=1), r"compression_type 1 does not match"),
    ("unknown compression", dict(incompat=1 << 3, compression_type=7), r"compression_type 7 is not supported"),
    ("extended L2 small clusters", dict(incompat=1 << 4, cluster_bits=12), r"extended L2 entries need"),
])
def test_unsupported_or_inconsistent_features(tmp_path, case, kw, match):
    refused(craft(tmp_path / "x.qcow2", **kw), match)


def test_not_qcow2_when_forced(tmp_path):
    p = tmp_path / "x.img"
    p.write_bytes(b"\0" * 4096)
    refused(p, r"not a qcow2 image", format="qcow2")
    refused(tmp_path / "missing.qcow2", r"no such disk image")


@pytest.mark.parametrize("case,kw,match", [
    ("L1 past EOF", dict(l1=[(1 << 40) | COPIED]), r"L1 entry 0 .*L2 table at 0x10000000000 is past the end"),
    ("L1 into refcount table", dict(l1=[CS | COPIED]), r"L1 entry 0 .*overlaps the header, L1 or refcount table"),
    ("L1 flags only", dict(l1=[COPIED]), r"L1 entry 0 .*no L2 table offset"),
    ("L1 misaligned", dict(l1=[4 * CS + 512]), r"L1 entry 0 .*not cluster aligned"),
    ("L1 reserved bits", dict(l1=[4 * CS | 1 << 60]), r"L1 entry 0 .*reserved bits"),
    ("L1 second entry", dict(size=1 << 31, l1=[4 * CS, 0, 9 << 40]), r"L1 entry 2 "),
    ("refcount block past EOF", dict(rt=[2 * CS, 7 << 40]), r"refcount table entry 1 .*past the end"),
    ("refcount block on L2 table", dict(rt=[2 * CS, 4 * CS]), r"refcount table entry 1 .*overlaps other metadata"),
    ("refcount block reserved", dict(rt=[2 * CS | 3]), r"refcount table entry 0 .*reserved bits"),
])
def test_bad_l1_or_refcount_table(tmp_path, case, kw, match):
    refused(craft(tmp_path / "x.qcow2", **kw), match)


@pytest.mark.parametrize("case,l2,match", [
    ("past EOF", [(1 << 44) | COPIED], r"host offset 0x100000000000 is past the end"),
    ("into L1", [3 * CS | COPIED], r"host offset 0x30000 points into metadata"),
    ("into refcount block", [0, 2 * CS], r"entry 1 .*points into metadata"),
    ("misaligned", [5 * CS + 4096 | COPIED], r"not cluster aligned"),
    ("reserved", [5 * CS | 1 << 57], r"reserved bits"),
    ("compressed past EOF", [(1 << 62) | (1 << 40)], r"compressed data at 0x10000000000 is past the end"),
])
def test_bad_l2_entries_fail_the_request(tmp_path, case, l2, match):
    img = craft(tmp_path / "x.qcow2", l2=l2)
    for read_only in (True, False):
        with open_disk(img, read_only=read_only) as d:
            with pytest.raises(CorruptImage, match=match) as e:
                d.pread(4096, 0)
            assert str(img) in e.value.message and "qemu-img check" in e.value.hint
            if not read_only:
                with pytest.raises(CorruptImage):
                    d.pwrite(b"x" * 4096, 0)
    assert img.read_bytes()[3 * CS:3 * CS + 8] == struct.pack(">Q", 4 * CS | COPIED)  # nothing written


def test_backing_file_is_the_image_itself(tmp_path):
    refused(craft(tmp_path / "self.qcow2", backing=b"self.qcow2"), r"backing file loop")
    refused(craft(tmp_path / "self2.qcow2", backing=str(tmp_path / "self2.qcow2").encode()), r"backing file loop",
            read_only=True, policy=BackingPolicy(trusted=True))  # absolute names need trust (test_backing_policy)


def test_backing_cycle(tmp_path):
    craft(tmp_path / "a.qcow2", backing=b"b.qcow2")
    craft(tmp_path / "b.qcow2", backing=b"sub/../a.qcow2")
    (tmp_path / "sub").mkdir()
    e = refused(tmp_path / "a.qcow2", r"backing file .*loop", read_only=True)
    assert "b.qcow2" in e.message


def test_missing_and_unsupported_backing(tmp_path):
    refused(craft(tmp_path / "m.qcow2", backing=b"nowhere.qcow2"), r"backing file 'nowhere.qcow2': .*no such disk")
    refused(craft(tmp_path / "n.qcow2", backing=b"nbd://host/x"), r"not a local file")
    (tmp_path / "base.img").write_bytes(bytes(4096))
    refused(craft(tmp_path / "v.qcow2", backing=b"base.img", exts=ext(0xE2792ACA, b"vmdk")), r"format 'vmdk'")
