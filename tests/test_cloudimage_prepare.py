"""An instance made ready from a cloud image, without starting a VM: `launcher.claimed` pulls the image from a local
HTTP server into the cache, makes the instance's overlay on it grown to `disk:`, reads the kernel and initrd out of
the image (a GPT disk with an ext4 root, made by sfdisk and mkfs.ext4 around Debian's real cloud kernel) and writes
the cloud-init seed. The oracles are the tools that made the image and read it back: `qemu-img info`, `blkid`,
`isoinfo`, `sha256sum`, `ssh-keygen`."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cloudkvm import launcher
from cloudkvm.errors import CloudkvmError
from cloudkvm.guests.debian import default_guest
from cloudkvm.instances import Instance
from cloudkvm.profile import load_profile
from images.diskmaker import Part, blkid_uuid, make_disk, make_fs, need_tools, qcow2, root_tree
from images.httpserver import HttpServer

ROOT_UUID = "2b4fd3a1-7c55-4d1b-9c56-0b7e1d2f3a41"
VERSION = "6.1.0-57-cloud-amd64"


def sha256(path: Path) -> str:
    return subprocess.run(["sha256sum", path], capture_output=True, text=True, check=True).stdout.split()[0]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A compressed qcow2 cloud image: GPT, p1 an ext4 root holding Debian's cloud kernel and an initrd."""
    need_tools()
    kernel, initrd = default_guest()  # from the default cache, before the tests point the cache elsewhere
    folder = tmp_path_factory.mktemp("image")
    boot = {f"vmlinuz-{VERSION}": kernel.read_bytes(), f"initrd.img-{VERSION}": initrd.read_bytes()}
    fs = make_fs(folder / "root.fs", 96, root_tree(boot), ROOT_UUID)
    disk = make_disk(folder / "disk.raw", 100, "gpt", [Part(97, type="4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709", fs=fs)])
    served = folder / "served"
    served.mkdir()
    image = qcow2(disk.path, served / "tiny-cloud.qcow2")
    return {"path": image, "kernel": kernel.read_bytes(), "initrd": initrd.read_bytes(),
            "uuid": blkid_uuid(fs), "sha256": sha256(image)}


@pytest.fixture
def places(tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUDKVM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CLOUDKVM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def write_profile(folder: Path, url: str, digest: str, extra: str = "") -> Path:
    path = folder / "cloud.yaml"
    path.write_text(f"""
name: tiny
memory: 256M
images:
  - location: {url}
    arch: x86_64
    digest: {digest}
disk: 1G
boot:
  from_image: true
  cmdline: quiet
cloud_init:
  user: alice
  packages: [htop]
  user_data:
    runcmd: [[touch, /ready]]
network:
  mode: user
  forwards: [tcp:127.0.0.1:2299-:22]
{extra}""")
    return path


def isoinfo_files(iso: Path) -> dict[str, bytes]:
    names = subprocess.run(["isoinfo", "-R", "-f", "-i", iso], capture_output=True, text=True,
                           check=True).stdout.split()
    return {name.lstrip("/"): subprocess.run(["isoinfo", "-R", "-i", iso, "-x", name], capture_output=True,
                                             check=True).stdout for name in names}


def test_an_instance_is_made_ready_from_a_served_image(image, places):
    with HttpServer(image["path"].parent) as server:
        profile = load_profile(write_profile(places, server.url("tiny-cloud.qcow2"), f"sha256:{image['sha256']}"))
        cached = launcher.pull_image(profile)
        with launcher.claimed(profile, None, "being started", cached=cached) as (instance, disks, _lock, booted):
            pass
        first_requests = len(server.requests)
        # the overlay: 1 GiB, on the cached base, which is the image byte for byte
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "--backing-chain", disks[0].path],
                                         capture_output=True, text=True, check=True).stdout)
        assert Path(disks[0].path) == instance.dir / "root.qcow2"
        assert info[0]["virtual-size"] == 1 << 30 and info[0]["format"] == "qcow2"
        assert Path(info[0]["full-backing-filename"]) == cached.path
        assert sha256(cached.path) == image["sha256"]
        # the kernel and initrd read out of the image, and the command line from its root file system
        assert booted.boot.kernel.read_bytes() == image["kernel"]
        assert booted.boot.initrd.read_bytes() == image["initrd"]
        assert booted.boot.cmdline == f"root=UUID={image['uuid']} ro console=ttyS0 quiet"
        # the seed: read-only, last, with the user, the instance's own key and the merged user-data
        seed = disks[-1]
        assert seed.read_only and Path(seed.path) == instance.dir / "cidata.iso"
        files = isoinfo_files(Path(seed.path))
        assert sorted(files) == ["meta-data", "user-data"]
        user_data = yaml.safe_load(files["user-data"])
        public = (instance.dir / "ssh_key.pub").read_text().strip()
        assert subprocess.run(["ssh-keygen", "-l", "-f", instance.dir / "ssh_key"], capture_output=True).returncode == 0
        alice = next(user for user in user_data["users"] if isinstance(user, dict) and user["name"] == "alice")
        assert alice["ssh_authorized_keys"] == [public]
        assert user_data["packages"] == ["htop"] and user_data["runcmd"] == [["touch", "/ready"]]
        meta = yaml.safe_load(files["meta-data"])
        assert meta["local-hostname"] == "tiny"
        recorded = Instance.named("tiny").info()["ssh"]
        assert recorded == {"user": "alice", "host": "127.0.0.1", "port": 2299}

        # a second start: no download (the instance keeps its base), the same cloud-init instance
        assert launcher.pull_image(profile) is None
        with launcher.claimed(profile, None, "being started") as (_, disks_again, _lock, _):
            pass
        assert len(server.requests) == first_requests
        again = yaml.safe_load(isoinfo_files(Path(disks_again[-1].path))["meta-data"])
        assert again["instance-id"] == meta["instance-id"]
        assert sha256(cached.path) == image["sha256"]  # the base is never written


def test_a_wrong_digest_leaves_nothing_behind(image, places):
    with HttpServer(image["path"].parent) as server:
        profile = load_profile(write_profile(places, server.url("tiny-cloud.qcow2"), "sha256:" + "0" * 64))
        with pytest.raises(CloudkvmError) as info:
            launcher.pull_image(profile)
    assert "cloud.yaml:5:" in info.value.message and "0" * 64 in info.value.message
    assert not Instance.named("tiny").dir.exists()
    assert not any(p.is_file() and p.suffix == ".qcow2" for p in (places / "cache").rglob("*"))


def test_a_larger_disk_later_grows_the_overlay_and_a_smaller_one_is_refused(image, places):
    with HttpServer(image["path"].parent) as server:
        path = write_profile(places, server.url("tiny-cloud.qcow2"), f"sha256:{image['sha256']}")
        profile = load_profile(path)
        with launcher.claimed(profile, None, "being started") as (_, disks, _lock, _):
            pass
        path.write_text(path.read_text().replace("disk: 1G", "disk: 2G"))
        with launcher.claimed(load_profile(path), None, "being started") as (_, disks, _lock, _):
            pass
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", disks[0].path], capture_output=True,
                                         text=True, check=True).stdout)
        assert info["virtual-size"] == 2 << 30
        path.write_text(path.read_text().replace("disk: 2G", "disk: 1G"))
        with pytest.raises(CloudkvmError, match="disks only grow"):
            with launcher.claimed(load_profile(path), None, "being started"):
                pass


def test_a_root_disk_backed_outside_the_image_cache_is_refused(image, places):
    """instance.json and root.qcow2 are files on disk: an overlay header naming another file is not followed."""
    with HttpServer(image["path"].parent) as server:
        profile = load_profile(write_profile(places, server.url("tiny-cloud.qcow2"), f"sha256:{image['sha256']}"))
        with launcher.claimed(profile, None, "being started") as (instance, _disks, _lock, _):
            pass
    elsewhere = places / "elsewhere.raw"
    elsewhere.write_bytes(b"\0" * (1 << 20))
    root = instance.dir / "root.qcow2"
    root.unlink()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", elsewhere, "-F", "raw", root], check=True)
    with pytest.raises(CloudkvmError) as info:
        with launcher.claimed(profile, None, "being started"):
            pass
    assert "outside the image cache" in info.value.message and str(elsewhere) in info.value.message


def boot_entry(places: Path, digest: str) -> Path:
    return places / "cache" / "images" / "boot" / f"sha256-{digest}"


def test_image_pull_reads_the_kernel_out_once_and_new_instances_boot_from_that(image, places):
    with HttpServer(image["path"].parent) as server:
        url = server.url("tiny-cloud.qcow2")
        pulled = subprocess.run([sys.executable, "-m", "cloudkvm", "image", "pull", url, "--digest",
                                 f"sha256:{image['sha256']}"], capture_output=True, text=True)
        assert pulled.returncode == 0, pulled.stderr
        entry = boot_entry(places, image["sha256"])
        assert (entry / "vmlinuz").read_bytes() == image["kernel"]
        assert (entry / "initrd.img").read_bytes() == image["initrd"]
        # What a new instance boots is what the cache holds (the same size, its last bytes changed: it cannot come
        # from the image); a start of an instance whose overlay exists reads the image through the overlay again.
        stand_in = image["kernel"][:-16] + bytes(b ^ 0xA5 for b in image["kernel"][-16:])
        (entry / "vmlinuz").write_bytes(stand_in)
        profile = load_profile(write_profile(places, url, f"sha256:{image['sha256']}"))
        with launcher.claimed(profile, None, "being started", cached=launcher.pull_image(profile)) as \
                (_, _, _, booted):
            assert booted.boot.kernel.read_bytes() == stand_in
            assert booted.boot.initrd.read_bytes() == image["initrd"]
            assert booted.boot.cmdline == f"root=UUID={image['uuid']} ro console=ttyS0 quiet"
        with launcher.claimed(profile, None, "being started") as (_, _, _, booted):
            assert booted.boot.kernel.read_bytes() == image["kernel"]
        # an entry that is not whole is a miss: the image is read, and the entry written again
        (entry / "vmlinuz").write_bytes(image["kernel"][:4096])
        other = profile.model_copy(update={"name": "tiny2"})
        with launcher.claimed(other, None, "being started") as (_, _, _, booted):
            assert booted.boot.kernel.read_bytes() == image["kernel"]
        assert (entry / "vmlinuz").read_bytes() == image["kernel"]
        # what goes on the kernel command line must look like what find_boot gives: a root UUID carrying other
        # words is a miss too, never booted with
        meta = json.loads((entry / "boot.json").read_text())
        (entry / "boot.json").write_text(json.dumps({**meta, "root_uuid": meta["root_uuid"] + " init=/bin/sh"}))
        with launcher.claimed(profile.model_copy(update={"name": "tiny3"}), None, "being started") as \
                (_, _, _, booted):
            assert booted.boot.cmdline == f"root=UUID={image['uuid']} ro console=ttyS0 quiet"
        assert json.loads((entry / "boot.json").read_text())["root_uuid"] == image["uuid"]


def test_image_rm_and_prune_remove_the_kernel_read_out_with_the_image(image, places):
    from cloudkvm.images import bootcache, store

    with HttpServer(image["path"].parent) as server:
        cached = store.pull(server.url("tiny-cloud.qcow2"), f"sha256:{image['sha256']}")
    bootcache.ensure(cached)
    entry = boot_entry(places, image["sha256"])
    assert (entry / "boot.json").is_file()
    store.remove(image["sha256"][:12])
    assert not entry.exists()
    orphan = boot_entry(places, "0" * 64)
    orphan.mkdir(parents=True)
    (orphan / "vmlinuz").write_bytes(b"k" * 100)
    planned = store.prune(dry_run=True)
    assert [item.path for item in planned] == [orphan] and orphan.exists()
    assert [item.path for item in store.prune()] == [orphan] and not orphan.exists()


def test_an_image_pruned_between_the_pull_and_the_overlay_is_pulled_again(image, places):
    from cloudkvm.images import store

    with HttpServer(image["path"].parent) as server:
        profile = load_profile(write_profile(places, server.url("tiny-cloud.qcow2"), f"sha256:{image['sha256']}"))
        cached = launcher.pull_image(profile)
        downloads = len(server.requests)
        assert [item.path for item in store.prune() if item.path == cached.path] == [cached.path]
        with launcher.claimed(profile, None, "being started", cached=cached) as (_, disks, _lock, booted):
            assert booted.boot.kernel.read_bytes() == image["kernel"]
        assert len(server.requests) > downloads and sha256(cached.path) == image["sha256"]
