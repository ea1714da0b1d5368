"""Constants shared by the profile tests (imported by name; pytest puts this folder on sys.path)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ROOT / "profiles"
BROKEN = Path(__file__).resolve().parent / "broken"

# The QEMU command line from /work/shared/seeds/qemu-kvm-notes.txt, exactly as `ps -elf` printed it (ps drops
# the quotes that kept the -append value one argument).
SEED_COMMAND = ("qemu-system-aarch64 -name vm2 -daemonize -enable-kvm -M virt -cpu host -smp 2 -m 4096 "
                "-global virtio-blk-device.scsi=off -device virtio-scsi-device,id=scsi -kernel vmlinuz-4.18 "
                "--append console=ttyAMA0 root=UUID=6a09973e-e8fd-4a6d-a8c0-1deb9556f477 -initrd initramfs-4.18 "
                "-drive file=vhuser-test1.qcow2 -netdev user,id=unet,hostfwd=tcp:127.0.0.1:1122-:22 "
                "-device virtio-net-device,netdev=unet -vnc :10")
