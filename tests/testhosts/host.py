"""Boots an emulated KVM test host (QEMU TCG), runs one shell command inside it, returns output and status.

The command runs as root in a chroot of the host's root (9p, read-only) with /proc, /sys, /dev (with /dev/kvm),
a tmpfs /tmp and HOME, and these writable 9p shares at their own paths: a per-run scratch folder and cloudkvm's
cache (so a guest built or fetched here is reused there). The project tree is shared read-only at its own path
too (on x86_64 it may live under /tmp, a tmpfs there); for a foreign architecture with cloudkvm's cffi core for
that architecture beside the host's.
"""
from __future__ import annotations

import compileall
import ctypes
import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cloudkvm.cache import cache_dir
from cloudkvm.fsutil import atomic_write

from .build import PROJECT_ROOT, HostImages, build_host
from .recipes import RECIPES, HostRecipe

KERNEL_ARGS = "panic=-1 loglevel=4 mitigations=off rdinit=/init"
# x86_64: L1 never halts. In the hangs (docs/testing.md) QEMU's emulated CPU sat halted waiting for an interrupt
# that never woke it (its vCPU thread asleep in qemu_wait_io_event, no CPU time used). Polling is no cure (a later
# hang spun in the idle loop: the timer interrupt is not delivered at all), but no CI run has stopped with it yet.
# Not part of the recipe, so the cached host images stay valid.
HOST_KERNEL_ARGS = {"x86_64": "idle=poll"}
# QEMU TCG's nested SVM now and then leaves the emulated CPU in the L2 guest for good (docs/testing.md): the init's
# heartbeat stops, and the run is booted once more. A command that fails is never retried.
# The heartbeat never lagged more than 11 s in a working host (docs/testing.md); a stopped one costs its boot and
# HANG_SECONDS, so hangs are found sooner and retried more often than at first (the realkvm cloud-image test hung
# on three boots in a row twice in .ci/run, and on one boot of three by hand, on 2026-12-04).
HANG_SECONDS, HANG_ATTEMPTS = 60, 5
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
FOREIGN_CORE_NAME = {"arm64": "_native.cpython-311-aarch64-linux-gnu.so"}


def _compile_tree() -> None:
    """Byte-compile the project's Python here, as an installation does: the test host sees the tree read-only, so
    every process it starts would otherwise compile each module it imports from source (seconds under TCG)."""
    for folder in ("cloudkvm", "tests"):
        compileall.compile_dir(PROJECT_ROOT / folder, quiet=2, workers=1)


@dataclass(frozen=True)
class RunResult:
    status: int | None  # the command's exit status; None when it did not finish (time-out, test host died)
    output: str         # its stdout and stderr
    console: str        # the test host's own serial console (its kernel log, the init's messages)
    seconds: float      # wall time from QEMU start to its exit
    hung: bool = False  # the emulated machine stopped running (its heartbeat stopped), not the command failing
    attempts: int = 1   # boots it took: a hung machine is booted once more

    def describe(self) -> str:
        """The output, or the console where the command never ran: for assertion messages."""
        hung = f"the emulated machine hung on each of {self.attempts} boots; " if self.hung else ""
        return hung + (self.output[-6000:] if self.output else "no output; test host console:\n" + self.console[-6000:])


class TestHost:
    """One kind of emulated KVM host; each `run` boots a fresh one (5-10 s to the command)."""

    __test__ = False  # not a pytest test class

    def __init__(self, recipe: HostRecipe, images: HostImages):
        self.recipe, self.images = recipe, images

    def _python_env(self) -> dict[str, str]:
        if self.recipe.own_root:
            bindir = os.path.dirname(os.path.realpath(sys.executable))
            return {"PATH": f"{bindir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONPATH": str(PROJECT_ROOT)}

    def _shares(self) -> list[tuple[str, Path, str]]:
        """(tag, host path, mount mode) of the 9p shares mounted at their own paths in the test host's root."""
        cache = cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        # the tree too where the root is this machine's own: it may live under /tmp, which is a tmpfs there
        return [("tree", PROJECT_ROOT, "ro,cache=loose"), ("cache", cache, "rw,cache=none")]

    def _install_foreign_core(self) -> None:
        """Put the cross-built cffi core beside the host's in the tree (its file name is the arch's own)."""
        target = PROJECT_ROOT / "cloudkvm" / "kvm" / FOREIGN_CORE_NAME[self.recipe.name]
        data = self.images.native_core.read_bytes()
        if not target.is_file() or target.read_bytes() != data:
            atomic_write(target, data, mode=0o755)

    def qemu_command(self, scratch: Path, shares: list[tuple[str, Path, str]]) -> list[str]:
        cmd = [self.recipe.qemu, *self.recipe.machine_args, "-accel", "tcg,thread=multi",
               "-display", "none", "-monitor", "none", "-nic", "none", "-no-reboot",
               "-serial", f"file:{scratch / 'console.log'}",
               "-kernel", str(self.images.kernel), "-initrd", str(self.images.initramfs),
               "-append", " ".join(filter(None, (f"console={self.recipe.console}", KERNEL_ARGS,
                                                  HOST_KERNEL_ARGS.get(self.recipe.name))))]
        exports = [("root", self.images.root, True), ("scratch", scratch, False)]
        exports += [(tag, path, mode.startswith("ro")) for tag, path, mode in shares]
        for i, (tag, path, readonly) in enumerate(exports):
            cmd += ["-fsdev", f"local,id=fs{i},path={path},security_model=none,multidevs=remap"
                              + (",readonly=on" if readonly else ""),
                    "-device", f"virtio-9p-pci,fsdev=fs{i},mount_tag={tag}"]
        return cmd

    def run(self, command: str, *, cwd: Path | str = PROJECT_ROOT, env: dict[str, str] | None = None,
            writable: tuple[Path, ...] = (), timeout: float = 1800,
            on_output: Callable[[str], None] | None = None) -> RunResult:
        """Boot the test host, run `command` with /bin/sh in `cwd` (with `writable` folders of this machine
        writable there at their own paths), and return when the host has powered off."""
        if self.images.native_core is not None:
            self._install_foreign_core()
        _compile_tree()
        shares = self._shares() + [(f"rw{i}", Path(p).resolve(), "rw,cache=none") for i, p in enumerate(writable)]
        if not self.recipe.own_root:  # the mount points, made in the (read-only shared) root beforehand
            for _tag, path, _mode in shares:
                (self.images.root / path.relative_to("/")).mkdir(parents=True, exist_ok=True)
        for attempt in range(1, HANG_ATTEMPTS + 1):
            result = self._run_once(command, cwd, env, shares, timeout, on_output)
            if not result.hung:
                break
            print(f"testhost: the emulated {self.recipe.name} machine stopped running (no heartbeat for "
                  f"{HANG_SECONDS} s) on attempt {attempt} of {HANG_ATTEMPTS}", file=sys.stderr, flush=True)
        return dataclasses.replace(result, attempts=attempt)

    def _run_once(self, command: str, cwd, env, shares, timeout: float, on_output) -> RunResult:
        with tempfile.TemporaryDirectory(prefix=f"cloudkvm-testhost-{self.recipe.name}-") as tmp:
            scratch = Path(tmp)
            scratch.chmod(0o755)
            all_env = {"CLOUDKVM_TESTHOST": self.recipe.name, "HOME": "/tmp/home", "TMPDIR": "/tmp",
                       "LANG": "C.UTF-8", "CLOUDKVM_CACHE": str(cache_dir()), "PYTHONDONTWRITEBYTECODE": "1",
                       "PYTHONUNBUFFERED": "1", **self._python_env(), **(env or {})}
            exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in all_env.items())
            (scratch / "command.sh").write_text(f"{exports}mkdir -p \"$HOME\"\n"
                                                f"cd {shlex.quote(str(cwd))} || exit 125\n{command}\n")
            (scratch / "command-path").write_text(str(scratch / "command.sh"))
            (scratch / "shares").write_text("".join(f"{tag} {path} {mode}\n" for tag, path, mode in
                                                    [("scratch", scratch, "rw,cache=none"), *shares]))
            return self._boot(self.qemu_command(scratch, shares), scratch, timeout, on_output)

    def _boot(self, cmd: list[str], scratch: Path, timeout: float,
              on_output: Callable[[str], None] | None) -> RunResult:
        start = time.monotonic()
        qemu_log = (scratch / "qemu.log").open("wb")  # a file, not a pipe nobody reads while it runs
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent)
        qemu_log.close()
        shown, hung = 0, False
        try:
            while proc.poll() is None and time.monotonic() - start < timeout and not hung:
                time.sleep(0.5)
                shown = _follow(scratch / "output", shown, on_output)
                hung = _stale(scratch / "heartbeat", HANG_SECONDS) and proc.poll() is None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        qemu_messages = _read(scratch / "qemu.log")
        _follow(scratch / "output", shown, on_output)
        status_file = scratch / "status"
        status = int(status_file.read_text().strip()) if status_file.is_file() and not hung else None
        console = _read(scratch / "console.log") + (f"\n[qemu] {qemu_messages}" if qemu_messages.strip() else "")
        return RunResult(status, _read(scratch / "output"), console, time.monotonic() - start, hung)


def _die_with_parent() -> None:
    """In the QEMU child: be killed when the harness dies (a killed test run must not leave TCG running)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _stale(heartbeat: Path, seconds: float) -> bool:
    """Whether the test host's heartbeat file (touched every 5 s once its init runs) is older than `seconds`."""
    try:
        return time.time() - heartbeat.stat().st_mtime > seconds
    except FileNotFoundError:
        return False  # still booting: the overall time-out covers that


def _read(path: Path) -> str:
    return path.read_bytes().decode(errors="replace") if path.is_file() else ""


def _follow(path: Path, shown: int, on_output: Callable[[str], None] | None) -> int:
    """Pass what `path` gained since `shown` bytes to `on_output`; returns the new length."""
    if on_output is None or not path.is_file():
        return shown
    with path.open("rb") as f:
        f.seek(shown)
        new = f.read()
    if new:
        on_output(new.decode(errors="replace"))
    return shown + len(new)


def get_host(name: str) -> TestHost:
    """The test host called `name` (x86_64, arm64), built into the cache on first use."""
    if name not in RECIPES:
        raise ValueError(f"no test host {name!r}: choose from {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    if shutil.which(recipe.qemu) is None:
        raise RuntimeError(f"{recipe.qemu} not found: apt-get install qemu-system-x86 qemu-system-arm")
    return TestHost(recipe, build_host(recipe))
