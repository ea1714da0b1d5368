"""A minimal AML encoder per ACPI 6.4 §20.2 (AML grammar) and §6.4 (resource data types)."""

from __future__ import annotations

import string
import struct
from typing import Union

# --- Opcodes and prefixes -------------------------------------------------------
ZERO_OP = 0x00  # §20.2.3 ZeroOp
ONE_OP = 0x01  # §20.2.3 OneOp
ONES_OP = 0xFF  # §20.2.3 OnesOp
NAME_OP = 0x08  # §20.2.5.1 NameOp
BYTE_PREFIX = 0x0A  # §20.2.3 BytePrefix
WORD_PREFIX = 0x0B  # §20.2.3 WordPrefix
DWORD_PREFIX = 0x0C  # §20.2.3 DWordPrefix
STRING_PREFIX = 0x0D  # §20.2.3 StringPrefix
QWORD_PREFIX = 0x0E  # §20.2.3 QWordPrefix
SCOPE_OP = 0x10  # §20.2.5.1 ScopeOp
BUFFER_OP = 0x11  # §20.2.5.4 BufferOp
PACKAGE_OP = 0x12  # §20.2.5.4 PackageOp
METHOD_OP = 0x14  # §20.2.5.2 MethodOp
DUAL_NAME_PREFIX = 0x2E  # §20.2.2 DualNamePrefix
MULTI_NAME_PREFIX = 0x2F  # §20.2.2 MultiNamePrefix
EXT_OP_PREFIX = 0x5B  # §20.2.3 ExtOpPrefix
DEVICE_OP = 0x82  # §20.2.5.2 DeviceOp (follows ExtOpPrefix)
ROOT_CHAR = 0x5C  # §20.2.2 RootChar '\'
PARENT_PREFIX_CHAR = 0x5E  # §20.2.2 ParentPrefixChar '^'
NULL_NAME = 0x00  # §20.2.2 NullName
RETURN_OP = 0xA4  # §20.2.5.3 ReturnOp
IF_OP = 0xA0  # §20.2.5.3 IfOp
NOTIFY_OP = 0x86  # §20.2.5.3 NotifyOp
LEQUAL_OP = 0x93  # §20.2.5.4 LEqualOp
ARG0_OP = 0x68  # §20.2.6.1 Arg0Op (Arg1..Arg6 follow)

PKG_LENGTH_MAX = (1 << 28) - 1  # §20.2.4 PkgLength: at most 28 bits in the 4-byte form
_LEAD_CHARS = string.ascii_uppercase + "_"  # §20.2.2 LeadNameChar
_NAME_CHARS = _LEAD_CHARS + string.digits  # §20.2.2 NameChar

Aml = Union[bytes, int, str]  # a pre-encoded term (bytes), an Integer, or a String


# --- PkgLength (§20.2.4) ---------------------------------------------------------
def pkg_length(total: int) -> bytes:
    """Encode `total` (which already counts the PkgLength bytes themselves) in the shortest form."""
    if total < 0 or total > PKG_LENGTH_MAX:
        raise ValueError(f"PkgLength {total} out of range")
    if total <= 0x3F:  # one byte: bits 5-0 hold the length
        return bytes([total])
    extra = 1 if total < 1 << 12 else 2 if total < 1 << 20 else 3
    out = [(extra << 6) | (total & 0x0F)]  # bits 7-6 = following byte count, 3-0 = low nibble
    rest = total >> 4
    for _ in range(extra):
        out.append(rest & 0xFF)
        rest >>= 8
    return bytes(out)


def with_pkg_length(body: bytes) -> bytes:
    """Prefix `body` with the PkgLength that counts itself plus `body`."""
    for n in (1, 2, 3, 4):
        enc = pkg_length(len(body) + n) if len(body) + n <= PKG_LENGTH_MAX else b""
        if len(enc) == n:
            return enc + body
    raise ValueError(f"AML package body of {len(body)} bytes is too long")


# --- Names (§20.2.2) -------------------------------------------------------------
def name_seg(seg: str) -> bytes:
    """A 4-character NameSeg; shorter names are padded with '_' as ASL does."""
    if not 1 <= len(seg) <= 4 or seg[0] not in _LEAD_CHARS or any(c not in _NAME_CHARS for c in seg):
        raise ValueError(f"invalid NameSeg {seg!r}")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """A NameString: optional '\\' or '^'... prefix then a NamePath of '.'-separated segments."""
    prefix = b""
    if path.startswith("\\"):
        prefix, path = bytes([ROOT_CHAR]), path[1:]
    else:
        while path.startswith("^"):
            prefix, path = prefix + bytes([PARENT_PREFIX_CHAR]), path[1:]
    segs = [name_seg(s) for s in path.split(".")] if path else []
    if not segs:
        return prefix + bytes([NULL_NAME])
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    if len(segs) > 255:
        raise ValueError("too many name segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


# --- Data objects (§20.2.3) ------------------------------------------------------
def integer(value: int) -> bytes:
    """An Integer in its smallest encoding: ZeroOp, OneOp, or Byte/Word/DWord/QWord constant."""
    if value < 0 or value >= 1 << 64:
        raise ValueError(f"AML integer {value} out of range")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value <= 0xFF:
        return bytes([BYTE_PREFIX, value])
    if value <= 0xFFFF:
        return bytes([WORD_PREFIX]) + struct.pack("<H", value)
    if value <= 0xFFFF_FFFF:
        return bytes([DWORD_PREFIX]) + struct.pack("<I", value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def string_(value: str) -> bytes:
    """A String: StringPrefix, ASCII characters 0x01-0x7F, NullChar."""
    raw = value.encode("ascii")
    if b"\x00" in raw:
        raise ValueError("AML strings cannot contain NUL")
    return bytes([STRING_PREFIX]) + raw + b"\x00"


def term(obj: Aml) -> bytes:
    """Encode a Python value as a data term: int -> Integer, str -> String, bytes pass through."""
    if isinstance(obj, bool):
        return integer(int(obj))
    if isinstance(obj, int):
        return integer(obj)
    if isinstance(obj, str):
        return string_(obj)
    return bytes(obj)


def buffer(data: bytes) -> bytes:
    """DefBuffer: BufferOp PkgLength BufferSize ByteList (§20.2.5.4)."""
    return bytes([BUFFER_OP]) + with_pkg_length(integer(len(data)) + bytes(data))


def package(*elements: Aml) -> bytes:
    """DefPackage: PackageOp PkgLength NumElements PackageElementList (§20.2.5.4)."""
    if len(elements) > 255:
        raise ValueError("Package has more than 255 elements (VarPackage not supported)")
    return bytes([PACKAGE_OP]) + with_pkg_length(bytes([len(elements)]) + b"".join(term(e) for e in elements))


def eisa_id(pnp: str) -> bytes:
    """EISAID("AAA####") as the compressed 32-bit integer (ASL EISAID, §19.6)."""
    if len(pnp) != 7 or any(c not in string.ascii_uppercase for c in pnp[:3]):
        raise ValueError(f"invalid EISA id {pnp!r}")
    product = int(pnp[3:], 16)
    a, b, c = (ord(ch) - 0x40 for ch in pnp[:3])  # 5-bit compressed letters, 'A' = 1
    raw = bytes([(a << 2) | (b >> 3), ((b & 0x7) << 5) | c, product >> 8, product & 0xFF])
    return integer(int.from_bytes(raw, "little"))


# --- Named objects and namespace modifiers (§20.2.5) ----------------------------
def name(path: str, value: Aml) -> bytes:
    """DefName: NameOp NameString DataRefObject."""
    return bytes([NAME_OP]) + name_string(path) + term(value)


def scope(path: str, *terms: bytes) -> bytes:
    """DefScope: ScopeOp PkgLength NameString TermList."""
    return bytes([SCOPE_OP]) + with_pkg_length(name_string(path) + b"".join(terms))


def device(path: str, *terms: bytes) -> bytes:
    """DefDevice: ExtOpPrefix DeviceOp PkgLength NameString TermList."""
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + with_pkg_length(name_string(path) + b"".join(terms))


def method(path: str, *terms: bytes, args: int = 0, serialized: bool = False, sync_level: int = 0) -> bytes:
    """DefMethod: MethodOp PkgLength NameString MethodFlags TermList."""
    if not 0 <= args <= 7 or not 0 <= sync_level <= 15:
        raise ValueError("method arg count must be 0..7 and sync level 0..15")
    flags = args | (0x08 if serialized else 0) | (sync_level << 4)  # bits 2-0 ArgCount, 3 Serialize, 7-4 SyncLevel
    return bytes([METHOD_OP]) + with_pkg_length(name_string(path) + bytes([flags]) + b"".join(terms))


def return_(value: Aml) -> bytes:
    """DefReturn: ReturnOp ArgObject."""
    return bytes([RETURN_OP]) + term(value)


def arg(n: int) -> bytes:
    """ArgObj: Arg0..Arg6."""
    if not 0 <= n <= 6:
        raise ValueError("AML methods have Arg0..Arg6")
    return bytes([ARG0_OP + n])


def lequal(left: Aml, right: Aml) -> bytes:
    """DefLEqual: LEqualOp Operand Operand."""
    return bytes([LEQUAL_OP]) + term(left) + term(right)


def if_(predicate: bytes, *terms: bytes) -> bytes:
    """DefIfElse without Else: IfOp PkgLength Predicate TermList."""
    return bytes([IF_OP]) + with_pkg_length(predicate + b"".join(terms))


def notify(path: str, value: int) -> bytes:
    """DefNotify: NotifyOp NotifyObject(SuperName) NotifyValue."""
    return bytes([NOTIFY_OP]) + name_string(path) + term(value)


# --- Resource descriptors (§6.4) ---------------------------------------------------
SMALL_IRQ = 0x04  # §6.4.2.1 IRQ descriptor item name
SMALL_IO = 0x08  # §6.4.2.5 I/O port descriptor item name
SMALL_END_TAG = 0x0F  # §6.4.2.9 End tag item name
LARGE_MEMORY32_FIXED = 0x86  # §6.4.3.4 32-bit fixed memory range descriptor (large, name 0x06)
LARGE_EXTENDED_IRQ = 0x89  # §6.4.3.6 Extended interrupt descriptor (large, name 0x09)


def _small(item: int, body: bytes) -> bytes:
    """Small resource: byte 0 = item name in bits 6-3, length in bits 2-0 (§6.4.2)."""
    assert len(body) <= 7
    return bytes([(item << 3) | len(body)]) + body


def _large(tag: int, body: bytes) -> bytes:
    """Large resource: tag byte, 16-bit length, body (§6.4.3)."""
    return bytes([tag]) + struct.pack("<H", len(body)) + body


def io(minimum: int, maximum: int, alignment: int, length: int, decode16: bool = True) -> bytes:
    """IO(Decode16|Decode10, min, max, align, len) (§6.4.2.5)."""
    return _small(SMALL_IO, struct.pack("<BHHBB", 1 if decode16 else 0, minimum, maximum, alignment, length))


def irq_no_flags(*irqs: int) -> bytes:
    """IRQNoFlags(){irqs}: 2-byte IRQ descriptor, edge-triggered active-high (§6.4.2.1)."""
    mask = 0
    for irq in irqs:
        if not 0 <= irq <= 15:
            raise ValueError(f"IRQ {irq} is not an ISA IRQ")
        mask |= 1 << irq
    return _small(SMALL_IRQ, struct.pack("<H", mask))


def memory32_fixed(base: int, length: int, read_write: bool = True) -> bytes:
    """Memory32Fixed(ReadWrite|ReadOnly, base, length) (§6.4.3.4)."""
    return _large(LARGE_MEMORY32_FIXED, struct.pack("<BII", 1 if read_write else 0, base, length))


def extended_interrupt(*gsis: int, consumer: bool = True, edge: bool = True, active_low: bool = False,
                       shared: bool = False, wake: bool = False) -> bytes:
    """Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive){gsis} without a resource source (§6.4.3.6)."""
    if not 1 <= len(gsis) <= 255:
        raise ValueError("an extended interrupt descriptor lists 1..255 interrupts")
    # flags: bit 0 consumer, 1 edge (vs level), 2 active-low, 3 shared, 4 wake capable
    flags = (consumer << 0) | (edge << 1) | (active_low << 2) | (shared << 3) | (wake << 4)
    return _large(LARGE_EXTENDED_IRQ, bytes([flags, len(gsis)]) + b"".join(struct.pack("<I", g) for g in gsis))


def end_tag() -> bytes:
    """End tag with checksum 0, meaning 'treat as correct' (§6.4.2.9)."""
    return _small(SMALL_END_TAG, b"\x00")


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate(){...}: a Buffer of the descriptors followed by an End tag (ASL ResourceTemplate, §19.6)."""
    return buffer(b"".join(descriptors) + end_tag())
