/* Pulses the reset line through the i8042 (command 0xfe to port 0x64), as Linux's reboot=k does. */
#include "x86_guest.inc"
.text
.globl _start
_start:
    PUTS msg
    mov $0xfe, %al
    out %al, $0x64
1:  hlt
    jmp 1b
#include "x86_lib.inc"
.data
msg: .asciz "reset: pulsing the i8042 reset line\n"
