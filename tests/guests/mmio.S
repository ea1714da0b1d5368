/* Reads a 4-byte value from the test device at 0xd0000000, writes value+1 back at +8 with sizes 1, 2, 4, 8,
 * prints what it read, and powers off. */
#include "x86_guest.inc"
.set DEV, 0xd0000000
.text
.globl _start
_start:
    mov $DEV, %r11
    mov (%r11), %eax
    mov %eax, %ebx
    inc %eax
    movb %al, 8(%r11)
    movw %ax, 8(%r11)
    movl %eax, 8(%r11)
    mov %rax, %rcx
    shl $32, %rcx
    or %rcx, %rax
    movq %rax, 8(%r11)
    PUTS msg_read
    mov $8, %r8d
1:  rol $4, %ebx
    mov %ebx, %eax
    and $0xf, %eax
    call guest_put_hex_digit
    dec %r8d
    jnz 1b
    PUTS msg_nl
    POWEROFF
#include "x86_lib.inc"
.data
msg_read: .asciz "mmio: read 0x"
msg_nl: .asciz "\n"
