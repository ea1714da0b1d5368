"""What a network device model and a network backend (libslirp user networking, a test peer) say to each other.

Frames are whole Ethernet frames without the virtio-net header, with complete checksums in both directions.
Everything happens on the machine's I/O thread: the device calls `backend.send(frame)` when the guest
transmits; the backend calls `deliver(frame)` (set by the device with `backend.connect(deliver)`) when a frame
is for the guest. `deliver` returns False when the guest has no receive buffer posted; the backend then keeps
(a bounded number of) frames and retries when the device calls `backend.rx_ready()`.

Optionally a backend offers the frame path in C (devices/virtio/net.py, kvm/virtio_net.c): `connect_native(section)`
returns a `struct ckvm_netlink` whose send function (`ckvm_net_link_send`) the backend calls with each frame for
the guest, inside `section`; and `send_native(run)` runs the device's C transmit path, which hands frames to the
link's `input`. net/slirp.py does this with libslirp's own callbacks; `PythonFramePath` does it for a backend
written in Python (tests, the fuzzer)."""
from typing import Callable, Protocol

from ..kvm.native import ffi, lib

Deliver = Callable[[bytes], bool]


class NetBackend(Protocol):
    def connect(self, deliver: Deliver) -> None:
        """Where frames for the guest go (called once by the device before the VM starts)."""

    def send(self, frame: bytes) -> None:
        """A frame the guest transmitted."""

    def rx_ready(self) -> None:
        """The guest posted receive buffers: retry frames `deliver` refused."""

    def attach(self, io) -> None:
        """Register fds and timers on the machine's I/O thread (`cloudkvm.iothread.IoThread`)."""

    def close(self) -> None:
        """Release sockets and forwards."""


class PythonFramePath:
    """The C frame path's contract for a backend written in Python: `emit(frame)` hands a frame for the guest to
    C inside the device's section, as libslirp does; C calls `_for_guest(frame)` with each frame it did not place
    (the backend's Python delivery) and `_from_guest(frame)` with each frame the guest transmitted. The backend
    keeps `link.held` equal to the frames it keeps (`_held_changed`)."""

    def __init__(self):
        self.section = None
        self.link = ffi.new("struct ckvm_netlink *")
        self._callbacks = (ffi.callback(ffi.typeof(self.link.fallback), self._c_fallback),
                           ffi.callback(ffi.typeof(self.link.input), self._c_input))
        self.link.fallback, self.link.input = self._callbacks
        self.link.tx_open = 1       # `input` may be called whenever the device serves its transmit queue

    def connect_native(self, section):
        self.section = section
        return self.link

    def send_native(self, run):
        with self.section:
            return run()

    def emit(self, frame: bytes) -> None:
        with self.section:
            lib.ckvm_net_link_send(ffi.from_buffer(frame), len(frame), self.link)

    def _held_changed(self, held: int) -> None:
        self.link.held = held

    def _c_fallback(self, buf, length, opaque) -> int:
        self._for_guest(bytes(ffi.buffer(buf, length)))
        return length

    def _c_input(self, slirp, pkt, length) -> None:
        self._from_guest(bytes(ffi.buffer(pkt, length)))

    def _for_guest(self, frame: bytes) -> None:
        raise NotImplementedError

    def _from_guest(self, frame: bytes) -> None:
        raise NotImplementedError
