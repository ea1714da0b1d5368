"""Kernel modules for a test host's initramfs: found by name in an extracted linux-image package and put in
load order from each module's own `.modinfo` `depends=` list (a .deb ships no modules.dep: depmod makes it at
install time)."""
from __future__ import annotations

from pathlib import Path

from elftools.elf.elffile import ELFFile


def module_name(path: Path) -> str:
    """The name the kernel knows a module by: file stem with dashes as underscores (kvm-amd.ko -> kvm_amd)."""
    return path.name.split(".ko")[0].replace("-", "_")


def index_modules(modules_dir: Path) -> dict[str, Path]:
    """Every `*.ko` under lib/modules/<release>/, by module name."""
    return {module_name(p): p for p in sorted(modules_dir.rglob("*.ko"))}


def modinfo_depends(ko: Path) -> list[str]:
    """The `depends=` field of a module's .modinfo section (names of modules that must be loaded first)."""
    with ko.open("rb") as f:
        section = ELFFile(f).get_section_by_name(".modinfo")
        data = section.data() if section is not None else b""
    for field in data.split(b"\0"):
        if field.startswith(b"depends="):
            return [d for d in field[len(b"depends="):].decode().split(",") if d]
    return []


def load_order(wanted: list[str], index: dict[str, Path]) -> list[Path]:
    """`wanted` and everything they depend on, each after its dependencies; an unknown name is a ValueError."""
    order: list[Path] = []
    placed: set[str] = set()

    def place(name: str, chain: tuple[str, ...]) -> None:
        key = name.replace("-", "_")
        if key in placed:
            return
        if key not in index:
            raise ValueError(f"kernel module {name} not found (needed by {' <- '.join(chain) or 'the test host'})")
        for dep in modinfo_depends(index[key]):
            place(dep, (key, *chain))
        placed.add(key)
        order.append(index[key])

    for name in wanted:
        place(name, ())
    return order
