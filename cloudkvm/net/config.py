"""The user network's own configuration, as plain data: what `SlirpBackend` needs (the guest network, host
forwards, restricted mode), and the rules a forward must follow. No profile and no pydantic here: the launcher
builds a `UserNetConfig` from a profile's `network:` (which checks these same rules, with file:line:col), and the
backend's plain-argument form builds one from strings such as `tcp:127.0.0.1:2222-:22`."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Iterable

from ..errors import CloudkvmError, FieldError

DEFAULT_NET = "10.0.2.0/24"  # QEMU/libslirp's default user network
DEFAULT_FORWARD_HOST_IP = "127.0.0.1"  # safer than QEMU's hostfwd default (all interfaces)
PROTOCOLS = ("tcp", "udp")
MIN_PORT, MAX_PORT = 1, 65535
SMALLEST_PREFIX = 28  # /28: the smallest network with room for the host, DNS, DHCP and a guest
FORWARD_HINT = "write PROTO:[HOSTIP]:HOSTPORT-[GUESTIP]:GUESTPORT, e.g. tcp:127.0.0.1:2222-:22"
_FORWARD = re.compile(r"^(?P<proto>[A-Za-z]*):(?P<host_ip>[^:]*):(?P<host_port>[^-]*)-"
                      r"(?P<guest_ip>[^:]*):(?P<guest_port>.*)$")


@dataclass(frozen=True)
class HostForward:
    """A host port forwarded into the guest."""

    proto: str  # tcp or udp
    host_port: int
    guest_port: int
    host_ip: str = DEFAULT_FORWARD_HOST_IP
    guest_ip: str | None = None  # None: the guest's DHCP address

    def spec(self) -> str:
        """The `tcp:127.0.0.1:2222-:22` form (also QEMU's hostfwd value)."""
        return f"{self.proto}:{self.host_ip}:{self.host_port}-{self.guest_ip or ''}:{self.guest_port}"


# The user network's default MTU: the largest libslirp takes (its IF_MTU_MAX is 65521), as slirp4netns and passt
# default to. The guest's TCP segments and the frames libslirp sends it are then up to 64 KiB, so a stream through a
# forward costs one frame where 1500 bytes would cost 44. libslirp's own sockets carry the traffic outside, so the
# guest's MTU never reaches a real link. A guest that does not read VIRTIO_NET_F_MTU (Linux before 4.10, some other
# systems) keeps 1500: TCP still works (the MSS is negotiated), but a UDP datagram over 1500 bytes from outside
# reaches it unfragmented; such a guest wants `network.mtu: 1500`.
USER_NET_MTU = 65520
MIN_USER_NET_MTU = 1280   # IPv6's minimum link MTU (RFC 8200 §5); the user network has IPv6 on


@dataclass(frozen=True)
class UserNetConfig:
    """What a user-network backend is given: the guest network, the host forwards, whether the guest is kept
    from connecting out (restricted), the link's MTU."""

    net: str = DEFAULT_NET
    forwards: tuple[HostForward, ...] = ()
    restrict: bool = False
    mtu: int = USER_NET_MTU


# ---------------------------------------------------------------------------------------------------- the rules

def parse_forward(text: str) -> dict:
    """`tcp|udp:[HOSTIP]:HOSTPORT-[GUESTIP]:GUESTPORT` (QEMU's hostfwd form) as a dict of the parts given."""
    match = _FORWARD.match(text.strip())
    if not match:
        raise FieldError(f"cannot read the forward '{text}'", hint=FORWARD_HINT)
    parts = match.groupdict()
    if not parts["proto"]:
        raise FieldError(f"the forward '{text}' names no protocol", hint=FORWARD_HINT)
    out: dict[str, Any] = {"proto": parts["proto"].lower()}
    for key in ("host_ip", "guest_ip"):
        if parts[key]:
            out[key] = parts[key]
    for key in ("host_port", "guest_port"):
        port = parts[key].strip()
        if not port.isdigit():
            raise FieldError(f"the forward '{text}' has no valid {key.replace('_', ' ')} ('{port}')",
                                 hint=FORWARD_HINT)
        out[key] = int(port)
    return out


def ipv4_address(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValueError(f"'{value}' is not an IPv4 address") from None


def ipv4_network(value: str) -> str:
    """A guest network such as 10.0.2.0/24, with room for the host, DNS, DHCP and a guest."""
    try:
        net = ipaddress.IPv4Network(value, strict=True)
    except ValueError as exc:
        raise ValueError(f"'{value}' is not an IPv4 network: {exc}") from None
    if net.prefixlen > SMALLEST_PREFIX:
        raise ValueError(f"'{value}' is too small for user networking (at most /{SMALLEST_PREFIX})")
    return str(net)


def check_forwards(net: str, forwards: Iterable) -> None:
    """Forwards (anything with proto, host_ip, host_port, guest_ip) that can all work in `net`: every guest
    address inside it, no host port forwarded twice."""
    network = ipaddress.IPv4Network(net)
    seen: list[tuple[int, Any]] = []
    for index, fwd in enumerate(forwards):
        if fwd.guest_ip is not None and ipaddress.IPv4Address(fwd.guest_ip) not in network:
            raise FieldError(f"guest address {fwd.guest_ip} is outside the guest network {net}",
                                 ("forwards", index, "guest_ip"), "omit guest_ip to use the guest's DHCP address")
        for other_index, other in seen:
            overlap = "0.0.0.0" in (fwd.host_ip, other.host_ip) or fwd.host_ip == other.host_ip
            if fwd.proto == other.proto and fwd.host_port == other.host_port and overlap:
                raise FieldError(f"host port {fwd.proto}:{fwd.host_ip}:{fwd.host_port} is already forwarded "
                                     f"by forwards[{other_index}]", ("forwards", index),
                                     "use a different host port for each forward")
        seen.append((index, fwd))


# ---------------------------------------------------------------------------------------------------- building one

def _forward(value: Any) -> HostForward:
    """A HostForward from a `tcp:...` string, a dict of its fields, or any object with them (a profile Forward)."""
    if isinstance(value, HostForward):
        return value
    if isinstance(value, str):
        value = parse_forward(value)
    fields = dict(value) if isinstance(value, dict) else {
        key: getattr(value, key) for key in ("proto", "host_ip", "host_port", "guest_ip", "guest_port")}
    unknown = set(fields) - {"proto", "host_ip", "host_port", "guest_ip", "guest_port"}
    if unknown:
        raise FieldError(f"unknown forward field '{sorted(unknown)[0]}'", (sorted(unknown)[0],))
    if fields.get("proto", "tcp") not in PROTOCOLS:
        raise FieldError(f"protocol '{fields['proto']}' is neither tcp nor udp", ("proto",))
    for key in ("host_port", "guest_port"):
        port = fields.get(key)
        if port is None:
            raise FieldError("Field required", (key,))
        if isinstance(port, bool) or not isinstance(port, int):
            raise FieldError(f"expected a port number, not {port!r}", (key,))
        if not MIN_PORT <= port <= MAX_PORT:  # as the profile's own check words it (pydantic's le/ge)
            bound = ("less than or equal to", MAX_PORT) if port > MAX_PORT else ("greater than or equal to", MIN_PORT)
            raise FieldError(f"Input should be {bound[0]} {bound[1]}", (key,))
    for key in ("host_ip", "guest_ip"):
        if fields.get(key) is not None:
            try:
                fields[key] = ipv4_address(fields[key])
            except ValueError as exc:
                raise FieldError(str(exc), (key,)) from None
    if fields.get("host_ip") is None:
        fields.pop("host_ip", None)
    return HostForward(proto=fields.get("proto", "tcp"), **{k: v for k, v in fields.items() if k != "proto"})


def check_mtu(mtu) -> None:
    """A FieldError at `mtu` unless it is an MTU the user network can have."""
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not MIN_USER_NET_MTU <= mtu <= USER_NET_MTU:
        raise FieldError(f"MTU {mtu!r} is outside {MIN_USER_NET_MTU}..{USER_NET_MTU}", ("mtu",),
                         f"leave it out for {USER_NET_MTU}, or write 1500 for the usual Ethernet MTU")


def user_net(net: str = DEFAULT_NET, forwards: Iterable = (), restrict: bool = False,
             mtu: int = USER_NET_MTU) -> UserNetConfig:
    """A checked UserNetConfig from plain values (forwards as strings, dicts or forward objects); a one-line
    CloudkvmError naming the setting (`network.forwards[1].host_port: ...`) otherwise."""
    where: tuple = ("net",)
    try:
        net = ipv4_network(net)
        built = []
        for index, value in enumerate(forwards):
            where = ("forwards", index)
            built.append(_forward(value))
        where = ()
        check_forwards(net, built)
        check_mtu(mtu)
    except ValueError as exc:
        loc = where + tuple(getattr(exc, "loc", ()))
        path = "network" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
        hint = getattr(exc, "hint", "") or ("write a network such as 10.0.2.0/24" if where == ("net",)
                                            else "forwards look like tcp:127.0.0.1:2222-:22")
        raise CloudkvmError(f"{path}: {exc}", hint) from None
    return UserNetConfig(net=net, forwards=tuple(built), restrict=bool(restrict), mtu=mtu)
