"""VM profiles: the pydantic model of a profile, YAML loading with `file:line:col` errors, `base:` inheritance,
`${VAR}` / `${VAR:-default}` expansion, and the JSON Schema editors use (`profiles/schema.json`).

Loading a file goes: YAML compose (every node keeps its position) -> `${VAR}` expansion -> paths resolved against
the file's own folder -> its `base:` profiles loaded the same way and merged under it (maps merge key by key, lists
concatenate base first, the child wins on scalars) -> pydantic validation -> (optionally) the files exist.
The first problem found becomes one `CloudkvmError("<file>:<line>:<col>: <field.path>: <message>", hint)`.
Hostile files end the same way, quickly: only regular files of at most 1 MiB are read (never a FIFO or device),
and nesting, values (every use of a YAML alias counted), files named through base: and numbers are bounded.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import errno
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Union, get_args, get_origin

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo,
                      WithJsonSchema, model_validator)

from .boards import registry
from .errors import CloudkvmError, FieldError, printable
from .fsutil import file_kind
from .images.cloudinit import USER_NAME
from .images.digest import is_digest
from .net import config as netconfig
from .net.config import DEFAULT_FORWARD_HOST_IP, DEFAULT_NET, parse_forward
from .units import parse_size
from .yamlevents import BoundedLoader, yaml_text

MiB = 1 << 20
GiB = 1 << 30
MIN_MEMORY = 16 * MiB
DEFAULT_MEMORY = "512M"
# The profile format's boards (boards/registry.py): arch -> machine, machine -> console (16550 on x86; PL011 on virt)
ARCH_MACHINE = {board.arch: board.name for board in registry.boards()}
MACHINE_SERIAL = {board.name: board.default_console for board in registry.boards()}
PROFILE_FIELD_ORDER = ("base", "name", "arch", "machine", "cpu", "cpus", "memory", "images", "disk", "boot", "disks",
                       "cloud_init", "network", "console", "daemonize", "host_quirks")
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "profiles" / "schema.json"
_SCHEMA_HINT = "see profiles/schema.json for the profile format"
# Where paths appear in a profile (resolved against the folder of the file they are written in).
_PATH_FIELDS = (("boot", "kernel"), ("boot", "initrd"), ("console", "log"), ("disks", int, "file"),
                ("cloud_init", "user_data_file"))
# Fields that hold a URL or a path: a path (no `scheme://`, not a `sha256:`/`sha512:` digest) is resolved like the
# fields above.
_LOCATION_FIELDS = (("images", int, "location"), ("images", int, "digest"))
_CHECKED_FILES = (("boot", "kernel"), ("boot", "initrd"), ("disks", int, "file"))
# Bounds on what a profile may make the loader do (profiles are a few hundred bytes, nest 5 deep, hold ~50 values).
MAX_PROFILE_BYTES = 1 * MiB  # per file
MAX_DEPTH = 32  # maps and lists inside each other
MAX_VALUES = 10_000  # values produced, counting every use of a YAML alias, over a profile and all its bases
MAX_NODES = 2 * MAX_VALUES  # keys and values written in one file
MAX_PROFILE_FILES = 32  # files read through base:, counting every time a file is named
MAX_NUMBER_CHARS = 100  # the text of one YAML number
MAX_NUMBER_BITS = 64  # no profile field holds a larger number (sizes are at most 2^64 bytes)


def host_arch() -> str:
    """This host's architecture as a profile `arch` (x86_64 when the host is neither x86_64 nor aarch64)."""
    return registry.host_arch() or "x86_64"


# ---------------------------------------------------------------------------------------------------- field types

def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, not {str(value).lower()}")
    return value


def _size(what: str):
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"expected a size such as 512M, 4G or 4096 (MiB), not {_show(value)}")
        try:
            return parse_size(value if isinstance(value, int) else str(value), what)
        except CloudkvmError as exc:
            raise FieldError(exc.message.split(": ", 1)[-1], hint=exc.hint) from None
    return parse


def _path(value: Any, info: ValidationInfo) -> Path:
    if not isinstance(value, (str, Path)):
        raise ValueError(f"expected a path, not {_show(value)}")
    if str(value).strip() == "":
        raise ValueError("the path is empty")
    if "\0" in str(value):
        raise ValueError("the path contains a NUL character")
    path = Path(os.path.expanduser(str(value)))
    base_dir = (info.context or {}).get("base_dir")
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return Path(os.path.normpath(path)) if path.is_absolute() else path


def _ipv4(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected an IPv4 address, not {_show(value)}")
    return netconfig.ipv4_address(value)


def _name(value: Any) -> Any:
    if isinstance(value, str) and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", value):
        raise FieldError(f"'{value}' is not a valid name",
                         hint="use up to 63 letters, digits, '.', '_' and '-' (it names the instance folder)")
    return value


Port = Annotated[int, Field(ge=1, le=65535), BeforeValidator(_no_bool)]
ProfilePath = Annotated[Path, BeforeValidator(_path, json_schema_input_type=str)]
IPv4 = Annotated[str, BeforeValidator(_ipv4)]
# The schema's patterns also accept any `${VAR}` reference: its value is only known when the profile is loaded.
SizeText = Union[int, Annotated[str, Field(pattern=r"^\s*\d+(\.\d+)?\s*([kKmMgGtT]?)([iI]?[bB])?\s*$|\$\{")]]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------------- the models

class CpuSpec(_Model):
    """The vCPU model: `host` (what KVM supports), minus the features named in `hide`."""

    model: Literal["host"] = Field("host", description="CPU model; only `host` (KVM's supported CPUID) for now")
    hide: list[Annotated[str, WithJsonSchema({"type": "string", "enum": list(registry.cpu_features())})]] = Field(
        default_factory=list, description="x86 CPU features to hide from the guest (e.g. cx16, avx512f)")


def _cpu_shorthand(value: Any) -> Any:
    return {"model": value} if isinstance(value, str) else value


class Boot(_Model):
    """Direct Linux boot: a kernel file (optional initramfs) or the newest kernel inside the image, and the kernel
    command line."""

    kernel: ProfilePath | None = Field(None, description="kernel image (bzImage or vmlinux on x86_64, Image on "
                                                         "aarch64)")
    initrd: ProfilePath | None = Field(None, description="initramfs / initrd image")
    from_image: bool = Field(False, description="boot the newest vmlinuz/initrd.img pair found in the image's own "
                                                "file systems (root=UUID= and the console are added)")
    cmdline: str = Field("", description="kernel command line (with from_image: added after root= and console=)")
    format: Literal["linux", "flat"] = Field(
        "linux", description="linux: the Linux boot protocol; flat: a raw binary every vCPU enters at 1 MiB in "
                             "64-bit mode (cloudkvm's purpose-built test guests)")

    @model_validator(mode="after")
    def _consistent(self) -> "Boot":
        if self.from_image:
            for key in ("kernel", "initrd"):
                if getattr(self, key) is not None:
                    raise FieldError(f"from_image boots the image's own kernel; {key} cannot be given too", (key,),
                                     f"drop {key}, or drop from_image")
            if self.format != "linux":
                raise FieldError("from_image boots Linux", ("format",), "drop format")
        elif self.kernel is None:
            raise FieldError("boot needs a kernel, or from_image: true", ("kernel",),
                             "name the kernel file, or set from_image: true to boot the image's own kernel")
        return self


def _location(value: Any) -> Any:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a URL or a path, not {_show(value)}")
    if not value.isprintable():
        raise ValueError("the location contains control characters")
    return value.strip()


def _image_digest(value: Any) -> Any:
    from .images.digest import parse_digest

    value = _location(value)
    if is_digest(value):
        try:
            return str(parse_digest(value))
        except CloudkvmError as exc:
            raise FieldError(exc.message.split(": ", 1)[-1], hint=exc.hint) from None
    return value


class Image(_Model):
    """A cloud image by URL or path (the first whose arch is the VM's is used), checked against its digest."""

    location: Annotated[str, BeforeValidator(_location)] = Field(
        description="http(s):// or file:// URL, or a path (relative: from the profile's folder); .xz/.gz/.zst are "
                    "unpacked")
    arch: Literal[tuple(ARCH_MACHINE)] | None = Field(None, description="the image's architecture (default: any)")
    digest: Annotated[str, BeforeValidator(_image_digest)] | None = Field(
        None, description="sha256:HEX or sha512:HEX, or the URL of the distribution's SHA256SUMS/SHA512SUMS file")


_HOSTNAME = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"  # one RFC 1123 label


def _cloud_init_shorthand(value: Any) -> Any:
    return {"enabled": value} if isinstance(value, bool) else value


class CloudInit(_Model):
    """The cloud-init NoCloud seed (ISO 9660, label cidata) cloudkvm writes for the instance: a user who logs in
    with the instance's own ssh key, the host name, packages, and extra user-data merged in."""

    enabled: bool = Field(True, description="write and attach the seed (false: none)")
    user: Annotated[str, Field(pattern=f"^{USER_NAME.pattern}$")] = Field(
        "cloudkvm", description="the user cloud-init creates (sudo without a password, ssh keys only)")
    ssh_keys: list[str] = Field(default_factory=list, description="more public keys to authorize (the instance's "
                                                                  "own key always is)")
    dot_ssh_keys: bool = Field(False, description="also authorize the keys in ~/.ssh/*.pub")
    hostname: Annotated[str, Field(pattern=f"^{_HOSTNAME}$")] | None = Field(
        None, description="the guest's host name (default: the VM's name)")
    packages: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9.+:=~_-]*$")]] = Field(
        default_factory=list, description="packages to install at first boot")
    user_data: dict[str, Any] | None = Field(None, description="more cloud-config, merged over cloudkvm's (maps "
                                                               "merge, lists append, later scalars win)")
    user_data_file: ProfilePath | None = Field(None, description="a #cloud-config file merged after user_data")
    network_config: dict[str, Any] | None = Field(None, description="network-config (version 1 or 2) for the seed")

    @model_validator(mode="after")
    def _consistent(self) -> "CloudInit":
        for index, key in enumerate(self.ssh_keys):
            from .images.sshkeys import check_public_key

            try:
                self.ssh_keys[index] = check_public_key(key, "")
            except CloudkvmError as exc:
                raise FieldError(exc.message.lstrip(": "), ("ssh_keys", index), exc.hint) from None
        if self.network_config is not None:
            from .images.cloudinit import network_config

            try:
                network_config(self.network_config, "")
            except CloudkvmError as exc:
                raise FieldError(exc.message.lstrip(": "), ("network_config",), exc.hint) from None
        return self


class Disk(_Model):
    """A disk image given to the guest."""

    file: ProfilePath = Field(description="disk image file")
    format: Literal["qcow2", "raw"] | None = Field(None, description="image format; probed when omitted")
    overlay: bool = Field(False, description="write into a per-instance copy-on-write overlay, never the original")
    size: Annotated[int, BeforeValidator(_size("size"), json_schema_input_type=SizeText)] | None = Field(
        None, description="grow the disk to this size (e.g. 20G; a bare number means MiB)")
    read_only: bool = Field(False, description="the guest cannot write to the disk")
    interface: Literal["virtio-blk"] = Field("virtio-blk", description="how the guest sees the disk")
    trust_backing: bool = Field(False, description="let the image's backing chain name absolute paths, files "
                                                   "outside the image's folder, or block devices")

    @model_validator(mode="after")
    def _consistent(self) -> "Disk":
        if self.size is not None and self.read_only and not self.overlay:
            raise FieldError("a read-only disk cannot be grown", ("size",),
                             "drop size, or set overlay: true to grow a copy-on-write overlay")
        return self


FORWARD_PATTERN = r"^([tT][cC][pP]|[uU][dD][pP]):([0-9.]*):[0-9]+-([0-9.]*):[0-9]+$|\$\{"


def _forward_shorthand(value: Any) -> Any:
    return parse_forward(value) if isinstance(value, str) else value


class Forward(_Model):
    """A host port forwarded into the guest (user networking)."""

    proto: Literal["tcp", "udp"] = Field("tcp", description="tcp or udp")
    host_ip: IPv4 = Field(DEFAULT_FORWARD_HOST_IP, description="host address to listen on (default 127.0.0.1)")
    host_port: Port = Field(description="host port to listen on")
    guest_ip: IPv4 | None = Field(None, description="guest address (default: the guest's DHCP address)")
    guest_port: Port = Field(description="guest port to connect to")

    def spec(self) -> str:
        """The `tcp:127.0.0.1:2222-:22` form (also QEMU's hostfwd value)."""
        return f"{self.proto}:{self.host_ip}:{self.host_port}-{self.guest_ip or ''}:{self.guest_port}"


ForwardField = Annotated[Forward, BeforeValidator(
    _forward_shorthand, json_schema_input_type=Union[Annotated[str, Field(pattern=FORWARD_PATTERN)], Forward])]


def _ipv4_net(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected an IPv4 network such as 10.0.2.0/24, not {_show(value)}")
    return netconfig.ipv4_network(value)


class Network(_Model):
    """Guest networking: `none`, or `user` (libslirp NAT) with host port forwards."""

    mode: Literal["none", "user"] = Field("none", description="none, or user (NAT through the host)")
    forwards: list[ForwardField] = Field(
        default_factory=list, description="host ports forwarded into the guest: tcp:127.0.0.1:2222-:22 or a map")
    net: Annotated[str, BeforeValidator(_ipv4_net)] = Field(DEFAULT_NET, description="the guest network")
    restrict: bool = Field(False, description="isolate the guest: no connections out of the user network")
    mtu: int = Field(netconfig.USER_NET_MTU, description="the guest link's MTU (default 65520: 64 KiB frames)")

    @model_validator(mode="after")
    def _consistent(self) -> "Network":
        if self.forwards and self.mode != "user":
            raise FieldError("port forwards need mode: user", ("forwards",), "set network: {mode: user, ...}")
        netconfig.check_forwards(self.net, self.forwards)  # the user network's own rules (a FieldError at the place)
        netconfig.check_mtu(self.mtu)
        return self


def _network_shorthand(value: Any) -> Any:
    return {"mode": value} if isinstance(value, str) else value


class Console(_Model):
    """The serial console."""

    log: ProfilePath | None = Field(None, description="file for the serial output (default: the instance folder)")
    serial: Literal[tuple(MACHINE_SERIAL.values())] | None = Field(
        None, description="the guest's console device; derived from machine (x86: ttyS0, virt: ttyAMA0)")


class Profile(_Model):
    """A VM: what to boot, on which board, with which disks, network and console."""

    name: Annotated[str, BeforeValidator(_name)] = Field(description="the VM's name (names its instance folder)")
    arch: Literal[tuple(ARCH_MACHINE)] = Field(default_factory=host_arch,
                                               description="guest architecture (default: the host's)")
    machine: Literal[tuple(MACHINE_SERIAL)] | None = Field(None, description="board; derived from arch (x86_64: x86, "
                                                                      "aarch64: virt)")
    cpu: Annotated[CpuSpec, BeforeValidator(_cpu_shorthand, json_schema_input_type=Union[Literal["host"], CpuSpec])] \
        = Field("host", validate_default=True, description="`host`, or {model: host, hide: [features]}")
    cpus: Annotated[int, Field(ge=1, le=255), BeforeValidator(_no_bool)] = Field(1, description="vCPUs (1..255)")
    memory: Annotated[int, BeforeValidator(_size("memory"), json_schema_input_type=SizeText)] = Field(
        DEFAULT_MEMORY, validate_default=True, description="guest RAM: 512M, 4G, 4GiB or 4096 (MiB); at least 16M")
    images: list[Image] = Field(default_factory=list, description="the cloud image the VM boots from: its first "
                                "disk is an overlay on the cached image (the first entry of the VM's arch is used)")
    disk: Annotated[int, BeforeValidator(_size("disk"), json_schema_input_type=SizeText)] | None = Field(
        None, description="size of the image's disk (the overlay grows to it; default 10G, or the image's size "
                          "when larger)")
    boot: Boot = Field(description="direct kernel boot")
    disks: list[Disk] = Field(default_factory=list, description="more disks, in the order the guest sees them "
                                                                "(after the image's)")
    cloud_init: Annotated[CloudInit, BeforeValidator(
        _cloud_init_shorthand, json_schema_input_type=Union[bool, CloudInit])] | None = Field(
        None, description="the cloud-init seed; written by default when the VM boots an image")
    network: Annotated[Network, BeforeValidator(
        _network_shorthand, json_schema_input_type=Union[Literal["none", "user"], Network])] = Field(
        "none", validate_default=True, description="`none`, `user`, or {mode: user, forwards: [...]}")
    console: Console = Field(default_factory=Console, description="the serial console")
    daemonize: bool = Field(True, description="run in the background")
    host_quirks: bool = Field(True, description="apply this host's KVM workarounds (see docs/host-quirks.md)")

    _source: str | None = PrivateAttr(None)
    _positions: dict = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> "Profile":
        board = ARCH_MACHINE[self.arch]
        if self.machine is None:
            self.machine = board
        elif self.machine != board:
            raise FieldError(f"machine '{self.machine}' does not fit arch {self.arch}", ("machine",),
                             f"use machine: {board} for {self.arch} (or omit machine)")
        if self.memory < MIN_MEMORY:
            raise FieldError(f"{size_text(self.memory)} is too little memory (at least 16M)", ("memory",),
                             "write e.g. memory: 512M")
        if self.memory % MiB:
            raise FieldError(f"{self.memory} bytes is not a whole number of MiB", ("memory",), "write e.g. 512M")
        info = registry.named(self.machine)
        for index, name in enumerate(self.cpu.hide):
            if not info.cpu_hide:
                raise FieldError(f"hiding CPU features is only supported on {registry.cpu_hide_arches()}, not "
                                 f"{self.arch}", ("cpu", "hide", index), "remove cpu.hide")
            try:
                info.check_cpu_hide([name])
            except CloudkvmError as exc:
                raise FieldError(f"unknown CPU feature '{name}'", ("cpu", "hide", index), exc.hint) from None
        self._check_image()
        serial = MACHINE_SERIAL[self.machine]
        if self.console.serial is None:
            self.console.serial = serial
        elif self.console.serial != serial:
            raise FieldError(f"the {self.machine} board's console is {serial}, not {self.console.serial}",
                             ("console", "serial"), f"use serial: {serial} (or omit it)")
        return self

    def _check_image(self) -> None:
        if self.images and self.image is None:
            raise FieldError(f"no image for arch {self.arch}", ("images",),
                             f"add an entry with arch: {self.arch} (or one without arch)")
        if not self.images:
            if self.boot.from_image:
                raise FieldError("from_image needs an image", ("boot", "from_image"), "add images: [{location: URL}]")
            if self.disk is not None:
                raise FieldError("disk sizes the image's disk; there is no image", ("disk",),
                                 "add images:, or give a size to a disk under disks:")

    @property
    def image(self) -> "Image | None":
        """The image this VM boots from: the first entry of `images` for its arch."""
        return next((image for image in self.images if image.arch in (None, self.arch)), None)

    @property
    def seed(self) -> "CloudInit | None":
        """The cloud-init seed settings, when the VM gets a seed (by default when it boots an image)."""
        if self.cloud_init is not None:
            return self.cloud_init if self.cloud_init.enabled else None
        return CloudInit() if self.images else None

    def __eq__(self, other: object) -> bool:
        """Profiles are equal when they mean the same VM, wherever they were written."""
        return isinstance(other, Profile) and self.model_dump() == other.model_dump()

    @property
    def source(self) -> str | None:
        """The profile file this was loaded from (None when validated from a dict)."""
        return self._source

    def where(self, *loc: str | int) -> str:
        """`file:line:col` where a field (e.g. `where("disks", 0, "file")`) was written, for later errors."""
        pos = _locate(self._positions, tuple(loc))
        return str(pos) if pos else (self._source or "<profile>")


# ---------------------------------------------------------------------------------------------------- helpers

def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "a map"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, int) and value.bit_length() > MAX_NUMBER_BITS:
        return f"a {value.bit_length()}-bit number"  # str() of a huge int is slow, or refused past 4300 digits
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def size_text(size: int) -> str:
    """The shortest exact `parse_size` text for a byte count: 4G, 512M, 1536K."""
    for unit, factor in (("T", 1 << 40), ("G", GiB), ("M", MiB), ("K", 1 << 10)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    raise ValueError(f"{size} bytes is not a whole number of KiB")


def field_path(loc: tuple) -> str:
    """`('network', 'forwards', 1, 'host_port')` -> `network.forwards[1].host_port`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


@dataclass(frozen=True)
class _Pos:
    file: str
    line: int  # 1-based
    col: int  # 1-based

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass
class _Doc:
    """A profile's plain data plus where each value (`vals`) and each map key (`keys`) was written."""

    data: Any
    source: str
    vals: dict = field(default_factory=dict)
    keys: dict = field(default_factory=dict)
    _children: dict | None = field(default=None, repr=False)  # for subtree(); built after the positions are final

    def pos(self, loc: tuple, key: bool = False) -> str:
        found = (self.keys.get(loc) if key else None) or _locate(self.vals, loc)
        return str(found) if found else self.source

    def error(self, loc: tuple, message: str, hint: str = "", key: bool = False) -> CloudkvmError:
        where = self.pos(loc, key)
        return CloudkvmError(f"{where}: {field_path(loc)}: {message}" if loc else f"{where}: {message}", hint)

    def subtree(self, loc: tuple) -> list[tuple]:
        """`loc` and every recorded place below it (through an index of children, built once)."""
        if self._children is None:
            self._children = {}
            for place in set(self.vals) | set(self.keys):
                if place:
                    self._children.setdefault(place[:-1], []).append(place)
        out, todo = [], [loc]
        while todo:
            place = todo.pop()
            out.append(place)
            todo.extend(self._children.get(place, ()))
        return out


def _locate(vals: dict, loc: tuple) -> _Pos | None:
    """The position of `loc`, or of its nearest written parent (a missing field is reported at its map)."""
    for end in range(len(loc), -1, -1):
        if loc[:end] in vals:
            return vals[loc[:end]]
    return None


# ---------------------------------------------------------------------------------------------------- YAML

def _yaml_error(display: str, exc: yaml.YAMLError, text: str) -> CloudkvmError:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        problem = exc.problem or "cannot read this"
        lines = text.splitlines()
        line_text = lines[mark.line] if mark.line < len(lines) else ""
        if problem == "found character that cannot start any token" and mark.column < len(line_text):
            problem = f"found character {line_text[mark.column]!r} that cannot start any token"  # libyaml's words
        if exc.context and exc.context_mark is not None and "end of stream" in problem:
            mark = exc.context_mark  # an unclosed quote or bracket: where it opened, not the end of the file
            problem = f"{exc.context.removeprefix('while scanning ')} is never closed ({problem})"
        elif exc.context and exc.context_mark is not None and exc.context_mark.line != mark.line:
            problem += f" ({exc.context} at line {exc.context_mark.line + 1})"
        elif exc.context:
            problem = f"{exc.context}: {problem}"
        line_text = lines[mark.line] if mark.line < len(lines) else ""
        hint = "check the indentation and quoting around this line"
        if "\\t" in problem or "\t" in line_text:
            hint = "YAML indentation must use spaces, not tabs"
        return CloudkvmError(f"{display}:{mark.line + 1}:{mark.column + 1}: YAML syntax error: {problem}", hint)
    if isinstance(exc, yaml.reader.ReaderError):
        before = text[:exc.position]
        line, col = before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1
        return CloudkvmError(f"{display}:{line}:{col}: YAML syntax error: unacceptable character "
                             f"{exc.character!r}", "profiles are UTF-8 text without control characters")
    return CloudkvmError(f"{display}:1:1: YAML syntax error: {exc}", "check the file is YAML")


class UnreadableProfile(CloudkvmError):
    """A profile file that cannot be read; `reason` says why (no such file, not a file, too large, ...)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: cannot read the profile: {reason}", "check the profile path")
        self.reason = reason


def _not_regular(mode: int) -> str | None:
    return None if stat.S_ISREG(mode) else f"not a file ({file_kind(mode)})"


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "no such file"
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def read_profile_bytes(path: str | os.PathLike) -> bytes:
    """A profile file's bytes: a regular file (a FIFO, device or folder is refused before it is opened, and the
    open does not block) of at most MAX_PROFILE_BYTES. Raises `UnreadableProfile`."""
    shown = os.fspath(path)
    try:
        why = _not_regular(os.stat(path).st_mode)
        if why:
            raise UnreadableProfile(shown, why)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise UnreadableProfile(shown, _os_reason(exc)) from None
    except ValueError:  # a NUL byte in the path
        raise UnreadableProfile(shown, "the path contains a NUL character") from None
    try:
        info = os.fstat(fd)
        why = _not_regular(info.st_mode)  # replaced since the stat above
        if why:
            raise UnreadableProfile(shown, why)
        too_large = UnreadableProfile(shown, f"larger than {MAX_PROFILE_BYTES >> 20} MiB (profiles are small text "
                                             "files)")
        if info.st_size > MAX_PROFILE_BYTES:
            raise too_large
        chunks, total = [], 0
        while chunk := os.read(fd, MAX_PROFILE_BYTES + 1 - total):  # st_size is 0 for /proc files: read to EOF
            chunks.append(chunk)
            total += len(chunk)
            if total > MAX_PROFILE_BYTES:
                raise too_large
        return b"".join(chunks)
    except OSError as exc:
        raise UnreadableProfile(shown, _os_reason(exc)) from None
    finally:
        os.close(fd)


@dataclass
class _Budget:
    """What one load may still produce: values (MAX_VALUES) and files read through base: (MAX_PROFILE_FILES)."""

    values: int = MAX_VALUES
    files: int = MAX_PROFILE_FILES


_INT_TAG, _FLOAT_TAG, _MERGE_TAG = (f"tag:yaml.org,2002:{name}" for name in ("int", "float", "merge"))




class _BoundedLoader(BoundedLoader):
    """The profile loader: BoundedLoader with the profile's limits."""

    def __init__(self, text: str, display: str):
        super().__init__(text, display, "profile", MAX_DEPTH, MAX_NODES)


def _parse_yaml(raw: bytes, display: str, budget: _Budget) -> _Doc:
    """Parse one YAML file's bytes into plain data with the position of every value and key."""
    text = yaml_text(raw, display, "profile")
    doc = _Doc(None, display)
    loader = None
    try:
        loader = _BoundedLoader(text, display)
        node = loader.get_single_node()
        if node is None:
            raise CloudkvmError(f"{display}:1:1: the profile is empty", "write at least name: and boot: kernel:")
        if not isinstance(node, yaml.MappingNode):
            raise CloudkvmError(f"{display}:{node.start_mark.line + 1}:{node.start_mark.column + 1}: "
                                "a profile must be a map of fields (name: ..., boot: ...)", _SCHEMA_HINT)
        doc.data = _Walker(loader, doc, budget).walk(node, ())
    except yaml.YAMLError as exc:
        raise _yaml_error(display, exc, text) from None
    finally:
        if loader is not None:
            loader.dispose()
    return doc


def _mark(doc: _Doc, mark) -> _Pos:
    return _Pos(doc.source, mark.line + 1, mark.column + 1)


class _Walker:
    """Turns composed YAML nodes into plain data, recording positions; every value produced (each use of an
    alias again) is taken from the load's budget, so an alias bomb ends in an error, not in exponential work."""

    def __init__(self, loader: yaml.SafeLoader, doc: _Doc, budget: _Budget):
        self.loader, self.doc, self.budget = loader, doc, budget
        self.active: set[int] = set()  # nodes being walked: an alias to one of them is a loop
        self.depth = 0  # of the value being produced: aliases nest what they name, so parsing's bound is not enough

    def error(self, node: yaml.Node, loc: tuple, message: str, hint: str) -> CloudkvmError:
        where = f"{_mark(self.doc, node.start_mark)}: {field_path(loc)}" if loc else _mark(self.doc, node.start_mark)
        return CloudkvmError(f"{where}: {message}", hint)

    def walk(self, node: yaml.Node, loc: tuple) -> Any:
        self.doc.vals[loc] = _mark(self.doc, node.start_mark)
        if id(node) in self.active:
            raise self.error(node, loc, "a YAML alias refers to itself", "remove the recursive alias")
        self.budget.values -= 1
        if self.budget.values < 0:
            raise self.error(node, loc, f"the profile expands to more than {MAX_VALUES} values",
                             "YAML aliases (*name) repeat what they name: use fewer of them")
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, loc)
        if self.depth >= MAX_DEPTH:
            raise self.error(node, loc, f"the profile is nested more than {MAX_DEPTH} levels deep",
                             "a profile's maps and lists nest a few levels (aliases count where they are used)")
        self.active.add(id(node))
        self.depth += 1
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, loc)
            return [self.walk(item, loc + (index,)) for index, item in enumerate(node.value)]
        finally:
            self.depth -= 1
            self.active.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, loc: tuple) -> dict:
        first: dict[str, yaml.Node] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise CloudkvmError(f"{_mark(self.doc, key_node.start_mark)}: {field_path(loc) or 'profile'}: "
                                    "keys must be plain words", _SCHEMA_HINT)
            if key_node.value in first and key_node.tag != _MERGE_TAG:
                raise CloudkvmError(f"{_mark(self.doc, key_node.start_mark)}: "
                                    f"{field_path(loc + (key_node.value,))}: duplicate key (first at line "
                                    f"{first[key_node.value].start_mark.line + 1})", "keep one of them")
            first[key_node.value] = key_node
        out: dict[str, Any] = {}
        # YAML 1.1 merge keys (yaml.org/type/merge.html; <<: *map or <<: [*a, *b]): merged first, the earlier
        # map winning; the map's own keys win.
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                for source in reversed(self._merge_sources(value_node, loc)):
                    out.update(self.walk(source, loc))
        self.doc.vals[loc] = _mark(self.doc, node.start_mark)
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE_TAG:
                key = str(key_node.value)
                self.doc.keys[loc + (key,)] = _mark(self.doc, key_node.start_mark)
                out.pop(key, None)
                out[key] = self.walk(value_node, loc + (key,))
        return out

    def _merge_sources(self, node: yaml.Node, loc: tuple) -> list[yaml.MappingNode]:
        sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
        for source in sources:
            if not isinstance(source, yaml.MappingNode):
                raise self.error(source, loc, "a YAML merge (<<) takes a map or a list of maps",
                                 "write <<: *name where &name marks a map")
        return sources

    def _scalar(self, node: yaml.ScalarNode, loc: tuple) -> Any:
        number = node.tag in (_INT_TAG, _FLOAT_TAG)
        if number and len(node.value) > MAX_NUMBER_CHARS:
            raise self.error(node, loc, f"the number {node.value[:20]}... is too long ({len(node.value)} "
                                        "characters)", "profile numbers are small: write sizes with a unit, e.g. 4G")
        try:
            value = self.loader.construct_object(node, deep=True)
        except Exception as exc:  # noqa: BLE001  (2024-13-45 as a date, !!bool maybe, !!timestamp x: each differs)
            why = exc if isinstance(exc, (ValueError, OverflowError)) else f"not a {node.tag.rpartition(':')[2]}"
            raise self.error(node, loc, f"cannot read {_show(node.value)}: {why}",
                             "quote the value to make it text") from None
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_NUMBER_BITS:
            raise self.error(node, loc, f"the number {_show(node.value)} is too large (more than "
                                        f"{MAX_NUMBER_BITS} bits)", "profile numbers are small: write sizes with "
                                                                    "a unit, e.g. 4G")
        if isinstance(value, str) and "\0" in value:
            raise self.error(node, loc, "a NUL character (\\0) in the value", "remove the \\0 escape")
        return value


# ---------------------------------------------------------------------------------------------------- ${VAR}

_VAR_BODY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)


def expand_vars(text: str, env: Mapping[str, str]) -> str:
    """`${VAR}` and `${VAR:-default}` (default when VAR is unset or empty); `$${` is a literal `${` (and what
    follows it is read on as text). Raises `KeyError(name)` for an unset variable without a default, `ValueError`
    for a malformed reference. One left-to-right pass with str.find (a regex for `${...}` backtracks quadratically
    over many unclosed `${`); `profile_to_dict` writes every literal `${` back as `$${`, so it loads back the same."""
    pieces, pos = [], 0
    while (dollar := text.find("$", pos)) >= 0:
        pieces.append(text[pos:dollar])
        if text.startswith("$${", dollar):
            pieces.append("${")
            pos = dollar + 3
        elif text.startswith("${", dollar):
            end = text.find("}", dollar + 2)
            if end < 0:
                raise ValueError("an unclosed '${' in the value")
            pieces.append(_variable(text[dollar + 2:end], env))
            pos = end + 1
        else:
            pieces.append("$")
            pos = dollar + 1
    pieces.append(text[pos:])
    return "".join(pieces)


def _variable(inner: str, env: Mapping[str, str]) -> str:
    """The value of the reference `${inner}`."""
    body = _VAR_BODY.fullmatch(inner)
    if not body:
        raise ValueError(f"'${{{inner}}}' is not a variable reference")
    name, default = body.groups()
    value = env.get(name)
    if value:
        return value
    if default is not None:
        return default
    if value is not None:
        return value
    raise KeyError(name)


def _expand(doc: _Doc, value: Any, loc: tuple, env: Mapping[str, str]) -> Any:
    if isinstance(value, dict):
        return {key: _expand(doc, item, loc + (key,), env) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand(doc, item, loc + (index,), env) for index, item in enumerate(value)]
    if isinstance(value, str) and "$" in value:
        try:
            return expand_vars(value, env)
        except KeyError as exc:
            name = exc.args[0]
            raise doc.error(loc, f"environment variable {name} is not set",
                            f"set {name}, or write ${{{name}:-default}}") from None
        except ValueError as exc:
            raise doc.error(loc, str(exc), "write ${NAME} or ${NAME:-default}; $${ is a literal ${") from None
    return value


# ---------------------------------------------------------------------------------------------------- paths, base

def _abspath(text: str, folder: Path) -> str:
    path = Path(os.path.expanduser(text))
    return os.path.normpath(path if path.is_absolute() else folder / path)


def _resolve_paths(data: dict, folder: Path) -> None:
    """Make this file's own relative paths absolute against its folder (before merging with other files)."""
    for spec in _PATH_FIELDS:
        for parent, key in _find(data, spec):
            if isinstance(parent.get(key), str) and parent[key].strip():
                parent[key] = _abspath(parent[key], folder)
    for spec in _LOCATION_FIELDS:
        for parent, key in _find(data, spec):
            text = parent.get(key)
            if isinstance(text, str) and text.strip() and "://" not in text and not is_digest(text):
                parent[key] = _abspath(text.strip(), folder)


def _find(data: Any, spec: tuple) -> list[tuple[dict, str]]:
    """(parent map, key) pairs matching a path spec, `int` standing for every list index."""
    nodes = [data]
    for part in spec[:-1]:
        nxt = []
        for node in nodes:
            if part is int and isinstance(node, list):
                nxt.extend(node)
            elif isinstance(node, dict) and part in node:
                nxt.append(node[part])
        nodes = nxt
    return [(node, spec[-1]) for node in nodes if isinstance(node, dict) and spec[-1] in node]


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _base_entries(doc: _Doc) -> list[tuple[tuple, Any]]:
    if "base" not in doc.data:
        return []
    base = doc.data.pop("base")
    if isinstance(base, str):
        return [(("base",), base)]
    if isinstance(base, list) and base:
        return [(("base", index), item) for index, item in enumerate(base)]
    raise doc.error(("base",), f"expected a path or a list of paths, not {_show(base)}",
                    "write base: ../other.yaml or base: [a.yaml, b.yaml]")


@dataclass(frozen=True)
class _Origin:
    display: str  # how errors name the file
    real: str  # for cycle detection
    folder: Path  # relative paths in it are resolved against this


def _load_doc(origin: _Origin, env: Mapping[str, str], chain: tuple[_Origin, ...], budget: _Budget, *,
              raw: bytes | None = None, data: dict | None = None) -> _Doc:
    """One profile (the file's bytes `raw`, or `data` from a dict) with its bases merged under it."""
    doc = _parse_yaml(raw, origin.display, budget) if data is None else _Doc(copy.deepcopy(data), origin.display)
    if not isinstance(doc.data, dict):
        raise CloudkvmError(f"{origin.display}: a profile must be a map of fields, not {_show(doc.data)}", _SCHEMA_HINT)
    doc.data = _expand(doc, doc.data, (), env)
    _resolve_paths(doc.data, origin.folder)
    merged: _Doc | None = None
    for loc, entry in _base_entries(doc):
        if not isinstance(entry, str) or not entry.strip():
            raise doc.error(loc, f"expected a path, not {_show(entry)}", "write base: ../other.yaml")
        if _URL.match(entry):
            raise doc.error(loc, f"base URLs are not supported yet: {entry}",
                            "download the profile and refer to it by a path")
        target = Path(_abspath(entry, origin.folder))
        shown = entry if os.path.isabs(os.path.expanduser(entry)) else \
            os.path.normpath(os.path.join(os.path.dirname(origin.display), entry))
        base_origin = _Origin(shown, os.path.realpath(target), target.parent)
        trail = chain + (origin,)
        if any(base_origin.real == seen.real for seen in trail):
            top = os.path.dirname(trail[0].display)  # name the files relative to the profile being loaded
            names = " -> ".join(os.path.relpath(o.display, top or ".") for o in trail + (base_origin,))
            raise doc.error(loc, f"base cycle: {names}", "remove the base: entry that closes the cycle")
        budget.files -= 1
        if budget.files < 0:
            raise doc.error(loc, f"the profile and its bases name more than {MAX_PROFILE_FILES} files",
                            "name each base profile once: a file named twice is read twice")
        try:
            base_raw = read_profile_bytes(target)
        except UnreadableProfile as exc:
            raise doc.error(loc, f"cannot read the base profile '{shown}': {exc.reason}",
                            "base paths are relative to the folder of the profile that names them") from None
        base_doc = _load_doc(base_origin, env, trail, budget, raw=base_raw)
        merged = base_doc if merged is None else _merge_docs(merged, base_doc)
    return doc if merged is None else _merge_docs(merged, doc)


def _merge_docs(base: _Doc, child: _Doc) -> _Doc:
    out = _Doc(None, child.source)
    out.data = _merge(base, (), child, (), (), out)
    return out


def _merge(base: _Doc, bloc: tuple, child: _Doc, cloc: tuple, oloc: tuple, out: _Doc) -> Any:
    bval, cval = _get(base.data, bloc), _get(child.data, cloc)
    if isinstance(bval, dict) and isinstance(cval, dict):
        _take_positions(child, cloc, out, oloc, shallow=True)
        result = {}
        for key in bval:
            result[key] = _merge(base, bloc + (key,), child, cloc + (key,), oloc + (key,), out) if key in cval \
                else _copy(base, bloc + (key,), out, oloc + (key,))
        for key in cval:
            if key not in bval:
                result[key] = _copy(child, cloc + (key,), out, oloc + (key,))
        return result
    if isinstance(bval, list) and isinstance(cval, list):
        _take_positions(child, cloc, out, oloc, shallow=True)
        return [_copy(base, bloc + (i,), out, oloc + (i,)) for i in range(len(bval))] + \
               [_copy(child, cloc + (j,), out, oloc + (len(bval) + j,)) for j in range(len(cval))]
    return _copy(child, cloc, out, oloc)


def _get(data: Any, loc: tuple) -> Any:
    for part in loc:
        data = data[part]
    return data


def _copy(src: _Doc, sloc: tuple, out: _Doc, oloc: tuple) -> Any:
    _take_positions(src, sloc, out, oloc, shallow=False)
    return copy.deepcopy(_get(src.data, sloc))


def _take_positions(src: _Doc, sloc: tuple, out: _Doc, oloc: tuple, shallow: bool) -> None:
    n = len(sloc)
    for loc in [sloc] if shallow else src.subtree(sloc):
        for table, target in ((src.vals, out.vals), (src.keys, out.keys)):
            if loc in table:
                target[oloc + loc[n:]] = table[loc]


# ---------------------------------------------------------------------------------------------------- validation

def _field_at(loc: tuple) -> tuple[Any, type[BaseModel] | None]:
    """(FieldInfo of the last name in `loc` or None, the model class that holds `loc`'s last part)."""
    model: type[BaseModel] | None = Profile
    info, holder = None, None
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None, model
        holder, info = model, model.model_fields[part]
        model = _model_in(info.annotation)
    return info, holder


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation) if get_origin(annotation) is not None else ():
        found = _model_in(arg)
        if found:
            return found
    return None


def _validation_error(exc: ValidationError, doc: _Doc) -> CloudkvmError:
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")  # a typo explains a "missing"
    err = errors[0]
    loc = tuple(err["loc"])
    message, hint = err["msg"], ""
    if err["type"] in ("value_error", "assertion_error"):
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):
            loc, hint = loc + cause.loc, cause.hint
        message = str(cause) if cause is not None else message.removeprefix("Value error, ")
    elif err["type"] == "extra_forbidden":
        key = str(loc[-1])
        _, holder = _field_at(loc)
        names = list(holder.model_fields) if holder is not None else []
        if holder is Profile:
            names.append("base")
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
        message = f"unknown key '{key}'"
        hint = f"did you mean '{close[0]}'?" if close else "known keys: " + ", ".join(names)
        return doc.error(loc, message, hint, key=True)
    elif err["type"] == "missing":
        message = "required field is missing"
    elif not isinstance(err.get("input"), (dict, list)):
        message += f" (got {_show(err.get('input'))})"
    if not hint:
        info, _ = _field_at(loc)
        hint = f"{field_path(loc)}: {info.description}" if info is not None and info.description else _SCHEMA_HINT
    return doc.error(loc, message, hint)


def _check_files(profile: Profile, doc: _Doc) -> None:
    targets: list[tuple[tuple, Path, bool]] = []
    for key in ("kernel", "initrd"):
        if getattr(profile.boot, key) is not None:
            targets.append((("boot", key), getattr(profile.boot, key), False))
    if profile.cloud_init is not None and profile.cloud_init.user_data_file is not None:
        targets.append((("cloud_init", "user_data_file"), profile.cloud_init.user_data_file, False))
    for index, disk in enumerate(profile.disks):
        targets.append((("disks", index, "file"), disk.file, not (disk.read_only or disk.overlay)))
    for loc, path, writable in targets:
        hint = "relative paths are resolved against the folder of the profile that names them"
        try:
            exists, regular = path.exists(), path.is_file()
        except OSError as exc:  # not merely missing: a name too long for the file system, an unreadable folder...
            raise doc.error(loc, f"cannot check {path}: {_os_reason(exc)}", hint) from None
        if not exists:
            raise doc.error(loc, f"no such file: {path}", hint)
        if not regular:
            raise doc.error(loc, f"not a file: {path}", hint)
        if not os.access(path, os.R_OK):
            raise doc.error(loc, f"cannot read {path} (permission denied)", "check the file's permissions")
        if writable and not os.access(path, os.W_OK):
            raise doc.error(loc, f"cannot write {path} (permission denied)",
                            "set overlay: true (or read_only: true), or make the file writable")


def _finish(doc: _Doc, base_dir: Path, check_files: bool) -> Profile:
    try:
        profile = Profile.model_validate(doc.data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise _validation_error(exc, doc) from None
    profile._source = doc.source
    profile._positions = dict(doc.vals)
    if check_files:
        _check_files(profile, doc)
    return profile


# ---------------------------------------------------------------------------------------------------- public API

def load_profile(path: str | os.PathLike, env: Mapping[str, str] = os.environ, check_files: bool = True) -> Profile:
    """Load and validate a profile file (with its `base:` profiles); `check_files` also requires the kernel,
    initrd and disk files to exist. Raises one-line `CloudkvmError("<file>:<line>:<col>: <field>: ...", hint)`."""
    display = os.fspath(path)
    target = Path(os.path.expanduser(display))
    with _one_line_errors():
        try:
            raw = read_profile_bytes(target)
        except UnreadableProfile as exc:
            raise UnreadableProfile(display, exc.reason) from None
        origin = _Origin(display, os.path.realpath(target), target.absolute().parent)
        doc = _load_doc(origin, env, (), _Budget(), raw=raw)
        return _finish(doc, origin.folder, check_files)


def validate_profile(data: Mapping[str, Any], base_dir: str | os.PathLike = ".", *, source: str = "<profile>",
                     env: Mapping[str, str] = os.environ, check_files: bool = True) -> Profile:
    """Validate a profile given as a dict (e.g. from `import_qemu`) as if it were a file in `base_dir`:
    `${VAR}` expansion, `base:` (relative to `base_dir`) and relative paths work the same way."""
    folder = Path(os.path.abspath(os.path.expanduser(os.fspath(base_dir))))
    origin = _Origin(source, os.path.join(folder, source), folder)
    with _one_line_errors():
        doc = _load_doc(origin, env, (), _Budget(), data=dict(data))
        return _finish(doc, folder, check_files)


@contextlib.contextmanager
def _one_line_errors():
    """A profile error is one printable line: line breaks, tabs and terminal escapes that the profile's own text put
    into the message (a name, a key, a value) are written as escapes (`\\n`, `\\x1b`)."""
    try:
        yield
    except CloudkvmError as exc:
        exc.message, exc.hint = printable(exc.message), printable(exc.hint)
        exc.args = (exc.message,)
        raise


def profile_to_dict(profile: Profile) -> dict:
    """A plain dict of a validated profile that loads back to the same profile (sizes as text, paths as strings,
    unset optional fields left out), in the canonical field order."""
    data = profile.model_dump(mode="json", exclude_none=True)
    data["memory"] = size_text(profile.memory)
    for disk, model in zip(data["disks"], profile.disks):
        if model.size is not None:
            disk["size"] = size_text(model.size)
    data["network"]["forwards"] = [fwd.spec() for fwd in profile.network.forwards]
    if not data["cpu"]["hide"]:
        data["cpu"] = data["cpu"]["model"]
    return _escape_vars(data)


def _escape_vars(value: Any) -> Any:
    """Strings as a profile writes them: a literal `${` is `$${` (else loading would expand it as a variable)."""
    if isinstance(value, dict):
        return {key: _escape_vars(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_escape_vars(item) for item in value]
    return value.replace("${", "$${") if isinstance(value, str) else value


def profile_schema() -> dict:
    """The JSON Schema of a profile file, for editors (`# yaml-language-server: $schema=./schema.json`)."""
    schema = Profile.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "cloudkvm profile"
    # A profile with base: may leave required fields to its bases; only a profile without one must have them all.
    required = schema.pop("required")
    # boot names a kernel, or boots the image's own (checked by Boot._consistent)
    boot_choice = {"anyOf": [{"required": ["kernel"]}, {"required": ["from_image"]}]}
    schema["if"] = {"not": {"required": ["base"]}}
    schema["then"] = {"required": required, "properties": {"boot": boot_choice}}
    schema["properties"]["base"] = {
        "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}],
        "description": "profiles to inherit from (paths relative to this file): maps merge key by key, lists "
                       "concatenate (base first), this file wins on single values",
    }
    return schema


def profile_schema_text() -> str:
    """`profile_schema()` as the text of profiles/schema.json (pretty, sorted keys)."""
    return json.dumps(profile_schema(), indent=2, sort_keys=True) + "\n"


def write_profile_schema(path: str | os.PathLike = SCHEMA_PATH) -> Path:
    """Write profiles/schema.json (or `path`)."""
    target = Path(path)
    target.write_text(profile_schema_text())
    return target
