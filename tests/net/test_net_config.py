"""net/config.py: the user network's own plain config (what SlirpBackend takes), built by the launcher from a
profile and by the backend's plain-argument form from strings; the profile checks the same rules through it."""
import ast
from pathlib import Path

import pytest

from cloudkvm.errors import CloudkvmError
from cloudkvm.launcher import user_net_config
from cloudkvm.net.config import DEFAULT_NET, HostForward, UserNetConfig, parse_forward, user_net
from cloudkvm.profile import validate_profile

NET = Path(__file__).resolve().parents[2] / "cloudkvm" / "net"


def test_strings_dicts_and_forward_objects_become_plain_forwards():
    config = user_net(forwards=["tcp::2222-:22", {"proto": "udp", "host_port": 5353, "guest_port": 53},
                                HostForward("tcp", 8080, 80, "0.0.0.0", "10.0.2.20")])
    assert config == UserNetConfig(DEFAULT_NET, (
        HostForward("tcp", 2222, 22), HostForward("udp", 5353, 53),
        HostForward("tcp", 8080, 80, host_ip="0.0.0.0", guest_ip="10.0.2.20")), restrict=False)
    assert [f.spec() for f in config.forwards] == ["tcp:127.0.0.1:2222-:22", "udp:127.0.0.1:5353-:53",
                                                   "tcp:0.0.0.0:8080-10.0.2.20:80"]


def test_the_launcher_builds_the_backend_config_from_a_profile(tmp_path):
    (tmp_path / "k").write_text("k")
    profile = validate_profile({"name": "n", "arch": "x86_64", "boot": {"kernel": "k"}, "network": {
        "mode": "user", "net": "192.168.76.0/24", "restrict": True,
        "forwards": ["tcp:127.0.0.1:1122-:22", {"proto": "udp", "host_port": 7000, "guest_ip": "192.168.76.9",
                                                "guest_port": 7}]}}, tmp_path)
    config = user_net_config(profile)
    assert config == UserNetConfig("192.168.76.0/24", (HostForward("tcp", 1122, 22),
                                                       HostForward("udp", 7000, 7, guest_ip="192.168.76.9")), True)
    assert [f.spec() for f in config.forwards] == [f.spec() for f in profile.network.forwards]


@pytest.mark.parametrize("kwargs, message", [
    ({"net": "10.0.2.0/30"}, "network.net: '10.0.2.0/30' is too small for user networking (at most /28)"),
    ({"net": "10.0.2.1/24"}, "network.net: '10.0.2.1/24' is not an IPv4 network: 10.0.2.1/24 has host bits set"),
    ({"forwards": ["tcp::0-:22"]}, "network.forwards[0].host_port: Input should be greater than or equal to 1"),
    ({"forwards": ["sctp::1-:2"]}, "network.forwards[0].proto: protocol 'sctp' is neither tcp nor udp"),
    ({"forwards": ["tcp:localhost:1-:2"]}, "network.forwards[0].host_ip: 'localhost' is not an IPv4 address"),
    ({"forwards": [{"proto": "tcp", "host_port": 1}]}, "network.forwards[0].guest_port: Field required"),
    ({"forwards": [{"host_port": True, "guest_port": 2}]},
     "network.forwards[0].host_port: expected a port number, not True"),
    ({"forwards": ["udp:0.0.0.0:53-:53", "udp:127.0.0.1:53-:5353"]},
     "network.forwards[1]: host port udp:127.0.0.1:53 is already forwarded by forwards[0]"),
    ({"mtu": 65521}, "network.mtu: MTU 65521 is outside 1280..65520"),
    ({"mtu": 576}, "network.mtu: MTU 576 is outside 1280..65520"),
    ({"mtu": True}, "network.mtu: MTU True is outside 1280..65520"),
])
def test_plain_values_that_cannot_work_are_one_line_errors(kwargs, message):
    with pytest.raises(CloudkvmError) as err:
        user_net(**kwargs)
    assert err.value.message == message and err.value.hint


def test_the_mtu_reaches_the_backend_config_and_defaults_to_64k(tmp_path):
    (tmp_path / "k").write_text("k")
    profile = {"name": "n", "boot": {"kernel": "k"}, "network": {"mode": "user"}}
    assert user_net_config(validate_profile(profile, tmp_path)).mtu == 65520
    profile["network"]["mtu"] = 1500
    assert user_net_config(validate_profile(profile, tmp_path)).mtu == 1500
    profile["network"]["mtu"] = 70000
    with pytest.raises(CloudkvmError) as err:
        validate_profile(profile, tmp_path, source="p.yaml")
    assert "network.mtu: MTU 70000 is outside 1280..65520" in str(err.value)


def test_the_profile_says_the_same_through_its_own_fields(tmp_path):
    (tmp_path / "k").write_text("k")
    with pytest.raises(CloudkvmError) as err:
        validate_profile({"name": "n", "boot": {"kernel": "k"}, "network": {
            "mode": "user", "forwards": ["tcp::5000-:22", "tcp::5000-:23"]}}, tmp_path, source="p.yaml")
    assert "network.forwards[1]: host port tcp:127.0.0.1:5000 is already forwarded by forwards[0]" in str(err.value)
    assert parse_forward("udp:1.2.3.4:1-:2") == {"proto": "udp", "host_ip": "1.2.3.4", "host_port": 1,
                                                 "guest_port": 2}


@pytest.mark.parametrize("name", ["slirp.py", "config.py", "backend.py"])
def test_the_network_backend_does_not_know_the_profile(name):
    tree = ast.parse((NET / name).read_text())
    modules = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {m for m in modules if m.lstrip(".") in ("profile", "cloudkvm.profile") or m.startswith("pydantic")}
