"""The device-tree-compiler tools as oracles for DTBs we write: dtc (decompile, with its checks), fdtget, fdtdump."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

TOOLS = ("dtc", "fdtget", "fdtdump")


def need_dtc() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install device-tree-compiler)")


def decompile(dtb: Path) -> str:
    """`dtc -I dtb -O dts`; fails the test on any warning or error (stderr must be empty)."""
    proc = subprocess.run(["dtc", "-I", "dtb", "-O", "dts", str(dtb)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return proc.stdout


def compile_dts(dts: str, out: Path, boot_cpu: int = 0) -> bytes:
    """`dtc -I dts -O dtb` of a source text (`-b`: the header's boot_cpuid_phys)."""
    proc = subprocess.run(["dtc", "-I", "dts", "-O", "dtb", "-b", str(boot_cpu), "-o", str(out), "-"], input=dts,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out.read_bytes()


def fdtget(dtb: Path, node: str, prop: str | None = None, kind: str = "x") -> str | None:
    """fdtget's view of a property (type `x` cells in hex, `s` strings, `bx` bytes), or the node's property names
    (prop None, `-p`); None when fdtget says the node or property is absent."""
    args = ["fdtget", "-p", str(dtb), node] if prop is None else ["fdtget", "-t", kind, str(dtb), node, prop]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        assert "FDT_ERR_NOTFOUND" in proc.stderr, proc.stderr
        return None
    return proc.stdout.strip()


def cells(dtb: Path, node: str, prop: str) -> list[int] | None:
    """A property as 32-bit cells, read by fdtget."""
    text = fdtget(dtb, node, prop, "x")
    return None if text is None else [int(c, 16) for c in text.split()]


def strings(dtb: Path, node: str, prop: str) -> list[str] | None:
    """A string-list property, read by fdtget (space-separated strings; ours have no spaces)."""
    text = fdtget(dtb, node, prop, "s")
    return None if text is None else text.split(" ")


def raw(dtb: Path, node: str, prop: str) -> bytes | None:
    text = fdtget(dtb, node, prop, "bx")
    return None if text is None else bytes(int(b, 16) for b in text.split())


def subnodes(dtb: Path, node: str) -> list[str]:
    proc = subprocess.run(["fdtget", "-l", str(dtb), node], capture_output=True, text=True, check=True)
    return proc.stdout.split()


def header(dtb: Path) -> dict[str, int]:
    """fdtdump's header lines (`// magic: 0xd00dfeed` ...) as numbers."""
    proc = subprocess.run(["fdtdump", str(dtb)], capture_output=True, text=True, check=True)
    fields = {}
    for line in proc.stdout.splitlines():
        if line.startswith("// ") and ":" in line:
            key, _, value = line[3:].partition(":")
            try:
                fields[key.strip()] = int(value.split()[0], 0)
            except (ValueError, IndexError):
                pass
    return fields

