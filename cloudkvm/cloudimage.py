"""A profile's cloud image made ready for one instance (issue 13): the cached base image (pulled and verified), the
instance's qcow2 overlay on it grown to `disk:`, the kernel and initrd read out of the image for direct boot, and
the cloud-init NoCloud seed. Runs in the CLI before the daemon starts, so every problem is a one-line user error."""
from __future__ import annotations

import logging
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .disks import PreparedDisk, overlay_backing
from .errors import CloudkvmError
from .fsutil import atomic_write, is_within, read_regular
from .storage import BackingPolicy

ROOT_DISK = "root.qcow2"  # the instance's overlay on the cached image (found by `image prune` as in use)
SEED = "cidata.iso"
KERNEL, INITRD = "boot/vmlinuz", "boot/initrd.img"
INSTANCE_ID = "instance-id"
INSTANCE_ID_TEXT = re.compile(r"iid-cloudkvm-[0-9a-f-]{36}")
SSH_KEY = "ssh_key"
DEFAULT_DISK = 10 << 30

log = logging.getLogger("cloudkvm.cloudimage")


@dataclass(frozen=True)
class ImageBoot:
    """What `boot: {from_image: true}` found: the files written into the instance folder and the command line."""

    kernel: Path
    initrd: Path | None
    cmdline: str
    kernel_name: str  # the kernel's path inside the image, for messages
    root_uuid: str


def root_disk(instance_dir: Path) -> Path:
    return Path(instance_dir) / ROOT_DISK


def base_policy(base: str) -> BackingPolicy:
    """An overlay in the instance folder may name its base in the image cache, and nothing else."""
    return BackingPolicy(trusted=False, allowed=frozenset({os.path.realpath(base)}))


def pull(profile, warn: Callable[[str], None]):
    """The profile's image in the cache (downloaded and verified when it is not there yet); CloudkvmErrors name the
    profile's `images` entry."""
    from .images import store

    image = profile.image
    index = profile.images.index(image)
    try:
        return store.pull(image.location, image.digest, warn=warn)
    except CloudkvmError as exc:
        raise CloudkvmError(f"{profile.where('images', index, 'location')}: {exc.message}", exc.hint) from None


def ready_boot(image) -> None:
    """Get a cached image (`store.CachedImage`) ready to boot with `from_image`: its kernel and initrd read out of it
    (images/bootcache.py), then the host-side work this host's board repeats for them on every boot that misses its
    cache (x86: the decompressed vmlinux, the expanded initramfs) done now. Quiet when any of it fails: `up` reads
    the image and boots the kernel itself and says what is wrong."""
    from .boards import registry
    from .images import bootcache

    bootcache.ensure(image)
    found = bootcache.load(image.key)  # (bounded reads of regular files, checked against the entry's record)
    if found is None:
        return
    try:
        registry.host_board().prepare_boot(found.kernel, found.initrd, f"{image.path}:{found.kernel_name}")
    except (CloudkvmError, OSError, MemoryError) as exc:
        log.info("%s: its kernel is not prepared ahead: %s", image.path, exc)


def prepare_root(profile, instance_dir: Path, warn: Callable[[str], None],
                 cached=None) -> tuple[PreparedDisk, str | None]:
    """The instance's first disk: an overlay on the cached image (`cached`, or pulled now), made on the first `up`
    and grown to `disk:`. Later starts keep using the base the overlay was made on (no download), even when the
    profile's image moved on. Also returns the base's cache key when the overlay was made now (so it still reads
    as the image does), else None."""
    from .images import store

    overlay = root_disk(instance_dir)
    where = profile.where("images")
    made_from = None
    if overlay.exists():
        base, fmt = overlay_backing(overlay)
        if base is None or fmt not in ("qcow2", "raw"):
            raise CloudkvmError(f"{overlay}: the instance's root disk names no usable base image",
                                f"`cloudkvm rm {profile.name}` starts the instance afresh")
        base = os.path.join(os.path.dirname(overlay), base)
        if not is_within(base, store.root()):  # the header is a file on disk: its base must be a cached image
            raise CloudkvmError(f"{overlay}: the instance's root disk is backed by {base}, outside the image cache "
                                f"({store.root()})", f"`cloudkvm rm {profile.name}` starts the instance afresh")
        if not os.path.isfile(base):
            raise CloudkvmError(f"{where}: the image instance '{profile.name}' was made from is gone ({base})",
                                f"`cloudkvm rm {profile.name}` starts it afresh from the profile's image")
    else:
        for _ in range(2):  # an image pruned between the pull and the overlay is pulled again, once
            cached = cached or pull(profile, warn)
            with store.holding(cached) as present:  # no prune or `image rm` until the overlay names it
                if present:
                    _make_overlay(profile, overlay, cached)
                    made_from, base = cached.key, str(cached.path)
                    break
            cached = None
        else:
            raise CloudkvmError(f"{where}: the cached image keeps disappearing",
                                "is another cloudkvm pruning the cache?")
    disk = PreparedDisk(str(overlay), "qcow2", False, False, base_policy(base))
    with disk.open() as image:  # a refused or corrupt chain fails here; `disk:` made larger later grows it
        if profile.disk is not None and profile.disk > image.size:
            image.grow(profile.disk)
        elif profile.disk is not None and profile.disk < image.size:
            raise CloudkvmError(f"{profile.where('disk')}: the instance's disk is already {image.size} bytes",
                                "disks only grow; drop disk: or make it larger")
    return disk, made_from


def _make_overlay(profile, overlay: Path, cached) -> None:
    """The instance's overlay on the cached image, grown to `disk:`."""
    from .storage import open_disk, qcow2

    base, fmt = str(cached.path), cached.format
    with open_disk(base, read_only=True, format=fmt) as image:
        size = image.size
    wanted = profile.disk if profile.disk is not None else max(DEFAULT_DISK, size)
    if wanted < size:
        raise CloudkvmError(f"{profile.where('disk')}: disk {wanted} bytes is smaller than the image "
                            f"({size} bytes)", "disks only grow; make disk: at least the image's size")
    qcow2.create(overlay, wanted, backing=base, backing_format=fmt, policy=base_policy(base))
    os.chmod(overlay, 0o600)


def boot_from_image(profile, root: PreparedDisk, instance_dir: Path, base_key: str | None = None) -> ImageBoot:
    """The newest kernel/initrd pair in the image (read through the overlay, so a kernel the guest installed
    counts), written into the instance folder, and `root=UUID=… ro console=…` plus the profile's cmdline.
    `base_key`: the overlay is new on the cached image `base_key`, so what the image cache read out of that image
    (images/bootcache.py) stands for it, and what is read here is kept there."""
    from .boards import registry
    from .images import bootcache
    from .images.bootfiles import cmdline_for, find_boot

    found = bootcache.load(base_key) if base_key else None
    if found is None:
        with root.open() as disk:
            found = find_boot(disk, f"{profile.name}'s image ({root.path})")
        if base_key:
            bootcache.save(base_key, found)
    kernel = Path(instance_dir) / KERNEL
    kernel.parent.mkdir(mode=0o700, exist_ok=True)
    atomic_write(kernel, found.kernel, mode=0o600)
    initrd = None
    if found.initrd is not None:
        initrd = Path(instance_dir) / INITRD
        atomic_write(initrd, found.initrd, mode=0o600)
    console = registry.named(profile.machine).default_console
    return ImageBoot(kernel, initrd, cmdline_for(found, console, profile.boot.cmdline), found.kernel_name,
                     found.root_uuid)


def instance_id(instance_dir: Path) -> str:
    """The instance's cloud-init instance-id: made once, kept while the instance folder lives (a new one makes
    cloud-init run its first-boot modules again)."""
    path = Path(instance_dir) / INSTANCE_ID
    try:
        text = read_regular(path, 256).decode(errors="replace").strip()  # never a FIFO or a symlink
    except OSError:
        text = ""
    if INSTANCE_ID_TEXT.fullmatch(text):
        return text
    made = f"iid-cloudkvm-{uuid.uuid4()}"
    atomic_write(path, made.encode() + b"\n", mode=0o600)
    return made


def _extra_user_data(profile) -> list[tuple[str, dict]]:
    from .images.cloudinit import read_user_data

    settings, extra = profile.seed, []
    if settings.user_data:
        extra.append((profile.where("cloud_init", "user_data"), settings.user_data))
    if settings.user_data_file is not None:
        extra.append((str(settings.user_data_file), read_user_data(settings.user_data_file)))
    return extra


def seed_files(profile, instance_dir: Path) -> dict[str, bytes]:
    """meta-data, user-data and (when given) network-config for the NoCloud seed (cloud-init docs, "NoCloud")."""
    from .images import cloudinit, sshkeys

    settings = profile.seed
    _, public = sshkeys.instance_key(Path(instance_dir), f"cloudkvm@{profile.name}")
    keys = [public] + list(settings.ssh_keys) + (sshkeys.user_public_keys() if settings.dot_ssh_keys else [])
    hostname = settings.hostname or _hostname(profile.name)
    files = {
        "meta-data": cloudinit.meta_data(instance_id(instance_dir), hostname).encode(),
        "user-data": cloudinit.user_data(user=settings.user, authorized_keys=keys, hostname=hostname,
                                         packages=list(settings.packages),
                                         extra=_extra_user_data(profile)).encode(),
    }
    if settings.network_config is not None:
        files["network-config"] = cloudinit.network_config(settings.network_config).encode()
    return files


def _hostname(name: str) -> str:
    """A VM name as an RFC 1123 host name label ('.' and '_' become '-')."""
    label = "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")[:63].strip("-")
    return label or "cloudkvm"


def prepare_seed(profile, instance_dir: Path) -> PreparedDisk:
    """The seed ISO in the instance folder, rewritten from the profile on every start, attached read-only."""
    from .images.seed import write_seed

    path = Path(instance_dir) / SEED
    write_seed(path, seed_files(profile, instance_dir))
    return PreparedDisk(str(path), "raw", True, False, BackingPolicy())
