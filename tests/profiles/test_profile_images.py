"""The cloud-image fields of a profile: `images` (arch choice, digests, locations), `disk`, `boot.from_image` and
`cloud_init`, each accepted form and each refusal as a one-line error at its file:line:col."""
import platform

import pytest

from cloudkvm.errors import CloudkvmError
from cloudkvm.preflight import virtio_device_count
from cloudkvm.profile import load_profile

GiB = 1 << 30
SHA256 = "sha256:" + "ab" * 32
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIBi8ZZR9mQTZ6C8YbfbOyUzw9VbBEdTzv6AT9x4z5Vn user@host"


def load(tree, text, **kwargs):
    tree({"p.yaml": text})
    folder = tree({})
    return load_profile(folder / "p.yaml", env=kwargs.pop("env", {}), check_files=False, **kwargs)


def refused(tree, text) -> str:
    with pytest.raises(CloudkvmError) as info:
        load(tree, text)
    assert "\n" not in str(info.value)
    return info.value.message


@pytest.fixture(autouse=True)
def x86_host(monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")


def test_image_of_the_vms_arch_is_chosen_and_paths_resolve_against_the_profile(tree):
    p = load(tree, f"""
        name: c
        images:
          - location: https://example.org/arm.qcow2
            arch: aarch64
            digest: https://example.org/SHA512SUMS
          - location: images/x86.qcow2.xz
            arch: x86_64
            digest: {SHA256.upper().replace('SHA256', 'sha256')}
        disk: 4G
        boot: {{from_image: true, cmdline: quiet}}
        """)
    folder = tree({})
    assert p.image.location == str(folder / "images" / "x86.qcow2.xz")
    assert p.image.digest == SHA256  # normalised to lower case
    assert p.images[0].digest == "https://example.org/SHA512SUMS"  # URLs are kept as written
    assert p.disk == 4 * GiB and p.boot.from_image and p.boot.kernel is None
    assert p.seed is not None and p.seed.user == "cloudkvm"  # an image gets a seed by default


def test_a_checksum_file_path_with_a_colon_is_a_path(tree):
    p = load(tree, """
        name: c
        images: [{location: img.qcow2, digest: "sums:2024/SHA256SUMS"}]
        boot: {from_image: true}
        """)
    assert p.image.digest == str(tree({}) / "sums:2024" / "SHA256SUMS")


def test_an_image_without_arch_fits_any_vm(tree):
    p = load(tree, """
        name: c
        arch: aarch64
        images: [{location: "file:///srv/img.raw"}]
        boot: {from_image: true}
        """)
    assert p.image.location == "file:///srv/img.raw" and p.image.digest is None


def test_the_image_disk_and_seed_count_as_virtio_devices(tree):
    p = load(tree, """
        name: c
        images: [{location: /srv/img.qcow2}]
        boot: {from_image: true}
        network: user
        """)
    assert virtio_device_count(p) == 4  # the image's disk, the seed, the network card, the RNG
    without_seed = load(tree, """
        name: c
        images: [{location: /srv/img.qcow2}]
        boot: {from_image: true}
        cloud_init: false
        """)
    assert without_seed.seed is None and virtio_device_count(without_seed) == 2


def test_cloud_init_section(tree):
    p = load(tree, f"""
        name: web.1
        images: [{{location: /srv/img.qcow2}}]
        boot: {{from_image: true}}
        cloud_init:
          user: alice
          ssh_keys: ["{KEY}"]
          dot_ssh_keys: true
          hostname: web1
          packages: [nginx, "python3-yaml=6.0-3"]
          user_data:
            runcmd: [[touch, /ready]]
          user_data_file: extra.yaml
          network_config: {{version: 2, ethernets: {{e: {{match: {{name: "e*"}}, dhcp4: true}}}}}}
        """)
    seed = p.seed
    assert (seed.user, seed.ssh_keys, seed.dot_ssh_keys, seed.hostname) == ("alice", [KEY], True, "web1")
    assert seed.packages == ["nginx", "python3-yaml=6.0-3"]
    assert seed.user_data == {"runcmd": [["touch", "/ready"]]}
    assert seed.user_data_file == tree({}) / "extra.yaml"
    assert seed.network_config["version"] == 2


def test_a_kernel_file_may_boot_an_image_disk(tree):
    p = load(tree, """
        name: c
        images: [{location: /srv/img.qcow2}]
        boot: {kernel: vmlinuz, cmdline: root=/dev/vda1}
        """)
    assert not p.boot.from_image and p.boot.kernel.name == "vmlinuz"


@pytest.mark.parametrize("text, where, words", [
    ("images: [{location: /i, arch: aarch64}]\nboot: {from_image: true}", "p.yaml:2:", "no image for arch x86_64"),
    ("boot: {from_image: true}", "p.yaml:2:", "from_image needs an image"),
    ("images: [{location: /i}]\nboot: {from_image: true, kernel: k}", "p.yaml:3:", "kernel cannot be given too"),
    ("boot: {cmdline: x}", "p.yaml:2:", "boot needs a kernel, or from_image: true"),
    ("disk: 4G\nboot: {kernel: k}", "p.yaml:2:", "there is no image"),
    ("images: [{location: /i, digest: 'sha256:abc'}]\nboot: {from_image: true}", "p.yaml:2:",
     "a sha256 digest is 64 hex digits"),
    ("images: [{location: /i, digest: 'md5:abc'}]\nboot: {from_image: true}", "p.yaml:2:", "not a digest"),
    ("images: [{location: ''}]\nboot: {from_image: true}", "p.yaml:2:", "expected a URL or a path"),
    ("images: [{location: /i}]\nboot: {from_image: true}\ncloud_init: {user: Root}", "p.yaml:4:", "cloud_init.user"),
    ("images: [{location: /i}]\nboot: {from_image: true}\ncloud_init: {hostname: a_b}", "p.yaml:4:",
     "cloud_init.hostname"),
    ("images: [{location: /i}]\nboot: {from_image: true}\ncloud_init: {ssh_keys: [ssh-rsa nonsense]}",
     "p.yaml:4:", "cloud_init.ssh_keys[0]"),
    ("images: [{location: /i}]\nboot: {from_image: true}\ncloud_init: {network_config: {version: 3}}",
     "p.yaml:4:", "version must be 1 or 2"),
    ("images: [{location: /i}]\nboot: {from_image: true}\ncloud_init: {packages: ['-rf /']}", "p.yaml:4:",
     "cloud_init.packages[0]"),
])
def test_refusals_name_the_place(tree, text, where, words):
    message = refused(tree, "name: c\n" + text + "\n")
    assert where in message and words in message, message
