/* A two-vCPU arm64 guest for cloudkvm's KVM core alone (tests/realkvm/test_arm64_kvm_core.py): MMU off, EL1.
 *
 * vCPU 0 (entered at _start with x0 = the value the VMM set) writes a byte to MMIO, starts vCPU 1 with PSCI
 * CPU_ON, reports CPU_ON's result, waits for vCPU 1's flag in RAM and for PSCI AFFINITY_INFO to say vCPU 1 is
 * off, reports that, then calls PSCI SYSTEM_OFF. vCPU 1 (entered at secondary with x0 = CPU_ON's context id)
 * writes its own byte and sets the flag, then calls PSCI CPU_OFF. x19 keeps each vCPU's entry x0 for the VMM
 * to read back by ONE_REG. PSCI function ids: Arm DEN0022 (PSCI) §5.1, SMC64 where the call takes addresses;
 * the conduit is HVC, as KVM's in-kernel PSCI 0.2 expects. */
    .equ MMIO,               0x09000000   /* unbacked: every access is a KVM_EXIT_MMIO */
    .equ PSCI_CPU_OFF,       0x84000002
    .equ PSCI_CPU_ON,        0xC4000003
    .equ PSCI_AFFINITY_INFO, 0xC4000004
    .equ PSCI_SYSTEM_OFF,    0x84000008
    .equ CONTEXT_ID,         0x5EC0DE

    .text
    .global _start
_start:
    mov     x19, x0
    ldr     x20, =MMIO
    mov     w1, #'0'
    strb    w1, [x20]               /* MMIO byte from vCPU 0 */
    ldr     x0, =PSCI_CPU_ON
    mov     x1, #1                  /* target: vCPU 1's MPIDR affinity (Aff0 = 1) */
    adr     x2, secondary           /* its entry */
    ldr     x3, =CONTEXT_ID         /* arrives in its x0 */
    hvc     #0
    str     x0, [x20, #8]           /* CPU_ON's result (0: SUCCESS), an 8-byte MMIO write */
1:  ldr     w1, flag
    cbz     w1, 1b
2:  ldr     x0, =PSCI_AFFINITY_INFO
    mov     x1, #1
    mov     x2, #0                  /* lowest affinity level: that one CPU */
    hvc     #0
    cmp     x0, #1                  /* 1: OFF */
    b.ne    2b
    str     x0, [x20, #16]          /* AFFINITY_INFO's answer */
    ldr     x0, =PSCI_SYSTEM_OFF
    hvc     #0
    .global after_system_off
after_system_off:
    b       after_system_off

    .global secondary
secondary:
    mov     x19, x0
    ldr     x20, =MMIO
    mov     w1, #'1'
    strb    w1, [x20]               /* MMIO byte from vCPU 1 */
    mov     w1, #1
    adr     x2, flag
    str     w1, [x2]
    ldr     x0, =PSCI_CPU_OFF
    hvc     #0
    .global after_cpu_off
after_cpu_off:
    b       after_cpu_off

    .ltorg
    .balign 8
    .global flag
flag:
    .word   0
