"""The cloud-init NoCloud seed: an ISO 9660 image labelled `cidata` holding `meta-data`, `user-data` and optionally
`network-config` and `vendor-data` (cloud-init docs, "NoCloud" datasource), written with pycdlib.

The files carry Rock Ridge names (what Linux's isofs shows when it mounts the seed, and what cloud-init reads) and
Joliet names (for readers without Rock Ridge); the plain ISO 9660 names are level-3 upper-case stand-ins
(`META_DATA.;1`). pycdlib stamps every volume descriptor and directory record with the current time and offers no
way to fix it, so the bytes of two builds differ; instead `write_seed` leaves a seed that already holds exactly the
same files under the same label untouched (same bytes, same inode, same mtime)."""
from __future__ import annotations

import io
import os
import re
import stat
import struct
from pathlib import Path

import pycdlib
from pycdlib.pycdlibexception import PyCdlibException

from ..errors import CloudkvmError, printable
from ..fsutil import atomic_write, open_regular

REQUIRED_FILES = ("meta-data", "user-data")
OPTIONAL_FILES = ("network-config", "vendor-data")
SEED_FILES = REQUIRED_FILES + OPTIONAL_FILES
DEFAULT_LABEL = "cidata"
MAX_SEED_BYTES = 64 << 20  # a seed holds a few small text files; read_seed refuses anything larger
FILE_MODE = 0o100444  # Rock Ridge mode of each file: a read-only regular file
SEED_MODE = 0o600  # the ISO on the host: it holds the instance's user-data
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,16}")  # a Joliet volume identifier holds 16 UCS-2 characters


def _iso9660_name(name: str) -> str:
    """`meta-data` -> `/META_DATA.;1`: a level-3 ISO 9660 file identifier (d-characters only, ECMA-119 §7.5)."""
    return "/" + name.upper().replace("-", "_") + ".;1"


def _check(files: dict[str, bytes], label: str) -> None:
    if not _LABEL.fullmatch(label):
        raise ValueError(f"seed label {label!r}: 1 to 16 letters, digits, '_' or '-'")
    unknown = sorted(set(files) - set(SEED_FILES))
    if unknown:
        raise ValueError(f"not a NoCloud seed file: {', '.join(unknown)} (expected {', '.join(SEED_FILES)})")
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise ValueError(f"a NoCloud seed needs {' and '.join(missing)}")
    for name, data in files.items():
        if not isinstance(data, bytes):
            raise TypeError(f"seed file {name}: bytes expected, got {type(data).__name__}")


def build_seed(files: dict[str, bytes], label: str = DEFAULT_LABEL) -> bytes:
    """The seed ISO's bytes: ISO 9660 level 3 + Joliet level 3 + Rock Ridge 1.09, volume `label`, the files at the
    root in NoCloud order (cloud-init docs, "NoCloud")."""
    _check(files, label)
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident=label, joliet=3, rock_ridge="1.09")
    try:
        for name in SEED_FILES:
            if name in files:
                data = files[name]
                iso.add_fp(io.BytesIO(data), len(data), iso_path=_iso9660_name(name), rr_name=name,
                           joliet_path="/" + name, file_mode=FILE_MODE)
        out = io.BytesIO()
        iso.write_fp(out)
        return out.getvalue()
    finally:
        iso.close()


def write_seed(path: str | os.PathLike, files: dict[str, bytes], label: str = DEFAULT_LABEL) -> bool:
    """Write the NoCloud seed ISO to `path` (mode 0600, atomically: temp file in the same folder, then rename).
    Returns False, leaving the file as it is, when it already holds exactly `files` under `label`."""
    _check(files, label)
    path = Path(path)
    try:
        if _read(path) == (label, files):
            if stat.S_IMODE(os.stat(path, follow_symlinks=False).st_mode) != SEED_MODE:
                os.chmod(path, SEED_MODE)
            return False
    except (OSError, CloudkvmError):
        pass  # no seed yet, or not one we can read: write it anew
    data = build_seed(files, label)
    try:
        atomic_write(path, data, mode=SEED_MODE)
    except OSError as exc:
        raise CloudkvmError(f"{printable(os.fspath(path))}: cannot write the cloud-init seed: {exc.strerror or exc}",
                            "check the instance folder exists and is writable") from None
    return True


def read_seed(path: str | os.PathLike) -> dict[str, bytes]:
    """The NoCloud files (`meta-data`, `user-data`, ...) of a seed ISO by their Rock Ridge names; a one-line error
    when `path` is not a readable seed (a regular file of at most 64 MiB, not reached through a symlink)."""
    try:
        return _read(Path(path))[1]
    except OSError as exc:
        raise CloudkvmError(f"{printable(os.fspath(path))}: cannot read the cloud-init seed: "
                            f"{exc.strerror or exc}", "remove it; `cloudkvm up` writes it again") from None


def _close(iso: pycdlib.PyCdlib) -> None:
    try:
        iso.close()
    except PyCdlibException:
        pass  # never opened: open_fp failed


def _read(path: Path) -> tuple[str, dict[str, bytes]]:
    """(volume label, files) of the seed at `path`; OSError when unreadable, CloudkvmError when not a seed."""
    shown = printable(os.fspath(path))
    with open_regular(path) as fp:
        size = os.fstat(fp.fileno()).st_size
        if size > MAX_SEED_BYTES:
            raise CloudkvmError(f"{shown}: {size} bytes is too large for a cloud-init seed "
                                f"(at most {MAX_SEED_BYTES >> 20} MiB)", "remove it; `cloudkvm up` writes it again")
        iso = pycdlib.PyCdlib()
        try:
            iso.open_fp(fp)
            label = iso.pvd.volume_identifier.decode("ascii", "replace").rstrip(" ")
            files: dict[str, bytes] = {}
            for record in iso.list_children(rr_path="/"):
                if record.is_dot() or record.is_dotdot() or not record.is_file() or record.rock_ridge is None:
                    continue
                name = record.rock_ridge.name().decode("utf-8", "replace")
                if name not in SEED_FILES:
                    continue
                if record.get_data_length() > size:
                    raise CloudkvmError(f"{shown}: {name} claims {record.get_data_length()} bytes, more than the "
                                        "ISO holds", "remove it; `cloudkvm up` writes it again")
                out = io.BytesIO()
                iso.get_file_from_iso_fp(out, rr_path="/" + name)
                files[name] = out.getvalue()
            return label, files
        except (PyCdlibException, struct.error, ValueError, IndexError, KeyError) as exc:  # pycdlib on a bad ISO
            raise CloudkvmError(f"{shown}: not a cloud-init seed ISO: {printable(str(exc))[:200]}",
                                "remove it; `cloudkvm up` writes it again") from None
        finally:
            _close(iso)
