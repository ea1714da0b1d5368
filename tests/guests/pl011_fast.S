/* Drives a PL011 at 0xd0100000 (mapped there by tests/kvm/test_pl011_fast_path.py) the way Linux's console does:
 * per byte an FR read (wait while TXFF) and a 4-byte DR write, for "pl011: polled\n"; then a 8-byte DR write (not
 * a PrimeCell access: nothing may be sent); then TXIM on (interrupt-driven transmit: the C fast path must hand every
 * access to the model) and "x" by DR; then powers off. */
#include "x86_guest.inc"
.set UART, 0xd0100000
.set DR, 0x00
.set FR, 0x18
.set IMSC, 0x38
.set FR_TXFF, 0x20
.set TXIM, 0x20
.text
.globl _start
_start:
    mov $UART, %r11
    lea line(%rip), %rsi
1:  movzbl (%rsi), %ecx
    test %ecx, %ecx
    jz 3f
2:  movl FR(%r11), %eax
    test $FR_TXFF, %eax
    jnz 2b
    movl %ecx, DR(%r11)
    inc %rsi
    jmp 1b
3:  mov $0x4242424242424242, %rax
    movq %rax, DR(%r11)
    movl $TXIM, IMSC(%r11)
    movl FR(%r11), %eax
    movl $'x', DR(%r11)
    POWEROFF
#include "x86_lib.inc"
.data
line: .asciz "pl011: polled\n"
