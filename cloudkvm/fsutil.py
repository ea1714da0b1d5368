"""Files written whole or not at all (temp file in the same folder, fsync, rename): caches never hold half a file."""
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path


def atomic_write(path, data: bytes, mode: int = 0o644) -> Path:
    """Write `data` to `path` atomically; the folder must exist. Returns the path."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def install_dir(staging: Path, final: Path) -> None:
    """Atomically publish a fully written staging folder as `final` (a concurrent winner is kept)."""
    try:
        staging.rename(final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(staging, ignore_errors=True)


def read_regular(path, limit: int = 1 << 20) -> bytes:
    """The first `limit` bytes of `path` if it is a regular file reached without following a symlink; else
    OSError. A FIFO, device or symlink planted where a state file belongs never blocks or redirects the read."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        return os.read(fd, limit)
    finally:
        os.close(fd)
