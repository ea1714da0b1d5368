/* Writes to guest-physical 0xe0000000, where no device and no RAM is: the VMM must end the VM with a report. */
#include "x86_guest.inc"
.text
.globl _start
_start:
    PUTS msg
    mov $0xe0000000, %r11
    movl $0xdeadbeef, (%r11)
    PUTS msg_after
    POWEROFF
#include "x86_lib.inc"
.data
msg: .asciz "unmapped_mmio: writing 0xe0000000\n"
msg_after: .asciz "unmapped_mmio: the write returned\n"
