"""The kernel, initrd and root file system found in disk images made like cloud images (sfdisk, mkfs.ext4 -d, dd,
qemu-img convert -c, qcow2 overlays): the file bytes are the ones put in, the root UUID is blkid's, partition
numbers and PARTUUIDs are sfdisk's; damaged or hostile images give one-line CloudkvmErrors naming the image and the
partition, never another exception."""
from __future__ import annotations

import random
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from cloudkvm.errors import CloudkvmError
from cloudkvm.images.bootfiles import BootFiles, PartitionView, cmdline_for, find_boot, version_key
from cloudkvm.storage import BackingPolicy, open_disk

from diskmaker import (MiB, Link, Part, Sparse, blkid_uuid, block_size, debugfs, garbage, inode_location, make_disk,
                       make_fs, need_tools, overlay, payload, qcow2, root_tree, run, write_changes)

ROOT_X86, ROOT_ARM = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709", "B921B045-1DF0-41C3-AF44-4C6F280D3FAE"
ESP, BIOS, XBOOTLDR = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "21686148-6449-6E6F-744E-656564454649", \
    "BC13C2FF-59E6-4262-A352-B275FD6F7172"
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
ROOT_UUID, BOOT_UUID = "6b0d9c1e-61c5-4d6e-8f62-3c1d0a7b9e21", "2f4e8a10-93b7-4c55-b0d2-7e6a1c3f5d88"
DEB_NEW, DEB_OLD = "6.1.0-28-cloud-amd64", "6.1.0-9-cloud-amd64"
KERNEL, INITRD = payload("kernel-28", 900_000), payload("initrd-28", 1_300_000)
OLD_KERNEL, OLD_INITRD = payload("kernel-9", 500_000), payload("initrd-9", 700_000)


@pytest.fixture(autouse=True)
def tools():
    need_tools()


def find(path, fmt=None, base=None, arch=None) -> BootFiles:
    policy = BackingPolicy(allowed=frozenset({str(base.resolve())})) if base else BackingPolicy()
    with open_disk(path, read_only=True, format=fmt, policy=policy) as disk:
        return find_boot(disk, str(path), arch=arch)


def expect_error(path, *words, fmt="raw"):
    with pytest.raises(CloudkvmError) as caught:
        find(path, fmt)
    message = caught.value.message
    assert message.startswith(f"{path}: ") and "\n" not in message and caught.value.hint, message
    for word in words:
        assert word in message, message
    return message


def debian_boot(with_new: bool = True) -> dict:
    boot = {f"vmlinuz-{DEB_OLD}": OLD_KERNEL, f"initrd.img-{DEB_OLD}": OLD_INITRD, f"config-{DEB_OLD}": b"CONFIG_X=y",
            f"System.map-{DEB_OLD}": b"ffffffff81000000 T _text"}
    if with_new:
        boot.update({f"vmlinuz-{DEB_NEW}": KERNEL, f"initrd.img-{DEB_NEW}": INITRD})
    return boot


def debian_root(tmp_path, boot=None, top=None, size_mib=48, options=("-b", "4096", "-I", "256"), **mkfs) -> Path:
    """Debian genericcloud's root file system (4 KiB blocks, 256-byte inodes as on a full-size disk)."""
    links = {"vmlinuz": Link(f"boot/vmlinuz-{DEB_NEW}"), "initrd.img": Link(f"boot/initrd.img-{DEB_NEW}"),
             "vmlinuz.old": Link(f"boot/vmlinuz-{DEB_OLD}")}
    return make_fs(tmp_path / "root.fs", size_mib, root_tree(debian_boot() if boot is None else boot,
                                                             links if top is None else top), ROOT_UUID,
                   options=options, **mkfs)


def gpt_with_root(tmp_path, fs, name="disk.raw", root_type=ROOT_X86):
    """Debian genericcloud's layout: p1 root, p14 BIOS boot, p15 ESP."""
    return make_disk(tmp_path / name, 64, "gpt", [Part(48, root_type, fs), Part(3, BIOS, number=14),
                                                  Part(8, ESP, number=15)])


def check_debian(found: BootFiles, disk) -> None:
    assert found.kernel == KERNEL and found.initrd == INITRD
    assert found.kernel_name == f"/boot/vmlinuz-{DEB_NEW}" and found.initrd_name == f"/boot/initrd.img-{DEB_NEW}"
    assert found.root_uuid == blkid_uuid(disk.path, disk.start(1)) == ROOT_UUID
    assert (found.root_partition, found.boot_partition) == (1, 1)
    assert found.root_partuuid == disk.partition(1)["uuid"].lower()


def test_debian_layout_through_a_two_level_qcow2_chain(tmp_path):
    """The base image holds only 6.1.0-9; the newer kernel was installed later and lives in the overlay."""
    old_fs = debian_root(tmp_path, boot=debian_boot(with_new=False), top={})
    base_disk = gpt_with_root(tmp_path, old_fs, "base.raw")
    new_fs = tmp_path / "new.fs"
    shutil.copyfile(old_fs, new_fs)
    for name, data in ((f"vmlinuz-{DEB_NEW}", KERNEL), (f"initrd.img-{DEB_NEW}", INITRD)):
        (tmp_path / name).write_bytes(data)
    debugfs(new_fs, "cd /boot", f"write {tmp_path / f'vmlinuz-{DEB_NEW}'} vmlinuz-{DEB_NEW}",
            f"write {tmp_path / f'initrd.img-{DEB_NEW}'} initrd.img-{DEB_NEW}", "cd /",
            f"symlink vmlinuz boot/vmlinuz-{DEB_NEW}", write=True)
    new_raw = tmp_path / "new.raw"
    shutil.copyfile(base_disk.path, new_raw)
    run("dd", f"if={new_fs}", f"of={new_raw}", "bs=1M", f"seek={base_disk.start(1)}", "oflag=seek_bytes",
        "conv=notrunc", "status=none")
    base = qcow2(base_disk.path, tmp_path / "base.qcow2")
    top = overlay(base, tmp_path / "top.qcow2")
    assert write_changes(top, base_disk.path, new_raw) > 10
    mapped = run("qemu-img", "map", "--output=json", top)
    assert '"depth": 0' in mapped and '"depth": 1' in mapped  # data in both the overlay and the base
    assert run("qemu-img", "compare", top, new_raw).startswith("Images are identical")
    check_debian(find(top, base=base), base_disk)
    old = find(base)
    assert old.kernel == OLD_KERNEL and old.initrd == OLD_INITRD and old.kernel_name == f"/boot/vmlinuz-{DEB_OLD}"


def test_debian_layout_raw_and_compressed(tmp_path):
    disk = gpt_with_root(tmp_path, debian_root(tmp_path))
    check_debian(find(disk.path, "raw"), disk)
    base = qcow2(disk.path, tmp_path / "base.qcow2")
    check_debian(find(overlay(base, tmp_path / "ov.qcow2"), base=base), disk)
    assert cmdline_for(find(base), "ttyS0", " quiet ") == f"root=UUID={ROOT_UUID} ro console=ttyS0 quiet"


@pytest.mark.parametrize("boot_type", [XBOOTLDR, LINUX])
def test_ubuntu_layout_separate_boot_partition(tmp_path, boot_type):
    """Ubuntu 24.04: p1 root (empty /boot), p14 BIOS boot, p15 ESP, p16 /boot ext4 labelled BOOT."""
    new, old = "6.8.0-45-generic", "6.8.0-31-generic"
    boot_tree = {f"vmlinuz-{new}": KERNEL, f"initrd.img-{new}": INITRD, f"vmlinuz-{old}": OLD_KERNEL,
                 f"initrd.img-{old}": OLD_INITRD, "vmlinuz": Link(f"vmlinuz-{new}"),
                 "initrd.img": Link(f"initrd.img-{new}"), "vmlinuz.old": Link(f"vmlinuz-{old}"),
                 "grub": {"grub.cfg": b"# grub"}}
    root_fs = make_fs(tmp_path / "root.fs", 24, root_tree({}), ROOT_UUID, label="cloudimg-rootfs")
    boot_fs = make_fs(tmp_path / "boot.fs", 16, boot_tree, BOOT_UUID, label="BOOT")
    disk = make_disk(tmp_path / "noble.raw", 64, "gpt", [
        Part(24, ROOT_X86, root_fs), Part(4, BIOS, number=14), Part(8, ESP, number=15),
        Part(16, boot_type, boot_fs, name="BOOT", number=16)])
    base = qcow2(disk.path, tmp_path / "noble.qcow2")
    found = find(overlay(base, tmp_path / "ov.qcow2"), base=base)
    assert found.kernel == KERNEL and found.initrd == INITRD
    assert (found.kernel_name, found.initrd_name) == (f"/boot/vmlinuz-{new}", f"/boot/initrd.img-{new}")
    assert (found.root_partition, found.boot_partition) == (1, 16)
    assert found.root_uuid == blkid_uuid(disk.path, disk.start(1)) == ROOT_UUID
    assert blkid_uuid(disk.path, disk.start(16)) == BOOT_UUID


def test_root_partition_type_of_the_vm_architecture_wins(tmp_path):
    arm_uuid = "0a1b2c3d-4e5f-4061-8283-a4b5c6d7e8f9"
    x86_fs = debian_root(tmp_path)
    arm_fs = make_fs(tmp_path / "arm.fs", 8, root_tree({"vmlinuz-6.1.0-28-cloud-arm64": OLD_KERNEL}), arm_uuid)
    disk = make_disk(tmp_path / "two.raw", 64, "gpt", [Part(48, ROOT_X86, x86_fs), Part(8, ROOT_ARM, arm_fs)])
    arm = find(disk.path, "raw", arch="aarch64")
    assert (arm.root_partition, arm.root_uuid, arm.kernel) == (2, blkid_uuid(disk.path, disk.start(2)), OLD_KERNEL)
    x86 = find(disk.path, "raw", arch="x86_64")
    assert (x86.root_partition, x86.root_uuid, x86.kernel) == (1, ROOT_UUID, KERNEL)


def test_mbr_single_partition_and_a_kernel_without_initrd(tmp_path):
    fs = debian_root(tmp_path, boot={f"vmlinuz-{DEB_NEW}": KERNEL}, top={})
    disk = make_disk(tmp_path / "mbr.raw", 64, "dos", [Part(48, "83", fs)], label_id="0x5eed1234")
    found = find(qcow2(disk.path, tmp_path / "mbr.qcow2"))
    assert found.kernel == KERNEL and found.initrd is None and found.initrd_name is None
    assert found.root_partition == 1 and found.root_uuid == blkid_uuid(disk.path, disk.start(1))
    partuuid = run("blkid", "-p", "-o", "value", "-s", "PTUUID", disk.path).strip()  # the disk id, as PARTUUID's
    assert found.root_partuuid == f"{partuuid}-01"
    assert cmdline_for(found, "ttyAMA0", "") == f"root=PARTUUID={partuuid}-01 rootwait ro console=ttyAMA0"


def test_whole_disk_ext4(tmp_path):
    fs = debian_root(tmp_path)
    found = find(qcow2(fs, tmp_path / "whole.qcow2"))
    assert found.kernel == KERNEL and found.initrd == INITRD and found.notes == ()
    assert (found.root_partition, found.boot_partition) == (0, 0)
    assert found.root_uuid == blkid_uuid(fs) == ROOT_UUID
    assert cmdline_for(replace(found, initrd=None), "ttyS0") == "root=/dev/vda rootwait ro console=ttyS0"


def test_classic_layout_with_absolute_symlinks_and_a_journal_left_to_replay(tmp_path):
    """No merged /usr (/sbin/init -> /lib/systemd/systemd, absolute) and the needs_recovery flag a guest leaves
    when it is killed: the files are read as they lie, with a note saying so."""
    tree = root_tree(debian_boot(), {"vmlinuz": Link(f"/boot/vmlinuz-{DEB_NEW}")}, merged_usr=False)
    fs = make_fs(tmp_path / "classic.fs", 48, tree, ROOT_UUID, options=("-b", "4096"))
    debugfs(fs, "feature needs_recovery", write=True)
    assert "needs_recovery" in run("dumpe2fs", "-h", fs)
    found = find(fs, "raw")
    assert found.kernel == KERNEL and found.initrd == INITRD
    assert len(found.notes) == 1 and "journal is not replayed" in found.notes[0]


@pytest.mark.parametrize("fstype, options", [
    ("ext2", ("-b", "1024")),  # block maps with single and double indirect blocks
    ("ext3", ("-b", "2048")),
    ("ext4", ("-b", "1024")),
    ("ext4", ("-O", "^64bit")),
    ("ext4", ("-O", "^64bit,^extent,^flex_bg", "-b", "4096")),  # ext4 with block maps
    ("ext4", ("-O", "meta_bg,^resize_inode", "-b", "1024", "-g", "1024")),  # descriptors in META_BG places
    ("ext4", ("-b", "65536")),
    ("ext4", ("-I", "128", "-O", "^metadata_csum,^dir_nlink,^extra_isize")),
])
def test_file_system_variants(tmp_path, fstype, options):
    boot = debian_boot()
    boot.update({f"notes-{i:03d}-with-a-rather-long-name-to-fill-blocks": b"x" for i in range(300)})
    fs = debian_root(tmp_path, boot=boot, fstype=fstype, options=options)
    found = find(fs, "raw")
    assert found.kernel == KERNEL and found.initrd == INITRD
    assert found.kernel_name == f"/boot/vmlinuz-{DEB_NEW}" and found.root_uuid == blkid_uuid(fs)
    assert run("blkid", "-p", "-o", "value", "-s", "TYPE", fs).strip() == fstype


def test_a_fragmented_kernel_with_a_two_level_extent_tree(tmp_path):
    """Free space in one-block holes: the kernel debugfs writes there needs hundreds of extents (depth 2)."""
    fill = {f"f{i:04d}": b"f" * 1000 for i in range(1800)}
    fs = debian_root(tmp_path, boot={}, top={"fill": fill}, size_mib=8, options=("-b", "1024", "-N", "2048"))
    debugfs(fs, *(f"rm /fill/f{i:04d}" for i in range(0, 1800, 2)), write=True)
    (tmp_path / "k").write_bytes(KERNEL)
    debugfs(fs, "cd /boot", f"write {tmp_path / 'k'} vmlinuz-{DEB_NEW}", write=True)
    extents = debugfs(fs, f"ex /boot/vmlinuz-{DEB_NEW}")
    assert re.search(r"^\s*2/\s*2", extents, re.M), extents  # debugfs shows a leaf at level 2 of 2
    found = find(fs, "raw")
    assert found.kernel == KERNEL and found.initrd is None


@pytest.mark.parametrize("fstype, far", [("ext4", 3 * MiB), ("ext2", 3 * MiB), ("ext2", 70 * MiB)])
def test_sparse_files_read_their_holes_as_zeros(tmp_path, fstype, far):
    """Holes in extents and in block maps; with 1 KiB blocks, data 70 MiB in is behind a triple indirect block."""
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.write(INITRD[:100_000])
        f.seek(far)
        f.write(INITRD[100_000:200_000])
        f.truncate(far + 2 * MiB)  # a hole at the end too
    expected = sparse.read_bytes()
    fs = debian_root(tmp_path, boot={f"vmlinuz-{DEB_NEW}": KERNEL}, top={}, fstype=fstype,
                     options=("-b", "1024"))
    debugfs(fs, "cd /boot", f"write {sparse} initrd.img-{DEB_NEW}", write=True)
    assert "Blockcount: " in (stat := debugfs(fs, f"stat /boot/initrd.img-{DEB_NEW}"))
    blocks = int(re.search(r"Blockcount: (\d+)", stat)[1])
    assert blocks * 512 < 1 * MiB  # the holes are holes in the file system too
    if far > 64 * MiB:
        assert "(TIND):" in stat
    found = find(fs, "raw")
    assert found.initrd == expected


def test_hash_tree_directories_are_read(tmp_path):
    boot = debian_boot()
    boot.update({f"module-{i:04d}.ko": b"m" for i in range(2000)})
    fs = debian_root(tmp_path, boot=boot)
    fixed = subprocess.run(["e2fsck", "-fyD", str(fs)], capture_output=True, text=True)  # -D: build the indexes
    assert fixed.returncode in (0, 1), fixed.stdout + fixed.stderr  # 1: "file system modified"
    assert "Root node dump" in debugfs(fs, "htree_dump /boot")
    found = find(fs, "raw")
    assert found.kernel == KERNEL and found.initrd == INITRD


def test_versions_compare_numbers_as_numbers():
    versions = ["6.1.0-9-cloud-amd64", "6.1.0-28-cloud-amd64", "6.1.0-10-cloud-amd64", "5.19.0-1-amd64",
                "6.10.0-1-generic", "6.1.0-28-cloud-amd64+1"]
    assert sorted(versions, key=version_key) == ["5.19.0-1-amd64", "6.1.0-9-cloud-amd64", "6.1.0-10-cloud-amd64",
                                                  "6.1.0-28-cloud-amd64", "6.1.0-28-cloud-amd64+1",
                                                  "6.10.0-1-generic"]
    assert version_key("0-rescue-5d2c") < version_key("6.1.0-9")


def test_symlinks_that_leave_the_file_system_are_not_followed(tmp_path):
    """A guest's image names host files: /boot/vmlinuz-9.9 -> /../../../etc/passwd must stay inside the image."""
    boot = debian_boot()
    boot.update({"vmlinuz-9.9-evil": Link("/../../../../etc/passwd"), "vmlinuz-9.8-evil": Link("../../../etc"),
                 "vmlinuz": Link("/proc/self/environ")})
    fs = debian_root(tmp_path, boot=boot, top={"etc": {"passwd": b"root:x:0:0::/root:/bin/sh\n"}})
    found = find(fs, "raw")
    assert found.kernel == KERNEL and found.kernel_name == f"/boot/vmlinuz-{DEB_NEW}"


def test_the_real_debian_cloud_kernel(tmp_path):
    cached = sorted(Path.home().glob(".cache/cloudkvm/debian/*-cloud-amd64/vmlinuz"))
    if not cached:
        pytest.skip("no Debian cloud kernel cached by an earlier `cloudkvm` run")
    real = cached[-1].read_bytes()
    version = cached[-1].parent.name
    fs = debian_root(tmp_path, boot={f"vmlinuz-{version}": real, f"vmlinuz-{DEB_OLD}": OLD_KERNEL},
                     top={"vmlinuz": Link(f"boot/vmlinuz-{version}")})
    found = find(qcow2(gpt_with_root(tmp_path, fs).path, tmp_path / "real.qcow2"))
    assert found.kernel == real and found.kernel[0x202:0x206] == b"HdrS"  # the bzImage setup header's magic
    assert found.kernel_name == f"/boot/vmlinuz-{version}" and found.initrd is None


def test_a_real_cloud_image_built_earlier(tmp_path):
    """The mmdebstrap-built Debian image another test caches (issue 13's "a real image to test with"), checked
    against the kernel and initrd its builder keeps beside it and the UUID it gave mkfs."""
    import json
    built = sorted(Path.home().glob(".cache/cloudkvm/cloudimages/*/disk.qcow2"))
    if not built:
        pytest.skip("no cloud image built by an earlier test run in ~/.cache/cloudkvm/cloudimages")
    folder = built[-1].parent
    facts = json.loads((folder / "image.json").read_text())
    found = find(built[-1])
    assert found.kernel_name == f"/boot/vmlinuz-{facts['kernel_version']}"
    assert found.kernel == (folder / "vmlinuz").read_bytes() and found.initrd == (folder / "initrd.img").read_bytes()
    assert found.root_uuid == facts["root_uuid"] and found.root_partition == 1


# ---- broken and hostile images ---------------------------------------------------------------------------------


def test_no_kernel(tmp_path):
    disk = gpt_with_root(tmp_path, debian_root(tmp_path, boot={"grub": {}}, top={}))
    expect_error(disk.path, "no vmlinuz-* or vmlinux-* kernel", "partition 1")


def test_no_root_file_system(tmp_path):
    fs = make_fs(tmp_path / "data.fs", 16, {"vmlinuz-6.1.0-1": KERNEL}, BOOT_UUID)
    disk = make_disk(tmp_path / "noroot.raw", 32, "gpt", [Part(16, LINUX, fs)])
    expect_error(disk.path, "no root file system", "partitions 1")


def test_no_file_system_at_all(tmp_path):
    disk = make_disk(tmp_path / "nofs.raw", 32, "gpt", [Part(8, ESP), Part(8, LINUX)])
    garbage(disk.path, disk.start(2), 1 * MiB)
    expect_error(disk.path, "no ext2/3/4 file system")


@pytest.mark.parametrize("where", ["boot/vmlinuz", "vmlinuz"])
def test_a_vmlinuz_symlink_loop(tmp_path, where):
    boot = debian_boot()
    top = {}
    if where == "boot/vmlinuz":
        boot.update({"vmlinuz": Link("vmlinuz.a"), "vmlinuz.a": Link("vmlinuz.b"), "vmlinuz.b": Link("vmlinuz")})
    else:
        top = {"vmlinuz": Link("vmlinuz")}
    disk = gpt_with_root(tmp_path, debian_root(tmp_path, boot=boot, top=top))
    expect_error(disk.path, "partition 1", "symbolic links (a loop?)")


def test_a_kernel_too_large_is_refused_before_it_is_read(tmp_path):
    boot = debian_boot()
    boot[f"vmlinuz-{DEB_NEW}"] = Sparse(600 * MiB)
    disk = gpt_with_root(tmp_path, debian_root(tmp_path, boot=boot))
    expect_error(disk.path, "partition 1", f"kernel /boot/vmlinuz-{DEB_NEW}", "512 MiB")


def test_an_initrd_too_large_is_refused_before_it_is_read(tmp_path):
    boot = debian_boot()
    boot[f"initrd.img-{DEB_NEW}"] = Sparse((2 << 30) + 4096)
    disk = gpt_with_root(tmp_path, debian_root(tmp_path, boot=boot))
    expect_error(disk.path, "partition 1", f"initrd /boot/initrd.img-{DEB_NEW}", "2048 MiB")


def test_too_many_kernels_in_one_folder(tmp_path):
    boot = debian_boot()
    boot.update({f"vmlinuz-5.{i}.0-1-amd64": b"k" for i in range(300)})
    expect_error(debian_root(tmp_path, boot=boot), "the whole-disk file system", "more than 256 kernels in /boot")


def test_too_many_file_systems_on_one_disk(tmp_path):
    tiny = make_fs(tmp_path / "tiny.fs", 1, {}, BOOT_UUID, fstype="ext2")
    disk = make_disk(tmp_path / "many.raw", 48, "gpt", [Part(1, LINUX, tiny) for _ in range(40)])
    expect_error(disk.path, "more than 32 ext2/3/4 file systems")


def test_inline_data_directories_are_refused_plainly(tmp_path):
    fs = debian_root(tmp_path, options=("-O", "inline_data"))
    expect_error(fs, "the whole-disk file system", "inline")


def test_a_damaged_superblock(tmp_path):
    disk = gpt_with_root(tmp_path, debian_root(tmp_path))
    garbage(disk.path, disk.start(1) + 1024, 0x38)  # everything before the magic
    expect_error(disk.path, "partition 1")


def test_a_damaged_inode_table(tmp_path):
    fs = debian_root(tmp_path)
    disk = gpt_with_root(tmp_path, fs)
    garbage(disk.path, disk.start(1) + inode_location(fs, "<2>"), 256)  # the root folder's inode
    expect_error(disk.path, "partition 1: ", "inode 2")


def test_a_damaged_kernel_inode(tmp_path):
    fs = debian_root(tmp_path)
    garbage(fs, inode_location(fs, f"/boot/vmlinuz-{DEB_NEW}") + 0x28, 60)  # i_block: the extent tree root
    expect_error(fs, "the whole-disk file system", "inode")


class MemoryDisk:
    """A raw image in memory, for mutation: the same Disk protocol the storage layer serves."""

    format, read_only = "raw", True

    def __init__(self, data: bytearray):
        self.data, self.size = data, len(data)

    def pread(self, length: int, offset: int) -> bytes:
        assert 0 <= offset and offset + length <= self.size
        return bytes(self.data[offset:offset + length])


def metadata_regions(fs: Path) -> list[tuple[int, int]]:
    """(offset, length) of what a boot-file search reads, located by debugfs and dumpe2fs: the superblock, the
    group descriptors, the inodes and folder blocks on the paths to init, the kernel and the initrd, and the
    kernel's indirect blocks (ext2)."""
    bs = block_size(fs)
    regions = [(1024, 1024), ((1 if bs == 1024 else 0) * bs + bs, bs)]
    paths = ["<2>", "/etc", "/boot", "/usr", "/usr/lib", "/usr/lib/systemd", "/usr/lib/systemd/systemd", "/sbin",
             "/usr/sbin", "/usr/sbin/init", f"/boot/vmlinuz-{DEB_NEW}", f"/boot/initrd.img-{DEB_NEW}", "/vmlinuz"]
    regions += [(inode_location(fs, path), 128) for path in paths]
    for folder in ("/", "/boot", "/usr", "/usr/lib", "/usr/sbin"):
        regions += [(int(block) * bs, bs) for block in debugfs(fs, f"blocks {folder}").split()[-1:]]
    stat = debugfs(fs, f"stat /boot/vmlinuz-{DEB_NEW}")
    regions += [(int(block) * bs, bs) for block in re.findall(r"\((?:IND|DIND|TIND)\):(\d+)", stat)]
    return regions


@pytest.mark.parametrize("fstype", ["ext4", "ext2"])
def test_random_damage_gives_results_or_one_line_errors_only(tmp_path, fstype):
    """Garbage sprayed over the metadata a search reads: each read ends in BootFiles or a CloudkvmError."""
    fs = debian_root(tmp_path, size_mib=6, options=("-b", "1024", "-N", "64"), fstype=fstype)
    regions = metadata_regions(fs)
    disk = make_disk(tmp_path / "small.raw", 8, "gpt", [Part(6, ROOT_X86, fs)])
    start = disk.start(1)
    targets = [(0, 34 * 512)] + [(start + offset, length) for offset, length in regions]
    image = bytearray(disk.path.read_bytes())
    rng = random.Random(fstype)
    outcomes = {"errors": 0, "results": 0}
    for _ in range(600):
        saved = []
        for _ in range(rng.randint(1, 4)):
            base, length = rng.choice(targets)
            at, size = base + rng.randrange(length), rng.choice((1, 2, 4, 8))
            saved.append((at, image[at:at + size]))
            image[at:at + size] = rng.randbytes(size)
        try:
            find_boot(MemoryDisk(image), "fuzzed.raw")
            outcomes["results"] += 1
        except CloudkvmError as err:
            assert err.message.startswith("fuzzed.raw: ") and "\n" not in err.message
            assert "cannot read the file system (" not in err.message  # the reader's own checks caught it
            outcomes["errors"] += 1
        for at, old in reversed(saved):
            image[at:at + len(old)] = old
    assert outcomes["errors"] > 100 and outcomes["results"] > 50, outcomes  # the damage reached what matters


def test_partition_view_is_a_bounded_seekable_file(tmp_path):
    data = bytes(range(256)) * 64
    view = PartitionView(MemoryDisk(data), 1000, 5000)
    assert view.read(10) == data[1000:1010] and view.tell() == 10
    assert view.seek(-4, 2) == 4996 and view.read(100) == data[5996:6000] and view.read(1) == b""
    assert view.pread(8, 4998) == data[5998:6000]
    with pytest.raises(ValueError):
        PartitionView(MemoryDisk(data), 1000, 20000)
