/* Entry for purpose-built C guests: the board's flat-payload ABI (64-bit, RDI = vCPU index, RSI = vCPU count,
 * RSP = private stack) straight into guest_main(cpu, ncpus); its return value powers the VM off (0) or resets. */
#include "x86_guest.inc"
.text
.globl _start
_start:
    and $-16, %rsp
    call guest_main
    test %eax, %eax
    jnz 1f
    POWEROFF
1:  mov $ACPI_RESET, %dx
    mov $1, %al
    out %al, %dx
2:  hlt
    jmp 2b
