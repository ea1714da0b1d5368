"""Crash-run VMM: runs the crash guest (crash_guest.c) with IMAGE as its virtio-blk disk, the serial console on
stdout, until the guest powers off or the parent SIGKILLs this process. Usage: vm_crash_child.py IMAGE GUEST_BINARY
CRASHRUN_SABOTAGE=no-flush makes the disk's flush() do nothing (crashrun's self-test: lost data must be caught)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from cloudkvm.devices.virtio.blk import VirtioBlk  # noqa: E402
from cloudkvm.machine import FlatBinary, Machine, MachineSpec  # noqa: E402
from cloudkvm.storage import open_disk  # noqa: E402

MiB = 1 << 20


def main() -> int:
    image, guest = sys.argv[1], sys.argv[2]
    with open_disk(image) as disk:
        if os.environ.get("CRASHRUN_SABOTAGE") == "no-flush":  # the harness's self-test: flushes persist nothing
            disk.flush = lambda: None
        spec = MachineSpec(payload=FlatBinary(guest), cpus=1, memory=64 * MiB, console_fd=sys.stdout.fileno(),
                           virtio=[VirtioBlk(disk)])
        with Machine(spec) as machine:
            result = machine.run(timeout=3600)
    print(f"vm_crash_child: {result.reason} {result.detail or ''}", file=sys.stderr)
    return 0 if result.reason == "poweroff" else 1


if __name__ == "__main__":
    sys.exit(main())
