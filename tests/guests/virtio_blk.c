/* A minimal virtio-blk driver over virtio-mmio (virtio 1.2 §4.2.3, §2.7, §5.2) for slot 0 of the x86 board:
 * negotiates VERSION_1, sets up one split queue, waits for each completion with sti;hlt on the slot's GSI
 * (the VMM signals it through an irqfd), writes 8 sectors, reads them back, flushes, reads a sector the host
 * prepared, asks for the serial, and reports everything on COM1. */
#include "virtio_blk_guest.h"

static u8 data[4096] __attribute__((aligned(512)));

static u32 checksum(const u8 *p, u32 n)
{
    u32 sum = 0;
    for (u32 i = 0; i < n; i++)
        sum = sum * 31 + p[i];
    return sum;
}

int guest_main(u64 cpu, u64 ncpus)
{
    (void)ncpus;
    if (cpu)
        for (;;) __asm__ __volatile__("cli; hlt");
    virtio_irq_setup(SLOT_GSI, VECTOR, virtio_isr);
    if (virtio_init(SLOT, 2, 0, "virtio_blk") || virtio_queue(SLOT, 0, &q))
        return 1;
    virtio_driver_ok(SLOT);

    u64 capacity = mmio_read32(SLOT + VIRTIO_CONFIG) | ((u64)mmio_read32(SLOT + VIRTIO_CONFIG + 4) << 32);
    puts("virtio_blk: capacity ");
    putdec(capacity);
    puts(" sectors\n");

    for (u32 i = 0; i < sizeof(data); i++)
        data[i] = (u8)(i * 7 + 3);
    u32 written = checksum(data, sizeof(data));
    int st = submit(T_OUT, 0, data, sizeof(data), 0);
    memset(data, 0, sizeof(data));
    int st2 = submit(T_IN, 0, data, sizeof(data), 1);
    puts(st == 0 && st2 == 0 && checksum(data, sizeof(data)) == written ? "virtio_blk: write+read ok\n"
                                                                        : "virtio_blk: write+read MISMATCH\n");
    puts(submit(T_FLUSH, 0, 0, 0, 0) == 0 ? "virtio_blk: flush ok\n" : "virtio_blk: flush FAILED\n");
    submit(T_IN, 2048, data, 512, 1);
    puts("virtio_blk: sector 2048 checksum 0x");
    puthex(checksum(data, 512), 8);
    putc('\n');
    memset(data, 0, 32);
    submit(T_GET_ID, 0, data, 20, 1);
    puts("virtio_blk: serial ");
    data[20] = 0;
    puts((const char *)data);
    putc('\n');
    puts("virtio_blk: out-of-range read status ");
    putdec(submit(T_IN, capacity, data, 512, 1));
    putc('\n');
    drain_interrupts();
    puts("virtio_blk: interrupts ");
    putdec(interrupts);
    putc('\n');
    return 0;
}
