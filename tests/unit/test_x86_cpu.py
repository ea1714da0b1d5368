"""CpuPolicy.cpuid_for on a synthetic KVM_GET_SUPPORTED_CPUID list: hidden features (and what depends on them),
the hypervisor bit, and the per-vCPU topology fields (Intel SDM Vol. 2A CPUID, Vol. 3A §9.9)."""
import copy

import pytest

from cloudkvm.boards.x86.cpu import DEPENDENTS, FEATURES, CpuPolicy, check_feature_names
from cloudkvm.errors import CloudkvmError

ALL = 0xFFFFFFFF
HTT = 1 << 28
HYPERVISOR = 1 << 31
LEAF4_EAX = 0x0400_4121  # data cache, level 1, self-initialising; 2 threads share it, 2 cores per package


def supported() -> list[dict]:
    """Every feature register all ones (so a cleared bit is visible), except what the policy itself sets."""
    return [
        {"function": 0, "index": 0, "flags": 0, "eax": 0xD, "ebx": 0x756E6547, "ecx": 0x6C65746E, "edx": 0x49656E69},
        {"function": 1, "index": 0, "flags": 0, "eax": 0xC06F2, "ebx": 0xAB12_0800,
         "ecx": ALL & ~HYPERVISOR, "edx": ALL & ~HTT},
        {"function": 4, "index": 0, "flags": 1, "eax": LEAF4_EAX, "ebx": 0x01C0003F, "ecx": 0x3F, "edx": 0},
        {"function": 4, "index": 1, "flags": 1, "eax": 0, "ebx": 0, "ecx": 0, "edx": 0},  # no more caches
        {"function": 7, "index": 0, "flags": 1, "eax": 0, "ebx": ALL, "ecx": ALL, "edx": ALL},
        {"function": 0xB, "index": 0, "flags": 0, "eax": 1, "ebx": 2, "ecx": 0x100, "edx": 0x77},
        {"function": 0xD, "index": 1, "flags": 1, "eax": 0xF, "ebx": 0, "ecx": 0, "edx": 0},
        {"function": 0x80000001, "index": 0, "flags": 0, "eax": 0, "ebx": 0, "ecx": ALL, "edx": ALL},
        {"function": 0x40000001, "index": 0, "flags": 0, "eax": 0x01007EFB, "ebx": 0, "ecx": 0, "edx": 0},
    ]


def entry(entries, fn, sub=0):
    found = [e for e in entries if e["function"] == fn and e["index"] == sub]
    assert len(found) == 1, f"leaf 0x{fn:x}.{sub}: {found}"
    return found[0]


def bit(entries, name) -> int:
    leaf, sub, reg, b = FEATURES[name]
    return (entry(entries, leaf, sub)[reg] >> b) & 1


# --- the unhidden policy ---------------------------------------------------------------------------------

def test_plain_policy_shapes_topology_and_leaves_the_rest():
    out = CpuPolicy().cpuid_for(supported(), apic_id=3, ncpus=4)
    src = supported()
    assert entry(out, 0) == entry(src, 0)
    l1 = entry(out, 1)
    assert l1["eax"] == 0xC06F2
    assert l1["ebx"] == 0x0304_0800          # APIC id 3, 4 logical processors, low 16 bits kept
    assert l1["ecx"] == ALL                  # the hypervisor bit is added
    assert l1["edx"] == ALL                  # HTT is added (more than one CPU)
    assert entry(out, 4, 0)["eax"] == (LEAF4_EAX & 0x3FFF) | (3 << 26)  # 4 cores, no sharing threads
    assert entry(out, 4, 0)["ebx"] == 0x01C0003F
    assert entry(out, 4, 1) == entry(src, 4, 1)  # the null terminator is not given a core count
    for fn, sub in ((7, 0), (0xD, 1), (0x80000001, 0), (0x40000001, 0)):
        assert entry(out, fn, sub) == entry(src, fn, sub)


def test_x2apic_topology_leaf():
    out = CpuPolicy().cpuid_for(supported(), apic_id=3, ncpus=4)
    smt, core = entry(out, 0xB, 0), entry(out, 0xB, 1)
    assert smt == {"function": 0xB, "index": 0, "flags": 1, "eax": 0, "ebx": 1, "ecx": 0x100, "edx": 3}
    # subleaf 1 was not in the supported list: it is added, describing the core level
    assert core == {"function": 0xB, "index": 1, "flags": 1, "eax": 2, "ebx": 4, "ecx": 0x201, "edx": 3}


def test_existing_x2apic_subleaves_are_rewritten_not_duplicated():
    src = supported() + [
        {"function": 0xB, "index": 1, "flags": 0, "eax": 9, "ebx": 9, "ecx": 9, "edx": 9},
        {"function": 0xB, "index": 2, "flags": 0, "eax": 9, "ebx": 9, "ecx": 9, "edx": 9},
    ]
    out = CpuPolicy().cpuid_for(src, apic_id=5, ncpus=6)
    assert len(out) == len(src)
    assert entry(out, 0xB, 1) == {"function": 0xB, "index": 1, "flags": 1, "eax": 3, "ebx": 6, "ecx": 0x201,
                                  "edx": 5}
    assert entry(out, 0xB, 2) == {"function": 0xB, "index": 2, "flags": 1, "eax": 0, "ebx": 0, "ecx": 2, "edx": 5}


def test_no_x2apic_leaf_is_invented_when_kvm_has_none():
    src = [e for e in supported() if e["function"] != 0xB]
    out = CpuPolicy().cpuid_for(src, apic_id=0, ncpus=2)
    assert not [e for e in out if e["function"] == 0xB]
    assert len(out) == len(src)


@pytest.mark.parametrize("ncpus,core_bits", [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (8, 3), (9, 4), (64, 6)])
def test_core_bits_cover_every_apic_id(ncpus, core_bits):
    out = CpuPolicy().cpuid_for(supported(), apic_id=ncpus - 1, ncpus=ncpus)
    core = entry(out, 0xB, 1)
    assert core["eax"] == core_bits
    assert (ncpus - 1) >> core["eax"] == 0   # every APIC id shifts down to package 0
    assert core["ebx"] == ncpus


@pytest.mark.parametrize("apic_id", [0, 1, 7, 200, 255])
def test_apic_id_in_leaf_1_and_leaf_b(apic_id):
    out = CpuPolicy().cpuid_for(supported(), apic_id=apic_id, ncpus=256)
    assert entry(out, 1)["ebx"] >> 24 == apic_id
    assert entry(out, 0xB, 0)["edx"] == apic_id
    assert entry(out, 0xB, 1)["edx"] == apic_id


@pytest.mark.parametrize("ncpus,count", [(1, 1), (2, 2), (16, 16), (255, 255), (256, 255), (1024, 255)])
def test_logical_processor_count_saturates_at_255(ncpus, count):
    out = CpuPolicy().cpuid_for(supported(), apic_id=1, ncpus=ncpus)
    assert (entry(out, 1)["ebx"] >> 16) & 0xFF == count
    assert entry(out, 1)["ebx"] >> 24 == 1
    assert entry(out, 1)["ebx"] & 0xFFFF == 0x0800


def test_htt_only_with_more_than_one_cpu():
    one = CpuPolicy().cpuid_for(supported(), apic_id=0, ncpus=1)
    two = CpuPolicy().cpuid_for(supported(), apic_id=0, ncpus=2)
    assert entry(one, 1)["edx"] & HTT == 0
    assert entry(two, 1)["edx"] & HTT == HTT
    assert entry(one, 1)["edx"] | HTT == entry(two, 1)["edx"]  # nothing else differs


@pytest.mark.parametrize("ncpus", [1, 2, 7, 64])
def test_leaf4_cores_field_and_no_sharing_threads(ncpus):
    eax = entry(CpuPolicy().cpuid_for(supported(), apic_id=0, ncpus=ncpus), 4, 0)["eax"]
    assert eax >> 26 == ncpus - 1              # EAX[31:26]: cores per package - 1
    assert (eax >> 14) & 0xFFF == 0            # EAX[25:14]: threads sharing this cache - 1
    assert eax & 0x3FFF == LEAF4_EAX & 0x3FFF  # type, level, flags untouched


def test_hypervisor_bit_is_set_and_hideable():
    assert entry(CpuPolicy().cpuid_for(supported(), 0, 1), 1)["ecx"] & HYPERVISOR
    hidden = CpuPolicy(hide=["hypervisor"]).cpuid_for(supported(), 0, 1)
    assert entry(hidden, 1)["ecx"] & HYPERVISOR == 0
    assert entry(hidden, 1)["ecx"] == ALL & ~HYPERVISOR


def test_hypervisor_bit_cleared_even_when_kvm_reports_it():
    src = supported()
    entry(src, 1)["ecx"] = ALL
    assert entry(CpuPolicy(hide=["hypervisor"]).cpuid_for(src, 0, 1), 1)["ecx"] == ALL & ~HYPERVISOR


# --- hiding ----------------------------------------------------------------------------------------------

def expected_after_hiding(names, apic_id, ncpus):
    out = CpuPolicy().cpuid_for(supported(), apic_id=apic_id, ncpus=ncpus)
    closure = set(names)
    for n in names:
        closure.update(DEPENDENTS.get(n, ()))
    for n in closure:
        leaf, sub, reg, b = FEATURES[n]
        entry(out, leaf, sub)[reg] &= ~(1 << b)
    return out


CASES = [(name, ncpus) for name in sorted(FEATURES) for ncpus in (1, 4) if (name, ncpus) != ("ht", 4)]


@pytest.mark.parametrize("name,ncpus", CASES)
def test_hiding_one_feature_clears_exactly_its_bit_and_dependents(name, ncpus):
    out = CpuPolicy(hide=[name]).cpuid_for(supported(), apic_id=ncpus - 1, ncpus=ncpus)
    assert bit(out, name) == 0
    assert out == expected_after_hiding([name], ncpus - 1, ncpus)


def test_hiding_ht_is_honoured_on_smp():
    out = CpuPolicy(hide=["ht"]).cpuid_for(supported(), apic_id=0, ncpus=4)
    assert entry(out, 1)["edx"] & HTT == 0


def test_hiding_xsave_clears_everything_built_on_it():
    out = CpuPolicy(hide=["xsave"]).cpuid_for(supported(), apic_id=0, ncpus=1)
    l1, l7, xd = entry(out, 1), entry(out, 7), entry(out, 0xD, 1)
    assert l1["ecx"] == ALL & ~((1 << 26) | (1 << 28) | (1 << 12) | (1 << 29))  # xsave, avx, fma, f16c
    assert l7["ebx"] == ALL & ~((1 << 5) | (1 << 16))                           # avx2, avx512f
    assert l7["ecx"] == ALL and l7["edx"] == ALL
    assert xd["eax"] == 0xF & ~0b1011                                           # xsaveopt, xsavec, xsaves
    assert entry(out, 0x80000001) == entry(supported(), 0x80000001)


def test_hiding_avx_alone_keeps_xsave():
    out = CpuPolicy(hide=["avx"]).cpuid_for(supported(), apic_id=0, ncpus=1)
    assert bit(out, "avx") == 0
    assert bit(out, "xsave") == 1 and bit(out, "avx2") == 1 and bit(out, "fma") == 1


def test_hiding_kvmclock_clears_the_legacy_bit_too():
    out = CpuPolicy(hide=["kvmclock"]).cpuid_for(supported(), apic_id=0, ncpus=1)
    assert entry(out, 0x40000001)["eax"] == 0x01007EFB & ~0b1001


def test_hiding_several_features_across_leaves():
    names = ["cx16", "rdtscp", "la57", "pdpe1gb", "abm", "fsrm"]
    out = CpuPolicy(hide=names).cpuid_for(supported(), apic_id=2, ncpus=3)
    assert out == expected_after_hiding(names, 2, 3)
    assert all(bit(out, n) == 0 for n in names)


def test_hiding_a_feature_in_a_leaf_kvm_lacks_is_harmless():
    src = [e for e in supported() if e["function"] != 0x40000001]
    out = CpuPolicy(hide=["kvmclock"]).cpuid_for(src, apic_id=0, ncpus=1)
    assert out == CpuPolicy().cpuid_for(src, apic_id=0, ncpus=1)


def test_input_is_not_mutated():
    src = supported()
    before = copy.deepcopy(src)
    out = CpuPolicy(hide=["xsave", "cx16", "kvmclock"]).cpuid_for(src, apic_id=3, ncpus=4)
    assert src == before
    assert all(o is not s for o in out for s in src)
    # and a second run on the same input gives the same answer
    assert CpuPolicy(hide=["xsave", "cx16", "kvmclock"]).cpuid_for(src, apic_id=3, ncpus=4) == out


def test_hidden_includes_dependents():
    assert CpuPolicy(hide=["xsave"]).hidden() == {"xsave", *DEPENDENTS["xsave"]}
    assert CpuPolicy(hide=["kvmclock", "cx16"]).hidden() == {"kvmclock", "kvmclock_legacy", "cx16"}
    assert CpuPolicy().hidden() == set()


def test_feature_table_is_consistent():
    assert len(set(FEATURES.values())) == len(FEATURES), "two names for the same bit"
    for name, deps in DEPENDENTS.items():
        assert name in FEATURES
        assert all(d in FEATURES for d in deps)
    for leaf, sub, reg, b in FEATURES.values():
        assert reg in ("eax", "ebx", "ecx", "edx") and 0 <= b < 32


# --- unknown names ---------------------------------------------------------------------------------------

def test_unknown_feature_names_it_and_suggests_the_closest():
    with pytest.raises(CloudkvmError) as exc:
        CpuPolicy(hide=["cx61"]).cpuid_for(supported(), apic_id=0, ncpus=1)
    assert "'cx61'" in exc.value.message
    assert "cpu.hide" in exc.value.message
    assert exc.value.hint == "did you mean 'cx16'?"
    assert "did you mean 'cx16'?" in str(exc.value)


def test_unknown_feature_after_known_ones_is_still_reported():
    with pytest.raises(CloudkvmError, match="'avx3'") as exc:
        CpuPolicy(hide=["cx16", "avx3"]).hidden()
    assert exc.value.hint.startswith("did you mean '")


def test_unknown_feature_with_no_close_match_lists_the_known_names():
    with pytest.raises(CloudkvmError) as exc:
        check_feature_names(["qqqqqqqqqq"], where="quirks")
    assert exc.value.message == "quirks: unknown CPU feature 'qqqqqqqqqq'"
    assert exc.value.hint.startswith("known: ")
    assert "cx16" in exc.value.hint and "xsave" in exc.value.hint


def test_known_names_pass_the_check():
    check_feature_names(list(FEATURES))
    check_feature_names([])


# --- register width --------------------------------------------------------------------------------------

def test_registers_stay_32_bit_with_more_than_64_cpus():
    out = CpuPolicy().cpuid_for(supported(), apic_id=64, ncpus=65)
    for e in out:
        for reg in ("eax", "ebx", "ecx", "edx"):
            assert 0 <= e[reg] <= ALL, (hex(e["function"]), reg, hex(e[reg]))


def test_leaf1_ebx_stays_32_bit_for_apic_ids_above_255():
    out = CpuPolicy().cpuid_for(supported(), apic_id=256, ncpus=300)
    assert 0 <= entry(out, 1)["ebx"] <= ALL


def test_linux_clearcpuid_uses_linux_capability_numbers():
    from cloudkvm.boards.x86.cpu import linux_clearcpuid

    # word 4 = CPUID.1:ECX (cx16 = bit 13, popcnt = bit 23); word 9 = CPUID.7.0:EBX (smap = bit 20)
    assert linux_clearcpuid(["popcnt", "cx16", "smap"]) == "clearcpuid=141,151,308"
    assert linux_clearcpuid(["kvmclock"]) == ""  # no Linux capability word for KVM's leaves


def test_linux_clearcpuid_refuses_what_linux_would_truncate():
    from cloudkvm.boards.x86.cpu import FEATURES, linux_clearcpuid

    with pytest.raises(ValueError, match="127"):
        linux_clearcpuid(list(FEATURES))


def test_the_pvm_quirk_list_fits_linux_and_covers_the_observed_stops():
    from cloudkvm.boards.x86.cpu import linux_clearcpuid
    from cloudkvm.hostquirks import PVM_QUIRKS

    value = linux_clearcpuid(PVM_QUIRKS.linux_clearcpuid)
    assert len(value) - len("clearcpuid=") <= 127
    for name in ("cx16", "smap", "popcnt", "ssse3"):  # the stops seen on kvm_pvm
        assert name in PVM_QUIRKS.linux_clearcpuid
