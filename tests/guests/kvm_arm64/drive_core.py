"""Runs psci_smp.S (built by tests/realkvm/test_arm64_kvm_core.py) on this arm64 host's KVM through cloudkvm's KVM
core alone, no board, and prints what happened as one `RESULT {json}` line for that test to judge.

Usage (inside the arm64 test host, project tree on PYTHONPATH): python3 drive_core.py GUEST.bin SYMBOLS.json
"""
import errno
import json
import os
import select
import signal
import sys
import threading
import time

from cloudkvm.kvm import arm64, vgic
from cloudkvm.kvm import arm64_abi as abi
from cloudkvm.kvm.fastpath import new_tx_buffer
from cloudkvm.kvm.memory import GuestMemory
from cloudkvm.kvm.native import ffi, lib
from cloudkvm.kvm.system import Kvm
from cloudkvm.kvm.vm import Vm

RAM, RAM_SIZE = 0x4000_0000, 128 << 20
GICD, GICR = 0x0800_0000, 0x080A_0000  # QEMU virt's vGICv3 distributor and redistributors
DTB_STAND_IN = 0x4400_0000  # vCPU 0's x0, where a DTB would be
EDGE_SPI = 32 + 16  # raised by an irqfd, as a virtio-mmio slot's would be
LEVEL_SPI = 32 + 1  # raised by KVM_IRQ_LINE, as the PL011's would be
KICK = signal.SIGUSR1
RUN_SECONDS = 60


def abi_cross_check() -> dict:
    """arm64_abi's constants against the ones this core was compiled with, and the core register offsets against
    struct kvm_regs' layout here."""
    names = [n for n in dir(abi) if n.isupper() and hasattr(lib, n)]

    def member(name: str) -> tuple:
        if name.startswith("x"):
            return "regs", "regs", int(name[1:])
        return ("regs", name) if name in ("sp", "pc", "pstate") else (name,)
    offsets = {name: ffi.offsetof("struct kvm_regs", *member(name)) for name in abi.CORE_REG_OFFSETS}
    return {"checked": len(names), "mismatches": [n for n in names if getattr(lib, n) != getattr(abi, n)],
            "offset_mismatches": [n for n, off in offsets.items() if off != abi.CORE_REG_OFFSETS[n]]}


def interrupts(vm, gic) -> dict:
    """An edge SPI through an irqfd, then a level SPI through KVM_IRQ_LINE, as the vGIC reports them."""
    # KVM's vGIC resets every SPI edge-triggered (GICD_ICFGR 0xAAAAAAAA); a guest's GIC driver configures each as
    # its DTB says. The level line is configured here as a guest would for a PL011.
    facts = {"icfgr_reset": gic.read_dist_reg(vgic.GICD_ICFGR + EDGE_SPI // 16 * 4)}
    gic.set_edge_triggered(EDGE_SPI)
    gic.set_edge_triggered(LEVEL_SPI, edge=False)
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    facts["edge_pending_before"] = gic.spi_pending(EDGE_SPI)
    vgic.assign_spi_irqfd(vm, efd, EDGE_SPI)
    start = time.monotonic()
    os.eventfd_write(efd, 1)
    while not gic.spi_pending(EDGE_SPI) and time.monotonic() - start < 5:
        select.select([], [], [], 0.01)  # the injection may run from a kernel worker
    facts["edge_pending_after_irqfd"] = gic.spi_pending(EDGE_SPI)
    facts["irqfd_seconds"] = round(time.monotonic() - start, 3)
    vgic.assign_spi_irqfd(vm, efd, EDGE_SPI, deassign=True)
    os.close(efd)
    vgic.set_spi_level(vm, LEVEL_SPI, 1)
    facts["level_line_high"] = gic.line_level(LEVEL_SPI)
    facts["level_latch_while_high"] = gic.spi_pending(LEVEL_SPI)
    vgic.set_spi_level(vm, LEVEL_SPI, 0)
    facts["level_line_low"] = gic.line_level(LEVEL_SPI)
    facts["level_latch_after"] = gic.spi_pending(LEVEL_SPI)
    return facts


def registers(vcpu) -> dict:
    return {"pc": arm64.get_core_reg(vcpu, "pc"), "x0": arm64.get_core_reg(vcpu, "x0"),
            "x19": arm64.get_core_reg(vcpu, "x19"), "pstate": arm64.get_core_reg(vcpu, "pstate"),
            "mpidr": arm64.read_mpidr(vcpu), "mp_state": vcpu.get_mp_state()}


def run_vcpus(vcpus) -> tuple[list, bool, list]:
    """Each vCPU in its own thread, through the C run loop the boards use (`ckvm_run_loop`: on arm64 every exit
    comes back, there is no port I/O to complete), until one leaves by anything but MMIO; the others are kicked
    out then. Returns the events, whether it timed out, and each vCPU's exit count as the C loop counted it."""
    events, stop, lock = [], threading.Event(), threading.Lock()
    threads = []
    no_ports = ffi.new("uint8_t[]", 65536)  # every port code C_PYTHON (0): nothing completed in C
    exits = [ffi.new("uint64_t *") for _ in vcpus]
    tx = [new_tx_buffer() for _ in vcpus]

    def record(*event):
        with lock:
            events.append(event)

    def stop_all():
        stop.set()
        for vcpu, thread in zip(vcpus, threads):
            vcpu.run.immediate_exit = 1
            if thread.is_alive() and thread is not threading.current_thread():
                signal.pthread_kill(thread.ident, KICK)

    def loop(index, vcpu):
        while not stop.is_set():
            rc = lib.ckvm_run_loop(vcpu.fd, vcpu.run, no_ports, exits[index], ffi.NULL, tx[index], ffi.NULL)
            if rc == -errno.EINTR:
                continue
            if rc < 0:
                record("error", index, -rc)
            elif vcpu.run.exit_reason == lib.KVM_EXIT_MMIO:
                mmio = vcpu.mmio
                record("mmio", index, mmio.phys_addr, mmio.is_write, bytes(ffi.buffer(mmio.data))[:mmio.len].hex())
                if not mmio.is_write:
                    ffi.buffer(mmio.data)[:] = bytes(8)
                continue
            elif vcpu.run.exit_reason == lib.KVM_EXIT_SYSTEM_EVENT:
                record("system_event", index, vcpu.run.system_event.type)
            else:
                record("exit", index, vcpu.run.exit_reason)
            stop_all()
            return

    lib.ckvm_install_kick_handler(KICK)
    threads += [threading.Thread(target=loop, args=(i, v), daemon=True) for i, v in enumerate(vcpus)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + RUN_SECONDS
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    timed_out = any(t.is_alive() for t in threads)
    if timed_out:
        stop_all()
        for thread in threads:
            thread.join(5)
    return events, timed_out, [count[0] for count in exits]


def main(guest: str, symbols_file: str) -> int:
    with open(symbols_file) as f:
        symbols = json.load(f)
    facts = {"abi": abi_cross_check()}
    kvm = Kvm()
    facts["ipa_bits"] = kvm.check_extension(lib.KVM_CAP_ARM_VM_IPA_SIZE)
    vm = Vm(kvm)
    memory = GuestMemory([(RAM, RAM_SIZE)])
    vm.add_memory(memory)
    with open(guest, "rb") as f:
        memory.write(RAM, f.read())
    gic = vgic.create_vgic(vm, GICD, redist=GICR, nr_irqs=128)  # no CPU interface given: a v3 or nothing
    facts["vgic_version"] = gic.version
    vcpus = [vm.create_vcpu(i) for i in range(2)]
    target, recommended = arm64.preferred_target(vm)
    facts["preferred_target"], facts["recommended_features"] = target, recommended
    for i, vcpu in enumerate(vcpus):
        arm64.vcpu_init(vcpu, target, [abi.KVM_ARM_VCPU_PSCI_0_2] + ([abi.KVM_ARM_VCPU_POWER_OFF] if i else []))
    gic.finalize()  # after every vCPU exists
    arm64.set_boot_regs(vcpus[0], entry=symbols["_start"], dtb=DTB_STAND_IN)
    facts["before"] = [registers(v) for v in vcpus]
    reg_ids = arm64.reg_list(vcpus[0])
    facts["reg_list"] = {"count": len(reg_ids), "has_pc": abi.core_reg_id("pc") in reg_ids,
                         "has_mpidr": abi.MPIDR_EL1 in reg_ids}
    facts["interrupts"] = interrupts(vm, gic)  # no vCPU may be running while device registers are read
    start = time.monotonic()
    facts["events"], facts["timed_out"], facts["exit_counts"] = run_vcpus(vcpus)
    facts["run_seconds"] = round(time.monotonic() - start, 3)
    facts["after"] = [registers(v) for v in vcpus]
    facts["flag"] = memory.read_u32(symbols["flag"])
    print("RESULT " + json.dumps(facts), flush=True)
    return 1 if facts["timed_out"] else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
