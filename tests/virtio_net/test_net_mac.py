"""mac_for: a stable, locally administered, unicast MAC per VM name; format/parse helpers."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloudkvm.devices.virtio.net import format_mac, mac_for, parse_mac
from cloudkvm.errors import CloudkvmError


def test_known_value():
    # pinned: 02 + SHA-256("cloudkvm-mac:" + name)[:5]; changing the scheme would change every VM's address
    assert mac_for("vm1") == bytes.fromhex("0262c3ffc294")
    assert format_mac(mac_for("vm1")) == "02:62:c3:ff:c2:94"


@given(st.text(max_size=64))
def test_stable_locally_administered_unicast(name):
    mac = mac_for(name)
    assert len(mac) == 6
    assert mac == mac_for(name)
    assert mac[0] & 0x02                 # locally administered (IEEE 802 U/L bit)
    assert not mac[0] & 0x01             # unicast (I/G bit clear)
    assert mac[0] == 0x02


def test_different_names_different_macs():
    names = [f"vm{i}" for i in range(2000)] + ["", "web", "Web", "web ", "wéb", "\udc80"]
    assert len({mac_for(n) for n in names}) == len(names)


@pytest.mark.parametrize("text, mac", [("02:00:00:aa:bb:cc", "020000aabbcc"), ("52-54-00-12-34-56", "525400123456"),
                                       ("FF:ff:00:00:00:01", "ffff00000001")])
def test_parse_and_format(text, mac):
    assert parse_mac(text) == bytes.fromhex(mac)
    assert parse_mac(format_mac(parse_mac(text))) == parse_mac(text)


@pytest.mark.parametrize("text", ["", "02:00:00:aa:bb", "02:00:00:aa:bb:cc:dd", "0g:00:00:00:00:00",
                                  "2:0:0:0:0:0", "020000aabbcc", "02:00:00:aa:bb:+c"])
def test_parse_errors(text):
    with pytest.raises(CloudkvmError, match="not a MAC address"):
        parse_mac(text)
