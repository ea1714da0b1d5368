"""A real cloud image for the tests, built the way distributions build theirs, once, into the cache.

`mmdebstrap` makes a Debian bookworm root with systemd, cloud-init, OpenSSH, growpart (cloud-guest-utils),
netplan with systemd-networkd (bookworm's cloud-init 22.4 with ifupdown ignores a network-config v2 `match: {name:}`
glob) and Debian's cloud kernel, whose postinst makes the initramfs with initramfs-tools. The root goes into an
ext4 file system with a fixed UUID (`mkfs.ext4 -d`) as partition 1 of a GPT disk (the Linux root x86-64 type at
1 MiB, like Debian's genericcloud images, so cloud-init can grow it), converted with `qemu-img convert -c -O qcow2`
like the published images. The kernel and initrd are copied out beside it for QEMU's direct kernel boot.

What a VMM without firmware needs from it (cloudkvm's x86 board announces its virtio-mmio slots in ACPI, `LNRO0005`):
Debian's cloud kernel has virtio_mmio, virtio_blk, virtio_net and virtio_pci as modules, and initramfs-tools' default
`MODULES=most` puts all four in the initramfs, where udev loads virtio_mmio by its ACPI modalias; `build` checks
both from the image's own `/boot/config-*` and the initramfs (`CloudImage.facts`).

Built under `<cache>/cloudimages/<key>/` (the key hashes this recipe, the apt sources and the resolved kernel
package), under a lock so two sessions do not build it twice, and published by one rename. The packages mmdebstrap
downloads are kept in `<cache>/cloudimages/debs/`, so a rebuild does not download them again.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from cloudkvm.boards import registry
from cloudkvm.cache import cache_dir
from cloudkvm.fsutil import install_dir
from cloudkvm.guests import debian

RECIPE_VERSION = "1"  # bump when the build below changes, so an image made by older code is not reused
SUITE = "bookworm"
DISK_BYTES = 2 << 30
PARTITION_START = 1 << 20  # like Debian's genericcloud: p1 at 1 MiB
SECTOR = 512
GPT_BACKUP_SECTORS = 33    # the backup GPT at the disk's end: 32 sectors of entries and its header
ROOT_UUID = str(uuid.uuid5(uuid.NAMESPACE_URL, "https://cloudkvm.invalid/test-cloud-image/root-fs"))
PARTITION_UUID = str(uuid.uuid5(uuid.NAMESPACE_URL, "https://cloudkvm.invalid/test-cloud-image/root-partition"))
DISK_UUID = str(uuid.uuid5(uuid.NAMESPACE_URL, "https://cloudkvm.invalid/test-cloud-image/disk"))
CONSOLE = "ttyS0"


@dataclass(frozen=True)
class ArchRecipe:
    """What differs by architecture: the kernel package and the GPT type of the root partition."""
    debian_arch: str
    kernel_metapackage: str
    root_partition_type: str  # the Discoverable Partitions Specification's "Linux root" type for this arch


ARCHES = {
    "amd64": ArchRecipe("amd64", "linux-image-cloud-amd64", "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"),
    "arm64": ArchRecipe("arm64", "linux-image-cloud-arm64", "B921B045-1DF0-41C3-AF44-4C6F280D3FAE"),
}
# The Debian architecture's name for cloudkvm (a profile's `arch`, the board that runs it: its console), and what
# announces virtio-mmio: cloudkvm's x86 board in ACPI (LNRO0005), the arm64 virt board in its device tree
# (compatible "virtio,mmio"), whose alias udev loads virtio_mmio by.
GUEST_ARCH = {"amd64": "x86_64", "arm64": "aarch64"}
CONSOLE_CONFIG = {"amd64": "CONFIG_SERIAL_8250_CONSOLE", "arm64": "CONFIG_SERIAL_AMBA_PL011_CONSOLE"}
FIRMWARE_CONFIG = {"amd64": "CONFIG_ACPI", "arm64": "CONFIG_OF"}
VIRTIO_MMIO_ALIAS = {"amd64": "acpi*:LNRO0005:*", "arm64": "of:N*T*Cvirtio,mmio"}
# A foreign architecture's maintainer scripts (mmdebstrap, update-initramfs, lsinitramfs) run through qemu-user
BINFMT = {"arm64": "qemu-aarch64"}
PACKAGES = ("systemd", "systemd-sysv", "systemd-resolved", "udev", "dbus", "kmod", "iproute2",
            "cloud-init", "openssh-server", "cloud-guest-utils", "fdisk", "netplan.io",
            "sudo", "e2fsprogs", "initramfs-tools")
# merged /usr by directory symlinks as debootstrap makes it (not the usrmerge package, which pulls in perl)
MMDEBSTRAP_OPTIONS = ("--quiet", "--mode=root", "--variant=apt", "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
                      "--skip=essential/unlink")
# Kernel options and initramfs modules a firmware-less VMM's guest needs: its devices are virtio-mmio (announced
# in ACPI on x86) or virtio-pci (QEMU q35), its disk virtio-blk, its NIC virtio-net, its root ext4.
NEEDED_DRIVERS = ("virtio_mmio", "virtio_pci", "virtio_blk", "virtio_net")
NEEDED_CONFIG = ("CONFIG_VIRTIO_MMIO", "CONFIG_VIRTIO_PCI", "CONFIG_VIRTIO_BLK", "CONFIG_VIRTIO_NET", "CONFIG_EXT4_FS")

# Run by mmdebstrap on the outside after the packages are installed ($1: the new root). LANG=C.UTF-8 spares a
# locale build at first boot; no host keys, no machine-id: every instance makes its own at first boot.
CUSTOMIZE = r"""set -eu
R="$1"
echo 'LANG=C.UTF-8' > "$R/etc/default/locale"
printf 'UUID=%s / ext4 rw,discard,errors=remount-ro 0 1\n' "$ROOT_UUID" > "$R/etc/fstab"
echo localhost > "$R/etc/hostname" && chmod 644 "$R/etc/hostname"
printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' > "$R/etc/hosts"
ln -sfn ../run/systemd/resolve/stub-resolv.conf "$R/etc/resolv.conf"
: > "$R/etc/machine-id"
rm -f "$R/var/lib/dbus/machine-id" "$R"/etc/ssh/ssh_host_*_key "$R"/etc/ssh/ssh_host_*_key.pub
rm -rf "$R/var/lib/cloud" "$R"/var/log/*.log "$R/var/lib/apt/lists"/*_Packages
"""


@dataclass(frozen=True)
class CloudImage:
    """A built test cloud image and what QEMU's direct kernel boot needs from it."""
    qcow2: Path           # the compressed qcow2 (GPT, p1 ext4 root), as distributions publish
    kernel: Path          # a copy of the image's /boot/vmlinuz-VERSION
    initrd: Path          # a copy of the image's /boot/initrd.img-VERSION
    kernel_version: str   # e.g. 6.1.0-37-cloud-amd64
    root_uuid: str        # the root ext4 file system's UUID (root=UUID=... on the command line)
    facts: dict           # what the build checked: kernel config of the virtio drivers, initramfs modules, sizes

    def cmdline(self, console: str | None = None) -> str:
        """The kernel command line for a direct kernel boot of this image (its architecture's serial console)."""
        return f"root=UUID={self.root_uuid} ro console={console or self.facts.get('console', CONSOLE)}"


def apt_source_lines() -> list[str]:
    """`deb URI SUITE COMPONENTS` lines for the Debian bookworm suites this machine's apt uses (its
    sources.list and deb822 .sources files), so the image comes from the same mirror; deb.debian.org if none."""
    lines = []
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        entries = _deb822_entries(text) if path.suffix == ".sources" else _one_line_entries(text)
        for uri, suite, components in entries:
            if suite.split("-")[0] == SUITE and "main" in components:
                line = f"deb {uri} {suite} main"
                if line not in lines:
                    lines.append(line)
    return lines or [f"deb http://deb.debian.org/debian {SUITE} main"]


def _one_line_entries(text: str) -> list[tuple[str, str, list[str]]]:
    out = []
    for line in text.splitlines():
        words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
        if len(words) >= 4 and words[0] == "deb":
            out.append((words[1], words[2], words[3:]))
    return out


def _deb822_entries(text: str) -> list[tuple[str, str, list[str]]]:
    out = []
    for stanza in re.split(r"\n\s*\n", text):
        fields = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.split()
        if "deb" not in fields.get("types", []) or fields.get("enabled", ["yes"])[0] == "no":
            continue
        for uri in fields.get("uris", []):
            for suite in fields.get("suites", []):
                out.append((uri, suite, fields.get("components", [])))
    return out


def image_key(arch: str, kernel_package: str, sources: list[str]) -> str:
    """The cache key: this recipe, the architecture, the apt sources and the resolved kernel package."""
    parts = [RECIPE_VERSION, SUITE, repr(ARCHES[arch]), *MMDEBSTRAP_OPTIONS, *PACKAGES, CUSTOMIZE, ROOT_UUID,
             PARTITION_UUID, DISK_UUID, str(DISK_BYTES), kernel_package, *sources]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def build_cloud_image(arch: str = "amd64", cache: Path | None = None) -> CloudImage:
    """The test cloud image for `arch`, built on first use (a few minutes) and then taken from the cache."""
    if arch not in ARCHES:
        raise ValueError(f"no test cloud image recipe for {arch!r} (have: {', '.join(ARCHES)}); a foreign "
                         "architecture needs its maintainer scripts run under qemu-user binfmt")
    if os.geteuid() != 0:
        raise RuntimeError("building the test cloud image needs root (mmdebstrap --mode=root, chroot, "
                           "mkfs.ext4 -d keeping the files' owners)")
    recipe = ARCHES[arch]
    if GUEST_ARCH[arch] != registry.host_arch():
        ensure_binfmt(arch)
    kernel_package = debian.resolve_kernel_package(recipe.kernel_metapackage)
    sources = apt_source_lines()
    base = (cache or cache_dir()) / "cloudimages"
    base.mkdir(parents=True, exist_ok=True)
    key = image_key(arch, kernel_package, sources)
    final = base / f"{arch}-{key}"
    with _locked(base / f".{arch}-{key}.lock"):
        if not (final / "image.json").is_file():
            for stale in base.glob(f".tmp-{arch}-{key}-*"):  # left by a build that was killed
                _remove_tree(stale)
            staging = Path(tempfile.mkdtemp(prefix=f".tmp-{arch}-{key}-", dir=base))
            try:
                _build(recipe, sources, base / "debs", staging)
                staging.chmod(0o755)
                if final.is_dir():  # half-published by a run that was killed
                    _remove_tree(final)
                install_dir(staging, final)
            finally:
                if staging.exists():
                    _remove_tree(staging)
    return load_cloud_image(final)


def load_cloud_image(folder: Path) -> CloudImage:
    """The CloudImage a finished build left in `folder` (its image.json)."""
    meta = json.loads((folder / "image.json").read_text())
    return CloudImage(qcow2=folder / "disk.qcow2", kernel=folder / "vmlinuz", initrd=folder / "initrd.img",
                      kernel_version=meta["kernel_version"], root_uuid=meta["root_uuid"], facts=meta["facts"])


class _locked:
    """An exclusive flock on `path` for the duration of a `with` block (waits for another builder)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def _remove_tree(path: Path) -> None:
    """rmtree, except where something is mounted below `path` (a killed mmdebstrap's /proc or /dev binds): those
    are left alone rather than emptied through the mount."""
    resolved = str(path.resolve())
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    if any(m == resolved or m.startswith(resolved + "/") for m in mounts):
        print(f"cloudimage: {path} has mounts below it; left in place")
        return
    shutil.rmtree(path, ignore_errors=True)


def _sh(cmd: list[str], what: str, **kwargs) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-8:]
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): " + "\n".join(tail))
    return proc.stdout


def _build(recipe: ArchRecipe, sources: list[str], debs: Path, out: Path) -> None:
    """mmdebstrap -> kernel and initrd copied out, the root checked -> GPT disk -> compressed qcow2, in `out`."""
    times = {}
    work = out / "work"
    root = work / "root"
    work.mkdir()
    debs.mkdir(exist_ok=True)
    start = time.monotonic()
    _mmdebstrap(recipe, sources, debs, root)
    times["mmdebstrap_s"] = round(time.monotonic() - start, 1)
    (vmlinuz,) = sorted((root / "boot").glob("vmlinuz-*"))
    version = vmlinuz.name.removeprefix("vmlinuz-")
    shutil.copyfile(vmlinuz, out / "vmlinuz")
    shutil.copyfile(root / "boot" / f"initrd.img-{version}", out / "initrd.img")
    facts = firmware_less_facts(root, version, recipe.debian_arch)
    start = time.monotonic()
    raw = work / "disk.raw"
    make_gpt_disk(root, raw, recipe.root_partition_type)
    times["disk_s"] = round(time.monotonic() - start, 1)
    start = time.monotonic()
    _sh(["qemu-img", "convert", "-c", "-m", "2", "-W", "-f", "raw", "-O", "qcow2", str(raw), str(out / "disk.qcow2")],
        "qemu-img convert")
    times["qcow2_s"] = round(time.monotonic() - start, 1)
    _remove_tree(work)
    facts.update(times, qcow2_bytes=(out / "disk.qcow2").stat().st_size, disk_bytes=DISK_BYTES)
    meta = {"kernel_version": version, "root_uuid": ROOT_UUID, "facts": facts}
    (out / "image.json").write_text(json.dumps(meta, indent=1) + "\n")


def firmware_less_facts(root: Path, version: str, arch: str = "amd64") -> dict:
    """What a VMM without firmware relies on in the image (its kernel config, the initramfs' virtio modules, the
    ACPI or device-tree alias that loads virtio_mmio, the serial console); an error when the initramfs lacks a
    virtio driver."""
    options = (*NEEDED_CONFIG, FIRMWARE_CONFIG[arch], CONSOLE_CONFIG[arch])
    facts = {"kernel_config": kernel_config(root / "boot" / f"config-{version}", options),
             "initramfs_modules": initramfs_modules(root, version, NEEDED_DRIVERS),
             "modalias_virtio_mmio": module_has_alias(root, version, "virtio_mmio", VIRTIO_MMIO_ALIAS[arch]),
             "console": registry.for_arch(GUEST_ARCH[arch]).default_console}
    missing = [m for m, present in facts["initramfs_modules"].items() if not present]
    if missing:
        raise RuntimeError(f"the image's initramfs lacks {', '.join(missing)}")
    return facts


def ensure_binfmt(arch: str) -> None:
    """Run `arch`'s programs through qemu-user (binfmt_misc), as mmdebstrap needs for a foreign architecture's
    maintainer scripts: mount binfmt_misc and enable the qemu-user-static handler; an error saying what is missing."""
    name = BINFMT.get(arch)
    if name is None:
        raise RuntimeError(f"no qemu-user handler known for {arch}")
    folder = Path("/proc/sys/fs/binfmt_misc")
    if not (folder / "register").exists():
        _sh(["mount", "-t", "binfmt_misc", "binfmt_misc", str(folder)], "mounting binfmt_misc")
    if not (folder / name).exists():
        if shutil.which("update-binfmts") is None:
            raise RuntimeError(f"building the {arch} image needs qemu-user-static and binfmt-support "
                               "(scripts/install-deps --test installs them)")
        _sh(["update-binfmts", "--enable", name], f"update-binfmts --enable {name}")
    if "enabled" not in (folder / name).read_text():
        raise RuntimeError(f"the binfmt_misc handler {name} is disabled")


def _mmdebstrap(recipe: ArchRecipe, sources: list[str], debs: Path, root: Path) -> None:
    """The root, with the downloaded packages synced in from `debs` first and out to it at the end."""
    cmd = ["mmdebstrap", *MMDEBSTRAP_OPTIONS, f"--arch={recipe.debian_arch}",
           f"--include={','.join((*PACKAGES, recipe.kernel_metapackage))}",
           "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/",
           f"--setup-hook=sync-in {debs} /var/cache/apt/archives/",
           f"--customize-hook=sync-out /var/cache/apt/archives {debs}",
           f"--customize-hook={CUSTOMIZE}",
           SUITE, str(root), *sources]
    _sh(cmd, "mmdebstrap", env={**os.environ, "ROOT_UUID": ROOT_UUID, "LC_ALL": "C.UTF-8"}, timeout=3600)


def make_gpt_disk(root: Path, disk: Path, partition_type: str) -> None:
    """A sparse raw GPT disk of DISK_BYTES whose partition 1 (at 1 MiB, to the end) holds `root` as ext4."""
    end = (DISK_BYTES - GPT_BACKUP_SECTORS * SECTOR) // PARTITION_START * PARTITION_START
    part_bytes = end - PARTITION_START
    fs = disk.with_name("root.ext4")
    with fs.open("wb") as f:
        f.truncate(part_bytes)
    _sh(["mkfs.ext4", "-q", "-F", "-U", ROOT_UUID, "-L", "rootfs", "-E", "root_owner=0:0", "-d", str(root),
         str(fs)], "mkfs.ext4 -d")
    with disk.open("wb") as f:
        f.truncate(DISK_BYTES)
    layout = (f"label: gpt\nlabel-id: {DISK_UUID}\nunit: sectors\nfirst-lba: 2048\n"
              f"start={PARTITION_START // SECTOR}, size={part_bytes // SECTOR}, type={partition_type}, "
              f"uuid={PARTITION_UUID}, name=\"root\"\n")
    _sh(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(disk)], "sfdisk", input=layout)
    _sh(["dd", f"if={fs}", f"of={disk}", "bs=4M", f"seek={PARTITION_START}", "oflag=seek_bytes",
         "conv=notrunc,sparse", "status=none"], "dd of the root file system into the disk")
    fs.unlink()


def kernel_config(config: Path, options: tuple[str, ...]) -> dict[str, str]:
    """Each option's value in a kernel's config file: "y" (built in), "m" (a module) or "n"."""
    values = dict(re.findall(r"^(CONFIG_\w+)=(\S+)$", config.read_text(), re.M))
    return {opt: values.get(opt, "n") for opt in options}


def initramfs_modules(root: Path, version: str, modules: tuple[str, ...]) -> dict[str, bool]:
    """Whether each module is in the image's initramfs (or built into its kernel), listed with the image's own
    lsinitramfs."""
    listing = _sh(["chroot", str(root), "lsinitramfs", f"/boot/initrd.img-{version}"], "lsinitramfs")
    present = {Path(line).name.split(".ko")[0] for line in listing.splitlines() if ".ko" in line}
    builtin = (root / "usr" / "lib" / "modules" / version / "modules.builtin").read_text()
    present |= {Path(line).name.split(".ko")[0] for line in builtin.splitlines()}
    return {m: m in present or m.replace("_", "-") in present for m in modules}


def module_has_alias(root: Path, version: str, module: str, alias_pattern: str) -> bool:
    """Whether the image's modules.alias lets udev load `module` for a device alias matching `alias_pattern`."""
    aliases = (root / "usr" / "lib" / "modules" / version / "modules.alias").read_text()
    return any(line.split()[1:] == [alias_pattern, module] for line in aliases.splitlines()
               if line.startswith("alias "))


if __name__ == "__main__":
    import sys
    print(json.dumps(asdict(build_cloud_image(*sys.argv[1:2])), indent=1, default=str))
