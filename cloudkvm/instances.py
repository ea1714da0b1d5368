"""Instance folders: everything about one VM (info, pid, logs, control socket, how it ended) in one place."""
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import CloudkvmError
from .fsutil import atomic_write

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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        try:
            return json.loads(self.info_file.read_text())
        except (OSError, ValueError):
            return {}

    def write_json(self, path: Path, data: dict) -> None:
        atomic_write(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())

    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def result(self) -> dict | None:
        try:
            return json.loads(self.result_file.read_text())
        except (OSError, ValueError):
            return None

    def state(self) -> str:
        """running | stopped (ended, with a result) | crashed (daemon gone without a result) | created."""
        pid = self.pid()
        if pid is not None and _pid_alive(pid):
            return "running"
        if self.result() is not None:
            return "stopped"
        if pid is not None:
            return "crashed"
        return "created"

    def crash_reason(self, lines: int = 5) -> str:
        """The last lines of the VMM log: why a daemon died without saying how its VM ended."""
        try:
            tail = self.vmm_log.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return "no log"
        return " | ".join(tail) or "empty log"

    def uptime(self) -> float | None:
        started = self.info().get("started_at")
        return time.time() - started if started and self.state() == "running" else None


def list_instances(root: Path | None = None) -> list[Instance]:
    base = root or state_root()
    if not base.is_dir():
        return []
    return sorted((Instance(p.name, p) for p in base.iterdir() if (p / "instance.json").is_file()),
                  key=lambda i: i.name)
