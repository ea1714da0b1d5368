/* The format-probing attack (issue 11): a virtio-blk driver (virtio 1.2 §5.2, over virtio-mmio §4.2) for slot 0
 * that shows the first bytes of sector 0 as it reads them, then copies sector 1 over sector 0 — where the host test
 * put a qcow2 header naming a host file — flushes, and reports each request's status on COM1. */
#include "virtio_blk_guest.h"

static u8 data[512] __attribute__((aligned(512)));

static void report(const char *what, int status)
{
    puts(what);
    putdec(status);
    putc('\n');
}

int guest_main(u64 cpu, u64 ncpus)
{
    (void)ncpus;
    if (cpu)
        for (;;) __asm__ __volatile__("cli; hlt");
    virtio_irq_setup(SLOT_GSI, VECTOR, virtio_isr);
    if (virtio_init(SLOT, 2, 0, "sector_copy") || virtio_queue(SLOT, 0, &q))
        return 1;
    virtio_driver_ok(SLOT);
    int st = submit(T_IN, 0, data, 512, 1);
    puts("sector_copy: sector 0 starts ");
    for (int i = 0; i < 24; i++)
        puthex(data[i], 2);
    putc('\n');
    report("sector_copy: read status ", st);
    report("sector_copy: read sector 1 status ", submit(T_IN, 1, data, 512, 1));
    report("sector_copy: write sector 0 status ", submit(T_OUT, 0, data, 512, 0));
    report("sector_copy: flush status ", submit(T_FLUSH, 0, 0, 0, 0));
    drain_interrupts();
    return 0;
}
