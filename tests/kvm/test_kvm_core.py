"""The cffi KVM core against the real /dev/kvm: system handle, VM (memory slots, irqchip, irqfd, ioeventfd) and
vCPU state round trips, plus tiny real-mode guests that prove memory, ioeventfd and CPUID really reach the guest."""
import errno
import os
import struct
from pathlib import Path

import pytest

from cloudkvm.boards.x86.cpu import CpuPolicy
from cloudkvm.boot import x86_longmode as lm
from cloudkvm.kvm.memory import GuestMemory
from cloudkvm.kvm.native import ffi, lib
from cloudkvm.kvm.system import Kvm, kvm_available
from cloudkvm.kvm.vm import Vm

CODE = 0x1000          # real-mode guests start here (CS base 0)
SCRATCH = 0x2000       # where guests store results
MMIO_HOLE = 0xC000     # not backed by any memory slot in the small layout
SMALL = [(0, 0x8000)]

MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_STAR, MSR_LSTAR = 0x174, 0x175, 0xC0000081, 0xC0000082


@pytest.fixture
def kvm():
    k = Kvm()
    yield k
    k.close()


@pytest.fixture
def vm(kvm):
    v = Vm(kvm)
    yield v
    v.close()


@pytest.fixture
def resources():
    """Closes whatever a test opens (vCPUs, memory, eventfds), in reverse order."""
    items = []
    yield items
    for item in reversed(items):
        if isinstance(item, int):
            os.close(item)
        else:
            item.close()


def eventfd(resources) -> int:
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    resources.append(fd)
    return fd


def eventfd_count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def real_mode_guest(vm, resources, code: bytes, layout=SMALL):
    """Memory with `code` at CODE and one vCPU about to run it in real mode with CS:IP = 0:CODE."""
    mem = GuestMemory(layout)
    resources.append(mem)
    vm.add_memory(mem)
    mem.write(CODE, code)
    vcpu = vm.create_vcpu(0)
    resources.append(vcpu)
    sregs = vcpu.get_sregs()
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.ss):
        seg.base, seg.selector = 0, 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rflags = CODE, 0x2
    vcpu.set_regs(regs)
    return mem, vcpu


def run(vcpu) -> int:
    assert vcpu.run_once() == 0
    return vcpu.run.exit_reason


MOV_AL_42 = b"\xb0\x42"            # mov al, 0x42
OUT_10_AL = b"\xe6\x10"            # out 0x10, al
HLT = b"\xf4"


# --- the system handle ------------------------------------------------------------------------------------

def test_kvm_is_available_here():
    assert kvm_available() == (True, "")


def test_api_version_and_vcpu_mmap_size(kvm):
    assert kvm.api_version == lib.KVM_API_VERSION == 12
    assert kvm.vcpu_mmap_size >= ffi.sizeof("struct kvm_run")
    assert kvm.vcpu_mmap_size % os.sysconf("SC_PAGE_SIZE") == 0


def test_capabilities(kvm):
    for cap in (lib.KVM_CAP_IRQCHIP, lib.KVM_CAP_USER_MEMORY, lib.KVM_CAP_IRQFD, lib.KVM_CAP_IOEVENTFD,
                lib.KVM_CAP_NR_MEMSLOTS):
        assert kvm.check_extension(cap) > 0, cap
    assert kvm.check_extension(0x7FFF_0000) == 0  # a capability no kernel knows
    assert kvm.max_vcpus() >= 1


def test_supported_cpuid_has_the_host_vendor(kvm):
    entries = kvm.supported_cpuid()
    assert all(set(e) == {"function", "index", "flags", "eax", "ebx", "ecx", "edx"} for e in entries)
    leaf0 = [e for e in entries if e["function"] == 0]
    assert len(leaf0) == 1
    vendor = struct.pack("<3I", leaf0[0]["ebx"], leaf0[0]["edx"], leaf0[0]["ecx"]).decode("ascii")
    assert vendor in ("GenuineIntel", "AuthenticAMD", "HygonGenuine", "CentaurHauls", "  Shanghai  ")
    cpuinfo = Path("/proc/cpuinfo").read_text()
    assert f"vendor_id\t: {vendor}" in cpuinfo
    assert leaf0[0]["eax"] >= 1
    assert any(e["function"] == 1 for e in entries)
    assert any(e["function"] == 0x80000000 for e in entries)


# --- VM: memory, irqchip, irqfd, ioeventfd ---------------------------------------------------------------

def test_add_memory_registers_each_region_as_a_slot(vm, resources):
    mem = GuestMemory([(0, 0x100000), (0x1_0000_0000, 0x200000)])
    resources.append(mem)
    vm.add_memory(mem)
    assert vm.memory is mem
    # slots 0 and 1 now cover both regions: another slot overlapping either is refused
    with pytest.raises(OSError) as exc:
        vm.set_user_memory_region(7, 0x80000, 0x1000, mem.regions[0].host_addr)  # inside slot 0
    assert exc.value.errno == errno.EEXIST
    with pytest.raises(OSError) as exc:
        vm.set_user_memory_region(8, 0x1_0000_0000 + 0x1000, 0x1000, mem.regions[1].host_addr)
    assert exc.value.errno == errno.EEXIST
    # a fresh slot in the hole is fine
    vm.set_user_memory_region(9, 0x200000, 0x1000, mem.regions[0].host_addr)


def test_set_user_memory_region_rejects_unaligned(vm, resources):
    mem = GuestMemory(SMALL)
    resources.append(mem)
    with pytest.raises(OSError) as exc:
        vm.set_user_memory_region(0, 0x1001, 0x1000, mem.regions[0].host_addr)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError) as exc:
        vm.set_user_memory_region(0, 0, 0x1000, mem.regions[0].host_addr + 1)
    assert exc.value.errno == errno.EINVAL


def test_guest_sees_the_slot_and_writes_land_in_guest_memory(vm, resources):
    # mov byte [0x2000], 0x99 ; mov al, 0x42 ; out 0x10, al ; hlt
    mem, vcpu = real_mode_guest(vm, resources, b"\xc6\x06\x00\x20\x99" + MOV_AL_42 + OUT_10_AL + HLT)
    assert run(vcpu) == lib.KVM_EXIT_IO
    io = vcpu.io
    assert (io.direction, io.size, io.port, io.count) == (lib.KVM_EXIT_IO_OUT, 1, 0x10, 1)
    assert vcpu.run_page[io.data_offset] == 0x42
    assert mem.read(SCRATCH, 1) == b"\x99"
    assert run(vcpu) == lib.KVM_EXIT_HLT
    assert vcpu.get_regs().rip == CODE + 10


def test_create_irqchip_once(vm):
    vm.create_irqchip()
    with pytest.raises(OSError) as exc:
        vm.create_irqchip()
    assert exc.value.errno == errno.EEXIST


def test_irqfd_needs_an_irqchip(vm, resources):
    with pytest.raises(OSError) as exc:
        vm.irqfd(eventfd(resources), 5)
    assert exc.value.errno == errno.EINVAL


def test_irqfd_assign_and_deassign(vm, resources):
    vm.create_irqchip()
    fd = eventfd(resources)
    vm.irqfd(fd, 5)
    with pytest.raises(OSError) as exc:
        vm.irqfd(fd, 5)          # the same eventfd twice
    assert exc.value.errno == errno.EBUSY
    vm.irqfd(eventfd(resources), 5)  # another eventfd on the same GSI is fine
    vm.irqfd(fd, 5, deassign=True)
    vm.irqfd(fd, 5)              # and it can be assigned again once deassigned
    vm.irqfd(fd, 5, deassign=True)


@pytest.mark.parametrize("pio,addr,length", [(True, 0x10, 1), (True, 0xCFC, 4), (False, 0xD000_0000, 4),
                                             (False, 0xD000_0008, 8)])
@pytest.mark.parametrize("datamatch", [None, 0, 0x42])
def test_ioeventfd_assign_and_deassign(vm, resources, pio, addr, length, datamatch):
    fd = eventfd(resources)
    vm.ioeventfd(fd, addr, length, datamatch=datamatch, pio=pio)
    with pytest.raises(OSError) as exc:
        vm.ioeventfd(fd, addr, length, datamatch=datamatch, pio=pio)
    assert exc.value.errno == errno.EEXIST
    vm.ioeventfd(fd, addr, length, datamatch=datamatch, pio=pio, deassign=True)
    with pytest.raises(OSError) as exc:
        vm.ioeventfd(fd, addr, length, datamatch=datamatch, pio=pio, deassign=True)
    assert exc.value.errno == errno.ENOENT
    vm.ioeventfd(fd, addr, length, datamatch=datamatch, pio=pio)  # reassignable


def test_ioeventfd_datamatch_distinguishes_registrations(vm, resources):
    a, b = eventfd(resources), eventfd(resources)
    vm.ioeventfd(a, 0x10, 1, datamatch=1, pio=True)
    vm.ioeventfd(b, 0x10, 1, datamatch=2, pio=True)   # a different value on the same port: no conflict
    with pytest.raises(OSError) as exc:
        vm.ioeventfd(b, 0x10, 1, datamatch=1, pio=True, deassign=True)  # wrong fd for that value
    assert exc.value.errno == errno.ENOENT
    vm.ioeventfd(a, 0x10, 1, datamatch=1, pio=True, deassign=True)
    vm.ioeventfd(b, 0x10, 1, datamatch=2, pio=True, deassign=True)


def test_ioeventfd_rejects_a_bad_length(vm, resources):
    with pytest.raises(OSError) as exc:
        vm.ioeventfd(eventfd(resources), 0xD000_0000, 3)
    assert exc.value.errno == errno.EINVAL


@pytest.mark.parametrize("datamatch,signalled", [(None, True), (0x42, True), (0x43, False)])
def test_pio_ioeventfd_completes_the_guest_write_in_the_kernel(vm, resources, datamatch, signalled):
    fd = eventfd(resources)
    vm.ioeventfd(fd, 0x10, 1, datamatch=datamatch, pio=True)
    _, vcpu = real_mode_guest(vm, resources, MOV_AL_42 + OUT_10_AL + HLT)
    if signalled:
        assert run(vcpu) == lib.KVM_EXIT_HLT      # no I/O exit: the eventfd took the write
        assert eventfd_count(fd) == 1
    else:
        assert run(vcpu) == lib.KVM_EXIT_IO       # value does not match: userspace sees the write
        assert vcpu.io.port == 0x10 and vcpu.run_page[vcpu.io.data_offset] == 0x42
        assert eventfd_count(fd) == 0


@pytest.mark.parametrize("datamatch,signalled", [(None, True), (0x42, True), (0x41, False)])
def test_mmio_ioeventfd_completes_the_guest_write_in_the_kernel(vm, resources, datamatch, signalled):
    fd = eventfd(resources)
    vm.ioeventfd(fd, MMIO_HOLE, 1, datamatch=datamatch)
    # mov byte [0xC000], 0x42 ; hlt
    _, vcpu = real_mode_guest(vm, resources, b"\xc6\x06\x00\xc0\x42" + HLT)
    if signalled:
        assert run(vcpu) == lib.KVM_EXIT_HLT
        assert eventfd_count(fd) == 1
    else:
        assert run(vcpu) == lib.KVM_EXIT_MMIO
        mmio = vcpu.mmio
        assert (mmio.phys_addr, mmio.len, mmio.is_write, mmio.data[0]) == (MMIO_HOLE, 1, 1, 0x42)
        assert eventfd_count(fd) == 0


# --- vCPU state -------------------------------------------------------------------------------------------

def test_create_vcpu_maps_the_run_page(vm, resources):
    vcpu = vm.create_vcpu(0)
    resources.append(vcpu)
    assert vcpu.fd >= 0 and vcpu.index == 0
    assert len(vcpu.run_page) == vm.kvm.vcpu_mmap_size
    with pytest.raises(OSError) as exc:
        vm.create_vcpu(0)       # the same index twice
    assert exc.value.errno == errno.EEXIST
    vcpu.close()
    assert vcpu.fd == -1
    vcpu.close()                # idempotent


def test_regs_round_trip(vm, resources):
    vcpu = vm.create_vcpu(0)
    resources.append(vcpu)
    names = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
             "r14", "r15", "rip")
    regs = vcpu.get_regs()
    for i, name in enumerate(names):
        setattr(regs, name, 0x1111_0000_0000_0000 * (i % 15 + 1) + i)
    regs.rflags = 0x2 | 0x40 | 0x80  # reserved bit 1, ZF, SF
    vcpu.set_regs(regs)
    got = vcpu.get_regs()
    for i, name in enumerate(names):
        assert getattr(got, name) == 0x1111_0000_0000_0000 * (i % 15 + 1) + i, name
    assert got.rflags == 0xC2


def test_sregs_round_trip_in_long_mode(vm, resources):
    vcpu = vm.create_vcpu(0)
    resources.append(vcpu)
    sregs = vcpu.get_sregs()
    assert sregs.cr0 & lm.CR0_PG == 0 and sregs.efer & lm.EFER_LMA == 0  # reset state: real mode
    code, data, tss = (lm.segment_from_descriptor(i) for i in (lm.GDT_CODE64, lm.GDT_DATA, lm.GDT_TSS))
    sregs.cs = code.as_kvm()
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, data.as_kvm())
    sregs.tr = tss.as_kvm()
    sregs.gdt.base, sregs.gdt.limit = 0x500, 31
    sregs.idt.base, sregs.idt.limit = 0x520, 0
    sregs.cr0 = lm.CR0_PE | lm.CR0_MP | lm.CR0_ET | lm.CR0_NE | lm.CR0_WP | lm.CR0_PG
    sregs.cr3 = 0x9000
    sregs.cr4 = lm.CR4_PAE | lm.CR4_OSFXSR | lm.CR4_OSXMMEXCPT
    sregs.efer = lm.EFER_LME | lm.EFER_LMA | lm.EFER_SCE
    vcpu.set_sregs(sregs)
    got = vcpu.get_sregs()
    assert got.cr0 == sregs.cr0 and got.cr3 == 0x9000 and got.cr4 == sregs.cr4
    assert got.efer & (lm.EFER_LME | lm.EFER_LMA | lm.EFER_SCE) == lm.EFER_LME | lm.EFER_LMA | lm.EFER_SCE
    assert (got.gdt.base, got.gdt.limit, got.idt.base, got.idt.limit) == (0x500, 31, 0x520, 0)
    # selectors are not compared: the software KVM (kvm_pvm) reports Linux's kernel selectors in 64-bit mode
    assert (got.cs.l, got.cs.db, got.cs.type, got.cs.present, got.cs.s) == (1, 0, 0xB, 1, 1)
    assert (got.cs.base, got.cs.limit, got.cs.g) == (0, 0xFFFFFFFF, 1)
    assert (got.ds.type, got.ds.db, got.ds.present) == (0x3, 1, 1)
    assert (got.tr.type, got.tr.s, got.tr.present) == (0xB, 0, 1)


def test_sregs_reset_state_and_real_mode_round_trip(vm, resources):
    vcpu = vm.create_vcpu(0)
    resources.append(vcpu)
    sregs = vcpu.get_sregs()
    assert (sregs.cs.selector, sregs.cs.base) == (0xF000, 0xFFFF0000)   # the architectural reset vector
    assert sregs.cr0 == 0x60000010                                      # CD, NW, ET
    sregs.cs.selector, sregs.cs.base = 0x1234, 0x12340
    sregs.ds.selector, sregs.ds.base = 0x2000, 0x20000
    sregs.gdt.base, sregs.gdt.limit, sregs.cr3 = 0x500, 31, 0x5000
    vcpu.set_sregs(sregs)
    got = vcpu.get_sregs()
    assert (got.cs.selector, got.cs.base, got.ds.selector, got.ds.base) == (0x1234, 0x12340, 0x2000, 0x20000)
    assert (got.gdt.base, got.gdt.limit, got.cr3) == (0x500, 31, 0x5000)


def test_fpu_round_trip(vm, resources):
    vcpu = vm.create_vcpu(0)
    resources.append(vcpu)
    fpu = ffi.new("struct kvm_fpu *")
    fpu.fcw, fpu.mxcsr = 0x27F, 0x1F80 | 0x8000  # precision control changed, FTZ set
    pattern = bytes(range(16))
    for i in range(16):
        fpu.xmm[0][i] = pattern[i]
        fpu.xmm[15][i] = pattern[15 - i]
    fpu.fpr[7][0] = 0x5A
    vcpu.set_fpu(fpu)
    got = vcpu.get_fpu()
    assert got.fcw == 0x27F
    assert got.fpr[7][0] == 0x5A
    assert bytes(got.xmm[0]) == pattern
    assert bytes(got.xmm[15]) == pattern[::-1]
    assert bytes(got.xmm[1]) == bytes(16)
    # mxcsr is not compared: KVM_GET_FPU does not fill it in (the kernel copies it in KVM_SET_FPU only)


def test_msrs_round_trip(vm, resources):
    vcpu = vm.create_vcpu(0)
    resources.append(vcpu)
    # SYSENTER_ESP is 32 bits wide on AMD (KVM keeps the high half only for an Intel guest CPUID vendor)
    values = {MSR_IA32_SYSENTER_CS: 0x10, MSR_IA32_SYSENTER_ESP: 0x8123_4000,
              MSR_STAR: 0x0023_0010_0000_0000, MSR_LSTAR: 0xFFFF_FFFF_8100_0000}
    assert vcpu.set_msrs(values) == len(values)
    assert vcpu.get_msrs(list(values)) == values


def test_msrs_stop_at_the_first_unknown_index(vm, resources):
    vcpu = vm.create_vcpu(0)
    resources.append(vcpu)
    assert vcpu.set_msrs({MSR_IA32_SYSENTER_CS: 0x20, 0xDEAD_BEEF: 1, MSR_IA32_SYSENTER_ESP: 5}) == 1
    assert vcpu.get_msrs([MSR_IA32_SYSENTER_CS, 0xDEAD_BEEF, MSR_IA32_SYSENTER_ESP]) == {MSR_IA32_SYSENTER_CS: 0x20}
    assert vcpu.get_msrs([MSR_IA32_SYSENTER_ESP]) == {MSR_IA32_SYSENTER_ESP: 0}  # the write after it never ran


def test_lapic_round_trip(vm, resources):
    vm.create_irqchip()
    v0, v1 = vm.create_vcpu(0), vm.create_vcpu(1)
    resources.extend([v0, v1])
    state = v1.get_lapic()
    assert len(state) == ffi.sizeof("struct kvm_lapic_state") == 1024
    assert int.from_bytes(state[0x20:0x24], "little") >> 24 == 1   # xAPIC ID register = vCPU index
    assert int.from_bytes(v0.get_lapic()[0x20:0x24], "little") >> 24 == 0
    lint0 = 0x350
    edited = bytearray(state)
    edited[lint0:lint0 + 4] = (0x700).to_bytes(4, "little")         # ExtINT, unmasked
    v1.set_lapic(bytes(edited))
    assert int.from_bytes(v1.get_lapic()[lint0:lint0 + 4], "little") == 0x700
    with pytest.raises(ValueError):
        v1.set_lapic(bytes(16))  # the wrong size never reaches KVM


def test_set_cpuid_is_what_the_guest_sees(vm, resources):
    # mov eax, 1 ; cpuid ; mov [0x2000], ecx ; mov [0x2004], ebx ; hlt
    code = b"\x66\xb8\x01\x00\x00\x00" + b"\x0f\xa2" + b"\x66\x89\x0e\x00\x20" + b"\x66\x89\x1e\x04\x20" + HLT
    mem, vcpu = real_mode_guest(vm, resources, code)
    table = CpuPolicy(hide=["cx16"]).cpuid_for(vm.kvm.supported_cpuid(), apic_id=0, ncpus=3)
    vcpu.set_cpuid(table)
    assert run(vcpu) == lib.KVM_EXIT_HLT
    ecx, ebx = struct.unpack("<II", mem.read(SCRATCH, 8))
    assert ecx & (1 << 31), "hypervisor bit"
    assert not ecx & (1 << 13), "cx16 was hidden"
    assert (ebx >> 16) & 0xFF == 3
    assert ebx >> 24 == 0


def test_set_cpuid_rejects_a_bad_field(vm, resources):
    vcpu = vm.create_vcpu(0)
    resources.append(vcpu)
    with pytest.raises(AttributeError):
        vcpu.set_cpuid([{"function": 0, "index": 0, "bogus": 1}])


def test_translate_with_paging_off_is_the_identity(vm, resources):
    vcpu = vm.create_vcpu(0)
    resources.append(vcpu)
    for addr in (0, 0x1234, 0xFFFFF, 0x1_2345_6789):
        assert vcpu.translate(addr) == addr


def test_translate_walks_the_identity_page_tables(vm, resources):
    base = 0x9000
    mem = GuestMemory([(0, 0x100000)])
    resources.append(mem)
    vm.add_memory(mem)
    mem.write(base, lm.identity_page_tables(base, gib=4))
    vcpu = vm.create_vcpu(0)
    resources.append(vcpu)
    sregs = vcpu.get_sregs()
    sregs.cs = lm.segment_from_descriptor(lm.GDT_CODE64).as_kvm()
    sregs.cr0 = lm.CR0_PE | lm.CR0_ET | lm.CR0_NE | lm.CR0_PG
    sregs.cr3, sregs.cr4, sregs.efer = base, lm.CR4_PAE, lm.EFER_LME | lm.EFER_LMA
    vcpu.set_sregs(sregs)
    for addr in (0, 0x1234, 0x20_0000, 0x3FFF_FFFF, 0xC000_0000, 0xFFFF_FFFF):
        assert vcpu.translate(addr) == addr
    assert vcpu.translate(0x1_0000_0000) is None      # beyond the 4 GiB the tables map
    assert vcpu.translate(0x7F_0000_0000) is None


def test_mp_state_get_and_set(vm, resources):
    vm.create_irqchip()
    bsp, ap = vm.create_vcpu(0), vm.create_vcpu(1)
    resources.extend([bsp, ap])
    assert bsp.get_mp_state() == lib.KVM_MP_STATE_RUNNABLE
    assert ap.get_mp_state() == lib.KVM_MP_STATE_UNINITIALIZED   # an AP waits for INIT/SIPI
    ap.set_mp_state(lib.KVM_MP_STATE_RUNNABLE)
    assert ap.get_mp_state() == lib.KVM_MP_STATE_RUNNABLE
    bsp.set_mp_state(lib.KVM_MP_STATE_HALTED)
    assert bsp.get_mp_state() == lib.KVM_MP_STATE_HALTED
    with pytest.raises(OSError) as exc:
        bsp.set_mp_state(0x1234)
    assert exc.value.errno == errno.EINVAL
