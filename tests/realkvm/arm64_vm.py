"""The vm2-like guest of the arm64 real-KVM tests: Debian's arm64 cloud kernel, a busybox initramfs that loads
virtio_mmio/virtio_blk/virtio_net from that kernel, mounts an ext4 qcow2 disk and prints its marker file, brings
up eth0 on slirp's 10.0.2.0/24 and answers TCP on port 22 with a fixed line (busybox nc), and a qcow2 disk made
the way images are made (mkfs.ext4 -d, qemu-img convert). The init ends in an interactive shell on the console."""
import shutil
import subprocess
from pathlib import Path

from cloudkvm.guests.debian import INIT_PRELUDE, LOAD_MODULES, build_busybox_initramfs, fetch_debian_kernel

MODULES = ("virtio_mmio", "virtio_blk", "virtio_net", "virtio_rng")
DISK_MARKER = "cloudkvm-arm64-disk-marker 5f1c"
RESPONDER_LINE = "SSH-2.0-cloudkvm-arm64-responder"
READY = "cloudkvm-guest: responder up"

INIT = INIT_PRELUDE + f"""busybox --install -s /bin
{LOAD_MODULES}
echo "cpus online: $(cat /sys/devices/system/cpu/online)"
echo "rng: $(cat /sys/class/misc/hw_random/rng_current)"
mkdir -p /mnt
if mount -t ext4 -o ro /dev/vda /mnt; then echo "disk marker: $(cat /mnt/marker.txt)"; else echo "no disk"; fi
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
printf '#!/bin/sh\\necho {RESPONDER_LINE}\\n' > /bin/responder
chmod +x /bin/responder
nc -ll -p 22 -e /bin/responder &
echo "{READY}"
exec sh -i
"""


KEY_READY = "cloudkvm-guest: waiting for the power key"
KEY_PRESSED = "cloudkvm-guest: power key pressed, powering off"
# Debian's generic arm64 kernel: its gpio_keys module binds the DTB's gpio-keys node (the cloud kernel has none)
KEY_MODULES = ("gpio_keys", "evdev")
KEY_INIT = INIT_PRELUDE + f"""busybox --install -s /bin
{LOAD_MODULES}
n=0
while [ ! -e /dev/input/event0 ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
ls -l /dev/input
echo "{KEY_READY}"
dd if=/dev/input/event0 of=/dev/null bs=24 count=1 2>/dev/null
echo "{KEY_PRESSED}"
poweroff -f
"""


def power_key_guest(cache: Path | None = None) -> tuple[Path, Path]:
    """(kernel, initramfs): Debian's generic arm64 kernel and an init that powers off on the first input event."""
    return (fetch_debian_kernel(cache, "arm64", generic=True),
            build_busybox_initramfs(cache, KEY_INIT, "arm64", KEY_MODULES, generic=True))


def guest(cache: Path | None = None) -> tuple[Path, Path]:
    """(kernel, initramfs), built from Debian's arm64 packages and cached."""
    return fetch_debian_kernel(cache, "arm64"), build_busybox_initramfs(cache, INIT, "arm64", MODULES)


def marker_disk(folder: Path) -> Path:
    """A 64 MiB ext4 file system holding marker.txt, as a compressed qcow2 image."""
    tree = folder / "tree"
    tree.mkdir()
    (tree / "marker.txt").write_text(DISK_MARKER + "\n")
    raw, image = folder / "disk.raw", folder / "disk.qcow2"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(raw), "64M"], check=True)
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(raw), str(image)], check=True)
    raw.unlink()
    shutil.rmtree(tree)
    return image
