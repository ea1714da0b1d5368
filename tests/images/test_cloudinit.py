"""The seed's meta-data, user-data and network-config: read back with PyYAML, the user-data checked by cloud-init's
own schema validator (`cloud-init schema --config-file`), network-config by cloud-init's own network-state parser;
the merge rules; the user's #cloud-config refused with FILE:LINE:COL errors and within bounds on hostile input."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from cloudkvm.errors import CloudkvmError
from cloudkvm.images.cloudinit import (MAX_USER_DATA_BYTES, merge_user_data, meta_data, network_config,
                                       parse_user_data, read_user_data, user_data)

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPGdO3a6M4UCu5gZ8y7KeQb1HyPz4pQnGyCjKk7D5t1B me@laptop"


def cloud_init() -> str:
    found = shutil.which("cloud-init")
    if found is None:
        pytest.fail("cloud-init is missing (the oracle for cloud-config): apt-get install cloud-init "
                    "(scripts/install-deps --test)")
    return found


def schema_check(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    """cloud-init's own validator on `text` as a user-data file."""
    path = tmp_path / "user-data"
    path.write_text(text)
    return subprocess.run([cloud_init(), "schema", "--config-file", str(path)], capture_output=True, text=True,
                          timeout=120)


def cloud_init_python() -> str:
    """The interpreter cloud-init runs under (its script's #! line): the one that can import `cloudinit`."""
    first = Path(cloud_init()).read_text().splitlines()[0]
    assert first.startswith("#!")
    return first[2:].split()[0]


def ours(**overrides) -> str:
    args = dict(user="debian", authorized_keys=[KEY], hostname="vm1", packages=["curl", "jq"], extra=[])
    args.update(overrides)
    return user_data(**args)


# ------------------------------------------------------------------------------------------ meta-data

@pytest.mark.parametrize("instance_id, hostname", [
    ("iid-vm1-5f3a", "vm1"),
    ("12345", "yes"),  # would be a number and a boolean unquoted
    ("a: b # c", "null"),
])
def test_meta_data_reads_back_as_strings(instance_id, hostname):
    assert yaml.safe_load(meta_data(instance_id, hostname)) == {"instance-id": instance_id,
                                                                "local-hostname": hostname}


# ------------------------------------------------------------------------------------------ user-data

def test_user_data_has_the_header_our_user_and_the_settings():
    text = ours()
    assert text.startswith("#cloud-config\n")
    data = yaml.safe_load(text)
    assert data["users"] == [{"name": "debian", "sudo": "ALL=(ALL) NOPASSWD:ALL", "shell": "/bin/bash",
                              "lock_passwd": True, "ssh_authorized_keys": [KEY]}]
    assert data["hostname"] == "vm1"
    assert data["packages"] == ["curl", "jq"]
    assert data["ssh_genkeytypes"] == ["ed25519"]


def test_unset_settings_are_left_out():
    data = yaml.safe_load(ours(hostname=None, packages=[], ssh_genkeytypes=None))
    assert set(data) == {"users"}


def test_user_data_is_valid_cloud_config_for_cloud_init(tmp_path):
    extra = parse_user_data("#cloud-config\nusers:\n- name: bob\n  groups: [adm]\n  shell: /bin/sh\n"
                            "packages: [htop]\nruncmd:\n- [touch, /run/done]\n- echo hi\n"
                            "write_files:\n- path: /etc/motd\n  content: hello\n"
                            "package_update: true\n", "extra.yaml")
    text = ours(extra=[("extra.yaml", extra)])
    result = schema_check(tmp_path, text)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid cloud-config" in result.stdout


def test_the_schema_oracle_does_reject_bad_cloud_config(tmp_path):
    """The validator is not vacuous: a user entry with a key cloud-init does not know is refused."""
    extra = parse_user_data("#cloud-config\nusers:\n- name: bob\n  no_such_key: 1\n", "extra.yaml")
    result = schema_check(tmp_path, ours(extra=[("extra.yaml", extra)]))
    assert result.returncode != 0 and "users.1" in result.stderr


@pytest.mark.parametrize("name", ["Debian", "1abc", "a b", "x" * 33, "", "root;", "-x"])
def test_bad_user_names_are_one_line_errors(name):
    with pytest.raises(CloudkvmError, match=r"^cloud_init.user: .* is not a user name"):
        ours(user=name)


def test_keys_are_stripped_of_surrounding_whitespace():
    assert yaml.safe_load(ours(authorized_keys=[f"  {KEY}\n"]))["users"][0]["ssh_authorized_keys"] == [KEY]


def test_a_key_with_a_line_break_is_refused():
    with pytest.raises(ValueError):
        ours(authorized_keys=[KEY + "\nssh-rsa AAAA injected"])


# ------------------------------------------------------------------------------------------ merging

def test_lists_append_later_sources_after_earlier_ones():
    first = parse_user_data("#cloud-config\nusers: [{name: bob}]\npackages: [htop]\n", "one.yaml")
    second = parse_user_data("#cloud-config\nusers: [{name: eve}]\npackages: [git]\n", "two.yaml")
    data = yaml.safe_load(ours(extra=[("one.yaml", first), ("two.yaml", second)]))
    assert [u["name"] for u in data["users"]] == ["debian", "bob", "eve"]
    assert data["packages"] == ["curl", "jq", "htop", "git"]


def test_mappings_merge_recursively_and_later_scalars_win():
    first = parse_user_data("#cloud-config\nhostname: one\napt:\n  conf: A\n  sources: {x: {source: s1}}\n",
                            "one.yaml")
    second = parse_user_data("#cloud-config\nhostname: two\napt:\n  sources: {y: {source: s2}}\n  conf: B\n",
                             "two.yaml")
    data = yaml.safe_load(ours(extra=[("one.yaml", first), ("two.yaml", second)]))
    assert data["hostname"] == "two"
    assert data["apt"] == {"conf": "B", "sources": {"x": {"source": "s1"}, "y": {"source": "s2"}}}


def test_the_output_counts_its_parts_without_host_paths():
    extra = parse_user_data("#cloud-config\nruncmd: [a]\n", "/home/me/extra.yaml")
    text = ours(extra=[("/home/me/extra.yaml", extra)])
    assert text.splitlines()[1] == "# written by cloudkvm: its own settings and 1 more part(s)"
    assert "/home/me" not in text  # the guest does not learn where the host keeps its files


@pytest.mark.parametrize("text, words", [
    ("#cloud-config\npackages: curl\n", r"two.yaml: user-data packages: a value here cannot merge with a list "
                                        r"from cloudkvm's cloud_init settings"),
    ("#cloud-config\nusers: {name: bob}\n", r"user-data users: a mapping here cannot merge with a list"),
    ("#cloud-config\nruncmd: {a: 1}\n", r"user-data runcmd: a mapping here cannot merge with a list from one.yaml"),
])
def test_kinds_that_cannot_merge_name_both_sources(text, words):
    first = parse_user_data("#cloud-config\nruncmd: [x]\n", "one.yaml")
    with pytest.raises(CloudkvmError, match=words):
        ours(extra=[("one.yaml", first), ("two.yaml", parse_user_data(text, "two.yaml"))])


def test_merging_leaves_its_inputs_unchanged():
    first = {"runcmd": ["a"], "apt": {"conf": "x"}}
    second = {"runcmd": ["b"], "apt": {"sources": {}}}
    merged = merge_user_data([("one", first), ("two", second)])
    merged["runcmd"].append("c")
    assert first == {"runcmd": ["a"], "apt": {"conf": "x"}} and second == {"runcmd": ["b"], "apt": {"sources": {}}}


# ------------------------------------------------------------------------------------------ the user's user-data

@pytest.mark.parametrize("text", [
    "packages: [a]\n",
    "#!/bin/sh\necho hi\n",
    "#cloud-config-archive\n- type: text/cloud-config\n",
    "#include\nhttp://example.com/x\n",
    "Content-Type: multipart/mixed; boundary=x\n",
    "\n#cloud-config\n",
    "",
])
def test_anything_but_the_cloud_config_header_is_refused_at_line_1(text):
    with pytest.raises(CloudkvmError) as exc:
        parse_user_data(text, "extra.yaml")
    assert str(exc.value).startswith("extra.yaml:1:1: user-data must start with the line #cloud-config")
    assert "only #cloud-config" in exc.value.hint and "\n" not in str(exc.value)


@pytest.mark.parametrize("text", ["#cloud-config\r\nruncmd: [a]\r\n", "#cloud-config  \nruncmd: [a]\n",
                                  "\ufeff#cloud-config\nruncmd: [a]\n"])
def test_the_header_tolerates_crlf_trailing_spaces_and_a_bom(text):
    assert parse_user_data(text, "x") == {"runcmd": ["a"]}


def test_an_empty_cloud_config_is_an_empty_mapping():
    assert parse_user_data("#cloud-config\n# nothing yet\n", "x") == {}


@pytest.mark.parametrize("text, position, words", [
    ("#cloud-config\npackages:\n  - a\n bad: [\n", "4:2", "did not find expected key"),
    ("#cloud-config\nruncmd: [a, b\nx: 1\n", "3:2", "did not find expected ',' or ']'"),
    ("#cloud-config\nruncmd:\n\t- a\n", "3:1", "cannot start any token"),
    ("#cloud-config\n- a\n", "2:1", "must be a mapping of cloud-config keys"),
    ("#cloud-config\nruncmd: [a]\npackages: []\nruncmd: [b]\n", "4:1", "duplicate key 'runcmd' (first at line 2)"),
    ("#cloud-config\na: 2024-13-45\n", "2:4", "month must be in 1..12"),
    ("#cloud-config\na: !shell ls\n", "2:4", "could not determine a constructor"),
    ("#cloud-config\na: !!set {x, y}\n", "2:4", "tag:yaml.org,2002:set is not supported"),
    ("#cloud-config\nruncmd:\n  - ok\n  - \x07\n", "4:5", "the control character '\\x07'"),
    ("#cloud-config\na: x\n? [k]\n: v\n", "3:3", "keys must be plain words"),
])
def test_yaml_errors_name_the_file_line_and_column(text, position, words):
    with pytest.raises(CloudkvmError) as exc:
        parse_user_data(text, "extra.yaml")
    assert str(exc.value).startswith(f"extra.yaml:{position}: "), str(exc.value)
    assert words in exc.value.message and "\n" not in str(exc.value)


def test_tabs_get_the_tab_hint():
    with pytest.raises(CloudkvmError) as exc:
        parse_user_data("#cloud-config\nruncmd:\n\t- a\n", "x")
    assert "tabs" in exc.value.hint


def test_aliases_and_merge_keys_within_bounds_work():
    text = "#cloud-config\nbase: &b {x: 1, y: 2}\nother:\n  <<: *b\n  y: 3\nagain: *b\n"
    assert parse_user_data(text, "x") == {"base": {"x": 1, "y": 2}, "other": {"x": 1, "y": 3},
                                          "again": {"x": 1, "y": 2}}


def _bomb(levels: int) -> str:
    lines = ["#cloud-config", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def _merge_bomb(levels: int) -> str:
    lines = ["#cloud-config", "m0: &m0 {k: 1}"]
    lines += [f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}], k{i}: 1}}" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, words", [
    (_bomb(9), "expands to more than 200000 values"),
    (_merge_bomb(60), "expands to more than 200000 values"),
    ("#cloud-config\na: &a [1, *a]\n", "a YAML alias refers to the value it is part of"),
    ("#cloud-config\na: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than 64 levels"),
    ("#cloud-config\na: [" + "1," * 250_000 + "]\n", "more than 200000 keys and values"),
    ("#cloud-config\na: " + "9" * 5000 + "\n", "is too long"),
], ids=["alias-bomb", "merge-key-bomb", "recursive-alias", "deep-nesting", "too-many-nodes", "huge-number"])
def test_hostile_yaml_is_refused_quickly(text, words):
    started = time.monotonic()
    with pytest.raises(CloudkvmError, match=words):
        parse_user_data(text, "x")
    assert time.monotonic() - started < 10


def test_more_than_a_mebibyte_is_refused_before_parsing():
    text = "#cloud-config\nruncmd:\n" + "  - " + "a" * MAX_USER_DATA_BYTES + "\n"
    with pytest.raises(CloudkvmError, match=r"^x: user-data is larger than 1 MiB"):
        parse_user_data(text, "x")


def test_read_user_data_checks_the_file(tmp_path):
    good = tmp_path / "extra.yaml"
    good.write_text("#cloud-config\nruncmd: [a]\n")
    assert read_user_data(good) == {"runcmd": ["a"]}
    broken = tmp_path / "broken.yaml"
    broken.write_bytes(b"#cloud-config\nruncmd: [a]\npackages: [\xff]\n")
    with pytest.raises(CloudkvmError, match=r"broken.yaml:3:12: not UTF-8 text"):
        read_user_data(broken)
    with pytest.raises(CloudkvmError, match=r"^shown.yaml:2:10: YAML syntax error: mapping values are not allowed"):
        (tmp_path / "bad.yaml").write_text("#cloud-config\nruncmd: a: b\n")
        read_user_data(tmp_path / "bad.yaml", display="shown.yaml")
    with pytest.raises(CloudkvmError, match=r"missing.yaml: cannot read the user-data"):
        read_user_data(tmp_path / "missing.yaml")
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(MAX_USER_DATA_BYTES + 1)
    with pytest.raises(CloudkvmError, match=r"larger than 1 MiB"):
        read_user_data(big)


# ------------------------------------------------------------------------------------------ network-config

V2 = {"version": 2, "ethernets": {"all": {"match": {"name": "e*"}, "dhcp4": True}}}


def cloud_init_network_state(text: str) -> str:
    """cloud-init's own parser of network configuration on `text`: the interfaces and subnets it finds."""
    script = ("import sys\nfrom cloudinit import safeyaml\nfrom cloudinit.net.network_state import "
              "parse_net_config_data\nstate = parse_net_config_data(safeyaml.load(sys.stdin.read()), "
              "skip_broken=False)\nprint(state.version, [(i['name'], [s['type'] for s in i['subnets']]) "
              "for i in state.iter_interfaces()])\n")
    return subprocess.run([cloud_init_python(), "-c", script], input=text, capture_output=True, text=True,
                          check=True, timeout=120).stdout.strip()


def test_network_config_v2_reads_back_and_cloud_init_parses_it():
    text = network_config(V2)
    assert yaml.safe_load(text) == V2
    assert cloud_init_network_state(text) == "2 [('all', ['dhcp4'])]"


def test_a_network_wrapper_is_dropped():
    assert yaml.safe_load(network_config({"network": V2})) == V2


def test_network_config_v1_is_taken():
    v1 = {"version": 1, "config": [{"type": "physical", "name": "eth0", "subnets": [{"type": "dhcp"}]}]}
    text = network_config(v1)
    assert yaml.safe_load(text) == v1
    assert cloud_init_network_state(text) == "1 [('eth0', ['dhcp'])]"


@pytest.mark.parametrize("value", [{"ethernets": {}}, {"version": 3}, {"version": "2"}, {"version": True}])
def test_network_config_needs_version_1_or_2(value):
    with pytest.raises(CloudkvmError, match=r"^profile.yaml:12: version must be 1 or 2"):
        network_config(value, where="profile.yaml:12")
