/* Every vCPU prints; vCPU 0 then routes GSI 5 to vector 0x30, rings the test doorbell (MMIO 0xd0000000) so the
 * host fires an irqfd on GSI 5, waits for the interrupt with sti;hlt, reports it, and powers off. */
#include "x86_guest.inc"
#include "x86_irq.inc"
.set DOORBELL, 0xd0000000
.text
.globl _start
_start:
    mov %rdi, %r12
    mov %rsi, %r13
    LOCK_ACQUIRE print_lock
    PUTS msg_up
    mov %r12, %rax
    call guest_put_hex_digit
    PUTS msg_nl
    LOCK_RELEASE print_lock
    lock incq arrived(%rip)
1:  cmp arrived(%rip), %r13
    je 2f
    pause
    jmp 1b
2:  test %r12, %r12
    jz 3f
    cli
9:  hlt
    jmp 9b
3:  SET_GATE 0x30, irq_handler
    LOAD_IDT
    PIC_MASK_ALL
    LAPIC_ENABLE
    IOAPIC_ROUTE 5, 0x30, 0
    PUTS msg_ready
    mov $DOORBELL, %r11
    movl $1, (%r11)
4:  sti
    hlt
    cli
    cmpb $0, irq_seen(%rip)
    je 4b
    PUTS msg_irq
    POWEROFF

irq_handler:
    push %rax
    movb $1, irq_seen(%rip)
    LAPIC_EOI
    pop %rax
    iretq

#include "x86_lib.inc"
.data
print_lock: .byte 0
irq_seen: .byte 0
.align 8
arrived: .quad 0
msg_up: .asciz "smp_irq: vCPU "
msg_nl: .asciz " up\n"
msg_ready: .asciz "smp_irq: vCPU 0 waiting for GSI 5\n"
msg_irq: .asciz "smp_irq: vector 0x30 received, powering off\n"
IDT_DATA
