"""The image cache end to end against the local HTTP server: digests (given, from GNU and BSD checksum files made by
`sha256sum`/`sha512sum`, none), resumed and concurrent pulls, file:// URLs and paths, compressed downloads (made by
`xz`/`gzip`/`zstd`, checked with `qemu-img compare`), images refused (backing file, other formats, not a disk), and
`bases_in_use`/`prune`/`remove` against overlays made by `qemu-img create -b` in fake instance folders."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from cloudkvm.errors import CloudkvmError
from cloudkvm.images import store
from httpserver import HttpServer

NEEDED = ("qemu-img", "sha256sum", "sha512sum", "xz", "gzip", "zstd")
pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in NEEDED),
                                reason=f"needs {', '.join(NEEDED)} (Debian: qemu-utils coreutils xz-utils gzip zstd)")


def run(*argv, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True, **kwargs)


def sha(tool: str, path: Path) -> str:
    return run(tool, path).stdout.split()[0]


def make_qcow2(path: Path, seed_bytes: int = 1 << 20) -> Path:
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as f:
        f.write(os.urandom(seed_bytes))
        f.truncate(8 << 20)
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path)
    raw.unlink()
    return path


def cache_files() -> list[str]:
    """Everything the image cache holds except its lock files (which are never removed)."""
    top = store.root()
    return sorted(str(p.relative_to(top)) for p in top.rglob("*") if p.is_file() and p.parent.name != "locks")


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUDKVM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CLOUDKVM_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


@pytest.fixture
def www(env):
    folder = env / "www"
    folder.mkdir()
    make_qcow2(folder / "debian-12-genericcloud-amd64.qcow2")
    make_qcow2(folder / "debian-12-genericcloud-arm64.qcow2")
    with HttpServer(folder) as server:
        yield server, folder


class Warnings(list):
    def __call__(self, message: str) -> None:
        self.append(message)


NAME = "debian-12-genericcloud-amd64.qcow2"


def test_pull_with_a_good_digest_then_from_the_cache_without_network(www):
    server, folder = www
    digest = "sha256:" + sha("sha256sum", folder / NAME)
    warnings = Warnings()
    image = store.pull(server.url(NAME), digest, progress=False, warn=warnings)
    assert warnings == [] and image.digest == digest and image.format == "qcow2" and image.size == 8 << 20
    assert image.path.parent == store.root() and image.location == server.url(NAME)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", folder / NAME, image.path)
    assert image.path.stat().st_mode & 0o222 == 0  # read-only: a base is never written
    server.reset_counters()
    again = store.pull(server.url(NAME), digest, progress=False)
    assert again.path == image.path and server.requests == []
    same_digest_elsewhere = store.pull("https://mirror.invalid/" + NAME, digest, progress=False)
    assert same_digest_elsewhere.path == image.path and server.requests == []


def test_a_wrong_digest_is_an_error_and_nothing_is_kept(www):
    server, folder = www
    actual = sha("sha256sum", folder / NAME)
    wrong = "sha256:" + "0" * 64
    with pytest.raises(CloudkvmError) as err:
        store.pull(server.url(NAME), wrong, progress=False)
    assert err.value.message == f"{server.url(NAME)}: sha256 digest is {actual}, expected {'0' * 64}"
    assert "discarded" in err.value.hint
    assert cache_files() == []


@pytest.mark.parametrize("tool, form", [("sha256sum", "gnu"), ("sha256sum", "bsd"), ("sha512sum", "gnu"),
                                        ("sha512sum", "bsd")])
def test_a_checksum_file_digest(www, tool, form):
    server, folder = www
    other = "debian-12-genericcloud-arm64.qcow2"
    flags = ["--tag"] if form == "bsd" else []
    sums = run(tool, *flags, other, NAME, cwd=folder).stdout  # the published file lists several images
    (folder / "SUMS").write_text(sums)
    image = store.pull(server.url(NAME), server.url("SUMS"), progress=False)
    algorithm = tool[:6]
    assert image.digest == f"{algorithm}:{sha(tool, folder / NAME)}"
    assert image.path.name == f"{algorithm}-{sha(tool, folder / NAME)}.qcow2"
    server.reset_counters()
    store.pull(server.url(NAME), server.url("SUMS"), progress=False)
    assert [r["path"] for r in server.requests] == ["/SUMS"]  # the checksums are read again, the image is not


def test_a_checksum_file_naming_another_digest_refuses_the_image(www):
    server, folder = www
    (folder / "SHA256SUMS").write_text(f"{'1' * 64}  {NAME}\n")
    with pytest.raises(CloudkvmError) as err:
        store.pull(server.url(NAME), server.url("SHA256SUMS"), progress=False)
    assert f"expected {'1' * 64}" in err.value.message and cache_files() == []


def test_an_unreachable_checksum_file_falls_back_to_the_cached_image_with_a_warning(www):
    server, folder = www
    (folder / "SHA256SUMS").write_text(run("sha256sum", NAME, cwd=folder).stdout)
    image = store.pull(server.url(NAME), server.url("SHA256SUMS"), progress=False)
    (folder / "SHA256SUMS").unlink()
    warnings = Warnings()
    again = store.pull(server.url(NAME), server.url("SHA256SUMS"), progress=False, warn=warnings)
    assert again.path == image.path
    assert len(warnings) == 1 and "cannot read the checksum file" in warnings[0] and "HTTP 404" in warnings[0]
    with pytest.raises(CloudkvmError) as err:  # an image never cached cannot fall back
        store.pull(server.url("debian-12-genericcloud-arm64.qcow2"), server.url("SHA256SUMS"), progress=False)
    assert "HTTP 404" in err.value.message


def test_no_digest_warns_and_is_found_again_by_location(www):
    server, folder = www
    warnings = Warnings()
    image = store.pull(server.url(NAME), None, progress=False, warn=warnings)
    assert len(warnings) == 1 and "no digest" in warnings[0]
    assert image.digest == "sha256:" + sha("sha256sum", folder / NAME)
    server.reset_counters()
    again = store.pull(server.url(NAME), None, progress=False, warn=warnings)
    assert again.path == image.path and server.requests == []
    [entry] = store.list_images()
    assert not entry.verified and entry.locations == (server.url(NAME),)


def test_an_interrupted_pull_resumes_with_range(www):
    server, folder = www
    size = (folder / NAME).stat().st_size
    server.cut_next(size // 2)
    image = store.pull(server.url(NAME), "sha256:" + sha("sha256sum", folder / NAME), progress=False)
    run("cmp", folder / NAME, image.path)
    assert [r["range"] for r in server.requests] == [None, f"bytes={size // 2}-"]
    assert server.bytes_sent == size
    assert cache_files() == sorted([image.path.name, image.path.with_suffix(".json").name])


def test_two_concurrent_pulls_download_once(www):
    server, folder = www
    server.piece, server.delay = 256 << 10, 0.02  # slow enough for the two to overlap
    digest = "sha256:" + sha("sha256sum", folder / NAME)
    results, errors = [], []

    def pull():
        try:
            results.append(store.pull(server.url(NAME), digest, progress=False))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=pull) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(results) == 2 and results[0].path == results[1].path
    assert len(server.requests) == 1 and server.bytes_sent == (folder / NAME).stat().st_size


def test_file_urls_and_local_paths(env, monkeypatch):
    image_file = make_qcow2(env / "local.qcow2")
    digest = "sha256:" + sha("sha256sum", image_file)
    by_url = store.pull(f"file://{image_file}", digest, progress=False)
    monkeypatch.chdir(env)
    by_path = store.pull("local.qcow2", digest, progress=False)
    monkeypatch.setenv("HOME", str(env))
    by_home = store.pull("~/local.qcow2", None, progress=False, warn=Warnings())
    assert by_url.path == by_path.path == by_home.path and by_url.location == str(image_file)
    run("cmp", image_file, by_url.path)
    assert by_url.path.stat().st_ino != image_file.stat().st_ino  # a copy: changing the file changes no base


def test_a_changed_local_file_without_digest_is_copied_again(env):
    image_file = make_qcow2(env / "local.qcow2")
    first = store.pull(str(image_file), None, progress=False, warn=Warnings())
    make_qcow2(env / "local.qcow2")
    second = store.pull(str(image_file), None, progress=False, warn=Warnings())
    assert second.path != first.path and second.digest == "sha256:" + sha("sha256sum", image_file)


@pytest.mark.parametrize("tool, suffix", [("xz", "xz"), ("gzip", "gz"), ("zstd", "zst")])
def test_compressed_downloads_are_unpacked_into_the_cache(www, tool, suffix):
    server, folder = www
    with open(folder / f"{NAME}.{suffix}", "wb") as out:
        subprocess.run([tool, "-c", str(folder / NAME)], check=True, stdout=out)
    digest = "sha256:" + sha("sha256sum", folder / f"{NAME}.{suffix}")  # the digest of the download
    image = store.pull(server.url(f"{NAME}.{suffix}"), digest, progress=False)
    assert image.format == "qcow2" and image.path.suffix == ".qcow2" and image.digest == digest
    run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", folder / NAME, image.path)
    [entry] = store.list_images()
    assert entry.compressed == {"gz": "gzip", "zst": "zstd"}.get(suffix, suffix)
    assert cache_files() == sorted([image.path.name, image.path.with_suffix(".json").name])


@pytest.mark.parametrize("tool", ["gzip", "bzip2"])
def test_a_compressed_local_file_is_hashed_as_is_and_unpacked(env, tool):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed")
    image_file = make_qcow2(env / "local.qcow2")
    packed = env / "local.qcow2.packed"
    with open(packed, "wb") as out:
        subprocess.run([tool, "-c", str(image_file)], check=True, stdout=out)
    with open(packed, "ab") as out:  # trailing zeros (a padded download): not image data, but part of the file
        out.write(bytes(4096))
    digest = "sha256:" + sha("sha256sum", packed)  # the digest of the file as it lies there
    image = store.pull(str(packed), digest, progress=False)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", image_file, image.path)
    with pytest.raises(CloudkvmError) as err:  # the same bytes claimed under another digest
        store.pull(str(packed), "sha256:" + "2" * 64, progress=False)
    assert f"sha256 digest is {digest[7:]}" in err.value.message


def test_a_corrupt_compressed_download_leaves_nothing(www):
    server, folder = www
    packed = subprocess.run(["xz", "-c", str(folder / NAME)], check=True, capture_output=True).stdout
    middle = len(packed) // 2
    (folder / "broken.qcow2.xz").write_bytes(packed[:middle] + bytes(64) + packed[middle + 64:])
    with pytest.raises(CloudkvmError) as err:
        store.pull(server.url("broken.qcow2.xz"), None, progress=False, warn=Warnings())
    assert err.value.message.startswith(f"{server.url('broken.qcow2.xz')}: corrupt xz data")
    assert cache_files() == []


def test_a_qcow2_with_a_backing_file_is_refused(www):
    server, folder = www
    run("qemu-img", "create", "-f", "qcow2", "-b", NAME, "-F", "qcow2", folder / "overlay.qcow2")
    with pytest.raises(CloudkvmError) as err:
        store.pull(server.url("overlay.qcow2"), None, progress=False, warn=Warnings())
    assert "has a backing file of its own" in err.value.message and NAME in err.value.message
    assert cache_files() == []


def test_formats_cloudkvm_cannot_read_and_non_images_are_refused(www):
    server, folder = www
    run("qemu-img", "convert", "-O", "vmdk", folder / NAME, folder / "image.vmdk")
    with pytest.raises(CloudkvmError) as err:
        store.pull(server.url("image.vmdk"), None, progress=False, warn=Warnings())
    assert err.value.message == f"{server.url('image.vmdk')}: a vmdk image, which cloudkvm cannot read"
    (folder / "page.html").write_text("<html><body>Sign in to the captive portal</body></html>\n")
    with pytest.raises(CloudkvmError) as err:
        store.pull(server.url("page.html"), None, progress=False, warn=Warnings())
    assert "not a whole number of 512-byte sectors" in err.value.message
    assert cache_files() == []


def test_a_raw_image_is_cached_as_raw(www):
    server, folder = www
    run("qemu-img", "convert", "-O", "raw", folder / NAME, folder / "disk.img")
    image = store.pull(server.url("disk.img"), "sha256:" + sha("sha256sum", folder / "disk.img"), progress=False)
    assert image.format == "raw" and image.size == 8 << 20 and image.path.suffix == ".raw"
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", image.path, folder / NAME)


def fake_instance(name: str, base: Path) -> Path:
    """An instance folder (as instances.list_instances finds them) with a qcow2 overlay on `base`."""
    folder = Path(os.environ["CLOUDKVM_STATE_DIR"]) / name
    folder.mkdir(parents=True)
    (folder / "instance.json").write_text(json.dumps({"name": name}))
    run("qemu-img", "create", "-f", "qcow2", "-b", base, "-F", "qcow2", folder / "root.qcow2")
    return folder


def test_prune_keeps_the_bases_overlays_need(www):
    server, folder = www
    needed = store.pull(server.url(NAME), None, progress=False, warn=Warnings())
    unused = store.pull(server.url("debian-12-genericcloud-arm64.qcow2"), None, progress=False, warn=Warnings())
    fake_instance("web", needed.path)
    fake_instance("db", needed.path)
    (store.root() / "partial" / "0123abcd.part").write_bytes(b"half a download")
    assert store.bases_in_use() == {os.path.realpath(needed.path): ["db", "web"]}
    assert {e.path: e.used_by for e in store.list_images()} == {needed.path: ("db", "web"), unused.path: ()}
    planned = store.prune(dry_run=True)
    assert unused.path.exists() and len(planned) == 3
    removed = store.prune()
    assert {r.path for r in removed} == {unused.path, unused.path.with_suffix(".json"),
                                         store.root() / "partial" / "0123abcd.part"}
    assert cache_files() == sorted([needed.path.name, needed.path.with_suffix(".json").name])
    # the overlays still open on their base: qemu-img follows the chain
    run("qemu-img", "check", Path(os.environ["CLOUDKVM_STATE_DIR"]) / "web" / "root.qcow2")
    assert store.prune() == []


def test_remove_refuses_a_base_in_use_unless_forced(www):
    server, folder = www
    image = store.pull(server.url(NAME), None, progress=False, warn=Warnings())
    fake_instance("web", image.path)
    with pytest.raises(CloudkvmError) as err:
        store.remove(image.digest[:15])
    assert "base of instance(s) web" in err.value.message and "--force" in err.value.hint
    assert image.path.exists()
    removed = store.remove(NAME, force=True)  # by the location's file name
    assert removed.path == image.path and cache_files() == []


def test_remove_by_digest_prefix_location_and_file_name(www):
    server, folder = www
    refs = [lambda i: i.digest.split(":")[1][:8], lambda i: i.location, lambda i: i.path.name,
            lambda i: i.digest[:12]]
    for ref in refs:
        image = store.pull(server.url(NAME), None, progress=False, warn=Warnings())
        assert store.remove(ref(image)).path == image.path and not image.path.exists()
    with pytest.raises(CloudkvmError) as err:
        store.remove("sha256:ffffffff")
    assert err.value.message == "no cached image matches 'sha256:ffffffff'"


def test_damaged_records_and_orphans_are_ignored_then_pruned(www):
    server, folder = www
    image = store.pull(server.url(NAME), None, progress=False, warn=Warnings())
    record = image.path.with_suffix(".json")
    record.write_text("{not json")
    assert store.list_images() == []
    removed = store.prune()
    assert {r.path for r in removed} == {record, image.path} and cache_files() == []
    # a record whose image vanished is no image; the next pull fetches it again
    image = store.pull(server.url(NAME), None, progress=False, warn=Warnings())
    os.chmod(image.path, 0o644)
    image.path.unlink()
    server.reset_counters()
    again = store.pull(server.url(NAME), None, progress=False, warn=Warnings())
    assert again.path.exists() and len(server.requests) == 1


def test_prune_and_remove_wait_for_an_overlay_being_made_and_keep_its_base(www):
    server, folder = www
    image = store.pull(server.url(NAME), None, progress=False, warn=Warnings())
    results = {}

    def prune():
        results["prune"] = store.prune()

    def remove():
        try:
            store.remove(NAME)
        except CloudkvmError as err:
            results["remove"] = err.message

    with store.holding(image) as present:  # what `up` does between its pull and the overlay
        assert present
        threads = [threading.Thread(target=prune), threading.Thread(target=remove)]
        for thread in threads:
            thread.start()
        threads[0].join(0.5)
        assert threads[0].is_alive() and threads[1].is_alive()  # both wait for the lock
        fake_instance("web", image.path)
    for thread in threads:
        thread.join(10)
    assert results["prune"] == [] and "base of instance(s) web" in results["remove"]
    assert image.path.is_file()


def test_holding_says_when_the_image_was_removed_before_the_lock(www):
    server, folder = www
    image = store.pull(server.url(NAME), None, progress=False, warn=Warnings())
    store.prune()  # nothing uses it yet: gone
    with store.holding(image) as present:
        assert not present
