"""A real cloud image end to end on each test host's real KVM (x86_64, and arm64 with the virt board), as a user
runs one: a profile naming the image (built by mmdebstrap like the distributions' own,
tests/testhosts/cloudimage.py) by an http:// URL and its sha256,
`boot: {from_image: true}`, `disk: 4G`, user networking with an ssh forward; `cloudkvm up --wait ssh`, then
`cloudkvm ssh NAME -- 'id -un; df -h /; cat /run/cloud-init/result.json'`, then `cloudkvm down`
(tests/realkvm/cloud_cloudkvm.py runs them inside the test host). The oracles are the guest's own answers
(its user, `df`, cloud-init's result.json), `sha256sum` of the image, and the VM's recorded end."""
import json
import shlex
import subprocess
from pathlib import Path

import pytest

from cloud_qemu import USER, read_check
from testhosts.cloudimage import GUEST_ARCH, build_cloud_image
from testhosts.recipes import RECIPES

pytestmark = [pytest.mark.realkvm, pytest.mark.timeout(2400)]
SCRIPT = Path(__file__).resolve().parent / "cloud_cloudkvm.py"
GiB = 1 << 30


@pytest.fixture(scope="module", params=list(RECIPES))
def host(request) -> str:
    """A test host's name (x86_64, arm64); its recipe's Debian architecture is the image's."""
    return request.param


@pytest.fixture(scope="module")
def image(host):
    built = build_cloud_image(RECIPES[host].arch)
    digest = subprocess.run(["sha256sum", built.qcow2], capture_output=True, text=True, check=True).stdout.split()[0]
    return built, f"sha256:{digest}"


@pytest.fixture(scope="module")
def run(testhost, tmp_path_factory, image, host):
    built, digest = image
    out = tmp_path_factory.mktemp(f"cloud-cloudkvm-{host}")
    result = testhost(host).run(
        f"python3 {shlex.quote(str(SCRIPT))} --image {shlex.quote(str(built.qcow2))} --digest {digest} "
        f"--arch {GUEST_ARCH[RECIPES[host].arch]} --out {shlex.quote(str(out))}", writable=(out,), timeout=2400)
    assert result.status == 0, result.describe()
    ran = json.loads((out / "run.json").read_text())
    console = (out / "console.log").read_text(errors="replace") if (out / "console.log").exists() else ""
    return ran, console


def test_up_waits_until_ssh_answers(run):
    ran, console = run
    up = ran["up"]
    assert up["status"] == 0, up["stderr"][-3000:] + console[-3000:]
    assert "ssh answers after" in up["stdout"], up
    assert ran["requests"] >= 1  # the image came from the HTTP server


def test_ssh_logs_in_as_the_cloud_init_user_on_the_grown_disk_and_cloud_init_finished(run):
    ran, console = run
    ssh = ran["ssh"]
    assert ssh["status"] == 0, ssh["stderr"][-2000:] + console[-3000:]
    check = read_check(ssh["stdout"])
    assert check.user == USER
    assert 3.5 * GiB <= check.root_size_bytes <= 4 * GiB, ssh["stdout"]  # p1 and ext4 grown to the 4G overlay
    assert check.cloud_init_errors == [], ssh["stdout"]
    assert "DataSourceNoCloud" in check.datasource  # the seed cloudkvm wrote


def test_the_kernel_came_from_the_image_with_its_root_by_uuid(run, image):
    _, console = run
    built, _ = image
    assert f"Linux version {built.kernel_version}" in console
    assert f"ommand line: {built.cmdline()}" in console   # x86 says "Command line:", arm64 "Kernel command line:"


def test_the_cached_base_is_the_served_image_unchanged(run, image):
    ran, _ = run
    assert ran["cached_digests"] == [image[1]]


def test_down_powers_the_guest_off_gracefully(run):
    ran, console = run
    assert ran["down"]["status"] == 0 and "powered off" in ran["down"]["stdout"], ran["down"]
    status = json.loads(ran["status"]["stdout"])
    assert status["state"] == "stopped" and status["result"]["reason"] == "poweroff", status
    assert "reboot: Power down" in console
