"""The `cloudkvm` command line (typer): parse, call, render. Logic lives in the modules it calls."""
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import CloudkvmError, printable
from .image_cli import image_app

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="cloudkvm: run cloud-image VMs on /dev/kvm, with cloudkvm itself as the VMM.")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="cloudkvm: %(message)s", stream=sys.stderr)


@app.command()
def demo(cpus: int = typer.Option(2, help="vCPUs to start"),
         memory: int = typer.Option(64, help="guest RAM in MiB"),
         timeout: float = typer.Option(60.0, help="seconds before the VM is stopped"),
         verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Run the built-in demo guest: every vCPU says hello on the serial console, then the VM powers off."""
    from .boards import registry
    from .machine import FlatBinary, MachineSpec, run

    _setup_logging(verbose)
    board = registry.host_board()
    board.check_host()
    if board.demo_guest is None:
        raise CloudkvmError(f"the {board.name} board has no demo guest yet", "cloudkvm boot runs a Linux kernel")
    spec = MachineSpec(payload=FlatBinary(board.demo_guest()), board=board.name, cpus=cpus, memory=memory << 20,
                       console_fd=sys.stdout.fileno())
    result = run(spec, timeout=timeout)
    typer.echo(f"cloudkvm: VM ended: {result}", err=True)
    raise typer.Exit(0 if result.clean else 1)


@app.command()
def boot(kernel: Path = typer.Option(..., "--kernel", "-k", help="the kernel: bzImage or vmlinux on x86_64"),
         initrd: Optional[Path] = typer.Option(None, "--initrd", "-i", help="initramfs/initrd image"),
         append: Optional[str] = typer.Option(None, "--append", "-a", help="kernel command line (default: "
                                              "console= the board's serial console, ttyS0 on x86)"),
         cpus: int = typer.Option(1, help="vCPUs"),
         memory: str = typer.Option("512M", help="guest RAM: 512M, 2G, 4096 (MiB)"),
         timeout: Optional[float] = typer.Option(None, help="stop the VM after this many seconds"),
         host_quirks: bool = typer.Option(True, help="apply this host's KVM workarounds"),
         verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Boot a Linux kernel directly, in the foreground, with the serial console on this terminal (Ctrl-A x quits)."""
    from .boards import registry
    from .machine import LinuxBoot, MachineSpec, check_payload, run
    from .terminal import raw_terminal
    from .units import parse_size

    _setup_logging(verbose)
    size = parse_size(memory, "--memory")
    board = registry.host_board()
    check_payload(LinuxBoot(kernel, initrd, append), board.name)
    spec = MachineSpec(payload=LinuxBoot(kernel, initrd, append), board=board.name, cpus=cpus, memory=size,
                       host_quirks=host_quirks, console_fd=sys.stdout.fileno(),
                       console_input_fd=sys.stdin.fileno(), console_escape=True)
    with raw_terminal(sys.stdin.fileno()):
        result = run(spec, timeout=timeout)
    typer.echo(f"\ncloudkvm: VM ended: {result}", err=True)
    raise typer.Exit(0 if result.clean else 1)


def _profile_env(path: Path) -> dict:
    """The environment profiles expand: the caller's, plus the built-in demo guest's paths when a profile asks (the
    Linux guest of the profile's board, boards/registry.py)."""
    from .profile import read_profile_bytes

    env = dict(os.environ)
    try:
        wanted = b"CLOUDKVM_DEMO_" in read_profile_bytes(path)  # a FIFO, device or huge file is never read
    except CloudkvmError:
        wanted = False  # loading the profile says why
    if not wanted or (env.get("CLOUDKVM_DEMO_KERNEL") and env.get("CLOUDKVM_DEMO_INITRD")):
        return env
    guest = _demo_board(path, env).linux_guest
    if guest is not None:
        from .progress import step

        with step("preparing the demo guest (Debian cloud kernel + busybox initramfs)"):
            kernel, initrd = guest()
        env.setdefault("CLOUDKVM_DEMO_KERNEL", str(kernel))
        env.setdefault("CLOUDKVM_DEMO_INITRD", str(initrd))
    return env


def _demo_board(path: Path, env: dict):
    """The board of the profile's own `arch` (read with stand-in demo paths), whose built-in Linux guest it gets;
    this host's board when the profile does not load (loading it again says why)."""
    from .boards import registry
    from .profile import load_profile

    stand_in = {**env, "CLOUDKVM_DEMO_KERNEL": "demo-kernel", "CLOUDKVM_DEMO_INITRD": "demo-initrd"}
    try:
        return registry.for_arch(load_profile(path, env=stand_in, check_files=False).arch)
    except CloudkvmError:
        return registry.host_board()


def _load(path: Path, check_files: bool = True, env: dict | None = None):
    from .profile import load_profile

    return load_profile(path, env=_profile_env(path) if env is None else env, check_files=check_files)


@app.command()
def up(profile: Path = typer.Argument(..., help="profile YAML"),
       name: Optional[str] = typer.Option(None, help="instance name (default: the profile's name)"),
       foreground: bool = typer.Option(False, "--foreground", "-f", help="run attached, console on this terminal"),
       wait_text: str = typer.Option("120", "--wait", metavar="SECONDS|ssh",
                                     help="seconds to wait for the VM to start, or `ssh`: until a login with the "
                                          "instance key works (up to --ssh-timeout)"),
       ssh_timeout: float = typer.Option(900.0, help="seconds --wait ssh waits for the guest's ssh")) -> None:
    """Start a VM from a profile, in the background; returns once it runs (or, with --wait ssh, once ssh works)."""
    from . import launcher

    wait_for = "ssh" if wait_text.strip().lower() == "ssh" else None
    wait = 120.0 if wait_for else _seconds(wait_text, "--wait")
    env = _profile_env(profile)
    # A guest this host cannot run at all (another architecture; a board not in this version) is said first, before
    # anything about the files it names.
    launcher.check_runnable(_load(profile, check_files=False, env=env))
    loaded = _load(profile, env=env)
    if foreground or not loaded.daemonize:
        if wait_for:
            raise CloudkvmError("--wait ssh needs a VM in the background", "drop --foreground (or --wait ssh)")
        _run_foreground(loaded if not name else loaded.model_copy(update={"name": name}))
        return
    if wait_for == "ssh" and (loaded.seed is None or launcher.ssh_forward(loaded) is None):
        raise CloudkvmError(f"{profile}: --wait ssh needs a cloud-init user and a forward to the guest's port 22",
                            "add images: (or cloud_init:) and a forward such as tcp:127.0.0.1:2222-:22")
    from .progress import step

    _warn(launcher.warnings(loaded))
    cached = launcher.pull_image(loaded, name, warn=_warn_one)  # a download shows its own progress first
    with step(f"starting {name or loaded.name}"):
        instance, running = launcher.up(loaded, str(profile.resolve()), name=name, wait=wait, cached=cached)
    if not running:
        typer.echo(f"{instance.name}: still starting after {wait:g} s (cloudkvm status {instance.name}; "
                   f"logs: {printable(str(instance.console_log))})")
        if wait_for:
            raise typer.Exit(1)
        return
    if wait_for == "ssh":
        from . import ssh

        to = ssh.target(instance)
        with step(f"waiting for ssh on {to.host}:{to.port}"):
            seconds = ssh.wait(instance, to, ssh_timeout)
        typer.echo(f"{instance.name}: ssh answers after {seconds:.0f} s (cloudkvm ssh {instance.name})")
        return
    typer.echo(f"{instance.name}: running (console: cloudkvm console {instance.name}; "
               f"logs: {printable(str(instance.console_log))})")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ssh(ctx: typer.Context, name: str = typer.Argument(..., help="instance name")) -> None:
    """Log in to a VM with ssh through its forwarded port and its own key: `cloudkvm ssh NAME [-- CMD ...]`."""
    from . import launcher, ssh as ssh_client

    instance = launcher.existing(name)
    if instance.state() != "running":
        raise CloudkvmError(f"instance '{name}' is {instance.state()}, not running", "cloudkvm up first")
    argv = ssh_client.command(ssh_client.target(instance), list(ctx.args))
    sys.stdout.flush()
    os.execv(argv[0], argv)


def _seconds(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1e9:
        raise CloudkvmError(f"{option} {text!r}: expected seconds (e.g. 120) or ssh", f"write {option} 120 or "
                                                                                     f"{option} ssh")
    return value


def _warn(messages: list[str]) -> None:
    for message in messages:
        _warn_one(message)


def _warn_one(message: str) -> None:
    typer.echo(f"cloudkvm: warning: {printable(message)}", err=True)


def _run_foreground(profile) -> None:
    from .launcher import claimed, machine_for, pull_image, warnings
    from .terminal import raw_terminal

    _warn(warnings(profile))
    with claimed(profile, None, "running in the foreground", console_file=False,
                 cached=pull_image(profile, warn=_warn_one)) as (_, disks, _lock, booted), \
            machine_for(booted, disks, sys.stdout.fileno(), sys.stdin.fileno()) as machine, \
            raw_terminal(sys.stdin.fileno()):
        result = machine.run()
    typer.echo(f"\ncloudkvm: VM ended: {result}", err=True)
    raise typer.Exit(0 if result.clean else 1)


@app.command()
def down(name: str, force: bool = typer.Option(False, "--force", help="stop at once, no graceful power-off"),
         timeout: float = typer.Option(60.0, help="seconds to wait for the guest to power off")) -> None:
    """Power a VM off gracefully (the board's power button), stopping it hard after --timeout."""
    from . import launcher

    from .progress import step

    instance = launcher.existing(name)
    with step(f"stopping {name}" if force else f"powering {name} off (up to {timeout:g} s)"):
        message = launcher.down(instance, force=force, timeout=timeout)
    typer.echo(message)


@app.command("ls")
def list_() -> None:
    """List instances: name, state, arch, cpus, memory, forwards, uptime."""
    from . import launcher
    from .profile import size_text

    rows = launcher.statuses()
    typer.echo(f"{'NAME':20} {'STATE':8} {'ARCH':7} {'CPUS':>4} {'MEMORY':>7}  {'UPTIME':>8}  FORWARDS")
    for r in rows:
        uptime = f"{r['uptime']:.0f}s" if r["uptime"] is not None else "-"
        memory = size_text(r["memory"]) if r.get("memory") else "-"
        typer.echo(f"{r['name']:20} {r['state']:8} {r.get('arch') or '-':7} {r.get('cpus') or '-':>4} "
                   f"{memory:>7}  {uptime:>8}  {', '.join(r.get('forwards') or []) or '-'}")


@app.command()
def status(name: str, json_: bool = typer.Option(False, "--json", help="machine-readable")) -> None:
    """One instance's state (and why it ended or crashed)."""
    from . import launcher

    info = launcher.status(launcher.existing(name))
    if json_:
        typer.echo(launcher.to_json(info))
        return
    for key, value in info.items():
        typer.echo(f"{key}: {printable(str(value))}")


@app.command()
def console(name: str) -> None:
    """Attach to a running VM's serial console (Ctrl-] detaches)."""
    from . import launcher
    from .control import attach_console
    from .terminal import raw_terminal

    instance = launcher.existing(name)
    if instance.state() != "running":
        raise CloudkvmError(f"instance '{name}' is not running", f"cloudkvm logs {name} shows its console log")
    try:
        with raw_terminal(sys.stdin.fileno()):
            why = attach_console(instance.control_socket, sys.stdin.fileno(), sys.stdout.fileno(),
                                 on_attached=lambda: typer.echo(f"cloudkvm: attached to {name} (Ctrl-] detaches)\r",
                                                                err=True))
    except OSError as exc:
        raise CloudkvmError(f"instance '{name}': cannot reach its control socket ({exc.strerror or exc})",
                            f"cloudkvm status {name} says whether it is still running") from None
    typer.echo(f"\ncloudkvm: {why}", err=True)


@app.command()
def logs(name: str, follow: bool = typer.Option(False, "--follow", "-f", help="keep printing new output")) -> None:
    """Print a VM's serial console log."""
    from . import launcher
    from .logfile import follow as follow_log

    instance = launcher.existing(name)
    running = (lambda: instance.state() == "running") if follow else (lambda: False)
    try:
        chunks = follow_log(instance.console_log, running)
    except OSError:
        raise CloudkvmError(f"instance '{name}' has no console log yet", "is it starting?") from None
    for data in chunks:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


@app.command()
def rm(name: str, force: bool = typer.Option(False, "--force", help="stop a running VM first")) -> None:
    """Remove an instance folder (refuses a running VM without --force)."""
    from . import launcher

    launcher.remove(launcher.existing(name), force=force)
    typer.echo(f"{name}: removed")


@app.command()
def validate(profile: Path) -> None:
    """Check a profile (and the files it names) without starting anything."""
    from .disks import chains
    from .preflight import check_profile

    loaded = _load(profile)
    check_profile(loaded)
    found = chains(loaded)
    for index, chain in found:
        if isinstance(chain, CloudkvmError):
            raise CloudkvmError(f"{loaded.where('disks', index, 'file')}: {chain.message}", chain.hint)
    from .launcher import warnings

    _warn(warnings(loaded))
    typer.echo(printable(f"{profile}: ok ({loaded.name}: {loaded.arch} {loaded.machine}, {loaded.cpus} vCPUs)"))
    if loaded.image is not None:
        digest = loaded.image.digest or "no digest"
        typer.echo(printable(f"  image: {loaded.image.location} ({digest})"))
    if loaded.boot.from_image:
        typer.echo("  boot: the image's newest kernel and initrd")
    if loaded.seed is not None:
        typer.echo(printable(f"  cloud-init: user {loaded.seed.user}, the instance's ssh key"))
    for index, chain in found:  # backing names come from the images: never raw to the terminal
        typer.echo(printable(f"  disks.{index}: {' <- '.join(link.describe() for link in chain)}"))


@app.command()
def schema() -> None:
    """Print the profile JSON Schema (for editors: `# yaml-language-server: $schema=...`)."""
    from .profile import profile_schema_text

    typer.echo(profile_schema_text(), nl=False)


@app.command()
def show(profile: Path, qemu: bool = typer.Option(False, "--qemu", help="print the equivalent QEMU command line")) \
        -> None:
    """Print a profile as cloudkvm resolves it (bases merged, variables expanded), or as a QEMU command line."""
    import shlex

    from .profile import profile_to_dict
    from .qemu_cmdline import dump_profile_yaml, profile_to_qemu

    from .disks import chains

    loaded = _load(profile, check_files=False)
    typer.echo(shlex.join(profile_to_qemu(loaded)) if qemu else dump_profile_yaml(profile_to_dict(loaded)), nl=False)
    if qemu:
        typer.echo()
        return
    for index, chain in chains(loaded):
        text = f"refused or unreadable: {chain}" if isinstance(chain, CloudkvmError) \
            else " <- ".join(link.describe() for link in chain)
        typer.echo(printable(f"# disks.{index} backing chain: {text}"))


@app.command("import-qemu", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def import_qemu_(ctx: typer.Context,
                 output: Optional[Path] = typer.Option(None, "--output", "-o", help="write the profile here")) -> None:
    """Turn a QEMU command line (after --) into a profile; options that do not map are listed on stderr."""
    from .qemu_cmdline import dump_profile_yaml, import_qemu, split_qemu_command

    argv = list(ctx.args)
    if len(argv) == 1:
        argv = split_qemu_command(argv[0])
    if not argv:
        raise CloudkvmError("import-qemu needs a QEMU command line", "cloudkvm import-qemu -- qemu-system-... -m 2G ...")
    data, unmapped = import_qemu(argv, cwd=os.getcwd())
    text = dump_profile_yaml(data, schema="./schema.json")
    text += "" if text.endswith("\n") else "\n"
    for item in unmapped:
        typer.echo(f"cloudkvm: not mapped: {printable(item)}", err=True)
    for forward in (data.get("network") or {}).get("forwards") or []:
        if ":0.0.0.0:" in forward:
            _warn([f"forward {forward} listens on every address, as QEMU's hostfwd does, so other hosts can reach "
                   f"it; write 127.0.0.1 to keep it local"])
    if output:
        try:
            output.write_text(text)
        except OSError as exc:
            raise CloudkvmError(f"{output}: cannot write the profile: {exc.strerror}") from None
    else:
        typer.echo(text, nl=False)


inspect_app = typer.Typer(no_args_is_help=True, help="Show what a VM would be given, without running one.")
app.add_typer(inspect_app, name="inspect")
app.add_typer(image_app, name="image")


@inspect_app.command("acpi")
def inspect_acpi(output: Path = typer.Option(..., "--output", "-o", help="folder for the .dat files"),
                 cpus: int = typer.Option(1, help="vCPUs"),
                 memory: str = typer.Option("512M", help="guest RAM (the tables do not depend on it yet)")) -> None:
    """Write the ACPI tables an x86 VM gets (rsdp.dat, xsdt.dat, facp.dat, apic.dat, dsdt.dat) for `iasl -d`."""
    from .boards import registry
    from .units import parse_size

    parse_size(memory, "--memory")
    for path in registry.X86.board_class().write_acpi_tables(output, cpus):
        typer.echo(str(path))


@inspect_app.command("dtb")
def inspect_dtb(profile: Path = typer.Argument(..., help="an aarch64 profile"),
                output: Path = typer.Option(..., "--output", "-o", help="the .dtb file to write")) -> None:
    """Write the device tree an aarch64 (virt) profile's VM gets, for `dtc -I dtb -O dts`."""
    from .boards import registry
    from .preflight import virtio_device_count

    loaded = _load(profile, check_files=False)
    board = registry.named(loaded.machine or registry.for_arch(loaded.arch).name)
    if not hasattr(board.board_class(), "write_dtb"):
        raise CloudkvmError(f"{profile}: the {board.name} board has no device tree ({board.arch} guests)",
                            "inspect dtb is for aarch64 profiles (machine: virt)")
    cmdline = loaded.boot.cmdline if loaded.boot.cmdline is not None else f"console={board.default_console}"
    notes = board.board_class().write_dtb(output, loaded.cpus, loaded.memory, loaded.boot.kernel,
                                          loaded.boot.initrd, cmdline, virtio_device_count(loaded))
    for note in notes:
        typer.echo(f"cloudkvm: note: {printable(note)}", err=True)
    typer.echo(str(output))


@app.command()
def doctor() -> None:
    """Say whether this host can run VMs and which host quirks apply."""
    import platform

    from . import hostquirks
    from .kvm.capabilities import host_capabilities
    from .kvm.system import Kvm

    kvm = Kvm()
    try:
        typer.echo(f"/dev/kvm: API {kvm.api_version}, up to {kvm.max_vcpus()} vCPUs")
        caps = host_capabilities(kvm)
    finally:
        kvm.close()
    typer.echo(f"KVM capabilities for {platform.machine()} boards:")
    for cap in caps:
        typer.echo(f"  {cap.describe()}")
    quirks = hostquirks.detect()
    if quirks.active:
        typer.echo(f"host quirks: {quirks.name}")
        typer.echo(f"  CPUID features hidden: {', '.join(quirks.cpuid_hide)}")
        typer.echo(f"  Linux command line += {' '.join(quirks.linux_cmdline)}")
        typer.echo("  instructions completed by the VMM: int3, fwait, ldmxcsr, stmxcsr, movd/movq xmm")
        for note in quirks.notes:
            typer.echo(f"note: {note}")
    else:
        typer.echo("host quirks: none")
    missing = [c.name for c in caps if c.needed and not c.value]
    if missing:
        raise CloudkvmError(f"this KVM lacks {', '.join(missing)}, which cloudkvm needs",
                            "use a newer host kernel (KVM from Linux 5.10 or later)")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        app()
    except CloudkvmError as exc:
        print(f"cloudkvm: error: {printable(str(exc))}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
