"""The built-in default guest: Debian's cloud kernel and a busybox initramfs, both built from Debian packages.

amd64 (the default) and arm64: an arm64 kernel, its modules and busybox come from the `:arm64` packages (dpkg learns
the architecture once) and are cached under <cache>/debian/arm64/, apart from the amd64 files."""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from cloudkvm.boot.cpio import NewcWriter
from cloudkvm.cache import cache_dir
from cloudkvm.fsutil import atomic_write, install_dir
from cloudkvm.errors import CloudkvmError

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
ARM64_KERNEL_METAPACKAGE = "linux-image-cloud-arm64:arm64"
# arm64's generic kernel: what its cloud kernel lacks, e.g. gpio-keys (the virt board's power key) as a module
ARM64_GENERIC_METAPACKAGE = "linux-image-arm64:arm64"
BUSYBOX_PACKAGE = "busybox-static"
INIT_MARKER = "cloudkvm-guest: init reached"
REQUIRED_APPLETS = ("sh", "mount", "echo", "cat", "poweroff", "reboot", "ls", "uname", "dmesg", "ip",
                    "udhcpc", "sleep", "mkdir")
# The start of every /init here: PATH, /proc, /sys, /dev, then the marker tests wait for
INIT_PRELUDE = f"""#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "{INIT_MARKER}"
"""
DEFAULT_INIT_SCRIPT = INIT_PRELUDE + """uname -a
poweroff -f
"""
# Bump when the initramfs layout below changes, so cached images built by older code are not reused.
_LAYOUT_VERSION = 1
_APT_HINT = "run apt-get update (as root) and check that deb.debian.org is reachable"
_APT_TIMEOUT = 900
# Architecture names a caller may use (Debian's and the kernel's) -> Debian's
_ARCHES = {"amd64": "amd64", "x86_64": "amd64", "arm64": "arm64", "aarch64": "arm64"}
# Applets linked in a foreign-architecture initramfs, whose busybox cannot run here to list its own (its /init
# can run `busybox --install -s /bin` for the rest)
FOREIGN_APPLETS = (*REQUIRED_APPLETS, "insmod", "head", "dd", "sync")
MODULES_DIR = "modules"  # in the initramfs: modules/NN-name.ko, numbered in load order
LOAD_MODULES = f'for m in /{MODULES_DIR}/*.ko; do insmod "$m" || echo "insmod $m failed"; done'


def _debian_dir(cache: Path | None, arch: str = "amd64") -> Path:
    d = (cache if cache is not None else cache_dir()) / "debian"
    if _debian_arch(arch) != "amd64":
        d = d / _debian_arch(arch)
    d.mkdir(parents=True, exist_ok=True)
    return d


def _debian_arch(arch: str) -> str:
    if arch not in _ARCHES:
        raise CloudkvmError(f"no Debian guest for architecture {arch!r}", f"use one of {', '.join(_ARCHES)}")
    return _ARCHES[arch]


def _package(name: str, arch: str) -> str:
    """A package name as apt is asked for it: amd64 as it always was, others with their `:arch`."""
    debian_arch = _debian_arch(arch)
    return name if debian_arch == "amd64" else f"{name}:{debian_arch}"


def ensure_architecture(arch: str) -> None:
    """Make dpkg/apt know `arch` (`dpkg --add-architecture` + `apt-get update`, once) unless it is the native
    one or amd64 (which the amd64 path always assumed)."""
    debian_arch = _debian_arch(arch)
    if debian_arch == "amd64":
        return
    known = _run(["dpkg", "--print-architecture"]).stdout.split()
    known += _run(["dpkg", "--print-foreign-architectures"]).stdout.split()
    if debian_arch in known:
        return
    proc = _run(["dpkg", "--add-architecture", debian_arch])
    if proc.returncode != 0:
        raise CloudkvmError(f"`dpkg --add-architecture {debian_arch}` failed: {_last_error(proc)}",
                            "run it as root once, then apt-get update")
    _run(["apt-get", "update"])


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a host tool, capturing output; a missing tool becomes a CloudkvmError."""
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=_APT_TIMEOUT,
                              env={**os.environ, "LC_ALL": "C"})
    except FileNotFoundError:
        raise CloudkvmError(f"{cmd[0]} not found: the default guest is built from Debian packages",
                            "run on a Debian/Ubuntu host with apt-get and dpkg-deb installed") from None
    except subprocess.TimeoutExpired:
        raise CloudkvmError(f"{' '.join(cmd)} timed out after {_APT_TIMEOUT}s", _APT_HINT) from None


def _last_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E:")]
    return (errors or lines or [f"exit status {proc.returncode}"])[-1]


def _apt_with_update(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run an apt command; if the package is unknown, run `apt-get update` once and retry."""
    proc = _run(cmd, cwd)
    output = proc.stderr + proc.stdout
    if proc.returncode != 0 and ("Unable to locate package" in output or "No packages found" in output):
        _run(["apt-get", "update"])
        proc = _run(cmd, cwd)
    if proc.returncode != 0:
        raise CloudkvmError(f"`{' '.join(cmd)}` failed: {_last_error(proc)}", _APT_HINT)
    return proc


def resolve_kernel_package(metapackage: str = KERNEL_METAPACKAGE) -> str:
    """The versioned package a kernel metapackage depends on, e.g. linux-image-6.1.0-50-cloud-amd64 (a
    `:arch` suffix on the metapackage, as in linux-image-arm64:arm64, is kept on the answer)."""
    proc = _apt_with_update(["apt-cache", "depends", metapackage])
    for line in proc.stdout.splitlines():
        m = re.match(r"\s*\|?Depends:\s*(linux-image-\S+)", line)
        if m and m.group(1) != metapackage:
            return m.group(1)
    raise CloudkvmError(f"{metapackage} has no linux-image-* dependency in apt-cache", _APT_HINT)


def download_and_extract(package: str, workdir: Path) -> tuple[Path, str]:
    """apt-get download + dpkg-deb -x into workdir/root; returns (root, package version). `package` may name
    a foreign architecture (`busybox-static:arm64`, once `dpkg --add-architecture arm64` is done)."""
    _apt_with_update(["apt-get", "download", package], cwd=workdir)
    debs = sorted(workdir.glob(f"{package.partition(':')[0]}_*.deb"))
    if not debs:
        raise CloudkvmError(f"apt-get download {package} produced no .deb file", _APT_HINT)
    root = workdir / "root"
    _dpkg_deb(["-x", str(debs[0]), str(root)])
    return root, _dpkg_deb(["-f", str(debs[0]), "Version"]).strip()


def _dpkg_deb(args: list[str]) -> str:
    proc = _run(["dpkg-deb", *args])
    if proc.returncode != 0:
        raise CloudkvmError(f"`dpkg-deb {' '.join(args)}` failed: {_last_error(proc)}",
                            "the downloaded .deb may be corrupt; delete it and retry")
    return proc.stdout


def _natural_key(name: str) -> list[int | str]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _newest(paths: list[Path], key_of: Callable[[Path], str]) -> Path | None:
    return max(paths, key=lambda p: _natural_key(key_of(p)), default=None)


def fetch_debian_kernel(cache: Path | None = None, arch: str = "amd64", generic: bool = False) -> Path:
    """Debian's cloud kernel as <cache>/debian/<kernel-release>/vmlinuz (with config and System.map beside it);
    for arm64 <cache>/debian/arm64/<kernel-release>/vmlinuz (a plain arm64 Image), its modules in `modules/`;
    `generic`: arm64's generic kernel instead, under <cache>/debian/arm64/generic/."""
    if generic and _debian_arch(arch) != "arm64":
        raise CloudkvmError("only the arm64 generic kernel is fetched here", "leave generic unset for amd64")
    debian = _debian_dir(cache, arch) / "generic" if generic else _debian_dir(cache, arch)
    debian.mkdir(exist_ok=True)
    cached = _newest([p for p in debian.glob("*/vmlinuz") if not p.parent.name.startswith(".")],
                     lambda p: p.parent.name)
    if cached is not None:
        return cached
    foreign = _debian_arch(arch) != "amd64"
    if foreign:
        ensure_architecture(arch)
    package = resolve_kernel_package(ARM64_GENERIC_METAPACKAGE if generic else
                                     ARM64_KERNEL_METAPACKAGE if foreign else KERNEL_METAPACKAGE)
    with tempfile.TemporaryDirectory(prefix="cloudkvm-apt-") as tmp:
        root, pkg_version = download_and_extract(package, Path(tmp))
        images = sorted((root / "boot").glob("vmlinuz-*"))
        if not images:
            raise CloudkvmError(f"{package} contains no boot/vmlinuz-*", "Debian changed the package layout")
        release = images[0].name.removeprefix("vmlinuz-")
        staging = Path(tempfile.mkdtemp(prefix=".tmp-kernel-", dir=debian))
        try:
            for src, dst in ((images[0], "vmlinuz"), (root / "boot" / f"config-{release}", "config"),
                             (root / "boot" / f"System.map-{release}", "System.map")):
                if src.exists():
                    shutil.copyfile(src, staging / dst)
                    (staging / dst).chmod(0o644)
            modules = root / "lib" / "modules" / release
            if foreign and modules.is_dir():  # arm64's cloud kernel has virtio_mmio and virtio_blk as modules
                shutil.copytree(modules, staging / MODULES_DIR, symlinks=True)
            (staging / "package").write_text(f"{package} {pkg_version}\n")
            staging.chmod(0o755)
            install_dir(staging, debian / release)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return debian / release / "vmlinuz"


def ensure_kernel_modules(kernel: Path) -> Path:
    """The `modules/` folder beside a fetched kernel: arm64's come with it; amd64's (Debian's cloud kernel has
    virtio_mmio, virtio_blk and virtio_net as modules) are extracted from the same versioned package on first use.
    The package is named by the kernel's folder (its release) and the arch the folder's place in the cache says."""
    folder = kernel.parent / MODULES_DIR
    if folder.is_dir():
        return folder
    release = kernel.parent.name
    package = f"linux-image-{release}"
    if kernel.parent.parent.name == "generic" or kernel.parent.parent.name == "arm64":
        package += ":arm64"
    with tempfile.TemporaryDirectory(prefix="cloudkvm-apt-") as tmp:
        root, _version = download_and_extract(package, Path(tmp))
        modules = root / "lib" / "modules" / release
        if not modules.is_dir():
            raise CloudkvmError(f"{package} has no lib/modules/{release}", "Debian changed the package layout")
        staging = Path(tempfile.mkdtemp(prefix=".tmp-modules-", dir=kernel.parent))
        try:
            shutil.copytree(modules, staging / MODULES_DIR, symlinks=True)
            install_dir(staging / MODULES_DIR, folder)  # a concurrent winner's copy is the same package's
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def _module_name(path: Path) -> str:
    """The name the kernel knows a module by: file stem with dashes as underscores (kvm-amd.ko -> kvm_amd)."""
    return path.name.split(".ko")[0].replace("-", "_")


def _module_depends(ko: Path) -> list[str]:
    """The modules `ko` needs loaded first: the `depends=` field of its .modinfo section (a .deb ships no
    modules.dep; depmod makes that at install time)."""
    from elftools.elf.elffile import ELFFile

    with ko.open("rb") as f:
        section = ELFFile(f).get_section_by_name(".modinfo")
        fields = section.data().split(b"\0") if section is not None else []
    deps = next((f[len(b"depends="):] for f in fields if f.startswith(b"depends=")), b"")
    return [d for d in deps.decode().split(",") if d]


def kernel_modules(kernel: Path, names: list[str] | tuple[str, ...]) -> list[Path]:
    """The `.ko` files of `names` and of everything they depend on, dependencies first, from the `modules/`
    folder beside a fetched kernel (`ensure_kernel_modules`). Compressed modules are not handled: Debian's are plain
    `.ko`."""
    folder = ensure_kernel_modules(kernel)
    index = {_module_name(p): p for p in sorted(folder.rglob("*.ko"))}
    order: list[Path] = []

    def place(name: str, chain: tuple[str, ...]) -> None:
        key = name.replace("-", "_")
        if key in chain:
            raise CloudkvmError(f"kernel modules depend on each other in a cycle: {' -> '.join((*chain, key))}",
                                "the kernel package is broken")
        if index.get(key) in order:
            return
        if key not in index:
            raise CloudkvmError(f"kernel module {name} is not in {folder}"
                                + (f" (needed by {' <- '.join(reversed(chain))})" if chain else ""),
                                "check the module name, or that the kernel builds it as a module")
        for dep in _module_depends(index[key]):
            place(dep, (*chain, key))
        order.append(index[key])

    for name in names:
        place(name, ())
    return order


def read_kernel_config(kernel: Path) -> dict[str, str]:
    """CONFIG_* values from the `config` file beside a fetched vmlinuz ("y", "m", quoted strings...)."""
    values: dict[str, str] = {}
    for line in (kernel.parent / "config").read_text().splitlines():
        m = re.match(r"(CONFIG_\w+)=(.*)", line) or re.match(r"# (CONFIG_\w+) is not set", line)
        if m:
            values[m.group(1)] = m.group(2) if m.lastindex == 2 else "n"
    return values


def fetch_busybox(cache: Path | None = None, arch: str = "amd64") -> Path:
    """The static busybox binary from busybox-static, as <cache>/debian/busybox-static/<version>/busybox
    (arm64: <cache>/debian/arm64/busybox-static/<version>/busybox)."""
    base = _debian_dir(cache, arch) / BUSYBOX_PACKAGE
    base.mkdir(exist_ok=True)
    cached = _newest([p for p in base.glob("*/busybox") if not p.parent.name.startswith(".")],
                     lambda p: p.parent.name)
    if cached is not None:
        return cached
    with tempfile.TemporaryDirectory(prefix="cloudkvm-apt-") as tmp:
        ensure_architecture(arch)
        root, pkg_version = download_and_extract(_package(BUSYBOX_PACKAGE, arch), Path(tmp))
        binary = root / "bin" / "busybox"
        if not binary.is_file():
            raise CloudkvmError(f"{BUSYBOX_PACKAGE} contains no bin/busybox", "Debian changed the package layout")
        final = base / pkg_version.replace(":", "_").replace("/", "_")
        staging = Path(tempfile.mkdtemp(prefix=".tmp-busybox-", dir=base))
        try:
            shutil.copyfile(binary, staging / "busybox")
            (staging / "busybox").chmod(0o755)
            staging.chmod(0o755)
            install_dir(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final / "busybox"


def busybox_applets(busybox: Path) -> list[str]:
    """`busybox --list` (the binary is static x86_64), always including REQUIRED_APPLETS; sorted, unique."""
    names = set(REQUIRED_APPLETS)
    try:
        proc = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, timeout=30)
        if proc.returncode == 0:
            names.update(n.strip() for n in proc.stdout.split())
    except (OSError, subprocess.TimeoutExpired):
        pass  # e.g. a non-x86_64 host: fall back to the required set
    return sorted(n for n in names if n and "/" not in n and n != "busybox")


def render_initramfs(busybox: bytes, applets: list[str], init_script: str,
                     modules: list[Path] | tuple[Path, ...] = (), programs: dict[str, bytes] | None = None) -> bytes:
    """The uncompressed newc archive: dirs, /dev nodes, /bin/busybox, applet symlinks, /init, and when given, the
    kernel modules as /modules/NN-name.ko in load order (LOAD_MODULES loads them) and `programs` as /bin/NAME."""
    w = NewcWriter()
    for d in ("bin", "dev", "etc", "proc", "sys", "usr", "root"):
        w.add_dir(d, 0o700 if d == "root" else 0o755)
    w.add_dir("tmp", 0o1777)
    for link in ("sbin", "usr/bin", "usr/sbin"):
        w.add_symlink(link, "../bin" if link.startswith("usr/") else "bin")
    w.add_chardev("dev/console", 5, 1, 0o600)
    w.add_chardev("dev/null", 1, 3, 0o666)
    w.add_file("bin/busybox", busybox, 0o755)
    for applet in applets:
        w.add_symlink(f"bin/{applet}", "busybox")
    if modules:
        w.add_dir(MODULES_DIR)
        for i, ko in enumerate(modules):  # numbered so a shell glob loads them in dependency order
            w.add_file(f"{MODULES_DIR}/{i:02d}-{ko.name}", ko.read_bytes(), 0o644)
    for name, data in sorted((programs or {}).items()):
        if not name or "/" in name or name in (".", ".."):
            raise CloudkvmError(f"initramfs program name {name!r} is not a plain file name", "name it like an applet")
        w.add_file(f"bin/{name}", data, 0o755)
    w.add_file("init", init_script.encode(), 0o755)
    return w.to_bytes()


def build_busybox_initramfs(cache: Path | None = None, init_script: str | None = None, arch: str = "amd64",
                            modules: list[str] | tuple[str, ...] = (), generic: bool = False,
                            programs: dict[str, bytes] | None = None) -> Path:
    """A gzip'd newc initramfs at <cache>/debian/initramfs-<hash>.cpio.gz, keyed by busybox version + /init
    (arm64: under <cache>/debian/arm64/; `modules` names modules of the fetched kernel to include, with their
    dependencies, which the init loads with LOAD_MODULES; the key then has the kernel release too;
    `generic`: modules of arm64's generic kernel; `programs`: more executables as /bin/NAME, in the key by hash)."""
    script = DEFAULT_INIT_SCRIPT if init_script is None else init_script
    if not script.startswith("#!"):
        raise CloudkvmError("the initramfs init script must start with a #! line", "begin it with #!/bin/sh")
    foreign = _debian_arch(arch) != "amd64"
    busybox = fetch_busybox(cache, arch)
    key = f"{_LAYOUT_VERSION}\0{busybox.parent.name}\0{script}"
    kos: list[Path] = []
    if modules:
        kernel = fetch_debian_kernel(cache, arch, generic)
        kos = kernel_modules(kernel, modules)
        key += f"\0{kernel.parent.name}\0{','.join(modules)}"
    for name, data in sorted((programs or {}).items()):
        key += f"\0{name}\0{hashlib.sha256(data).hexdigest()}"
    target = _debian_dir(cache, arch) / f"initramfs-{hashlib.sha256(key.encode()).hexdigest()[:16]}.cpio.gz"
    if target.is_file():
        return target
    applets = busybox_applets(busybox)  # a foreign busybox cannot list them here: FOREIGN_APPLETS then
    if foreign:
        applets = sorted({*applets, *FOREIGN_APPLETS})
    archive = render_initramfs(busybox.read_bytes(), applets, script, kos, programs)
    atomic_write(target, gzip.compress(archive, compresslevel=9, mtime=0))
    return target


def default_guest(cache: Path | None = None, arch: str = "amd64") -> tuple[Path, Path]:
    """(kernel, initramfs) for the built-in default guest."""
    return fetch_debian_kernel(cache, arch), build_busybox_initramfs(cache, arch=arch)
