/* Interrupt-driven PL011 receive, the way Linux's amba-pl011 runs it: FIFOs on, RXIM | RTIM, SPI 1 (INTID 33)
 * routed by the GIC to vCPU 0. The guest sleeps in WFI with interrupts masked (a pending interrupt still ends
 * WFI, so no vector table is needed), acknowledges through the GIC, drains the FIFO while FR.RXFE is clear and
 * echoes each byte upper-cased; draining (not ICR) must drop the UART's line, as Linux relies on. On 'q' the guest
 * powers off with PSCI SYSTEM_OFF. GICv3 (system-register CPU interface) when ID_AA64PFR0_EL1.GIC says so,
 * else GICv2 (memory-mapped CPU interface).
 *
 * Loading: as every aarch64 guest (aarch64_guest.inc): an arm64 Image, position-independent, one vCPU is enough. */
#include "aarch64_guest.inc"

.set GICD, 0x08000000
.set GICD_CTLR, 0x000
.set GICD_IGROUPR, 0x080
.set GICD_ISENABLER, 0x100
.set GICD_IPRIORITYR, 0x400
.set GICD_ITARGETSR, 0x800
.set GICD_ICFGR, 0xc00
.set GICD_IROUTER, 0x6000
.set GICD_CTLR_RWP_BIT, 31
.set GICD_CTLR_V3, (1 << 4) | (1 << 1) | (1 << 0)  /* ARE, EnableGrp1, EnableGrp0 (one security state) */
.set GICR, 0x080a0000                              /* vCPU 0's redistributor (RD_base) */
.set GICR_WAKER, 0x014
.set GICR_WAKER_CHILDREN_ASLEEP_BIT, 2
.set GICC, 0x08010000
.set GICC_CTLR, 0x000
.set GICC_PMR, 0x004
.set GICC_IAR, 0x00c
.set GICC_EOIR, 0x010
.set SPURIOUS, 1020                                /* INTIDs 1020-1023 are special: nothing to handle */
.set INTID_WORD, PL011_INTID / 32
.set INTID_BIT, 1 << (PL011_INTID % 32)

IMAGE_START

entry:
    mov x21, #PL011
    str wzr, [x21, #PL011_CR]                      /* disable while reprogramming, as the TRM asks */
    mov w9, #0x1a                                  /* 115200 baud from a 48 MHz clock: IBRD 26, FBRD 3 */
    str w9, [x21, #PL011_IBRD]
    mov w9, #3
    str w9, [x21, #PL011_FBRD]
    mov w9, #0x70                                  /* LCR_H: 8 bits, FIFOs enabled */
    str w9, [x21, #PL011_LCR_H]
    mov w9, #0x12                                  /* IFLS: both FIFOs at half */
    str w9, [x21, #PL011_IFLS]
    mov w9, #0x7ff
    str w9, [x21, #PL011_ICR]
    mov w9, #0x50                                  /* IMSC: RTIM | RXIM */
    str w9, [x21, #PL011_IMSC]
    mov w9, #0x301                                 /* CR: UARTEN | TXE | RXE */
    str w9, [x21, #PL011_CR]

    mov x22, #0                                    /* set on 'q' */
    mov x20, #GICD
    mrs x9, id_aa64pfr0_el1
    ubfx x23, x9, #24, #4                          /* GIC field: non-zero = GICv3 system registers */
    cbz x23, gicv2_init

gicv3_init:
    mov w9, #(1 << 4)                              /* ARE first, then the group enables */
    str w9, [x20, #GICD_CTLR]
    bl gicd_wait_rwp
    mov w9, #GICD_CTLR_V3
    str w9, [x20, #GICD_CTLR]
    bl gicd_wait_rwp
    mov x9, #GICR                                  /* wake vCPU 0's redistributor */
    ldr w10, [x9, #GICR_WAKER]
    bic w10, w10, #(1 << 1)
    str w10, [x9, #GICR_WAKER]
1:  ldr w10, [x9, #GICR_WAKER]
    tbnz w10, #GICR_WAKER_CHILDREN_ASLEEP_BIT, 1b
    ldr w9, [x20, #(GICD_IGROUPR + 4 * INTID_WORD)] /* Group 1: signalled as IRQ */
    orr w9, w9, #INTID_BIT
    str w9, [x20, #(GICD_IGROUPR + 4 * INTID_WORD)]
    add x9, x20, #GICD_IROUTER
    str xzr, [x9, #(8 * PL011_INTID)]              /* route to affinity 0.0.0.0: vCPU 0 */
    bl gicd_spi_common
    mrs x9, icc_sre_el1
    orr x9, x9, #1
    msr icc_sre_el1, x9
    isb
    mov x9, #0xf0
    msr icc_pmr_el1, x9
    mov x9, #1
    msr icc_igrpen1_el1, x9
    isb
    b ready

gicv2_init:
    mov w9, #1                                     /* forward Group 0 (signalled as IRQ: FIQEn is clear) */
    str w9, [x20, #GICD_CTLR]
    mov w9, #1                                     /* target CPU interface 0 */
    add x9, x20, #GICD_ITARGETSR
    strb w9, [x9, #PL011_INTID]
    bl gicd_spi_common
    mov x9, #GICC
    mov w10, #0xf0
    str w10, [x9, #GICC_PMR]
    mov w10, #1
    str w10, [x9, #GICC_CTLR]

ready:
    PUTS msg_ready
wait:
    wfi
    bl gic_ack                                     /* x0 = the IAR value */
    and x24, x0, #0xffffff
    cmp x24, #SPURIOUS
    b.hs wait
    cmp x24, #PL011_INTID
    b.ne done
drain:
    ldr w9, [x21, #PL011_FR]
    tbnz w9, #FR_RXFE_BIT, done
    ldr w0, [x21, #PL011_DR]
    and w0, w0, #0xff
    cmp w0, #'q'
    cset x9, eq
    orr x22, x22, x9
    sub w9, w0, #'a'
    cmp w9, #('z' - 'a')
    b.hi 1f
    sub w0, w0, #0x20                              /* upper-case */
1:  bl guest_putc
    b drain
done:
    mov x0, x24
    bl gic_eoi
    cbz x22, wait
    PUTS msg_bye
    PSCI PSCI_SYSTEM_OFF
    HANG

/* gicd_spi_common: the PL011's SPI as a level-sensitive interrupt at priority 0xa0, enabled */
gicd_spi_common:
    ldr w9, [x20, #(GICD_ICFGR + 4 * (PL011_INTID / 16))]
    bic w9, w9, #(2 << (2 * (PL011_INTID % 16)))
    str w9, [x20, #(GICD_ICFGR + 4 * (PL011_INTID / 16))]
    mov w9, #0xa0
    add x10, x20, #GICD_IPRIORITYR
    strb w9, [x10, #PL011_INTID]
    mov w9, #INTID_BIT
    str w9, [x20, #(GICD_ISENABLER + 4 * INTID_WORD)]
    ret

gicd_wait_rwp:
    ldr w9, [x20, #GICD_CTLR]
    tbnz w9, #GICD_CTLR_RWP_BIT, gicd_wait_rwp
    ret

gic_ack:
    cbz x23, 1f
    mrs x0, icc_iar1_el1
    ret
1:  mov x9, #GICC
    ldr w0, [x9, #GICC_IAR]
    ret

gic_eoi:
    cbz x23, 1f
    msr icc_eoir1_el1, x0
    isb
    ret
1:  mov x9, #GICC
    str w0, [x9, #GICC_EOIR]
    ret

#include "aarch64_lib.inc"

msg_ready: .asciz "serial_echo: ready\n"
msg_bye: .asciz "\nserial_echo: bye\n"
IMAGE_END
