"""kvm/arm64_abi.py against the arm64 KVM headers: Debian's linux-libc-dev:arm64, compiled by aarch64-linux-gnu-gcc.

The oracle is the compiler: every constant and every derived register id (KVM_REG_ARM_CORE_REG's offsetof,
ARM64_SYS_REG) is evaluated in C against those headers and read back from the assembly it emits.
"""
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from cloudkvm.cache import cache_dir
from cloudkvm.fsutil import install_dir
from cloudkvm.guests.debian import download_and_extract
from cloudkvm.kvm import arm64_abi as abi

PACKAGE = "linux-libc-dev:arm64"
GCC = "aarch64-linux-gnu-gcc"
# Names of arm64_abi that are computed from the header's values, not spelled like a header macro (checked below).
DERIVED = {"CORE_REG_OFFSETS", "PSTATE_EL1H_DAIF_MASKED", "MPIDR_EL1", "GIC_FIRST_SPI", "GIC_LAST_SPI",
           "GIC_FIRST_PPI"}


@pytest.fixture(scope="session")
def arm64_include() -> Path:
    """usr/include of linux-libc-dev:arm64, downloaded once into the cache."""
    missing = [t for t in ("apt-get", "dpkg-deb", GCC) if shutil.which(t) is None]
    if missing:
        pytest.skip(f"the arm64 header oracle needs {', '.join(missing)} (scripts/install-deps --test)")
    final = cache_dir() / "oracles" / "linux-libc-dev-arm64"
    if not (final / "ready").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".linux-libc-dev-", dir=final.parent))
        (staging / "root").mkdir()
        (staging / "download").mkdir()
        extracted, version = download_and_extract(PACKAGE, staging / "download")
        shutil.move(str(extracted / "usr"), str(staging / "root" / "usr"))
        shutil.rmtree(staging / "download")
        (staging / "ready").write_text(f"{PACKAGE} {version}\n")
        install_dir(staging, final)
    return final / "root" / "usr" / "include"


def evaluate(include: Path, expressions: list[str]) -> list[int]:
    """Each C expression's value, as aarch64-linux-gnu-gcc computes it with the arm64 headers in `include`."""
    source = "#include <stddef.h>\n#include <linux/kvm.h>\n#include <asm/ptrace.h>\n"
    source += "const unsigned long long v[] = {\n" + ",\n".join(f"(unsigned long long)({e})" for e in expressions)
    source += "\n};\n"
    flags = ["-isystem", str(include), "-isystem", str(include / "aarch64-linux-gnu"), "-x", "c", "-"]
    deps = subprocess.run([GCC, "-M", *flags], input=source, capture_output=True, text=True, check=True).stdout
    assert str(include / "aarch64-linux-gnu" / "asm" / "kvm.h") in deps  # not the cross compiler's own headers
    asm = subprocess.run([GCC, "-S", "-O0", "-o", "-", *flags], input=source, capture_output=True, text=True,
                         check=True).stdout
    values = []
    for directive, operand in re.findall(r"^\s*\.(xword|dword|8byte|zero)\s+(\S+)$", asm, re.M):
        values += [0] * (int(operand) // 8) if directive == "zero" else [int(operand, 0) % 2**64]
    assert len(values) == len(expressions), asm
    return values


def test_every_constant_is_the_headers(arm64_include):
    names = [n for n in dir(abi) if n.isupper() and n not in DERIVED]
    assert len(names) > 30
    assert dict(zip(names, evaluate(arm64_include, names))) == {n: getattr(abi, n) for n in names}


# kvm_regs member behind each core register name
MEMBERS = {**{f"x{i}": f"regs.regs[{i}]" for i in range(31)}, "sp": "regs.sp", "pc": "regs.pc",
           "pstate": "regs.pstate", "sp_el1": "sp_el1", "elr_el1": "elr_el1"}


def test_core_register_ids_are_the_kernels_macro(arm64_include):
    assert MEMBERS.keys() == abi.CORE_REG_OFFSETS.keys()
    ids = evaluate(arm64_include, [f"KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | KVM_REG_ARM_CORE_REG({m})"
                                   for m in MEMBERS.values()])
    sizes = evaluate(arm64_include, [f"sizeof(((struct kvm_regs *)0)->{m})" for m in MEMBERS.values()])
    assert dict(zip(MEMBERS, ids)) == {name: abi.core_reg_id(name) for name in MEMBERS}
    assert set(sizes) == {8} and {abi.reg_size(abi.core_reg_id(n)) for n in MEMBERS} == {8}


def test_core_register_ids_match_the_table_in_api_rst():
    # api.rst §4.68: "0x6030 0000 0010 0000 X0 ... 003e SP, 0040 PC, 0042 PSTATE"
    assert abi.core_reg_id("x0") == 0x6030_0000_0010_0000
    assert abi.core_reg_id("x30") == 0x6030_0000_0010_003C
    assert [abi.core_reg_id(n) & 0xFFFF for n in ("sp", "pc", "pstate", "sp_el1", "elr_el1")] == [
        0x3E, 0x40, 0x42, 0x44, 0x46]


@pytest.mark.parametrize("fields", [(3, 0, 0, 0, 5), (3, 3, 14, 3, 1), (3, 3, 14, 0, 2), (2, 7, 15, 15, 7),
                                    (0, 0, 0, 0, 0)])
def test_system_register_ids_are_the_kernels_macro(arm64_include, fields):
    (expected,) = evaluate(arm64_include, [f"ARM64_SYS_REG({', '.join(map(str, fields))})"])
    assert abi.sysreg_id(*fields) == expected


def test_mpidr_el1_and_the_timer_registers_the_header_names(arm64_include):
    timer_ctl, timer_cnt, mpidr = evaluate(arm64_include, ["KVM_REG_ARM_TIMER_CTL", "KVM_REG_ARM_TIMER_CNT",
                                                           "ARM64_SYS_REG(3, 0, 0, 0, 5)"])
    assert abi.sysreg_id(3, 3, 14, 3, 1) == timer_ctl and abi.sysreg_id(3, 3, 14, 3, 2) == timer_cnt
    assert abi.MPIDR_EL1 == mpidr


def test_a_field_too_wide_or_an_unknown_register_is_refused():
    with pytest.raises(ValueError):
        abi.sysreg_id(4, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="not an arm64 core register"):
        abi.core_reg_id("x31")


def test_the_boot_pstate_is_el1h_with_daif_masked(arm64_include):
    (expected,) = evaluate(arm64_include, ["PSR_MODE_EL1h | PSR_D_BIT | PSR_A_BIT | PSR_I_BIT | PSR_F_BIT"])
    assert abi.PSTATE_EL1H_DAIF_MASKED == expected == 0x3C5


def test_register_sizes_come_from_the_id(arm64_include):
    u32, u64, u128 = evaluate(arm64_include, ["KVM_REG_SIZE_U32", "KVM_REG_SIZE_U64", "KVM_REG_SIZE_U128"])
    assert [abi.reg_size(abi.KVM_REG_ARM64 | size) for size in (u32, u64, u128)] == [4, 8, 16]


def test_irq_line_fields_for_spis_and_ppis(arm64_include):
    spi, ppi = evaluate(arm64_include, [
        "KVM_ARM_IRQ_TYPE_SPI << KVM_ARM_IRQ_TYPE_SHIFT | 33 << KVM_ARM_IRQ_NUM_SHIFT",
        "KVM_ARM_IRQ_TYPE_PPI << KVM_ARM_IRQ_TYPE_SHIFT | 1 << KVM_ARM_IRQ_VCPU_SHIFT | 27 << KVM_ARM_IRQ_NUM_SHIFT"])
    assert abi.spi_irq_line(33) == spi == 0x0100_0021
    assert abi.ppi_irq_line(1, 27) == ppi
    for bad in (31, 1020):
        with pytest.raises(ValueError):
            abi.spi_irq_line(bad)
    with pytest.raises(ValueError):
        abi.ppi_irq_line(0, 32)


def test_the_irqfd_gsi_of_an_spi_is_its_pin():
    # api.rst §4.75: irqchip.pin + 32 is the injected SPI ID, and the vGIC's default routing is gsi N -> pin N
    assert abi.spi_gsi(32) == 0 and abi.spi_gsi(48) == 16
    with pytest.raises(ValueError):
        abi.spi_gsi(27)
