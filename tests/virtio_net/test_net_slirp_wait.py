"""libslirp behind a VirtioNet, its sockets polled in the I/O thread's wait in C (kvm/ioloop.c), for a transport
without an irqfd: C places libslirp's frames in the receive queue but cannot raise their interrupt, so it sends the
wait back to Python (`back_to_python`), where the device's section decides it (net.py _disarm_link)."""
import socket
import time

import pytest

from cloudkvm.errors import CloudkvmError
from cloudkvm.iothread import IoThread
from cloudkvm.net import slirp_ffi
from net_rig import NetRig

try:
    slirp_ffi.load()
except CloudkvmError as exc:  # pragma: no cover - depends on the host
    pytest.skip(f"libslirp unavailable: {exc}", allow_module_level=True)

from cloudkvm.net.slirp import SlirpBackend  # noqa: E402

ETH_P_ARP = 0x0806


def test_a_frame_libslirp_sends_during_the_wait_in_c_is_interrupted_for_by_python(memory):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = SlirpBackend(forwards=[f"tcp:127.0.0.1:{port}-:22"])
    assert backend.poll_in_c
    rig = NetRig(memory, backend)                  # no irqfd: C cannot raise the interrupt itself
    posted = rig.post_rx(2048, count=8)
    io = IoThread(name="net-wait-test")
    backend.attach(io)
    io.start()
    try:
        irqs = rig.irqs
        # a host connection to the forward: libslirp asks who has the guest's address (an ARP request) first
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            deadline = time.monotonic() + 5
            while rig.irqs == irqs and time.monotonic() < deadline:
                time.sleep(0.01)
        assert rig.irqs > irqs
        frames = [frame for _, frame in rig.received(posted)]
        assert frames and int.from_bytes(frames[0][12:14], "big") == ETH_P_ARP
        assert rig.device.rx_frames_by_link >= 1   # placed by C through the link, in the wait
        assert io.run_sync(lambda: io.native.slirp_calls) > 0
    finally:
        io.stop()
        backend.close()
