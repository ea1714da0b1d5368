"""`cloudkvm image ls | pull | rm | prune` through typer's CliRunner (and one real process for the exit status and
the one-line error), on a local image, with `sha256sum` and `qemu-img` as oracles."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cloudkvm.cli import app

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img (Debian: qemu-utils)")
ROOT = Path(__file__).resolve().parents[2]


def run(*argv, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True, **kwargs)


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUDKVM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CLOUDKVM_STATE_DIR", str(tmp_path / "state"))
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.write(os.urandom(1 << 20))
        f.truncate(8 << 20)
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, tmp_path / "cloud.qcow2")
    return tmp_path


def cli(*args: str):
    result = CliRunner().invoke(app, ["image", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def test_pull_ls_rm(env):
    image = env / "cloud.qcow2"
    digest = run("sha256sum", image).stdout.split()[0]
    pulled = cli("pull", str(image), "--digest", f"sha256:{digest}")
    assert pulled.exit_code == 0
    path = Path(pulled.stdout.strip())
    assert path.name == f"sha256-{digest}.qcow2" and path.parent == env / "cache" / "images"
    run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", image, path)

    table = cli("ls")
    assert table.exit_code == 0
    header, row = table.stdout.splitlines()
    assert header.split()[:2] == ["DIGEST", "FORMAT"]
    assert row.split()[:4] == [f"sha256:{digest[:12]}", "qcow2", "8.0", "MiB"] and row.endswith(str(image))

    listed = json.loads(cli("ls", "--json").stdout)
    assert [(e["digest"], e["format"], e["size"], e["locations"]) for e in listed] == \
        [(f"sha256:{digest}", "qcow2", 8 << 20, [str(image)])]

    removed = cli("rm", digest[:10])
    assert removed.exit_code == 0 and f"removed sha256:{digest[:12]}" in removed.stdout
    assert not path.exists() and json.loads(cli("ls", "--json").stdout) == []


def test_prune_dry_run_then_prune_keeps_a_base_in_use(env):
    kept = Path(cli("pull", str(env / "cloud.qcow2")).stdout.strip())
    run("qemu-img", "convert", "-O", "raw", env / "cloud.qcow2", env / "other.img")
    other = Path(cli("pull", str(env / "other.img")).stdout.strip())
    instance = env / "state" / "vm1"
    instance.mkdir(parents=True)
    (instance / "instance.json").write_text("{}")
    run("qemu-img", "create", "-f", "qcow2", "-b", kept, "-F", "qcow2", instance / "root.qcow2")
    assert "vm1" in next(line for line in cli("ls").stdout.splitlines() if line.startswith("sha256:")
                         and kept.name[7:19] in line)

    dry = cli("prune", "--dry-run")
    assert dry.exit_code == 0 and other.exists()
    assert [line.split(": ", 1)[1] for line in dry.stdout.splitlines()] == [str(other), str(other.with_suffix(".json"))]
    pruned = cli("prune")
    assert pruned.stdout.replace("removed", "would remove") == dry.stdout
    assert kept.exists() and not other.exists()

    refused = CliRunner().invoke(app, ["image", "rm", kept.name])
    assert "base of instance(s) vm1" in str(refused.exception) and kept.exists()
    assert cli("rm", kept.name, "--force").exit_code == 0 and not kept.exists()


def test_errors_are_one_line_and_exit_2(env):
    child_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "cloudkvm", "image", "pull", str(env / "cloud.qcow2"), "--digest",
                           "sha256:" + "0" * 64], capture_output=True, text=True, env=child_env)
    assert done.returncode == 2 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith(f"cloudkvm: error: {env / 'cloud.qcow2'}: sha256 digest is ") and "expected 000" in line
    done = subprocess.run([sys.executable, "-m", "cloudkvm", "image", "pull", str(env / "cloud.qcow2")],
                          capture_output=True, text=True, env=child_env)
    assert done.returncode == 0 and done.stderr.startswith("cloudkvm: warning: ") and "no digest" in done.stderr


def test_pull_prepares_the_images_kernel_and_initrd_for_this_hosts_board(env, monkeypatch):
    """`image pull` of an image with a kernel does ahead what booting it would do on the host (x86: the bzImage's
    vmlinux decompressed, the initramfs expanded; both cached by content), so that `up` does none of it: the cache
    then answers with the ELF inside the bzImage and the archive `cpio` wrote, with the decompressors unused."""
    from cloudkvm.boards import registry
    from cloudkvm.boot import initrd as initrd_module
    from cloudkvm.boot import linux_x86
    from diskmaker import Part, make_disk, make_fs, need_tools, qcow2, root_tree
    from kernels import compress, make_bzimage, make_elf

    need_tools()
    if registry.host_board().name != "x86":
        pytest.skip("the x86 board prepares kernels on the host (other boards have nothing to do ahead)")
    elf = make_elf()
    kernel = make_bzimage(compress("xz", elf))
    tree = env / "initramfs"
    (tree / "bin").mkdir(parents=True)
    (tree / "init").write_text("#!/bin/sh\n")
    archive = subprocess.run("find . | sort | cpio -o -H newc --quiet", shell=True, cwd=tree, check=True,
                             capture_output=True).stdout
    initrd = compress("gzip", archive)
    version = "6.1.0-99-cloud-amd64"
    fs = make_fs(env / "root.fs", 24, root_tree({f"vmlinuz-{version}": kernel, f"initrd.img-{version}": initrd}),
                 "6f0c1b2e-3d4a-4b5c-8d9e-0a1b2c3d4e5f")
    disk = make_disk(env / "linux.raw", 32, "gpt", [Part(28, "0FC63DAF-8483-4772-8E79-3D69D8477DE4", fs)])
    image = qcow2(disk.path, env / "linux.qcow2")
    assert cli("pull", str(image)).exit_code == 0

    def not_again(*_):
        raise AssertionError("decompressed again: `image pull` did not prepare it")
    monkeypatch.setattr(linux_x86, "decompress_payload", not_again)
    monkeypatch.setattr(initrd_module, "expand", not_again)
    (env / "vmlinuz").write_bytes(kernel)
    assert linux_x86.vmlinux_cache(env / "vmlinuz").read_bytes() == elf
    assert initrd_module.expanded_initrd(initrd, "initrd.img") == archive


def test_pull_prepares_nothing_a_boot_cache_entry_links_to_outside_the_cache(env, monkeypatch):
    """A boot-file entry whose kernel is a symbolic link (its recorded size the link's own) is not followed: the
    entry is put aside and the file it points to is never read, so nothing of it reaches the vmlinux cache."""
    import hashlib
    import json

    from cloudkvm.boot import linux_x86
    from cloudkvm.images import bootcache
    from kernels import compress, make_bzimage, make_elf

    elsewhere = env / "elsewhere-vmlinuz"
    elsewhere.write_bytes(make_bzimage(compress("gzip", make_elf())))
    image = env / "cloud.qcow2"
    key = "sha256-" + hashlib.sha256(image.read_bytes()).hexdigest()
    entry = env / "cache" / "images" / "boot" / key
    entry.mkdir(parents=True)
    (entry / "vmlinuz").symlink_to(elsewhere)
    (entry / "boot.json").write_text(json.dumps({
        "kernel_name": "/boot/vmlinuz-6.1.0-99-cloud-amd64", "initrd_name": None, "root_uuid": "0" * 8,
        "root_partuuid": "", "root_partition": 1, "boot_partition": 1, "notes": [],
        "kernel_size": len(str(elsewhere)), "initrd_size": None}))
    assert bootcache._meta(key) is not None        # (the entry reads as whole without following the link)
    assert cli("pull", str(image)).exit_code == 0
    assert not entry.exists()

    def not_cached(*_):
        raise LookupError("not in the vmlinux cache")
    monkeypatch.setattr(linux_x86, "decompress_payload", not_cached)
    with pytest.raises(LookupError):
        linux_x86.vmlinux_cache(elsewhere)
