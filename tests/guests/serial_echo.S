/* Interrupt-driven 16550 receive, the way Linux's 8250 driver runs it: IER.ERBFI + MCR.OUT2, IRQ 4 routed
 * through the IOAPIC (ISA IRQs: edge, active high) to vector 0x24. The handler drains RBR while
 * LSR.DR is set and echoes each byte upper-cased; on 'q' the guest powers off. */
#include "x86_guest.inc"
#include "x86_irq.inc"
.text
.globl _start
_start:
    SET_GATE 0x24, uart_handler
    LOAD_IDT
    PIC_MASK_ALL
    LAPIC_ENABLE
    IOAPIC_ROUTE 4, 0x24, 0
    mov $(COM1 + 3), %dx            /* LCR: 8N1 */
    mov $0x03, %al
    out %al, %dx
    mov $(COM1 + 2), %dx            /* FCR: enable and clear FIFOs */
    mov $0x07, %al
    out %al, %dx
    mov $(COM1 + 4), %dx            /* MCR: DTR | RTS | OUT2 (OUT2 gates the IRQ on a PC) */
    mov $0x0b, %al
    out %al, %dx
    mov $(COM1 + 1), %dx            /* IER: received data available */
    mov $0x01, %al
    out %al, %dx
    PUTS msg_ready
1:  sti
    hlt
    cli
    cmpb $0, quit(%rip)
    je 1b
    PUTS msg_bye
    POWEROFF

uart_handler:
    push %rax
    push %rdx
    mov $(COM1 + 2), %dx            /* IIR: acknowledge */
    in %dx, %al
2:  mov $(COM1 + 5), %dx            /* LSR.DR? */
    in %dx, %al
    test $1, %al
    jz 4f
    mov $COM1, %dx
    in %dx, %al
    cmp $'q', %al
    jne 3f
    movb $1, quit(%rip)
3:  cmp $'a', %al
    jb 5f
    cmp $'z', %al
    ja 5f
    sub $0x20, %al
5:  out %al, %dx
    jmp 2b
4:  LAPIC_EOI
    pop %rdx
    pop %rax
    iretq
#include "x86_lib.inc"
.data
quit: .byte 0
msg_ready: .asciz "serial_echo: ready\n"
msg_bye: .asciz "\nserial_echo: bye\n"
IDT_DATA
