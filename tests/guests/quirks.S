/* Runs, at CPL0, the instructions a software KVM's emulator was seen to reject, and checks their effects:
 * int3 (through an IDT #BP handler), fwait, ldmxcsr/stmxcsr on a stack operand, movd/movq xmm<->GPR.
 * Prints "quirks: all ok" only if every effect is right; natively run or completed by the VMM alike. */
#include "x86_guest.inc"
#include "x86_irq.inc"
.text
.globl _start
_start:
    SET_GATE 3, bp_handler
    LOAD_IDT
    mov %cr4, %rax                  /* the VMM sets OSFXSR already; keep it explicit */
    or $(1 << 9), %rax
    mov %rax, %cr4
    int3
    lea msg_bp(%rip), %r15
    cmpb $1, bp_seen(%rip)
    jne fail
    fwait
    sub $16, %rsp
    movl $0x1fbf, 4(%rsp)           /* all exceptions masked, flags set */
    ldmxcsr 4(%rsp)
    movl $0, 8(%rsp)
    stmxcsr 8(%rsp)
    lea msg_mxcsr(%rip), %r15
    cmpl $0x1fbf, 8(%rsp)
    jne fail
    movl $0x1f80, 4(%rsp)
    ldmxcsr 4(%rsp)
    add $16, %rsp
    mov $0x12345678, %ecx
    movd %ecx, %xmm15
    xor %ecx, %ecx
    movd %xmm15, %ecx
    lea msg_movd(%rip), %r15
    cmp $0x12345678, %ecx
    jne fail
    mov $0x1122334455667788, %rax
    movq %rax, %xmm1
    xor %eax, %eax
    movq %xmm1, %rax
    mov $0x1122334455667788, %rbx
    lea msg_movq(%rip), %r15
    cmp %rbx, %rax
    jne fail
    PUTS msg_ok
    POWEROFF
fail:
    PUTS msg_fail
    mov %r15, %rsi
    call guest_puts
    POWEROFF

bp_handler:
    movb $1, bp_seen(%rip)
    iretq

#include "x86_lib.inc"
.data
bp_seen: .byte 0
msg_ok: .asciz "quirks: all ok\n"
msg_fail: .asciz "quirks: FAILED: "
msg_bp: .asciz "int3 handler did not run\n"
msg_mxcsr: .asciz "stmxcsr did not return what ldmxcsr loaded\n"
msg_movd: .asciz "movd round trip\n"
msg_movq: .asciz "movq round trip\n"
IDT_DATA
