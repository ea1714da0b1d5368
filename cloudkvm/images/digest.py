"""Image digests as profiles name them (Lima-style `digest: sha256:HEX` / `sha512:HEX`) and as distributions publish
them (GNU coreutils `sha256sum`/`sha512sum` check files, "HEX  NAME" or "HEX *NAME", and the BSD/`--tag` form
"SHA256 (NAME) = HEX" of Ubuntu's and Fedora's CHECKSUM files); streaming verification of a file against one."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import CloudkvmError

ALGORITHMS = {"sha256": 64, "sha512": 128}  # algorithm -> hex digits
_HEX = re.compile(r"[0-9a-f]+")
_GNU_LINE = re.compile(r"(?P<hex>[0-9a-fA-F]{64}|[0-9a-fA-F]{128}) [ *](?P<name>.+)")
_BSD_LINE = re.compile(r"(?P<algo>SHA256|SHA512) \((?P<name>.+)\) = (?P<hex>[0-9a-fA-F]+)")
_DIGEST_SHAPE = re.compile(r"\s*[A-Za-z0-9-]+:[0-9A-Fa-f]*\s*")
CHUNK = 1 << 20


@dataclass(frozen=True)
class Digest:
    """An algorithm and the lower-case hex digest of an image."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def is_digest(text: str) -> bool:
    """Whether a profile's `digest` is written as a digest (`algorithm:hex`, checked by parse_digest), not as the
    URL or path of a checksum file."""
    return _DIGEST_SHAPE.fullmatch(str(text)) is not None


def parse_digest(text: str, where: str = "digest") -> Digest:
    """`sha256:HEX` or `sha512:HEX` (hex of the right length, any case) -> Digest; a one-line error otherwise."""
    algorithm, sep, value = str(text).strip().partition(":")
    algorithm, value = algorithm.lower(), value.lower()
    if not sep or algorithm not in ALGORITHMS:
        raise CloudkvmError(f"{where}: '{str(text)[:80]}' is not a digest",
                            "write sha256:<64 hex digits> or sha512:<128 hex digits>, or the URL of a SHA256SUMS file")
    if len(value) != ALGORITHMS[algorithm] or not _HEX.fullmatch(value):
        raise CloudkvmError(f"{where}: a {algorithm} digest is {ALGORITHMS[algorithm]} hex digits "
                            f"(got {len(value)} characters)", "copy it from the distribution's checksum file")
    return Digest(algorithm, value)


def digest_from_sums(text: str, filename: str, source: str = "the checksum file") -> Digest:
    """The digest a checksum file (GNU or BSD format, comments and blank lines allowed) gives for `filename`
    (matched on its last path component, as the files list names relative to their folder)."""
    wanted = filename.rsplit("/", 1)[-1]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        gnu, bsd = _GNU_LINE.fullmatch(line), _BSD_LINE.fullmatch(line)
        if gnu:
            name, algorithm = gnu["name"], "sha256" if len(gnu["hex"]) == 64 else "sha512"
            value = gnu["hex"]
        elif bsd:
            name, algorithm, value = bsd["name"], bsd["algo"].lower(), bsd["hex"]
        else:
            continue
        if name.rsplit("/", 1)[-1].removeprefix("./") == wanted:
            return parse_digest(f"{algorithm}:{value}", f"{source}, line for {wanted}")
    raise CloudkvmError(f"{source} lists no checksum for {wanted}",
                        "check the image file name, or name its digest as sha256:<hex>")


def file_digest(path: Path, algorithm: str) -> str:
    """The hex digest of the file at `path`, read in 1 MiB chunks (images are gigabytes)."""
    hasher = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def verify(path: Path, expected: Digest) -> None:
    """A one-line error naming both digests when the file at `path` is not the image `expected` describes."""
    actual = file_digest(path, expected.algorithm)
    if actual != expected.hex:
        raise CloudkvmError(f"{path}: {expected.algorithm} is {actual}, expected {expected.hex}",
                            "the download is damaged or the image changed upstream; it was not used")
