"""Emulated KVM test hosts: QEMU TCG machines whose Linux has a real (upstream) /dev/kvm (docs/testing.md)."""
from .host import RunResult, TestHost, get_host

__all__ = ["RunResult", "TestHost", "get_host"]
