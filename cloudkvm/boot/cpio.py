"""newc cpio per Documentation/driver-api/early-userspace/buffer-format.rst; no maintained PyPI library writes newc."""

from __future__ import annotations

import stat
from dataclasses import dataclass

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
HEADER_LEN = 110  # 6-byte magic + 13 fields of 8 hex digits
_FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize",
           "devmajor", "devminor", "rdevmajor", "rdevminor", "namesize", "check")
_U32 = 0xFFFF_FFFF


@dataclass(frozen=True)
class CpioEntry:
    """One archive member; `name` is stored without a leading '/', `mode` includes the S_IF* type bits."""

    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    nlink: int = 1
    rdevmajor: int = 0
    rdevminor: int = 0
    ino: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_chardev(self) -> bool:
        return stat.S_ISCHR(self.mode)


def _pad4(n: int) -> int:
    return (-n) % 4


def _norm(name: str) -> str:
    name = name.lstrip("/")
    if not name or "\0" in name:
        raise ValueError(f"invalid cpio member name {name!r}")
    return name


class NewcWriter:
    """Collects members in insertion order (parents first!) and serialises them deterministically."""

    def __init__(self) -> None:
        self._entries: list[CpioEntry] = []
        self._names: set[str] = set()

    def _add(self, name: str, kind: int, perm: int, data: bytes, uid: int, gid: int, mtime: int,
             nlink: int = 1, rdev: tuple[int, int] = (0, 0)) -> None:
        name = _norm(name)
        if name in self._names:
            raise ValueError(f"duplicate cpio member {name!r}")
        if len(data) > _U32:
            raise ValueError(f"cpio member {name!r} is larger than 4 GiB")
        self._names.add(name)
        self._entries.append(CpioEntry(name, kind | (perm & 0o7777), bytes(data), uid, gid, mtime,
                                       nlink, rdev[0], rdev[1], ino=len(self._entries) + 1))

    def add_dir(self, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0, mtime: int = 0) -> None:
        self._add(name, stat.S_IFDIR, mode, b"", uid, gid, mtime, nlink=2)

    def add_file(self, name: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0,
                 mtime: int = 0) -> None:
        self._add(name, stat.S_IFREG, mode, data, uid, gid, mtime)

    def add_symlink(self, name: str, target: str, uid: int = 0, gid: int = 0, mtime: int = 0) -> None:
        self._add(name, stat.S_IFLNK, 0o777, target.encode("utf-8", "surrogateescape"), uid, gid, mtime)

    def add_chardev(self, name: str, major: int, minor: int, mode: int = 0o600, uid: int = 0,
                    gid: int = 0, mtime: int = 0) -> None:
        self._add(name, stat.S_IFCHR, mode, b"", uid, gid, mtime, rdev=(major, minor))

    @staticmethod
    def _record(e: CpioEntry) -> bytes:
        name = e.name.encode("utf-8", "surrogateescape") + b"\0"
        values = (e.ino, e.mode, e.uid, e.gid, e.nlink, e.mtime, len(e.data), 0, 0,
                  e.rdevmajor, e.rdevminor, len(name), 0)
        for field, v in zip(_FIELDS, values):
            if not 0 <= v <= _U32:
                raise ValueError(f"cpio field {field}={v} of {e.name!r} does not fit in 32 bits")
        head = MAGIC + b"".join(b"%08X" % v for v in values) + name
        return head + b"\0" * _pad4(len(head)) + e.data + b"\0" * _pad4(len(e.data))

    def to_bytes(self) -> bytes:
        """The whole archive including the TRAILER!!! record; same members in, same bytes out."""
        trailer = CpioEntry(TRAILER, 0, nlink=1)
        return b"".join(self._record(e) for e in [*self._entries, trailer])


def read_newc(data: bytes) -> list[CpioEntry]:
    """Parse a newc archive up to its TRAILER!!! (which is not returned); raises ValueError if malformed."""
    entries: list[CpioEntry] = []
    off = 0
    while True:
        if off + HEADER_LEN > len(data):
            raise ValueError(f"truncated cpio header at offset {off}")
        if data[off:off + 6] not in (b"070701", b"070702"):
            raise ValueError(f"bad cpio magic {data[off:off + 6]!r} at offset {off}")
        try:
            f = dict(zip(_FIELDS, (int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13))))
        except ValueError:
            raise ValueError(f"non-hex cpio header field at offset {off}") from None
        name_end = off + HEADER_LEN + f["namesize"]
        body = name_end + _pad4(name_end - off)
        end = body + f["filesize"]
        if f["namesize"] < 1 or end > len(data):
            raise ValueError(f"truncated cpio member at offset {off}")
        name = data[off + HEADER_LEN:name_end - 1].decode("utf-8", "surrogateescape")
        if name == TRAILER:
            return entries
        entries.append(CpioEntry(name, f["mode"], bytes(data[body:end]), f["uid"], f["gid"], f["mtime"],
                                 f["nlink"], f["rdevmajor"], f["rdevminor"], f["ino"]))
        off = end + _pad4(f["filesize"])
