"""Host-side initramfs expansion: compressed members decompressed, everything else passed through."""
import gzip
import lzma

import pytest

from cloudkvm.boot import initrd
from cloudkvm.boot.cpio import NewcWriter, read_newc


def archive(*files: tuple[str, bytes]) -> bytes:
    w = NewcWriter()
    for name, data in files:
        w.add_file(name, data, mode=0o100644)
    return w.to_bytes()


@pytest.mark.parametrize("compress", [gzip.compress, lzma.compress], ids=["gzip", "xz"])
def test_a_compressed_initramfs_expands_to_its_cpio(compress):
    inner = archive(("init", b"#!/bin/sh\n"), ("etc/x", b"y" * 5000))
    assert initrd.expand(compress(inner)) == inner


def test_an_early_uncompressed_archive_followed_by_a_compressed_one_keeps_both():
    early = archive(("kernel/x86/microcode/GenuineIntel.bin", b"\x01" * 100))
    main = archive(("init", b"#!/bin/sh\n"))
    out = initrd.expand(early + b"\0" * 8 + gzip.compress(main))
    names = [e.name for e in read_newc(out[:len(early)])] + [e.name for e in read_newc(out[len(early):])]
    assert "kernel/x86/microcode/GenuineIntel.bin" in names and "init" in names


@pytest.mark.parametrize("data", [b"\x00" * 64, b"not an initramfs at all", gzip.compress(b"not cpio inside"),
                                  gzip.compress(archive(("a", b"b")))[:40]],
                         ids=["zeros", "unknown", "gzip-of-garbage", "truncated-gzip"])
def test_anything_else_is_left_to_the_kernel(data):
    assert initrd.expand(data) is None


def test_expanded_initrd_is_cached_and_an_uncompressed_one_is_used_as_is(tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUDKVM_CACHE", str(tmp_path / "cache"))
    inner = archive(("init", b"#!/bin/sh\n"))
    compressed = gzip.compress(inner)
    assert initrd.expanded_initrd(compressed, "initrd.gz") == inner
    cached = list((tmp_path / "cache" / "initrd").iterdir())
    assert len(cached) == 1 and cached[0].read_bytes() == inner
    monkeypatch.setattr(initrd, "expand", lambda data: pytest.fail("expanded again despite the cache"))
    assert initrd.expanded_initrd(compressed, "initrd.gz") == inner
    assert initrd.expanded_initrd(inner, "initrd.cpio") is inner


def test_an_unwritable_cache_only_costs_the_caching(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("CLOUDKVM_CACHE", str(blocker / "cache"))
    inner = archive(("init", b"#!/bin/sh\n"))
    assert initrd.expanded_initrd(gzip.compress(inner), "initrd.gz") == inner
