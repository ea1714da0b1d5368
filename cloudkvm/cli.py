"""The `cloudkvm` command line (typer): parse, call, render. Logic lives in the modules it calls."""
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import CloudkvmError

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
    from .guests.build import GUEST_SOURCES, build_flat
    from .machine import FlatBinary, MachineSpec, run

    _setup_logging(verbose)
    spec = MachineSpec(payload=FlatBinary(build_flat(GUEST_SOURCES / "hello.S")), cpus=cpus,
                       memory=memory << 20, console_fd=sys.stdout.fileno())
    result = run(spec, timeout=timeout)
    typer.echo(f"cloudkvm: VM ended: {result}", err=True)
    raise typer.Exit(0 if result.clean else 1)


@app.command()
def boot(kernel: Path = typer.Option(..., "--kernel", "-k", help="bzImage or vmlinux ELF"),
         initrd: Optional[Path] = typer.Option(None, "--initrd", "-i", help="initramfs/initrd image"),
         append: str = typer.Option("console=ttyS0", "--append", "-a", help="kernel command line"),
         cpus: int = typer.Option(1, help="vCPUs"),
         memory: str = typer.Option("512M", help="guest RAM: 512M, 2G, 4096 (MiB)"),
         timeout: Optional[float] = typer.Option(None, help="stop the VM after this many seconds"),
         host_quirks: bool = typer.Option(True, help="apply this host's KVM workarounds"),
         verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Boot a Linux kernel directly, in the foreground, with the serial console on this terminal (Ctrl-A x quits)."""
    from .machine import LinuxBoot, MachineSpec, run
    from .terminal import raw_terminal
    from .units import parse_size

    _setup_logging(verbose)
    spec = MachineSpec(payload=LinuxBoot(kernel, initrd, append), cpus=cpus, memory=parse_size(memory, "--memory"),
                       host_quirks=host_quirks, console_fd=sys.stdout.fileno(),
                       console_input_fd=sys.stdin.fileno(), console_escape=True)
    with raw_terminal(sys.stdin.fileno()):
        result = run(spec, timeout=timeout)
    typer.echo(f"\ncloudkvm: VM ended: {result}", err=True)
    raise typer.Exit(0 if result.clean else 1)


inspect_app = typer.Typer(no_args_is_help=True, help="Show what a VM would be given, without running one.")
app.add_typer(inspect_app, name="inspect")


@inspect_app.command("acpi")
def inspect_acpi(output: Path = typer.Option(..., "--output", "-o", help="folder for the .dat files"),
                 cpus: int = typer.Option(1, help="vCPUs"),
                 memory: str = typer.Option("512M", help="guest RAM (the tables do not depend on it yet)")) -> None:
    """Write the ACPI tables an x86 VM gets (rsdp.dat, xsdt.dat, facp.dat, apic.dat, dsdt.dat) for `iasl -d`."""
    from .boards.x86 import write_acpi_tables
    from .units import parse_size

    parse_size(memory, "--memory")
    for path in write_acpi_tables(output, cpus):
        typer.echo(str(path))


@app.command()
def doctor() -> None:
    """Say whether this host can run VMs and which host quirks apply."""
    from . import hostquirks
    from .kvm.system import Kvm

    kvm = Kvm()
    try:
        typer.echo(f"/dev/kvm: API {kvm.api_version}, up to {kvm.max_vcpus()} vCPUs")
    finally:
        kvm.close()
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


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        app()
    except CloudkvmError as exc:
        print(f"cloudkvm: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
