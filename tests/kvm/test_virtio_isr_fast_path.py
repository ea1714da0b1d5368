"""The C run loop's virtio-mmio interrupt registers (kvm/_build.py ckvm_isr_access, kvm/fastpath.py IsrTable) on a
real guest, on any KVM: 4-byte InterruptStatus reads and InterruptACK writes are completed from the transport's
cell without Python, accesses of another width still reach the transport's model (which refuses them), and both
sides see the same InterruptStatus (virtio 1.2 §4.2.2)."""
from cloudkvm.devices.virtio.mmio import INT_CONFIG, INT_VRING, MMIO_MIN_SIZE, VirtioMmioTransport
from cloudkvm.devices.virtio.rng import VirtioRng
from cloudkvm.machine import FlatBinary, Machine, MachineSpec

BASE = 0xD000_0000


def test_interrupt_status_reads_and_acks_complete_in_c_and_agree_with_the_model(guest_binary):
    raised = []
    with Machine(MachineSpec(payload=FlatBinary(guest_binary("virtio_isr")))) as machine:
        transport = VirtioMmioTransport(VirtioRng(), machine.memory, lambda: raised.append(1), "rng")
        machine.add_mmio_device(BASE, MMIO_MIN_SIZE, transport, "virtio-rng")
        transport._raise_interrupt(INT_VRING)
        transport._raise_interrupt(INT_CONFIG)
        result = machine.run(timeout=30)
        console = machine.console.text()
        served = machine.isr_table.served
    assert result.reason == "poweroff", (result, console)
    # 3, then bit 0 acknowledged: 2; the 2-byte read reads as 0 and the 2-byte ACK is ignored (the model's rules)
    assert "isr: 3 2 0 2\n" in console
    assert served == 4                   # the three 4-byte reads and the 4-byte ACK, in C
    assert transport.interrupt_status == INT_CONFIG and len(raised) == 2


def test_a_machine_lists_every_virtio_transport_for_the_c_loop(guest_binary):
    with Machine(MachineSpec(payload=FlatBinary(guest_binary("virtio_isr")))) as machine:
        transports = [VirtioMmioTransport(VirtioRng(), machine.memory, lambda: None) for _ in range(3)]
        for i, transport in enumerate(transports):
            machine.add_mmio_device(BASE + i * 0x1000, MMIO_MIN_SIZE, transport, f"virtio-{i}")
        assert [(base, size) for base, size, _ in machine.mmio_bus.c_isr_windows] == [
            (BASE + i * 0x1000, MMIO_MIN_SIZE) for i in range(3)]
        assert [cell for _, _, cell in machine.mmio_bus.c_isr_windows] == [t.c_isr for t in transports]
