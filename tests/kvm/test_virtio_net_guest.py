"""User networking end to end through the real virtio-net device: a purpose-built guest driver ARPs for the
slirp gateway, answers ARP, and echoes UDP datagrams a host program sends through a 127.0.0.1 forward; the frames
take the C path between libslirp and the queues."""
import socket
import threading

import pytest

from cloudkvm.devices.virtio.net import VirtioNet, mac_for
from cloudkvm.kvm.native import lib
from cloudkvm.machine import FlatBinary, Machine, MachineSpec

slirp = pytest.importorskip("cloudkvm.net.slirp")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_udp_echo_through_a_forward_and_the_virtio_net_device(guest_binary):
    port = free_udp_port()
    backend = slirp.SlirpBackend(forwards=[f"udp:127.0.0.1:{port}-:7"])
    net = VirtioNet(backend, mac_for("echo-vm"))
    replies = []
    with Machine(MachineSpec(payload=FlatBinary(guest_binary("virtio_net")), virtio=[net])) as machine:
        backend.attach(machine.io)

        def host_side():
            if not machine.console.wait_for(b"virtio_net: ready", 60):
                return
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(20)
                for payload in (b"hello cloudkvm", b"quit now"):
                    s.sendto(payload, ("127.0.0.1", port))
                    try:
                        replies.append(s.recvfrom(2048)[0])
                    except OSError:
                        replies.append(None)
        threading.Thread(target=host_side, daemon=True).start()
        result = machine.run(timeout=90)
        console = machine.console.text()
        tx_served = [nq.served for nq in machine.notifier.queues if nq.kind == lib.CKVM_SERVE_NET_TX]
        slirp_in_c = machine.io.native.slirp_calls
    assert result.reason == "poweroff", (result, console)
    assert "virtio_net: mac 02:" in console  # our locally administered MAC reached the guest's config space
    assert "virtio_net: gateway 10.0.2.2 is at 52:55:0a:00:02:02" in console  # libslirp's gateway MAC
    assert replies == [b"hello cloudkvm", b"quit now"]
    assert "virtio_net: echo hello cloudkvm" in console
    assert int(console.split("virtio_net: interrupts ")[1].split()[0]) >= 1
    # every frame went between libslirp and the queues in C (kvm/virtio_net.c: the guest's chains are all plain)
    assert net.rx_frames_by_link == net.stats["rx_frames"] >= 3
    assert net.tx_frames_in_c == net.stats["tx_frames"] >= 3
    # the transmit notifications were served in the I/O thread's wait in C, where libslirp's sockets were polled
    assert tx_served and tx_served[0] >= 1
    assert slirp_in_c >= 2
