"""A purpose-built guest driver reads and writes a qcow2 disk through virtio-mmio + virtio-blk end to end:
queue notifications through KVM ioeventfds, completions through an irqfd, qemu-img as the oracle."""
import shutil
import subprocess

import pytest

from cloudkvm.devices.virtio.blk import VirtioBlk
from cloudkvm.storage import open_disk
from guest_runner import run_guest

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing (apt-get install qemu-utils)")


def guest_checksum(data: bytes) -> int:
    """The guest's checksum (virtio_blk.c): sum = sum * 31 + byte, 32-bit."""
    total = 0
    for b in data:
        total = (total * 31 + b) & 0xFFFFFFFF
    return total


def test_guest_driver_reads_and_writes_a_qcow2_disk(guest_binary, tmp_path):
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 1M 512", str(image)], check=True, capture_output=True)
    with open_disk(image) as disk:  # closed before qemu-img looks: it honours cloudkvm's QEMU-style image lock
        run = run_guest(guest_binary("virtio_blk"), virtio=[VirtioBlk(disk, serial="cloudkvm-test-disk")])
    assert run.result.reason == "poweroff", (run.result, run.console)
    console = run.console
    assert "virtio_blk: capacity 131072 sectors" in console
    assert "virtio_blk: write+read ok" in console and "virtio_blk: flush ok" in console
    assert f"virtio_blk: sector 2048 checksum 0x{guest_checksum(bytes([0x5A]) * 512):08x}" in console
    assert "virtio_blk: serial cloudkvm-test-disk" in console
    assert "virtio_blk: out-of-range read status 1" in console  # VIRTIO_BLK_S_IOERR, and the device lives on
    interrupts = int(console.split("virtio_blk: interrupts ")[1].split()[0])
    assert interrupts >= 1  # the guest slept in hlt until the irqfd woke it
    # every interrupt's InterruptStatus read and InterruptACK write completed by the C run loop (kvm/fastpath.py)
    assert run.isr_served >= 2 * interrupts
    assert run.notified_in_c >= 1   # the reads and writes were notified to C's thread, served and interrupted there

    check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert check.returncode == 0 and "No errors were found" in check.stdout, check.stdout
    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    content = raw.read_bytes()
    assert content[:4096] == bytes((i * 7 + 3) & 0xFF for i in range(4096))
    assert content[1 << 20:(1 << 20) + 512] == bytes([0x5A]) * 512


def test_a_read_only_disk_refuses_the_guest_write(guest_binary, tmp_path):
    image = tmp_path / "ro.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    run = run_guest(guest_binary("virtio_blk"), virtio=[VirtioBlk(open_disk(image, read_only=True), read_only=True)])
    assert run.result.reason == "poweroff", run.result
    assert "virtio_blk: write+read MISMATCH" in run.console  # the write failed with an error status
    raw = tmp_path / "ro.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    assert raw.read_bytes()[:4096] == bytes(4096)
