/* virtio-mmio driver helpers for the test guests: registers (virtio 1.2 §4.2.2), device initialization in the
 * order §3.1.1 gives, and one split queue of VQ_SIZE entries (§2.7). */
#ifndef VIRTIO_GUEST_H
#define VIRTIO_GUEST_H
#include "guest.h"

enum { VIRTIO_MAGIC = 0x000, VIRTIO_VERSION = 0x004, VIRTIO_DEVICE_ID = 0x008, VIRTIO_DEV_FEAT = 0x010,
       VIRTIO_DEV_FEAT_SEL = 0x014, VIRTIO_DRV_FEAT = 0x020, VIRTIO_DRV_FEAT_SEL = 0x024, VIRTIO_QUEUE_SEL = 0x030,
       VIRTIO_QUEUE_NUM_MAX = 0x034, VIRTIO_QUEUE_NUM = 0x038, VIRTIO_QUEUE_READY = 0x044,
       VIRTIO_QUEUE_NOTIFY = 0x050, VIRTIO_INT_STATUS = 0x060, VIRTIO_INT_ACK = 0x064, VIRTIO_STATUS = 0x070,
       VIRTIO_DESC_LO = 0x080, VIRTIO_DESC_HI = 0x084, VIRTIO_AVAIL_LO = 0x090, VIRTIO_AVAIL_HI = 0x094,
       VIRTIO_USED_LO = 0x0a0, VIRTIO_USED_HI = 0x0a4, VIRTIO_CONFIG = 0x100 };
enum { S_ACK = 1, S_DRIVER = 2, S_DRIVER_OK = 4, S_FEATURES_OK = 8 };
#define VQ_SIZE 8
#define VQ_F_NEXT 1
#define VQ_F_WRITE 2

struct vq_desc { u64 addr; u32 len; u16 flags, next; };
struct vq_avail { u16 flags, idx, ring[VQ_SIZE], used_event; };
struct vq_used_elem { u32 id, len; };
struct vq_used { u16 flags, idx; struct vq_used_elem ring[VQ_SIZE]; u16 avail_event; };
struct vq {
    struct vq_desc desc[VQ_SIZE] __attribute__((aligned(16)));
    struct vq_avail avail __attribute__((aligned(2)));
    struct vq_used used __attribute__((aligned(4)));
    u16 last_used;
};

/* Route the slot's GSI to `vector` on APIC 0 with `isr` as its handler. */
static inline void virtio_irq_setup(u8 gsi, u8 vector, isr_t isr)
{
    idt_set_gate(vector, isr);
    idt_load();
    pic_mask_all();
    lapic_enable();
    ioapic_route(gsi, vector, 0);
}

/* Reset, ACKNOWLEDGE, DRIVER, features (`low` plus VIRTIO_F_VERSION_1), FEATURES_OK. 0, or -1 with a message. */
static inline int virtio_init(u64 base, u32 device_id, u32 low, const char *who)
{
    if (mmio_read32(base + VIRTIO_MAGIC) != 0x74726976 || mmio_read32(base + VIRTIO_VERSION) != 2 ||
        mmio_read32(base + VIRTIO_DEVICE_ID) != device_id) {
        puts(who);
        puts(": no such virtio device at the slot\n");
        return -1;
    }
    mmio_write32(base + VIRTIO_STATUS, 0);
    mmio_write32(base + VIRTIO_STATUS, S_ACK);
    mmio_write32(base + VIRTIO_STATUS, S_ACK | S_DRIVER);
    mmio_write32(base + VIRTIO_DRV_FEAT_SEL, 0);
    mmio_write32(base + VIRTIO_DRV_FEAT, low);
    mmio_write32(base + VIRTIO_DRV_FEAT_SEL, 1);
    mmio_write32(base + VIRTIO_DRV_FEAT, 1);  /* VIRTIO_F_VERSION_1 (bit 32) */
    mmio_write32(base + VIRTIO_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    if (!(mmio_read32(base + VIRTIO_STATUS) & S_FEATURES_OK)) {
        puts(who);
        puts(": FEATURES_OK refused\n");
        return -1;
    }
    return 0;
}

static inline int virtio_queue(u64 base, u32 index, struct vq *q)
{
    mmio_write32(base + VIRTIO_QUEUE_SEL, index);
    if (mmio_read32(base + VIRTIO_QUEUE_NUM_MAX) < VQ_SIZE)
        return -1;
    mmio_write32(base + VIRTIO_QUEUE_NUM, VQ_SIZE);
    mmio_write32(base + VIRTIO_DESC_LO, (u32)(u64)q->desc);
    mmio_write32(base + VIRTIO_DESC_HI, (u32)((u64)q->desc >> 32));
    mmio_write32(base + VIRTIO_AVAIL_LO, (u32)(u64)&q->avail);
    mmio_write32(base + VIRTIO_AVAIL_HI, (u32)((u64)&q->avail >> 32));
    mmio_write32(base + VIRTIO_USED_LO, (u32)(u64)&q->used);
    mmio_write32(base + VIRTIO_USED_HI, (u32)((u64)&q->used >> 32));
    mmio_write32(base + VIRTIO_QUEUE_READY, 1);
    return 0;
}

static inline void virtio_driver_ok(u64 base)
{
    mmio_write32(base + VIRTIO_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
}

/* Make descriptor `head` available and notify queue `index`. */
static inline void vq_kick(u64 base, u32 index, struct vq *q, u16 head)
{
    q->avail.ring[q->avail.idx % VQ_SIZE] = head;
    mb();
    q->avail.idx++;
    mb();
    mmio_write32(base + VIRTIO_QUEUE_NOTIFY, index);
}

/* Sleep (sti;hlt, woken by the slot's interrupt) until the device used a buffer; returns it. */
static inline struct vq_used_elem vq_wait(struct vq *q)
{
    while (*(volatile u16 *)&q->used.idx == q->last_used)
        sti_hlt();
    return q->used.ring[q->last_used++ % VQ_SIZE];
}

static inline void virtio_ack_interrupt(u64 base)
{
    mmio_write32(base + VIRTIO_INT_ACK, mmio_read32(base + VIRTIO_INT_STATUS));
}
#endif
