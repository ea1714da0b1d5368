"""What a network device model and a network backend (libslirp user networking, a test peer) say to each other.

Frames are whole Ethernet frames without the virtio-net header, with complete checksums in both directions.
Everything happens on the machine's I/O thread: the device calls `backend.send(frame)` when the guest
transmits; the backend calls `deliver(frame)` (set by the device with `backend.connect(deliver)`) when a frame
is for the guest. `deliver` returns False when the guest has no receive buffer posted; the backend then keeps
(a bounded number of) frames and retries when the device calls `backend.rx_ready()`."""
from typing import Callable, Protocol

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
