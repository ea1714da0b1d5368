"""The test cloud image (tests/testhosts/cloudimage.py) under cloudkvm, the way a user runs a cloud image: a profile
naming it by an http:// URL and its digest, `cloudkvm up --wait ssh`, `cloudkvm ssh NAME -- CHECK`, `cloudkvm down`.

Run as a script inside the x86_64 or arm64 test host (by tests/realkvm/test_cloud_image.py and `bench/boot_time
--testhost`): it serves the image from a local HTTP server, points cloudkvm's cache and state at the test host's
tmpfs, and writes `run.json` (each command's status, output and time, the base's digest afterwards) and the
guest's console log to `--out`. The seed, the overlay and the ssh key are cloudkvm's own; the clock starts just
before `cloudkvm up`, as `cloud_qemu.py`'s starts just before QEMU.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the HTTP server
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cloud_qemu import BOOT_ANALYSIS, SSH_WAIT_THEN_CHECK, USER, ensure_loopback, free_port  # noqa: E402
from images.httpserver import HttpServer  # noqa: E402

NAME = "cloudimg"
MEMORY, CPUS, DISK = "1G", 1, "4G"


def profile_text(url: str, digest: str, ssh_port: int, arch: str = "x86_64") -> str:
    return f"""name: {NAME}
arch: {arch}
cpus: {CPUS}
memory: {MEMORY}
images:
  - location: {url}
    arch: {arch}
    digest: {digest}
disk: {DISK}
boot:
  from_image: true
cloud_init:
  user: {USER}
  hostname: cloudimg
network:
  mode: user
  forwards:
    - tcp:127.0.0.1:{ssh_port}-:22
"""


def cloudkvm(*args: str, timeout: float) -> dict:
    """One `cloudkvm` command: its status, output and seconds."""
    start = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "cloudkvm", *args], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        status, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        status, out, err = None, str(exc.stdout or ""), f"timed out after {timeout} s"
    return {"status": status, "stdout": out, "stderr": err, "seconds": round(time.monotonic() - start, 1)}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, required=True, help="the compressed qcow2 to serve")
    parser.add_argument("--digest", required=True, help="sha256:HEX of the image, computed outside")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cloudkvm-cloud"))
    parser.add_argument("--arch", default="x86_64", choices=("x86_64", "aarch64"), help="the VM's (the host's)")
    parser.add_argument("--ssh-timeout", type=float, default=900)
    parser.add_argument("--prepull", action="store_true",
                        help="pull the image into the cache first (`cloudkvm image pull`), so that `up` is timed "
                             "without the download, as QEMU's boot is (bench/boot_time --testhost)")
    args = parser.parse_args()

    ensure_loopback()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    os.environ.update({"CLOUDKVM_CACHE": str(args.work / "cache"), "CLOUDKVM_STATE_DIR": str(args.work / "state"),
                       "HOME": str(args.work / "home")})
    result: dict = {}
    with HttpServer(args.image.parent) as server:
        profile = args.work / "cloud.yaml"
        profile.write_text(profile_text(server.url(args.image.name), args.digest, free_port(), args.arch))
        if args.prepull:
            result["pull"] = cloudkvm("image", "pull", server.url(args.image.name), "--digest", args.digest,
                                      timeout=900)
        result["up"] = cloudkvm("up", "--wait", "ssh", "--ssh-timeout", str(args.ssh_timeout), str(profile),
                                timeout=args.ssh_timeout + 300)
        result["requests"] = len(server.requests)
    if result["up"]["status"] == 0:
        result["ssh"] = cloudkvm("ssh", NAME, "--", SSH_WAIT_THEN_CHECK, timeout=600)
        result["analysis"] = cloudkvm("ssh", NAME, "--", BOOT_ANALYSIS, timeout=120)
        result["status_before_down"] = cloudkvm("status", "--json", NAME, timeout=60)
        result["down"] = cloudkvm("down", NAME, "--timeout", "180", timeout=300)
        result["status"] = cloudkvm("status", "--json", NAME, timeout=60)
    cached = [p for p in (args.work / "cache" / "images").glob("*.qcow2")]
    result["cached_digests"] = [f"sha256:{sha256(p)}" for p in cached]
    instance = args.work / "state" / NAME
    for name in ("console.log", "vmm.log", "instance.json", "result.json"):
        if (instance / name).is_file():
            shutil.copyfile(instance / name, args.out / name)
    (args.out / "run.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
