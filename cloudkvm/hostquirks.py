"""Detects hosts whose KVM needs workarounds (e.g. the software `kvm_pvm` module) and says so once."""
import logging
import os
from dataclasses import dataclass, field

log = logging.getLogger("cloudkvm.hostquirks")
SYS_MODULE = "/sys/module"


@dataclass(frozen=True)
class HostQuirks:
    """What this host's KVM cannot do, as actions a board applies: CPUID bits to hide, kernel parameters to add."""

    name: str = ""
    cpuid_hide: tuple[str, ...] = ()
    linux_cmdline: tuple[str, ...] = ()
    linux_clearcpuid: tuple[str, ...] = ()  # features to clear in Linux too (clearcpuid=): the KVM ignores CPUID
    boot_assists: bool = False  # guest kernel code is interpreted: the VMM finishes what it can do at once
    notes: tuple[str, ...] = field(default=())

    @property
    def active(self) -> bool:
        return bool(self.name)


# kvm_pvm interprets guest CPL0 code; its emulator stops on `lock cmpxchg16b`, `xrstor`, `clac`, `popcnt` and
# more (docs/host-quirks.md). Its guests see mostly the host's CPUID whatever KVM_SET_CPUID2 says (the cx16 bit
# is honoured, popcnt/smap/umip are not), so Linux guests are also told with clearcpuid=, and XSAVE with noxsave.
# sse3/ssse3/sse4: Linux's boot-time users (blake2s_compress_ssse3 for the RNG) run SSE code at CPL0.
# cryptomgr.notests: interpreted, the crypto self-tests' RSA math outlasts the kernel's 60 s wait for them, so
# loading the built-in X.509 key fails with -ETIMEDOUT and the boot then spends many minutes in MPI code.
PVM_LINUX_CLEARED = ("cx16", "smap", "smep", "umip", "pcid", "invpcid", "fsgsbase", "popcnt", "bmi1", "bmi2",
                     "abm", "movbe", "rdrand", "rdseed", "erms", "fsrm", "avx", "avx2", "avx512f", "aes",
                     "pclmulqdq", "sha_ni", "adx", "rdpid", "clflushopt", "clwb", "sse3", "ssse3", "sse4_1",
                     "sse4_2")
# xsave* are cleared in Linux by noxsave (their parent), so they stay out of the 127-character clearcpuid=.
PVM_HIDDEN_FEATURES = PVM_LINUX_CLEARED + ("xsaveopt", "xsavec", "xsaves")
PVM_QUIRKS = HostQuirks(
    name="kvm_pvm",
    cpuid_hide=PVM_HIDDEN_FEATURES,
    linux_cmdline=("noxsave", "nopti", "cryptomgr.notests"),
    linux_clearcpuid=PVM_LINUX_CLEARED,
    boot_assists=True,
    notes=("software KVM (kvm_pvm): guest kernel code is interpreted, expect slow guest kernels",),
)

_announced: set[str] = set()


def detect(sys_module: str = SYS_MODULE) -> HostQuirks:
    """The quirks this host needs (empty when none)."""
    if os.path.isdir(os.path.join(sys_module, "kvm_pvm")):
        return PVM_QUIRKS
    return HostQuirks()


def announce(quirks: HostQuirks) -> None:
    """Log the active quirks once per process."""
    if quirks.active and quirks.name not in _announced:
        _announced.add(quirks.name)
        log.warning("host quirks for %s: hiding %d CPUID features, adding '%s' to Linux command lines, "
                    "completing instructions its emulator rejects (details: cloudkvm doctor; turn off with "
                    "host_quirks: false)", quirks.name, len(quirks.cpuid_hide), " ".join(quirks.linux_cmdline))
