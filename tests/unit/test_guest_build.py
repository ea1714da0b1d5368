"""build_flat: assemble a tiny x86_64 source into a flat binary, cached by the hash of its inputs."""
import shutil
import struct
import subprocess

import pytest

from cloudkvm.errors import CloudkvmError
from cloudkvm.guests.build import build_flat

pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in ("gcc", "ld", "objcopy")),
                                reason="needs gcc and binutils")

HLT_LOOP = ".globl _start; _start: hlt; jmp _start\n"
HLT_LOOP_BYTES = b"\xf4\xeb\xfd"  # hlt; jmp rel8 -3


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    return d


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def no_toolchain(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"toolchain run although the binary is cached: {args[0] if args else kwargs}")
    monkeypatch.setattr(subprocess, "run", refuse)


def test_builds_the_assembled_instructions(src, cache):
    s = src / "tiny.S"
    s.write_text(HLT_LOOP)
    out = build_flat(s, cache=cache)
    assert out.parent == cache / "guests"
    assert out.name.startswith("tiny-") and out.suffix == ".bin"
    assert out.read_bytes() == HLT_LOOP_BYTES
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".build-")]  # no temp file left behind


def test_second_call_is_served_from_the_cache(src, cache, monkeypatch):
    s = src / "tiny.S"
    s.write_text(HLT_LOOP)
    first = build_flat(s, cache=cache)
    no_toolchain(monkeypatch)
    assert build_flat(s, cache=cache) == first
    assert first.read_bytes() == HLT_LOOP_BYTES


def test_changed_source_gives_a_new_binary(src, cache):
    s = src / "tiny.S"
    s.write_text(HLT_LOOP)
    first = build_flat(s, cache=cache)
    s.write_text(".globl _start; _start: nop; hlt\n")
    second = build_flat(s, cache=cache)
    assert second != first
    assert second.read_bytes() == b"\x90\xf4"
    assert first.read_bytes() == HLT_LOOP_BYTES  # the old one is untouched


def test_load_address_is_linked_in_and_part_of_the_cache_key(src, cache):
    s = src / "addr.S"
    s.write_text(".globl _start; _start: .quad _start; .quad here; here:\n")
    low = build_flat(s, cache=cache)
    high = build_flat(s, load_addr=0x200000, cache=cache)
    assert low != high
    assert struct.unpack("<2Q", low.read_bytes()) == (0x100000, 0x100010)
    assert struct.unpack("<2Q", high.read_bytes()) == (0x200000, 0x200010)


def test_include_files_are_found_and_hashed(src, cache):
    (src / "consts.inc").write_text("#define MAGIC 0x12345678\n")
    s = src / "inc.S"
    s.write_text('#include "consts.inc"\n.globl _start; _start: .long MAGIC\n')
    first = build_flat(s, cache=cache)
    assert first.read_bytes() == struct.pack("<I", 0x12345678)
    (src / "consts.inc").write_text("#define MAGIC 0x0BADF00D\n")
    second = build_flat(s, cache=cache)
    assert second != first
    assert second.read_bytes() == struct.pack("<I", 0x0BADF00D)


def test_extra_include_dirs(src, cache, tmp_path):
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "more.inc").write_text("#define VALUE 0x42\n")
    s = src / "x.S"
    s.write_text('#include "more.inc"\n.globl _start; _start: .byte VALUE\n')
    assert build_flat(s, include_dirs=[extra], cache=cache).read_bytes() == b"\x42"


def test_default_cache_follows_cloudkvm_cache(src, tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUDKVM_CACHE", str(tmp_path / "envcache"))
    s = src / "tiny.S"
    s.write_text(HLT_LOOP)
    out = build_flat(s)
    assert out.parent == tmp_path / "envcache" / "guests"
    assert out.read_bytes() == HLT_LOOP_BYTES


def test_syntax_error_names_the_file(src, cache):
    s = src / "broken.S"
    s.write_text(".globl _start\n_start: movq %rax, %%%nonsense\n")
    with pytest.raises(CloudkvmError) as exc:
        build_flat(s, cache=cache)
    assert "broken.S" in exc.value.message
    assert "failed" in exc.value.message
    assert exc.value.hint
    assert not list((cache / "guests").glob("*.bin"))


def test_link_error_is_a_user_error(src, cache):
    s = src / "undef.S"
    s.write_text(".globl _start; _start: call missing_symbol\n")
    with pytest.raises(CloudkvmError, match="undef.S"):
        build_flat(s, cache=cache)
    assert not list((cache / "guests").glob("*.bin"))


def test_a_failed_build_is_retried_not_cached(src, cache):
    s = src / "later.S"
    s.write_text("this is not assembly\n")
    with pytest.raises(CloudkvmError):
        build_flat(s, cache=cache)
    s.write_text(HLT_LOOP)
    assert build_flat(s, cache=cache).read_bytes() == HLT_LOOP_BYTES


def test_missing_tool_is_reported(src, cache, monkeypatch):
    s = src / "tiny.S"
    s.write_text(HLT_LOOP)
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "objcopy" else real_which(name))
    with pytest.raises(CloudkvmError) as exc:
        build_flat(s, cache=cache)
    assert "'objcopy'" in exc.value.message and "tiny.S" in exc.value.message
    assert "binutils" in exc.value.hint


def test_missing_source_raises(src, cache):
    with pytest.raises((FileNotFoundError, CloudkvmError)):
        build_flat(src / "nope.S", cache=cache)
