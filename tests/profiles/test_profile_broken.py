"""The broken-profile corpus: every file in broken/ fails with one line naming the file, the line and the field.

Each expectation is (where, substring): `where` is `<file>:<line>:` of the place the message must point at (the
corpus file itself, or the base file the error is in), `substring` what the message must say there.
"""
import pytest

from cloudkvm.errors import CloudkvmError
from cloudkvm.profile import load_profile
from profile_testdata import BROKEN

EXPECT = {
    "01-bad-indentation.yaml": ("01-bad-indentation.yaml:4:", "YAML syntax error"),
    "02-tab-indentation.yaml": ("02-tab-indentation.yaml:3:", "'\\t'"),
    "03-unclosed-quote.yaml": ("03-unclosed-quote.yaml:4:", "never closed"),
    "04-cpus-two.yaml": ("04-cpus-two.yaml:2:", "cpus: Input should be a valid integer"),
    "05-unknown-top-level-key.yaml": ("05-unknown-top-level-key.yaml:4:", "memroy: unknown key"),
    "06-unknown-nested-key.yaml": ("06-unknown-nested-key.yaml:3:", "boot.kernal: unknown key"),
    "07-missing-name.yaml": ("07-missing-name.yaml:2:", "name: required field is missing"),
    "08-missing-kernel.yaml": ("08-missing-kernel.yaml:3:", "boot.kernel: boot needs a kernel, or from_image: true"),
    "09-missing-kernel-file.yaml": ("09-missing-kernel-file.yaml:3:", "boot.kernel: no such file"),
    "10-bad-memory-unit.yaml": ("10-bad-memory-unit.yaml:2:", "memory: cannot read '4X' as a size"),
    "11-memory-too-small.yaml": ("11-memory-too-small.yaml:4:", "memory: 8M is too little memory"),
    "12-cpus-zero.yaml": ("12-cpus-zero.yaml:2:", "cpus: Input should be greater than or equal to 1"),
    "13-bad-arch.yaml": ("13-bad-arch.yaml:2:", "arch: Input should be 'x86_64' or 'aarch64'"),
    "14-arch-machine-mismatch.yaml": ("14-arch-machine-mismatch.yaml:3:", "machine: machine 'x86' does not fit"),
    "15-unknown-cpu-feature.yaml": ("15-unknown-cpu-feature.yaml:7:", "cpu.hide[1]: unknown CPU feature 'avx512fx'"),
    "16-forward-no-proto.yaml": ("16-forward-no-proto.yaml:7:", "network.forwards[0]: the forward"),
    "17-forward-port-zero.yaml": ("17-forward-port-zero.yaml:8:", "network.forwards[1].host_port"),
    "18-forward-port-70000.yaml": ("18-forward-port-70000.yaml:9:", "network.forwards[0].guest_port"),
    "19-forward-bad-ip.yaml": ("19-forward-bad-ip.yaml:6:", "'127.0.0.300' is not an IPv4 address"),
    "20-forward-duplicate-host-port.yaml": ("20-forward-duplicate-host-port.yaml:9:",
                                            "network.forwards[2]: host port tcp:127.0.0.1:2222 is already forwarded"),
    "21-disk-missing-file.yaml": ("21-disk-missing-file.yaml:6:", "disks[1].file: required field is missing"),
    "22-disk-file-not-found.yaml": ("22-disk-file-not-found.yaml:7:", "disks[1].file: no such file"),
    "23-disk-bad-format.yaml": ("23-disk-bad-format.yaml:6:", "disks[0].format: Input should be 'qcow2' or 'raw'"),
    "24-base-cycle-a.yaml": ("25-base-cycle-b.yaml:4:",
                             "base cycle: 24-base-cycle-a.yaml -> 25-base-cycle-b.yaml -> 24-base-cycle-a.yaml"),
    "25-base-cycle-b.yaml": ("24-base-cycle-a.yaml:2:",
                             "base cycle: 25-base-cycle-b.yaml -> 24-base-cycle-a.yaml -> 25-base-cycle-b.yaml"),
    "26-base-missing-file.yaml": ("26-base-missing-file.yaml:4:", "base[1]: cannot read the base profile"),
    "27-unset-env-var.yaml": ("27-unset-env-var.yaml:3:", "environment variable CLOUDKVM_TEST_UNSET is not set"),
    "28-base-url.yaml": ("28-base-url.yaml:2:", "base URLs are not supported yet"),
    "29-boot-is-a-list.yaml": ("29-boot-is-a-list.yaml:3:", "boot: Input should be a valid dictionary"),
    "30-bad-name.yaml": ("30-bad-name.yaml:1:", "name: 'my vm' is not a valid name"),
    "31-daemonize-not-bool.yaml": ("31-daemonize-not-bool.yaml:4:", "daemonize: Input should be a valid boolean"),
    "32-duplicate-key.yaml": ("32-duplicate-key.yaml:5:", "memory: duplicate key (first at line 2)"),
    "33-forward-without-user-net.yaml": ("33-forward-without-user-net.yaml:6:", "port forwards need mode: user"),
    "34-console-serial-mismatch.yaml": ("34-console-serial-mismatch.yaml:6:", "console.serial"),
    "35-hide-on-aarch64.yaml": ("35-hide-on-aarch64.yaml:3:", "cpu.hide[0]: hiding CPU features is only supported"),
    "36-forward-bad-proto.yaml": ("36-forward-bad-proto.yaml:7:", "network.forwards[0].proto"),
    "37-forward-unknown-key.yaml": ("37-forward-unknown-key.yaml:8:", "network.forwards[0].hots_port: unknown key"),
    "38-empty-file.yaml": ("38-empty-file.yaml:1:", "the profile is empty"),
    "39-not-a-map.yaml": ("39-not-a-map.yaml:1:", "a profile must be a map"),
    "40-bad-variable-syntax.yaml": ("40-bad-variable-syntax.yaml:4:", "boot.cmdline: '${1ROOT}' is not a variable"),
    "41-base-wrong-type.yaml": ("41-base-wrong-type.yaml:3:", "base: expected a path or a list of paths"),
    "42-memory-not-whole-mib.yaml": ("42-memory-not-whole-mib.yaml:4:", "not a whole number of MiB"),
    "43-cpus-too-many.yaml": ("43-cpus-too-many.yaml:4:", "cpus: Input should be less than or equal to 255"),
    "44-read-only-disk-grown.yaml": ("44-read-only-disk-grown.yaml:7:", "disks[0].size: a read-only disk cannot"),
    "45-guest-ip-outside-net.yaml": ("45-guest-ip-outside-net.yaml:8:", "network.forwards[0].guest_ip"),
    "46-bad-network-mode.yaml": ("46-bad-network-mode.yaml:4:", "network.mode: Input should be 'none' or 'user'"),
    "47-error-in-base.yaml": ("_parts/base-with-typo.yaml:3:", "boot.comdline: unknown key"),
    "48-missing-initrd-in-base-folder.yaml": ("_parts/base-with-initrd.yaml:4:", "boot.initrd: no such file"),
    "49-disk-interface.yaml": ("49-disk-interface.yaml:6:", "disks[0].interface: Input should be 'virtio-blk'"),
    "50-cpu-model.yaml": ("50-cpu-model.yaml:2:", "cpu.model: Input should be 'host'"),
    # hostile input: each ends in one line, quickly (the tests below have a hard timeout)
    "51-alias-bomb.yaml": ("51-alias-bomb.yaml:5:", "the profile expands to more than 10000 values"),
    "52-merge-key-bomb.yaml": ("52-merge-key-bomb.yaml:5:", "the profile expands to more than 10000 values"),
    "53-deep-nesting.yaml": ("53-deep-nesting.yaml:4:41:", "the profile is nested more than 32 levels deep"),
    "54-nul-escape.yaml": ("54-nul-escape.yaml:3:11:", "boot.kernel: a NUL character"),
    "55-huge-integer.yaml": ("55-huge-integer.yaml:2:7:", "cpus: the number 11111111111111111111... is too long"),
    "56-huge-hex-integer.yaml": ("56-huge-hex-integer.yaml:4:9:", "memory: the number 0xffff"),
    "57-size-overflow.yaml": ("57-size-overflow.yaml:4:9:", "memory: '9999"),
    "58-not-a-date.yaml": ("58-not-a-date.yaml:4:12:", "boot.cmdline: cannot read '2024-13-45'"),
    "59-base-fan-out.yaml": ("_parts/fan-d.yaml:1:", "the profile and its bases name more than 32 files"),
    "60-number-too-large.yaml": ("60-number-too-large.yaml:2:7:", "cpus: the number '0x10000000000000000' is too "
                                                                  "large"),
}
# The did-you-mean hints that must survive.
HINTS = {
    "05-unknown-top-level-key.yaml": "did you mean 'memory'?",
    "06-unknown-nested-key.yaml": "did you mean 'kernel'?",
    "15-unknown-cpu-feature.yaml": "did you mean 'avx512f'?",
    "37-forward-unknown-key.yaml": "did you mean 'host_port'?",
    "47-error-in-base.yaml": "did you mean 'cmdline'?",
    "02-tab-indentation.yaml": "spaces, not tabs",
}
CORPUS = sorted(path.name for path in BROKEN.glob("*.yaml"))


def test_corpus_and_expectations_match():
    assert len(CORPUS) >= 30
    assert sorted(EXPECT) == CORPUS


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", CORPUS)
def test_broken_profile(name):
    with pytest.raises(CloudkvmError) as info:
        load_profile(BROKEN / name, env={"HOME": "/nonexistent"})
    err = info.value
    where, substring = EXPECT[name]
    assert "\n" not in str(err), "one line"
    assert f"/{where}" in err.message, err.message
    assert substring in err.message, err.message
    assert err.message.index(where) < err.message.index(substring.split(":")[0])
    assert err.hint, "every error says how to fix it"
    if name in HINTS:
        assert HINTS[name] in err.hint


def test_only_the_first_error_is_reported(tree):
    folder = tree({"p.yaml": """
        name: two errors
        cpus: 0
        boot: {kernel: k}
        """})
    with pytest.raises(CloudkvmError) as info:
        load_profile(folder / "p.yaml", check_files=False)
    assert "p.yaml:1:" in info.value.message and "cpus" not in info.value.message


def test_a_typo_is_reported_before_the_missing_field_it_causes(tree):
    folder = tree({"p.yaml": """
        name: typo
        boot:
          kernal: vmlinuz
        """})
    with pytest.raises(CloudkvmError, match=r"p\.yaml:3:3: boot\.kernal: unknown key"):
        load_profile(folder / "p.yaml", check_files=False)


def test_missing_profile_file(tmp_path):
    with pytest.raises(CloudkvmError, match="cannot read the profile: no such file"):
        load_profile(tmp_path / "nope.yaml")


def test_missing_files_are_reported_only_when_checked():
    profile = load_profile(BROKEN / "09-missing-kernel-file.yaml", check_files=False)
    assert profile.boot.kernel == BROKEN / "_files" / "no-such-vmlinuz"


def test_unwritable_disk_needs_overlay_or_read_only(tree, stubs, monkeypatch):
    tree({"p.yaml": """
        name: ro
        boot: {kernel: vmlinuz}
        disks:
          - file: disk.qcow2
          - file: disk.raw
            read_only: true
          - file: disk.raw
            overlay: true
          - file: disk.qcow2
        """})
    import cloudkvm.profile as profile_module
    real_access = profile_module.os.access
    monkeypatch.setattr(profile_module.os, "access",  # as if not root: disk.qcow2 cannot be written
                        lambda path, mode: False if mode == profile_module.os.W_OK else real_access(path, mode))
    with pytest.raises(CloudkvmError, match=r"p\.yaml:4:11: disks\[0\]\.file: cannot write") as info:
        load_profile(stubs / "p.yaml")
    assert "overlay: true" in info.value.hint


def test_recursive_alias_is_an_error(tree):
    folder = tree({"p.yaml": """
        name: loop
        boot: &b
          kernel: k
          again: *b
        """})
    with pytest.raises(CloudkvmError, match=r"p\.yaml:\d+:\d+: "):
        load_profile(folder / "p.yaml", check_files=False)


def test_non_utf8_file(tmp_path):
    (tmp_path / "p.yaml").write_bytes(b"name: x\nboot:\n  cmdline: \xff\xfe\n")
    with pytest.raises(CloudkvmError, match=r"p\.yaml:3:12: not UTF-8"):
        load_profile(tmp_path / "p.yaml", check_files=False)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", CORPUS)
def test_up_of_a_broken_profile_exits_2_with_one_line_and_starts_nothing(name, tmp_path, monkeypatch, capsys):
    """The whole CLI path: `cloudkvm up broken.yaml` — exit code 2, one line naming the file and line, no instance."""
    import sys

    from cloudkvm import cli

    state = tmp_path / "state"
    monkeypatch.setenv("CLOUDKVM_STATE_DIR", str(state))
    monkeypatch.setattr(sys, "argv", ["cloudkvm", "up", str(BROKEN / name)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    where, what = EXPECT[name]
    assert exit_.value.code == 2 and len(lines) == 1, err
    assert where in lines[0] and what in lines[0], lines[0]
    assert not state.exists() or not any(state.iterdir())
