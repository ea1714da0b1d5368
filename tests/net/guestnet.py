"""A scripted guest on the Ethernet side of a NetBackend: just enough ARP, DHCP, DNS, UDP and TCP to drive libslirp
from tests (and bench/net). Hand-written with `struct` (no packet library needed).

Everything the backend delivers runs on the I/O thread (`_deliver`); test threads talk to the guest through
thread-safe queues, events and `io.run_sync`. Frames the guest sends go through `io` to `backend.send`."""
from __future__ import annotations

import ipaddress
import queue
import random
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field

GUEST_MAC = bytes.fromhex("525400123456")   # QEMU's first NIC MAC
BROADCAST_MAC = b"\xff" * 6
ETH_IP, ETH_ARP, ETH_IPV6 = 0x0800, 0x0806, 0x86DD
PROTO_TCP, PROTO_UDP = 6, 17
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
MSS = 1460
WINDOW = 65535


def ip4(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


def ip_text(raw: bytes) -> str:
    return str(ipaddress.IPv4Address(raw))


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def ipv4(src: bytes, dst: bytes, proto: int, payload: bytes, ident: int = 0) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, 64, proto, 0, src, dst)
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + payload


def _l4_checksum(src: bytes, dst: bytes, proto: int, segment: bytes) -> int:
    return checksum(src + dst + struct.pack("!BBH", 0, proto, len(segment)) + segment)


def udp(src: bytes, dst: bytes, sport: int, dport: int, data: bytes) -> bytes:
    segment = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    csum = _l4_checksum(src, dst, PROTO_UDP, segment) or 0xFFFF
    return segment[:6] + struct.pack("!H", csum) + segment[8:]


def tcp(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int, data: bytes = b"",
        window: int = WINDOW, options: bytes = b"") -> bytes:
    offset = (20 + len(options)) // 4
    segment = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, offset << 4, flags,
                          window, 0, 0) + options + data
    return segment[:16] + struct.pack("!H", _l4_checksum(src, dst, PROTO_TCP, segment)) + segment[18:]


def arp(op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes) -> bytes:
    return struct.pack("!HHBBH6s4s6s4s", 1, ETH_IP, 6, 4, op, sha, spa, tha, tpa)


@dataclass
class Packet:
    """A parsed frame (only the fields the tests look at)."""
    raw: bytes
    eth_dst: bytes
    eth_src: bytes
    ethertype: int
    # ARP
    op: int = 0
    sha: bytes = b""
    spa: bytes = b""
    tpa: bytes = b""
    # IPv4
    src: bytes = b""
    dst: bytes = b""
    proto: int = 0
    # UDP / TCP
    sport: int = 0
    dport: int = 0
    seq: int = 0
    ack: int = 0
    flags: int = 0
    window: int = 0
    options: bytes = b""
    data: bytes = b""


def parse(frame: bytes) -> Packet:
    pkt = Packet(frame, frame[0:6], frame[6:12], struct.unpack_from("!H", frame, 12)[0])
    if pkt.ethertype == ETH_ARP:
        (_, _, _, _, pkt.op, pkt.sha, pkt.spa, _, pkt.tpa) = struct.unpack_from("!HHBBH6s4s6s4s", frame, 14)
    elif pkt.ethertype == ETH_IP:
        ihl = (frame[14] & 0x0F) * 4
        total = struct.unpack_from("!H", frame, 16)[0]
        pkt.proto = frame[23]
        pkt.src, pkt.dst = frame[26:30], frame[30:34]
        l4 = 14 + ihl
        end = 14 + total
        if pkt.proto == PROTO_UDP:
            pkt.sport, pkt.dport = struct.unpack_from("!HH", frame, l4)
            pkt.data = frame[l4 + 8:end]
        elif pkt.proto == PROTO_TCP:
            pkt.sport, pkt.dport, pkt.seq, pkt.ack, off, pkt.flags, pkt.window = \
                struct.unpack_from("!HHIIBBH", frame, l4)
            doff = (off >> 4) * 4
            pkt.options = frame[l4 + 20:l4 + doff]
            pkt.data = frame[l4 + doff:end]
    return pkt


# ---------------------------------------------------------------------------------------------------- DHCP / DNS

DHCP_MAGIC = b"\x63\x82\x53\x63"


@dataclass
class Lease:
    ip: str
    router: str | None
    dns: str | None
    netmask: str
    server: str
    lease_time: int


def bootp_request(xid: int, mac: bytes, options: dict[int, bytes]) -> bytes:
    body = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, b"\0" * 4, b"\0" * 4,
                       b"\0" * 4, b"\0" * 4, mac, b"", b"")
    opts = b"".join(struct.pack("!BB", code, len(value)) + value for code, value in options.items()) + b"\xff"
    packet = body + DHCP_MAGIC + opts
    return packet + b"\0" * max(0, 300 - len(packet))


def parse_bootp(data: bytes) -> tuple[int, bytes, dict[int, bytes]]:
    """(xid, yiaddr, options)"""
    xid = struct.unpack_from("!I", data, 4)[0]
    yiaddr = data[16:20]
    options: dict[int, bytes] = {}
    pos = 240
    while pos < len(data) and data[pos] != 0xFF:
        if data[pos] == 0:
            pos += 1
            continue
        code, length = data[pos], data[pos + 1]
        options[code] = data[pos + 2:pos + 2 + length]
        pos += 2 + length
    return xid, yiaddr, options


def dns_query(ident: int, name: str, qtype: int = 1) -> bytes:
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".") if p) + b"\0"
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, 1)


def _skip_name(msg: bytes, pos: int) -> int:
    while True:
        length = msg[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            return pos + 2
        pos += 1 + length


@dataclass
class DnsAnswer:
    ident: int
    is_response: bool
    rcode: int
    addresses: list[str] = field(default_factory=list)   # A records


def parse_dns(msg: bytes) -> DnsAnswer:
    ident, flags, qd, an = struct.unpack_from("!HHHH", msg, 0)
    answer = DnsAnswer(ident, bool(flags & 0x8000), flags & 0x0F)
    pos = 12
    for _ in range(qd):
        pos = _skip_name(msg, pos) + 4
    for _ in range(an):
        pos = _skip_name(msg, pos)
        rtype, _, _, rdlen = struct.unpack_from("!HHIH", msg, pos)
        pos += 10
        if rtype == 1 and rdlen == 4:
            answer.addresses.append(ip_text(msg[pos:pos + 4]))
        pos += rdlen
    return answer


# ---------------------------------------------------------------------------------------------------- TCP

class GuestTcp:
    """One TCP connection of the scripted guest: handshake, in-order data with an ACK per segment, FIN."""

    def __init__(self, guest: "ScriptedGuest", lport: int, rip: bytes, rport: int, keep_data: bool = True):
        self.guest, self.lport, self.rip, self.rport = guest, lport, rip, rport
        self.iss = random.randrange(1 << 32)
        self.snd_nxt = self.iss
        self.snd_una = self.iss
        self.rcv_nxt = 0
        self.peer_mss = 536
        self.keep_data = keep_data
        self.received = 0            # bytes received in order
        self.segments = 0            # data segments received in order
        self.syn_at: float | None = None
        self.fin_at: float | None = None
        self._rx = bytearray()
        self._cond = threading.Condition()
        self.established = threading.Event()
        self.fin_received = threading.Event()
        self.fin_acked = threading.Event()
        self.reset = threading.Event()
        self._fin_sent = False

    @property
    def remote(self) -> tuple[str, int]:
        return ip_text(self.rip), self.rport

    def _emit(self, flags: int, data: bytes = b"", options: bytes = b"") -> None:
        """Send a segment at snd_nxt and advance snd_nxt first: libslirp may answer before transmit returns."""
        g = self.guest
        seq = self.snd_nxt
        self.snd_nxt += len(data) + (1 if flags & (SYN | FIN) else 0)
        if flags & FIN:
            self._fin_sent = True
        g.transmit(ethernet(g.gateway_mac, g.mac, ETH_IP, ipv4(g.ip, self.rip, PROTO_TCP, tcp(
            g.ip, self.rip, self.lport, self.rport, seq, self.rcv_nxt, flags, data, options=options))))

    # on the I/O thread
    def _syn_received(self, pkt: Packet) -> None:
        self.rcv_nxt = pkt.seq + 1
        self.syn_at = time.perf_counter()
        self._peer_options(pkt.options)
        self._emit(SYN | ACK, options=struct.pack("!BBH", 2, 4, self.guest.mss))

    def _peer_options(self, options: bytes) -> None:
        pos = 0
        while pos < len(options):
            kind = options[pos]
            if kind == 0:
                break
            if kind == 1:
                pos += 1
                continue
            length = options[pos + 1] if pos + 1 < len(options) else 2
            if kind == 2 and length == 4:
                self.peer_mss = struct.unpack_from("!H", options, pos + 2)[0]
            pos += max(2, length)

    def _segment(self, pkt: Packet) -> None:
        flags = pkt.flags
        if flags & RST:
            self.reset.set()
            self.guest._forget(self)
            with self._cond:
                self._cond.notify_all()
            return
        if flags & SYN and flags & ACK and not self.established.is_set():   # our active open answered
            self.rcv_nxt = pkt.seq + 1
            self.snd_una = pkt.ack
            self._peer_options(pkt.options)
            self._emit(ACK)
            self.established.set()
            return
        if flags & ACK:
            self.snd_una = pkt.ack
            if not self.established.is_set() and pkt.ack == self.snd_nxt:
                self.established.set()
            if self._fin_sent and pkt.ack == self.snd_nxt:
                self.fin_acked.set()
        data = pkt.data
        answer = False
        if data:
            if pkt.seq == self.rcv_nxt:
                self.rcv_nxt += len(data)
                self.received += len(data)
                self.segments += 1
                if self.keep_data:
                    with self._cond:
                        self._rx += data
                        self._cond.notify_all()
            answer = True   # in order: ACK it; out of order: a duplicate ACK
        if flags & FIN and pkt.seq + len(data) == self.rcv_nxt:
            self.rcv_nxt += 1
            self.fin_at = time.perf_counter()
            self.fin_received.set()
            with self._cond:
                self._cond.notify_all()
            answer = True
        if answer:
            self._emit(ACK)

    # from test threads
    def send(self, data: bytes) -> None:
        """Send `data` in MSS-sized segments (no retransmission: libslirp on loopback loses nothing)."""
        def go():
            for pos in range(0, len(data), self.peer_mss):
                chunk = data[pos:pos + self.peer_mss]
                self._emit(PSH | ACK, chunk)
        self.guest.io.run_sync(go)

    def close(self) -> None:
        """Send our FIN."""
        def go():
            self._emit(FIN | ACK)
        self.guest.io.run_sync(go)

    def recv(self, count: int, timeout: float = 5.0) -> bytes:
        """Exactly `count` bytes (fewer only when the peer closed or reset); TimeoutError when they do not come."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._rx) < count and not self.fin_received.is_set() and not self.reset.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"received {len(self._rx)} of {count} bytes")
                self._cond.wait(left)
            out = bytes(self._rx[:count])
            del self._rx[:count]
            return out

    def recv_all(self, timeout: float = 5.0) -> bytes:
        """Everything until the peer's FIN."""
        if not self.fin_received.wait(timeout):
            raise TimeoutError("no FIN from the peer")
        with self._cond:
            out = bytes(self._rx)
            self._rx.clear()
            return out


# ---------------------------------------------------------------------------------------------------- the guest

class ScriptedGuest:
    """The guest side of `backend` (a NetBackend attached to `io`, an IoThread)."""

    def __init__(self, io, backend, mac: bytes = GUEST_MAC, keep_data: bool = True):
        self.io, self.backend, self.mac = io, backend, mac
        self.ip = b"\0" * 4
        self.gateway_mac = BROADCAST_MAC
        self.keep_data = keep_data
        self.accepting = True                      # what _deliver answers (False: "no receive buffers")
        self.seen: deque[Packet] = deque(maxlen=2000)
        self.frames_in = 0
        self.largest_frame_in = 0
        self.mss = MSS                             # what the guest's SYNs offer
        self._arp_replies: queue.Queue[Packet] = queue.Queue()
        self._dhcp: queue.Queue[Packet] = queue.Queue()
        self._udp: dict[int, queue.Queue] = {}
        self._listeners: dict[int, queue.Queue[GuestTcp]] = {}
        self._conns: dict[tuple[int, bytes, int], GuestTcp] = {}
        self.other: queue.Queue[Packet] = queue.Queue()   # frames nothing above took (e.g. RAs, stray TCP)
        backend.connect(self._deliver)

    # --- plumbing ---------------------------------------------------------------------------------------------
    def transmit(self, frame: bytes) -> None:
        if self.io.in_thread():
            self.backend.send(frame)
        else:
            self.io.call_soon(lambda: self.backend.send(frame))

    def _forget(self, conn: GuestTcp) -> None:
        self._conns.pop((conn.lport, conn.rip, conn.rport), None)

    def _deliver(self, frame: bytes) -> bool:
        if not self.accepting:
            return False
        self.frames_in += 1
        self.largest_frame_in = max(self.largest_frame_in, len(frame))
        pkt = parse(frame)
        self.seen.append(pkt)
        if pkt.ethertype == ETH_ARP:
            if pkt.op == 1 and pkt.tpa == self.ip and self.ip != b"\0" * 4:
                self.transmit(ethernet(pkt.sha, self.mac, ETH_ARP, arp(2, self.mac, self.ip, pkt.sha, pkt.spa)))
            elif pkt.op == 2:
                self._arp_replies.put(pkt)
            return True
        if pkt.ethertype == ETH_IP and pkt.proto == PROTO_UDP:
            if pkt.dport == 68:
                self._dhcp.put(pkt)
            elif pkt.dport in self._udp:
                self._udp[pkt.dport].put(pkt)
            else:
                self.other.put(pkt)
            return True
        if pkt.ethertype == ETH_IP and pkt.proto == PROTO_TCP:
            conn = self._conns.get((pkt.dport, pkt.src, pkt.sport))
            if conn is not None:
                conn._segment(pkt)
            elif pkt.flags & SYN and not pkt.flags & ACK and pkt.dport in self._listeners:
                conn = GuestTcp(self, pkt.dport, pkt.src, pkt.sport, self.keep_data)
                self._conns[(pkt.dport, pkt.src, pkt.sport)] = conn
                conn._syn_received(pkt)
                self._listeners[pkt.dport].put(conn)
            else:
                self.other.put(pkt)
            return True
        self.other.put(pkt)
        return True

    # --- ARP / DHCP ---------------------------------------------------------------------------------------------
    def arp(self, ip: str, timeout: float = 5.0) -> bytes:
        """Ask who has `ip`; returns the MAC in the reply."""
        target = ip4(ip)
        self.transmit(ethernet(BROADCAST_MAC, self.mac, ETH_ARP, arp(1, self.mac, self.ip, b"\0" * 6, target)))
        deadline = time.monotonic() + timeout
        while True:
            pkt = self._arp_replies.get(timeout=max(0.0, deadline - time.monotonic()))
            if pkt.spa == target:
                return pkt.sha

    def _dhcp_exchange(self, xid: int, options: dict[int, bytes], want: int, timeout: float) -> Packet:
        self.transmit(ethernet(BROADCAST_MAC, self.mac, ETH_IP, ipv4(
            b"\0" * 4, b"\xff" * 4, PROTO_UDP, udp(b"\0" * 4, b"\xff" * 4, 68, 67,
                                                   bootp_request(xid, self.mac, options)))))
        deadline = time.monotonic() + timeout
        while True:
            pkt = self._dhcp.get(timeout=max(0.0, deadline - time.monotonic()))
            got_xid, _, opts = parse_bootp(pkt.data)
            if got_xid == xid and opts.get(53) == bytes([want]):
                return pkt

    def dhcp(self, timeout: float = 5.0) -> Lease:
        """DISCOVER, OFFER, REQUEST, ACK; takes the leased address (and the server's MAC as the gateway's)."""
        xid = random.randrange(1 << 32)
        params = {55: bytes([1, 3, 6, 15, 51, 54])}
        offer = self._dhcp_exchange(xid, {53: b"\x01", **params}, 2, timeout)
        _, offered, offer_opts = parse_bootp(offer.data)
        ack = self._dhcp_exchange(xid, {53: b"\x03", 50: offered, 54: offer_opts[54], **params}, 5, timeout)
        _, yiaddr, opts = parse_bootp(ack.data)
        self.ip = yiaddr
        self.gateway_mac = ack.eth_src
        router, dns = opts.get(3), opts.get(6)     # a restricted libslirp offers neither
        return Lease(ip_text(yiaddr), router and ip_text(router[:4]), dns and ip_text(dns[:4]), ip_text(opts[1]),
                     ip_text(opts[54]), struct.unpack("!I", opts[51])[0])

    # --- UDP ----------------------------------------------------------------------------------------------------
    def udp_bind(self, port: int) -> None:
        self.io.run_sync(lambda: self._udp.setdefault(port, queue.Queue()))

    def udp_send(self, sport: int, dst: str, dport: int, data: bytes) -> None:
        self.transmit(ethernet(self.gateway_mac, self.mac, ETH_IP, ipv4(
            self.ip, ip4(dst), PROTO_UDP, udp(self.ip, ip4(dst), sport, dport, data))))

    def udp_recv(self, port: int, timeout: float = 5.0) -> Packet:
        return self._udp[port].get(timeout=timeout)

    def dns(self, name: str, server: str | None = None, timeout: float = 5.0) -> DnsAnswer:
        """An A query for `name` to the DNS proxy (default: the backend's dns_addr)."""
        server = server or getattr(self.backend, "dns_addr", "10.0.2.3")
        sport = random.randrange(20000, 60000)
        ident = random.randrange(1 << 16)
        self.udp_bind(sport)
        self.udp_send(sport, server, 53, dns_query(ident, name))
        deadline = time.monotonic() + timeout
        while True:
            pkt = self.udp_recv(sport, timeout=max(0.0, deadline - time.monotonic()))
            answer = parse_dns(pkt.data)
            if answer.ident == ident:
                return answer

    # --- TCP ----------------------------------------------------------------------------------------------------
    def listen(self, port: int) -> None:
        self.io.run_sync(lambda: self._listeners.setdefault(port, queue.Queue()))

    def accept(self, port: int, timeout: float = 5.0) -> GuestTcp:
        """The next connection to `port` (returned once its SYN arrived; wait on `.established` for the rest)."""
        return self._listeners[port].get(timeout=timeout)

    def connect(self, ip: str, port: int, timeout: float = 5.0) -> GuestTcp:
        """Open a connection; raises ConnectionRefusedError on a RST, TimeoutError when nothing answers."""
        conn = GuestTcp(self, random.randrange(40000, 60000), ip4(ip), port, self.keep_data)

        def go():
            self._conns[(conn.lport, conn.rip, conn.rport)] = conn
            conn._emit(SYN, options=struct.pack("!BBH", 2, 4, self.mss))
        self.io.run_sync(go)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if conn.established.wait(0.02):
                return conn
            if conn.reset.is_set():
                raise ConnectionRefusedError(f"{ip}:{port} answered with a reset")
        self.io.run_sync(lambda: self._forget(conn))
        raise TimeoutError(f"no answer from {ip}:{port}")
