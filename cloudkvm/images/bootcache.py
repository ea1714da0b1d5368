"""Kernels read out of cached images (`bootfiles.find_boot`), kept beside them in the image cache so that a new
instance of an image boots without reading the image again (`boot: {from_image: true}`).

Layout: `images/boot/<key>/` (the image's cache key) holds `boot.json` (what `find_boot` found, without the file
contents), `vmlinuz` and, when there is one, `initrd.img`. An entry describes the image as cached: an overlay its
guest has written may hold another kernel, so `cloudimage.boot_from_image` uses it only for an overlay made in the
same `up`. `image pull` fills it (reading the image once, as part of getting it ready); `image rm` and `prune`
remove it with the image. An entry is written in a temporary folder and renamed into place whole, and checked when
read (fields, sizes; the UUIDs that go on the kernel command line must look like UUIDs); anything wrong is a miss:
the entry is put aside and the image is read again, and the entry written anew.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CloudkvmError, printable
from ..fsutil import read_bounded

if TYPE_CHECKING:
    from .bootfiles import BootFiles

FOLDER = "boot"
META, KERNEL, INITRD = "boot.json", "vmlinuz", "initrd.img"
META_LIMIT = 64 << 10
STALE_TEMP_SECONDS = 3600  # a temporary folder this old was left by a crash
_UUIDS = ("root_uuid", "root_partuuid")  # put on the kernel command line: hex digits and dashes only
_NUMBERS = ("root_partition", "boot_partition", "kernel_size")
UUID_TEXT = re.compile(r"[0-9A-Fa-f-]{0,64}")


def top() -> Path:
    from .store import root

    return root() / FOLDER


def folder(key: str) -> Path:
    return top() / key


def _well_formed(meta) -> bool:
    """Whether a boot.json holds every field `load` passes on, each of the shape `find_boot` gives it."""
    if not isinstance(meta, dict):
        return False
    initrd, notes = meta.get("initrd_name"), meta.get("notes", [])
    names = [meta.get("kernel_name")] + ([] if initrd is None else [initrd])
    return (all(isinstance(meta.get(k), int) for k in _NUMBERS)
            and all(isinstance(meta.get(k), str) and UUID_TEXT.fullmatch(meta[k]) for k in _UUIDS)
            and bool(meta["root_uuid"])
            and all(isinstance(n, str) and printable(n) == n for n in names)
            and (initrd is None or isinstance(meta.get("initrd_size"), int))
            and isinstance(notes, list) and all(isinstance(n, str) for n in notes))


def _meta(key: str) -> dict | None:
    """The entry's boot.json when it is well formed and the files beside it have the sizes it records, else None."""
    where = folder(key)
    try:
        meta = json.loads(read_bounded(where / META, META_LIMIT))
        if not _well_formed(meta):
            return None
        sizes = {KERNEL: meta["kernel_size"]} | ({} if meta.get("initrd_name") is None
                                                  else {INITRD: meta["initrd_size"]})
        if any(os.stat(where / name, follow_symlinks=False).st_size != size for name, size in sizes.items()):
            return None
    except (OSError, ValueError):
        return None
    return meta


def load(key: str) -> BootFiles | None:
    """The boot files kept for the image `key`, or None when there are none or they are not whole (a broken entry
    is put aside, so that `save` can write it anew)."""
    from .bootfiles import INITRD_LIMIT, KERNEL_LIMIT, BootFiles

    meta, where = _meta(key), folder(key)
    try:
        if meta is None:
            raise ValueError("not whole")
        kernel = read_bounded(where / KERNEL, KERNEL_LIMIT)
        initrd = None if meta.get("initrd_name") is None else read_bounded(where / INITRD, INITRD_LIMIT)
        if len(kernel) != meta["kernel_size"] or (initrd is not None and len(initrd) != meta["initrd_size"]):
            raise ValueError("changed while read")
    except (OSError, ValueError):
        _discard(key)
        return None
    return BootFiles(kernel, initrd, meta["kernel_name"], meta.get("initrd_name"), meta["root_uuid"],
                     meta["root_partition"], meta["boot_partition"], meta["root_partuuid"],
                     tuple(meta.get("notes", [])))


def _discard(key: str) -> None:
    """Put a broken entry aside (renamed first, so no reader sees it half removed) and remove it."""
    aside = top() / f".{key}.broken.{os.getpid()}"
    try:
        os.rename(folder(key), aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def save(key: str, found: BootFiles) -> None:
    """Keep `found` for the image `key` (best effort: a cache that cannot be written is read around). An entry
    another process saved first stays."""
    meta = {"kernel_name": found.kernel_name, "initrd_name": found.initrd_name, "root_uuid": found.root_uuid,
            "root_partuuid": found.root_partuuid, "root_partition": found.root_partition,
            "boot_partition": found.boot_partition, "kernel_size": len(found.kernel),
            "initrd_size": None if found.initrd is None else len(found.initrd), "notes": list(found.notes)}
    try:
        top().mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=top()))
    except OSError:
        return
    try:
        (staged / KERNEL).write_bytes(found.kernel)
        if found.initrd is not None:
            (staged / INITRD).write_bytes(found.initrd)
        (staged / META).write_text(json.dumps(meta))
        os.rename(staged, folder(key))  # ENOTEMPTY when another process saved it first: theirs stays
    except OSError:
        pass
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def ensure(image) -> None:
    """Read the kernel out of a cached image (`store.CachedImage`) unless that was done before. Quiet when it has
    none: `up` with `from_image` then reads the image itself and says what is wrong."""
    from ..storage import open_disk
    from .bootfiles import find_boot

    key = image.key
    if _meta(key) is not None:
        return
    _discard(key)
    try:
        with open_disk(image.path, read_only=True, format=image.format) as disk:
            found = find_boot(disk, str(image.path))
    except (CloudkvmError, OSError):
        return
    save(key, found)


def remove(key: str) -> None:
    shutil.rmtree(folder(key), ignore_errors=True)


def orphans(keys: set[str]) -> list[Path]:
    """Entries whose image is not among `keys`, and temporary folders a crash left behind."""
    try:
        names = sorted(os.listdir(top()))
    except OSError:
        return []
    now, out = time.time(), []
    for name in names:
        path = top() / name
        if path.is_symlink() or not path.is_dir():
            continue
        if name.startswith("."):
            if now - path.lstat().st_mtime > STALE_TEMP_SECONDS:
                out.append(path)
        elif name not in keys:
            out.append(path)
    return out
