/* Two `rep stos` runs that the VMM may finish at a boot-assist breakpoint: one storing zeros over a zeroed
 * buffer (completable), one over a buffer holding data (the guest must run it). The guest checks RDI, RCX and
 * that both buffers end up zero, then prints "zero stores: all ok"; natively run or assisted alike. */
#include "x86_guest.inc"
.set LEN, 0x23000
.text
.globl _start
_start:
    lea zeroed(%rip), %rdi
    mov $LEN, %ecx
    xor %eax, %eax
    rep stosb                       /* site 1: zeros over zeros */
    lea msg_regs(%rip), %r15
    lea zeroed+LEN(%rip), %rbx
    cmp %rbx, %rdi
    jne fail
    test %rcx, %rcx
    jnz fail
    lea filled(%rip), %rdi
    mov $LEN/8, %ecx
    rep stosq                       /* site 2: zeros over data */
    lea filled+LEN(%rip), %rbx
    cmp %rbx, %rdi
    jne fail
    test %rcx, %rcx
    jnz fail
    lea msg_data(%rip), %r15
    lea filled(%rip), %rsi
    mov $LEN/8, %ecx
1:  cmpq $0, (%rsi)
    jne fail
    add $8, %rsi
    dec %ecx
    jnz 1b
    PUTS msg_ok
    POWEROFF
fail:
    PUTS msg_fail
    mov %r15, %rsi
    call guest_puts
    POWEROFF
#include "x86_lib.inc"
.data
msg_ok: .asciz "zero stores: all ok\n"
msg_fail: .asciz "zero stores: FAILED: "
msg_regs: .asciz "RDI/RCX after rep stosb\n"
msg_data: .asciz "the filled buffer was not cleared\n"
.balign 4096
filled: .fill LEN, 1, 0x5a
.bss
.balign 4096
zeroed: .skip LEN
