"""Daemonizing a VM: double fork, new session, pid file, logs in the instance folder, a readiness pipe."""
import logging
import os
import select
import sys
import time
import traceback
from typing import Callable

from .fsutil import atomic_write
from .instances import Instance, pid_record
from .logfile import open_log

READY, FAILED, STARTED = "running", "error", "started"
STARTED_WAIT = 10.0  # seconds a daemon may take to exist, whatever `wait` says


def _read_line(fd: int, deadline: float) -> str | None:
    """One line from the daemon's pipe ("" at EOF); None when `deadline` passes first. Reads byte by byte so that
    a second line stays in the pipe for the next call."""
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        byte = os.read(fd, 1)
        if not byte:
            break
        line += byte
    return line.decode(errors="replace").strip()


def spawn(instance: Instance, target: Callable[[Callable[[str], None]], int], wait: float = 60.0,
          close_in_daemon: tuple[int, ...] = ()) -> tuple[str, int]:
    """Run `target(ready)` in a daemon (double fork, setsid, stdio to the instance's vmm.log). The daemon closes
    `close_in_daemon` first (e.g. the caller's instance lock, which must not live on in the VM).

    The daemon calls `ready("running")` once the VM runs, or the failure is reported from its exception.
    Returns ("running", pid) or ("error: ...", pid) once the daemon says so, or ("timeout", pid)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # first child: leave the caller's session, fork again so the daemon is not a session leader
        try:
            for fd in (r, *close_in_daemon):
                os.close(fd)
            os.setsid()
            if os.fork():
                os._exit(0)
            _daemon_main(instance, target, w)
        finally:
            os._exit(1)
    os.close(w)
    os.waitpid(pid, 0)
    try:  # first the daemon says it exists (pid file written), then how the start went
        started = _read_line(r, time.monotonic() + max(wait, STARTED_WAIT))
        if started != STARTED:
            return started or "error: the daemon exited before the VM started", instance.pid() or 0
        text = _read_line(r, time.monotonic() + wait)
        if text is None:
            return "timeout", instance.pid() or 0
    finally:
        os.close(r)
    text = text or "error: the daemon exited before the VM started"
    return text, instance.pid() or 0


def _daemon_main(instance: Instance, target, ready_fd: int) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.umask(0o077)  # everything the VM writes in its instance folder is private
    logfd = open_log(instance.vmm_log)
    os.dup2(logfd, 1)
    os.dup2(logfd, 2)
    os.close(devnull)
    os.close(logfd)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s cloudkvm[%(process)d] %(levelname)s %(message)s")
    atomic_write(instance.pid_file, pid_record(os.getpid()).encode(), mode=0o600)
    os.write(ready_fd, f"{STARTED}\n".encode())
    said = []

    def ready(state: str) -> None:
        if not said:
            said.append(state)
            os.write(ready_fd, (state + "\n").encode())
            os.close(ready_fd)

    code = 1
    try:
        code = target(ready)
    except BaseException as exc:  # noqa: BLE001  (the daemon must report, whatever went wrong)
        logging.error("the VM failed: %s", exc)
        traceback.print_exc()
        if not said:
            ready(f"{FAILED}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    finally:
        if not said:
            ready(f"{FAILED}: the VM ended before it was running")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
