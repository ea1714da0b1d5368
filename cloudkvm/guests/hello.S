/* The built-in demo guest: every vCPU says hello on COM1, the last one to finish powers the VM off. */
#include "x86_guest.inc"
.text
.globl _start
_start:
    mov %rdi, %r12                      /* vCPU index */
    mov %rsi, %r13                      /* vCPU count */
    LOCK_ACQUIRE print_lock
    PUTS msg_hello
    mov %r12, %rax
    call guest_put_hex_digit
    PUTS msg_of
    mov %r13, %rax
    call guest_put_hex_digit
    PUTS msg_nl
    LOCK_RELEASE print_lock
    lock incq done(%rip)
1:  cmp done(%rip), %r13                /* wait until every vCPU has printed */
    je 2f
    pause
    jmp 1b
2:  test %r12, %r12
    jnz 3f
    PUTS msg_bye
    POWEROFF
3:  hlt
    jmp 3b

#include "x86_lib.inc"
.data
print_lock: .byte 0
.align 8
done: .quad 0
msg_hello: .asciz "cloudkvm: hello from vCPU "
msg_of: .asciz " of "
msg_nl: .asciz "\n"
msg_bye: .asciz "cloudkvm: all vCPUs said hello, powering off\n"
