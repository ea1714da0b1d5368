/* Asks for a reset with PSCI SYSTEM_RESET: the VMM must end (or restart) the VM saying it was reset.
 *
 * Loading: as every aarch64 guest (aarch64_guest.inc): an arm64 Image, position-independent, one vCPU. */
#include "aarch64_guest.inc"
IMAGE_START

entry:
    PUTS msg
    PSCI PSCI_SYSTEM_RESET
    PUTS msg_after                  /* only if the call returned */
    HANG

#include "aarch64_lib.inc"

msg: .asciz "reset: PSCI SYSTEM_RESET\n"
msg_after: .asciz "reset: SYSTEM_RESET returned\n"
IMAGE_END
