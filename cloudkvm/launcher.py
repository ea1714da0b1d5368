"""VM lifecycle for the CLI: `up` (validate, prepare the instance folder, daemonize), `down`, `rm`, status."""
import json
import logging
import os
import shutil
import signal
import time

from . import control, daemon
from .errors import CloudkvmError
from .instances import Instance, list_instances
from .boards.x86_cpu import CpuPolicy
from .machine import FlatBinary, LinuxBoot, Machine, MachineSpec, check_payload
from .profile import Profile

log = logging.getLogger("cloudkvm.launcher")


def check_runnable(profile: Profile) -> None:
    """Refuse, after validation and before anything is created, what this version cannot run."""
    if profile.machine != "x86":
        raise CloudkvmError(f"{profile.name}: the '{profile.machine}' board ({profile.arch}) is not available yet",
                            "only x86_64 profiles run today; the aarch64 virt board is a later issue")


def prepare_disks(profile: Profile, instance: Instance) -> list[tuple[str, str | None, bool]]:
    """Per-instance overlays (`overlay: true`) and growth (`size:`); returns what each virtio-blk opens:
    (path, format, read_only). Runs before the daemon starts, so every disk error is a one-line user error."""
    from .storage import open_disk, probe_format
    from .storage import qcow2

    opened = []
    for index, disk in enumerate(profile.disks):
        where = profile.where("disks", index, "file")
        path, fmt = str(disk.file), disk.format or probe_format(disk.file)
        if disk.overlay:
            overlay = instance.dir / f"disk{index}.overlay.qcow2"
            if not overlay.exists():
                qcow2.create(overlay, None, backing=os.path.abspath(path), backing_format=fmt)
            path, fmt = str(overlay), "qcow2"
        if disk.size and not disk.read_only:
            with open_disk(path, format=fmt) as image:
                current = image.size
            if disk.size < current:
                raise CloudkvmError(f"{where}: disks.{index}.size is smaller than the image ({current} bytes)",
                                    "disks only grow; drop 'size' or make it larger")
            if disk.size > current:
                if fmt == "qcow2":
                    qcow2.grow(path, disk.size)
                else:
                    os.truncate(path, disk.size)
        open_disk(path, read_only=disk.read_only, format=fmt).close()  # a corrupt image fails here, not later
        opened.append((path, fmt, disk.read_only))
    return opened


def check_forwards(profile: Profile) -> None:
    """Fail before anything starts when a forward's host port is taken (one line naming the port)."""
    if profile.network.mode == "user":
        from .net.slirp import check_port_free

        for forward in profile.network.forwards:
            check_port_free(forward)


def virtio_devices(profile: Profile, disks: list[tuple[str, str | None, bool]]) -> list:
    """One virtio-blk per disk (serial diskN), a virtio-net on user networking if asked for, then a virtio-rng."""
    from .devices.virtio.blk import VirtioBlk
    from .devices.virtio.rng import VirtioRng
    from .storage import open_disk

    devices = [VirtioBlk(open_disk(path, read_only=ro, format=fmt), read_only=ro, serial=f"disk{i}")
               for i, (path, fmt, ro) in enumerate(disks)]
    if profile.network.mode == "user":
        from .devices.virtio.net import VirtioNet, mac_for
        from .net.slirp import SlirpBackend

        devices.append(VirtioNet(SlirpBackend(profile.network), mac_for(profile.name)))
    return devices + [VirtioRng()]


def attach_backends(machine: Machine) -> None:
    """Network backends serve their sockets from the machine's I/O thread."""
    for device in machine.spec.virtio:
        backend = getattr(device, "backend", None)
        if backend is not None:
            backend.attach(machine.io)


def spec_for(profile: Profile, console_fd: int | None, virtio: list | None = None) -> MachineSpec:
    """The machine a validated profile describes (x86 board today; `virt` lands with the aarch64 issue)."""
    check_runnable(profile)
    boot = profile.boot
    payload = FlatBinary(boot.kernel) if getattr(boot, "format", "linux") == "flat" \
        else LinuxBoot(boot.kernel, boot.initrd, boot.cmdline)
    return MachineSpec(payload=payload, cpus=profile.cpus, memory=profile.memory, host_quirks=profile.host_quirks,
                       cpu=CpuPolicy(profile.cpu.model, list(profile.cpu.hide)), console_fd=console_fd,
                       virtio=virtio or [])


def instance_info(profile: Profile, source: str | None) -> dict:
    return {"name": profile.name, "arch": profile.arch, "machine": profile.machine, "cpus": profile.cpus,
            "memory": profile.memory, "profile": source,
            "console_log": str(profile.console.log) if profile.console.log else None,
            "forwards": [f"{f.proto}:{f.host_ip}:{f.host_port}-{f.guest_ip or ''}:{f.guest_port}"
                         for f in profile.network.forwards],
            "created_at": time.time()}


def machine_for(profile: Profile, disks, console_fd: int | None, console_input_fd: int | None = None) -> Machine:
    """The VM a profile describes, its devices built and their backends on its I/O thread (daemon and
    foreground alike)."""
    spec = spec_for(profile, console_fd, virtio_devices(profile, disks))
    if console_input_fd is not None:
        spec.console_input_fd, spec.console_escape = console_input_fd, True
    machine = Machine(spec)
    try:
        attach_backends(machine)
    except BaseException:
        machine.close()
        raise
    return machine


def _run_vm(instance: Instance, profile: Profile, disks, ready) -> int:
    """The daemon's body: build the machine, serve the control socket, run, record how the VM ended."""
    console_fd = os.open(instance.console_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    with machine_for(profile, disks, console_fd) as machine:
        info = {**instance.info(), "started_at": time.time(), "pid": os.getpid()}
        instance.write_json(instance.info_file, info)
        server = control.ControlServer(machine, instance.control_socket, {"name": profile.name})
        signal.signal(signal.SIGTERM, lambda *_: machine.end(_stopped("SIGTERM")))
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        machine.io.call_soon(lambda: ready(daemon.READY))  # once the I/O thread serves the socket, the VM is up
        result = machine.run()
        server.close()
    instance.write_json(instance.result_file, {"reason": result.reason, "detail": result.detail,
                                               "cpu": result.cpu, "rip": result.rip, "ended_at": time.time()})
    logging.info("VM ended: %s", result)
    os.close(console_fd)
    return 0 if result.clean else 1


def _stopped(how: str):
    from .vcpu_loop import VmResult  # noqa: PLC0415

    return VmResult("stopped", f"stopped by {how}")


def up(profile: Profile, source: str | None, name: str | None = None, wait: float = 120.0) -> Instance:
    """Start `profile` as a daemonized VM; returns once it runs. Errors are one-line CloudkvmErrors."""
    if name:
        profile = profile.model_copy(update={"name": name})
    instance = Instance.named(profile.name)
    if instance.state() == "running":
        raise CloudkvmError(f"instance '{profile.name}' is already running", f"cloudkvm down {profile.name} first")
    check_payload(spec_for(profile, None).payload)  # refuse what cannot run before anything is created
    check_forwards(profile)
    instance.dir.mkdir(parents=True, exist_ok=True)
    for stale in (instance.result_file, instance.pid_file):
        stale.unlink(missing_ok=True)
    disks = prepare_disks(profile, instance)
    instance.write_json(instance.info_file, instance_info(profile, source))
    message, pid = daemon.spawn(instance, lambda ready: _run_vm(instance, profile, disks, ready), wait)
    if message != daemon.READY:
        tail = instance.log_tail()
        raise CloudkvmError(f"instance '{profile.name}' did not start: {message}", f"log: {tail}")
    return instance


def status(instance: Instance) -> dict:
    state = instance.state()
    info = instance.info()
    out = {"name": instance.name, "state": state, **{k: info.get(k) for k in ("arch", "cpus", "memory", "forwards")},
           "pid": instance.pid() if state == "running" else None, "uptime": instance.uptime(),
           "folder": str(instance.dir)}
    if state == "stopped":
        out["result"] = instance.result()
    elif state == "crashed":
        out["reason"] = instance.crash_reason()
    return out


def statuses() -> list[dict]:
    return [status(i) for i in list_instances()]


def existing(name: str) -> Instance:
    instance = Instance.named(name)
    if not instance.exists():
        raise CloudkvmError(f"no instance named '{name}'", "cloudkvm ls shows the instances")
    return instance


def _wait_gone(instance: Instance, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while instance.state() == "running":
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def down(instance: Instance, force: bool = False, timeout: float = 60.0) -> str:
    """Graceful power-off (ACPI power button), then a hard stop after `timeout`; --force stops at once."""
    if instance.state() != "running":
        return f"{instance.name} is not running"
    if not force:
        try:
            reply = control.request(instance.control_socket, "shutdown")
        except OSError:
            reply = {"ok": False}
        if reply.get("ok") and _wait_gone(instance, timeout):
            return f"{instance.name} powered off"
    try:
        control.request(instance.control_socket, "stop", timeout=5)
    except OSError:
        pass
    if _wait_gone(instance, 10):
        return f"{instance.name} stopped"
    pid = instance.pid()
    if pid:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            if _wait_gone(instance, 5):
                break
    return f"{instance.name} killed"


def remove(instance: Instance, force: bool = False) -> None:
    if instance.state() == "running":
        if not force:
            raise CloudkvmError(f"instance '{instance.name}' is running", f"cloudkvm down {instance.name}, or rm --force")
        down(instance, force=True)
    shutil.rmtree(instance.dir)


def to_json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
