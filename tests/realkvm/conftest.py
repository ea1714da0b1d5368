"""Fixtures for tests that run in an emulated KVM test host (tests/testhosts): a real, upstream /dev/kvm.

The hosts are built into the cache on first use. Where a tool they need is missing (no QEMU, no apt: not a
Debian host) the tests skip and say why, except under CLOUDKVM_REQUIRE_REALKVM=1 (set by .ci/run), where that is
a failure. A build that fails (no network, not root for `dpkg --add-architecture arm64`) is an error."""
import os
import shutil

import pytest

from testhosts import get_host
from testhosts.recipes import RECIPES

REQUIRED = os.environ.get("CLOUDKVM_REQUIRE_REALKVM") == "1"


def _missing_tools(name: str) -> list[str]:
    tools = [RECIPES[name].qemu, "apt-get", "dpkg-deb"]
    if not RECIPES[name].own_root:
        tools += ["mmdebstrap", "aarch64-linux-gnu-gcc"]
    return [t for t in tools if shutil.which(t) is None]


@pytest.fixture(scope="session")
def testhost():
    """testhost(name) -> the TestHost x86_64 or arm64, built once per session."""
    hosts = {}

    def get(name: str):
        if name not in hosts:
            missing = _missing_tools(name)
            if missing:
                why = f"the {name} test host needs {', '.join(missing)} (scripts/install-deps --test installs them)"
                if REQUIRED:
                    pytest.fail(why)
                print(why)
                pytest.skip(why)
            hosts[name] = get_host(name)
        return hosts[name]
    return get
