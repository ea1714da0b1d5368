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


_KINDS = ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    """What an st_mode is, in words for an error: "a file", "a folder", "a FIFO", "a block device", ..."""
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def open_regular(path, follow_symlinks: bool = False):
    """A binary file object on `path` if it is a regular file (reached without following a symlink unless
    `follow_symlinks`: a user's kernel or initrd path may be one); else OSError. A FIFO, device or symlink planted
    where a state or log file belongs never blocks or redirects the read."""
    nofollow = 0 if follow_symlinks else os.O_NOFOLLOW
    fd = os.open(path, os.O_RDONLY | nofollow | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path, limit: int, follow_symlinks: bool = False) -> bytes:
    """All of `path`, a regular file (opened as `open_regular` does) of at most `limit` bytes; OSError EFBIG when it
    is larger. Only what the file holds is asked for: read(n) allocates n bytes before it reads any."""
    with open_regular(path, follow_symlinks) as f:
        data = f.read(min(os.fstat(f.fileno()).st_size, limit) + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes")
    return data


def read_regular(path, limit: int = 1 << 20) -> bytes:
    """The first `limit` bytes of `path`, opened as `open_regular` does."""
    with open_regular(path) as f:
        return f.read(limit)


def tail_regular(path, limit: int = 64 << 10) -> bytes:
    """The last `limit` bytes of `path`, opened as `open_regular` does."""
    with open_regular(path) as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
        return f.read(limit)


def is_within(path, folder) -> bool:
    """Whether `path` resolves (symlinks included) to `folder` or somewhere below it."""
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, top]) == top
