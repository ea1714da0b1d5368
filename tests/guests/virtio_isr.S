/* Reads and acknowledges the interrupt registers of a virtio-mmio transport at 0xd0000000 (mapped there, with
 * InterruptStatus 3, by tests/kvm/test_virtio_isr_fast_path.py) the way Linux's vm_interrupt does, plus two accesses
 * of the wrong width, and prints the four InterruptStatus values it read: 4-byte read, 4-byte ACK of bit 0, 4-byte
 * read, 2-byte read, 2-byte ACK of bit 1 (ignored), 4-byte read. */
#include "x86_guest.inc"
.set DEV, 0xd0000000
.set INTERRUPT_STATUS, 0x60
.set INTERRUPT_ACK, 0x64
.text
.globl _start
_start:
    mov $DEV, %r11
    movl INTERRUPT_STATUS(%r11), %r12d
    movl $1, INTERRUPT_ACK(%r11)
    movl INTERRUPT_STATUS(%r11), %r13d
    xor %eax, %eax
    movw INTERRUPT_STATUS(%r11), %ax
    mov %eax, %r14d
    movw $2, INTERRUPT_ACK(%r11)
    movl INTERRUPT_STATUS(%r11), %r15d
    PUTS msg_isr
    mov %r12d, %eax
    call put_value
    mov %r13d, %eax
    call put_value
    mov %r14d, %eax
    call put_value
    mov %r15d, %eax
    call put_value
    PUTS msg_nl
    POWEROFF
put_value:                  /* " " and the low hex digit of %eax */
    push %rax
    PUTS msg_space
    pop %rax
    and $0xf, %eax
    call guest_put_hex_digit
    ret
#include "x86_lib.inc"
.data
msg_isr: .asciz "isr:"
msg_space: .asciz " "
msg_nl: .asciz "\n"
