"""The built-in default guest: Debian's cloud kernel and a busybox initramfs, both built from Debian packages."""

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
BUSYBOX_PACKAGE = "busybox-static"
INIT_MARKER = "cloudkvm-guest: init reached"
REQUIRED_APPLETS = ("sh", "mount", "echo", "cat", "poweroff", "reboot", "ls", "uname", "dmesg", "ip",
                    "udhcpc", "sleep", "mkdir")
DEFAULT_INIT_SCRIPT = f"""#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "{INIT_MARKER}"
uname -a
poweroff -f
"""
# Bump when the initramfs layout below changes, so cached images built by older code are not reused.
_LAYOUT_VERSION = 1
_APT_HINT = "run apt-get update (as root) and check that deb.debian.org is reachable"
_APT_TIMEOUT = 900


def _debian_dir(cache: Path | None) -> Path:
    d = (cache if cache is not None else cache_dir()) / "debian"
    d.mkdir(parents=True, exist_ok=True)
    return d


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


def fetch_debian_kernel(cache: Path | None = None) -> Path:
    """Debian's cloud kernel as <cache>/debian/<kernel-release>/vmlinuz (with config and System.map beside it)."""
    debian = _debian_dir(cache)
    cached = _newest([p for p in debian.glob("*/vmlinuz") if not p.parent.name.startswith(".")],
                     lambda p: p.parent.name)
    if cached is not None:
        return cached
    package = resolve_kernel_package()
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
            (staging / "package").write_text(f"{package} {pkg_version}\n")
            staging.chmod(0o755)
            install_dir(staging, debian / release)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return debian / release / "vmlinuz"


def read_kernel_config(kernel: Path) -> dict[str, str]:
    """CONFIG_* values from the `config` file beside a fetched vmlinuz ("y", "m", quoted strings...)."""
    values: dict[str, str] = {}
    for line in (kernel.parent / "config").read_text().splitlines():
        m = re.match(r"(CONFIG_\w+)=(.*)", line) or re.match(r"# (CONFIG_\w+) is not set", line)
        if m:
            values[m.group(1)] = m.group(2) if m.lastindex == 2 else "n"
    return values


def fetch_busybox(cache: Path | None = None) -> Path:
    """The static busybox binary from busybox-static, as <cache>/debian/busybox-static/<version>/busybox."""
    base = _debian_dir(cache) / BUSYBOX_PACKAGE
    base.mkdir(exist_ok=True)
    cached = _newest([p for p in base.glob("*/busybox") if not p.parent.name.startswith(".")],
                     lambda p: p.parent.name)
    if cached is not None:
        return cached
    with tempfile.TemporaryDirectory(prefix="cloudkvm-apt-") as tmp:
        root, pkg_version = download_and_extract(BUSYBOX_PACKAGE, Path(tmp))
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


def render_initramfs(busybox: bytes, applets: list[str], init_script: str) -> bytes:
    """The uncompressed newc archive: dirs, /dev nodes, /bin/busybox, applet symlinks, /init."""
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
    w.add_file("init", init_script.encode(), 0o755)
    return w.to_bytes()


def build_busybox_initramfs(cache: Path | None = None, init_script: str | None = None) -> Path:
    """A gzip'd newc initramfs at <cache>/debian/initramfs-<hash>.cpio.gz, keyed by busybox version + /init."""
    script = DEFAULT_INIT_SCRIPT if init_script is None else init_script
    if not script.startswith("#!"):
        raise CloudkvmError("the initramfs init script must start with a #! line", "begin it with #!/bin/sh")
    busybox = fetch_busybox(cache)
    key = f"{_LAYOUT_VERSION}\0{busybox.parent.name}\0{script}".encode()
    target = _debian_dir(cache) / f"initramfs-{hashlib.sha256(key).hexdigest()[:16]}.cpio.gz"
    if target.is_file():
        return target
    archive = render_initramfs(busybox.read_bytes(), busybox_applets(busybox), script)
    atomic_write(target, gzip.compress(archive, compresslevel=9, mtime=0))
    return target


def default_guest(cache: Path | None = None) -> tuple[Path, Path]:
    """(kernel, initramfs) for the built-in default guest."""
    return fetch_debian_kernel(cache), build_busybox_initramfs(cache)
