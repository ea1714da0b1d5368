/* Loads an empty IDT and touches a non-canonical address: #GP -> #GP -> #DF -> shutdown (a triple fault). */
#include "x86_guest.inc"
.text
.globl _start
_start:
    PUTS msg
    lidt null_idtr(%rip)
    mov $0x8000000000000000, %rax
    mov (%rax), %rax
    POWEROFF
#include "x86_lib.inc"
.data
null_idtr: .word 0
           .quad 0
msg: .asciz "triple_fault: int3 with an empty IDT\n"
