"""Structure oracle: QEMU TCG's `-M virt` boots Debian's arm64 cloud kernel on OUR device tree (`-dtb`), so the
tree must describe QEMU's machine: GIC, timer, PSCI (both vCPUs come up), PL011 console, and a virtio-mmio
slot whose virtio-blk disk the initramfs reads. Without -append QEMU keeps our /chosen/bootargs."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from cloudkvm.boards.virt.dtb import VirtDtbConfig, fresh_seeds, write_virt_dtb
from cloudkvm.guests import debian
from dtc_oracle import fdtget, need_dtc

INIT = debian.INIT_PRELUDE + f"""{debian.LOAD_MODULES}
echo "oracle: cmdline=$(cat /proc/cmdline)"
echo "oracle: online=$(cat /sys/devices/system/cpu/online)"
n=0; while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
echo "oracle: vda=$(readlink /sys/block/vda)"
echo "oracle: disk=$(head -c 48 /dev/vda)"
poweroff -f
"""
CMDLINE = "console=ttyAMA0 panic=-1 cloudkvm.oracle=ours"


@pytest.mark.timeout(900)  # the first run downloads the kernel and busybox; the boot itself takes seconds
def test_qemu_boots_debian_arm64_on_our_dtb_and_reads_the_disk_it_describes(tmp_path):
    need_dtc()
    qemu = shutil.which("qemu-system-aarch64")
    if qemu is None:
        pytest.skip("qemu-system-aarch64 is not installed (apt-get install qemu-system-arm)")
    missing = [t for t in ("apt-get", "dpkg-deb", "dpkg") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} missing: the guest is built from Debian packages")
    kernel = debian.fetch_debian_kernel(arch="arm64")
    initramfs = debian.build_busybox_initramfs(init_script=INIT, arch="arm64", modules=("virtio_mmio", "virtio_blk"))

    rng, kaslr = fresh_seeds()
    dtb = write_virt_dtb(VirtDtbConfig(cpus=2, memory_size=1 << 30, rng_seed=rng, kaslr_seed=kaslr,
                                       gic_version=3, cmdline=CMDLINE), tmp_path / "ours.dtb")
    marker = f"cloudkvm-marker-{os.urandom(12).hex()}"
    disk = tmp_path / "disk.img"
    disk.write_bytes(marker.encode().ljust(1 << 20, b"\0"))

    start = time.monotonic()
    proc = subprocess.run(
        [qemu, "-M", "virt,gic-version=3", "-cpu", "cortex-a57", "-smp", "2", "-m", "1024",
         "-dtb", str(dtb), "-kernel", str(kernel), "-initrd", str(initramfs),
         "-drive", f"file={disk},format=raw,if=none,id=d0", "-device", "virtio-blk-device,drive=d0",
         "-nographic", "-no-reboot"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace", timeout=300)
    elapsed = time.monotonic() - start
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert debian.INIT_MARKER in log, log[-3000:]
    facts = dict(re.findall(r"^oracle: (\w+)=(.*?)\r?$", log, re.M))
    print(f"qemu-system-aarch64 TCG: init and disk read, powered off after {elapsed:.1f} s")

    assert facts["cmdline"] == CMDLINE  # our /chosen/bootargs reached the kernel
    assert facts["online"] == "0-1"  # cpu@1 came up through our /psci node
    assert facts["disk"] == marker
    slot = re.search(r"/platform/([0-9a-f]+)\.virtio_mmio/", facts["vda"])
    assert slot, facts["vda"]
    node = f"/virtio_mmio@{slot.group(1)}"
    assert fdtget(dtb, node, "compatible", "s") == "virtio,mmio"  # the disk sits in a slot our tree describes
    assert "Machine model: linux,dummy-virt" in log
    assert "ttyAMA0 at MMIO 0x9000000" in log and "rtc-pl031 9010000.pl031: registered" in log
    assert "PL061 GPIO chip registered" in log or "pl061" in log.lower()
