/* A minimal virtio-blk driver over virtio-mmio (virtio 1.2 §4.2.3, §2.7, §5.2) for slot 0 of the x86 board:
 * negotiates VERSION_1, sets up one split queue, waits for each completion with sti;hlt on the slot's GSI
 * (the VMM signals it through an irqfd), writes 8 sectors, reads them back, flushes, reads a sector the host
 * prepared, asks for the serial, and reports everything on COM1. */
#include "guest.h"

#define SLOT 0xd0000000ul
#define SLOT_GSI 5
#define VECTOR 0x40
#define QSIZE 8

enum { MAGIC = 0x000, VERSION = 0x004, DEVICE_ID = 0x008, DEV_FEAT = 0x010, DEV_FEAT_SEL = 0x014,
       DRV_FEAT = 0x020, DRV_FEAT_SEL = 0x024, QUEUE_SEL = 0x030, QUEUE_NUM_MAX = 0x034, QUEUE_NUM = 0x038,
       QUEUE_READY = 0x044, QUEUE_NOTIFY = 0x050, INT_STATUS = 0x060, INT_ACK = 0x064, STATUS = 0x070,
       DESC_LO = 0x080, DESC_HI = 0x084, AVAIL_LO = 0x090, AVAIL_HI = 0x094, USED_LO = 0x0a0, USED_HI = 0x0a4,
       CONFIG = 0x100 };
enum { S_ACK = 1, S_DRIVER = 2, S_DRIVER_OK = 4, S_FEATURES_OK = 8 };
enum { T_IN = 0, T_OUT = 1, T_FLUSH = 4, T_GET_ID = 8 };
#define F_NEXT 1
#define F_WRITE 2

struct desc { u64 addr; u32 len; u16 flags, next; };
struct avail { u16 flags, idx, ring[QSIZE], used_event; };
struct used_elem { u32 id, len; };
struct used { u16 flags, idx; struct used_elem ring[QSIZE]; u16 avail_event; };
struct req { u32 type, reserved; u64 sector; };

static struct desc descs[QSIZE] __attribute__((aligned(16)));
static struct avail avail __attribute__((aligned(2)));
static struct used used __attribute__((aligned(4)));
static struct req req;
static u8 data[4096] __attribute__((aligned(512)));
static volatile u8 status_byte;
static volatile u32 interrupts;
static u16 last_used;

__attribute__((interrupt)) static void virtio_isr(struct interrupt_frame *frame)
{
    (void)frame;
    u32 pending = mmio_read32(SLOT + INT_STATUS);
    mmio_write32(SLOT + INT_ACK, pending);
    interrupts++;
    lapic_eoi();
}

static int submit(u32 type, u64 sector, u32 len, int device_writes)
{
    req.type = type;
    req.reserved = 0;
    req.sector = sector;
    status_byte = 0xff;
    int n = 0;
    descs[n] = (struct desc){ (u64)&req, sizeof(req), F_NEXT, 1 };
    n++;
    if (len) {
        descs[n] = (struct desc){ (u64)data, len, F_NEXT | (device_writes ? F_WRITE : 0), 2 };
        n++;
    }
    descs[n] = (struct desc){ (u64)&status_byte, 1, F_WRITE, 0 };
    avail.ring[avail.idx % QSIZE] = 0;
    mb();
    avail.idx++;
    mb();
    mmio_write32(SLOT + QUEUE_NOTIFY, 0);
    while (*(volatile u16 *)&used.idx == last_used)
        sti_hlt();
    last_used++;
    return status_byte;
}

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
    idt_set_gate(VECTOR, virtio_isr);
    idt_load();
    pic_mask_all();
    lapic_enable();
    ioapic_route(SLOT_GSI, VECTOR, 0);

    if (mmio_read32(SLOT + MAGIC) != 0x74726976 || mmio_read32(SLOT + VERSION) != 2 ||
        mmio_read32(SLOT + DEVICE_ID) != 2) {
        puts("virtio_blk: no virtio-blk device at slot 0\n");
        return 1;
    }
    mmio_write32(SLOT + STATUS, 0);
    mmio_write32(SLOT + STATUS, S_ACK);
    mmio_write32(SLOT + STATUS, S_ACK | S_DRIVER);
    mmio_write32(SLOT + DEV_FEAT_SEL, 1);
    u32 high = mmio_read32(SLOT + DEV_FEAT);
    mmio_write32(SLOT + DRV_FEAT_SEL, 0);
    mmio_write32(SLOT + DRV_FEAT, 0);
    mmio_write32(SLOT + DRV_FEAT_SEL, 1);
    mmio_write32(SLOT + DRV_FEAT, high & 1);  /* VIRTIO_F_VERSION_1 only */
    mmio_write32(SLOT + STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    if (!(mmio_read32(SLOT + STATUS) & S_FEATURES_OK)) {
        puts("virtio_blk: FEATURES_OK refused\n");
        return 1;
    }
    mmio_write32(SLOT + QUEUE_SEL, 0);
    if (mmio_read32(SLOT + QUEUE_NUM_MAX) < QSIZE) {
        puts("virtio_blk: queue too small\n");
        return 1;
    }
    mmio_write32(SLOT + QUEUE_NUM, QSIZE);
    mmio_write32(SLOT + DESC_LO, (u32)(u64)descs);
    mmio_write32(SLOT + DESC_HI, (u32)((u64)descs >> 32));
    mmio_write32(SLOT + AVAIL_LO, (u32)(u64)&avail);
    mmio_write32(SLOT + AVAIL_HI, (u32)((u64)&avail >> 32));
    mmio_write32(SLOT + USED_LO, (u32)(u64)&used);
    mmio_write32(SLOT + USED_HI, (u32)((u64)&used >> 32));
    mmio_write32(SLOT + QUEUE_READY, 1);
    mmio_write32(SLOT + STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);

    u64 capacity = mmio_read32(SLOT + CONFIG) | ((u64)mmio_read32(SLOT + CONFIG + 4) << 32);
    puts("virtio_blk: capacity ");
    putdec(capacity);
    puts(" sectors\n");

    for (u32 i = 0; i < sizeof(data); i++)
        data[i] = (u8)(i * 7 + 3);
    u32 written = checksum(data, sizeof(data));
    int st = submit(T_OUT, 0, sizeof(data), 0);
    memset(data, 0, sizeof(data));
    int st2 = submit(T_IN, 0, sizeof(data), 1);
    puts(st == 0 && st2 == 0 && checksum(data, sizeof(data)) == written ? "virtio_blk: write+read ok\n"
                                                                        : "virtio_blk: write+read MISMATCH\n");
    puts(submit(T_FLUSH, 0, 0, 0) == 0 ? "virtio_blk: flush ok\n" : "virtio_blk: flush FAILED\n");
    submit(T_IN, 2048, 512, 1);
    puts("virtio_blk: sector 2048 checksum 0x");
    puthex(checksum(data, 512), 8);
    putc('\n');
    memset(data, 0, 32);
    submit(T_GET_ID, 0, 20, 1);
    puts("virtio_blk: serial ");
    data[20] = 0;
    puts((const char *)data);
    putc('\n');
    puts("virtio_blk: out-of-range read status ");
    putdec(submit(T_IN, capacity, 512, 1));
    putc('\n');
    drain_interrupts();
    puts("virtio_blk: interrupts ");
    putdec(interrupts);
    putc('\n');
    return 0;
}
