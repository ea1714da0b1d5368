"""Kvm / kvm_available error paths, without needing a working /dev/kvm (positive checks: tests/kvm/test_kvm_core.py)."""
import errno
import os

import pytest

from cloudkvm.errors import CloudkvmError, KvmUnavailable
from cloudkvm.kvm import system
from cloudkvm.kvm.native import ffi, lib
from cloudkvm.kvm.system import Kvm, ioctl, kvm_available


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.fixture
def not_kvm(tmp_path):
    """A path that opens fine but is not a KVM device (every KVM ioctl fails with ENOTTY)."""
    p = tmp_path / "kvm"
    p.write_bytes(b"")
    return str(p)


def test_missing_device_is_kvm_unavailable_with_a_hint(tmp_path):
    path = str(tmp_path / "no" / "kvm")
    with pytest.raises(KvmUnavailable) as exc:
        Kvm(path)
    assert path in exc.value.message
    assert "does not exist" in exc.value.message
    assert "modprobe" in exc.value.hint
    assert isinstance(exc.value, CloudkvmError) and exc.value.exit_code == 2
    assert exc.value.__cause__ is None and exc.value.__suppress_context__  # `from None`: no OSError chain


def test_unpermitted_device_is_kvm_unavailable_with_a_hint(monkeypatch):
    def denied(path, flags, *args):
        raise PermissionError(errno.EACCES, "Permission denied", path)
    monkeypatch.setattr(system.os, "open", denied)  # root is never denied by a chmod, so fake the open
    with pytest.raises(KvmUnavailable) as exc:
        Kvm("/dev/kvm-test")
    assert exc.value.message == "/dev/kvm-test: permission denied"
    assert "'kvm' group" in exc.value.hint


def test_kvm_available_says_why_not_for_a_missing_path(tmp_path):
    path = str(tmp_path / "kvm")
    ok, why = kvm_available(path)
    assert ok is False
    assert path in why and "does not exist" in why
    assert "hint:" in why  # str(KvmUnavailable) carries the hint


def test_a_file_that_is_not_kvm_is_a_user_error(not_kvm):
    # The open succeeds and KVM_GET_API_VERSION fails with ENOTTY: a one-line KvmUnavailable naming the path.
    with pytest.raises(KvmUnavailable) as exc:
        Kvm(not_kvm)
    assert not_kvm in exc.value.message and "not a KVM device" in exc.value.message
    assert exc.value.hint


def test_a_directory_is_not_kvm(tmp_path):
    with pytest.raises((KvmUnavailable, OSError)):
        Kvm(str(tmp_path))


def test_a_failed_open_does_not_leak_the_fd(not_kvm):
    before = open_fds()
    with pytest.raises((KvmUnavailable, OSError)):
        Kvm(not_kvm)
    assert open_fds() == before


def test_kvm_available_says_why_not_for_a_non_kvm_file(not_kvm):
    ok, why = kvm_available(not_kvm)
    assert ok is False and why


def test_wrong_api_version_is_kvm_unavailable_and_closes_the_fd(monkeypatch):
    real_ioctl = system.ioctl

    def fake_ioctl(fd, request, arg=0):
        if request == lib.KVM_GET_API_VERSION:
            return lib.KVM_API_VERSION - 1
        return real_ioctl(fd, request, arg)
    monkeypatch.setattr(system, "ioctl", fake_ioctl)
    before = open_fds()
    with pytest.raises(KvmUnavailable) as exc:
        Kvm("/dev/null")
    assert f"API {lib.KVM_API_VERSION - 1}" in exc.value.message
    assert f"expected {lib.KVM_API_VERSION}" in exc.value.message
    assert exc.value.hint
    assert open_fds() == before
    ok, why = kvm_available("/dev/null")
    assert ok is False and "API" in why


def test_ioctl_raises_oserror_with_errno_and_request():
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as exc:
        ioctl(r, lib.KVM_GET_API_VERSION)  # a closed fd
    assert exc.value.errno == errno.EBADF
    assert f"ioctl 0x{lib.KVM_GET_API_VERSION:x}" in str(exc.value)


def fake_kvm(monkeypatch, handler):
    """A Kvm object whose ioctls go to `handler(request, arg)` (no device needed)."""
    kvm = object.__new__(Kvm)
    kvm.fd = -1
    monkeypatch.setattr(system, "ioctl", lambda fd, request, arg=0: handler(request, arg))
    return kvm


def test_check_extension_treats_einval_as_absent(monkeypatch):
    def handler(request, cap):
        assert request == lib.KVM_CHECK_EXTENSION
        if cap == 1:
            raise OSError(errno.EINVAL, "bad cap")
        if cap == 2:
            raise OSError(errno.EBADF, "broken")
        return 7
    kvm = fake_kvm(monkeypatch, handler)
    assert kvm.check_extension(1) == 0
    assert kvm.check_extension(3) == 7
    with pytest.raises(OSError) as exc:
        kvm.check_extension(2)
    assert exc.value.errno == errno.EBADF


@pytest.mark.parametrize("caps,expected", [
    ({"max": 1024, "nr": 240}, 1024),
    ({"max": 0, "nr": 240}, 240),
    ({"max": 0, "nr": 0}, 4),       # KVM says neither: the documented fallback of 4
])
def test_max_vcpus_falls_back(monkeypatch, caps, expected):
    def handler(request, cap):
        return {lib.KVM_CAP_MAX_VCPUS: caps["max"], lib.KVM_CAP_NR_VCPUS: caps["nr"]}[cap]
    assert fake_kvm(monkeypatch, handler).max_vcpus() == expected


def test_supported_cpuid_grows_the_buffer_on_e2big(monkeypatch):
    sizes = []

    def handler(request, buf):
        assert request == lib.KVM_GET_SUPPORTED_CPUID
        sizes.append(buf.nent)
        if buf.nent < 1024:
            raise OSError(errno.E2BIG, "too small")
        buf.nent = 2
        for i, fn in enumerate((0, 0x80000000)):
            e = buf.entries[i]
            e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx = fn, 0, 0, fn + 1, 2, 3, 4
        return 0
    entries = fake_kvm(monkeypatch, handler).supported_cpuid()
    assert sizes == [256, 512, 1024]
    assert entries == [
        {"function": 0, "index": 0, "flags": 0, "eax": 1, "ebx": 2, "ecx": 3, "edx": 4},
        {"function": 0x80000000, "index": 0, "flags": 0, "eax": 0x80000001, "ebx": 2, "ecx": 3, "edx": 4},
    ]


def test_supported_cpuid_gives_up_eventually(monkeypatch):
    sizes = []

    def handler(request, buf):
        sizes.append(buf.nent)
        raise OSError(errno.E2BIG, "never enough")
    with pytest.raises(OSError) as exc:
        fake_kvm(monkeypatch, handler).supported_cpuid()
    assert exc.value.errno == errno.E2BIG
    assert sizes[0] == 256 and sizes[-1] <= 8192 and len(sizes) <= 6


def test_supported_cpuid_passes_other_errors_through(monkeypatch):
    def handler(request, buf):
        raise OSError(errno.EFAULT, "bad address")
    with pytest.raises(OSError) as exc:
        fake_kvm(monkeypatch, handler).supported_cpuid()
    assert exc.value.errno == errno.EFAULT


def test_close_is_idempotent():
    kvm = object.__new__(Kvm)
    kvm.fd = os.open("/dev/null", os.O_RDONLY)
    fd = kvm.fd
    kvm.close()
    assert kvm.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)
    kvm.close()


def test_cdata_types_exist():
    # the structs the wrappers allocate are part of the compiled core
    for ctype in ("struct kvm_cpuid2 *", "struct kvm_userspace_memory_region *", "struct kvm_irqfd *",
                  "struct kvm_ioeventfd *", "struct kvm_regs *", "struct kvm_sregs *", "struct kvm_fpu *",
                  "struct kvm_msrs *", "struct kvm_lapic_state *", "struct kvm_translation *"):
        assert ffi.sizeof(ffi.typeof(ctype).item) > 0
    assert ffi.sizeof("struct kvm_lapic_state") == 1024
    assert ffi.sizeof("struct kvm_regs") == 18 * 8
