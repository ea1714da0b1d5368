"""QEMU command lines and profiles: `import_qemu` turns a `qemu-system-*` command line into a profile dict and
lists every option it could not map (never dropping one silently); `profile_to_qemu` prints a profile as the
equivalent QEMU command line; `dump_profile_yaml` writes a profile dict as YAML in a stable key order.

Every entry of the unmapped list is the option as written followed by why, in parentheses, e.g.
`-vnc :10 (no graphical display: cloudkvm gives the guest a serial console only)`. Options whose meaning cloudkvm
reproduces only approximately are mapped *and* listed ("approximated: ...").
"""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

import yaml

from .boards import registry
from .errors import CloudkvmError
from .profile import DEFAULT_NET, PROFILE_FIELD_ORDER, Profile, host_arch, parse_forward, size_text

# qemu-system-* options that take an argument (qemu-options.hx); any other option is a flag unless unknown.
_WITH_ARG = {
    "-name", "-M", "-machine", "-cpu", "-smp", "-m", "-kernel", "-initrd", "-append", "-drive", "-netdev", "-nic",
    "-net", "-device", "-global", "-serial", "-vnc", "-display", "-accel", "-monitor", "-qmp", "-qmp-pretty",
    "-chardev", "-object", "-pidfile", "-bios", "-boot", "-rtc", "-vga", "-hda", "-hdb", "-hdc", "-hdd", "-cdrom",
    "-fda", "-fdb", "-sd", "-mtdblock", "-pflash", "-fsdev", "-virtfs", "-mon", "-D", "-d", "-L", "-k", "-numa",
    "-incoming", "-runas", "-sandbox", "-uuid", "-smbios", "-fw_cfg", "-trace", "-msg", "-overcommit", "-mem-path",
    "-blockdev", "-audiodev", "-parallel", "-action", "-icount", "-dtb", "-g", "-usbdevice", "-tpmdev", "-iscsi",
    "-set", "-add-fd", "-loadvm", "-option-rom", "-watchdog-action", "-semihosting-config", "-plugin", "-compat",
    "-prom-env", "-debugcon", "-gdb", "-chroot", "-run-with", "-iothread", "-spice", "-acpitable", "-machine-opts",
}
_FLAGS = {
    "-daemonize", "-enable-kvm", "-nographic", "-nodefaults", "-snapshot", "-no-reboot", "-no-shutdown", "-S",
    "-no-user-config", "-nodefconfig", "-no-hpet", "-no-acpi", "-full-screen", "-s", "-usb", "-mem-prealloc",
    "-enable-sync-profile", "-no-fd-bootchk", "-only-migratable", "-semihosting", "-preconfig", "-no-quit",
    "-version", "-help", "-h",
}
_VIRTIO_BLK = {"virtio-blk-device", "virtio-blk-pci", "virtio-blk"}
_VIRTIO_NET = {"virtio-net-device", "virtio-net-pci", "virtio-net", "virtio-net-pci-non-transitional"}
_OTHER_NICS = {"e1000", "e1000e", "rtl8139", "ne2k_pci", "pcnet", "vmxnet3", "i82559er"}
_SCSI = {"virtio-scsi-device", "virtio-scsi-pci", "scsi-hd", "scsi-cd", "scsi-disk", "lsi53c895a", "megasas"}
# QEMU's names for the CPU features whose profile (Linux-style) names differ (target/i386/cpu.c feature_word_info)
_QEMU_FEATURE = {"sse3": "pni", "sse4_1": "sse4.1", "sse4_2": "sse4.2", "kvmclock_legacy": "kvmclock"}
_FROM_QEMU_FEATURE = {"pni": "sse3", "sse4.1": "sse4_1", "sse4.2": "sse4_2"}
_NO_DISPLAY = "no graphical display: cloudkvm gives the guest a serial console only"


@dataclass
class _Opt:
    name: str  # normalized: one leading dash
    arg: str | None
    text: str  # as written, for the unmapped list


def split_qemu_command(text: str) -> list[str]:
    """Split a QEMU command line copied from a shell or from `ps` output. `ps` loses the quotes around
    `-append "console=ttyAMA0 root=..."`; the words after an -append value, up to the next option, are joined
    back into it (a real argv would make them disk images, which is never what such a line meant)."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise CloudkvmError(f"the QEMU command line cannot be split: {exc}",
                            "close the quote, or pass the words after -- without quoting the whole line") from None
    out: list[str] = []
    index = 0
    while index < len(words):
        word = words[index]
        out.append(word)
        index += 1
        if word.lstrip("-") == "append" and word.startswith("-") and index < len(words):
            value = [words[index]]
            index += 1
            while index < len(words) and not words[index].startswith("-"):
                value.append(words[index])
                index += 1
            out.append(" ".join(value))
    return out


def parse_qemu_opts(text: str, implied: str | None = None) -> list[tuple[str, str]]:
    """QEMU's `key=value,key=value` option syntax (`,,` is a literal comma; a bare first word is `implied`'s
    value; any other bare `key` means key=on)."""
    parts, current, index = [], "", 0
    while index < len(text):
        char = text[index]
        if char == ",":
            if text[index + 1:index + 2] == ",":
                current += ","
                index += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += char
        index += 1
    parts.append(current)
    out = []
    for position, part in enumerate(parts):
        if "=" in part:
            key, value = part.split("=", 1)
            out.append((key, value))
        elif position == 0 and implied is not None:
            out.append((implied, part))
        elif part:
            out.append((part, "on"))
    return out


def _on(value: str) -> bool:
    return value.lower() in ("on", "yes", "true", "y", "1")


def _opts_text(pairs: list[tuple[str, str]]) -> str:
    return ",".join(f"{key}={value.replace(',', ',,')}" for key, value in pairs)


def _parse_memory(text: str) -> int | None:
    """QEMU's -m size: a bare number is MiB; suffixes K, M, G, T (binary); B means bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtTbB]?)\s*", text)
    if not match:
        return None
    number, unit = match.groups()
    factor = {"": 1 << 20, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit.lower()]
    return int(float(number) * factor)


def _tokenize(argv: list[str]) -> tuple[str | None, list[_Opt], list[str]]:
    binary = None
    args = list(argv)
    if args and not args[0].startswith("-"):
        binary = args.pop(0)
    opts: list[_Opt] = []
    positional: list[str] = []
    index = 0
    while index < len(args):
        word = args[index]
        index += 1
        if not word.startswith("-") or word == "-":
            positional.append(word)
            continue
        name = "-" + word.lstrip("-")
        if "=" in name and name.split("=", 1)[0] in _WITH_ARG:  # --opt=value
            name, arg = name.split("=", 1)
            opts.append(_Opt(name, arg, f"{name} {arg}"))
            continue
        takes_arg = name in _WITH_ARG or (name not in _FLAGS and index < len(args)
                                           and not args[index].startswith("-"))
        if takes_arg and index < len(args):
            arg = args[index]
            index += 1
            opts.append(_Opt(name, arg, f"{name} {shlex.quote(arg)}"))
        else:
            opts.append(_Opt(name, None, name))
    return binary, opts, positional


@dataclass
class _Drive:
    text: str
    pairs: list[tuple[str, str]]
    index: int  # position on the command line
    file: str | None = None
    interface: str | None = None
    id: str | None = None
    attached: str | None = None  # the -device that attaches an if=none drive


@dataclass
class _NetBackend:
    text: str
    kind: str
    pairs: list[tuple[str, str]]
    index: int
    attached: list[str] = field(default_factory=list)  # NIC models


def import_qemu(argv: list[str], cwd: str | os.PathLike | None = None) -> tuple[dict, list[str]]:
    """A QEMU command line (argv, binary first or not) as a profile dict, plus the options it could not map.
    Relative paths stay relative (the profile resolves them against its own folder) unless `cwd` is given,
    which makes them absolute (use the folder the QEMU command ran in)."""
    notes: list[tuple[int, int, str]] = []  # (argv position, order found, note): listed in command-line order
    at = [0]

    def unmapped(text: str, why: str, index: int | None = None) -> None:
        notes.append((at[0] if index is None else index, len(notes), f"{text} ({why})"))

    def path(value: str) -> str:
        value = os.path.expanduser(value)
        return os.path.normpath(os.path.join(os.fspath(cwd), value)) if cwd is not None else value

    binary, opts, positional = _tokenize(argv)
    profile: dict[str, Any] = {}
    arch = None
    if binary is not None:
        base = os.path.basename(binary)
        match = re.fullmatch(r"qemu-system-(\w+)", base)
        if match and match.group(1) in registry.arches():
            arch = match.group(1)
        elif match:
            unmapped(binary, f"architecture {match.group(1)} is not supported: only {' and '.join(registry.arches())}")
        elif base != "qemu-kvm":
            unmapped(binary, "not a qemu-system-* binary; the host's architecture is assumed")
    effective_arch = arch or host_arch()
    machine = None
    cpu_hide: list[str] = []
    cpu_seen = kvm = daemonize = nodefaults = net_seen = False
    no_net = False
    name = cpus = memory = kernel = initrd = cmdline = console_log = None
    serial_seen = snapshot = False
    drives: list[_Drive] = []
    backends: dict[str, _NetBackend] = {}
    user_nics: list[_NetBackend] = []  # -nic user / -net user: backend and NIC in one
    legacy_nic_models: list[str] = []
    devices: list[tuple[str, list[tuple[str, str]], str]] = []

    for position, opt in enumerate(opts):
        at[0] = position
        arg = opt.arg or ""
        if opt.name == "-name":
            pairs = parse_qemu_opts(arg, "guest")
            for key, value in pairs:
                if key == "guest":
                    name = value
                else:
                    unmapped(f"-name {key}={value}", "not a profile setting")
        elif opt.name == "-daemonize":
            daemonize = True
        elif opt.name == "-enable-kvm":
            kvm = True
        elif opt.name == "-accel":
            pairs = parse_qemu_opts(arg, "accel")
            accel = dict(pairs).get("accel", "")
            if accel == "kvm":
                kvm = True
                rest = [(k, v) for k, v in pairs if k != "accel"]
                if rest:
                    unmapped(f"-accel {_opts_text(rest)}", "accelerator properties are not profile settings")
            else:
                unmapped(opt.text, "cloudkvm always runs guests on KVM")
        elif opt.name in ("-M", "-machine"):
            for key, value in parse_qemu_opts(arg, "type"):
                if key == "type":
                    machine = _machine(value, effective_arch, opt, unmapped) or machine
                elif key == "accel":
                    if value.split(":")[0] == "kvm":
                        kvm = True
                    else:
                        unmapped(f"{opt.name} accel={value}", "cloudkvm always runs guests on KVM")
                else:
                    unmapped(f"{opt.name} {key}={value}", "machine properties are not profile settings")
        elif opt.name == "-cpu":
            cpu_seen = True
            cpu_hide += _cpu(arg, effective_arch, opt, unmapped)
        elif opt.name == "-smp":
            cpus = _smp(arg, opt, unmapped) or cpus
        elif opt.name == "-m":
            memory = _memory(arg, opt, unmapped) or memory
        elif opt.name == "-kernel":
            kernel = path(arg)
        elif opt.name == "-initrd":
            initrd = path(arg)
        elif opt.name == "-append":
            cmdline = arg
        elif opt.name == "-drive":
            drives.append(_drive(arg, opt.text, position))
        elif opt.name in ("-hda", "-hdb", "-hdc", "-hdd"):
            drives.append(_Drive(opt.text, [("file", arg)], position, file=arg))
        elif opt.name == "-netdev":
            net_seen = True
            pairs = parse_qemu_opts(arg, "type")
            values = dict(pairs)
            backend = _NetBackend(opt.text, values.get("type", ""), pairs, position)
            if "id" in values:
                backends[values["id"]] = backend
            else:
                unmapped(opt.text, "a -netdev needs an id=")
        elif opt.name == "-nic":
            net_seen = True
            pairs = parse_qemu_opts(arg, "type")
            values = dict(pairs)
            if values.get("type") == "none":
                no_net = True
            elif values.get("type") == "user":
                backend = _NetBackend(opt.text, "user", [(k, v) for k, v in pairs if k != "model"], position)
                backend.attached.append(values.get("model", _default_nic(machine, effective_arch)))
                user_nics.append(backend)
            else:
                unmapped(opt.text, "only user networking is supported")
        elif opt.name == "-net":
            net_seen = True
            pairs = parse_qemu_opts(arg, "type")
            values = dict(pairs)
            if values.get("type") == "none":
                no_net = True
            elif values.get("type") == "nic":
                legacy_nic_models.append(values.get("model", _default_nic(machine, effective_arch)))
                rest = [(k, v) for k, v in pairs if k not in ("type", "model", "netdev", "vlan")]
                if rest:
                    unmapped(f"-net nic,{_opts_text(rest)}", "NIC properties are not profile settings")
            elif values.get("type") == "user":
                user_nics.append(_NetBackend(opt.text, "user", pairs, position))
            else:
                unmapped(opt.text, "only user networking is supported")
        elif opt.name == "-device":
            pairs = parse_qemu_opts(arg, "driver")
            devices.append((dict(pairs).get("driver", ""), pairs, opt.text, position))
        elif opt.name == "-global":
            if arg.replace(" ", "") in ("virtio-blk-device.scsi=off", "virtio-blk-pci.scsi=off"):
                pass  # cloudkvm's virtio-blk has no SCSI passthrough (VIRTIO_BLK_F_SCSI): this is its behaviour
            else:
                unmapped(opt.text, "device defaults are not profile settings")
        elif opt.name == "-nodefaults":
            nodefaults = True
        elif opt.name == "-nographic":
            pass  # cloudkvm never has a graphical display; the serial console is the console
        elif opt.name == "-display":
            if arg.split(",")[0] != "none":
                unmapped(opt.text, _NO_DISPLAY)
        elif opt.name == "-vga":
            if arg != "none":
                unmapped(opt.text, _NO_DISPLAY)
        elif opt.name == "-vnc":
            unmapped(opt.text, _NO_DISPLAY)
        elif opt.name == "-serial":
            if serial_seen:
                unmapped(opt.text, "only one serial port")
            elif arg.startswith("file:"):
                console_log = path(arg[5:])
            elif arg not in ("stdio", "mon:stdio"):
                unmapped(opt.text, "the console goes to the instance's log (console.log) and `cloudkvm attach`")
            serial_seen = True
        elif opt.name == "-snapshot":
            snapshot = True  # snapshot=on for every drive: noted per disk
        elif opt.name in ("-monitor", "-qmp", "-mon", "-chardev"):
            unmapped(opt.text, "cloudkvm has its own control socket")
        elif opt.name == "-pidfile":
            unmapped(opt.text, "cloudkvm keeps the pid in the instance folder")
        elif opt.name in ("-bios", "-pflash", "-boot"):
            unmapped(opt.text, "cloudkvm boots the kernel directly, without firmware")
        else:
            unmapped(opt.text, "not supported by cloudkvm")
    for word in positional:
        drives.append(_Drive(word, [("file", word)], len(opts), file=word))
    at[0] = len(opts) + 1  # from here on: notes about the command line as a whole

    # -device: attach drives and network backends
    by_id = {d.id: d for d in drives if d.id}
    for driver, pairs, text, position in devices:
        at[0] = position
        values = dict(pairs)
        if driver in _VIRTIO_BLK or driver in _SCSI - {"virtio-scsi-device", "virtio-scsi-pci"}:
            drive = by_id.get(values.get("drive", ""))
            if drive is None:
                unmapped(text, f"no -drive with id={values.get('drive', '')}")
            elif driver in _VIRTIO_BLK:
                drive.attached = driver
                rest = [(k, v) for k, v in pairs if k not in ("driver", "drive", "id", "bus", "addr")]
                if rest:
                    unmapped(f"-device {driver},{_opts_text(rest)}", "disk properties are not profile settings")
            else:
                drive.attached = driver
                unmapped(text, "SCSI disks are not supported: only virtio-blk")
        elif driver in _VIRTIO_NET or driver in _OTHER_NICS:
            backend = backends.get(values.get("netdev", ""))
            if backend is None:
                unmapped(text, f"no -netdev with id={values.get('netdev', '')}")
                continue
            backend.attached.append(driver)
            rest = [(k, v) for k, v in pairs if k not in ("driver", "netdev", "id", "bus", "addr")]
            if rest:
                unmapped(f"-device {driver},{_opts_text(rest)}", "NIC properties are not profile settings")
        elif driver in _SCSI:
            unmapped(text, "SCSI controllers are not supported: disks are virtio-blk")
        else:
            unmapped(text, "device not supported by cloudkvm")

    at[0] = len(opts) + 1
    board = machine or registry.for_arch(effective_arch).name
    if machine is None:
        if effective_arch == "x86_64":
            unmapped("(no -M)", "approximated: QEMU's default pc machine runs on cloudkvm's microvm-like x86 board")
        else:
            unmapped("(no -M)", "qemu-system-aarch64 needs one; using virt")
    if not kvm:
        unmapped("(no -enable-kvm)", "QEMU would emulate the CPU with TCG; cloudkvm always uses KVM")
    if not cpu_seen:
        unmapped("(no -cpu)", "QEMU would use its default CPU model; cloudkvm uses host")

    disks = []
    for drive in drives:
        at[0] = drive.index
        disk = _disk(drive, board, path, unmapped, snapshot)
        if disk is not None:
            disks.append(disk)

    network = _network(backends, user_nics, legacy_nic_models, unmapped)
    at[0] = len(opts) + 1
    if network is None:
        network = "none" if (no_net or net_seen or nodefaults) else "user"  # QEMU adds a user NIC by default

    if name is None:
        unmapped("(no -name)", "the profile is named 'imported'")
        name = "imported"
    elif not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", name):
        fixed = re.sub(r"[^A-Za-z0-9._-]", "-", name).lstrip("._-")[:63] or "imported"
        unmapped(f"-name {shlex.quote(name)}", f"renamed '{fixed}': a profile name names a folder")
        name = fixed

    if arch is not None:
        profile["name"], profile["arch"] = name, arch
    else:
        profile["name"] = name
    profile["machine"] = board
    profile["cpu"] = {"model": "host", "hide": cpu_hide} if cpu_hide else "host"
    profile["cpus"] = cpus or 1
    profile["memory"] = size_text(memory or 128 << 20)  # QEMU's default RAM: 128 MiB
    boot: dict[str, Any] = {}
    if kernel is not None:
        boot["kernel"] = kernel
    else:
        unmapped("(no -kernel)", "cloudkvm boots a kernel directly; add boot.kernel")
    if initrd is not None:
        boot["initrd"] = initrd
    if cmdline is not None:
        boot["cmdline"] = cmdline
    profile["boot"] = boot
    if disks:
        profile["disks"] = disks
    profile["network"] = network
    if console_log is not None:
        profile["console"] = {"log": console_log}
    profile["daemonize"] = daemonize
    return profile, [note for _, _, note in sorted(notes)]


def _machine(value: str, arch: str, opt: _Opt, unmapped) -> str | None:
    """The board QEMU's `-M value` means (boards/registry.py), or None with the reason listed."""
    board = registry.for_qemu_machine(value)
    if board is None:
        known = " and ".join(f"{b.name} ({b.arch})" for b in registry.boards())
        unmapped(opt.text, f"machine not supported: {known} only")
        return None
    if board.arch != arch:
        unmapped(opt.text, f"{value} is an {board.arch} machine, not {arch}")
        return None
    if board.approximates(value):
        unmapped(opt.text, f"approximated: {value} runs on cloudkvm's {board.qemu_machine}-like {board.name} board "
                           "(virtio-mmio, no PCI)")
    return board.name


def _cpu(arg: str, arch: str, opt: _Opt, unmapped) -> list[str]:
    hide = []
    parts = parse_qemu_opts(arg, "model")
    model = dict(parts).get("model", "")
    if model != "host":
        unmapped(f"-cpu {model}", "approximated: cloudkvm offers the host CPU model only")
    for key, value in parts:
        if key == "model":
            continue
        feature, off = key, not _on(value)
        if key[:1] in "+-" and value == "on":  # legacy +feat / -feat
            feature, off = key[1:], key[0] == "-"
        ours = _FROM_QEMU_FEATURE.get(feature, feature.replace("-", "_").replace(".", "_"))
        if off and ours in registry.for_arch(arch).cpu_features():
            hide.append(ours)
        else:
            unmapped(f"-cpu {model},{key}" + ("" if key[:1] in "+-" else f"={value}"),
                     "only hiding known x86 features is supported: cpu.hide")
    return hide


def _smp(arg: str, opt: _Opt, unmapped) -> int | None:
    values = dict(parse_qemu_opts(arg, "cpus"))
    try:
        numbers = {key: int(value) for key, value in values.items()}
    except ValueError:
        unmapped(opt.text, "cannot read the CPU count")
        return None
    topology = 1
    for key in ("sockets", "dies", "clusters", "cores", "threads", "books", "drawers"):
        topology *= numbers.get(key, 1)
    cpus = numbers.get("cpus") or topology
    if any(numbers.get(key, 1) > 1 for key in ("sockets", "dies", "clusters", "threads", "books", "drawers")):
        unmapped(opt.text, f"approximated: {cpus} single-threaded cores on one socket")
    if numbers.get("maxcpus", cpus) > cpus:
        unmapped(f"-smp maxcpus={numbers['maxcpus']}", "no CPU hotplug")
    unknown = set(numbers) - {"cpus", "sockets", "dies", "clusters", "cores", "threads", "books", "drawers",
                              "maxcpus"}
    for key in sorted(unknown):
        unmapped(f"-smp {key}={values[key]}", "not a profile setting")
    return cpus


def _memory(arg: str, opt: _Opt, unmapped) -> int | None:
    pairs = parse_qemu_opts(arg, "size")
    values = dict(pairs)
    size = _parse_memory(values.get("size", ""))
    if size is None:
        unmapped(opt.text, "cannot read the memory size")
    for key, value in pairs:
        if key != "size":
            unmapped(f"-m {key}={value}", "no memory hotplug")
    return size


def _drive(arg: str, text: str, index: int) -> _Drive:
    pairs = parse_qemu_opts(arg, "file")
    values = dict(pairs)
    return _Drive(text, pairs, index, file=values.get("file"), interface=values.get("if"), id=values.get("id"))


def _disk(drive: _Drive, board: str, path, unmapped, snapshot: bool) -> dict | None:
    values = dict(drive.pairs)
    if not drive.file:
        unmapped(drive.text, "a drive without a file")
        return None
    if values.get("media", "disk") != "disk":
        unmapped(drive.text, "CD-ROMs are not supported: cloud-init seeds are generated by cloudkvm")
        return None
    fmt = values.get("format")
    if fmt is not None and fmt not in ("qcow2", "raw"):
        unmapped(drive.text, f"format {fmt} is not supported: qcow2 or raw")
        return None
    interface = drive.interface
    if interface is None:
        interface = "virtio" if board == "virt" else "ide"  # QEMU's block_default_type for the machine
    if interface == "none":
        if drive.attached is None:
            unmapped(drive.text, "not attached to any virtio-blk device")
            return None
        if drive.attached not in _VIRTIO_BLK:
            return None  # already listed with its -device
    elif interface in ("ide", "scsi", "sata"):
        unmapped(drive.text, f"approximated: an {interface} disk becomes virtio-blk, /dev/vdX in the guest")
    elif interface != "virtio":
        unmapped(drive.text, f"if={interface} is not supported: disks are virtio-blk")
        return None
    disk: dict[str, Any] = {"file": path(drive.file)}
    if fmt:
        disk["format"] = fmt
    if _on(values.get("snapshot", "on" if snapshot else "off")):
        disk["overlay"] = True
        unmapped(drive.text, "approximated: snapshot=on (or -snapshot) became overlay: true, whose writes persist "
                             "in the instance's overlay instead of being discarded")
    if _on(values.get("readonly", values.get("read-only", "off"))):
        disk["read_only"] = True
    mapped = {"file", "format", "if", "id", "media", "index", "snapshot", "readonly", "read-only"}
    rest = [(k, v) for k, v in drive.pairs if k not in mapped]
    if rest:
        unmapped(f"-drive {_opts_text(rest)}", "drive properties are not profile settings")
    return disk


def _default_nic(machine: str | None, arch: str) -> str:
    board = machine or registry.for_arch(arch).name
    return "virtio-net-pci" if board == "virt" else "e1000"  # QEMU's default NIC model for the machine


def _network(backends: dict[str, _NetBackend], user_nics: list[_NetBackend], legacy_nic_models: list[str],
             unmapped) -> dict | None:
    candidates: list[_NetBackend] = []
    for backend in backends.values():
        if not backend.attached:
            unmapped(backend.text, "not attached to any NIC: the guest would have no network", backend.index)
        elif backend.kind != "user":
            unmapped(backend.text, "only user networking is supported", backend.index)
        else:
            candidates.append(backend)
    for backend in user_nics:
        if backend.attached or legacy_nic_models:
            if not backend.attached:
                backend.attached.append(legacy_nic_models[0])
            candidates.append(backend)
        else:
            unmapped(backend.text, "no -net nic: the guest would have no network", backend.index)
    if legacy_nic_models and not user_nics:
        unmapped("-net nic", "no -net user backend: the guest's NIC would be connected to nothing")
    if not candidates:
        return None
    for extra in candidates[1:]:
        unmapped(extra.text, "only one network interface is supported", extra.index)
    backend = candidates[0]
    for model in backend.attached:
        if model not in _VIRTIO_NET:
            unmapped(f"NIC model {model}", "approximated: the guest sees a virtio-net NIC", backend.index)
    network: dict[str, Any] = {"mode": "user"}
    forwards = []
    for key, value in backend.pairs:
        if key in ("type", "id", "vlan", "name"):
            continue
        if key == "hostfwd":
            try:
                spec = value if value.split(":", 1)[0] else "tcp" + value
                fwd = parse_forward(spec)
            except ValueError:
                unmapped(f"hostfwd={value}", "cannot read this port forward", backend.index)
                continue
            fwd.setdefault("host_ip", "0.0.0.0")  # QEMU listens on every address when none is given
            forwards.append(f"{fwd['proto']}:{fwd['host_ip']}:{fwd['host_port']}-{fwd.get('guest_ip', '')}:"
                            f"{fwd['guest_port']}")
        elif key == "net":
            network["net"] = value
        elif key == "restrict":
            network["restrict"] = _on(value)
        else:
            unmapped(f"user net {key}={value}", "not a profile setting", backend.index)
    if network.get("net") == DEFAULT_NET:
        del network["net"]
    if forwards:
        network["forwards"] = forwards
    return network if len(network) > 1 else "user"


# ---------------------------------------------------------------------------------------------------- profile -> QEMU

def _qemu_feature(name: str) -> str:
    return _QEMU_FEATURE.get(name, name.replace("_", "-"))


def profile_to_qemu(profile: Profile) -> list[str]:
    """The QEMU command line that runs the same VM (as close as QEMU gets: `-M microvm` for the x86 board,
    virtio-mmio devices). Not expressible, so left out: disk `size` (grow the image first with `qemu-img
    resize`), `host_quirks`; an `overlay` disk becomes snapshot=on (QEMU discards the writes at exit)."""
    if profile.images:
        raise CloudkvmError(f"{profile.where('images')}: images: has no QEMU command line equivalent (QEMU does not "
                            f"fetch, verify or overlay an image, nor read its kernel)", "`cloudkvm up` runs it")
    argv = [f"qemu-system-{profile.arch}", "-name", profile.name]
    if profile.daemonize:
        argv.append("-daemonize")
    argv += ["-enable-kvm", "-M", registry.named(profile.machine).qemu_machine]
    argv += ["-cpu", ",".join([profile.cpu.model] + [f"{_qemu_feature(n)}=off" for n in profile.cpu.hide])]
    argv += ["-smp", str(profile.cpus), "-m", size_text(profile.memory)]
    argv += ["-kernel", str(profile.boot.kernel)]
    if profile.boot.initrd is not None:
        argv += ["-initrd", str(profile.boot.initrd)]
    if profile.boot.cmdline:
        argv += ["-append", profile.boot.cmdline]
    for index, disk in enumerate(profile.disks):
        pairs = [("file", str(disk.file))]
        if disk.format:
            pairs.append(("format", disk.format))
        pairs += [("if", "none"), ("id", f"disk{index}")]
        if disk.read_only:
            pairs.append(("readonly", "on"))
        if disk.overlay:
            pairs.append(("snapshot", "on"))
        argv += ["-drive", _opts_text(pairs), "-device", f"virtio-blk-device,drive=disk{index}"]
    net = profile.network
    if net.mode == "user":
        pairs = [("id", "net0")]
        if net.net != DEFAULT_NET:
            pairs.append(("net", net.net))
        if net.restrict:
            pairs.append(("restrict", "on"))
        pairs += [("hostfwd", fwd.spec()) for fwd in net.forwards]
        argv += ["-netdev", "user," + _opts_text(pairs), "-device", "virtio-net-device,netdev=net0"]
    else:
        argv += ["-nic", "none"]
    if profile.console.log is not None:
        argv += ["-serial", f"file:{profile.console.log}"]
    argv += ["-display", "none"] if profile.daemonize else ["-nographic"]
    return argv


# ---------------------------------------------------------------------------------------------------- YAML out

_NESTED_ORDER = {
    "cpu": ("model", "hide"),
    "boot": ("kernel", "initrd", "cmdline"),
    "disks": ("file", "format", "overlay", "size", "read_only", "interface"),
    "network": ("mode", "net", "restrict", "forwards"),
    "forwards": ("proto", "host_ip", "host_port", "guest_ip", "guest_port"),
    "console": ("serial", "log"),
}


def _ordered(data: Any, order: tuple[str, ...] | None, key: str | None = None) -> Any:
    if isinstance(data, dict):
        ranked = sorted(data, key=lambda k: (order.index(k) if order and k in order else len(order or ()), str(k)))
        return {k: _ordered(data[k], _NESTED_ORDER.get(k), k) for k in ranked}
    if isinstance(data, list):
        return [_ordered(item, order, key) for item in data]
    if isinstance(data, os.PathLike):
        return os.fspath(data)
    return data


class _Dumper(yaml.SafeDumper):
    pass


def _str_representer(dumper: yaml.SafeDumper, text: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _str_representer)


def dump_profile_yaml(data: dict, schema: str | None = None) -> str:
    """A profile dict as YAML, keys in the order name, arch, machine, cpu, cpus, memory, boot, disks, network,
    console, daemonize (then the rest); `schema` adds the yaml-language-server modeline."""
    text = yaml.dump(_ordered(data, PROFILE_FIELD_ORDER), Dumper=_Dumper, sort_keys=False,
                     default_flow_style=False, allow_unicode=True, width=4096)
    return (f"# yaml-language-server: $schema={schema}\n" if schema else "") + text
