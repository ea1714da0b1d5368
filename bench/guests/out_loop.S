/* exit_rate benchmark guest: OUT to the POST port 0x80 a fixed number of times, then power off (S5). */
#include "x86_guest.inc"
.set ITERATIONS, 200000
.text
.globl _start
_start:
    mov $ITERATIONS, %ecx
    mov $0x80, %dx
1:  out %al, %dx
    dec %ecx
    jnz 1b
    POWEROFF
