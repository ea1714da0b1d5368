"""A profile's disks made ready for one instance: formats (probed once, then recorded), the backing-file policy,
per-instance overlays, growth. Runs before the daemon starts, so every disk problem is a one-line user error."""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import CloudkvmError
from .storage import BackingPolicy, Disk, open_disk, probe_format
from .storage.chain import Link, backing_chain


@dataclass(frozen=True)
class PreparedDisk:
    """What one virtio-blk opens. `probed`: the format came from probing, so a raw image stays raw."""

    path: str
    format: str
    read_only: bool
    probed: bool
    policy: BackingPolicy

    def open(self) -> Disk:
        return open_disk(self.path, read_only=self.read_only, format=self.format, policy=self.policy,
                         probed=self.probed)


def policy_for(disk) -> BackingPolicy:
    """A profile disk's backing policy: its own file is always acceptable; the rest only inside the image's
    folder unless the profile trusts the image."""
    return BackingPolicy(trusted=disk.trust_backing, allowed=frozenset({os.path.realpath(disk.file)}))


def _identity(path) -> list[int]:
    st = os.stat(path)
    return [st.st_dev, st.st_ino]


def base_format(disk, recorded: dict) -> tuple[str, bool]:
    """(format, probed) of a profile disk's own file: the profile's `format`, else the format an earlier start of
    this instance probed for this very file (same inode), else a fresh probe."""
    if disk.format:
        return disk.format, False
    record = recorded.get(os.path.realpath(disk.file))
    try:
        same_file = record is not None and record.get("file") == _identity(disk.file)
    except OSError:
        same_file = False
    if same_file and record.get("format") in ("raw", "qcow2"):
        return record["format"], True
    return probe_format(disk.file), True


def overlay_backing(path) -> tuple[str | None, str | None]:
    """(backing file name, backing format) written in an overlay's header."""
    from .storage import qcow2_header as hdr
    from .storage.backing import open_image

    fd, st = open_image(os.fspath(path), True, devices=False)
    try:
        header = hdr.parse(os.fspath(path), fd, st.st_size)
    finally:
        os.close(fd)
    return header.backing_file, header.backing_format


def _check_overlay(profile, index: int, overlay, base: str, fmt: str) -> None:
    name, bfmt = overlay_backing(overlay)
    if (name, bfmt) != (base, fmt):
        raise CloudkvmError(f"{profile.where('disks', index, 'file')}: instance '{profile.name}' already has an "
                            f"overlay on {name} ({bfmt}), not on {base} ({fmt})",
                            f"`cloudkvm rm {profile.name}` starts the instance afresh (its disk changes are lost), "
                            f"or `up --name NEW` makes another instance")


def prepare(profile, instance_dir, recorded: dict) -> tuple[list[PreparedDisk], dict]:
    """Overlays (`overlay: true`) and growth (`size:`); returns the disks to open and the formats probed now
    (realpath → {format, file identity}) for the instance to record."""
    from .storage import qcow2

    prepared, probed_now = [], {}
    for index, disk in enumerate(profile.disks):
        where = profile.where("disks", index, "file")
        policy = policy_for(disk)
        path = str(disk.file)
        fmt, probed = base_format(disk, recorded)
        if probed:
            probed_now[os.path.realpath(path)] = {"format": fmt, "file": _identity(path)}
        if disk.overlay:
            overlay = instance_dir / f"disk{index}.overlay.qcow2"
            base = os.path.abspath(path)
            if overlay.exists():
                _check_overlay(profile, index, overlay, base, fmt)
            else:
                qcow2.create(overlay, None, backing=base, backing_format=fmt, policy=policy)
                os.chmod(overlay, 0o600)
            path, fmt, probed = str(overlay), "qcow2", False
        ready = PreparedDisk(path, fmt, disk.read_only, probed, policy)
        with ready.open() as image:  # a corrupt image or a refused backing file fails here, not later
            if disk.size and not disk.read_only:
                if disk.size < image.size:
                    raise CloudkvmError(f"{where}: disks.{index}.size is smaller than the image ({image.size} "
                                        f"bytes)", "disks only grow; drop 'size' or make it larger")
                if disk.size > image.size:
                    image.grow(disk.size)
        prepared.append(ready)
    return prepared, probed_now


def chains(profile) -> list[tuple[int, list[Link] | CloudkvmError]]:
    """Each disk's backing chain under its policy (or why it would be refused), for `validate` and `show`."""
    out = []
    for index, disk in enumerate(profile.disks):
        try:
            out.append((index, backing_chain(disk.file, disk.format, policy_for(disk))))
        except CloudkvmError as err:
            out.append((index, err))
    return out
