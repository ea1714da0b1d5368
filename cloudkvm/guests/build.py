"""Builds purpose-made guests from assembly with the system toolchain (gcc, ld, objcopy) into flat binaries."""
import hashlib
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


def _inputs_digest(sources: list[Path], include_dirs: list[Path], load_addr: int) -> str:
    h = hashlib.sha256(f"{BUILD_RECIPE_VERSION}:{load_addr:x}".encode())
    for source in sources:
        h.update(source.name.encode() + source.read_bytes())
    for d in include_dirs:
        for inc in sorted([*d.glob("*.inc"), *d.glob("*.h")]):
            h.update(inc.name.encode() + inc.read_bytes())
    return h.hexdigest()[:20]


def build_flat(source: Path, load_addr: int = 0x100000, include_dirs: list[Path] | None = None,
               cache: Path | None = None) -> Path:
    """Build `source` (.S in GNU as syntax, or freestanding .c with guest.h) for x86_64, linked at `load_addr`,
    into a flat binary; cached by the inputs' hash."""
    source = Path(source)
    include_dirs = [source.parent, GUEST_SOURCES] + list(include_dirs or [])
    sources = [source] if source.suffix == ".S" else [GUEST_SOURCES / n for n in C_RUNTIME] + [source]
    out_dir = (cache or cache_dir()) / "guests"
    out = out_dir / f"{source.stem}-{_inputs_digest(sources, include_dirs, load_addr)}.bin"
    if out.exists():
        return out
    for tool in ("gcc", "ld", "objcopy"):
        if shutil.which(tool) is None:
            raise CloudkvmError(f"building {source.name} needs '{tool}'", "apt-get install gcc binutils")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cloudkvm-guest-") as tmp:
        elf, flat = Path(tmp, "g.elf"), Path(tmp, "g.bin")
        incs = [f"-I{d}" for d in include_dirs]
        objs = [Path(tmp, f"{i}.o") for i in range(len(sources))]
        steps = [["gcc", "-c", "-nostdlib", *C_FLAGS, *incs, "-o", str(obj), str(src)]
                 for obj, src in zip(objs, sources)]
        steps += [["ld", "-nostdlib", "-static", f"-Ttext=0x{load_addr:x}", "-e", "_start", "-o", str(elf),
                   *map(str, objs)],
                  ["objcopy", "-O", "binary", "-R", ".note*", "-R", ".comment", str(elf), str(flat)]]
        for cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                errors = [ln for ln in proc.stderr.splitlines() if "rror" in ln] or proc.stderr.splitlines()[-1:]
                raise CloudkvmError(f"building {source.name} failed: {errors[0] if errors else cmd[0]}",
                                    "fix the guest source")
        atomic_write(out, flat.read_bytes())
    return out
