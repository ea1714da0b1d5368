"""The /dev/kvm system handle: API version, capabilities, supported CPUID, vCPU mmap size."""
import errno
import os

from ..errors import KvmUnavailable
from .native import ffi, lib

KVM_DEVICE = "/dev/kvm"


def ioctl(fd: int, request: int, arg=0) -> int:
    """One ioctl through the cffi core; raises OSError with the errno on failure."""
    ret = lib.ioctl(fd, request, ffi.cast("unsigned long", arg) if isinstance(arg, int) else arg)
    if ret < 0:
        err = ffi.errno
        raise OSError(err, f"{os.strerror(err)} (ioctl 0x{request:x})")
    return ret


class Kvm:
    """An open /dev/kvm."""

    def __init__(self, path: str = KVM_DEVICE):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(f"{path} does not exist",
                                 "load the kvm module (modprobe kvm_intel / kvm_amd) or run on a host with KVM") from None
        except PermissionError:
            raise KvmUnavailable(f"{path}: permission denied",
                                 "add your user to the 'kvm' group or run as root") from None
        except OSError as exc:  # a folder (EISDIR), a node without a driver (ENXIO, ENODEV), ...
            raise KvmUnavailable(f"{path} cannot be opened as a KVM device ({exc.strerror or exc})",
                                 "point cloudkvm at /dev/kvm, and load kvm_intel / kvm_amd") from None
        try:
            version = ioctl(self.fd, lib.KVM_GET_API_VERSION)
        except OSError as exc:
            os.close(self.fd)
            raise KvmUnavailable(f"{path} is not a KVM device ({exc.strerror})",
                                 "point cloudkvm at /dev/kvm") from None
        if version != lib.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailable(f"{path} speaks KVM API {version}, expected {lib.KVM_API_VERSION}",
                                 "use a Linux kernel with the stable KVM API (2.6.22 or later)")
        self.api_version = version
        self.vcpu_mmap_size = ioctl(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when absent, otherwise a capability-specific positive value."""
        try:
            return ioctl(self.fd, lib.KVM_CHECK_EXTENSION, cap)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return 0
            raise

    def max_vcpus(self) -> int:
        return self.check_extension(lib.KVM_CAP_MAX_VCPUS) or self.check_extension(lib.KVM_CAP_NR_VCPUS) or 4

    def supported_cpuid(self) -> list[dict]:
        """KVM_GET_SUPPORTED_CPUID (x86): entries as dicts with function/index/flags/eax/ebx/ecx/edx."""
        nent = 256
        while True:
            buf = ffi.new("struct kvm_cpuid2 *", {"nent": nent, "entries": nent})
            try:
                ioctl(self.fd, lib.KVM_GET_SUPPORTED_CPUID, buf)
                break
            except OSError as exc:
                if exc.errno != errno.E2BIG or nent > 4096:
                    raise
                nent *= 2
        keys = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")
        return [{k: getattr(buf.entries[i], k) for k in keys} for i in range(buf.nent)]

    def create_vm(self, vm_type: int = 0) -> int:
        """KVM_CREATE_VM: the new VM's fd (wrap it in `Vm`)."""
        return ioctl(self.fd, lib.KVM_CREATE_VM, vm_type)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def kvm_available(path: str = KVM_DEVICE) -> tuple[bool, str]:
    """Whether KVM can be used here, and why not (for test skips and `cloudkvm doctor`)."""
    try:
        Kvm(path).close()
        return True, ""
    except KvmUnavailable as exc:
        return False, str(exc)
