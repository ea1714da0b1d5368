"""The backing-file policy (issue 11, serious 1): an image's backing chain may only name files inside its own
folder unless trusted; FIFOs, sockets and character devices are never images; block devices only when trusted.
Every refusal is a one-line error, found without blocking, and `backing_chain` (validate/show) agrees with opening."""
import os
import subprocess
import time

import pytest

from cloudkvm.errors import CloudkvmError
from cloudkvm.storage import BackingPolicy, open_disk
from cloudkvm.storage.chain import backing_chain


def qcow2_on(path, backing: str, fmt: str | None = "raw"):
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing] + (["-F", fmt] if fmt else []) + \
        [str(path), "1M"]
    subprocess.run(args, check=True)
    return path


def refused(path, match, policy=BackingPolicy()):
    started = time.monotonic()
    for attempt in (lambda: open_disk(path, read_only=True, policy=policy).close(),
                    lambda: backing_chain(path, None, policy)):
        with pytest.raises(CloudkvmError, match=match) as e:
            attempt()
        assert "\n" not in e.value.message and e.value.hint
    assert time.monotonic() - started < 5
    return e.value


@pytest.fixture
def folders(tmp_path):
    (tmp_path / "vm").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "host.raw").write_bytes(b"HOST" * 256)
    (tmp_path / "vm" / "base.raw").write_bytes(b"BASE" * 256)
    return tmp_path / "vm", tmp_path / "elsewhere"


def test_relative_names_inside_the_folder_are_followed(folders):
    vm, _ = folders
    (vm / "sub").mkdir()
    os.rename(vm / "base.raw", vm / "sub" / "base.raw")
    top = qcow2_on(vm / "top.qcow2", "sub/base.raw")
    with open_disk(top, read_only=True) as disk:
        assert disk.pread(4, 0) == b"BASE"
    assert [(os.path.basename(link.path), link.format) for link in backing_chain(top)] == \
        [("top.qcow2", "qcow2"), ("base.raw", "raw")]


def test_an_absolute_backing_name_is_refused_unless_trusted(folders):
    vm, elsewhere = folders
    top = qcow2_on(vm / "top.qcow2", str(elsewhere / "host.raw"))
    error = refused(top, "is an absolute path")
    assert "trust_backing" in error.hint
    with open_disk(top, read_only=True, policy=BackingPolicy(trusted=True)) as disk:
        assert disk.pread(4, 0) == b"HOST"


def test_a_name_the_user_gave_is_allowed_by_absolute_path(folders):
    vm, elsewhere = folders
    top = qcow2_on(vm / "top.qcow2", str(elsewhere / "host.raw"))
    allowed = BackingPolicy(allowed=frozenset({str(elsewhere / "host.raw")}))
    with open_disk(top, read_only=True, policy=allowed) as disk:
        assert disk.pread(4, 0) == b"HOST"


@pytest.mark.parametrize("name", ["../elsewhere/host.raw", "sub/../../elsewhere/host.raw", "link.raw"])
def test_names_that_leave_the_folder_are_refused(folders, name):
    vm, elsewhere = folders
    (vm / "sub").mkdir()
    (vm / "link.raw").symlink_to(elsewhere / "host.raw")
    refused(qcow2_on(vm / "top.qcow2", name), "outside the image's folder")


def test_a_fifo_is_never_an_image_and_never_blocks(folders):
    vm, _ = folders
    os.mkfifo(vm / "pipe")
    refused(qcow2_on(vm / "top.qcow2", "pipe"), "is a FIFO")
    refused(qcow2_on(vm / "top2.qcow2", str(vm / "pipe")), "is a FIFO", BackingPolicy(trusted=True))
    with pytest.raises(CloudkvmError, match="is a FIFO"):
        open_disk(vm / "pipe", format="raw")


def test_a_character_device_is_never_an_image(folders):
    vm, _ = folders
    refused(qcow2_on(vm / "top.qcow2", "/dev/zero"), "is a character device", BackingPolicy(trusted=True))
    refused(vm / "top.qcow2", "is an absolute path")


def test_a_block_device_as_backing_needs_trust(folders):
    """A block device node inside the image's folder passes the name checks, so only its kind can refuse it."""
    import stat

    vm, _ = folders
    try:
        os.mknod(vm / "dev", stat.S_IFBLK | 0o600, os.makedev(7, 0))  # loop0's numbers; never opened if refused
    except OSError as err:
        pytest.skip(f"cannot make a block device node here: {err}")
    top = qcow2_on(vm / "top.qcow2", "dev")
    refused(top, "a block device as a backing file|device without a driver")
