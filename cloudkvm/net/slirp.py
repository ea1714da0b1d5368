"""User-mode networking (QEMU's `-netdev user,hostfwd=...`) on libslirp, as a `NetBackend`.

The guest network is QEMU's: on 10.0.2.0/24 the host (gateway) is 10.0.2.2, the DNS proxy 10.0.2.3 (libslirp
forwards queries to the host's resolver from /etc/resolv.conf), the DHCP server hands out 10.0.2.15 first;
10.0.2.2 reaches the host's own 127.0.0.1. IPv6 is on like QEMU's (fec0::/64, host fec0::2, DNS fec0::3).
Host forwards listen on 127.0.0.1 unless a forward names another host address.

Everything runs on the machine's I/O thread (`cloudkvm.iothread.IoThread`): the device calls `send`, libslirp's
sockets are polled in the I/O thread's wait in C (`add_slirp`, kvm/ioloop.c: `slirp_pollfds_fill` before each
poll, `slirp_pollfds_poll` after it, no Python in between; with `poll_in_c` off, or for a second backend on the same
I/O thread, they are a Python poll source doing the same), its timers are `call_later` timers, and frames for the
guest go to the device's `deliver` (up to 256 are kept while the guest has no receive buffers). libslirp is not
reentrant: a frame the guest sends while libslirp is calling us (the device answering inside `deliver`) is queued
and fed in when that call returns.

The frame path without Python: libslirp's send_packet is kvm/virtio_net.c `ckvm_net_link_send`, its opaque the
backend's `struct ckvm_netlink`. A device that connects natively (`connect_native`, devices/virtio/net.py) arms the
link inside the `section` it gives, which wraps every call into libslirp: frames then go straight into its receive
queue, and `send_native` lets its C transmit path call slirp_input itself. Every frame C does not place comes to
`_cb_send_packet` here and goes the Python way. While the I/O thread waits in C, the link is open to C (`tx_open`):
the device's transmit notifications are served there too (kvm/notify.c CKVM_SERVE_NET_TX), so a guest's ACK and
libslirp's next segment for it need no Python at all."""
from __future__ import annotations

import contextlib
import errno
import ipaddress
import itertools
import math
import logging
import os
import socket
import struct
import time
from collections import deque
from dataclasses import replace
from typing import Iterable

from ..errors import CloudkvmError
from . import slirp_ffi
from .backend import Deliver
from .config import DEFAULT_NET, USER_NET_MTU, HostForward, UserNetConfig, user_net
from .slirp_ffi import ffi
from ..kvm.native import address, ffi as native_ffi, lib as native_lib

log = logging.getLogger("cloudkvm.net.slirp")

QUEUE_LIMIT = 256          # frames kept while the guest posts no receive buffers
_UINT32_MAX = 0xFFFFFFFF   # slirp_pollfds_fill's "no timeout"
IPV6_PREFIX = "fec0::"     # QEMU's default user-network IPv6 prefix (net/slirp.c: ipv6-prefix)
IPV6_PREFIX_LEN = 64
_GUEST_ERRORS_LOGGED = 32  # distinct guest_error messages logged per backend

# SLIRP_POLL_IN/OUT/PRI/ERR/HUP <-> poll(2) events, as kvm/ioloop.c converts them (a closed fd, POLLNVAL, is an error
# for libslirp): tables of its two functions, so the Python poll source calls no C per fd.
_SLIRP_TO_POLL = [native_lib.ckvm_slirp_to_poll(bits) for bits in range(32)]
_POLL_TO_SLIRP: dict[int, int] = {}


def _to_slirp(revents: int) -> int:
    out = _POLL_TO_SLIRP.get(revents)
    if out is None:
        out = _POLL_TO_SLIRP[revents] = native_lib.ckvm_poll_to_slirp(revents)
    return out


# ---------------------------------------------------------------------------------------------------- callbacks
# One set of C callbacks (ffi.callback: ABI mode has no extern "Python") for every instance, alive as long as the
# module, so they outlive every Slirp. The `opaque` pointer is the backend's struct ckvm_netlink (C memory), which
# also names the backend in _LIVE: libslirp never holds a pointer to a Python object.

_LIVE: dict = {}           # opaque pointer (cdata void *, hashed by address) -> SlirpBackend


def _backend(opaque) -> "SlirpBackend | None":
    return _LIVE.get(opaque)


def _onerror(exc_type, exc, tb) -> None:
    log.error("libslirp callback failed", exc_info=(exc_type, exc, tb))


@ffi.callback("ssize_t(const void *, size_t, void *)", onerror=_onerror)
def _cb_send_packet(buf, length, opaque):
    # the link's fallback: every frame kvm/virtio_net.c did not place in the guest's receive queue
    backend = _backend(opaque)
    if backend is not None:
        backend._output(ffi.buffer(buf, length)[:])
    return length


# libslirp's send_packet: the C frame path (its opaque is a struct ckvm_netlink), which falls back on the above
_LINK_SEND = ffi.cast("SlirpWriteCb", address(native_ffi.addressof(native_lib, "ckvm_net_link_send")))
_FALLBACK_SEND = native_ffi.cast("ssize_t(*)(const void *, size_t, void *)", address(_cb_send_packet, ffi))


@ffi.callback("void(const char *, void *)", onerror=_onerror)
def _cb_guest_error(msg, opaque):
    backend = _backend(opaque)
    text = ffi.string(msg).decode("utf-8", "replace")
    if backend is None or len(backend._guest_errors) < _GUEST_ERRORS_LOGGED and text not in backend._guest_errors:
        if backend is not None:
            backend._guest_errors.add(text)
        log.warning("guest network error: %s", text)


@ffi.callback("void *(SlirpTimerCb, void *, void *)", onerror=_onerror)
def _cb_timer_new(cb, cb_opaque, opaque):
    backend = _backend(opaque)
    return ffi.NULL if backend is None else backend._timer_new(cb, None, cb_opaque)


@ffi.callback("void *(SlirpTimerId, void *, void *)", onerror=_onerror)
def _cb_timer_new_opaque(timer_id, cb_opaque, opaque):
    backend = _backend(opaque)
    return ffi.NULL if backend is None else backend._timer_new(None, timer_id, cb_opaque)


@ffi.callback("void(void *, void *)", onerror=_onerror)
def _cb_timer_free(timer, opaque):
    backend = _backend(opaque)
    if backend is not None:
        backend._timer_free(int(ffi.cast("uintptr_t", timer)))


@ffi.callback("void(void *, int64_t, void *)", onerror=_onerror)
def _cb_timer_mod(timer, expire_ms, opaque):
    backend = _backend(opaque)
    if backend is not None:
        backend._timer_mod(int(ffi.cast("uintptr_t", timer)), expire_ms)


# Callbacks with nothing for Python to do, in C (kvm/ioloop.c): the clock (CLOCK_MONOTONIC, as time.monotonic_ns),
# notify (libslirp is only called on the I/O thread, which fills anew before every wait) and fd (un)registration
# (the fds are collected anew by slirp_pollfds_fill before every wait).
def _native_fn(name: str, ctype: str):
    return ffi.cast(ctype, address(native_ffi.addressof(native_lib, name)))


_CLOCK_NS = _native_fn("ckvm_clock_ns", "int64_t(*)(void *)")
_NOTIFY = _native_fn("ckvm_slirp_no_op", "void(*)(void *)")
_POLL_FD = _native_fn("ckvm_slirp_fd_no_op", "void(*)(int, void *)")


@ffi.callback("void(Slirp *, void *)", onerror=_onerror)
def _cb_init_completed(slirp, opaque):
    pass


@ffi.callback("int(int, int, void *)", onerror=_onerror)
def _cb_add_poll(fd, events, opaque):
    backend = _backend(opaque)
    if backend is None:
        return -1
    fds = backend._poll_fds
    fds.append(fd)
    backend._poll_pairs.append((fd, _SLIRP_TO_POLL[events & 31]))
    return len(fds) - 1


@ffi.callback("int(int, void *)", onerror=_onerror)
def _cb_get_revents(idx, opaque):
    backend = _backend(opaque)
    if backend is None or not 0 <= idx < len(backend._poll_fds):
        return 0
    revents = backend._revents.get(backend._poll_fds[idx], 0)
    return _to_slirp(revents) if revents else 0


# ---------------------------------------------------------------------------------------------------- helpers

def _in_addr(address) -> int:
    """An IPv4 address as `struct in_addr.s_addr` (network byte order in memory)."""
    return struct.unpack("=I", ipaddress.IPv4Address(address).packed)[0]


def _set_in6(cfg, field: str, address: str) -> None:
    ffi.memmove(ffi.addressof(cfg, field), ipaddress.IPv6Address(address).packed, 16)


def guest_addresses(net: str) -> tuple[str, str, str]:
    """(host, dhcp start, dns) in `net`, QEMU's way: the .2, .15 and .3 of 10.0.2.0/24 carried into any network
    (QEMU net/slirp.c: `net | (0x0202 & ~mask)` ...); in a /28, whose .15 is the broadcast address, DHCP starts
    at .4."""
    network = ipaddress.IPv4Network(net)
    base, hostmask = int(network.network_address), int(network.hostmask)
    host, dhcp, dns = (base | (offset & hostmask) for offset in (0x0202, 0x020F, 0x0203))
    if dhcp in (int(network.broadcast_address), base, host, dns):
        dhcp = base + 4
    return tuple(str(ipaddress.IPv4Address(a)) for a in (host, dhcp, dns))


def _forward_error(fwd: HostForward, err: int) -> CloudkvmError:
    where = f"{fwd.proto} {fwd.host_ip}:{fwd.host_port}"
    flag = "t" if fwd.proto == "tcp" else "u"
    if err == errno.EADDRINUSE:
        return CloudkvmError(f"{where} is already in use (by another VM or program)",
                             f"pick another host port for the forward {fwd.spec()}, or stop what listens there "
                             f"(ss -{flag}lnp 'sport = :{fwd.host_port}')")
    if err == errno.EACCES:
        return CloudkvmError(f"{where}: permission denied (host ports below 1024 need root)",
                             f"use a host port of 1024 or above in the forward {fwd.spec()}")
    if err == errno.EADDRNOTAVAIL:
        return CloudkvmError(f"cannot listen on {where}: {fwd.host_ip} is not an address of this host",
                             "use host_ip 127.0.0.1 (the default), or 0.0.0.0 for every interface")
    reason = os.strerror(err) if err else "libslirp refused it"
    return CloudkvmError(f"cannot listen on {where}: {reason}", f"check the forward {fwd.spec()}")


def check_port_free(fwd: HostForward) -> None:
    """Bind the forward's host port ourselves first, so a taken port is a clear error (libslirp only says -1)."""
    kind = socket.SOCK_STREAM if fwd.proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as probe:
        if kind == socket.SOCK_STREAM:
            # libslirp sets SO_REUSEADDR on its listening sockets too: a TIME_WAIT leftover is no conflict,
            # a listening socket is. (For UDP SO_REUSEADDR would let two forwards share a port: not set.)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((fwd.host_ip, fwd.host_port))
        except OSError as exc:
            raise _forward_error(fwd, exc.errno) from None


def _config(config, net: str, forwards: Iterable, restrict: bool, mtu: int) -> UserNetConfig:
    """The backend's UserNetConfig: `config` as given, or one built from another object with the same fields
    (a profile's `network:` in mode user), or from the plain arguments."""
    if isinstance(config, UserNetConfig):
        return config
    if config is not None:
        mode = getattr(config, "mode", "user")
        if mode != "user":
            raise CloudkvmError(f"network mode '{mode}' has no user networking",
                                "set network: {mode: user} in the profile")
        net, forwards, restrict, mtu = config.net, config.forwards, config.restrict, config.mtu
    return user_net(net, forwards, restrict, mtu)  # strings (tcp:127.0.0.1:2222-:22), dicts or forward objects


class _Timer:
    __slots__ = ("cb", "timer_id", "cb_opaque", "expire_ms", "handle")

    def __init__(self, cb, timer_id, cb_opaque):
        self.cb = cb                # SlirpTimerCb (timer_new, config version < 4) or None
        self.timer_id = timer_id    # SlirpTimerId (timer_new_opaque, version 4) or None
        self.cb_opaque = cb_opaque
        self.expire_ms: int | None = None
        self.handle = None


# ---------------------------------------------------------------------------------------------------- the backend

class SlirpBackend:
    """libslirp user networking for one guest NIC (a `NetBackend`).

    `SlirpBackend(config)` with a `net.config.UserNetConfig` (what the launcher builds from a profile), or with
    plain arguments: `SlirpBackend(net="10.0.2.0/24", forwards=["tcp:127.0.0.1:2222-:22", HostForward(...), {...}],
    restrict=False)`.
    `ipv6` (default on, like QEMU) and `dns` (the 10.0.2.3 proxy, default on) are keyword-only.
    The forwards listen as soon as the backend exists; a forward that cannot listen (port taken, not an address
    of this host, privileged port) raises `CloudkvmError` naming it, and nothing created so far is left open.
    A missing or too old libslirp is a `CloudkvmError` too. `close()` (or `with`) releases everything."""

    poll_in_c = True   # libslirp's sockets polled in the I/O thread's wait in C (off: a Python poll source)

    def __init__(self, config: UserNetConfig | None = None, *, net: str = DEFAULT_NET, forwards: Iterable = (),
                 restrict: bool = False, mtu: int = USER_NET_MTU, ipv6: bool = True, dns: bool = True):
        self.network = _config(config, net, forwards, restrict, mtu)
        self.libslirp = slirp_ffi.load()
        self.version = self.libslirp.version
        self.config_version = self.libslirp.config_version
        self._lib = self.libslirp.lib
        self.host_addr, self.dhcp_start, self.dns_addr = guest_addresses(self.network.net)
        self.restrict = self.network.restrict
        self.forwards = [fwd if fwd.guest_ip else replace(fwd, guest_ip=self.dhcp_start)
                         for fwd in self.network.forwards]
        self._deliver: Deliver | None = None
        self._held: deque[bytes] = deque()
        self.dropped = 0               # frames for the guest thrown away (queue full / not connected)
        self._inbox: deque[bytes] = deque()
        self._busy = False
        self._io = None
        self._poll_fds: list[int] = []
        self._poll_pairs: list[tuple[int, int]] = []
        self._revents: dict[int, int] = {}
        self._timeout = ffi.new("uint32_t *")
        # The last fill's answer stays true until libslirp is called again or its time-out passes: loop turns that
        # only served other fds (a disk notification) skip the two calls and their per-fd callbacks
        self._changed = True
        self._deadline = 0.0
        self.slirp_polls = 0           # fill and poll calls into libslirp made (for the tests)
        self._timers: dict[int, _Timer] = {}
        self._timer_keys = itertools.count(1)
        self._guest_errors: set[str] = set()
        self._slirp = ffi.NULL
        self._link = native_ffi.new("struct ckvm_netlink *")   # unarmed: every frame goes to _cb_send_packet
        self._link.fallback = _FALLBACK_SEND
        self.hook = native_ffi.new("struct ckvm_slirp_hook *")   # for the I/O thread's wait in C (attach)
        self.source = None                                       # the Python poll source, when polled that way
        self._section = contextlib.nullcontext()                # a natively connected device's (connect_native)
        self._opaque = ffi.cast("void *", address(self._link))
        _LIVE[self._opaque] = self
        try:
            self._create(ipv6, dns)
            for fwd in self.forwards:
                self._add_forward(fwd)
        except BaseException:
            self._destroy()
            raise

    # --- setup ------------------------------------------------------------------------------------------------
    def _create(self, ipv6: bool, dns: bool) -> None:
        version = self.config_version
        cb = ffi.new("SlirpCb *")
        cb.send_packet = _LINK_SEND
        cb.guest_error = _cb_guest_error
        cb.clock_get_ns = _CLOCK_NS
        cb.timer_new = _cb_timer_new
        cb.timer_free = _cb_timer_free
        cb.timer_mod = _cb_timer_mod
        cb.register_poll_fd = _POLL_FD
        cb.unregister_poll_fd = _POLL_FD
        cb.notify = _NOTIFY
        if version >= 4:
            cb.init_completed = _cb_init_completed
            cb.timer_new_opaque = _cb_timer_new_opaque
        cfg = ffi.new("SlirpConfig *")
        cfg.version = version
        cfg.restricted = 1 if self.restrict else 0
        cfg.in_enabled = True
        cfg.if_mtu = cfg.if_mru = self.network.mtu   # frames either way up to the MTU (config.USER_NET_MTU)
        network = ipaddress.IPv4Network(self.network.net)
        cfg.vnetwork.s_addr = _in_addr(network.network_address)
        cfg.vnetmask.s_addr = _in_addr(network.netmask)
        cfg.vhost.s_addr = _in_addr(self.host_addr)
        cfg.vdhcp_start.s_addr = _in_addr(self.dhcp_start)
        cfg.vnameserver.s_addr = _in_addr(self.dns_addr)
        cfg.in6_enabled = ipv6
        prefix = ipaddress.IPv6Address(IPV6_PREFIX)
        _set_in6(cfg, "vprefix_addr6", str(prefix))
        cfg.vprefix_len = IPV6_PREFIX_LEN
        _set_in6(cfg, "vhost6", str(prefix + 2))
        _set_in6(cfg, "vnameserver6", str(prefix + 3))
        if version >= 3:
            cfg.disable_dns = not dns
        self._cb, self._cfg = cb, cfg     # libslirp keeps the SlirpCb pointer: alive until slirp_cleanup
        self._slirp = self._lib.slirp_new(cfg, cb, self._opaque)
        if self._slirp == ffi.NULL:
            raise CloudkvmError(f"libslirp {self.version} refused the user network {self.network.net}",
                                "check network.net in the profile")
        self._link.input = native_ffi.cast("void(*)(void *, const uint8_t *, int)",
                                           address(self._lib.slirp_input, ffi))
        self._link.slirp = native_ffi.cast("void *", address(self._slirp, ffi))
        hook = self.hook
        hook.slirp, hook.link = self._link.slirp, self._link
        hook.fill = native_ffi.cast(native_ffi.typeof(hook.fill), address(self._lib.slirp_pollfds_fill, ffi))
        hook.poll = native_ffi.cast(native_ffi.typeof(hook.poll), address(self._lib.slirp_pollfds_poll, ffi))

    def _add_forward(self, fwd: HostForward) -> None:
        check_port_free(fwd)
        host, guest = ffi.new("struct in_addr *"), ffi.new("struct in_addr *")
        host.s_addr, guest.s_addr = _in_addr(fwd.host_ip), _in_addr(fwd.guest_ip)
        ffi.errno = 0
        if self._lib.slirp_add_hostfwd(self._slirp, int(fwd.proto == "udp"), host[0], fwd.host_port,
                                       guest[0], fwd.guest_port) < 0:
            raise _forward_error(fwd, ffi.errno)

    # --- NetBackend ---------------------------------------------------------------------------------------------
    def connect(self, deliver: Deliver) -> None:
        self._deliver = deliver

    def connect_native(self, section):
        """The frame path in C (module docstring): returns the `struct ckvm_netlink` libslirp calls with, for the
        device to arm; `section` (a context manager) wraps every call into libslirp from now on."""
        self._section = section
        return self._link

    def send_native(self, run):
        """`run()` — C that calls the link's slirp_input itself (kvm/virtio_net.c ckvm_net_tx) — as a call into
        libslirp, inside the section; returns what it returns. None (and `run` is not called) when libslirp is
        busy, frames sent meanwhile wait, or the caller is not the I/O thread: the caller sends through `send`
        then, behind them."""
        if self._slirp == ffi.NULL or self._busy or self._inbox or self._foreign_thread():
            return None
        self._changed = True
        self._busy = True
        try:
            with self._section:
                return run()
        finally:
            self._busy = False
            if self._inbox:
                self._drain_inbox()

    def attach(self, io) -> None:
        """Serve libslirp's sockets and timers on `io` (an `IoThread`)."""
        if self._slirp == ffi.NULL:
            raise RuntimeError("the slirp backend is closed")
        self._io = io
        if self.poll_in_c:
            io.add_slirp(self)
        else:
            self.source = io.add_poll_source(self.fill, self.dispatch)
        for timer in self._timers.values():
            self._schedule(timer)

    def before_wait(self) -> None:
        """The I/O thread waits in C (kvm/ioloop.c): libslirp is C's until `after_wait` (we count as inside it:
        frames sent meanwhile are queued, and C goes back to Python for them)."""
        if self._inbox:
            self._drain_inbox()
        self._busy = True
        self._link.back_to_python = 0
        self._link.tx_open = 1

    def after_wait(self) -> None:
        self._link.tx_open = 0
        self._busy = False
        if self._inbox:
            self._drain_inbox()
        if self._link.back_to_python:
            # C left Python work: frames it placed for a transport without an irqfd, whose interrupt the device's
            # section decides on leaving (net.py _disarm_link)
            with self._section:
                pass

    def send(self, frame: bytes) -> None:
        """A frame from the guest. libslirp is used from the I/O thread only: a frame sent from another thread (a
        vCPU's QueueNotify write that no ioeventfd caught) is passed to it."""
        if self._slirp == ffi.NULL:
            return
        if self._foreign_thread():
            frame = bytes(frame)
            self._io.call_soon(lambda: self.send(frame))
            return
        self._inbox.append(frame)
        if not self._busy:
            self._drain_inbox()
        else:
            self._link.back_to_python = 1   # C, waiting, goes back to Python, which feeds it in

    def rx_ready(self) -> None:
        if self._foreign_thread():
            self._io.call_soon(self._flush_held)
            return
        self._flush_held()

    def _foreign_thread(self) -> bool:
        """Attached, and called from a thread other than the I/O thread (which alone calls into libslirp)."""
        io = self._io
        return io is not None and io.running and not io.in_thread()

    @property
    def pending(self) -> int:
        """Frames for the guest kept because `deliver` refused them (at most QUEUE_LIMIT)."""
        return len(self._held)

    def close(self) -> None:
        """Stop the forwards and free libslirp (waits for the I/O thread when called from another thread)."""
        if self._slirp == ffi.NULL and self._opaque not in _LIVE:
            return
        io = self._io
        if io is not None and io.running and not io.in_thread():
            io.run_sync(self._destroy)
        else:
            self._destroy()

    def __enter__(self) -> "SlirpBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._slirp == ffi.NULL else "open"
        return f"<SlirpBackend {self.network.net} {[f.spec() for f in self.forwards]} {state}>"

    # --- inside ---------------------------------------------------------------------------------------------------
    def connection_info(self) -> str:
        """libslirp's table of connections (for debugging; call on the I/O thread)."""
        if self._slirp == ffi.NULL:
            return ""
        text = self._lib.slirp_connection_info(self._slirp)
        try:
            return ffi.string(text).decode("utf-8", "replace")
        finally:
            self._lib.free(text)

    def _destroy(self) -> None:
        if self._io is not None:
            self._io.remove_slirp(self)
        slirp, self._slirp = self._slirp, ffi.NULL
        self._link.input, self._link.slirp = native_ffi.NULL, native_ffi.NULL
        self._link.tx_open = 0
        self.hook.slirp = native_ffi.NULL
        if slirp != ffi.NULL:
            self._lib.slirp_cleanup(slirp)   # closes its sockets; frees its timers through our callbacks
        for timer in self._timers.values():
            if timer.handle is not None:
                timer.handle.cancel()
        self._timers.clear()
        self._held.clear()
        self._link.held = 0
        self._inbox.clear()
        _LIVE.pop(self._opaque, None)

    def _enter(self, fn, *args):
        """Call into libslirp; frames the guest sent meanwhile (from our callbacks) go in afterwards."""
        self._changed = True
        if self._busy:
            return fn(*args)
        self._busy = True
        try:
            with self._section:
                return fn(*args)
        finally:
            self._busy = False
            if self._inbox:
                self._drain_inbox()

    def _drain_inbox(self) -> None:
        self._changed = True
        self._busy = True
        try:
            with self._section:
                inbox, slirp_input = self._inbox, self._lib.slirp_input
                while inbox and self._slirp != ffi.NULL:
                    frame = inbox.popleft()
                    if type(frame) is not bytes:
                        frame = ffi.from_buffer("char[]", frame)
                    slirp_input(self._slirp, frame, len(frame))
        finally:
            self._busy = False

    def _output(self, frame: bytes) -> None:
        if self._deliver is None:
            self.dropped += 1
            return
        if self._held:
            self._flush_held()
            if self._held:
                if len(self._held) < QUEUE_LIMIT:
                    self._held.append(frame)
                else:
                    self.dropped += 1
                return
        if not self._deliver(frame):
            self._held.append(frame)
            self._link.held = 1     # C places nothing ahead of a kept frame

    def _flush_held(self) -> None:
        held, deliver = self._held, self._deliver
        while held and deliver is not None:
            if not deliver(held[0]):
                return
            held.popleft()
        self._link.held = len(held)

    # the Python poll source (poll_in_c off, or a second backend on one I/O thread)
    def fill(self):
        if self._slirp == ffi.NULL:
            return (), None
        now = time.monotonic()
        if not self._changed and now < self._deadline:  # nothing happened to libslirp since it last said
            return self._poll_pairs, None if self._deadline == math.inf else self._deadline - now
        self._poll_fds = []
        self._poll_pairs = []
        self._timeout[0] = _UINT32_MAX
        self.slirp_polls += 1
        self._enter(self._lib.slirp_pollfds_fill, self._slirp, self._timeout, _cb_add_poll, self._opaque)
        self._changed = False
        timeout = self._timeout[0]
        self._deadline = math.inf if timeout == _UINT32_MAX else now + timeout / 1000.0
        return self._poll_pairs, None if timeout == _UINT32_MAX else timeout / 1000.0

    def dispatch(self, revents: dict[int, int]) -> None:
        """After a wait: libslirp's poll when one of its fds fired, something called into it, or its time-out
        (its TCP timers run from this poll) has passed; otherwise nothing can have changed for it."""
        if self._slirp == ffi.NULL:
            return
        if not revents and not self._changed and time.monotonic() < self._deadline:
            return
        self._revents = revents
        self.slirp_polls += 1
        self._enter(self._lib.slirp_pollfds_poll, self._slirp, 0, _cb_get_revents, self._opaque)

    # timers (libslirp's clock is time.monotonic_ns; expiry times are in its milliseconds)
    def _timer_new(self, cb, timer_id, cb_opaque):
        key = next(self._timer_keys)
        self._timers[key] = _Timer(cb, timer_id, cb_opaque)
        return ffi.cast("void *", key)

    def _timer_free(self, key: int) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None and timer.handle is not None:
            timer.handle.cancel()

    def _timer_mod(self, key: int, expire_ms: int) -> None:
        timer = self._timers.get(key)
        if timer is None:
            return
        timer.expire_ms = expire_ms
        self._schedule(timer)

    def _schedule(self, timer: _Timer) -> None:
        if timer.handle is not None:
            timer.handle.cancel()
            timer.handle = None
        if self._io is None or timer.expire_ms is None:
            return  # armed when the backend is attached
        delay = (timer.expire_ms * 1_000_000 - time.monotonic_ns()) / 1e9
        timer.handle = self._io.call_later(delay, lambda: self._fire(timer))

    def _fire(self, timer: _Timer) -> None:
        if self._slirp == ffi.NULL or timer not in self._timers.values():
            return
        timer.handle = None
        timer.expire_ms = None
        if timer.timer_id is not None:
            self._enter(self._lib.slirp_handle_timer, self._slirp, timer.timer_id, timer.cb_opaque)
        else:
            self._enter(timer.cb, timer.cb_opaque)
