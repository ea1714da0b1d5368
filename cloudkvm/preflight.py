"""Validate-time checks of a loaded profile against this host and its board: what `up` would otherwise find out
only once the VM starts (in the background): guest RAM this host cannot map, more virtio devices than the board
has virtio-mmio slots, more vCPUs than the board, a flat guest or KVM take, a `console.log` that cannot be
created, a raw disk `size:` the file system cannot hold. Each refusal is one line at the field's file:line:col.

The host facts are read once (`host_facts`) and can be given instead, so every rule is testable on any host.
"""
from __future__ import annotations

import mmap
import os
import re
import resource
import stat
from dataclasses import dataclass
from pathlib import Path

from .boards import registry
from .errors import CloudkvmError
from .fsutil import file_kind
from .profile import GiB, MiB, Profile, size_text

# include/linux/kvm_host.h KVM_MEM_MAX_NR_PAGES: the pages one KVM memory slot can hold (each RAM region is one)
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1
# Linux Documentation/admin-guide/sysctl/vm.rst, overcommit_memory: 0 heuristic, 1 always, 2 never
OVERCOMMIT_HEURISTIC, OVERCOMMIT_ALWAYS, OVERCOMMIT_NEVER = 0, 1, 2
# kvm/memory.py maps guest RAM with MAP_NORESERVE when Python's mmap module has it (3.12+ on Linux)
RAM_NORESERVE = bool(getattr(mmap, "MAP_NORESERVE", 0))


@dataclass(frozen=True)
class HostFacts:
    """What this host allows (None: unknown or unlimited)."""

    mem_total: int  # bytes of RAM (MemTotal)
    swap_total: int  # bytes of swap (SwapTotal)
    commit_limit: int  # CommitLimit: what overcommit_memory=2 lets all processes commit
    committed: int  # Committed_AS: what they have committed
    overcommit: int  # /proc/sys/vm/overcommit_memory
    address_space_limit: int | None  # RLIMIT_AS (soft) in bytes
    address_space_used: int  # this process's mappings (VmSize): the daemon starts as a copy of it
    phys_bits: int | None  # the CPU's physical address width: guest RAM above 2^bits is unreachable
    kvm_max_vcpus: int | None  # KVM_CAP_MAX_VCPUS, when /dev/kvm can be opened
    file_size_limit: int | None  # RLIMIT_FSIZE (soft) in bytes


def _meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as bytes by name."""
    out = {}
    for line in text.splitlines():
        match = re.match(r"^(\w+):\s+(\d+)(?:\s+kB)?$", line.strip())
        if match:
            out[match.group(1)] = int(match.group(2)) * (1024 if line.rstrip().endswith("kB") else 1)
    return out


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _limit(which: int) -> int | None:
    soft, _ = resource.getrlimit(which)
    return None if soft == resource.RLIM_INFINITY else soft


def _phys_bits(cpuinfo: str) -> int | None:
    match = re.search(r"^address sizes\s*:\s*(\d+) bits physical", cpuinfo, re.MULTILINE)
    return int(match.group(1)) if match else None


def _kvm_max_vcpus() -> int | None:
    from .kvm.system import Kvm

    try:
        kvm = Kvm()
    except (CloudkvmError, OSError):
        return None  # no KVM here: `up` says so itself
    try:
        return kvm.max_vcpus()
    finally:
        kvm.close()


def host_facts() -> HostFacts:
    """This host's facts, read now (/proc, resource limits, /dev/kvm)."""
    info = _meminfo(_read("/proc/meminfo"))
    status = _meminfo(_read("/proc/self/status"))
    overcommit = _read("/proc/sys/vm/overcommit_memory").strip()
    return HostFacts(mem_total=info.get("MemTotal", 0), swap_total=info.get("SwapTotal", 0),
                     commit_limit=info.get("CommitLimit", 0), committed=info.get("Committed_AS", 0),
                     overcommit=int(overcommit) if overcommit.isdigit() else OVERCOMMIT_HEURISTIC,
                     address_space_limit=_limit(resource.RLIMIT_AS), address_space_used=status.get("VmSize", 0),
                     phys_bits=_phys_bits(_read("/proc/cpuinfo")), kvm_max_vcpus=_kvm_max_vcpus(),
                     file_size_limit=_limit(resource.RLIMIT_FSIZE))


def check_profile(profile: Profile, host: HostFacts | None = None) -> None:
    """Refuse, before anything is created, what this host or the profile's board cannot run (one-line
    CloudkvmError at the field's file:line:col). A board this tree does not implement yet (boards/registry.py) gets
    the host checks only."""
    host = host or host_facts()
    board = _board(profile)
    _check_cpus(profile, host, board)
    _check_memory(profile, host)
    if board is not None:
        _check_virtio_slots(profile, board)
    _check_console_log(profile)
    _check_disk_sizes(profile, host)


def _board(profile: Profile):
    """The profile's board class (boards.base.Board), or None while the board is not implemented here."""
    info = registry.named(profile.machine)
    return info.board_class() if info.available() else None


# ---------------------------------------------------------------------------------------------------- vCPUs

def _check_cpus(profile: Profile, host: HostFacts, board) -> None:
    where = profile.where("cpus")
    flat = profile.boot.format == "flat"
    if board is not None and profile.cpus > board.max_cpus:
        raise CloudkvmError(f"{where}: cpus: the {board.name} board takes at most {board.max_cpus} vCPUs, not "
                            f"{profile.cpus}", f"use cpus: {board.max_cpus} or fewer")
    if board is not None and flat and profile.cpus > board.flat_max_cpus:
        raise CloudkvmError(f"{where}: cpus: a flat guest on the {board.name} board takes at most "
                            f"{board.flat_max_cpus} vCPUs ({board.flat_limit}), not {profile.cpus}",
                            f"use cpus: {board.flat_max_cpus} or fewer")
    if host.kvm_max_vcpus is not None and profile.cpus > host.kvm_max_vcpus:
        raise CloudkvmError(f"{where}: cpus: this host's KVM takes at most {host.kvm_max_vcpus} vCPUs per VM "
                            f"(KVM_CAP_MAX_VCPUS), not {profile.cpus}", f"use cpus: {host.kvm_max_vcpus} or fewer")


# ---------------------------------------------------------------------------------------------------- memory

def ram_regions(profile: Profile, memory: int | None = None) -> list[tuple[int, int]]:
    """The guest-physical RAM regions (gpa, size) the profile's board maps for `memory` bytes (one mmap and one
    KVM memory slot each): the board's layout, or one region for a board not implemented here."""
    memory = profile.memory if memory is None else memory
    board = _board(profile)
    return board.memory_layout(memory) if board is not None else [(0, memory)]


def ram_problem(regions: list[tuple[int, int]], host: HostFacts) -> str | None:
    """Why guest RAM laid out as `regions` cannot be mapped on `host` the way kvm/memory.py maps it, or None."""
    from .kvm.memory import HUGE_ALIGN  # each region's mapping is padded by this much for alignment

    top = max(gpa + size for gpa, size in regions)
    total = sum(size + HUGE_ALIGN for _, size in regions)
    biggest = max(size for _, size in regions)
    if host.phys_bits is not None and top > 1 << host.phys_bits:
        return (f"guest RAM would end at {size_text(top)}, above what this CPU's {host.phys_bits}-bit physical "
                f"addresses reach")
    if biggest > KVM_MEM_MAX_NR_PAGES * mmap.PAGESIZE:
        return f"its {size_text(biggest)} region is larger than one KVM memory slot takes (2^31 - 1 pages)"
    accounted = not RAM_NORESERVE or host.overcommit == OVERCOMMIT_NEVER
    if accounted and host.overcommit == OVERCOMMIT_HEURISTIC and \
            0 < host.mem_total + host.swap_total < biggest + HUGE_ALIGN:
        return (f"its {size_text(biggest)} region is more than this host's RAM and swap together "
                f"({size_text(_mib_floor(host.mem_total + host.swap_total))}), which vm.overcommit_memory = 0 "
                f"refuses in one allocation")
    if accounted and host.overcommit == OVERCOMMIT_NEVER and host.commit_limit and \
            total > host.commit_limit - host.committed:
        left = max(0, host.commit_limit - host.committed)
        return (f"only {size_text(_mib_floor(left))} can still be committed on this host (CommitLimit - "
                f"Committed_AS, vm.overcommit_memory = 2)")
    if host.address_space_limit is not None and host.address_space_used + total > host.address_space_limit:
        return (f"with the {size_text(_mib_floor(host.address_space_used))} the VMM maps itself it exceeds the "
                f"address-space limit (ulimit -v: {size_text(_mib_floor(host.address_space_limit))})")
    return None


def _mib_floor(size: int) -> int:
    return max(MiB, size // MiB * MiB)


def _bytes(size: int) -> str:
    return size_text(size) if size % 1024 == 0 else f"{size} bytes"


def _largest_memory(profile: Profile, host: HostFacts) -> int | None:
    """The largest whole number of MiB of guest RAM this host can map for the profile's board (None: not even
    the smallest), rounded down to whole GiB above 1 GiB."""
    low, high = 0, 1 << 44  # MiB; 16 EiB, beyond any address width
    while low < high:
        mid = (low + high + 1) // 2
        if ram_problem(ram_regions(profile, mid * MiB), host) is None:
            low = mid
        else:
            high = mid - 1
    size = low * MiB
    if size < 16 * MiB:
        return None
    return size // GiB * GiB if size >= GiB else size


def _check_memory(profile: Profile, host: HostFacts) -> None:
    problem = ram_problem(ram_regions(profile), host)
    if problem is None:
        return
    largest = _largest_memory(profile, host)
    hint = f"give the VM at most {size_text(largest)} here" if largest else "this host cannot map guest RAM now"
    raise CloudkvmError(f"{profile.where('memory')}: memory: {size_text(profile.memory)} of guest RAM cannot be "
                        f"mapped on this host: {problem}", hint)


# ---------------------------------------------------------------------------------------------------- virtio

def virtio_device_count(profile: Profile) -> int:
    """The virtio-mmio devices the profile's VM gets (as launcher.virtio_devices builds them): one virtio-blk per
    disk (the image's, the profile's, the cloud-init seed), a virtio-net on user networking, and a virtio-rng."""
    return _image_disks(profile) + len(profile.disks) + (profile.network.mode == "user") + 1


def _image_disks(profile: Profile) -> int:
    return bool(profile.images) + (profile.seed is not None)


def _check_virtio_slots(profile: Profile, board) -> None:
    slots = board.virtio_slot_count
    if virtio_device_count(profile) <= slots:
        return
    net = profile.network.mode == "user"
    most_disks = max(0, slots - 1 - net - _image_disks(profile))
    what = f"{_image_disks(profile) + len(profile.disks)} disks, " + ("a network card and " if net else "") + \
        "an entropy source"
    raise CloudkvmError(f"{profile.where('disks', most_disks)}: disks[{most_disks}]: the {board.name} board has "
                        f"{slots} virtio-mmio slots, and this VM needs {virtio_device_count(profile)} ({what})",
                        f"use at most {most_disks} disks" + (" with network: user" if net else ""))


# ---------------------------------------------------------------------------------------------------- console.log

def _check_console_log(profile: Profile) -> None:
    """The log is opened for appending, created when missing, never through a symlink (logfile.open_log)."""
    path = profile.console.log
    if path is None:
        return
    where = f"{profile.where('console', 'log')}: console.log"
    hint = "name a file in an existing folder you can write to"
    try:
        info = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        info = None  # the folder is checked below
    except OSError as exc:
        raise CloudkvmError(f"{where}: cannot use {path}: {exc.strerror}", hint) from None
    if info is not None:
        kind = None if stat.S_ISREG(info.st_mode) else file_kind(info.st_mode)
        if kind:
            raise CloudkvmError(f"{where}: {path} is {kind}, not a file", "name a regular file: the console output "
                                                                          "is appended to it")
        if not os.access(path, os.W_OK):
            raise CloudkvmError(f"{where}: cannot write {path} (permission denied)", hint)
        return
    folder = Path(path).parent
    try:
        folder_info = os.stat(folder)
    except OSError as exc:
        why = "does not exist" if isinstance(exc, FileNotFoundError) else f"cannot be used: {exc.strerror}"
        raise CloudkvmError(f"{where}: the folder {folder} {why}", hint) from None
    if not stat.S_ISDIR(folder_info.st_mode):
        raise CloudkvmError(f"{where}: {folder} is not a folder", hint)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CloudkvmError(f"{where}: cannot create {path} (the folder is not writable)", hint)


# ---------------------------------------------------------------------------------------------------- disk sizes

def _raw_format(disk) -> bool:
    if disk.format is not None:
        return disk.format == "raw"
    from .storage import probe_format

    try:
        return probe_format(disk.file) == "raw"
    except (CloudkvmError, OSError):
        return False  # opening the disk reports this, with its own message


def _file_size_problem(path: Path, size: int, host: HostFacts) -> str | None:
    """Why a regular file at `path` cannot be made `size` bytes long, or None (nothing is written)."""
    if host.file_size_limit is not None and size > host.file_size_limit:
        return f"the file size limit (ulimit -f) is {_bytes(host.file_size_limit)}"
    try:
        bits = os.pathconf(path, "PC_FILESIZEBITS")
    except (OSError, ValueError):
        bits = 64
    if bits > 0 and size >= 1 << (bits - 1):
        return f"its file system's sizes have {bits} bits (POSIX FILESIZEBITS): at most {(1 << (bits - 1)) - 1} bytes"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None  # opening the disk reports this, with its own message
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None  # replaced since is_file(): opening the disk refuses it
        os.lseek(fd, size, os.SEEK_SET)  # the kernel refuses an offset beyond its file system's largest file
    except (OSError, OverflowError):
        return "its file system holds no file that large"
    finally:
        os.close(fd)
    return None


def _check_disk_sizes(profile: Profile, host: HostFacts) -> None:
    """A raw disk grows in place (ftruncate to `size:`); an overlay grows a qcow2 in the instance folder instead."""
    for index, disk in enumerate(profile.disks):
        if disk.size is None or disk.read_only or disk.overlay or not disk.file.is_file() or not _raw_format(disk):
            continue
        problem = _file_size_problem(disk.file, disk.size, host)
        if problem:
            raise CloudkvmError(f"{profile.where('disks', index, 'size')}: disks[{index}].size: the raw image "
                                f"{disk.file} cannot grow to {_bytes(disk.size)}: {problem}",
                                "give a smaller size, or use overlay: true (a qcow2 overlay grows instead)")
