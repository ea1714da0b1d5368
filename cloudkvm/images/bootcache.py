"""Kernels read out of cached images (`bootfiles.find_boot`), kept beside them in the image cache so that a new
instance of an image boots without reading the image again (`boot: {from_image: true}`).

Layout: `images/boot/<key>/` (the image's cache key) holds `boot.json` (what `find_boot` found, without the file
contents), `vmlinuz` and, when there is one, `initrd.img`. An entry describes the image as cached: an overlay its
guest has written may hold another kernel, so `cloudimage.boot_from_image` uses it only for an overlay made in the
same `up`. `image pull` fills it (reading the image once, as part of getting it ready); `image rm` and `prune`
remove it with the image. An entry is written in a temporary folder and renamed into place whole, and checked when
read (fields, sizes); anything wrong is a miss, and the image is read again.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CloudkvmError
from ..fsutil import read_bounded

if TYPE_CHECKING:
    from .bootfiles import BootFiles

FOLDER = "boot"
META, KERNEL, INITRD = "boot.json", "vmlinuz", "initrd.img"
META_LIMIT = 64 << 10
STALE_TEMP_SECONDS = 3600  # a temporary folder this old was left by a crash
_TEXT = ("kernel_name", "root_uuid", "root_partuuid")
_NUMBERS = ("root_partition", "boot_partition", "kernel_size")


def top() -> Path:
    from .store import root

    return root() / FOLDER


def folder(key: str) -> Path:
    return top() / key


def load(key: str) -> BootFiles | None:
    """The boot files kept for the image `key`, or None when there are none or they are not whole."""
    from .bootfiles import INITRD_LIMIT, KERNEL_LIMIT, BootFiles

    where = folder(key)
    try:
        meta = json.loads(read_bounded(where / META, META_LIMIT))
        if not isinstance(meta, dict) or not all(isinstance(meta.get(k), str) for k in _TEXT) \
                or not all(isinstance(meta.get(k), int) for k in _NUMBERS):
            return None
        initrd_name, notes = meta.get("initrd_name"), meta.get("notes", [])
        if not (initrd_name is None or isinstance(initrd_name, str) and isinstance(meta.get("initrd_size"), int)) \
                or not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            return None
        kernel = read_bounded(where / KERNEL, KERNEL_LIMIT)
        initrd = None if initrd_name is None else read_bounded(where / INITRD, INITRD_LIMIT)
    except (OSError, ValueError):
        return None
    if len(kernel) != meta["kernel_size"] or (initrd is not None and len(initrd) != meta["initrd_size"]):
        return None
    return BootFiles(kernel, initrd, meta["kernel_name"], initrd_name, meta["root_uuid"], meta["root_partition"],
                     meta["boot_partition"], meta["root_partuuid"], tuple(notes))


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
    if (folder(key) / META).is_file():
        return
    try:
        with open_disk(image.path, read_only=True, format=image.format) as disk:
            found = find_boot(disk, str(image.path))
    except CloudkvmError:
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
