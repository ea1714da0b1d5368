/* The format-probing attack (issue 11): a virtio-blk driver (virtio 1.2 §5.2, over virtio-mmio §4.2) for slot 0
 * that shows the first bytes of sector 0 as it reads them, then copies sector 1 over sector 0 — where the host test
 * put a qcow2 header naming a host file — flushes, and reports each request's status on COM1. */
#include "virtio_guest.h"

#define SLOT 0xd0000000ul
#define SLOT_GSI 5
#define VECTOR 0x40
enum { T_IN = 0, T_OUT = 1, T_FLUSH = 4 };

struct req { u32 type, reserved; u64 sector; };

static struct vq q;
static struct req req;
static u8 data[512] __attribute__((aligned(512)));
static volatile u8 status_byte;

__attribute__((interrupt)) static void virtio_isr(struct interrupt_frame *frame)
{
    (void)frame;
    virtio_ack_interrupt(SLOT);
    lapic_eoi();
}

static int submit(u32 type, u64 sector, u32 len, int device_writes)
{
    req = (struct req){ type, 0, sector };
    status_byte = 0xff;
    int n = 0;
    q.desc[n++] = (struct vq_desc){ (u64)&req, sizeof(req), VQ_F_NEXT, 1 };
    if (len)
        q.desc[n++] = (struct vq_desc){ (u64)data, len, VQ_F_NEXT | (device_writes ? VQ_F_WRITE : 0), 2 };
    q.desc[n] = (struct vq_desc){ (u64)&status_byte, 1, VQ_F_WRITE, 0 };
    vq_kick(SLOT, 0, &q, 0);
    vq_wait(&q);
    return status_byte;
}

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
    int st = submit(T_IN, 0, 512, 1);
    puts("sector_copy: sector 0 starts ");
    for (int i = 0; i < 24; i++)
        puthex(data[i], 2);
    putc('\n');
    report("sector_copy: read status ", st);
    report("sector_copy: read sector 1 status ", submit(T_IN, 1, 512, 1));
    report("sector_copy: write sector 0 status ", submit(T_OUT, 0, 512, 0));
    report("sector_copy: flush status ", submit(T_FLUSH, 0, 0, 0));
    drain_interrupts();
    return 0;
}
