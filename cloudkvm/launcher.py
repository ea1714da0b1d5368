"""VM lifecycle for the CLI: `up` (validate, prepare the instance folder, daemonize), `down`, `rm`, status."""
import json
import logging
import os
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path

from . import control, daemon
from .boards import registry
from .boards.base import CpuOptions
from .errors import CloudkvmError
from .fsutil import is_within
from .instances import Instance, list_instances, private_dir, private_files, state_folder_error
from .logfile import CappedLog, open_log
from .machine import FlatBinary, LinuxBoot, Machine, MachineSpec, check_payload
from .preflight import check_profile
from .profile import Profile

log = logging.getLogger("cloudkvm.launcher")


def check_runnable(profile: Profile) -> None:
    """Refuse, before anything is created, a profile this host or this version cannot run at all: a guest of
    another architecture (KVM runs its own only), or a board not implemented yet (boards/registry.py)."""
    info = registry.named(profile.machine)
    try:
        info.check_host()
        info.board_class()
    except CloudkvmError as exc:
        raise CloudkvmError(f"{profile.name}: {exc.message}", exc.hint) from None


def prepare_disks(profile: Profile, instance: Instance, cached=None, warn=None) -> tuple[list, dict, Profile]:
    """The instance's disks made ready — the cloud image's overlay first (cloudimage.py), the profile's disks
    (disks.prepare), the cloud-init seed last — every format probed so far for the instance to record (so that a
    restart does not probe again), and the profile as it boots (with `from_image`, the kernel read out of the
    image)."""
    from . import cloudimage
    from .disks import prepare

    recorded = instance.info().get("probed_formats")
    recorded = recorded if isinstance(recorded, dict) else {}
    prepared, probed = prepare(profile, instance.dir, recorded)
    if profile.images:
        root, made_from = cloudimage.prepare_root(profile, instance.dir, warn or log.warning, cached)
        prepared.insert(0, root)
        if profile.boot.from_image:
            found = cloudimage.boot_from_image(profile, root, instance.dir, made_from)
            boot = profile.boot.model_copy(update={"from_image": False, "kernel": found.kernel,
                                                   "initrd": found.initrd, "cmdline": found.cmdline})
            profile = profile.model_copy(update={"boot": boot})
            check_payload(spec_for(profile, None).payload, profile.machine)
    if profile.seed is not None:
        prepared.append(cloudimage.prepare_seed(profile, instance.dir))
    return prepared, {**recorded, **probed}, profile


def pull_image(profile: Profile, name: str | None = None, warn=None):
    """The profile's cloud image, pulled into the cache before an instance is claimed (a download shows its own
    progress), or None: no image, or the instance already has its disk (later starts keep their base)."""
    from . import cloudimage

    if not profile.images or cloudimage.root_disk(Instance.named(name or profile.name).dir).exists():
        return None
    return cloudimage.pull(profile, warn or log.warning)


def warnings(profile: Profile) -> list[str]:
    """What a profile exposes that its user may not mean to: forwards reachable from other hosts, a console log
    written outside the instance's and the profile's folders."""
    import ipaddress

    out = []
    for index, forward in enumerate(profile.network.forwards):
        if not ipaddress.ip_address(forward.host_ip or "0.0.0.0").is_loopback:
            out.append(f"{profile.where('network', 'forwards', index)}: forward {forward.spec()} listens on "
                       f"{forward.host_ip or '0.0.0.0'}, reachable from other hosts (use 127.0.0.1 to keep it local)")
    log = profile.console.log
    if log is not None:
        folders = [Instance.named(profile.name).dir] + ([Path(profile.source).parent] if profile.source else [])
        if not any(is_within(log, folder) for folder in folders):
            out.append(f"{profile.where('console', 'log')}: the console log {log} is outside the instance's and "
                       f"the profile's folders")
    return out


def user_net_config(profile: Profile):
    """The user network's own config (net/config.UserNetConfig) for a profile with `network: user`."""
    from .net.config import user_net

    network = profile.network
    return user_net(network.net, network.forwards, network.restrict, network.mtu)


def check_forwards(profile: Profile) -> None:
    """Fail before anything starts when a forward's host port is taken (one line naming the port)."""
    if profile.network.mode == "user":
        from .net.slirp import check_port_free

        for forward in user_net_config(profile).forwards:
            check_port_free(forward)


def virtio_devices(profile: Profile, disks: list) -> list:
    """One virtio-blk per disk (serial diskN), a virtio-net on user networking if asked for, then a virtio-rng."""
    from .devices.virtio.blk import VirtioBlk
    from .devices.virtio.rng import VirtioRng

    devices = [VirtioBlk(disk.open(), read_only=disk.read_only, serial=f"disk{i}") for i, disk in enumerate(disks)]
    if profile.network.mode == "user":
        from .devices.virtio.net import VirtioNet, mac_for
        from .net.slirp import SlirpBackend

        config = user_net_config(profile)
        devices.append(VirtioNet(SlirpBackend(config), mac_for(profile.name), mtu=config.mtu))
    return devices + [VirtioRng()]


def attach_backends(machine: Machine) -> None:
    """Network backends serve their sockets from the machine's I/O thread."""
    for device in machine.spec.virtio:
        backend = getattr(device, "backend", None)
        if backend is not None:
            backend.attach(machine.io)


def spec_for(profile: Profile, console_fd: int | None, virtio: list | None = None) -> MachineSpec:
    """The machine a validated profile describes, on the board its `machine` names."""
    check_runnable(profile)
    boot = profile.boot
    payload = FlatBinary(boot.kernel) if getattr(boot, "format", "linux") == "flat" \
        else LinuxBoot(boot.kernel, boot.initrd, boot.cmdline)
    return MachineSpec(payload=payload, board=profile.machine, cpus=profile.cpus, memory=profile.memory,
                       host_quirks=profile.host_quirks, cpu=CpuOptions(profile.cpu.model, list(profile.cpu.hide)),
                       console_fd=console_fd, virtio=virtio or [])


def ssh_forward(profile: Profile):
    """The forward that reaches the guest's sshd (tcp to port 22), or None."""
    return next((f for f in profile.network.forwards if f.proto == "tcp" and f.guest_port == 22), None)


def ssh_info(profile: Profile) -> dict | None:
    """How `cloudkvm ssh` reaches the guest: the seed's user and the forward to the guest's port 22 (the key is
    always the instance folder's own)."""
    settings, forward = profile.seed, ssh_forward(profile)
    if settings is None:
        return None
    return {"user": settings.user,
            "host": None if forward is None else ("127.0.0.1" if forward.host_ip == "0.0.0.0" else forward.host_ip),
            "port": None if forward is None else forward.host_port}


def instance_info(profile: Profile, source: str | None) -> dict:
    return {"name": profile.name, "arch": profile.arch, "machine": profile.machine, "cpus": profile.cpus,
            "memory": profile.memory, "profile": source,
            "console_log": str(profile.console.log) if profile.console.log else None,
            "forwards": [f"{f.proto}:{f.host_ip}:{f.host_port}-{f.guest_ip or ''}:{f.guest_port}"
                         for f in profile.network.forwards],
            "created_at": time.time()}


def machine_for(profile: Profile, disks, console_fd: int | None, console_input_fd: int | None = None,
                console_out=None) -> Machine:
    """The VM a profile describes, its devices built and their backends on its I/O thread (daemon and
    foreground alike)."""
    spec = spec_for(profile, console_fd, virtio_devices(profile, disks))
    spec.console_out = console_out
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
    console = CappedLog(instance.console_log)
    try:
        with machine_for(profile, disks, None, console_out=console) as machine:
            info = {**instance.info(), "started_at": time.time(), "pid": os.getpid()}
            instance.write_json(instance.info_file, info)
            server = control.ControlServer(machine, instance.control_socket, {"name": profile.name})
            signal.signal(signal.SIGTERM, lambda *_: machine.end(_stopped("SIGTERM")))
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            machine.io.call_soon(lambda: ready(daemon.READY))  # once the I/O thread serves the socket, the VM is up
            result = machine.run()
            server.close()
    finally:
        console.close()
    logging.info("VM ended: %s", result)  # in the log first: the result survives a state folder that is full
    try:
        instance.write_json(instance.result_file, {"reason": result.reason, "detail": result.detail,
                                                   "cpu": result.cpu, "pc": result.pc, "ended_at": time.time()})
    except OSError as err:
        logging.error("cannot record the result in %s: %s", instance.result_file, err.strerror or err)
    return 0 if result.clean else 1


def _stopped(how: str):
    from .vcpu_loop import VmResult  # noqa: PLC0415

    return VmResult("stopped", f"stopped by {how}")


@contextmanager
def claimed(profile: Profile, source: str | None, doing: str, console_file: bool = True, cached=None):
    """The profile's instance for this command alone (its lock held, so one `up` wins), checked, its folder made
    private and its disks prepared; yields (instance, disks, lock fd, the profile as it boots). A refused start
    leaves nothing behind: a folder this made is removed again. `console_file`: the serial output goes to the
    console log (checked here). `cached`: the profile's image, already pulled (pull_image)."""
    check_runnable(profile)  # a guest this host cannot run at all: said before anything about its details
    check_profile(profile)  # what this host or the board cannot run, before anything is created
    if not profile.boot.from_image:  # the image's own kernel is checked once it is read out of the image
        check_payload(spec_for(profile, None).payload, profile.machine)
    instance = Instance.named(profile.name)
    with private_files():
        try:
            private_dir(instance.dir.parent)
        except OSError as err:
            raise state_folder_error(instance.dir, err) from None
        with instance.exclusive(doing) as lock_fd:
            if instance.state() == "running":
                raise CloudkvmError(f"instance '{profile.name}' is already running",
                                    f"cloudkvm down {profile.name} first, or use --name")
            check_forwards(profile)  # after the state check: a running instance's own forward is not "in use"
            created = not os.path.lexists(instance.dir)
            try:
                private_dir(instance.dir)
                for stale in (instance.result_file, instance.pid_file):
                    stale.unlink(missing_ok=True)
                disks, probed, booted = prepare_disks(profile, instance, cached)
                instance.write_json(instance.info_file, {**instance_info(profile, source), "probed_formats": probed,
                                                         "ssh": ssh_info(profile)})
                if console_file:
                    os.close(open_log(instance.console_log))  # a symlink or a FIFO there is refused now
            except BaseException as exc:
                if created:
                    shutil.rmtree(instance.dir, ignore_errors=True)
                if isinstance(exc, OSError):
                    raise state_folder_error(instance.dir, exc) from None
                raise
            yield instance, disks, lock_fd, booted


def up(profile: Profile, source: str | None, name: str | None = None, wait: float = 120.0,
       cached=None) -> tuple[Instance, bool]:
    """Start `profile` as a daemonized VM. Returns (instance, running): running is False when the VM was still
    starting after `wait` seconds. Errors are one-line CloudkvmErrors; a refused start leaves nothing behind."""
    if name:
        profile = profile.model_copy(update={"name": name})
    with claimed(profile, source, "being started", cached=cached) as (instance, disks, lock_fd, booted):
        message, _ = daemon.spawn(instance, lambda ready: _run_vm(instance, booted, disks, ready), wait,
                                  close_in_daemon=(lock_fd,))
    if message == "timeout" and instance.state() == "running":
        return instance, False
    if message != daemon.READY:
        tail = instance.log_tail()
        raise CloudkvmError(f"instance '{profile.name}' did not start: {message}", f"log: {tail}")
    return instance, True


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


POWER_BUTTON_GRACE = 15.0  # seconds the board's power button has before `down` asks the guest over ssh as well


def _poweroff_over_ssh(instance: Instance) -> bool:
    """Ask the guest to power off over ssh, as its cloud-init user with the instance's own key and known_hosts
    (ssh.py): for a guest whose kernel has no driver for the board's power button (Debian's arm64 cloud kernel has
    no gpio-keys for the virt board's PL061 key). True when `systemctl poweroff` said it queued the power-off;
    False when the instance has no ssh target or the request failed."""
    import subprocess

    from . import ssh

    try:
        argv = ssh.command(ssh.target(instance), ["sudo", "-n", "systemctl", "poweroff"], batch=True,
                           connect_timeout=10)
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=30)
    except (CloudkvmError, OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def down(instance: Instance, force: bool = False, timeout: float = 60.0) -> str:
    """Graceful power-off (the board's power button: ACPI on x86, the PL061 key on arm64; after POWER_BUTTON_GRACE
    seconds also `systemctl poweroff` over ssh for an instance cloudkvm can log into), then a hard stop after
    `timeout`; --force stops at once."""
    if instance.state() != "running":
        return f"{instance.name} is not running"
    if not force:
        try:
            reply = control.request(instance.control_socket, "shutdown")
        except OSError:
            reply = {"ok": False}
        if reply.get("ok"):
            grace = min(timeout, POWER_BUTTON_GRACE)
            if _wait_gone(instance, grace):
                return f"{instance.name} powered off"
            asked = grace < timeout and _poweroff_over_ssh(instance)
            if _wait_gone(instance, timeout - grace):
                return f"{instance.name} powered off" + (" (asked over ssh)" if asked else "")
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
    """Delete the instance folder, never while another cloudkvm command starts it, never through a symlink."""
    with instance.exclusive("being removed"):
        if instance.state() == "running":
            if not force:
                raise CloudkvmError(f"instance '{instance.name}' is running",
                                    f"cloudkvm down {instance.name}, or rm --force")
            down(instance, force=True)
            if instance.state() == "running":
                raise CloudkvmError(f"instance '{instance.name}' is still running", "nothing was removed")
        if instance.dir.is_symlink():
            raise CloudkvmError(f"{instance.dir}: the instance folder is a symlink", "nothing was removed")
        shutil.rmtree(instance.dir)


def to_json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
