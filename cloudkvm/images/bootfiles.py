"""The kernel, initrd and root file system inside a cloud image, for direct kernel boot with no firmware.

`find_boot(disk, display)` reads the image's partition table (`partitions.py`), opens every ext2/3/4 file system
on it (`extfs.py`, through `PartitionView`, a read-only file-like window on one partition of a `Disk`, so through
the instance's qcow2 chain) and decides:

- the root file system: one with a `/etc` folder and an init (`/sbin/init`, `/usr/lib/systemd/systemd` or
  `/lib/systemd/systemd`, symbolic links followed inside that file system), preferring a GPT root partition type
  of the VM's architecture, then any GPT root type, then the lowest partition number;
- the kernel: `vmlinuz-*` or `vmlinux-*` (and the `vmlinuz`/`vmlinux` symlinks, followed inside their file system)
  at the top of a separate /boot file system (Ubuntu's partition 16), else in the root file system's `/boot` (and
  its top-level `/vmlinuz`, Debian's); the newest by version, numeric runs compared as numbers (6.1.0-28 is newer
  than 6.1.0-9); a plain `vmlinuz` is preferred to a `vmlinux` of the same version;
- the initrd beside it: `initrd.img-VER`, `initrd-VER.img`, `initramfs-VER.img` or `initrd-VER` (none is fine).

Bounds: a kernel over 512 MiB or an initrd over 2 GiB is refused; every problem (damage, a symlink loop, anything
the reader raises) is a one-line `CloudkvmError` naming the image and the partition.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass

from ..errors import CloudkvmError, printable
from .extfs import FileTooLarge, ExtError, ExtFs, Resolved
from .partitions import EXT_MAGIC, EXT_MAGIC_OFFSET, Partition, read_partitions

KERNEL_LIMIT = 512 << 20
INITRD_LIMIT = 2 << 30
KERNEL_PREFIXES = ("vmlinuz-", "vmlinux-")
KERNEL_LINKS = ("vmlinuz", "vmlinux")
NOT_KERNELS = (".old", ".bak", ".sig", ".sign", ".dpkg-new", ".dpkg-old", ".dpkg-tmp", ".dpkg-bak", ".hmac")
INITRD_NAMES = ("initrd.img-{}", "initrd-{}.img", "initramfs-{}.img", "initrd-{}")
INIT_PATHS = ("/sbin/init", "/usr/lib/systemd/systemd", "/lib/systemd/systemd")
ROOT_KIND = {"x86_64": "root-x86_64", "aarch64": "root-aarch64"}
MAX_VOLUMES = 32  # ext file systems examined on one disk
MAX_KERNELS = 256  # kernel names examined in one folder
DAMAGE_HINT = ("the file system is damaged or not one cloudkvm can read; check a raw copy with `e2fsck -fn` "
               "(`qemu-img convert -O raw IMAGE copy.raw`), or give boot.kernel and boot.initrd instead")


@dataclass(frozen=True)
class BootFiles:
    """What direct kernel boot needs from an image. Names are paths in the booted system's view
    (`/boot/vmlinuz-6.1.0-28-cloud-amd64`); partitions are 1-based, 0 for a whole-disk file system."""

    kernel: bytes
    initrd: bytes | None
    kernel_name: str
    initrd_name: str | None
    root_uuid: str  # the root file system's UUID, for root=UUID=...
    root_partition: int
    boot_partition: int  # where the kernel was found
    root_partuuid: str = ""  # the root partition's PARTUUID (GPT GUID or MBR 'disksig-NN'), for booting with no initrd
    notes: tuple[str, ...] = ()  # things the user may want to know (a journal that was not replayed), one line each


class PartitionView(io.RawIOBase):
    """A read-only, seekable file over bytes [start, start + size) of a Disk (one partition), with `pread`."""

    def __init__(self, disk, start: int, size: int):
        super().__init__()
        if start < 0 or size < 0 or start + size > disk.size:
            raise ValueError(f"bytes {start}..{start + size} are not inside the {disk.size}-byte disk")
        self.disk, self.start, self.size, self._pos = disk, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def pread(self, length: int, offset: int) -> bytes:
        """`length` bytes at `offset` of the partition (fewer at its end)."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        length = max(0, min(length, self.size - offset))
        return self.disk.pread(length, self.start + offset) if length else b""

    def readinto(self, buffer) -> int:
        data = self.pread(len(buffer), self._pos)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("seek before the start of the partition")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


@dataclass(frozen=True)
class _Volume:
    partition: Partition
    fs: ExtFs
    where: str  # "IMAGE: partition 2" for messages


@dataclass(frozen=True)
class _Kernel:
    volume: _Volume
    found: Resolved
    version: str
    mount: str  # where the volume is mounted in the booted system ("/" or "/boot")


def version_key(version: str) -> tuple:
    """A sort key comparing runs of digits as numbers and the rest as text: 6.1.0-28 sorts after 6.1.0-9."""
    return tuple((1, int(run), "") if run.isdigit() else (0, 0, run) for run in re.findall(r"\d+|\D+", version))


def find_boot(disk, display: str, arch: str | None = None) -> BootFiles:
    """The newest kernel, its initrd and the root file system's UUID in a disk image (see the module docstring);
    a one-line CloudkvmError naming `display` and the partition when they cannot be found or read."""
    volumes = []
    for partition in read_partitions(disk, display).partitions:
        volume = _open_volume(disk, display, partition)
        if volume is not None:
            volumes.append(volume)
        if len(volumes) > MAX_VOLUMES:
            raise CloudkvmError(f"{display}: more than {MAX_VOLUMES} ext2/3/4 file systems on the disk",
                                "give boot.kernel and boot.initrd instead")
    if not volumes:
        raise CloudkvmError(f"{display}: no ext2/3/4 file system on any partition",
                            "boot.from_image reads ext2/3/4 root and /boot file systems; give boot.kernel instead")
    roots = [v for v in volumes if _guarded(v, lambda: _is_root(v.fs))]
    if not roots:
        raise CloudkvmError(f"{display}: no root file system (one with /etc and /sbin/init or systemd) on partitions "
                            f"{', '.join(str(v.partition.number) for v in volumes)}",
                            "is this a Linux cloud image? give boot.kernel and boot.initrd instead")
    root = min(roots, key=lambda v: _root_rank(v.partition, arch))
    others = [v for v in volumes if v not in roots]  # another system's root is no /boot file system
    separate = [k for v in others for k in _guarded(v, lambda: _kernels(v, "/boot", "/boot"))]
    candidates = separate or _guarded(root, lambda: _kernels(root, "/", "/boot") + _kernels(root, "/", "/", True))
    if not candidates:
        raise CloudkvmError(f"{display}: no vmlinuz-* or vmlinux-* kernel in /boot of {_place(root.partition)}"
                            + (f" or at the top of partitions {', '.join(str(v.partition.number) for v in others)}"
                               if others else ""),
                            "install a kernel package in the image, or give boot.kernel and boot.initrd")
    chosen = max(candidates, key=lambda k: (version_key(k.version), k.found.path.rsplit("/", 1)[-1]
                                            .startswith("vmlinuz")))
    volume = chosen.volume
    kernel = _guarded(volume, lambda: _read(volume, chosen.found, KERNEL_LIMIT, "kernel"))
    initrd_found = _guarded(volume, lambda: _initrd(volume, chosen))
    initrd = None if initrd_found is None else _guarded(
        volume, lambda: _read(volume, initrd_found, INITRD_LIMIT, "initrd"))
    notes = tuple(f"{v.where}: the file system was not cleanly unmounted; its journal is not replayed, so files "
                  f"changed last may be missing" for v in dict.fromkeys((root, volume)) if v.fs.needs_recovery)
    return BootFiles(kernel, initrd, printable(chosen.found.path),
                     None if initrd_found is None else printable(initrd_found.path), root.fs.uuid,
                     root.partition.number, volume.partition.number, root.partition.uuid, notes)


def cmdline_for(boot: BootFiles, console: str, extra: str = "") -> str:
    """The kernel command line for an image's own kernel: `root=UUID=<uuid> ro console=<console> <extra>`.

    With no initrd the kernel cannot find a file system by UUID (only an initramfs can), so the root is named by
    PARTUUID instead (Linux's init/do_mounts.c), or /dev/vda for a whole-disk file system."""
    if boot.initrd is not None:
        root = f"root=UUID={boot.root_uuid}"
    elif boot.root_partuuid:
        root = f"root=PARTUUID={boot.root_partuuid} rootwait"
    else:
        root = "root=/dev/vda rootwait"
    console = console if console.startswith("console=") else f"console={console}"
    return " ".join(part for part in (root, "ro", console, extra.strip()) if part)


def _place(partition: Partition) -> str:
    return "the whole-disk file system" if partition.number == 0 else f"partition {partition.number}"


def _where(display: str, partition: Partition) -> str:
    return f"{display}: {_place(partition)}"


def _guarded(volume: _Volume, action):
    """Run `action` on a volume's file system; anything it raises becomes a one-line CloudkvmError naming it."""
    return _guard(volume.where, action)


def _guard(where: str, action):
    try:
        return action()
    except CloudkvmError:
        raise
    except FileTooLarge as err:
        raise CloudkvmError(f"{where}: {_one_line(str(err))}", "give boot.kernel and boot.initrd instead") from None
    except ExtError as err:
        raise CloudkvmError(f"{where}: {_one_line(str(err))}", DAMAGE_HINT) from None
    except Exception as err:  # a reader bug on hostile data must still be a user error, never a traceback
        raise CloudkvmError(f"{where}: cannot read the file system ({type(err).__name__}: "
                            f"{_one_line(str(err))})", DAMAGE_HINT) from None


def _one_line(text: str) -> str:
    return printable(" ".join(text.split()))[:300]


def _open_volume(disk, display: str, partition: Partition) -> _Volume | None:
    """The ext2/3/4 file system on a partition, or None when it holds none (by the superblock's magic)."""
    if partition.kind == "extended" or partition.size < EXT_MAGIC_OFFSET + 2:
        return None
    where = _where(display, partition)
    view = PartitionView(disk, partition.start, partition.size)
    if _guard(where, lambda: view.pread(2, EXT_MAGIC_OFFSET)) != EXT_MAGIC:
        return None
    return _Volume(partition, _guard(where, lambda: ExtFs(view)), where)


def _is_root(fs: ExtFs) -> bool:
    etc = fs.resolve("/etc")
    if etc is None or not etc.inode.is_dir:
        return False
    return any((init := fs.resolve(path)) is not None and init.inode.is_file for path in INIT_PATHS)


def _root_rank(partition: Partition, arch: str | None) -> tuple:
    own = ROOT_KIND.get(arch or "")
    return (partition.kind != own if own else True, not partition.kind.startswith("root-"), partition.number)


def _kernels(volume: _Volume, mount: str, folder: str, links_only: bool = False) -> list[_Kernel]:
    """Kernels in `folder` (system view) of a volume mounted at `mount`, symlinks followed inside the volume."""
    fs = volume.fs
    found = fs.resolve(folder, mount)
    if found is None or not found.inode.is_dir:
        return []
    out, seen, examined = [], set(), 0
    for raw in sorted(fs.entries(found.inode)):
        name = raw.decode("utf-8", "surrogateescape")
        is_link_name = name in KERNEL_LINKS
        if links_only and not is_link_name:
            continue
        if not is_link_name and (not name.startswith(KERNEL_PREFIXES) or name.endswith(NOT_KERNELS)):
            continue
        examined += 1
        if examined > MAX_KERNELS:
            raise ExtError(f"more than {MAX_KERNELS} kernels in {found.path}")
        target = fs.resolve(f"{found.path.rstrip('/')}/{name}", mount)
        if target is None or not target.inode.is_file or target.inode.number in seen:
            continue  # a dangling link, one leading out of this file system, or a kernel already counted
        base = target.path.rsplit("/", 1)[-1]
        if not base.startswith(KERNEL_PREFIXES):
            continue
        seen.add(target.inode.number)
        out.append(_Kernel(volume, target, base.split("-", 1)[1], mount))
    return out


def _initrd(volume: _Volume, kernel: _Kernel) -> Resolved | None:
    """The initrd of the kernel's version in the kernel's folder, or None."""
    folder = kernel.found.path.rsplit("/", 1)[0]
    for pattern in INITRD_NAMES:
        found = volume.fs.resolve(f"{folder}/{pattern.format(kernel.version)}", kernel.mount)
        if found is not None and found.inode.is_file:
            return found
    return None


def _read(volume: _Volume, found: Resolved, limit: int, what: str) -> bytes:
    try:
        data = volume.fs.read(found.inode, limit)
    except FileTooLarge:
        raise FileTooLarge(f"the {what} {printable(found.path)} is {found.inode.size} bytes, more than the "
                           f"{limit >> 20} MiB cloudkvm reads") from None
    if not data:
        raise ExtError(f"the {what} {printable(found.path)} is empty")
    return data
