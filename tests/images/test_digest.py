"""Image digests: profile syntax, the distributions' checksum-file formats, and streaming verification, with the
coreutils `sha256sum`/`sha512sum` (GNU and `--tag` BSD output) as the oracle for the digests of real files."""
import shutil
import subprocess

import pytest

from cloudkvm.errors import CloudkvmError
from cloudkvm.images.digest import Digest, digest_from_sums, file_digest, is_digest, parse_digest, verify

SHA256 = "a" * 64
SHA512 = "b" * 128


def coreutils(tool: str, path, *flags) -> str:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed (coreutils)")
    return subprocess.run([tool, *flags, str(path)], capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("text, expected", [
    (f"sha256:{SHA256}", Digest("sha256", SHA256)),
    (f"SHA512:{SHA512.upper()}", Digest("sha512", SHA512)),
    (f"  sha256:{SHA256.upper()} ", Digest("sha256", SHA256)),
])
def test_profile_digests_are_read_in_any_case(text, expected):
    assert parse_digest(text) == expected and str(parse_digest(text)) == str(expected)


@pytest.mark.parametrize("text, words", [
    ("md5:" + "a" * 32, "is not a digest"),
    (SHA256, "is not a digest"),
    ("sha256:" + "a" * 63, "64 hex digits"),
    ("sha512:" + "g" * 128, "128 hex digits"),
    ("sha256:" + "a" * 64 + "\n", None),  # trailing whitespace is stripped: valid
])
def test_malformed_digests_are_one_line_errors(text, words):
    if words is None:
        assert parse_digest(text).hex == "a" * 64
        return
    with pytest.raises(CloudkvmError) as err:
        parse_digest(text, "images[0].digest")
    assert words in err.value.message and err.value.message.startswith("images[0].digest:")
    assert "\n" not in err.value.message and err.value.hint


def test_gnu_and_bsd_checksum_files_as_published(tmp_path):
    image = tmp_path / "debian-12-genericcloud-arm64.qcow2"
    image.write_bytes(b"not really an image" * 1000)
    other = tmp_path / "debian-12-genericcloud-amd64.qcow2"
    other.write_bytes(b"another")
    gnu = coreutils("sha512sum", other) + coreutils("sha512sum", image) + "\n# a comment\n"
    bsd = coreutils("sha256sum", other, "--tag") + coreutils("sha256sum", image, "--tag")
    gnu = gnu.replace(str(tmp_path) + "/", "")  # as distributions publish them: names relative to the folder
    bsd = bsd.replace(str(tmp_path) + "/", "")
    from_gnu = digest_from_sums(gnu, "https://cloud.debian.org/images/cloud/bookworm/latest/" + image.name)
    from_bsd = digest_from_sums(bsd, image.name)
    assert from_gnu.algorithm == "sha512" and from_gnu.hex == coreutils("sha512sum", image).split()[0]
    assert from_bsd.algorithm == "sha256" and from_bsd.hex == coreutils("sha256sum", image).split()[0]
    verify(image, from_gnu)
    verify(image, from_bsd)


def test_a_binary_mode_line_and_a_missing_name():
    line = f"{SHA256} *ubuntu-24.04-server-cloudimg-amd64.img\n"
    assert digest_from_sums(line, "ubuntu-24.04-server-cloudimg-amd64.img") == Digest("sha256", SHA256)
    with pytest.raises(CloudkvmError, match="lists no checksum for other.img"):
        digest_from_sums(line, "other.img", "SHA256SUMS")


def test_a_file_that_is_not_the_image_is_refused_naming_both_digests(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(3 << 20))  # several read chunks
    actual = coreutils("sha256sum", image).split()[0]
    assert file_digest(image, "sha256") == actual
    with pytest.raises(CloudkvmError) as err:
        verify(image, Digest("sha256", SHA256))
    assert actual in err.value.message and SHA256 in err.value.message and "not used" in err.value.hint


@pytest.mark.parametrize("text, shaped", [
    ("sha256:" + "ab" * 32, True), ("SHA512:ABC", True), ("md5:0123", True), (" sha256:abc ", True),
    ("https://example.org/SHA256SUMS", False), ("/srv/images:2024/SHA256SUMS", False), ("SHA256SUMS", False),
    ("file:///srv/SHA256SUMS", False),
])
def test_is_digest_tells_a_digest_from_a_checksum_file(text, shaped):
    assert is_digest(text) is shaped
