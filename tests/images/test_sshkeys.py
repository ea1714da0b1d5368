"""SSH keys: the instance key pair read back with `ssh-keygen -l` (private and public halves agree), made once and
repaired when half made; profile keys checked against keys `ssh-keygen` made; the user's ~/.ssh/*.pub on a temporary
HOME with the files a real ~/.ssh holds (certificates, private keys, a FIFO, a huge file, a symlink)."""
from __future__ import annotations

import base64
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from cloudkvm.errors import CloudkvmError
from cloudkvm.images.sshkeys import check_public_key, instance_key, user_public_keys


def keygen() -> str:
    found = shutil.which("ssh-keygen")
    if found is None:
        pytest.fail("ssh-keygen is missing: apt-get install openssh-client")
    return found


def fingerprint(path: Path) -> str:
    """`ssh-keygen -l -f` of a key file: 'BITS SHA256:... COMMENT (TYPE)'."""
    return subprocess.run([keygen(), "-l", "-f", str(path)], capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()


def make_key(folder: Path, kind: str, comment: str = "someone@host", bits: str | None = None) -> str:
    """A public key line made by ssh-keygen itself."""
    path = folder / f"made_{kind}_{bits or ''}_{len(list(folder.iterdir()))}"
    args = [keygen(), "-t", kind, "-N", "", "-C", comment, "-q", "-f", str(path)]
    if bits:
        args += ["-b", bits]
    subprocess.run(args, check=True, timeout=60)
    return path.with_name(path.name + ".pub").read_text().strip()


# ------------------------------------------------------------------------------------------ the instance key

def test_instance_key_is_an_ed25519_pair_ssh_keygen_reads(tmp_path):
    private, line = instance_key(tmp_path, "cloudkvm@vm1")
    assert private == tmp_path / "ssh_key"
    assert private.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "ssh_key.pub").read_text().strip() == line
    of_private, of_public = fingerprint(private), fingerprint(tmp_path / "ssh_key.pub")
    assert of_private.split()[:2] == of_public.split()[:2]
    assert of_public.startswith("256 SHA256:") and of_public.endswith("cloudkvm@vm1 (ED25519)")
    assert line.startswith("ssh-ed25519 ") and line.endswith(" cloudkvm@vm1")
    assert check_public_key(line, "x") == line
    assert sorted(os.listdir(tmp_path)) == ["ssh_key", "ssh_key.pub"]  # no staging folder left


def test_instance_key_is_made_once(tmp_path):
    private, line = instance_key(tmp_path, "cloudkvm@vm1")
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (private, tmp_path / "ssh_key.pub")]
    assert instance_key(tmp_path, "cloudkvm@vm1") == (private, line)
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (private, tmp_path / "ssh_key.pub")] == before


def test_a_pub_without_its_private_key_gives_a_new_pair(tmp_path):
    _, first = instance_key(tmp_path, "c")
    (tmp_path / "ssh_key").unlink()
    private, second = instance_key(tmp_path, "c")
    assert second.split()[1] != first.split()[1]
    assert fingerprint(private).split()[1] == fingerprint(tmp_path / "ssh_key.pub").split()[1]


@pytest.mark.parametrize("garbage", [b"", b"-----BEGIN OPENSSH PRIVATE KEY-----\ntruncated\n", b"\0" * 100])
def test_a_broken_private_key_is_replaced(tmp_path, garbage):
    _, first = instance_key(tmp_path, "c")
    (tmp_path / "ssh_key").write_bytes(garbage)
    private, second = instance_key(tmp_path, "c")
    assert second.split()[1] != first.split()[1]
    assert fingerprint(private).split()[1] == fingerprint(tmp_path / "ssh_key.pub").split()[1]


def test_a_missing_or_wrong_pub_is_written_again_from_the_private_key(tmp_path):
    folder, other = tmp_path / "instance", tmp_path / "other"
    folder.mkdir()
    other.mkdir()
    private, line = instance_key(folder, "c")
    wanted = fingerprint(private).split()[1]
    (folder / "ssh_key.pub").unlink()
    assert instance_key(folder, "c") == (private, line)
    (folder / "ssh_key.pub").write_text(make_key(other, "ed25519") + "\n")
    assert instance_key(folder, "c")[1].split()[:2] == line.split()[:2]
    assert fingerprint(folder / "ssh_key.pub").split()[1] == wanted


def test_a_symlinked_pub_is_replaced_not_written_through(tmp_path):
    instance_key(tmp_path, "c")
    target = tmp_path.parent / f"{tmp_path.name}-target"
    target.write_text("keep\n")
    (tmp_path / "ssh_key.pub").unlink()
    (tmp_path / "ssh_key.pub").symlink_to(target)
    instance_key(tmp_path, "c")
    assert not (tmp_path / "ssh_key.pub").is_symlink() and target.read_text() == "keep\n"


def test_a_private_key_others_can_read_is_made_private_again(tmp_path):
    private, line = instance_key(tmp_path, "c")
    os.chmod(private, 0o644)
    assert instance_key(tmp_path, "c") == (private, line)
    assert private.stat().st_mode & 0o777 == 0o600


def test_without_ssh_keygen_a_one_line_error_says_what_to_install(tmp_path, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(CloudkvmError) as exc:
        instance_key(tmp_path, "c")
    assert exc.value.message.startswith("ssh-keygen not found") and "openssh-client" in exc.value.hint
    assert not (tmp_path / "ssh_key").exists()


# ------------------------------------------------------------------------------------------ keys in a profile

@pytest.mark.parametrize("kind, bits", [("ed25519", None), ("rsa", "2048"), ("ecdsa", "256"), ("ecdsa", "384"),
                                        ("ecdsa", "521")])
def test_keys_ssh_keygen_makes_are_accepted(tmp_path, kind, bits):
    line = make_key(tmp_path, kind, "me@laptop with spaces", bits)
    assert check_public_key(line, "profile.yaml:3") == line
    assert check_public_key(f"  {line}\n", "profile.yaml:3") == line


def _sk_key() -> str:
    """A security-key ed25519 public key as OpenSSH encodes it (PROTOCOL.u2f): type, 32-byte key, application."""
    def string(data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + data
    name = b"sk-ssh-ed25519@openssh.com"
    blob = string(name) + string(bytes(range(32))) + string(b"ssh:")
    return f"{name.decode()} {base64.b64encode(blob).decode()} yubikey"


def test_a_security_key_is_accepted():
    assert check_public_key(_sk_key(), "x") == _sk_key()


@pytest.fixture(scope="module")
def ed25519_line(tmp_path_factory) -> str:
    return make_key(tmp_path_factory.mktemp("k"), "ed25519")


@pytest.mark.parametrize("mutate, words", [
    (lambda k: "", "is empty"),
    (lambda k: 'from="10.0.0.1" ' + k, "authorized_keys options are not taken here"),
    (lambda k: "ssh-dss " + k.split()[1], "is not an ssh public key"),
    (lambda k: "ssh-ed25519", "has no key data"),
    (lambda k: "ssh-ed25519 not*base64!", "is not base64"),
    (lambda k: "ssh-rsa " + k.split()[1], "the ssh-rsa key's data is of type ssh-ed25519"),
    (lambda k: "ssh-ed25519 " + base64.b64encode(base64.b64decode(k.split()[1])[:15]).decode(), "is not an ssh key"),
    (lambda k: "ssh-ed25519 " + base64.b64encode(b"\xff\xff\xff\xffjunk").decode(), "is not an ssh key"),
    (lambda k: k + "\nssh-ed25519 AAAA injected", "line break or control character"),
    (lambda k: k + " comment\x1b[2J", "line break or control character"),
    (lambda k: k + " " + "x" * 20000, "too long"),
])
def test_bad_profile_keys_are_one_line_errors(ed25519_line, mutate, words):
    with pytest.raises(CloudkvmError) as exc:
        check_public_key(mutate(ed25519_line), "profile.yaml:7:5: cloud_init.authorized_keys[0]")
    assert exc.value.message.startswith("profile.yaml:7:5: cloud_init.authorized_keys[0]: ")
    assert words in exc.value.message and "\n" not in str(exc.value)


# ------------------------------------------------------------------------------------------ ~/.ssh/*.pub

def test_user_public_keys_reads_only_public_key_lines_of_pub_files(tmp_path, monkeypatch):
    home = tmp_path / "home"
    ssh = home / ".ssh"
    ssh.mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    ed = make_key(work, "ed25519", "me@laptop")
    rsa = make_key(work, "rsa", "me@old", "2048")
    ecdsa = make_key(work, "ecdsa", "me@hsm", "256")
    (ssh / "id_ed25519.pub").write_text(ed + "\n")
    (ssh / "id_rsa.pub").write_text("# a comment\n\n" + rsa + "\nnot a key\n")
    (ssh / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")  # not .pub
    (ssh / "authorized_keys").write_text(make_key(work, "ed25519") + "\n")  # not .pub
    (ssh / "zz_dup.pub").write_text(ed.rsplit(" ", 1)[0] + " same key other comment\n")
    (ssh / "garbage.pub").write_bytes(b"\xff\xfe\0binary")
    (ssh / "huge.pub").write_text(make_key(work, "ed25519") + "\n" + "#" * (70 << 10))
    (ssh / "dir.pub").mkdir()
    os.mkfifo(ssh / "fifo.pub")  # would block a plain open()
    (work / "elsewhere.pub").write_text(ecdsa + "\n")
    (ssh / "linked.pub").symlink_to(work / "elsewhere.pub")
    (ssh / "dangling.pub").symlink_to(work / "nothing.pub")
    subprocess.run([keygen(), "-t", "ed25519", "-N", "", "-q", "-f", str(work / "ca")], check=True, timeout=30)
    subprocess.run([keygen(), "-s", str(work / "ca"), "-I", "id", "-q", str(ssh / "id_ed25519.pub")], check=True,
                   timeout=30)  # writes id_ed25519-cert.pub
    assert (ssh / "id_ed25519-cert.pub").read_text().startswith("ssh-ed25519-cert-v01@openssh.com ")
    started = time.monotonic()
    keys = user_public_keys(home)
    assert time.monotonic() - started < 5
    assert keys == [ed, rsa, ecdsa]  # file-name order, each key once
    monkeypatch.setenv("HOME", str(home))
    assert user_public_keys() == keys


def test_no_ssh_folder_means_no_keys(tmp_path):
    assert user_public_keys(tmp_path) == []
