"""The Linux x86 boot protocol pieces: bzImage/vmlinux parsing, payload decompression, zero page, initrd placement.

Synthetic kernels are built here from the offsets in Documentation/x86/boot.rst (not from the module's own
tables); the real Debian cloud kernel (fetched with apt, cached under ~/.cache/cloudkvm) is checked as well.
"""

import gzip
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudkvm.boot import linux_x86
from cloudkvm.boot.linux_x86 import (
    E820_ACPI, E820_RAM, E820_RESERVED, KernelImage, SetupHeader, build_boot_params, decompress_payload,
    initrd_placement, load_elf_segments, parse_kernel, payload_format, vmlinux_cache,
)
from cloudkvm.errors import CloudkvmError
from kernels import EM_386, EM_AARCH64, EM_X86_64, MiB, compress, lz4_legacy, make_bzimage, make_elf, size_append

FORMATS = ["gzip", "bzip2", "lzma", "xz", "zstd", "lz4"]


@pytest.fixture(scope="module")
def elf() -> bytes:
    return make_elf()


# --- bzImage parsing -----------------------------------------------------------------------------------------

def test_parse_synthetic_bzimage(elf):
    payload = compress("gzip", elf)
    img = parse_kernel(make_bzimage(payload), "synthetic.bz")
    h = img.header
    assert img.kind == "bzimage"
    assert (h.version, h.setup_sects, h.xloadflags, h.kernel_alignment) == (0x020F, 4, 3, 0x200000)
    assert (h.relocatable_kernel, h.init_size, h.pref_address, h.cmdline_size) == (1, 0x800000, 0x1000000, 2047)
    assert (h.boot_flag, h.header, h.loadflags) == (0xAA55, 0x53726448, 1)
    assert img.compressed_payload == payload
    assert img.payload[:0x80] == b"\xcc" * 0x80
    assert img.load_address == 0x1000000 and img.entry == 0x1000200
    assert (img.kernel_alignment, img.init_size, img.pref_address, img.relocatable) == (0x200000, 0x800000,
                                                                                       0x1000000, True)
    assert img.kernel_release.startswith("6.1.0-synthetic")
    assert len(h.raw) == 0x26C - 0x1F1
    assert img.kernel_end == 0x1000000 + 0x800000


def test_setup_sects_zero_means_four(elf):
    img = parse_kernel(make_bzimage(compress("gzip", elf), setup_sects=0), "k")
    assert img.header.setup_sects == 0
    assert img.payload[:0x80] == b"\xcc" * 0x80  # protected-mode code found at (4+1)*512


def test_unaligned_pref_address_is_rounded_up_for_relocatable(elf):
    img = parse_kernel(make_bzimage(compress("gzip", elf), pref_address=0x1000001), "k")
    assert img.load_address == 0x1200000 and img.entry == 0x1200200


@pytest.mark.parametrize("mutate, expect", [
    (lambda d: b"", "is empty"),
    (lambda d: d[:0x100], "truncated"),
    (lambda d: d[:0x207], "truncated"),
    (lambda d: d[:0x230], "truncated"),
    (lambda d: d[:0x26B], "truncated"),
    (lambda d: d[:0x800], "truncated"),
    (lambda d: d[:0xA00 + 0x40], "truncated"),
    (lambda d: d[:-1], "truncated"),
    (lambda d: d[:0x1FE] + b"\x00\x00" + d[0x200:], "0xAA55"),
    (lambda d: d[:0x202] + b"NoPe" + d[0x206:], "HdrS"),
])
def test_bzimage_errors(elf, mutate, expect):
    data = make_bzimage(compress("gzip", elf))
    with pytest.raises(CloudkvmError) as err:
        parse_kernel(mutate(data), "/boot/broken")
    assert expect in err.value.message
    assert err.value.message.startswith("/boot/broken ")
    assert "\n" not in err.value.message and err.value.hint


def test_bzimage_protocol_too_old(elf):
    with pytest.raises(CloudkvmError, match=r"boot protocol 2\.05, too old"):
        parse_kernel(make_bzimage(b"", version=0x0205), "old")


@pytest.mark.parametrize("version, xloadflags", [(0x020B, 0x3), (0x0206, 0x3), (0x020F, 0x2), (0x020F, 0)])
def test_bzimage_without_64bit_entry(elf, version, xloadflags):
    with pytest.raises(CloudkvmError, match="no 64-bit entry") as err:
        parse_kernel(make_bzimage(compress("gzip", elf), version=version, xloadflags=xloadflags), "k32")
    assert err.value.message.startswith("k32 ")


def test_bzimage_short_header_for_its_version(elf):
    with pytest.raises(CloudkvmError, match="setup header ending at 0x250"):
        parse_kernel(make_bzimage(compress("gzip", elf), header_end=0x250), "k")


def test_bzimage_bad_alignment_and_payload_bounds(elf):
    with pytest.raises(CloudkvmError, match="not a power of two"):
        parse_kernel(make_bzimage(compress("gzip", elf), kernel_alignment=0x300000), "k")
    data = bytearray(make_bzimage(compress("gzip", elf)))
    struct.pack_into("<I", data, 0x24C, 1 << 30)  # payload_length far past the end
    with pytest.raises(CloudkvmError, match="payload .* runs past"):
        parse_kernel(bytes(data), "k")


# --- ELF parsing ---------------------------------------------------------------------------------------------

def test_parse_synthetic_elf(elf):
    img = parse_kernel(elf, "vmlinux")
    assert img.kind == "elf"
    assert img.entry == 0x1000000
    assert [(s.paddr, s.vaddr, s.memsz, s.flags) for s in img.segments] == [
        (0x1000000, 0xFFFFFFFF81000000, 0x1000, 5), (0x1200000, 0xFFFFFFFF81200000, 0x3000, 6)]
    assert img.pref_address == 0x1000000 and img.init_size == 0x203000 and img.kernel_alignment == 0x200000
    h = img.header
    assert h.synthetic and (h.boot_flag, h.header, h.version) == (0xAA55, 0x53726448, 0x020F)
    assert h.xloadflags & 1 and h.loadflags & 1


def test_elf_virtual_entry_is_translated():
    img = parse_kernel(make_elf(entry=0xFFFFFFFF81000010), "vmlinux")
    assert img.entry == 0x1000010


def test_load_elf_segments_copies_each_segment_and_zero_fills_to_memsz(elf):
    from cloudkvm.kvm.memory import GuestMemory

    img = parse_kernel(elf, "vmlinux")
    memory = GuestMemory([(0, 32 * MiB)])
    memory.fill(0, 32 * MiB, 0xEE)  # not fresh: the zero fill must be written, not assumed
    load_elf_segments(img, memory)
    first, second = memory.read(0x1000000, 0x1000), memory.read(0x1200000, 0x3000)
    assert first.startswith(b"\x90" * 0x300 + b"TEXT") and first[0x304:] == bytes(0x1000 - 0x304)
    assert second[:256] == b"DATA" * 64 and not any(second[256:])
    assert memory.read(0x1000000 - 16, 16) == b"\xee" * 16 and memory.read(0x1203000, 16) == b"\xee" * 16
    with pytest.raises(CloudkvmError, match="is a bzImage"):
        load_elf_segments(parse_kernel(make_bzimage(compress("gzip", elf)), "bz"), memory)


def test_aarch64_elf():
    with pytest.raises(CloudkvmError) as err:
        parse_kernel(make_elf(machine=EM_AARCH64), "Image.elf")
    assert err.value.message == "Image.elf is an ELF for aarch64, not x86_64"


def test_elf32():
    with pytest.raises(CloudkvmError, match="32-bit ELF for i386, not x86_64"):
        parse_kernel(make_elf(machine=EM_386, elf_class=1), "vmlinux32")
    with pytest.raises(CloudkvmError, match=r"32-bit ELF \(ELFCLASS32\)"):
        parse_kernel(make_elf(machine=EM_X86_64, elf_class=1), "vmlinux32")


@pytest.mark.parametrize("segments, entry, expect", [
    ([(0x1000, 0x1000, b"x" * 16, 16, 5)], None, "outside the sane range"),
    ([(0xFFFFFFFFFFF000, 0, b"x", 0x100000, 5)], None, "outside the sane range"),
    ([(0x1000000, 0, b"x" * 64, 0x2000, 5), (0x1001000, 0, b"y", 16, 5)], None, "overlapping"),
    ([(0x1000000, 0, b"x" * 64, 16, 5)], None, "filesz 64 > memsz 16"),
    ([(0x1000000, 0, b"x" * 64, 0x1000, 5)], 0x5000000, "entry point 0x5000000 outside"),
    ([(0x1000000, 0, b"x", 16, 5), (0x80000000, 0, b"y", 16, 5)], None, "spans"),
    ([], 0, "without PT_LOAD"),
])
def test_elf_segment_errors(segments, entry, expect):
    with pytest.raises(CloudkvmError, match=expect):
        parse_kernel(make_elf(segments, entry=entry), "vmlinux")


def test_elf_other_errors(elf):
    with pytest.raises(CloudkvmError, match="relocatable object"):
        parse_kernel(make_elf(e_type=1), "foo.o")
    big_endian = bytearray(elf)
    big_endian[5] = 2
    with pytest.raises(CloudkvmError, match="big-endian"):
        parse_kernel(bytes(big_endian), "vmlinux")


@pytest.mark.parametrize("cut", [1, 4, 19, 20, 63, 64, 100, 64 + 56 * 3 - 1, 64 + 56 * 3 + 10, -1])
def test_truncated_elf(elf, cut):
    with pytest.raises(CloudkvmError, match="truncated") as err:
        parse_kernel(elf[:cut], "vmlinux")
    assert err.value.message.startswith("vmlinux ")


# --- decompression -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_decompress_each_format(elf, fmt):
    payload = compress(fmt, elf)
    img = parse_kernel(make_bzimage(payload), f"bz-{fmt}")
    assert payload_format(img.compressed_payload) == fmt
    out = decompress_payload(img)
    assert out == elf
    assert parse_kernel(out, "inner").kind == "elf"


def test_decompress_relocs_appended(elf):
    """vmlinux.bin.all is the ELF followed by vmlinux.relocs: the result keeps both and still parses."""
    blob = elf + b"\x00" * 12 + struct.pack("<3I", 0x1000010, 0x1000020, 0)
    out = decompress_payload(parse_kernel(make_bzimage(compress("zstd", blob)), "k"))
    assert out == blob and parse_kernel(out, "k").kind == "elf"


def test_lz4_multi_chunk_and_concatenated_archives():
    big = make_elf([(0x1000000, 0, (b"kernel text " * 800_000)[:9 * MiB], 9 * MiB, 5)])
    payload = lz4_legacy(big) + size_append(big)
    assert payload.count(struct.pack("<I", 0x184C2102)) == 1
    assert decompress_payload(parse_kernel(make_bzimage(payload), "k")) == big
    # A second archive magic mid-stream (lz4 -l of concatenated inputs) is skipped.
    half = len(big) // 2
    cat = lz4_legacy(big[:half], chunk=half) + lz4_legacy(big[half:], chunk=half) + size_append(big)
    assert decompress_payload(parse_kernel(make_bzimage(cat), "k")) == big


def test_lz4_without_size_trailer(elf):
    assert decompress_payload(parse_kernel(make_bzimage(lz4_legacy(elf)), "k")) == elf


@pytest.mark.parametrize("fmt", FORMATS)
def test_decompress_truncated_or_corrupt(elf, fmt):
    payload = compress(fmt, elf * 4)
    for broken in (payload[:len(payload) // 2], payload[:8],
                   payload[:12] + bytes(b ^ 0x5A for b in payload[12:40]) + payload[40:]):
        with pytest.raises(CloudkvmError) as err:
            decompress_payload(parse_kernel(make_bzimage(broken), "/k/vmlinuz"))
        assert err.value.message.startswith("/k/vmlinuz: ")
        assert fmt in err.value.message


def test_wrong_size_trailer(elf):
    payload = compress("bzip2", elf)[:-4] + struct.pack("<I", len(elf) + 1)
    with pytest.raises(CloudkvmError, match="size trailer"):
        decompress_payload(parse_kernel(make_bzimage(payload), "k"))


def test_decompress_not_an_elf():
    with pytest.raises(CloudkvmError, match="not an ELF"):
        decompress_payload(parse_kernel(make_bzimage(compress("gzip", b"plain data" * 10)), "k"))


def test_decompress_unknown_lzo_and_empty(elf):
    with pytest.raises(CloudkvmError, match="unknown payload compression"):
        decompress_payload(parse_kernel(make_bzimage(b"ABCDEFGH" * 8), "k"))
    with pytest.raises(CloudkvmError, match="LZO") as err:
        decompress_payload(parse_kernel(make_bzimage(b"\x89LZO\x00\r\n\x1a\n" + bytes(64)), "k"))
    assert "CONFIG_KERNEL" in err.value.hint
    with pytest.raises(CloudkvmError, match="no payload"):
        decompress_payload(parse_kernel(make_bzimage(b""), "k"))
    with pytest.raises(CloudkvmError, match="already an uncompressed ELF"):
        decompress_payload(parse_kernel(elf, "vmlinux"))


def test_decompression_bomb_is_bounded():
    bomb = compress("zstd", b"\0" * (64 * MiB))
    with pytest.raises(CloudkvmError, match="expands past 16 MiB"):
        decompress_payload(parse_kernel(make_bzimage(bomb), "k"), limit=16 * MiB)


# --- vmlinux cache -------------------------------------------------------------------------------------------

def test_vmlinux_cache_synthetic(tmp_path, monkeypatch, elf):
    monkeypatch.setenv("CLOUDKVM_CACHE", str(tmp_path / "cache"))
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(make_bzimage(compress("xz", elf)))
    cached = vmlinux_cache(kernel)
    assert cached.parent == tmp_path / "cache" / "vmlinux" and cached.suffix == ".elf" and len(cached.stem) == 24
    assert cached.read_bytes() == elf
    assert parse_kernel(cached.read_bytes(), str(cached)).kind == "elf"
    assert not [p for p in cached.parent.iterdir() if p.name.startswith(".tmp")]
    stamp = cached.stat().st_mtime_ns
    monkeypatch.setattr(linux_x86, "decompress_payload", lambda *a: pytest.fail("cache not reused"))
    assert vmlinux_cache(str(kernel)) == cached and cached.stat().st_mtime_ns == stamp
    # An ELF is its own vmlinux.
    (tmp_path / "vmlinux").write_bytes(elf)
    assert vmlinux_cache(tmp_path / "vmlinux") == tmp_path / "vmlinux"
    with pytest.raises(CloudkvmError, match="cannot read kernel"):
        vmlinux_cache(tmp_path / "missing")


# --- zero page -----------------------------------------------------------------------------------------------

E820 = [(0, 0x9FC00, E820_RAM), (0x9FC00, 0x400, E820_RESERVED), (0xF0000, 0x10000, E820_RESERVED),
        (0x100000, 0x7FF00000, E820_RAM), (0xFEC00000, 0x1000, E820_RESERVED), (0x7FFE0000, 0x20000, E820_ACPI)]


def test_boot_params_from_bzimage(elf):
    data = make_bzimage(compress("gzip", elf))
    img = parse_kernel(data, "k")
    zp = build_boot_params(img.header, E820, 0x20000, 40, (0x7F000000, 0x123456), 0xE0000)
    assert len(zp) == 4096
    # setup header copied from 0x1F1 to its end (0x202 + jump offset), apart from the fields a loader writes
    expect = bytearray(data[0x1F1:0x26C])
    expect[0x210 - 0x1F1] = 0xFF
    struct.pack_into("<III", expect, 0x218 - 0x1F1, 0x7F000000, 0x123456, 0)
    struct.pack_into("<I", expect, 0x228 - 0x1F1, 0x20000)
    assert zp[0x1F1:0x26C] == bytes(expect)
    assert zp[0x210] == 0xFF
    assert struct.unpack_from("<I", zp, 0x228)[0] == 0x20000 and struct.unpack_from("<I", zp, 0xC8)[0] == 0
    assert struct.unpack_from("<II", zp, 0x218) == (0x7F000000, 0x123456)
    assert struct.unpack_from("<II", zp, 0xC0) == (0, 0)
    assert struct.unpack_from("<Q", zp, 0x70)[0] == 0xE0000
    assert zp[0x1E8] == len(E820) and zp[0x1EF] == 0
    table = [struct.unpack_from("<QQI", zp, 0x2D0 + 20 * i) for i in range(len(E820))]
    assert table == E820
    assert not any(zp[0x2D0 + 20 * len(E820):0xD00])
    assert not any(zp[:0x70]) and not any(zp[0x78:0xC0])


def test_boot_params_high_addresses_and_elf_header(elf):
    img = parse_kernel(elf, "vmlinux")
    zp = build_boot_params(img.header, E820, 0x1_2345_6000, 10, (0x2_0000_1000, 0x1_0000_0000), None)
    assert struct.unpack_from("<H", zp, 0x1FE)[0] == 0xAA55 and zp[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<H", zp, 0x206)[0] == 0x020F and zp[0x210] == 0xFF and zp[0x211] & 1
    assert struct.unpack_from("<I", zp, 0x228)[0] == 0x2345_6000 and struct.unpack_from("<I", zp, 0xC8)[0] == 1
    assert struct.unpack_from("<II", zp, 0x218) == (0x1000, 0) and struct.unpack_from("<II", zp, 0xC0) == (2, 1)
    assert struct.unpack_from("<Q", zp, 0x70)[0] == 0
    assert build_boot_params(img.header, [], 0x20000, 0, None, 0x1234)[0x218:0x220] == bytes(8)


def test_boot_params_limits(elf):
    hdr = parse_kernel(elf, "vmlinux").header
    build_boot_params(hdr, [(i * 0x2000, 0x1000, E820_RAM) for i in range(128)], 0x20000, 0, None, None)
    with pytest.raises(ValueError, match="129 e820 entries"):
        build_boot_params(hdr, [(i * 0x2000, 0x1000, E820_RAM) for i in range(129)], 0x20000, 0, None, None)
    with pytest.raises(CloudkvmError, match="command line is 3000 bytes"):
        build_boot_params(hdr, E820, 0x20000, 3000, None, None)
    low = parse_kernel(make_bzimage(compress("gzip", elf), xloadflags=0x1), "k").header
    with pytest.raises(ValueError, match="initrd_addr_max"):
        build_boot_params(low, E820, 0x20000, 10, (0x7FFFF000, 0x2000), None)
    with pytest.raises(ValueError, match="above 4 GiB"):
        build_boot_params(low, E820, 1 << 32, 10, None, None)


def test_synthetic_header_roundtrips():
    hdr = SetupHeader.for_elf(0x200000, 0x1000000, 0x2000000)
    assert SetupHeader.from_bytes(hdr.raw) == SetupHeader(**{**hdr.__dict__, "synthetic": False})


# --- initrd placement ----------------------------------------------------------------------------------------

def test_initrd_placement():
    assert initrd_placement(0x123456, 0x8000_0000, 0x7FFF_FFFF, 0x400_0000) == 0x7FED_C000
    assert initrd_placement(0x1000, 0x8000_0000, 0x7FFF_FFFF, 0x400_0000) == 0x7FFF_F000
    assert initrd_placement(MiB, 0xC000_0000, 0x37FF_FFFF, 0x400_0000) == 0x3800_0000 - MiB
    assert initrd_placement(MiB, 0x1_0000_0000, 0xFFFF_FFFF, 0x400_0000) == 0xFFF0_0000
    assert initrd_placement(MiB, 0x500_0000, 0x7FFF_FFFF, 0x400_0001) == 0x4F0_0000
    addr = initrd_placement(5 * MiB + 7, 0x3FFF_F000, 0x7FFF_FFFF, 0x200_0000)
    assert addr % 0x1000 == 0 and addr + 5 * MiB + 7 <= 0x3FFF_F000 and addr >= 0x200_0000


def test_initrd_does_not_fit():
    with pytest.raises(CloudkvmError, match=r"initrd of 64\.0 MiB does not fit below 0x4000000") as err:
        initrd_placement(64 * MiB, 0x400_0000, 0x7FFF_FFFF, 0x300_0000)
    assert err.value.hint == "give the VM more memory"
    with pytest.raises(CloudkvmError, match="does not fit"):
        initrd_placement(2 * MiB, 0x8000_0000, 0x7FFF_FFFF, 0x7FF0_0000)


# --- fuzzing: anything wrong is a CloudkvmError, never another exception --------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _parse_and_decompress(data: bytes) -> None:
    try:
        img = parse_kernel(data, "fuzz")
    except CloudkvmError:
        return
    assert isinstance(img, KernelImage)
    if img.kind == "bzimage":
        try:
            decompress_payload(img, limit=16 * MiB)
        except CloudkvmError:
            pass
    else:
        assert sum(s.filesz for s in img.segments) <= len(data)


@FUZZ
@given(st.binary(max_size=4096))
def test_fuzz_random_bytes(data):
    _parse_and_decompress(data)


@FUZZ
@given(st.sampled_from(["elf", *FORMATS]), st.data())
def test_fuzz_truncations(kind, data):
    elf = make_elf()
    blob = elf if kind == "elf" else make_bzimage(compress(kind, elf))
    cut = data.draw(st.integers(0, len(blob)))
    _parse_and_decompress(blob[:cut])


@FUZZ
@given(st.sampled_from(["elf", *FORMATS]), st.data())
def test_fuzz_mutations(kind, data):
    elf = make_elf()
    blob = bytearray(elf if kind == "elf" else make_bzimage(compress(kind, elf)))
    for _ in range(data.draw(st.integers(1, 8))):
        # bias towards the headers, where the parsing decisions are
        pos = data.draw(st.one_of(st.integers(0, min(len(blob), 0x300) - 1), st.integers(0, len(blob) - 1)))
        blob[pos] = data.draw(st.integers(0, 255))
    _parse_and_decompress(bytes(blob))


@FUZZ
@given(st.sampled_from([b"\x1f\x8b", b"BZh9", b"\x5d\x00\x00", b"\xfd7zXZ\x00", b"\x02\x21\x4c\x18",
                        b"\x28\xb5\x2f\xfd", b"\x7fELF"]), st.binary(max_size=512))
def test_fuzz_payload_after_magic(magic, tail):
    _parse_and_decompress(make_bzimage(magic + tail))


@FUZZ
@given(st.binary(min_size=0, max_size=600))
def test_fuzz_elf_headers(tail):
    _parse_and_decompress(b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HH", 2, EM_X86_64) + tail)


# --- the real Debian kernel -----------------------------------------------------------------------------------

def _need_apt() -> None:
    missing = [tool for tool in ("apt-get", "apt-cache", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: the Debian kernel is fetched with apt")


@pytest.fixture(scope="module")
def debian_kernel() -> Path:
    _need_apt()
    from cloudkvm.guests.debian import fetch_debian_kernel
    return fetch_debian_kernel()


@pytest.fixture(scope="module")
def debian_image(debian_kernel) -> KernelImage:
    return parse_kernel(debian_kernel.read_bytes(), str(debian_kernel))


def test_debian_kernel_header(debian_image):
    h = debian_image.header
    assert debian_image.kind == "bzimage"
    assert h.version >= 0x020F and h.xloadflags & 0x1 and h.xloadflags & 0x2
    assert h.relocatable_kernel == 1 and h.kernel_alignment == 0x200000 and h.pref_address == 0x1000000
    assert h.init_size >= 0x2000000 and h.cmdline_size == 2047 and h.loadflags & 1
    assert debian_image.entry == 0x1000200 and debian_image.kernel_release.startswith("6.1.")
    assert payload_format(debian_image.compressed_payload) == "lz4"
    print(f"\nDebian kernel: protocol {h.version_str}, setup_sects {h.setup_sects}, xloadflags {h.xloadflags:#x}, "
          f"kernel_alignment {h.kernel_alignment:#x}, init_size {h.init_size:#x}, pref_address {h.pref_address:#x}, "
          f"relocatable {h.relocatable_kernel}, payload lz4 {h.payload_length} bytes, "
          f"release {debian_image.kernel_release!r}")


def test_debian_kernel_decompresses(debian_image, record_property):
    start = time.perf_counter()
    vmlinux = decompress_payload(debian_image)
    elapsed = time.perf_counter() - start
    record_property("lz4_decompress_seconds", round(elapsed, 3))
    print(f"\nDebian kernel: lz4 payload of {debian_image.header.payload_length} bytes -> {len(vmlinux)} bytes "
          f"in {elapsed:.3f} s")
    assert len(vmlinux) == struct.unpack("<I", debian_image.compressed_payload[-4:])[0]
    assert vmlinux[:4] == b"\x7fELF" and vmlinux[4] == 2 and struct.unpack_from("<H", vmlinux, 18)[0] == EM_X86_64
    assert b"Linux version 6.1" in vmlinux
    img = parse_kernel(vmlinux, "debian vmlinux")
    first = min(img.segments, key=lambda s: s.paddr)
    assert first.paddr == 0x1000000 and first.flags & 1  # executable text at CONFIG_PHYSICAL_START
    assert img.entry == first.paddr  # startup_64 opens .text: e_entry is its physical address
    assert first.vaddr - 0xFFFFFFFF80000000 == first.paddr  # __START_KERNEL_map
    assert all(0x1000000 <= s.paddr and s.end <= 0x1000000 + debian_image.header.init_size for s in img.segments)
    assert img.init_size <= debian_image.header.init_size
    print("PT_LOAD: " + ", ".join(f"paddr {s.paddr:#x} vaddr {s.vaddr:#x} filesz {s.filesz:#x} "
                                  f"memsz {s.memsz:#x} flags {s.flags}" for s in img.segments))


def test_debian_vmlinux_cache_is_reused(debian_kernel, monkeypatch):
    first = vmlinux_cache(debian_kernel)
    stat = first.stat()
    img = parse_kernel(first.read_bytes(), str(first))
    assert img.kind == "elf" and img.entry == 0x1000000
    monkeypatch.setattr(linux_x86, "decompress_payload", lambda *a: pytest.fail("cache not reused"))
    start = time.perf_counter()
    second = vmlinux_cache(debian_kernel)
    print(f"\nvmlinux cache hit in {time.perf_counter() - start:.3f} s: {second}")
    assert second == first and second.stat().st_mtime_ns == stat.st_mtime_ns and second.stat().st_ino == stat.st_ino
    assert os.path.basename(second).endswith(".elf")
