"""The libslirp binding: version negotiation, clear errors, and struct layouts checked against the C header."""
import shutil
import subprocess
from pathlib import Path

import pytest

from cloudkvm.errors import CloudkvmError
from cloudkvm.net import slirp_ffi
from cloudkvm.net.slirp_ffi import ffi

HEADER = Path("/usr/include/slirp/libslirp.h")


@pytest.mark.parametrize("version, expected", [
    ("4.7.0", 4), ("4.8.0", 4), ("4.9.1-dirty", 4), ("5.0", 4),
    ("4.6.1", 3), ("4.3.0", 3), ("4.2.0", 2), ("4.1.0", 1),
])
def test_config_version_is_the_highest_both_sides_know(version, expected):
    assert slirp_ffi.config_version_for(version) == expected


@pytest.mark.parametrize("version", ["4.0.0", "3.1"])
def test_too_old_a_library_is_a_clear_error(version):
    with pytest.raises(CloudkvmError) as info:
        slirp_ffi.config_version_for(version)
    assert info.value.message == f"libslirp {version} is too old, need 4.1 or newer (4.7 preferred)"
    assert "\n" not in str(info.value)


def test_an_unreadable_version_is_a_clear_error():
    with pytest.raises(CloudkvmError, match="cannot read the libslirp version"):
        slirp_ffi.config_version_for("git-master")


def test_a_missing_library_says_what_to_install():
    with pytest.raises(CloudkvmError) as info:
        slirp_ffi.load("libslirp-not-there.so.0")
    assert "libslirp0 is not installed" in info.value.message
    assert "apt-get install libslirp0" in info.value.message
    assert "\n" not in str(info.value)


def test_the_installed_library_loads():
    try:
        loaded = slirp_ffi.load()
    except CloudkvmError as exc:
        pytest.skip(str(exc))
    assert slirp_ffi.parse_version(loaded.version) >= (4, 1, 0)
    assert 1 <= loaded.config_version <= slirp_ffi.HEADER_CONFIG_VERSION


CONFIG_FIELDS = ["version", "restricted", "in_enabled", "vnetwork", "vnetmask", "vhost", "in6_enabled",
                 "vprefix_addr6", "vprefix_len", "vhost6", "vhostname", "tftp_server_name", "tftp_path", "bootfile",
                 "vdhcp_start", "vnameserver", "vnameserver6", "vdnssearch", "vdomainname", "if_mtu", "if_mru",
                 "disable_host_loopback", "enable_emu", "outbound_addr", "outbound_addr6", "disable_dns",
                 "disable_dhcp"]
CB_FIELDS = ["send_packet", "guest_error", "clock_get_ns", "timer_new", "timer_free", "timer_mod",
             "register_poll_fd", "unregister_poll_fd", "notify", "init_completed", "timer_new_opaque"]


@pytest.mark.skipif(not HEADER.exists() or shutil.which("gcc") is None,
                    reason="needs gcc and libslirp-dev (/usr/include/slirp/libslirp.h)")
def test_declared_layouts_match_the_installed_header(tmp_path):
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include <slirp/libslirp.h>', 'int main(void) {',
             'printf("SLIRP_CONFIG_VERSION_MAX %d\\n", SLIRP_CONFIG_VERSION_MAX);',
             'printf("sizeof SlirpConfig %zu\\n", sizeof(SlirpConfig));',
             'printf("sizeof SlirpCb %zu\\n", sizeof(SlirpCb));']
    lines += [f'printf("SlirpConfig.{f} %zu\\n", offsetof(SlirpConfig, {f}));' for f in CONFIG_FIELDS]
    lines += [f'printf("SlirpCb.{f} %zu\\n", offsetof(SlirpCb, {f}));' for f in CB_FIELDS]
    lines += ["return 0; }"]
    source = tmp_path / "layout.c"
    source.write_text("\n".join(lines))
    subprocess.run(["gcc", "-o", str(tmp_path / "layout"), str(source)], check=True)
    out = subprocess.run([str(tmp_path / "layout")], check=True, capture_output=True, text=True).stdout
    c = dict(line.rsplit(" ", 1) for line in out.splitlines())
    if int(c["SLIRP_CONFIG_VERSION_MAX"]) < slirp_ffi.HEADER_CONFIG_VERSION:
        pytest.skip(f"the installed header is older (config version {c['SLIRP_CONFIG_VERSION_MAX']})")
    ours = {"sizeof SlirpConfig": ffi.sizeof("SlirpConfig"), "sizeof SlirpCb": ffi.sizeof("SlirpCb")}
    ours |= {f"SlirpConfig.{f}": ffi.offsetof("SlirpConfig", f) for f in CONFIG_FIELDS}
    ours |= {f"SlirpCb.{f}": ffi.offsetof("SlirpCb", f) for f in CB_FIELDS}
    theirs = {key: int(value) for key, value in c.items() if key in ours}
    if int(c["SLIRP_CONFIG_VERSION_MAX"]) > slirp_ffi.HEADER_CONFIG_VERSION:
        # a newer header appends fields: only the offsets we declare must agree
        ours = {k: v for k, v in ours.items() if not k.startswith("sizeof")}
        theirs = {k: v for k, v in theirs.items() if k in ours}
    assert ours == theirs
