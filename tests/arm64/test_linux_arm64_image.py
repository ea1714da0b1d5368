"""boot/linux_arm64.py: the arm64 Image header (booting.rst §4) on Debian's arm64 cloud kernel and on broken
headers, gzip'd Images, and kernel/DTB/initrd placement judged by booting.rst's rules."""
from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from cloudkvm.boot import linux_arm64 as A
from cloudkvm.errors import CloudkvmError
from cloudkvm.guests import debian

MiB, GiB = 1 << 20, 1 << 30
RAM_BASE = 0x4000_0000


def _header(text_offset=0, image_size=30 * MiB, flags=0b1010, magic=b"ARM\x64", res5=0x40) -> bytearray:
    """A 64-byte header laid out as booting.rst §4 writes it (code0/1, text_offset, image_size, flags, res2-4,
    magic at 0x38, res5), all little-endian."""
    head = bytearray(64)
    head[0:8] = b"MZ\x00\x00\x00\x00\x00\x14"  # any code
    head[8:16] = text_offset.to_bytes(8, "little")
    head[16:24] = image_size.to_bytes(8, "little")
    head[24:32] = flags.to_bytes(8, "little")
    head[0x38:0x3C] = magic
    head[0x3C:0x40] = res5.to_bytes(4, "little")
    return head


@pytest.fixture(scope="session")
def debian_arm64_kernel() -> Path:
    missing = [t for t in ("apt-get", "apt-cache", "dpkg-deb", "dpkg") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} missing: Debian's arm64 kernel is fetched with apt")
    return debian.fetch_debian_kernel(arch="arm64")


# --- Debian's real kernel ----------------------------------------------------------------------------------------

def test_debians_arm64_cloud_kernel_is_a_plain_image(debian_arm64_kernel):
    image = A.load_image(debian_arm64_kernel)
    config = debian.read_kernel_config(debian_arm64_kernel)
    assert image.compression is None and image.data == debian_arm64_kernel.read_bytes()
    h = image.header
    assert h.magic == 0x644D5241 and image.data[0x38:0x3C] == b"ARM\x64"
    assert h.text_offset == 0  # TEXT_OFFSET is 0 since Linux 5.8 (arch/arm64/Makefile)
    assert config["CONFIG_ARM64_4K_PAGES"] == "y" and h.page_size == 4096
    assert config.get("CONFIG_CPU_BIG_ENDIAN", "n") == "n" and not h.big_endian
    assert h.place_anywhere  # head.S: __HEAD_FLAG_PHYS_BASE is 1
    assert image.effective_size == h.image_size > len(image.data)  # .bss is not in the file
    assert image.text_offset == 0


def test_image_size_matches_the_pe_header(debian_arm64_kernel):
    """The EFI stub's SizeOfImage is `_end - _text` (arch/arm64/kernel/efi-header.S), as image_size is
    (head.S `_kernel_size_le`): binutils reads the PE header independently of us."""
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump is None:
        pytest.skip("aarch64-linux-gnu-objdump is not installed (apt-get install binutils-aarch64-linux-gnu)")
    out = subprocess.run([objdump, "-p", str(debian_arm64_kernel)], capture_output=True, text=True, check=True).stdout
    size_of_image = next(int(line.split()[1], 16) for line in out.splitlines() if line.startswith("SizeOfImage"))
    assert A.load_image(debian_arm64_kernel).header.image_size == size_of_image


def test_file_agrees_on_endianness_and_page_size(debian_arm64_kernel):
    if shutil.which("file") is None:
        pytest.skip("file(1) is not installed")
    out = subprocess.run(["file", "-b", str(debian_arm64_kernel)], capture_output=True, text=True).stdout
    assert "ARM64 boot executable Image, little-endian, 4K pages" in out
    h = A.load_image(debian_arm64_kernel).header
    assert not h.big_endian and h.page_size == 4096


def test_a_gzipped_image_is_expanded_on_the_host(debian_arm64_kernel, tmp_path):
    plain = debian_arm64_kernel.read_bytes()
    packed = tmp_path / "Image.gz"
    packed.write_bytes(gzip.compress(plain, compresslevel=1))
    image = A.load_image(packed)
    assert image.compression == "gzip" and image.data == plain
    assert image.header == A.load_image(debian_arm64_kernel).header


# --- broken files: one line, naming the file and the fault ----------------------------------------------------------

def _refused(data: bytes, tmp_path: Path, words: str) -> CloudkvmError:
    path = tmp_path / "kernel"
    path.write_bytes(bytes(data))
    with pytest.raises(CloudkvmError, match=words) as info:
        A.load_image(path)
    assert str(path) in info.value.message and "\n" not in info.value.message
    return info.value


def test_a_good_synthetic_header_parses(tmp_path):
    path = tmp_path / "Image"
    path.write_bytes(bytes(_header(text_offset=0x80000, image_size=0x1234000, flags=0b0100)) + bytes(4096))
    h = A.load_image(path).header
    assert (h.text_offset, h.image_size, h.page_size, h.place_anywhere, h.res5) == (0x80000, 0x1234000, 16384,
                                                                                    False, 0x40)


def test_bad_magic(tmp_path):
    _refused(_header(magic=b"ARM\x65") + bytes(100), tmp_path, r"not an arm64 Linux Image: magic at 0x38")
    _refused(b"\x7fELF" + bytes(200), tmp_path, "magic")


def test_truncated(tmp_path):
    _refused(_header()[:63], tmp_path, "truncated: 63 bytes")
    _refused(b"", tmp_path, "truncated: 0 bytes")


def test_big_endian_kernel(tmp_path):
    error = _refused(_header(flags=0b1011) + bytes(100), tmp_path, "big-endian")
    assert "CPU_BIG_ENDIAN" in error.hint


@pytest.mark.parametrize("size", [1 << 40, 513 * MiB, 8])
def test_absurd_image_size(tmp_path, size):
    _refused(_header(image_size=size) + bytes(100), tmp_path, "absurd image_size")


def test_text_offset_past_the_2mib_base(tmp_path):
    _refused(_header(text_offset=2 * MiB) + bytes(100), tmp_path, "text_offset 0x200000")


def test_bad_gzip(tmp_path):
    good = gzip.compress(bytes(_header()) + bytes(8192))
    corrupt = bytearray(good)
    corrupt[12:20] = b"\xff" * 8
    _refused(corrupt, tmp_path, "damaged gzip stream")
    _refused(good[:-12], tmp_path, "truncated gzip stream")
    _refused(gzip.compress(b"hello, not a kernel" * 10), tmp_path, "magic at 0x38")


def test_gzip_expansion_is_capped():
    bomb = gzip.compress(bytes(8 * MiB))
    with pytest.raises(CloudkvmError, match="expands past 1 MiB"):
        A.gunzip_image(bomb, "bomb.gz", limit=1 * MiB)


def test_efi_zboot_is_named(tmp_path):
    head = bytearray(_header(magic=b"\0\0\0\0"))
    head[4:8] = b"zimg"
    head[0x18:0x1D] = b"zstd\0"
    error = _refused(head + bytes(100), tmp_path, r"EFI zboot image \(zstd-compressed\)")
    assert "Image" in error.hint


def test_unreadable_paths(tmp_path):
    with pytest.raises(CloudkvmError, match="cannot be read"):
        A.load_image(tmp_path / "missing")
    with pytest.raises(CloudkvmError, match="cannot be read"):
        A.load_image(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(CloudkvmError, match="cannot be read"):
        A.load_image(fifo)  # refused at once, not blocked waiting for a writer


# --- placement (booting.rst §2-§4) ---------------------------------------------------------------------------------

def _image(image_size=30 * MiB, text_offset=0, file_size=20 * MiB) -> A.Arm64Image:
    data = bytes(_header(text_offset=text_offset, image_size=image_size)) + bytes(file_size - 64)
    return A.parse_image(data, "Image")


def _check_rules(p: A.Arm64Placement, image: A.Arm64Image, initrd_size: int | None) -> None:
    ram_end = p.ram_base + p.ram_size
    needed = image.header.image_size or len(image.data)
    # §4: text_offset bytes from a 2 MiB aligned base in RAM, image_size bytes free from the image's start
    assert (p.kernel_addr - image.text_offset) % (2 * MiB) == 0 and p.kernel_addr - image.text_offset >= p.ram_base
    assert p.entry == p.kernel_addr and p.kernel_end - p.kernel_addr >= max(needed, len(image.data))
    # §3: the DTB on an 8-byte boundary, 2 MiB of room inside RAM, in no 2 MiB block the kernel or initrd uses
    assert p.dtb_addr % 8 == 0 and p.dtb_max_size == 2 * MiB and p.dtb_addr + 2 * MiB <= ram_end
    assert p.dtb_addr // (2 * MiB) > (p.kernel_end - 1) // (2 * MiB)
    if initrd_size is None:
        assert p.initrd_addr is None
        return
    # §2: the initrd in RAM, clear of kernel and DTB, in a 1 GiB aligned window of up to 32 GiB with the kernel
    assert p.initrd_size == initrd_size and p.initrd_end == p.initrd_addr + initrd_size
    assert p.kernel_end <= p.initrd_addr and p.initrd_end <= ram_end
    assert (p.initrd_end - 1) // (2 * MiB) < p.dtb_addr // (2 * MiB) or initrd_size == 0
    window = p.kernel_addr // GiB * GiB
    assert p.initrd_end <= window + 32 * GiB and p.kernel_end <= window + 32 * GiB
    assert p.initrd_addr % 4096 == 0


@pytest.mark.parametrize("ram", [64 * MiB, 256 * MiB, 1 * GiB, 3 * GiB + 6 * MiB, 40 * GiB])
@pytest.mark.parametrize("initrd", [None, 0, 12345, 20 * MiB])
def test_placement_follows_booting_rst(ram, initrd):
    image = _image()
    p = A.place(image, RAM_BASE, ram, initrd)
    _check_rules(p, image, initrd)


@given(ram=st.integers(16 * MiB, 64 * GiB).map(lambda v: v // 4096 * 4096),
       initrd=st.none() | st.integers(0, 2 * GiB),
       image_size=st.integers(64, 512 * MiB),
       text_offset=st.integers(0, 511).map(lambda v: v * 4096),
       file_size=st.integers(64, 40 * MiB))
@settings(max_examples=60)
def test_placement_either_obeys_the_rules_or_says_ram_is_too_small(ram, initrd, image_size, text_offset, file_size):
    data = bytes(_header(text_offset=text_offset, image_size=image_size)) + bytes(max(0, file_size - 64))
    image = A.parse_image(data, "Image")
    try:
        p = A.place(image, RAM_BASE, ram, initrd)
    except CloudkvmError as e:
        assert "\n" not in e.message
        room = RAM_BASE + ram - (RAM_BASE + text_offset + max(image_size, len(data)))
        # refusing is right only when kernel, initrd and the DTB's 2 MiB (plus alignment) cannot all fit
        assert room < (initrd or 0) + 2 * MiB + 2 * MiB + 4096
        return
    _check_rules(p, image, initrd)


def test_a_legacy_header_means_text_offset_0x80000():
    """booting.rst §4: image_size 0 (kernels before 3.17) means text_offset 0x80000, whatever the field says."""
    image = A.parse_image(bytes(_header(text_offset=0, image_size=0)) + bytes(8 * MiB), "old-Image")
    assert image.header.legacy and image.text_offset == 0x80000
    assert image.effective_size >= len(image.data) + 16 * MiB  # room for the .bss the header does not state
    p = A.place(image, RAM_BASE, 512 * MiB)
    assert p.kernel_addr == RAM_BASE + 0x80000
    _check_rules(p, image, None)


def test_too_little_ram_is_one_line_with_a_hint():
    with pytest.raises(CloudkvmError, match="too little") as info:
        A.place(_image(image_size=60 * MiB), RAM_BASE, 48 * MiB)
    assert "Image" in info.value.message and "MiB of memory" in info.value.hint
    with pytest.raises(CloudkvmError, match="initrd .* does not fit"):
        A.place(_image(), RAM_BASE, 64 * MiB, 40 * MiB)


def test_a_dtb_over_2_mib_is_refused():
    p = A.place(_image(), RAM_BASE, GiB)
    A.check_dtb(bytes(2 * MiB), p)
    with pytest.raises(CloudkvmError, match="at most 2097152 bytes"):
        A.check_dtb(bytes(2 * MiB + 1), p)
