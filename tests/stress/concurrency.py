"""The concurrency run (issue 11): VMs started and stopped in parallel, round after round, through the CLI as users
would, with two racing `up`s per name; after each round nothing may be left: no VMM process, no listening forward
port, no control socket, no held instance lock, no instance folder.

Each VM is the purpose-built power_button guest with user networking and one TCP forward on its own port (so a
leaked slirp listener shows), started by two concurrent `cloudkvm up` (exactly one may win, the other must exit
2 saying "already running" or "being started"), then `down` and `rm` in parallel."""
from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cloudkvm.guests.build import build_flat
from waits import processes_naming

GUESTS = Path(__file__).resolve().parents[1] / "guests"


@dataclass
class Figures:
    rounds: int = 0
    vms_started: int = 0
    race_losers_ok: int = 0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"rounds={self.rounds} vms_started={self.vms_started} race_losers_refused={self.race_losers_ok} "
                f"leaks_or_errors={len(self.problems)}")


def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cloudkvm", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False



def lock_held(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def write_profiles(workdir: Path, vms: int, marker: str) -> list[tuple[str, Path, int]]:
    guest = build_flat(GUESTS / "power_button.c")
    out = []
    for i, port in enumerate(free_ports(vms)):
        name = f"{marker}-{i}"
        path = workdir / f"{name}.yaml"
        path.write_text(f"name: {name}\nmemory: 32M\nboot:\n  kernel: {guest}\n  format: flat\n"
                        f"network:\n  mode: user\n  forwards: [tcp:127.0.0.1:{port}-:22]\n")
        out.append((name, path, port))
    return out


def one_round(env: dict, vms: list[tuple[str, Path, int]], state: Path, marker: str, figures: Figures) -> None:
    problems = figures.problems
    with ThreadPoolExecutor(max_workers=2 * len(vms)) as pool:
        ups = list(pool.map(lambda job: (job[0], cli(env, "up", str(job[1]))), [v for v in vms for _ in (0, 1)]))
        for name, _, port in vms:
            results = [p for n, p in ups if n == name]
            winners = [p for p in results if p.returncode == 0]
            if len(winners) != 1:
                problems.append(f"{name}: {len(winners)} of 2 racing ups started it: "
                                f"{[p.stderr.strip() for p in results]}")
                continue
            figures.vms_started += 1
            for loser in (p for p in results if p.returncode):
                if loser.returncode == 2 and ("already running" in loser.stderr or "being started" in loser.stderr):
                    figures.race_losers_ok += 1
                else:
                    problems.append(f"{name}: the losing up said {loser.returncode} {loser.stderr.strip()!r}")
            if port_free(port):
                problems.append(f"{name}: running, but its forward port {port} is not listening")
        downs = list(pool.map(lambda v: cli(env, "down", v[0], "--force"), vms))
        removes = list(pool.map(lambda v: cli(env, "rm", v[0], "--force"), vms))
    for (name, _, _), down, rm in zip(vms, downs, removes):
        if down.returncode or rm.returncode:
            problems.append(f"{name}: down/rm failed: {down.stderr.strip()} {rm.stderr.strip()}")
    deadline = time.monotonic() + 10
    while processes_naming(marker + "-") and time.monotonic() < deadline:  # the last daemons finishing their exit
        time.sleep(0.1)
    leaked = processes_naming(marker + "-")
    if leaked:
        problems.append(f"processes left: {leaked}")
    for name, _, port in vms:
        if not port_free(port):
            problems.append(f"{name}: forward port {port} still bound")
        if (state / name).exists():
            problems.append(f"{name}: instance folder left: {sorted(p.name for p in (state / name).iterdir())}")
        lock = state / ".locks" / f"{name}.lock"
        if lock.exists() and lock_held(lock):
            problems.append(f"{name}: instance lock still held")
    figures.rounds += 1


def run(workdir: Path, vms: int, rounds: int, progress=print) -> Figures:
    marker = f"ckrace{os.getpid()}"
    state = workdir / "state"
    env = {**os.environ, "CLOUDKVM_STATE_DIR": str(state)}
    profiles = write_profiles(workdir, vms, marker)
    figures = Figures()
    for number in range(1, rounds + 1):
        before = len(figures.problems)
        started = time.monotonic()
        one_round(env, profiles, state, marker, figures)
        progress(f"round {number}/{rounds}: {time.monotonic() - started:.1f} s, "
                 f"{len(figures.problems) - before} problems")
        for problem in figures.problems[before:]:
            progress(f"  {problem}")
    return figures
