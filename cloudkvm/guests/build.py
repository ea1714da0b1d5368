"""Builds purpose-made guests from assembly with the system toolchain (gcc, ld, objcopy) into flat binaries: x86_64
with the host's tools, aarch64 with the cross toolchain (aarch64-linux-gnu-gcc/-ld/-objcopy)."""
import hashlib
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import CloudkvmError
from ..cache import cache_dir
from ..fsutil import atomic_write

GUEST_SOURCES = Path(__file__).parent
BUILD_RECIPE_VERSION = "2"  # bump when the commands below change, so cached binaries are rebuilt
# C guests: freestanding, no SSE (a software KVM interprets CPL0 code and rejects many SSE instructions),
# position-dependent at the load address, with crt0 and the tiny libc linked in.
C_FLAGS = ["-ffreestanding", "-fno-pie", "-fno-pic", "-fno-stack-protector", "-mno-red-zone", "-mgeneral-regs-only",
           "-fno-asynchronous-unwind-tables", "-O2", "-Wall", "-Werror", "-std=gnu11"]
C_RUNTIME = ("x86_crt0.S", "guest_lib.c")
# aarch64 guests: assembly only, built with the cross toolchain's tools (this prefix), linked by default where
# QEMU's -kernel and an arm64 Image loader put an Image with text_offset 0x80000: RAM base 0x40000000 + 0x80000.
AARCH64_PREFIX = "aarch64-linux-gnu-"
AARCH64_LOAD_ADDR = 0x40080000
AARCH64_HINT = "apt-get install gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu"
ARCHES = ("x86_64", "aarch64")


def _inputs_digest(sources: list[Path], include_dirs: list[Path], load_addr: int, arch: str = "x86_64") -> str:
    key = f"{BUILD_RECIPE_VERSION}:{load_addr:x}" + ("" if arch == "x86_64" else f":{arch}")
    h = hashlib.sha256(key.encode())
    for source in sources:
        h.update(source.name.encode() + source.read_bytes())
    for d in include_dirs:
        for inc in sorted([*d.glob("*.inc"), *d.glob("*.h")]):
            h.update(inc.name.encode() + inc.read_bytes())
    return h.hexdigest()[:20]


def build_flat(source: Path, load_addr: int | None = None, include_dirs: list[Path] | None = None,
               cache: Path | None = None, arch: str = "x86_64") -> Path:
    """Build `source` into a flat binary linked at `load_addr`; cached by the inputs' hash. x86_64 (the default,
    at 1 MiB): .S in GNU as syntax, or freestanding .c with guest.h. aarch64 (at 0x40080000): .S only, assembled
    and linked with the aarch64-linux-gnu- cross tools."""
    if arch not in ARCHES:
        raise CloudkvmError(f"no guest toolchain for '{arch}'", f"one of: {', '.join(ARCHES)}")
    source = Path(source)
    own = GUEST_SOURCES if arch == "x86_64" else GUEST_SOURCES / arch  # the packaged guests' includes
    include_dirs = [source.parent, own] + list(include_dirs or [])
    if arch == "x86_64":
        prefix, flags, hint = "", C_FLAGS, "apt-get install gcc binutils"
        load_addr = 0x100000 if load_addr is None else load_addr
        sources = [source] if source.suffix == ".S" else [GUEST_SOURCES / n for n in C_RUNTIME] + [source]
    else:
        if source.suffix != ".S":
            raise CloudkvmError(f"{source.name}: aarch64 guests are assembly (.S) only", "write the guest in .S")
        native = platform.machine() == "aarch64" and shutil.which(AARCH64_PREFIX + "gcc") is None
        prefix, flags, hint = ("" if native else AARCH64_PREFIX), [], AARCH64_HINT
        load_addr = AARCH64_LOAD_ADDR if load_addr is None else load_addr
        sources = [source]
    out_dir = (cache or cache_dir()) / "guests"
    digest = _inputs_digest(sources, include_dirs, load_addr, arch)
    out = out_dir / (f"{source.stem}-{digest}.bin" if arch == "x86_64" else f"{source.stem}-{arch}-{digest}.bin")
    if out.exists():
        return out
    for tool in ("gcc", "ld", "objcopy"):
        if shutil.which(prefix + tool) is None:
            raise CloudkvmError(f"building {source.name} needs '{prefix + tool}'", hint)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cloudkvm-guest-") as tmp:
        elf, flat = Path(tmp, "g.elf"), Path(tmp, "g.bin")
        incs = [f"-I{d}" for d in include_dirs]
        objs = [Path(tmp, f"{i}.o") for i in range(len(sources))]
        steps = [[prefix + "gcc", "-c", "-nostdlib", *flags, *incs, "-o", str(obj), str(src)]
                 for obj, src in zip(objs, sources)]
        steps += [[prefix + "ld", "-nostdlib", "-static", f"-Ttext=0x{load_addr:x}", "-e", "_start", "-o", str(elf),
                   *map(str, objs)],
                  [prefix + "objcopy", "-O", "binary", "-R", ".note*", "-R", ".comment", str(elf), str(flat)]]
        for cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                errors = [ln for ln in proc.stderr.splitlines() if "rror" in ln] or proc.stderr.splitlines()[-1:]
                raise CloudkvmError(f"building {source.name} failed: {errors[0] if errors else cmd[0]}",
                                    "fix the guest source")
        atomic_write(out, flat.read_bytes())
    return out
