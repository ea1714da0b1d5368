/* The aarch64 demo guest: every vCPU says hello through the PL011, then the VM powers off.
 *
 * Loading (aarch64_guest.inc has the details): an arm64 Image, text_offset 0x80000, position-independent; vCPU 0
 * enters at offset 0 (x0 = DTB, unused), the others start powered off. Nothing is patched: vCPU 0 learns the
 * vCPU count by starting vCPUs 1, 2, ... with PSCI CPU_ON (target MPIDR Aff0 = index % 16, Aff1 = index / 16, as
 * KVM and QEMU's virt number them; context id = index, arriving in x0) until PSCI answers INVALID_PARAMETERS.
 * Then vCPU N prints "cloudkvm: hello from vCPU N of COUNT" when a shared turn counter reaches N and passes the
 * turn on; a vCPU that is done calls PSCI CPU_OFF, the last one PSCI SYSTEM_OFF. */
#include "aarch64_guest.inc"
IMAGE_START

entry:
    mov x19, #0                     /* vCPU 0 */
    mov x20, #1                     /* the next vCPU to start */
1:  and x1, x20, #0xf               /* its MPIDR: Aff0 = index % 16, Aff1 = index / 16 */
    lsr x9, x20, #4
    orr x1, x1, x9, lsl #8
    adr x2, secondary_entry
    mov x3, x20
    PSCI PSCI_CPU_ON
    cbnz x0, 2f                     /* INVALID_PARAMETERS: no vCPU with that MPIDR; the count is x20 */
    add x20, x20, #1
    cmp x20, #4096
    b.lo 1b
2:  adr x9, vcpu_count
    str x20, [x9]                   /* published before the turn passes to vCPU 1 (stlr below) */
    b take_turn

secondary_entry:
    mov x19, x0                     /* context id: this vCPU's index */

take_turn:
    adr x21, turn
1:  ldar x9, [x21]
    cmp x9, x19
    b.eq 2f
    yield
    b 1b
2:  adr x9, vcpu_count
    ldr x20, [x9]
    PUTS msg_hello
    mov x0, x19
    bl guest_put_dec
    PUTS msg_of
    mov x0, x20
    bl guest_put_dec
    PUTS msg_nl
    add x9, x19, #1
    cmp x9, x20
    b.eq last
    stlr x9, [x21]                  /* the next vCPU's turn */
    PSCI PSCI_CPU_OFF               /* does not return */
    HANG

last:
    PUTS msg_bye
    PSCI PSCI_SYSTEM_OFF            /* does not return */
    HANG

#include "aarch64_lib.inc"

.balign 8
turn: .quad 0                       /* whose turn it is to print */
vcpu_count: .quad 0
msg_hello: .asciz "cloudkvm: hello from vCPU "
msg_of: .asciz " of "
msg_nl: .asciz "\n"
msg_bye: .asciz "cloudkvm: all vCPUs said hello, powering off\n"
IMAGE_END
