"""Test disk images made by the real tools, the way cloud images are made: `truncate`, `sfdisk` (GPT and dos
labels), `mkfs.ext4 -d DIR` on a partition-sized file then `dd conv=notrunc` into place, `qemu-img convert` to
(compressed) qcow2 and `qemu-img create -b` overlays; plus the oracles read back from them (`sfdisk --json`,
`blkid -p`, `debugfs`). Nothing here uses cloudkvm's own readers."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

MiB = 1 << 20
TOOLS = {"sfdisk": "fdisk", "fdisk": "fdisk", "mkfs.ext4": "e2fsprogs", "debugfs": "e2fsprogs",
         "dumpe2fs": "e2fsprogs", "e2fsck": "e2fsprogs", "blkid": "util-linux", "qemu-img": "qemu-utils",
         "qemu-io": "qemu-utils"}


def need_tools() -> None:
    """Fail (not skip) when a tool is missing: these tests are the feature's only proof."""
    missing = [f"{tool} (Debian package {pkg})" for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        pytest.fail("missing tools: " + ", ".join(missing))


def run(*cmd, input: str | None = None) -> str:
    done = subprocess.run([str(c) for c in cmd], input=input, capture_output=True, text=True)
    if done.returncode:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def payload(name: str, size: int) -> bytes:
    """Deterministic stand-in bytes for a kernel or initrd."""
    return random.Random(name).randbytes(size)


@dataclass(frozen=True)
class Link:
    """A symbolic link in a tree given to `make_fs`."""

    target: str


@dataclass(frozen=True)
class Sparse:
    """A sparse file of `size` bytes (no data blocks) in a tree given to `make_fs`."""

    size: int


def write_tree(root: Path, tree: dict) -> None:
    """Make files (bytes), folders (dicts), symlinks (Link) and sparse files (Sparse) under root."""
    root.mkdir(parents=True, exist_ok=True)
    for name, item in tree.items():
        path = root / name
        if isinstance(item, dict):
            write_tree(path, item)
        elif isinstance(item, Link):
            os.symlink(item.target, path)
        elif isinstance(item, Sparse):
            with open(path, "wb") as f:
                f.truncate(item.size)
        else:
            path.write_bytes(item)


def root_tree(boot: dict | None = None, top: dict | None = None, merged_usr: bool = True) -> dict:
    """A Debian-like root file system: /etc, an init reached through symlinks (merged /usr, as bookworm and noble
    are), and /boot holding `boot`."""
    tree = {"etc": {"hostname": b"cloud\n", "fstab": b"# empty\n"}, "boot": dict(boot or {}),
            "usr": {"lib": {"systemd": {"systemd": b"\x7fELF systemd stand-in"}}, "sbin": {"init": Link(
                "../lib/systemd/systemd")}}, "var": {}, "home": {}}
    if merged_usr:
        tree.update({"sbin": Link("usr/sbin"), "lib": Link("usr/lib"), "bin": Link("usr/bin")})
        tree["usr"]["bin"] = {"sh": b"#!shell"}
    else:
        tree["sbin"] = {"init": Link("/lib/systemd/systemd")}
        tree["lib"] = {"systemd": {"systemd": b"\x7fELF systemd stand-in"}}
    tree.update(top or {})
    return tree


def make_fs(path: Path, size_mib: int, tree: dict | None, fs_uuid: str, *, label: str = "",
            fstype: str = "ext4", options: tuple = ()) -> Path:
    """A partition-sized file holding a file system made by mkfs with `tree` copied in (-d)."""
    with open(path, "wb") as f:
        f.truncate(size_mib * MiB)
    cmd = [f"mkfs.{fstype}", "-q", "-F", "-U", fs_uuid, *options]
    if label:
        cmd += ["-L", label]
    if tree is not None:
        src = path.with_suffix(".tree")
        shutil.rmtree(src, ignore_errors=True)
        write_tree(src, tree)
        cmd += ["-d", src]
    run(*cmd, path)
    return path


@dataclass
class Part:
    """A partition for `make_disk`: its size, sfdisk type, and the file system file (or None) dd'd into it."""

    size_mib: int
    type: str = "L"
    fs: Path | None = None
    name: str = ""
    uuid: str = ""
    number: int | None = None  # GPT only: its slot (Ubuntu's /boot is partition 16)


@dataclass
class Disk:
    path: Path
    table: dict = field(default_factory=dict)  # sfdisk --json's partitiontable

    def start(self, number: int) -> int:
        """Byte offset of partition `number`, from sfdisk."""
        return self.partition(number)["start"] * 512

    def partition(self, number: int) -> dict:
        """sfdisk's record of partition `number`."""
        for part in self.table["partitions"]:
            if int(part["node"][len(str(self.path)):]) == number:
                return part
        raise KeyError(number)


def make_disk(path: Path, size_mib: int, label: str, parts: list[Part], *, label_id: str = "") -> Disk:
    """A raw disk with a GPT or dos label written by sfdisk, each partition's file system dd'd into place at the
    offset sfdisk reports."""
    with open(path, "wb") as f:
        f.truncate(size_mib * MiB)
    script = [f"label: {label}"] + ([f"label-id: {label_id}"] if label_id else [])
    for part in parts:
        fields = [f"size={part.size_mib}MiB", f"type={part.type}"]
        if part.name:
            fields.append(f'name="{part.name}"')
        if part.uuid:
            fields.append(f"uuid={part.uuid}")
        line = ", ".join(fields)
        script.append(f"{path}{part.number}: {line}" if part.number else line)
    run("sfdisk", "-q", "--no-reread", "--no-tell-kernel", path, input="\n".join(script) + "\n")
    disk = Disk(path, sfdisk_json(path))
    numbers = [int(p["node"][len(str(path)):]) for p in disk.table["partitions"]]
    for part, number in zip(parts, numbers):
        if part.fs is not None:
            dd(part.fs, path, disk.start(number))
    return disk


def dd(src: Path, dest: Path, offset: int) -> None:
    run("dd", f"if={src}", f"of={dest}", "bs=64K", f"seek={offset}", "oflag=seek_bytes", "conv=notrunc,sparse",
        "status=none")


def garbage(dest: Path, offset: int, length: int, seed: str = "garbage") -> None:
    """Overwrite bytes of a file in place with random garbage (as `dd if=/dev/urandom conv=notrunc` would)."""
    with open(dest, "r+b") as f:
        f.seek(offset)
        f.write(random.Random(seed).randbytes(length))


def sfdisk_json(path: Path) -> dict:
    return json.loads(run("sfdisk", "--json", path))["partitiontable"]


def blkid_uuid(path: Path, offset: int = 0) -> str:
    """The file system UUID blkid's low-level probe finds at `offset` of a raw image."""
    return run("blkid", "-p", "-O", str(offset), "-o", "value", "-s", "UUID", path).strip()


def qcow2(raw: Path, out: Path, compress: bool = True) -> Path:
    """`qemu-img convert` to qcow2, compressed like the published images."""
    run("qemu-img", "convert", "-O", "qcow2", *(["-c"] if compress else []), raw, out)
    return out


def overlay(base: Path, out: Path) -> Path:
    """An empty qcow2 overlay on `base` (relative backing name, as an instance's is in its own folder)."""
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", out)
    return out


def debugfs(fs: Path, *requests: str, write: bool = False) -> str:
    """Run debugfs requests on a file system image (opened for writing with `write`)."""
    return run("debugfs", *(["-w"] if write else []), "-f", "-", fs, input="\n".join(requests) + "\n")


def write_changes(top: Path, old_raw: Path, new_raw: Path, chunk: int = 64 << 10) -> int:
    """Make the qcow2 overlay `top` (on a base holding `old_raw`) read as `new_raw` by writing, with `qemu-io`,
    only the chunks where the two differ: a real overlay whose new data lives in it and the rest in the base.
    Returns the number of chunks written."""
    old, new = old_raw.read_bytes(), new_raw.read_bytes()
    assert len(old) == len(new)
    commands = []
    for offset in range(0, len(new), chunk):
        piece = new[offset:offset + chunk]
        if piece != old[offset:offset + chunk]:
            source = top.with_name(f"{top.name}.{offset}.chunk")
            source.write_bytes(piece)
            commands += ["-c", f"write -q -s {source} {offset} {len(piece)}"]
    if commands:
        run("qemu-io", "-f", "qcow2", *commands, top)
    return len(commands) // 2


def block_size(fs: Path) -> int:
    """The file system's block size, as dumpe2fs reports it."""
    for line in run("dumpe2fs", "-h", fs).splitlines():
        if line.startswith("Block size:"):
            return int(line.split(":")[1])
    raise AssertionError(f"dumpe2fs -h {fs}: no block size")


def inode_location(fs: Path, what: str) -> int:
    """Byte offset of an inode (`<2>` or a path) in a file system image, from debugfs's `imap`."""
    located = debugfs(fs, f"imap {what}")  # "Inode 2 is part of block group 0\n\tlocated at block 269, offset 0x0100"
    block = int(located.split("located at block ")[1].split(",")[0])
    return block * block_size(fs) + int(located.split("offset ")[1].split()[0], 16)
