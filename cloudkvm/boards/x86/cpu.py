"""x86 CPU policy: KVM's supported CPUID shaped per vCPU (Intel SDM Vol. 2A, CPUID) with named features hidden."""
import difflib
from dataclasses import dataclass, field

from ...errors import CloudkvmError

# name -> (leaf, subleaf, register, bit); Intel SDM Vol. 2A CPUID tables 3-10/3-11, leaf 7 and 0xD; AMD APM 3 E.4.2
FEATURES: dict[str, tuple[int, int, str, int]] = {
    "sse3": (1, 0, "ecx", 0), "pclmulqdq": (1, 0, "ecx", 1), "monitor": (1, 0, "ecx", 3), "vmx": (1, 0, "ecx", 5),
    "ssse3": (1, 0, "ecx", 9), "fma": (1, 0, "ecx", 12), "cx16": (1, 0, "ecx", 13), "pcid": (1, 0, "ecx", 17),
    "sse4_1": (1, 0, "ecx", 19), "sse4_2": (1, 0, "ecx", 20), "x2apic": (1, 0, "ecx", 21),
    "movbe": (1, 0, "ecx", 22), "popcnt": (1, 0, "ecx", 23), "tsc_deadline": (1, 0, "ecx", 24),
    "aes": (1, 0, "ecx", 25), "xsave": (1, 0, "ecx", 26), "avx": (1, 0, "ecx", 28), "f16c": (1, 0, "ecx", 29),
    "rdrand": (1, 0, "ecx", 30), "hypervisor": (1, 0, "ecx", 31),
    "mtrr": (1, 0, "edx", 12), "pse36": (1, 0, "edx", 17), "ht": (1, 0, "edx", 28),
    "fsgsbase": (7, 0, "ebx", 0), "bmi1": (7, 0, "ebx", 3), "hle": (7, 0, "ebx", 4), "avx2": (7, 0, "ebx", 5),
    "smep": (7, 0, "ebx", 7), "bmi2": (7, 0, "ebx", 8), "erms": (7, 0, "ebx", 9), "invpcid": (7, 0, "ebx", 10),
    "rtm": (7, 0, "ebx", 11), "mpx": (7, 0, "ebx", 14), "avx512f": (7, 0, "ebx", 16), "rdseed": (7, 0, "ebx", 18),
    "adx": (7, 0, "ebx", 19), "smap": (7, 0, "ebx", 20), "clflushopt": (7, 0, "ebx", 23), "clwb": (7, 0, "ebx", 24),
    "sha_ni": (7, 0, "ebx", 29), "umip": (7, 0, "ecx", 2), "pku": (7, 0, "ecx", 3), "la57": (7, 0, "ecx", 16),
    "rdpid": (7, 0, "ecx", 22), "fsrm": (7, 0, "edx", 4), "arch_capabilities": (7, 0, "edx", 29),
    "xsaveopt": (0xD, 1, "eax", 0), "xsavec": (0xD, 1, "eax", 1), "xsaves": (0xD, 1, "eax", 3),
    "abm": (0x80000001, 0, "ecx", 5), "pdpe1gb": (0x80000001, 0, "edx", 26), "rdtscp": (0x80000001, 0, "edx", 27),
    "kvmclock": (0x40000001, 0, "eax", 3), "kvmclock_legacy": (0x40000001, 0, "eax", 0),
}
# Linux's capability word for each CPUID register we name (arch/x86/include/asm/cpufeatures.h, `enum cpuid_leafs`):
# clearcpuid= takes word * 32 + bit, which also fits its 127-character limit where names would not.
LINUX_CAP_WORDS = {(1, 0, "edx"): 0, (0x80000001, 0, "edx"): 1, (1, 0, "ecx"): 4, (0x80000001, 0, "ecx"): 6,
                   (7, 0, "ebx"): 9, (0xD, 1, "eax"): 10, (7, 0, "ecx"): 16, (7, 0, "edx"): 18}
DEPENDENTS = {"xsave": ("avx", "avx2", "avx512f", "xsaveopt", "xsavec", "xsaves", "fma", "f16c"),
              "kvmclock": ("kvmclock_legacy",)}


def check_feature_names(names: list[str], where: str = "cpu.hide") -> None:
    """Raise a user error naming the first unknown feature, with a did-you-mean."""
    for name in names:
        if name not in FEATURES:
            close = difflib.get_close_matches(name, FEATURES, n=1)
            hint = f"did you mean '{close[0]}'?" if close else "known: " + ", ".join(sorted(FEATURES))
            raise CloudkvmError(f"{where}: unknown CPU feature '{name}'", hint)


LINUX_CLEARCPUID_MAX = 127  # Linux copies clearcpuid's value into a 128-byte buffer (cpu_parse_early_param)


def linux_clearcpuid(names) -> str:
    """`clearcpuid=` for Linux hiding `names` (those with a Linux capability word), or "" when none has one.
    Raises ValueError when the value would not fit Linux's buffer (it would silently drop the rest)."""
    bits = []
    for name in names:
        leaf, sub, reg, bit = FEATURES[name]
        word = LINUX_CAP_WORDS.get((leaf, sub, reg))
        if word is not None:
            bits.append(word * 32 + bit)
    value = ",".join(str(b) for b in sorted(set(bits)))
    if len(value) > LINUX_CLEARCPUID_MAX:
        raise ValueError(f"clearcpuid= would be {len(value)} characters; Linux reads {LINUX_CLEARCPUID_MAX}")
    return f"clearcpuid={value}" if value else ""


@dataclass
class CpuPolicy:
    """`host` model: what KVM supports, plus the hypervisor bit and our topology, minus `hide`."""

    model: str = "host"
    hide: list[str] = field(default_factory=list)

    def hidden(self) -> set[str]:
        check_feature_names(self.hide)
        out = set(self.hide)
        for name in list(out):
            out.update(DEPENDENTS.get(name, ()))
        return out

    def cpuid_for(self, supported: list[dict], apic_id: int, ncpus: int) -> list[dict]:
        """The CPUID table for the vCPU with `apic_id` in a VM of `ncpus` single-threaded cores on one socket."""
        entries = [dict(e) for e in supported]
        by_key = {(e["function"], e["index"]): e for e in entries}
        hidden = self.hidden()
        for name in hidden:
            leaf, sub, reg, bit = FEATURES[name]
            entry = by_key.get((leaf, sub))
            if entry is not None:
                entry[reg] &= ~(1 << bit)
        core_bits = max(0, (ncpus - 1).bit_length())
        for entry in entries:
            fn, sub = entry["function"], entry["index"]
            if fn == 1:
                entry["ebx"] = (entry["ebx"] & 0x0000FFFF) | (min(ncpus, 255) << 16) | ((apic_id & 0xFF) << 24)
                if "hypervisor" not in hidden:
                    entry["ecx"] |= 1 << 31
                if ncpus > 1 and "ht" not in hidden:
                    entry["edx"] |= 1 << 28  # HTT: the logical-processor count in EBX[23:16] is valid
            elif fn == 4 and entry["eax"] & 0x1F:  # deterministic cache parameters: cores per package
                entry["eax"] = (entry["eax"] & 0x03FFFFFF) | (min(ncpus - 1, 63) << 26)  # a 6-bit field
                entry["eax"] &= ~(0xFFF << 14)  # each cache is private to one core (no SMT siblings)
            elif fn == 0xB:  # x2APIC topology (SDM Vol. 3A §9.9): level 0 = SMT (1 thread), level 1 = core
                entry["flags"] |= 1  # KVM_CPUID_FLAG_SIGNIFCANT_INDEX
                if sub == 0:
                    entry.update(eax=0, ebx=1, ecx=(1 << 8) | 0, edx=apic_id)
                elif sub == 1:
                    entry.update(eax=core_bits, ebx=ncpus, ecx=(2 << 8) | 1, edx=apic_id)
                else:
                    entry.update(eax=0, ebx=0, ecx=sub, edx=apic_id)
        if 0xB in {e["function"] for e in entries} and (0xB, 1) not in by_key:
            entries.append({"function": 0xB, "index": 1, "flags": 1, "eax": core_bits, "ebx": ncpus,
                            "ecx": (2 << 8) | 1, "edx": apic_id})
        return entries
