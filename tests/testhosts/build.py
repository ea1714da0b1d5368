"""Builds a test host's kernel, initramfs and (for a foreign architecture) root once into the cache.

Everything comes from Debian (apt-get download, mmdebstrap) and PyPI (pip) by package name; the result lives in
`<cache>/testhosts/<name>-<key>/`, where the key hashes the recipe, the resolved kernel package and the init, so
a changed input builds a new host and an unchanged one is reused. Nothing of the foreign architecture runs here:
its .pyc files are compiled by this machine's CPython 3.11 and cloudkvm's cffi core by a cross compiler.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cloudkvm.boot.cpio import NewcWriter
from cloudkvm.cache import cache_dir
from cloudkvm.fsutil import atomic_write, install_dir
from cloudkvm.guests import debian

from .kmod import index_modules, load_order
from .recipes import HostRecipe

RECIPE_VERSION = "2"  # bump when the build below changes, so cached hosts made by older code are not reused
PROJECT_ROOT = Path(__file__).resolve().parents[2]
APPLETS = ("sh", "mount", "mkdir", "insmod", "chroot", "poweroff", "cat", "echo", "sync", "ip", "sleep")
NINE_P = "-t 9p -o trans=virtio,version=9p2000.L,msize=512000"

# The test host's /init. /scratch (9p, writable) holds `shares` ("tag path mode" per line: the 9p shares to
# mount in the new root at their own paths; `scratch` itself is bound there), `command-path` (the script the
# harness wrote), and receives `output`, `status` and `heartbeat`. The root is 9p tag `root`, read-only.
INIT_SCRIPT = f"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in /modules/*.ko; do insmod "$m" || echo "testhost: insmod $m failed"; done
mkdir -p /scratch /newroot
fail() {{ echo "testhost: $*"; poweroff -f; }}
mount {NINE_P},cache=none scratch /scratch || fail "cannot mount the scratch share"
mount {NINE_P},ro,cache=loose root /newroot || fail "cannot mount the root share"
R=/newroot
mount -t proc proc $R/proc && mount -t sysfs sysfs $R/sys && mount -t devtmpfs devtmpfs $R/dev || fail "no /proc"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts && mount -t tmpfs tmpfs $R/dev/shm || fail "no /dev/pts"
mount -t tmpfs -o mode=1777 tmpfs $R/tmp && mount -t tmpfs tmpfs $R/run || fail "no /tmp"
while read tag path mode; do
    mkdir -p "$R$path" 2>/dev/null
    if [ "$tag" = scratch ]; then mount -o bind /scratch "$R$path"; else mount {NINE_P},$mode "$tag" "$R$path"; fi \
        || fail "cannot mount $tag at $path"
done < /scratch/shares
ip link set lo up
(while :; do : > /scratch/heartbeat; sleep 5; done) &  # stops only if this emulated machine stops
echo "testhost: running the command"
chroot $R /bin/sh -c ". $(cat /scratch/command-path)" < /dev/null > /scratch/output 2>&1
echo $? > /scratch/status
sync
poweroff -f
"""


@dataclass(frozen=True)
class HostImages:
    """A built test host: what QEMU boots, and the root it shares (`/` for the machine's own architecture)."""
    kernel: Path
    initramfs: Path
    root: Path
    native_core: Path | None  # cloudkvm's cffi core built for a foreign architecture (None: the installed one)


def _sh(cmd: list[str], what: str, cwd: Path | None = None, env: dict | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
        raise RuntimeError(f"{what} failed ({' '.join(cmd[:3])} ...): {' | '.join(tail)}")
    return proc.stdout


def ensure_foreign_architecture(arch: str) -> None:
    """`dpkg --add-architecture` + `apt-get update` once, so `apt-get download pkg:arch` finds the package."""
    if arch in _sh(["dpkg", "--print-foreign-architectures"], "dpkg").split():
        return
    _sh(["dpkg", "--add-architecture", arch], "dpkg --add-architecture (needs root)")
    _sh(["apt-get", "update", "-qq"], "apt-get update")


def runtime_requirements(machine: str = "aarch64") -> list[str]:
    """cloudkvm's dependencies and test tools from pyproject.toml that apply on `machine` (the foreign root's):
    pip's --platform does not evaluate environment markers for the target, so they are evaluated here."""
    from packaging.requirements import Requirement

    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    return [text for text in wanted
            if (marker := Requirement(text).marker) is None or marker.evaluate({"platform_machine": machine})]


def host_key(recipe: HostRecipe, kernel_package: str) -> str:
    parts = [RECIPE_VERSION, repr(recipe), kernel_package, INIT_SCRIPT]
    if not recipe.own_root:
        parts += runtime_requirements()
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def render_initramfs(busybox: bytes, modules: list[Path]) -> bytes:
    w = NewcWriter()
    for d in ("bin", "dev", "proc", "sys", "tmp", "modules"):
        w.add_dir(d)
    w.add_chardev("dev/console", 5, 1, 0o600)
    w.add_file("bin/busybox", busybox, 0o755)
    for applet in APPLETS:
        w.add_symlink(f"bin/{applet}", "busybox")
    for i, ko in enumerate(modules):  # numbered so the shell's glob loads them in dependency order
        w.add_file(f"modules/{i:02d}-{ko.name}", ko.read_bytes())
    w.add_file("init", INIT_SCRIPT.encode(), 0o755)
    return w.to_bytes()


def _extract(package: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    root, _version = debian.download_and_extract(package, into)
    return root


def build_kernel_and_initramfs(recipe: HostRecipe, kernel_package: str, out: Path, work: Path) -> None:
    kroot = _extract(kernel_package, work / "kernel")
    (vmlinuz,) = sorted((kroot / "boot").glob("vmlinuz-*"))
    shutil.copyfile(vmlinuz, out / "vmlinuz")
    modules = load_order(list(recipe.modules), index_modules(kroot / "lib" / "modules"))
    busybox_root = _extract(recipe.package("busybox-static"), work / "busybox")
    initramfs = render_initramfs((busybox_root / "bin" / "busybox").read_bytes(), modules)
    (out / "initramfs.cpio.gz").write_bytes(gzip.compress(initramfs, compresslevel=6, mtime=0))


def build_foreign_root(recipe: HostRecipe, rootfs: Path) -> None:
    """A Debian user space of the recipe's architecture with Python 3.11 and cloudkvm's dependencies."""
    _sh(["mmdebstrap", "--quiet", "--variant=extract", f"--arch={recipe.arch}",
         f"--include={','.join(recipe.rootfs_packages)}", "bookworm", str(rootfs)], "mmdebstrap")
    for d in ("proc", "sys", "dev", "tmp", "run", "root"):
        (rootfs / d).mkdir(exist_ok=True)
    (rootfs / "bin" / "sh").unlink(missing_ok=True)
    (rootfs / "bin" / "sh").symlink_to("dash")  # dash's maintainer script makes this link; extract runs none
    # base-passwd's maintainer script would make these: ssh and ssh-keygen refuse a user without a passwd entry
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\n")
    site = rootfs / "usr" / "local" / "lib" / "python3.11" / "dist-packages"
    _sh([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile",
         "--target", str(site), "--platform", "manylinux2014_aarch64", "--only-binary=:all:",
         "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", *runtime_requirements()],
        "pip install of the arm64 wheels")
    for lib in (rootfs / "usr" / "lib" / "python3.11", site):  # the same bytecode magic as this CPython 3.11
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", str(lib)], capture_output=True)


def build_host(recipe: HostRecipe, cache: Path | None = None) -> HostImages:
    """The test host's images, built on first use (under a minute) and then taken from the cache (one
    `apt-cache depends` names the current kernel package, so a Debian kernel update builds a new host)."""
    if not recipe.own_root:
        ensure_foreign_architecture(recipe.arch)
    kernel_package = debian.resolve_kernel_package(recipe.kernel_metapackage)
    base = (cache or cache_dir()) / "testhosts"
    final = base / f"{recipe.name}-{host_key(recipe, kernel_package)}"
    if not (final / "ready").is_file():
        base.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{recipe.name}-", dir=base))
        try:
            with tempfile.TemporaryDirectory(prefix="cloudkvm-testhost-") as work:
                build_kernel_and_initramfs(recipe, kernel_package, staging, Path(work))
            if not recipe.own_root:
                build_foreign_root(recipe, staging / "rootfs")
            (staging / "ready").write_text(f"{kernel_package}\n")
            staging.chmod(0o755)
            if final.is_dir() and not (final / "ready").is_file():  # half-built by a run that was killed
                shutil.rmtree(final, ignore_errors=True)
            install_dir(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    native = None if recipe.own_root else cross_compiled_core(recipe, base)
    return HostImages(final / "vmlinuz", final / "initramfs.cpio.gz",
                      Path("/") if recipe.own_root else final / "rootfs", native)


def cross_compiled_core(recipe: HostRecipe, base: Path) -> Path:
    """cloudkvm's cffi KVM core for arm64, built by aarch64-linux-gnu-gcc against the arm64 <linux/kvm.h> and
    Python headers; cached by the builder's source, so a changed core is rebuilt."""
    from cloudkvm.kvm import _build

    source = b"".join(path.read_bytes() for path in _build.SOURCE_FILES)
    out = base / f"native-{recipe.name}-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if out.is_file():
        return out
    with tempfile.TemporaryDirectory(prefix="cloudkvm-cross-") as tmp:
        work = Path(tmp)
        headers = _extract(recipe.package("libpython3.11-dev"), work / "pydev")
        # zlib (_build.LIBRARIES): its arm64 header, and the shared library itself to link against (the core then
        # needs its soname, libz.so.1, which the test host's root has)
        zlib_dev = _extract(recipe.package("zlib1g-dev"), work / "zlib-dev")
        zlib_so = next(_extract(recipe.package("zlib1g"), work / "zlib").glob("**/libz.so.1.*"))
        c_file = work / "_native.c"
        with contextlib.redirect_stdout(io.StringIO()):  # cffi says "generating ..." on stdout
            _build.make_ffibuilder("aarch64").emit_c_code(str(c_file))
        _sh(["aarch64-linux-gnu-gcc", "-shared", "-fPIC", "-O2", f"-I{headers}/usr/include/python3.11",
             f"-I{headers}/usr/include", f"-I{zlib_dev}/usr/include", "-o", str(work / "core.so"), str(c_file),
             str(zlib_so)],
            "cross-compiling the cffi core (apt-get install gcc-aarch64-linux-gnu)")
        atomic_write(out, (work / "core.so").read_bytes(), mode=0o755)
    return out
