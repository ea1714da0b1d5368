"""Fuzz the profile loader (cloudkvm/profile.py: YAML 1.1 through PyYAML, pydantic validation) on YAML text.

Input: the bytes of a profile file. It is written as `profiles/profile.yaml` into a private folder that also holds
the files the seeds (profiles/, tests/profiles/broken/) name, each a few bytes: kernels, initrds, disk images,
`base.yaml` (a valid base profile), `_parts/common.yaml`, and `../debian-cloud-x86_64.yaml` (a copy of the
repository's); it is loaded with `load_profile(path, env=ENV, check_files=True)`.

Documented outcome: a `Profile`, or a `CloudkvmError` whose message is one line. Crashes: any other exception, an
empty error message or one (or a hint) that is not one printable line, a hang (libFuzzer's -timeout), and a loaded
profile that does not survive the documented round trip (`profile_to_dict` "loads back to the same profile"
through `validate_profile`).
"""
import atexit
import os
import shutil

from cloudkvm.errors import CloudkvmError
from cloudkvm.profile import load_profile, profile_to_dict, validate_profile

from .oracle import Crash, private_folder

MAX_LEN = 4096
TIMEOUT = 10
INSTRUMENT = ["cloudkvm", "yaml"]
ENV = {"IMAGES": ".", "CLOUDKVM_DEMO_KERNEL": "vmlinuz", "CLOUDKVM_DEMO_INITRD": "initrd.img"}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FILES = ("vmlinuz", "initrd.img", "disk.qcow2", "disk.img", "data.qcow2", "vmlinuz-4.18", "initramfs-4.18",
         "vhuser-test1.qcow2", "_files/vmlinuz", "_files/initrd.img", "_files/disk.qcow2",
         "images/debian-12/vmlinuz", "images/debian-12/initrd.img", "images/debian-12-genericcloud-amd64.qcow2")
BASE_PROFILE = """\
name: base
cpus: 2
memory: 1G
boot:
  kernel: vmlinuz
  cmdline: console=ttyS0
network:
  mode: user
  forwards: [tcp::2200-:22]
"""

_folder: str | None = None


def folder() -> str:
    """The folder the fuzzed profile is written to (made once per process, removed at exit)."""
    global _folder
    if _folder is None:
        top = private_folder("cloudkvm-fuzz-profile-")
        atexit.register(shutil.rmtree, top, True)
        _folder = os.path.join(top, "profiles")
        for where in (top, _folder):
            for name in FILES:
                os.makedirs(os.path.dirname(os.path.join(where, name)), exist_ok=True)
                with open(os.path.join(where, name), "wb") as f:
                    f.write(b"\0" * 512)
        os.makedirs(os.path.join(_folder, "_parts"))
        for name in ("base.yaml", "_parts/common.yaml"):
            with open(os.path.join(_folder, name), "w") as f:
                f.write(BASE_PROFILE)
        shutil.copy(os.path.join(ROOT, "profiles", "debian-cloud-x86_64.yaml"), top)
    return _folder


def _check_error(exc: CloudkvmError) -> None:
    """One printable line (no line break, tab or terminal escape: the CLI prints it to a terminal as it is)."""
    for text in (exc.message, exc.hint):
        if not text.isprintable():
            raise Crash(f"the error message is not one printable line: {text!r}") from exc
    if not exc.message:
        raise Crash("an empty error message") from exc


def one_input(data: bytes) -> str:
    path = os.path.join(folder(), "profile.yaml")
    with open(path, "wb") as f:
        f.write(data)
    try:
        profile = load_profile(path, env=ENV, check_files=True)
    except CloudkvmError as exc:
        _check_error(exc)
        return "refused"
    try:
        again = validate_profile(profile_to_dict(profile), base_dir=folder(), env=ENV, check_files=True)
    except CloudkvmError as exc:
        raise Crash(f"profile_to_dict's output does not load back: {exc}") from exc
    if again != profile:
        raise Crash("profile_to_dict's output loads back as a different profile")
    return "loaded"
