"""Instance folders: everything about one VM (info, pid, logs, control socket, how it ended) in one place."""
import errno
import fcntl
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import CloudkvmError
from .fsutil import atomic_write, read_regular, tail_regular

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def state_root() -> Path:
    """$CLOUDKVM_STATE_DIR, else $XDG_STATE_HOME/cloudkvm, else ~/.local/state/cloudkvm."""
    if os.environ.get("CLOUDKVM_STATE_DIR"):
        return Path(os.environ["CLOUDKVM_STATE_DIR"])
    if os.environ.get("XDG_STATE_HOME"):
        return Path(os.environ["XDG_STATE_HOME"]) / "cloudkvm"
    return Path.home() / ".local" / "state" / "cloudkvm"


def check_name(name: str) -> str:
    if not NAME.match(name or ""):
        raise CloudkvmError(f"instance name '{name}' is not allowed",
                            "use letters, digits, '.', '_' or '-', starting with a letter or digit (max 63)")
    return name


def private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) as a folder only its owner can enter (0700, whatever the umask)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.is_symlink() or not path.is_dir():
        raise CloudkvmError(f"{path}: not a folder", "remove it, or set CLOUDKVM_STATE_DIR to another folder")
    os.chmod(path, 0o700)
    return path


def state_folder_error(path, err: OSError) -> CloudkvmError:
    """The one-line error for a state folder that cannot be written (read-only, full, not a folder)."""
    return CloudkvmError(f"{path}: cannot write the instance folder: {err.strerror or err}",
                         "free space there, make it writable, or set CLOUDKVM_STATE_DIR to another folder")


@contextmanager
def private_files():
    """New files and folders are private (umask 077) while the block runs."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def process_start_time(pid: int) -> int | None:
    """When process `pid` started (field 22 of /proc/PID/stat, clock ticks after boot; proc(5)); None when there
    is no such process. With the pid, it names one process for sure: a reused pid gets a later start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: count fields after its last ')'
        return int(stat.rpartition(")")[2].split()[19])
    except (IndexError, ValueError):
        return None


def pid_record(pid: int) -> str:
    """The pid file's text for process `pid`: its pid and its start time."""
    return f"{pid} {process_start_time(pid)}\n"


@dataclass(frozen=True)
class Instance:
    """One VM's folder. State comes from what is on disk and whether its daemon process is alive."""

    name: str
    dir: Path

    @classmethod
    def named(cls, name: str, root: Path | None = None) -> "Instance":
        return cls(check_name(name), (root or state_root()) / name)

    @property
    def info_file(self) -> Path:
        return self.dir / "instance.json"

    @property
    def pid_file(self) -> Path:
        return self.dir / "vmm.pid"

    @property
    def result_file(self) -> Path:
        return self.dir / "result.json"

    @property
    def console_log(self) -> Path:
        """The serial log: the profile's `console.log` when it named one (recorded at `up`), else console.log here."""
        named = self.info().get("console_log")
        return Path(named) if named else self.dir / "console.log"

    @property
    def vmm_log(self) -> Path:
        return self.dir / "vmm.log"

    @property
    def control_socket(self) -> Path:
        return self.dir / "control.sock"

    def exists(self) -> bool:
        return self.info_file.is_file()

    def info(self) -> dict:
        """What `up` recorded in instance.json; {} when it is missing, unreadable or not a JSON object."""
        try:
            info = json.loads(read_regular(self.info_file))
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def write_json(self, path: Path, data: dict) -> None:
        atomic_write(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), mode=0o600)

    @property
    def lock_file(self) -> Path:
        """Beside the instance folders, so that it outlives `rm` and exists before the folder does."""
        return self.dir.parent / ".locks" / f"{self.name}.lock"

    @contextmanager
    def exclusive(self, doing: str):
        """Hold this instance's lock while starting, running in the foreground or removing it: one cloudkvm command
        at a time; another gets a CloudkvmError at once, told what `doing` (e.g. "being started"). Yields the lock's
        fd (a daemon forked meanwhile must close it)."""
        try:
            private_dir(self.lock_file.parent)
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise state_folder_error(self.lock_file, err) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                holder = os.pread(fd, 128, 0).decode(errors="replace").strip() or "being started or removed"
                raise CloudkvmError(f"instance '{self.name}' is {holder} by another cloudkvm command",
                                    "wait for it to finish; `cloudkvm ls` shows the instance's state") from None
            try:  # who holds it, for the others' message; the lock itself does not need it
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{doing} (pid {os.getpid()})\n".encode(), 0)
            except OSError:
                pass
            yield fd
        finally:
            os.close(fd)

    def recorded_pid(self) -> tuple[int, int] | None:
        """(pid, start time) as the daemon wrote them; None for no file or anything else in it."""
        try:
            fields = read_regular(self.pid_file, 64).split()
            pid, started = int(fields[0]), int(fields[1])
        except (OSError, ValueError, IndexError):
            return None
        return (pid, started) if len(fields) == 2 and pid > 1 else None

    def pid(self) -> int | None:
        """The daemon's pid while that very process runs (the pid and its start time as recorded), else None:
        a pid reused by another process, or a pid file holding 0, 1 or -1, names no daemon to signal."""
        record = self.recorded_pid()
        if record is None or process_start_time(record[0]) != record[1]:
            return None
        return record[0]

    def result(self) -> dict | None:
        try:
            return json.loads(read_regular(self.result_file))
        except (OSError, ValueError):
            return None

    def state(self) -> str:
        """running | stopped (ended, with a result) | crashed (daemon gone without a result) | created."""
        if self.pid() is not None:
            return "running"
        if self.result() is not None:
            return "stopped"
        if os.path.lexists(self.pid_file):
            return "crashed"
        return "created"

    def log_tail(self, lines: int = 5) -> str:
        """The last lines of the VMM log, on one line."""
        try:
            tail = tail_regular(self.vmm_log).decode(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return "no log"
        return " | ".join(tail) or "empty log"

    def crash_reason(self) -> str:
        """Why a daemon died without saying how its VM ended: that, and the end of its log."""
        return f"the VM process died without recording a result: {self.log_tail()}"

    def uptime(self) -> float | None:
        started = self.info().get("started_at")
        return time.time() - started if started and self.state() == "running" else None


def list_instances(root: Path | None = None) -> list[Instance]:
    base = root or state_root()
    if not base.is_dir():
        return []
    return sorted((Instance(p.name, p) for p in base.iterdir() if (p / "instance.json").is_file()),
                  key=lambda i: i.name)
