/* The console UART's C fast path (polled LSR reads and THR writes completed in the run loop) must hand back every
 * register state it cannot complete: polled output, then loopback (THR bytes come back on RBR), then a THRE
 * interrupt source (IER.ETBEI: IIR reports THRE after a write), then a burst as Linux's serial8250_tx_chars writes
 * one on a THRE interrupt (the first byte raises the line again, the rest leave it; IIR reports THRE after it),
 * then a divisor-latch write, then polled output
 * again, a prompt that must show while the guest polls for a key, and a partial line that only the power-off
 * exit flushes. Register layout: PC16550D Table II. */
#include "guest.h"

#define THR 0
#define IER 1
#define IIR 2
#define LCR 3
#define MCR 4
#define LSR 5

static void polled_puts(const char *s)
{
    for (; *s; s++) {
        while (!(inb(COM1 + LSR) & 0x20))  /* THRE */
            ;
        outb(COM1 + THR, (u8)*s);
    }
}

int guest_main(u64 cpu, u64 ncpus)
{
    (void)cpu; (void)ncpus;
    polled_puts("uart_fast: polled line 1\n");
    outb(COM1 + MCR, 0x10);                      /* loopback: THR -> RBR, nothing leaves */
    outb(COM1 + THR, 'L');
    u8 lsr = inb(COM1 + LSR), back = inb(COM1 + THR);
    outb(COM1 + MCR, 0x00);
    polled_puts((lsr & 0x01) && back == 'L' ? "uart_fast: loopback ok\n" : "uart_fast: loopback BROKEN\n");
    outb(COM1 + IER, 0x02);                      /* ETBEI: THR writes raise THRE in IIR */
    inb(COM1 + IIR);                             /* reading IIR clears the THRE raised by enabling */
    outb(COM1 + THR, '.');
    u8 iir = inb(COM1 + IIR);
    outb(COM1 + IER, 0x00);
    polled_puts((iir & 0x0f) == 0x02 ? "\nuart_fast: thre ok\n" : "\nuart_fast: thre BROKEN\n");
    outb(COM1 + MCR, 0x08);                      /* OUT2: the IRQ line follows the interrupt (IF stays clear) */
    outb(COM1 + IER, 0x02);
    inb(COM1 + IIR);                             /* THRE reported: the line drops */
    for (const char *s = "uart_fast: burst\n"; *s; s++)
        outb(COM1 + THR, (u8)*s);                /* no LSR reads: THRE was reported */
    iir = inb(COM1 + IIR);
    outb(COM1 + IER, 0x00);
    outb(COM1 + MCR, 0x00);
    polled_puts((iir & 0x0f) == 0x02 ? "uart_fast: burst thre ok\n" : "uart_fast: burst thre BROKEN\n");
    outb(COM1 + LCR, 0x80);                      /* DLAB: offset 0 is the divisor latch, not THR */
    outb(COM1 + THR, 0x01);
    outb(COM1 + LCR, 0x03);
    polled_puts("uart_fast: polled line 2\n");
    polled_puts("uart_fast: key? ");             /* a prompt, then polling for input: it must be seen first */
    while (!(inb(COM1 + LSR) & 0x01))            /* DR */
        ;
    u8 key = inb(COM1 + THR);
    polled_puts("got ");
    outb(COM1 + THR, key);
    polled_puts("\nuart_fast: no newline");
    return 0;
}
