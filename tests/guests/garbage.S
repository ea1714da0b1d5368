/* Executes bytes that are no valid instruction, with no IDT to catch the #UD. */
#include "x86_guest.inc"
.text
.globl _start
_start:
    PUTS msg
    .byte 0x0f, 0x0b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff   /* ud2, then junk */
    POWEROFF
#include "x86_lib.inc"
.data
msg: .asciz "garbage: executing junk\n"
