"""SSH keys for a cloud image's user: the key pair cloudkvm makes for each instance (the system `ssh-keygen`),
the user's own public keys (`~/.ssh/*.pub`), and the check of a public key written in a profile (the OpenSSH
authorized_keys form `TYPE BASE64 [COMMENT]`, sshd(8) "AUTHORIZED_KEYS FILE FORMAT", whose blob is the RFC 4253
§6.6 public key encoding and starts with the same type name)."""
from __future__ import annotations

import base64
import binascii
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
from pathlib import Path

from ..errors import CloudkvmError, printable
from ..fsutil import atomic_write, read_bounded

PRIVATE_KEY_NAME = "ssh_key"
KEY_TYPE = re.compile(r"ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-(ssh-ed25519|ecdsa-sha2-nistp256)"
                      r"@openssh\.com")
MAX_KEY_LINE = 16 << 10  # an RSA-16384 key is about 2.8 KiB of base64
MAX_PUB_FILE = 64 << 10
MAX_PUB_FILES = 64
KEYGEN_TIMEOUT = 60
_INSTALL_HINT = "install the OpenSSH client: apt-get install openssh-client"


def check_public_key(line: str, where: str) -> str:
    """`line` as one normalized authorized_keys entry `TYPE BASE64 [COMMENT]` if it is an ssh public key whose
    base64 blob decodes and names the same type (RFC 4253 §6.6); else a one-line error naming `where`."""
    text = line.strip()
    shown = printable(text[:40]) + ("..." if len(text) > 40 else "")
    hint = "paste one line of a .pub file: ssh-ed25519 AAAA... comment"
    if len(text) > MAX_KEY_LINE:
        raise CloudkvmError(f"{where}: an ssh public key of {len(text)} characters is too long", hint)
    if not text.replace("\t", " ").isprintable():
        raise CloudkvmError(f"{where}: the ssh public key {shown!r} holds a line break or control character",
                            "write one key per list item")
    parts = text.split(None, 2)
    if not parts:
        raise CloudkvmError(f"{where}: the ssh public key is empty", hint)
    if not KEY_TYPE.fullmatch(parts[0]):
        why = ("authorized_keys options are not taken here" if "=" in parts[0] or "," in parts[0] else
               "the key type is not ssh-ed25519, ssh-rsa, ecdsa-sha2-nistp256/384/521 or sk-...@openssh.com")
        raise CloudkvmError(f"{where}: {shown!r} is not an ssh public key: {why}", hint)
    if len(parts) < 2:
        raise CloudkvmError(f"{where}: the {parts[0]} key has no key data after its type", hint)
    key_type, blob = parts[0], parts[1]
    try:
        decoded = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        raise CloudkvmError(f"{where}: the {key_type} key's data is not base64", hint) from None
    named = _blob_type(decoded)
    if named != key_type.encode():
        found = f"is of type {printable(named.decode('ascii', 'replace'))[:40]}" if named else "is not an ssh key"
        raise CloudkvmError(f"{where}: the {key_type} key's data {found} (RFC 4253 §6.6)",
                            "copy the whole line of the .pub file unchanged")
    return " ".join(parts)


def _blob_type(blob: bytes) -> bytes | None:
    """The type name a public key blob starts with (an SSH `string`: uint32 length, bytes), if key data follows."""
    if len(blob) < 4:
        return None
    (length,) = struct.unpack_from(">I", blob)
    if length == 0 or 4 + length >= len(blob):
        return None
    return blob[4:4 + length]


def user_public_keys(home: Path | None = None) -> list[str]:
    """The public keys in `home`/.ssh/*.pub (default: the user's home): regular files of at most 64 KiB, the lines
    `check_public_key` takes, each key once, in file-name order; files that cannot be read are passed over."""
    folder = Path(home if home is not None else Path.home()) / ".ssh"
    try:
        names = sorted(name for name in os.listdir(folder) if name.endswith(".pub"))[:MAX_PUB_FILES]
    except OSError:
        return []
    keys: list[str] = []
    seen: set[tuple[str, str]] = set()
    for name in names:
        path = folder / name
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                continue
            data = read_bounded(path, MAX_PUB_FILE, follow_symlinks=True)
        except OSError:
            continue
        for line in data.decode("utf-8", "replace").splitlines():
            try:
                key = check_public_key(line, str(path))
            except CloudkvmError:
                continue
            identity = tuple(key.split(None, 2)[:2])
            if identity not in seen:
                seen.add(identity)
                keys.append(key)
    return keys


def _ssh_keygen() -> str:
    found = shutil.which("ssh-keygen")
    if found is None:
        raise CloudkvmError("ssh-keygen not found: cloudkvm makes each instance's ssh key pair with it", _INSTALL_HINT)
    return found


def _run_keygen(keygen: str, *args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([keygen, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              errors="replace", timeout=KEYGEN_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CloudkvmError(f"ssh-keygen could not run: {exc}", _INSTALL_HINT) from None


def _public_from_private(keygen: str, private: Path) -> list[str] | None:
    """[type, base64] of the key `private` holds (`ssh-keygen -y`, no passphrase), or None if it holds none."""
    try:
        info = os.lstat(private)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(info.st_mode) or info.st_size == 0 or info.st_size > MAX_PUB_FILE:
        return None
    if stat.S_IMODE(info.st_mode) != 0o600:
        os.chmod(private, 0o600)  # ssh and ssh-keygen refuse a private key others can read
    result = _run_keygen(keygen, "-y", "-P", "", "-f", str(private))
    parts = result.stdout.split()
    if result.returncode != 0 or len(parts) < 2 or parts[0] != "ssh-ed25519":
        return None
    return parts[:2]


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise CloudkvmError(f"{printable(str(path))} is a folder, where the instance's ssh key belongs",
                            "remove it") from None


def instance_key(folder: Path, comment: str) -> tuple[Path, str]:
    """The instance's ed25519 key pair `folder/ssh_key` (0600) and `ssh_key.pub`, made once with `ssh-keygen -t
    ed25519 -N "" -C comment`: (private key path, public key line). A missing or unreadable private key makes a new
    pair; a missing or mismatched .pub is written again from the private key."""
    if not comment.isprintable():
        raise ValueError(f"ssh key comment {comment!r} holds a control character")
    keygen = _ssh_keygen()
    folder = Path(folder)
    private, public = folder / PRIVATE_KEY_NAME, folder / f"{PRIVATE_KEY_NAME}.pub"
    derived = _public_from_private(keygen, private)
    if derived is None:
        _remove(private)
        _remove(public)
        _generate(keygen, folder, private, public, comment)
        derived = _public_from_private(keygen, private)
        if derived is None:
            raise CloudkvmError(f"ssh-keygen made {printable(str(private))} but cannot read it back",
                                "check the instance folder's file system")
    try:
        current = read_bounded(public, MAX_PUB_FILE).decode("utf-8", "replace").strip()
    except OSError:
        current = ""
    if current.split()[:2] == derived:
        return private, current
    line = " ".join([*derived, comment]) if comment else " ".join(derived)
    _remove(public)  # a symlink or other file planted there is replaced, never written through
    atomic_write(public, (line + "\n").encode(), mode=0o644)
    return private, line


def _generate(keygen: str, folder: Path, private: Path, public: Path, comment: str) -> None:
    """A new pair made in a temporary folder beside the final names, then moved in: private key first, so a crash
    leaves at worst a private key without its .pub, which `instance_key` writes again."""
    staging = Path(tempfile.mkdtemp(prefix=".ssh_key.", dir=folder))
    try:
        made = staging / PRIVATE_KEY_NAME
        result = _run_keygen(keygen, "-t", "ed25519", "-N", "", "-C", comment, "-q", "-f", str(made))
        if result.returncode != 0:
            first = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[0]
            raise CloudkvmError(f"ssh-keygen could not make the instance key: {printable(first)[:200]}",
                                "check the instance folder is writable")
        os.chmod(made, 0o600)
        os.replace(made, private)
        os.replace(staging / f"{PRIVATE_KEY_NAME}.pub", public)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
