"""SlirpBackend end to end: a scripted guest (tests/net/guestnet.py) on the Ethernet side, real sockets on the host
side, everything on a running IoThread. Host traffic stays on 127.0.0.1, except the DNS test's, which goes where
the host's resolver is (the point of the DNS proxy)."""
import dataclasses
import os
import select
import ipaddress
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from cloudkvm.errors import CloudkvmError
from cloudkvm.iothread import IoThread
from cloudkvm.kvm.iowait import SLIRP_FDS
from cloudkvm.net import slirp as slirp_mod
from cloudkvm.net import slirp_ffi
from cloudkvm.profile import Forward, Network

from guestnet import ETH_IPV6, GuestTcp, ScriptedGuest, dns_query, ip4, mac_text, parse_dns

try:
    slirp_ffi.load()
except CloudkvmError as exc:  # pragma: no cover - depends on the host
    pytest.skip(f"libslirp unavailable: {exc}", allow_module_level=True)

from cloudkvm.net.config import USER_NET_MTU  # noqa: E402
from cloudkvm.net.slirp import QUEUE_LIMIT, SlirpBackend, guest_addresses  # noqa: E402

pytestmark = pytest.mark.timeout(10)
WAIT = 5.0


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tcp_listeners(port: int) -> list[str]:
    """Local addresses listening on `port` per /proc/net/tcp (IPv4)."""
    out = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        addr, hexport = fields[1].split(":")
        if int(hexport, 16) == port and fields[3] == "0A":   # 0A = LISTEN
            out.append(str(ipaddress.IPv4Address(struct.pack("<I", int(addr, 16)))))
    return out


@pytest.fixture(params=["c", "python"])
def poll_path(request, monkeypatch) -> str:
    """How the I/O thread polls libslirp's sockets: in its wait in C (kvm/ioloop.c), or as a Python poll source."""
    monkeypatch.setattr(SlirpBackend, "poll_in_c", request.param == "c")
    return request.param


@pytest.fixture
def io(poll_path):
    t = IoThread(name="net-io")
    t.start()
    yield t
    t.stop()


@pytest.fixture
def make_net(io):
    """make_net(**SlirpBackend kwargs) -> (backend, guest): attached to `io`, the guest holding its DHCP lease."""
    created = []

    def make(*args, dhcp=True, **kwargs):
        backend = SlirpBackend(*args, **kwargs)
        created.append(backend)
        guest = ScriptedGuest(io, backend)
        backend.attach(io)
        if dhcp:
            guest.dhcp()
            guest.gateway_mac = guest.arp(backend.host_addr)
        return backend, guest
    yield make
    for backend in created:
        backend.close()


def round_trip_through_forward(port: int, guest: ScriptedGuest, guest_port: int = 22) -> GuestTcp:
    host = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    try:
        conn = guest.accept(guest_port, timeout=WAIT)
        assert conn.established.wait(WAIT)
        host.sendall(b"ping from the host")
        assert conn.recv(18) == b"ping from the host"
        conn.send(b"pong from the guest")
        got = b""
        while len(got) < 19:
            got += host.recv(100)
        assert got == b"pong from the guest"
        return conn
    finally:
        host.close()


# --- DHCP and ARP ---------------------------------------------------------------------------------------------

def test_a_frame_sent_from_another_thread_reaches_libslirp_on_the_io_thread(make_net, io, monkeypatch):
    """libslirp is used from the I/O thread only: a frame sent from another thread (a vCPU's QueueNotify write that
    no ioeventfd caught) is handed to it, never fed in there."""
    backend, guest = make_net()
    fed_here = []
    real = backend._drain_inbox
    monkeypatch.setattr(backend, "_drain_inbox", lambda: (fed_here.append(io.in_thread()), real()))
    monkeypatch.setattr(guest, "transmit", backend.send)         # straight from this (test) thread
    assert guest.arp(backend.host_addr) == guest.gateway_mac
    assert fed_here and all(fed_here)
    assert backend.send_native(lambda: pytest.fail("C ran off the I/O thread")) is None


def test_dhcp_lease_is_qemus(make_net):
    backend, guest = make_net(dhcp=False)
    lease = guest.dhcp()
    assert (lease.ip, lease.router, lease.dns, lease.netmask) == ("10.0.2.15", "10.0.2.2", "10.0.2.3",
                                                                    "255.255.255.0")
    assert lease.lease_time > 0
    assert (backend.host_addr, backend.dhcp_start, backend.dns_addr) == ("10.0.2.2", "10.0.2.15", "10.0.2.3")


def test_arp_for_the_gateway_and_the_dns_proxy_is_answered(make_net):
    _, guest = make_net()
    assert mac_text(guest.arp("10.0.2.2")) == "52:55:0a:00:02:02"
    assert mac_text(guest.arp("10.0.2.3")) == "52:55:0a:00:02:03"


def test_another_network_gets_the_same_offsets(make_net):
    backend, guest = make_net(net="192.168.76.0/24", dhcp=False)
    lease = guest.dhcp()
    assert (lease.ip, lease.router, lease.dns) == ("192.168.76.15", "192.168.76.2", "192.168.76.3")


@pytest.mark.parametrize("net, expected", [
    ("10.0.2.0/24", ("10.0.2.2", "10.0.2.15", "10.0.2.3")),
    ("10.0.0.0/16", ("10.0.2.2", "10.0.2.15", "10.0.2.3")),       # QEMU: net | (0x0202 & ~mask)
    ("172.16.5.0/24", ("172.16.5.2", "172.16.5.15", "172.16.5.3")),
    ("10.9.9.16/28", ("10.9.9.18", "10.9.9.20", "10.9.9.19")),    # .15 of a /28 is the broadcast
])
def test_guest_addresses(net, expected):
    assert guest_addresses(net) == expected


# --- host forwards ----------------------------------------------------------------------------------------------

def test_tcp_forward_carries_data_both_ways_and_closes(make_net):
    port = free_port()
    backend, guest = make_net(forwards=[f"tcp:127.0.0.1:{port}-:22"])
    assert backend.forwards[0].guest_ip == "10.0.2.15"
    guest.listen(22)
    host = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    conn = guest.accept(22, timeout=WAIT)                 # the SYN reached the guest
    assert conn.remote[0] == "10.0.2.2"
    assert conn.established.wait(WAIT)
    payload = bytes(range(256)) * 800                     # 200 KiB: many windows' worth
    sender = threading.Thread(target=host.sendall, args=(payload,))
    sender.start()
    assert conn.recv(len(payload), timeout=WAIT) == payload
    sender.join(WAIT)
    reply = b"guest says hi " * 1000                      # 14 KB, several segments
    conn.send(reply)
    got = bytearray()
    while len(got) < len(reply):
        got += host.recv(65536)
    assert bytes(got) == reply
    host.shutdown(socket.SHUT_WR)                         # host FIN -> guest
    assert conn.recv_all(WAIT) == b""
    conn.close()                                          # guest FIN -> host sees EOF
    assert host.recv(10) == b""
    assert conn.fin_acked.wait(WAIT)
    host.close()


@pytest.mark.parametrize("mtu", [1500, 9000, USER_NET_MTU])
def test_frames_to_the_guest_are_as_large_as_the_mtu_lets_them_be(make_net, mtu):
    """libslirp is given the link's MTU both ways: a stream through a forward reaches a guest that offers an MSS to
    match in frames of up to MTU + 14 bytes (the Ethernet header), never more; full ones for the smaller MTUs, over
    32 KiB for the largest (libslirp sends what one read of its socket gives)."""
    port = free_port()
    backend, guest = make_net(forwards=[f"tcp:127.0.0.1:{port}-:22"], mtu=mtu)
    guest.mss = mtu - 40
    guest.listen(22)
    host = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    conn = guest.accept(22, timeout=WAIT)
    assert conn.established.wait(WAIT)
    payload = os.urandom(1 << 20)
    sender = threading.Thread(target=host.sendall, args=(payload,))
    sender.start()
    assert conn.recv(len(payload), timeout=WAIT) == payload
    sender.join(WAIT)
    assert min(mtu + 14, 32 << 10) <= guest.largest_frame_in <= mtu + 14
    assert conn.peer_mss == mtu - 40          # and libslirp takes segments that large from the guest
    conn.send(payload)
    got = bytearray()
    while len(got) < len(payload):
        got += host.recv(1 << 20)
    assert bytes(got) == payload
    host.close()


def test_the_oldest_forward_is_served_when_libslirp_has_more_sockets_than_the_first_poll_set(make_net):
    """More listening sockets than the wait in C makes room for at first (kvm/iowait.py SLIRP_FDS): C grows the
    array as libslirp asks, so the first forward, last in libslirp's socket list, is still polled."""
    ports: set[int] = set()
    while len(ports) < 4 * SLIRP_FDS:     # well past the first array (rounded up to a power of two)
        ports.add(free_port())
    ports_in_order = sorted(ports)
    _, guest = make_net(forwards=[f"tcp:127.0.0.1:{port}-:22" for port in ports_in_order])
    guest.listen(22)
    round_trip_through_forward(ports_in_order[0], guest)


def test_tcp_forward_to_an_explicit_guest_address(make_net):
    port = free_port()
    backend, guest = make_net(forwards=[Forward(proto="tcp", host_port=port, guest_ip="10.0.2.15", guest_port=2222)])
    guest.listen(2222)
    round_trip_through_forward(port, guest, 2222)


def test_udp_forward_works_both_ways(make_net):
    port = free_port(socket.SOCK_DGRAM)
    _, guest = make_net(forwards=[f"udp:127.0.0.1:{port}-:5353"])
    guest.udp_bind(5353)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as host:
        host.settimeout(WAIT)
        host.sendto(b"hello over udp", ("127.0.0.1", port))
        pkt = guest.udp_recv(5353, timeout=WAIT)
        assert pkt.data == b"hello over udp"
        assert pkt.dst == ip4("10.0.2.15")
        guest.udp_send(5353, str(ipaddress.IPv4Address(pkt.src)), pkt.sport, b"udp answer")
        data, sender = host.recvfrom(100)
        assert data == b"udp answer"
        assert sender == ("127.0.0.1", port)


def test_forwards_listen_on_loopback_only_by_default(make_net):
    port = free_port()
    make_net(forwards=[f"tcp::{port}-:22"])               # no host address given
    assert tcp_listeners(port) == ["127.0.0.1"]
    with pytest.raises(ConnectionRefusedError):           # 127.0.0.2 is loopback too, but not the bound address
        socket.create_connection(("127.0.0.2", port), timeout=WAIT).close()


def test_a_forward_can_name_another_host_address(make_net):
    port = free_port()
    _, guest = make_net(forwards=[f"tcp:127.0.0.2:{port}-:22"])
    assert tcp_listeners(port) == ["127.0.0.2"]
    guest.listen(22)
    with socket.create_connection(("127.0.0.2", port), timeout=WAIT) as host:
        host.sendall(b"x")
        assert guest.accept(22, timeout=WAIT).recv(1) == b"x"


def test_a_taken_port_fails_clearly_and_leaves_nothing_open():
    first_free = free_port()
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    taken = holder.getsockname()[1]
    live_before = len(slirp_mod._LIVE)
    try:
        with pytest.raises(CloudkvmError) as info:
            SlirpBackend(forwards=[f"tcp:127.0.0.1:{first_free}-:80", f"tcp:127.0.0.1:{taken}-:22"])
    finally:
        holder.close()
    err = info.value
    assert err.message == f"tcp 127.0.0.1:{taken} is already in use (by another VM or program)"
    assert str(taken) in err.hint
    assert "\n" not in str(err)
    assert tcp_listeners(first_free) == []                # the forward set up before the failure is gone
    with socket.socket() as again:                        # and the port binds without SO_REUSEADDR
        again.bind(("127.0.0.1", first_free))
    assert len(slirp_mod._LIVE) == live_before


def test_a_taken_udp_port_fails_clearly():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        taken = holder.getsockname()[1]
        with pytest.raises(CloudkvmError, match=f"^udp 127.0.0.1:{taken} is already in use"):
            SlirpBackend(forwards=[f"udp:127.0.0.1:{taken}-:53"])


def test_two_backends_asking_for_the_same_port(make_net):
    port = free_port()
    _, guest = make_net(forwards=[f"tcp:127.0.0.1:{port}-:22"])
    with pytest.raises(CloudkvmError) as info:
        SlirpBackend(forwards=[f"tcp:127.0.0.1:{port}-:22"])
    assert str(info.value).count("\n") == 0
    assert info.value.message == f"tcp 127.0.0.1:{port} is already in use (by another VM or program)"
    guest.listen(22)
    round_trip_through_forward(port, guest)               # the first one still works


def test_a_host_address_that_is_not_ours_is_a_clear_error():
    with pytest.raises(CloudkvmError, match="203.0.113.7 is not an address of this host"):
        SlirpBackend(forwards=[f"tcp:203.0.113.7:{free_port()}-:22"])


@pytest.mark.parametrize("forwards, message", [
    (["ssh to the guest"], "network.forwards[0]: cannot read the forward 'ssh to the guest'"),
    (["tcp::70000-:22"], "network.forwards[0].host_port: Input should be less than or equal to 65535"),
    (["tcp::5000-192.168.1.5:22"],
     "network.forwards[0].guest_ip: guest address 192.168.1.5 is outside the guest network 10.0.2.0/24"),
    (["tcp::5000-:22", "tcp::5000-:23"], "network.forwards[1]: host port tcp:127.0.0.1:5000 is already forwarded "
                                         "by forwards[0]"),
])
def test_bad_forwards_are_one_line_errors(forwards, message):
    with pytest.raises(CloudkvmError) as info:
        SlirpBackend(forwards=forwards)
    assert info.value.message == message and info.value.hint
    assert "\n" not in str(info.value)


def test_a_network_without_user_mode_is_refused():
    with pytest.raises(CloudkvmError, match="has no user networking"):
        SlirpBackend(Network(mode="none"))


def test_close_releases_the_ports(io):
    port = free_port()
    backend = SlirpBackend(Network(mode="user", forwards=[f"tcp:127.0.0.1:{port}-:22"]))
    backend.attach(io)
    assert tcp_listeners(port) == ["127.0.0.1"]
    backend.close()
    assert tcp_listeners(port) == []
    backend.close()                                       # twice is harmless
    backend.send(b"\0" * 60)                              # so is a late frame
    with SlirpBackend(forwards=[f"tcp:127.0.0.1:{port}-:22"]) as again:   # the port can be had again
        assert tcp_listeners(port) == ["127.0.0.1"]
    assert repr(again).endswith("closed>")


# --- the guest going out --------------------------------------------------------------------------------------

def test_outbound_tcp_reaches_a_host_server_through_10_0_2_2(make_net):
    _, guest = make_net()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(WAIT)
        conn = guest.connect("10.0.2.2", server.getsockname()[1])
        peer, addr = server.accept()
        with peer:
            assert addr[0] == "127.0.0.1"
            conn.send(b"GET / from the guest")
            peer.settimeout(WAIT)
            got = b""
            while len(got) < 20:
                got += peer.recv(100)
            assert got == b"GET / from the guest"
            peer.sendall(b"200 from the host")
            assert conn.recv(17) == b"200 from the host"
            peer.shutdown(socket.SHUT_WR)
            assert conn.recv_all(WAIT) == b""
            conn.close()
            assert peer.recv(10) == b""


def test_outbound_tcp_to_a_closed_port_is_refused(make_net):
    _, guest = make_net()
    with pytest.raises(ConnectionRefusedError):
        guest.connect("10.0.2.2", free_port())


def test_outbound_udp_reaches_a_host_socket(make_net):
    _, guest = make_net()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(WAIT)
        guest.udp_bind(40001)
        guest.udp_send(40001, "10.0.2.2", server.getsockname()[1], b"datagram out")
        data, addr = server.recvfrom(100)
        assert data == b"datagram out"
        server.sendto(b"datagram back", addr)
        assert guest.udp_recv(40001, timeout=WAIT).data == b"datagram back"


def _host_resolver() -> str | None:
    try:
        for line in Path("/etc/resolv.conf").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver" and ":" not in parts[1]:
                return parts[1]
    except OSError:
        pass
    return None


def test_dns_queries_to_10_0_2_3_get_the_host_resolvers_answer(make_net):
    """libslirp's DNS proxy forwards the query to the first IPv4 nameserver of the host's /etc/resolv.conf (it does
    not read /etc/hosts). Offline that resolver may know little, so the test asks what the host's resolver says
    about `localhost` directly and requires the guest to get the same answer (NXDOMAIN counts) through 10.0.2.3."""
    resolver = _host_resolver()
    if resolver is None:
        pytest.skip("no IPv4 nameserver in /etc/resolv.conf")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(dns_query(0x4242, "localhost"), (resolver, 53))
        try:
            direct = parse_dns(s.recvfrom(2048)[0])
        except OSError:
            pytest.skip(f"the host's resolver {resolver} does not answer")
    _, guest = make_net()
    answer = guest.dns("localhost")
    assert answer.is_response
    assert (answer.rcode, sorted(answer.addresses)) == (direct.rcode, sorted(direct.addresses))


# --- restricted mode ------------------------------------------------------------------------------------------

def test_restricted_blocks_outbound_but_keeps_forwards(make_net):
    port = free_port()
    backend, guest = make_net(forwards=[f"tcp:127.0.0.1:{port}-:22"], restrict=True, dhcp=False)
    assert backend.restrict
    lease = guest.dhcp()
    assert (lease.ip, lease.router, lease.dns) == ("10.0.2.15", None, None)   # no way out: no router, no DNS
    guest.gateway_mac = guest.arp("10.0.2.2")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.5)
        with pytest.raises(ConnectionRefusedError):       # libslirp answers the SYN with a reset
            guest.connect("10.0.2.2", server.getsockname()[1], timeout=2)
        with pytest.raises(socket.timeout):
            server.accept()                               # nothing reached the host
    guest.listen(22)
    round_trip_through_forward(port, guest)


# --- frames the guest cannot take yet, timers ------------------------------------------------------------------

def test_frames_are_kept_while_the_guest_has_no_buffers(make_net, io):
    backend, guest = make_net()
    guest.accepting = False
    guest.transmit(guest_arp_request(guest, "10.0.2.2"))
    io.run_sync(lambda: None)
    assert backend.pending == 1
    guest.accepting = True
    io.run_sync(backend.rx_ready)
    assert backend.pending == 0
    assert mac_text(guest._arp_replies.get(timeout=WAIT).sha) == "52:55:0a:00:02:02"


def test_the_kept_frames_are_bounded(make_net, io):
    backend, guest = make_net()
    guest.accepting = False
    dropped = backend.dropped
    for _ in range(QUEUE_LIMIT + 44):
        guest.transmit(guest_arp_request(guest, "10.0.2.2"))
    io.run_sync(lambda: None)
    assert backend.pending == QUEUE_LIMIT
    assert backend.dropped - dropped == 44
    guest.accepting = True
    io.run_sync(backend.rx_ready)
    assert backend.pending == 0


def guest_arp_request(guest: ScriptedGuest, ip: str) -> bytes:
    from guestnet import BROADCAST_MAC, ETH_ARP, arp, ethernet
    return ethernet(BROADCAST_MAC, guest.mac, ETH_ARP, arp(1, guest.mac, guest.ip, b"\0" * 6, ip4(ip)))


def test_the_router_advertisement_timer_runs_on_the_io_thread(make_net, io):
    backend, guest = make_net()
    assert backend.config_version < 4 or backend._timers, "libslirp armed no timer"
    (timer,) = backend._timers.values()
    assert timer.handle is not None and not timer.handle.cancelled
    assert 150 < timer.handle.when - time.monotonic() < 650      # NDP_MinRtrAdvInterval..Max (200..600 s)
    while not guest.other.empty():
        guest.other.get()
    io.run_sync(lambda: backend._fire(timer))                     # as if 200+ s had passed
    pkt = guest.other.get(timeout=WAIT)
    assert pkt.ethertype == ETH_IPV6 and pkt.raw[14 + 6] == 58 and pkt.raw[14 + 40] == 134   # ICMPv6 RA
    assert timer.handle is not None                               # slirp re-armed it


def test_no_ipv6_means_no_timer(make_net):
    backend, _ = make_net(ipv6=False)
    assert all(t.expire_ms is None for t in backend._timers.values())


def test_an_idle_backend_does_not_spin(io, poll_path):
    backend = SlirpBackend(forwards=[f"tcp:127.0.0.1:{free_port()}-:22"])
    try:
        calls = []
        fill = backend.fill

        def counting_fill():
            calls.append(time.monotonic())
            return fill()
        backend.fill = counting_fill          # before attach: the poll source takes this one
        backend.attach(io)
        time.sleep(0.1)
        turns = io.run_sync(lambda: io.native.turns) if poll_path == "c" else 0
        time.sleep(1.2)
        if poll_path == "c":
            # libslirp asks to be woken at least every second (0.5 s with TCP connections, 2 ms with a delayed ACK)
            assert 1 <= io.run_sync(lambda: io.native.turns) - turns <= 6
            assert not calls                  # polled in C: the Python poll source is not there
        else:
            assert 1 <= len(calls) <= 6
    finally:
        backend.close()


def test_an_older_config_version_uses_timer_new(make_net, io, monkeypatch):
    """libslirp 4.3-4.6 know SlirpConfig version 3 at most: no timer_new_opaque, timers call a C callback."""
    monkeypatch.setattr(slirp_ffi, "_loaded", dataclasses.replace(slirp_ffi.load(), config_version=3))
    backend, guest = make_net()
    assert backend.config_version == 3
    (timer,) = backend._timers.values()
    assert timer.cb is not None and timer.timer_id is None
    while not guest.other.empty():
        guest.other.get()
    io.run_sync(lambda: backend._fire(timer))
    pkt = guest.other.get(timeout=WAIT)
    assert pkt.ethertype == ETH_IPV6 and pkt.raw[14 + 40] == 134


def test_loop_turns_that_concern_nothing_of_libslirp_skip_its_fill_and_poll():
    """The fill's answer stands until libslirp is called again, one of its fds fires, or its time-out passes;
    another fd's wake-up (a disk notification) costs libslirp nothing."""
    port = free_port()
    backend = SlirpBackend(forwards=[f"tcp:127.0.0.1:{port}-:22"])
    try:
        pairs, _ = backend.fill()
        calls = backend.slirp_polls
        listener = next(fd for fd, _ in pairs)
        assert backend.fill()[0] is pairs  # the same answer, libslirp not asked
        backend.dispatch({})
        assert backend.slirp_polls == calls  # nothing for libslirp: neither call was made
        with socket.create_connection(("127.0.0.1", port)):  # a real connection: its accept() does not block
            backend.dispatch({listener: select.POLLIN})
        assert backend.slirp_polls == calls + 1  # its fd fired: polled
        backend.fill()
        calls = backend.slirp_polls
        backend.send(bytes(60))  # a frame from the guest went in: the next fill asks again
        backend.fill()
        assert backend.slirp_polls == calls + 1
        backend._deadline = time.monotonic() - 1  # its time-out passed: polled for its timers
        calls = backend.slirp_polls
        backend.dispatch({})
        assert backend.slirp_polls == calls + 1
    finally:
        backend.close()
