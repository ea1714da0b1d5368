"""Which boards exist, and what the rest of cloudkvm may know about one without importing it.

Everything above `boards/` (machine, profile, preflight, launcher, qemu_cmdline, cli) asks this module; none of
them imports a board's own modules. A `BoardInfo` says what a profile or a QEMU command line can name (the board,
its architecture, the QEMU machines it answers to, its console) and where its implementation lives, as a
"module:Class" path that is imported the first time a VM, a kernel check or a limit needs it.

Adding a board (the aarch64 `virt` board is declared below already):
  1. write `cloudkvm/boards/<name>/board.py` with a `boards.base.Board` subclass (and `layout.py` beside it);
  2. point its entry's `implementation` at that class. For virt that is "cloudkvm.boards.virt.board:VirtBoard"
     already: creating that module and class is all the virt board has to do to register itself. Its entry can
     then also name a `demo_guest` (for `cloudkvm demo`) and a `linux_guest` (the demo profile's kernel and initrd);
  3. a brand-new architecture also needs its `BoardInfo` in `_BOARDS` (and its names in profiles/schema.json, which
     `cloudkvm.profile.write_profile_schema()` regenerates from here).
Until the implementation exists, profiles for the board still validate, `import-qemu` and `show --qemu` still work,
and starting a VM is one clear error (`BoardInfo.board_class`).
"""
from __future__ import annotations

import importlib
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import CloudkvmError

# `platform.machine()` names of the hosts each guest architecture runs on (KVM runs guests of its own arch only);
# the first is how messages name the host.
HOST_NAMES = {"x86_64": ("x86_64", "amd64"), "aarch64": ("arm64", "aarch64")}


def host_arch() -> str | None:
    """This host's architecture as a guest `arch` (x86_64, aarch64), or None for a host no board runs on."""
    machine = platform.machine().lower()
    return next((arch for arch, names in HOST_NAMES.items() if machine in names), None)


def _load(path: str):
    """The object a "package.module:attribute" path names (the module is imported now)."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class BoardInfo:
    """A board as the profile, `import-qemu`, preflight and the machine see it."""

    name: str                     # the profile's `machine`
    arch: str                     # the profile's `arch` (guest architecture)
    qemu_machines: tuple[str, ...]  # QEMU -M names it answers to exactly (regular expressions, whole name)
    qemu_machine: str             # the QEMU machine `show --qemu` prints for it
    default_console: str          # the guest console device (`console=` and the profile's console.serial)
    cpu_hide: bool                # whether the profile's `cpu.hide` is supported
    implementation: str           # "module:Class" of its boards.base.Board subclass, imported on first use
    qemu_approximates: tuple[str, ...] = ()  # QEMU -M names it stands in for, approximately (regexes)
    cpu_module: str | None = None  # with cpu_hide: a module defining FEATURES and check_feature_names(names)
    demo_guest: Callable[[], Path] | None = None  # builds the `cloudkvm demo` flat guest for this board
    linux_guest: Callable[[], tuple[Path, Path]] | None = None  # (kernel, initrd) of the built-in Linux guest

    # --- the implementation -------------------------------------------------------------------------------------
    def available(self) -> bool:
        """Whether this tree has the board's implementation."""
        return _implementation(self.implementation) is not None

    def board_class(self):
        """The board's `boards.base.Board` subclass; a one-line CloudkvmError while it is not implemented."""
        board_class = _implementation(self.implementation)
        if board_class is None:
            running = " and ".join(b.arch for b in _BOARDS.values() if b is not self and b.available()) or "no"
            raise CloudkvmError(f"the '{self.name}' board ({self.arch} guests) is not available in this version of "
                                f"cloudkvm yet", f"only {running} guests run today")
        return board_class

    def create(self, cpus: int, cpu, quirks):
        """A board instance for a VM (boards.base.Board.__init__)."""
        return self.board_class()(cpus, cpu, quirks)

    @property
    def max_cpus(self) -> int:
        return self.board_class().max_cpus

    @property
    def virtio_slots(self) -> int:
        return self.board_class().virtio_slot_count

    def check_kernel(self, data: bytes, path: str) -> None:
        """Refuse a kernel this board cannot boot (one line naming `path`)."""
        self.board_class().check_kernel(data, path)

    def prepare_boot(self, kernel: bytes, initrd: bytes | None, name: str) -> None:
        """Cache the host-side work of booting `kernel` and `initrd` (boards.base.Board.prepare_boot)."""
        self.board_class().prepare_boot(kernel, initrd, name)

    # --- what profiles and QEMU command lines say ---------------------------------------------------------------
    def answers_to(self, qemu_name: str) -> bool:
        """Whether QEMU's `-M qemu_name` is this board (exactly or approximately)."""
        return any(re.fullmatch(p, qemu_name) for p in self.qemu_machines + self.qemu_approximates)

    def approximates(self, qemu_name: str) -> bool:
        """Whether QEMU's `-M qemu_name` is only approximated by this board (say, `pc` by the microvm-like x86)."""
        return not any(re.fullmatch(p, qemu_name) for p in self.qemu_machines) and self.answers_to(qemu_name)

    def cpu_features(self) -> tuple[str, ...]:
        """The names `cpu.hide` takes on this board (none where it is not supported)."""
        return tuple(_load(f"{self.cpu_module}:FEATURES")) if self.cpu_hide and self.cpu_module else ()

    def check_cpu_hide(self, names: list[str]) -> None:
        """A CloudkvmError (with a did-you-mean hint) for the first name `cpu.hide` does not know here."""
        if not self.cpu_hide:
            raise CloudkvmError(f"hiding CPU features is only supported on {cpu_hide_arches()}, not {self.arch}",
                                "remove cpu.hide")
        _load(f"{self.cpu_module}:check_feature_names")(names)

    def check_host(self) -> None:
        """A one-line CloudkvmError when this host's KVM cannot run this board's guests (another architecture)."""
        host = host_arch()
        if host != self.arch:
            this = host or platform.machine() or "unknown"
            needed = HOST_NAMES.get(self.arch, (self.arch,))[0]
            raise CloudkvmError(f"{self.arch} guests need an {needed} host with KVM (the {self.name} board); this "
                                f"host is {this}", f"run it on an {needed} machine")


_classes: dict[str, type] = {}  # implementation path -> its class, once imported


def _implementation(path: str):
    """The class `path` names, or None while its module (or the class in it) does not exist. A module that exists
    but fails to import is a bug and raises as it is."""
    if path not in _classes:
        module, _, name = path.partition(":")
        try:
            found = getattr(importlib.import_module(module), name, None)
        except ModuleNotFoundError as exc:
            if exc.name is None or not (module == exc.name or module.startswith(exc.name + ".")):
                raise  # something the board's module imports is missing
            return None
        if found is None:
            return None
        _classes[path] = found
    return _classes[path]


def _x86_demo_guest() -> Path:
    from ..guests.build import GUEST_SOURCES, build_flat  # x86_64 purpose-built guests (gcc, cached)

    return build_flat(GUEST_SOURCES / "hello.S")


def _x86_linux_guest() -> tuple[Path, Path]:
    from ..guests.debian import default_guest  # Debian's amd64 cloud kernel + a busybox initramfs

    return default_guest()


def _virt_demo_guest() -> Path:
    from ..guests.build import GUEST_SOURCES, build_flat  # aarch64 purpose-built guests (cross toolchain, cached)

    return build_flat(GUEST_SOURCES / "aarch64" / "hello.S", arch="aarch64")


def _virt_linux_guest() -> tuple[Path, Path]:
    from ..guests.debian import default_guest  # Debian's arm64 cloud kernel + a busybox initramfs

    return default_guest(arch="arm64")


X86 = BoardInfo(
    name="x86", arch="x86_64", qemu_machines=(r"microvm",), qemu_machine="microvm", default_console="ttyS0",
    qemu_approximates=(r"pc", r"q35", r"isapc", r"pc-(i440fx|q35)-[\d.]+", r"pc-[\d.]+"),
    cpu_hide=True, cpu_module="cloudkvm.boards.x86.cpu", implementation="cloudkvm.boards.x86.board:X86Board",
    demo_guest=_x86_demo_guest, linux_guest=_x86_linux_guest)
VIRT = BoardInfo(
    name="virt", arch="aarch64", qemu_machines=(r"virt(-\d+\.\d+)?",), qemu_machine="virt",
    default_console="ttyAMA0", cpu_hide=False, implementation="cloudkvm.boards.virt.board:VirtBoard",
    demo_guest=_virt_demo_guest, linux_guest=_virt_linux_guest)

_BOARDS: dict[str, BoardInfo] = {board.name: board for board in (X86, VIRT)}  # in the profile schema's order


def boards() -> tuple[BoardInfo, ...]:
    """Every board a profile can name, implemented here or not."""
    return tuple(_BOARDS.values())


def register(board: BoardInfo) -> BoardInfo:
    """Add (or replace) a board by name; returns it. The built-in boards are registered above."""
    _BOARDS[board.name] = board
    return board


def named(name: str) -> BoardInfo:
    """The board a profile's `machine` (or MachineSpec.board) names."""
    try:
        return _BOARDS[name]
    except KeyError:
        raise CloudkvmError(f"board '{name}' is not available", "choose one of: " + ", ".join(_BOARDS)) from None


def for_arch(arch: str) -> BoardInfo:
    """The board that runs `arch` guests (x86_64: x86, aarch64: virt)."""
    for board in _BOARDS.values():
        if board.arch == arch:
            return board
    raise CloudkvmError(f"no board runs {arch} guests", "arch is one of: " + ", ".join(arches()))


def for_qemu_machine(qemu_name: str) -> BoardInfo | None:
    """The board QEMU's `-M qemu_name` means, or None when no board answers to it."""
    return next((board for board in _BOARDS.values() if board.answers_to(qemu_name)), None)


def arches() -> tuple[str, ...]:
    return tuple(board.arch for board in _BOARDS.values())


def host_board() -> BoardInfo:
    """The board for this host's own architecture (x86 on a host no board runs on: `check_host` says so)."""
    arch = host_arch()
    return for_arch(arch) if arch in arches() else X86


def host_board_name() -> str:
    return host_board().name


def cpu_features() -> tuple[str, ...]:
    """Every name `cpu.hide` takes on some board (for the profile schema)."""
    return tuple(sorted({name for board in _BOARDS.values() for name in board.cpu_features()}))


def cpu_hide_arches() -> str:
    """The architectures whose boards take `cpu.hide`, for messages ("x86_64")."""
    return " and ".join(board.arch for board in _BOARDS.values() if board.cpu_hide)
