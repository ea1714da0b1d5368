"""A flattened device tree (DTB) writer: Devicetree Specification v0.4, §5 (header v17, memory reservation block,
structure block, strings block) over the tree model of §2.2 (node and property names, phandles)."""

from __future__ import annotations

import re
import struct

# §5.2 header; §5.4.1 structure block tokens
FDT_MAGIC = 0xD00DFEED
FDT_VERSION = 17
FDT_LAST_COMP_VERSION = 16
FDT_BEGIN_NODE, FDT_END_NODE, FDT_PROP, FDT_NOP, FDT_END = 1, 2, 3, 4, 9
HEADER_SIZE = 40  # ten big-endian u32 fields (§5.2)

# §2.2.1 node names: 1-31 characters from this set, then an optional @unit-address; §2.2.4 property names
_NODE_NAME = re.compile(r"[0-9A-Za-z,._+-]{1,31}(@[0-9A-Za-z,._+-]+)?")
_PROP_NAME = re.compile(r"[0-9A-Za-z,._+?#-]{1,31}")
_U32_MAX, _U64_MAX = (1 << 32) - 1, (1 << 64) - 1


class Node:
    """One node: ordered properties (name -> encoded value) and ordered children. Made by DeviceTree/add_node."""

    def __init__(self, tree: DeviceTree, name: str, path: str):
        self.tree = tree
        self.name = name
        self.path = path
        self.properties: dict[str, bytes] = {}
        self.children: list[Node] = []

    def add_node(self, name: str) -> Node:
        """A new child node; the name must be valid (§2.2.1) and unique among its siblings."""
        if not _NODE_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a valid node name (§2.2.1: [0-9A-Za-z,._+-], at most 31, @unit)")
        if any(child.name == name for child in self.children):
            raise ValueError(f"{self.path} already has a child node {name}")
        child = Node(self.tree, name, f"{self.path.rstrip('/')}/{name}")
        self.children.append(child)
        return child

    def child(self, name: str) -> Node:
        """The existing child node called `name` (KeyError if there is none)."""
        for node in self.children:
            if node.name == name:
                return node
        raise KeyError(f"{self.path} has no child node {name}")

    # --- properties: setting a name again replaces its value -------------------------------------------------

    def set_bytes(self, name: str, value: bytes) -> Node:
        """A property holding raw bytes (§2.2.4 <prop-encoded-array> of any length)."""
        if not _PROP_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a valid property name (§2.2.4: [0-9A-Za-z,._+?#-], at most 31)")
        self.properties[name] = bytes(value)
        return self

    def set_empty(self, name: str) -> Node:
        """A property with no value (a boolean such as `interrupt-controller`)."""
        return self.set_bytes(name, b"")

    def set_u32(self, name: str, *cells: int) -> Node:
        """One or more 32-bit cells, big-endian (§2.2.4 <u32>)."""
        return self.set_bytes(name, b"".join(_u32(f"{self.path}:{name}", c) for c in cells))

    def set_u64(self, name: str, *values: int) -> Node:
        """One or more 64-bit values, each two big-endian cells (§2.2.4 <u64>), e.g. a 2/2-cell `reg`."""
        for v in values:
            if not 0 <= v <= _U64_MAX:
                raise ValueError(f"{self.path}:{name}: {v} does not fit in 64 bits")
        return self.set_bytes(name, b"".join(struct.pack(">Q", v) for v in values))

    def set_string(self, name: str, value: str) -> Node:
        """A NUL-terminated string (§2.2.4 <string>)."""
        return self.set_strings(name, value)

    def set_strings(self, name: str, *values: str) -> Node:
        """A string list: the strings, each NUL-terminated, concatenated (§2.2.4 <stringlist>)."""
        if not values:
            raise ValueError(f"{self.path}:{name}: a string list needs at least one string")
        encoded = []
        for v in values:
            if "\0" in v:
                raise ValueError(f"{self.path}:{name}: a string cannot contain NUL")
            encoded.append(v.encode() + b"\0")
        return self.set_bytes(name, b"".join(encoded))

    def set_phandle(self, label: str) -> Node:
        """Give this node the phandle the tree allocated (or now allocates) for `label` (§2.3.3)."""
        self.tree.define_phandle(label, self)
        return self.set_u32("phandle", self.tree.phandle(label))


def _u32(what: str, value: int) -> bytes:
    if not 0 <= value <= _U32_MAX:
        raise ValueError(f"{what}: {value} does not fit in a 32-bit cell")
    return struct.pack(">I", value)


class DeviceTree:
    """A tree under construction: `root`, phandles allocated by label, memory reservations; `to_bytes()` is the DTB."""

    def __init__(self, boot_cpuid_phys: int = 0):
        self.root = Node(self, "", "/")
        self.boot_cpuid_phys = boot_cpuid_phys
        self.reservations: list[tuple[int, int]] = []
        self._phandles: dict[str, int] = {}
        self._owners: dict[str, Node] = {}

    def phandle(self, label: str) -> int:
        """The phandle for `label`, allocated on first use (1, 2, ...); refer to a node by it before or after the
        node itself calls `set_phandle(label)`. Every label must be defined by exactly one node by `to_bytes()`."""
        if label not in self._phandles:
            self._phandles[label] = len(self._phandles) + 1  # 0 and 0xffffffff are not valid phandles (§2.3.3)
        return self._phandles[label]

    def define_phandle(self, label: str, node: Node) -> None:
        owner = self._owners.get(label)
        if owner is not None and owner is not node:
            raise ValueError(f"phandle {label!r} is already the phandle of {owner.path}, not also of {node.path}")
        self._owners[label] = node

    def reserve(self, address: int, size: int) -> None:
        """Add a memory reservation block entry (§5.3): memory the client program must not use."""
        if not (0 <= address <= _U64_MAX and 0 < size <= _U64_MAX):
            raise ValueError(f"memory reservation ({address:#x}, {size:#x}) is not a 64-bit address and size")
        self.reservations.append((address, size))

    def node(self, path: str) -> Node:
        """The node at an absolute path such as /cpus/cpu@0 (KeyError if absent)."""
        node = self.root
        for part in (p for p in path.split("/") if p):
            node = node.child(part)
        return node

    def to_bytes(self) -> bytes:
        """The DTB: header, memory reservation block (8-aligned), structure block and strings block (§5)."""
        undefined = sorted(set(self._phandles) - set(self._owners))
        if undefined:
            raise ValueError(f"phandle label(s) referenced but given to no node: {', '.join(undefined)}")
        strings = _Strings()
        structure = bytearray()
        self._emit(self.root, structure, strings)
        structure += struct.pack(">I", FDT_END)

        rsvmap = b"".join(struct.pack(">QQ", a, s) for a, s in self.reservations) + bytes(16)
        off_rsvmap = HEADER_SIZE  # already 8-byte aligned (§5.3)
        off_struct = off_rsvmap + len(rsvmap)  # a multiple of 8, so 4-byte aligned (§5.4)
        off_strings = off_struct + len(structure)
        total = off_strings + len(strings.data)
        if total > _U32_MAX:
            raise ValueError(f"the device tree would be {total} bytes: a DTB's size is a 32-bit field")
        header = struct.pack(">10I", FDT_MAGIC, total, off_struct, off_strings, off_rsvmap, FDT_VERSION,
                             FDT_LAST_COMP_VERSION, self.boot_cpuid_phys, len(strings.data), len(structure))
        return header + rsvmap + bytes(structure) + strings.data

    def _emit(self, node: Node, out: bytearray, strings: _Strings) -> None:
        out += struct.pack(">I", FDT_BEGIN_NODE) + _padded(node.name.encode() + b"\0")
        for name, value in node.properties.items():
            out += struct.pack(">III", FDT_PROP, len(value), strings.offset(name)) + _padded(value)
        for child in node.children:
            self._emit(child, out, strings)
        out += struct.pack(">I", FDT_END_NODE)


class _Strings:
    """The strings block (§5.5): each property name once, NUL-terminated; offsets for FDT_PROP."""

    def __init__(self) -> None:
        self.data = bytearray()
        self._offsets: dict[str, int] = {}

    def offset(self, name: str) -> int:
        if name not in self._offsets:
            self._offsets[name] = len(self.data)
            self.data += name.encode() + b"\0"
        return self._offsets[name]


def _padded(data: bytes) -> bytes:
    """`data` followed by zeros up to a 4-byte boundary (§5.4.1: tokens are 32-bit aligned)."""
    return data + bytes(-len(data) % 4)
