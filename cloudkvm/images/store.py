"""The image cache: cloud images by location and digest, verified once, shared by every instance.

Layout, under `cloudkvm.cache.cache_dir() / "images"` ($CLOUDKVM_CACHE, $XDG_CACHE_HOME/cloudkvm or ~/.cache/cloudkvm):

    <algo>-<hex>.<fmt>      the usable image (qcow2 or raw; unpacked when the download was compressed), read-only;
                            <algo>-<hex> is the digest of the download as fetched (the file a digest names)
    <algo>-<hex>.json       its record: digest(s), format, virtual and file size, compression, the locations it was
                            pulled from, fetched_at, last_used, whether a digest verified it
    boot/<algo>-<hex>/      the kernel and initrd read out of the image for `from_image` boots (bootcache.py)
    partial/                downloads under way or interrupted (`<url key>.part`, resumed by the next pull), and
                            unpacked or copied files before they are installed; <url key> hashes the location
    locks/                  flock(2) files: `fetch-<url key>.lock` while a location is fetched, `<algo>-<hex>.lock`
                            while an image is installed, touched or removed

A download is verified before it is unpacked; the image is installed by rename after its record is written, so a
crash leaves a record without image (ignored, pruned) but never an image that was not checked. Two processes
pulling the same location wait for each other on its fetch lock; the second finds the image the first installed.
The record's paths are never trusted: an image's file name comes from the validated key and format.

An image is *in use* while a qcow2 overlay in an instance folder names it as its backing file (`bases_in_use`);
`remove` refuses such an image unless forced and `prune` never removes one. An `up` holds the image's lock shared
(`holding`) while it makes the overlay, and `remove` and `prune` look again under the lock held exclusively, so an
image is never removed under an overlay being made; one removed between `up`'s pull and its overlay is pulled
again."""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import CloudkvmError, printable
from ..fsutil import atomic_write, read_bounded
from . import bootcache, fetch, unpack
from .digest import ALGORITHMS, Digest, digest_from_sums, is_digest, parse_digest

KEY = re.compile(r"(sha256-[0-9a-f]{64}|sha512-[0-9a-f]{128})")
FORMATS = ("qcow2", "raw")
MAX_RECORD_BYTES = 1 << 20
MAX_LOCATIONS = 32          # locations remembered per image
STALE_TEMP_SECONDS = 3600   # an atomic-write temp file this old was left by a crash
SECTOR = 512


@dataclass(frozen=True)
class CachedImage:
    """A verified image in the cache, ready to be the base of overlays."""

    path: Path
    format: str         # 'qcow2' | 'raw'
    digest: str         # 'sha256:HEX' or 'sha512:HEX' of the download
    location: str       # where this pull named it
    size: int           # the virtual disk size (bytes the guest sees)
    file_size: int = 0  # bytes of the image file on the host (holes not counted as data)

    @property
    def key(self) -> str:
        """The image's cache key (`<algo>-<hex>`), which names its file, record, lock and boot-file entry."""
        return image_key(self.path.name) or ""


def image_key(name: str) -> str | None:
    """The cache key of an image file name (`<algo>-<hex>.<fmt>`), or None for any other name."""
    stem, _, suffix = name.rpartition(".")
    return stem if suffix in FORMATS and KEY.fullmatch(stem) else None


@dataclass(frozen=True)
class ImageEntry:
    """One cached image as `image ls` shows it."""

    key: str
    path: Path
    format: str
    digest: str
    digests: dict = field(default_factory=dict)
    locations: tuple[str, ...] = ()
    size: int = 0
    file_size: int = 0
    compressed: str | None = None
    verified: bool = False
    fetched_at: float = 0.0
    last_used: float = 0.0
    used_by: tuple[str, ...] = ()

    @property
    def short(self) -> str:
        """The digest shortened as `image ls` shows it (`sha256:0123456789ab`)."""
        return self.digest[:self.digest.index(":") + 13]

    def to_json(self) -> dict:
        data = asdict(self)
        data["path"], data["locations"], data["used_by"] = str(self.path), list(self.locations), list(self.used_by)
        return data


@dataclass(frozen=True)
class Removed:
    """A file `prune` removed (or would remove, in a dry run), and what it was."""

    path: Path
    what: str
    size: int


def root() -> Path:
    """The image cache folder."""
    from ..cache import cache_dir

    return cache_dir() / "images"


def _folder(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CloudkvmError(f"{path}: cannot create the image cache folder: {err.strerror or err}",
                            "set CLOUDKVM_CACHE to a writable folder") from None
    return path


@contextmanager
def _locked(name: str, blocking: bool = True, shared: bool = False):
    """An exclusive (or `shared`) flock on locks/<name>.lock; yields False instead of waiting when `blocking` is
    False and it is held elsewhere."""
    path = _folder(root() / "locks") / f"{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _default_warn(message: str) -> None:
    print(f"cloudkvm: warning: {printable(message)}", file=sys.stderr)


# --- records -------------------------------------------------------------------------------------------------------

def _record_path(key: str) -> Path:
    return root() / f"{key}.json"


def _image_path(key: str, fmt: str) -> Path:
    return root() / f"{key}.{fmt}"


def _read_record(key: str) -> dict | None:
    """The record of `key` if it is well formed, else None (a damaged record is treated as absent)."""
    try:
        record = json.loads(read_bounded(_record_path(key), MAX_RECORD_BYTES))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") not in FORMATS:
        return None
    if not isinstance(record.get("locations"), list) or not isinstance(record.get("digests"), dict):
        return None
    return record


def _write_record(key: str, record: dict) -> None:
    atomic_write(_record_path(key), json.dumps(record, indent=1, sort_keys=True).encode())


def _keys() -> list[str]:
    try:
        names = os.listdir(root())
    except OSError:
        return []
    return sorted(name[:-5] for name in names if name.endswith(".json") and KEY.fullmatch(name[:-5]))


def _entry(key: str, record: dict, users: dict[str, list[str]] | None = None) -> ImageEntry | None:
    path = _image_path(key, record["format"])
    try:
        st = os.lstat(path)
    except OSError:
        return None
    algorithm, hexdigest = key.split("-", 1)

    def number(name):
        value = record.get(name)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0

    return ImageEntry(key=key, path=path, format=record["format"], digest=f"{algorithm}:{hexdigest}",
                      digests={k: v for k, v in record["digests"].items() if k in ALGORITHMS and isinstance(v, str)},
                      locations=tuple(str(loc) for loc in record["locations"]), size=int(number("size")),
                      file_size=st.st_blocks * 512, compressed=record.get("compressed") if isinstance(
                          record.get("compressed"), str) else None, verified=record.get("verified") is True,
                      fetched_at=number("fetched_at"), last_used=number("last_used"),
                      used_by=tuple((users or {}).get(os.path.realpath(path), ())))


def list_images() -> list[ImageEntry]:
    """Every usable image in the cache with the instances whose overlays need it, most recently used first."""
    users = bases_in_use()
    entries = [entry for key in _keys() if (record := _read_record(key)) and (entry := _entry(key, record, users))]
    return sorted(entries, key=lambda e: -e.last_used)


# --- pull -----------------------------------------------------------------------------------------------------------

def _by_digest(expected: Digest) -> ImageEntry | None:
    for key in _keys():
        record = _read_record(key)
        if record and record["digests"].get(expected.algorithm) == expected.hex:
            entry = _entry(key, record)
            if entry:
                return entry
    return None


def _local_identity(source: fetch.Source) -> list[int] | None:
    try:
        st = os.stat(source.path)
    except (OSError, TypeError):
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _by_location(source: fetch.Source) -> ImageEntry | None:
    """The newest image pulled from this location (for a local file: while the file is unchanged)."""
    identity = _local_identity(source) if not source.remote else None
    best = None
    for key in _keys():
        record = _read_record(key)
        if not record or source.location not in record["locations"]:
            continue
        if not source.remote:
            files = record.get("local_files")
            if not isinstance(files, dict) or files.get(source.location) != identity:
                continue
        entry = _entry(key, record)
        if entry and (best is None or entry.fetched_at > best.fetched_at):
            best = entry
    return best


def _use(entry: ImageEntry, source: fetch.Source, identity: list[int] | None = None) -> CachedImage | None:
    """Mark a cached image used from `source` now; None when it vanished (removed by another process)."""
    with _locked(entry.key):
        record = _read_record(entry.key)
        if record is None or not entry.path.is_file():
            return None
        record["last_used"] = time.time()
        if source.location not in record["locations"]:
            record["locations"] = [source.location, *record["locations"]][:MAX_LOCATIONS]
        if identity is not None:
            files = record.get("local_files") if isinstance(record.get("local_files"), dict) else {}
            record["local_files"] = {**files, source.location: identity}
        _write_record(entry.key, record)
    return CachedImage(entry.path, entry.format, entry.digest, source.location, entry.size, entry.file_size)


def _expected(source: fetch.Source, digest: str | None, warn) -> tuple[Digest | None, CachedImage | None]:
    """The digest to verify against (None: none given), or an image to use as is when the checksum file cannot be
    read but this location is cached."""
    if digest is None or not str(digest).strip():
        warn(f"{source}: no digest given: the image is not verified (name its sha256:/sha512: digest or its "
             f"distribution's SHA256SUMS file)")
        return None, None
    digest = str(digest).strip()
    if is_digest(digest):
        return parse_digest(digest), None
    sums = fetch.parse_location(digest, "digest")
    try:
        text = fetch.fetch_text(sums.location)
    except CloudkvmError as err:
        cached = _by_location(source)
        used = _use(cached, source) if cached else None
        if used is None:
            raise
        warn(f"cannot read the checksum file ({err.message}); using the image cached for {source}")
        return None, used
    return digest_from_sums(text, source.file_name, sums.location), None


def pull(location: str, digest: str | None = None, *, progress: bool | None = None,
         warn: Callable[[str], None] = _default_warn) -> CachedImage:
    """The image at `location` (http(s)/file URL or path) in the cache, verified against `digest` (`sha256:HEX`,
    `sha512:HEX`, or a SHA256SUMS/SHA512SUMS file's URL or path): fetched and unpacked unless already there."""
    source = fetch.parse_location(location)
    try:
        return _pull(source, digest, progress, warn)
    except OSError as err:
        raise CloudkvmError(f"{root()}: cannot write the image cache: {err.strerror or err}",
                            "free space there, make it writable, or set CLOUDKVM_CACHE to another folder") from None


def _pull(source: fetch.Source, digest: str | None, progress: bool | None, warn) -> CachedImage:
    expected, fallback = _expected(source, digest, warn)
    if fallback is not None:
        return fallback
    for _ in range(2):  # a hit removed by another process between the lookup and its use is fetched afresh
        hit = _lookup(source, expected)
        if hit is not None and (used := _use(hit, source, _local_identity(source) if not source.remote else None)):
            return used
        with _locked(f"fetch-{source.key}"):
            hit = _lookup(source, expected)  # another process may have fetched it while we waited
            if hit is None:
                return _fetch_and_install(source, expected, progress)
    raise CloudkvmError(f"{source}: the cached image keeps disappearing", "is another cloudkvm pruning the cache?")


def _lookup(source: fetch.Source, expected: Digest | None) -> ImageEntry | None:
    return _by_digest(expected) if expected is not None else _by_location(source)


def _fetch_and_install(source: fetch.Source, expected: Digest | None, progress: bool | None) -> CachedImage:
    algorithms = {"sha256"} | ({expected.algorithm} if expected else set())
    partial = _folder(root() / "partial")
    staged = partial / f"{source.key}.unpack"
    staged.unlink(missing_ok=True)  # left by a crash; we hold this location's fetch lock
    identity = None
    if source.remote:
        part = partial / f"{source.key}.part"
        try:
            size, digests = fetch.download(source.location, part, algorithms, progress=progress)
        except CloudkvmError:
            if part.exists() and part.stat().st_size == 0:
                fetch.discard_part(part)
            raise
        try:
            _check_digest(source, expected, digests)
            with open(part, "rb") as f:
                compressed = unpack.sniff(f.read(unpack.SNIFF_BYTES))
                f.seek(0)
                if compressed:
                    unpack.unpack(f, staged, compressed, limit=fetch.MAX_IMAGE_BYTES, where=source.location)
            if not compressed:
                os.rename(part, staged)
        finally:
            fetch.discard_part(part)
    else:
        identity = _local_identity(source)
        f, size = fetch.open_local(source.path)
        with f:
            compressed = unpack.sniff(os.pread(f.fileno(), unpack.SNIFF_BYTES, 0))
            reader = fetch.HashingReader(f, algorithms)
            unpack.unpack(reader, staged, compressed, limit=fetch.MAX_IMAGE_BYTES, where=source.location)
            reader.drain()
        digests = reader.hexdigests()
        try:
            _check_digest(source, expected, digests)
        except CloudkvmError:
            staged.unlink(missing_ok=True)
            raise
    try:
        fmt, virtual_size = _check_image(staged, source)
        algorithm = expected.algorithm if expected else "sha256"
        key = f"{algorithm}-{digests[algorithm]}"
        record = {"digests": digests, "format": fmt, "size": virtual_size, "download_size": size,
                  "compressed": compressed, "verified": expected is not None, "locations": [source.location],
                  "fetched_at": time.time(), "last_used": time.time()}
        if identity is not None:
            record["local_files"] = {source.location: identity}
        return _install(staged, key, record, source)
    finally:
        staged.unlink(missing_ok=True)


def _check_digest(source: fetch.Source, expected: Digest | None, digests: dict[str, str]) -> None:
    if expected is not None and digests[expected.algorithm] != expected.hex:
        raise CloudkvmError(f"{source}: {expected.algorithm} digest is {digests[expected.algorithm]}, expected "
                            f"{expected.hex}", "the download is damaged or the image changed upstream; it was "
                                               "discarded")


def _check_image(path: Path, source: fetch.Source) -> tuple[str, int]:
    """(format, virtual size) of an unpacked image, which must be a standalone qcow2 or a raw image that opens."""
    from ..disks import overlay_backing
    from ..storage import open_disk
    from ..storage.probe import PROBE_BYTES, probe_bytes

    with open(path, "rb") as f:
        head = f.read(PROBE_BYTES)
    fmt = probe_bytes(head)
    if fmt not in FORMATS:
        raise CloudkvmError(f"{source}: a {fmt} image, which cloudkvm cannot read",
                            "name the distribution's qcow2 or raw image, or convert it with `qemu-img convert -O "
                            "qcow2`")
    try:
        if fmt == "raw" and (path.stat().st_size == 0 or path.stat().st_size % SECTOR):
            raise CloudkvmError(f"{path}: {path.stat().st_size} bytes is not a whole number of 512-byte sectors",
                                "is this a disk image (not an HTML page or a checksum file)?")
        if fmt == "qcow2":
            backing, _ = overlay_backing(path)
            if backing:
                raise CloudkvmError(f"the qcow2 image has a backing file of its own "
                                    f"({printable(backing[:200])!r})",
                                    "a cloud image stands alone: flatten it with `qemu-img convert -O qcow2`")
        with open_disk(path, read_only=True, format=fmt) as disk:
            return fmt, disk.size
    except CloudkvmError as err:
        raise CloudkvmError(f"{source}: not a usable image: {err.message}", err.hint) from None


def _install(staged: Path, key: str, record: dict, source: fetch.Source) -> CachedImage:
    """Publish `staged` as the image `key` (record first, then the image by rename); keep an identical one already
    there."""
    final = _image_path(key, record["format"])
    with _locked(key):
        existing = _read_record(key)
        if existing is not None and final.is_file():
            existing["locations"] = list(dict.fromkeys([source.location, *existing["locations"]]))[:MAX_LOCATIONS]
            existing["last_used"] = time.time()
            existing["digests"] = {**record["digests"], **existing["digests"]}
            if "local_files" in record:
                files = existing.get("local_files") if isinstance(existing.get("local_files"), dict) else {}
                existing["local_files"] = {**files, **record["local_files"]}
            _write_record(key, existing)
        else:
            os.chmod(staged, 0o444)
            _write_record(key, record)
            os.rename(staged, final)
    entry = _entry(key, _read_record(key) or record)
    return CachedImage(final, record["format"], f"{key.split('-', 1)[0]}:{key.split('-', 1)[1]}", source.location,
                       record["size"], entry.file_size if entry else 0)


# --- what instances need, removal -----------------------------------------------------------------------------------

def bases_in_use() -> dict[str, list[str]]:
    """Real path of each cached image that a qcow2 overlay in an instance folder names as its backing file -> the
    names of those instances."""
    from ..disks import overlay_backing
    from ..instances import list_instances

    top = os.path.realpath(root())
    used: dict[str, list[str]] = {}
    for instance in list_instances():
        try:
            overlays = sorted(instance.dir.glob("*.qcow2"))
        except OSError:
            continue
        for overlay in overlays:
            try:
                backing, _ = overlay_backing(overlay)
            except (CloudkvmError, OSError):
                continue  # not a qcow2 we can read: it cannot be using an image either
            if not backing:
                continue
            real = os.path.realpath(os.path.join(os.path.dirname(overlay), backing))
            if os.path.dirname(real) == top:
                names = used.setdefault(real, [])
                if instance.name not in names:
                    names.append(instance.name)
    return used


@contextmanager
def holding(image: CachedImage):
    """Keep the cached `image` from removal while the caller makes an overlay on it: a shared lock on its key, which
    `remove` and `prune` take exclusively before they look again at what instances need. Yields whether the image is
    still there (False: it was removed between its pull and now; pull it again)."""
    with _locked(image.key, shared=True):
        yield image.path.is_file()


def find(ref: str) -> ImageEntry:
    """The one cached image `ref` names: a location, the last component of a location, the cache file name, or a
    digest or its prefix of at least 4 hex digits (`sha256:0123ab`, `0123ab`)."""
    ref = str(ref).strip()
    entries = list_images()
    matches = [e for e in entries if ref in e.locations or ref == e.path.name]
    if not matches:
        matches = [e for e in entries if any(loc.rsplit("/", 1)[-1] == ref for loc in e.locations)]
    algorithm, _, prefix = ref.lower().rpartition(":") if "://" not in ref else ("", "", "")
    if not matches and len(prefix) >= 4 and algorithm in ("", *ALGORITHMS):
        matches = [e for e in entries if any(h.startswith(prefix) for a, h in e.digests.items()
                                             if algorithm in ("", a))]
    if not matches:
        raise CloudkvmError(f"no cached image matches '{printable(ref[:200])}'",
                            "`cloudkvm image ls` lists them; name one by digest prefix, location or file name")
    if len(matches) > 1:
        raise CloudkvmError(f"'{printable(ref[:200])}' matches {len(matches)} cached images: "
                            f"{', '.join(e.short for e in matches[:5])}", "give a longer digest prefix")
    return matches[0]


def remove(ref: str, force: bool = False) -> ImageEntry:
    """Remove the cached image `ref` names (see `find`); refused while an instance's overlay needs it unless forced.
    What instances need is read under the image's lock, which `up` holds while it makes an overlay (`holding`)."""
    entry = find(ref)
    with _locked(entry.key):
        users = bases_in_use().get(os.path.realpath(entry.path), [])
        if users and not force:
            where = printable(entry.locations[0] if entry.locations else entry.key)
            raise CloudkvmError(f"image {entry.short} ({where}) is the base of instance(s) {', '.join(users)}",
                                "remove those instances first (`cloudkvm rm NAME`), or --force (their disks will no "
                                "longer open)")
        entry.path.unlink(missing_ok=True)
        _record_path(entry.key).unlink(missing_ok=True)
        bootcache.remove(entry.key)
    return entry


def _size(path: Path) -> int:
    try:
        return os.lstat(path).st_blocks * 512
    except OSError:
        return 0


def prune(*, dry_run: bool = False) -> list[Removed]:
    """Remove every cached image no instance's overlay needs, records and images without each other, and partial
    downloads no pull is working on; with `dry_run`, only say what would go."""
    top = root()
    if not top.is_dir():
        return []
    in_use = bases_in_use()
    entries = list_images()
    doomed: list[tuple[str | None, Removed]] = []  # (the lock to hold while removing it, what)
    for entry in entries:
        if os.path.realpath(entry.path) not in in_use:
            where = entry.locations[0] if entry.locations else entry.key
            doomed.append((entry.key, Removed(entry.path, f"image {entry.short} ({where})", _size(entry.path))))
            doomed.append((entry.key, Removed(_record_path(entry.key), "its record", _size(_record_path(entry.key)))))
    known = {e.path.name for e in entries} | {_record_path(e.key).name for e in entries}
    now = time.time()
    for name in sorted(os.listdir(top)):
        path = top / name
        stem, _, suffix = name.rpartition(".")
        if name in known or path.is_symlink() or not path.is_file():
            continue
        if KEY.fullmatch(stem) and suffix == "json":
            doomed.append((stem, Removed(path, "a record without its image", _size(path))))
        elif image_key(name) and os.path.realpath(path) not in in_use:
            doomed.append((stem, Removed(path, "an image without its record", _size(path))))
        elif name.startswith(".") and now - path.lstat().st_mtime > STALE_TEMP_SECONDS:
            doomed.append((None, Removed(path, "a temporary file left by a crash", _size(path))))
    partial = top / "partial"
    for path in sorted(partial.iterdir()) if partial.is_dir() else []:
        if path.name.startswith("."):  # a record being written now, or one a crash left long ago
            if path.is_file() and now - path.lstat().st_mtime > STALE_TEMP_SECONDS:
                doomed.append((None, Removed(path, "a temporary file left by a crash", _size(path))))
        elif path.is_file() and not path.is_symlink():
            what = "a partial download" if ".part" in path.name else "an unfinished unpack"
            doomed.append((f"fetch-{path.name.split('.', 1)[0]}", Removed(path, what, _size(path))))
    if dry_run:
        going = {item.path for _, item in doomed}
        return [item for _, item in doomed] + _boot_orphans(_image_keys(top) - {p.stem for p in going})
    removed = []
    for lock, item in doomed:
        if _remove_unless_busy(lock, item.path):
            removed.append(item)
    for item in _boot_orphans(_image_keys(top)):
        shutil.rmtree(item.path, ignore_errors=True)
        removed.append(item)
    return removed


def _image_keys(top: Path) -> set[str]:
    """The keys of the image files in the cache folder now."""
    return {key for name in os.listdir(top) if (key := image_key(name))}


def _boot_orphans(keys: set[str]) -> list[Removed]:
    """Kernels read out of images that are gone (bootcache.py), and temporary folders a crash left there."""
    return [Removed(path, "a kernel and initrd read out of an image no longer cached" if not path.name.startswith(".")
                    else "a temporary folder left by a crash", _tree_size(path)) for path in bootcache.orphans(keys)]


def _tree_size(path: Path) -> int:
    return sum(_size(path / name) for name in os.listdir(path)) if path.is_dir() else 0


def _remove_unless_busy(lock: str | None, path: Path) -> bool:
    """Unlink `path` under its lock: not while a pull works on that location, nor when an instance has just made
    the image its base."""
    if lock is None:
        path.unlink(missing_ok=True)
        return True
    with _locked(lock, blocking=not lock.startswith("fetch-")) as free:
        if not free:
            return False
        if path.suffix[1:] in (*FORMATS, "json"):  # an image, or the record of one, an overlay now needs
            in_use = bases_in_use()
            if any(os.path.realpath(path.with_suffix(f".{fmt}")) in in_use for fmt in FORMATS):
                return False
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True
