/* Writes to guest-physical 0x20000000, where the virt board has no device and no RAM: the VMM must end the VM
 * with a report (or, told to ignore such writes, let it go on: the guest then says so and powers off).
 *
 * Loading: as every aarch64 guest (aarch64_guest.inc): an arm64 Image, position-independent, one vCPU. */
#include "aarch64_guest.inc"

.set UNMAPPED, 0x20000000

IMAGE_START

entry:
    PUTS msg
    mov x9, #UNMAPPED
    mov w10, #0xbeef
    movk w10, #0xdead, lsl #16
    str w10, [x9]
    PUTS msg_after
    PSCI PSCI_SYSTEM_OFF
    HANG

#include "aarch64_lib.inc"

msg: .asciz "unmapped_mmio: writing 0x20000000\n"
msg_after: .asciz "unmapped_mmio: the write returned\n"
IMAGE_END
