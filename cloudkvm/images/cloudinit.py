"""The NoCloud seed's text files from plain values: `meta-data`, `user-data` (cloud-config) and `network-config`;
reading the user's own `#cloud-config` user-data (bounded, errors as FILE:LINE:COL) to merge it with ours.

Merging (`user_data`, `merge_user_data`): cloudkvm's own user-data comes first, then each extra source in order.
Mappings merge key by key, recursively; lists append (the later source's items after the earlier ones: extra
`users:` come after cloudkvm's user, extra `packages:` after the profile's); for a scalar the later source wins. A
key that is a mapping in one source and a list or scalar in another cannot merge: that is an error naming both
sources. cloud-init's own merging of several user-data parts (`merge_how`) is not used: the seed holds one part."""
from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from ..errors import CloudkvmError, printable
from ..fsutil import read_bounded
from ..yamlevents import BoundedLoader, yaml_text

CLOUD_CONFIG_HEADER = "#cloud-config"
MAX_USER_DATA_BYTES = 1 << 20
MAX_DEPTH = 64  # nesting of maps and lists (composing recurses once per level)
MAX_NODES = 200_000  # keys and values as written
MAX_VALUES = 200_000  # values produced, each use of an alias counted again
MAX_NUMBER_CHARS = 100
OWN_SOURCE = "cloudkvm's cloud_init settings"
SUDO_ALL = "ALL=(ALL) NOPASSWD:ALL"
USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")  # useradd's portable names (Debian: adduser NAME_REGEX)
_MAP_TAG, _SEQ_TAG, _MERGE_TAG = (f"tag:yaml.org,2002:{name}" for name in ("map", "seq", "merge"))
_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_HINT_HEADER = ("only #cloud-config user-data can be merged with cloudkvm's (not scripts, #include, "
                "#cloud-boothook or MIME multi-part): make #cloud-config the first line")



# ------------------------------------------------------------------------------------------ writing the files

def _dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True, width=1 << 16)


def meta_data(instance_id: str, hostname: str) -> str:
    """The seed's `meta-data` (cloud-init docs, "NoCloud"): `instance-id` (a new one makes cloud-init run its
    per-instance modules again) and `local-hostname`."""
    return _dump({"instance-id": instance_id, "local-hostname": hostname})


def user_data(*, user: str, authorized_keys: list[str], hostname: str | None, packages: list[str],
              extra: list[tuple[str, dict]], ssh_genkeytypes: Sequence[str] | None = ("ed25519",)) -> str:
    """The seed's `user-data`: `#cloud-config` (cloud-init docs, "User data formats") with a passwordless-sudo
    `user` who logs in with `authorized_keys`, `hostname`, `packages`, `ssh_genkeytypes` (None: cloud-init's
    default, all four host key types), then each `(source, mapping)` of `extra` merged on top (module docstring)."""
    if not USER_NAME.fullmatch(user):
        raise CloudkvmError(f"cloud_init.user: {printable(user)!r} is not a user name",
                            "lower-case letters, digits, '_' and '-', starting with a letter or '_', "
                            "at most 32 characters")
    keys = [key.strip() for key in authorized_keys]  # a YAML block scalar (|) ends in a newline
    for key in keys:
        if not key.replace("\t", " ").isprintable():
            raise ValueError("an authorized key holds a control character: check it with sshkeys.check_public_key")
    ours: dict[str, Any] = {"users": [{
        "name": user,
        "sudo": SUDO_ALL,
        "shell": "/bin/bash",
        "lock_passwd": True,
        "ssh_authorized_keys": keys,
    }]}
    if hostname:
        ours["hostname"] = hostname
    if packages:
        ours["packages"] = list(packages)
    if ssh_genkeytypes is not None:
        ours["ssh_genkeytypes"] = list(ssh_genkeytypes)
    merged = merge_user_data([(OWN_SOURCE, ours), *extra])
    # the guest sees how many parts were merged, not the host paths they came from
    return f"{CLOUD_CONFIG_HEADER}\n# written by cloudkvm: its own settings and {len(extra)} more part(s)\n" \
           f"{_dump(merged)}"


def network_config(value: dict, where: str = "cloud_init.network_config") -> str:
    """The seed's `network-config` (cloud-init docs, "Network configuration", v1 or v2/netplan) as YAML. A
    `network:` wrapper is dropped: cloud-init 22.4's NoCloud reads the bare form only."""
    if set(value) == {"network"} and isinstance(value["network"], dict):
        value = value["network"]
    version = value.get("version")
    if type(version) is not int or version not in (1, 2):
        raise CloudkvmError(f"{where}: version must be 1 or 2 (got {printable(repr(version))[:40]})",
                            "write version: 2 and the netplan-style ethernets: (cloud-init docs, "
                            "\"Networking config Version 2\")")
    return _dump(value)


# ------------------------------------------------------------------------------------------ merging

def _kind(value: Any) -> str:
    return "a mapping" if isinstance(value, dict) else "a list" if isinstance(value, list) else "a value"


def merge_user_data(sources: Iterable[tuple[str, dict]]) -> dict:
    """Several cloud-config mappings merged in order, as the module docstring says: mappings recursively, lists
    appended, later scalars win; a mapping against a list or scalar is a one-line error naming both sources."""
    out: dict = {}
    origin: dict[tuple, str] = {}  # where each merged path got its current kind
    for source, data in sources:
        if not isinstance(data, dict):
            raise TypeError(f"{source}: user-data must be a mapping")
        _merge_into(out, data, source, (), origin)
    return out


def _merge_into(out: dict, data: dict, source: str, path: tuple, origin: dict[tuple, str]) -> None:
    for key, value in data.items():
        here = path + (key,)
        if key not in out:
            out[key] = _copy(value)
            origin[here] = source
            continue
        old = out[key]
        if isinstance(old, dict) and isinstance(value, dict):
            _merge_into(old, value, source, here, origin)
        elif isinstance(old, list) and isinstance(value, list):
            old.extend(_copy(value))
        elif _kind(old) == _kind(value) == "a value":
            out[key] = value
            origin[here] = source
        else:
            shown = ".".join(printable(str(part)) for part in here)
            raise CloudkvmError(f"{printable(source)}: user-data {shown}: {_kind(value)} here cannot merge with "
                                f"{_kind(old)} from {printable(origin.get(here, OWN_SOURCE))}",
                                "use the same kind in both (lists append, mappings merge, later values win)")


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value


# ------------------------------------------------------------------------------------------ reading user-data

def parse_user_data(text: str, display: str) -> dict:
    """The user's `#cloud-config` user-data (cloud-init docs, "User data formats: Cloud config data") as a mapping;
    a one-line `display:LINE:COL: ...` error for another header, bad YAML or a document that is not a mapping.
    At most 1 MiB, 64 levels, 200,000 values (aliases counted where used)."""
    if len(text) > MAX_USER_DATA_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_USER_DATA_BYTES:
        raise CloudkvmError(f"{display}: user-data is larger than {MAX_USER_DATA_BYTES >> 20} MiB",
                            "user-data is a small configuration file: fetch large content at boot instead")
    text = text.removeprefix("\ufeff")
    first = text.split("\n", 1)[0].rstrip()
    if first != CLOUD_CONFIG_HEADER:
        found = f"found {printable(first[:40])!r}" if first else "the first line is empty"
        raise CloudkvmError(f"{display}:1:1: user-data must start with the line {CLOUD_CONFIG_HEADER} ({found})",
                            _HINT_HEADER)
    text = yaml_text(text, display, "user-data file")
    loader = _Loader(text, display)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}
        if not isinstance(node, yaml.MappingNode):
            raise _error(display, node, "user-data must be a mapping of cloud-config keys (packages:, runcmd: ...)",
                         "write key: value lines below the #cloud-config line")
        return _Builder(loader, display).build(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "cannot read this"
        if exc.context and exc.problem and exc.context_mark is not None:
            problem = f"{problem} ({exc.context} at line {exc.context_mark.line + 1})"
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        lines = text.split("\n")
        tabs = "\t" in (lines[line - 1] if line <= len(lines) else "") or "\\t" in problem
        hint = "YAML indentation must use spaces, not tabs" if tabs else "check the indentation and quoting here"
        where = f"{display}:{line}:{col}"
        raise CloudkvmError(f"{where}: YAML syntax error: {problem}", hint) from None
    except yaml.YAMLError as exc:
        raise CloudkvmError(f"{display}:1:1: YAML syntax error: {printable(str(exc))[:200]}",
                            "check the user-data is YAML") from None
    finally:
        loader.dispose()


def read_user_data(path: str | Path, display: str | None = None) -> dict:
    """`parse_user_data` of a file: a regular file (symlinks followed) of at most 1 MiB of UTF-8 text."""
    shown = display or printable(str(path))
    try:
        raw = read_bounded(path, MAX_USER_DATA_BYTES, follow_symlinks=True)
    except OSError as exc:
        reason = f"larger than {MAX_USER_DATA_BYTES >> 20} MiB" if exc.errno == errno.EFBIG else (exc.strerror or str(exc))
        raise CloudkvmError(f"{shown}: cannot read the user-data: {reason}", "check the user_data file path") from None
    return parse_user_data(yaml_text(raw, shown, "user-data file"), shown)


def _error(display: str, node: yaml.Node, message: str, hint: str) -> CloudkvmError:
    mark = node.start_mark
    return CloudkvmError(f"{display}:{mark.line + 1}:{mark.column + 1}: {message}", hint)


class _Loader(BoundedLoader):
    """The user-data loader: BoundedLoader with the user-data's limits."""

    def __init__(self, text: str, display: str):
        super().__init__(text, display, "user-data", MAX_DEPTH, MAX_NODES)


class _Builder:
    """Composed nodes -> plain Python values. Every value produced (each use of an alias again) is counted, so an
    alias bomb is an error, not exponential work; an alias inside what it names is refused; merge keys (`<<`,
    yaml.org/type/merge.html) are applied here, bounded the same way; duplicate keys are refused."""

    def __init__(self, loader: _Loader, display: str):
        self.loader, self.display = loader, display
        self.values = MAX_VALUES
        self.depth = 0
        self.active: set[int] = set()

    def build(self, node: yaml.Node) -> Any:
        if id(node) in self.active:
            raise _error(self.display, node, "a YAML alias refers to the value it is part of", "remove the alias")
        self.values -= 1
        if self.values < 0:
            raise _error(self.display, node, f"user-data expands to more than {MAX_VALUES} values",
                         "YAML aliases (*name) repeat what they name: use fewer of them")
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node)
        if self.depth >= MAX_DEPTH:
            raise _error(self.display, node, f"user-data is nested more than {MAX_DEPTH} levels deep",
                         "aliases count where they are used")
        if node.tag not in (_MAP_TAG, _SEQ_TAG):
            raise _error(self.display, node, f"the YAML tag {printable(node.tag)} is not supported here",
                         "remove the tag: cloud-config uses plain maps and lists")
        self.active.add(id(node))
        self.depth += 1
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node)
            return [self.build(item) for item in node.value]
        finally:
            self.depth -= 1
            self.active.discard(id(node))

    def _mapping(self, node: yaml.MappingNode) -> dict:
        out: dict = {}
        for key_node, value_node in node.value:  # merged maps first: the map's own keys win (merge.html)
            if key_node.tag == _MERGE_TAG:
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for source in reversed(sources):
                    if not isinstance(source, yaml.MappingNode):
                        raise _error(self.display, source, "a YAML merge (<<) takes a map or a list of maps",
                                     "write <<: *name where &name marks a map")
                    out.update(self.build(source))
        first: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise _error(self.display, key_node, "keys must be plain words, not maps or lists",
                             "write key: value")
            key = self._scalar(key_node)
            if key in first:
                raise _error(self.display, key_node, f"duplicate key {printable(str(key))!r} (first at line "
                             f"{first[key].start_mark.line + 1})", "keep one of them: YAML keeps only the last")
            first[key] = key_node
            out.pop(key, None)
            out[key] = self.build(value_node)
        return out

    def _scalar(self, node: yaml.ScalarNode) -> Any:
        if node.tag in (_INT_TAG, _FLOAT_TAG) and len(node.value) > MAX_NUMBER_CHARS:
            raise _error(self.display, node, f"the number {node.value[:20]}... is too long", "quote it to make it text")
        try:
            return self.loader.construct_object(node, deep=True)
        except Exception as exc:  # noqa: BLE001  (a bad date, an unknown !tag, a !!binary that is not base64 ...)
            why = getattr(exc, "problem", None) or str(exc)
            raise _error(self.display, node, f"cannot read {printable(node.value[:40])!r}: {printable(why)[:120]}",
                         "quote the value to make it text") from None
