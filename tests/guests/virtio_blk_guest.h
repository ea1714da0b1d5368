/* The virtio-blk side of the test guests (virtio 1.2 §5.2.6 requests over virtio_guest.h's split queue): the
 * device in slot 0 of the x86 board, its interrupt handler (counting interrupts), and one request at a time. */
#ifndef VIRTIO_BLK_GUEST_H
#define VIRTIO_BLK_GUEST_H
#include "virtio_guest.h"

#define SLOT 0xd0000000ul
#define SLOT_GSI 5
#define VECTOR 0x40
enum { T_IN = 0, T_OUT = 1, T_FLUSH = 4, T_GET_ID = 8, T_WRITE_ZEROES = 13 };

struct req { u32 type, reserved; u64 sector; };

static struct vq q;
static struct req req;
static volatile u8 status_byte;
static volatile u32 interrupts;

__attribute__((interrupt)) static void virtio_isr(struct interrupt_frame *frame)
{
    (void)frame;
    virtio_ack_interrupt(SLOT);
    interrupts++;
    lapic_eoi();
}

/* One request: header, optional data (device-readable unless `device_writes`), status. Returns the status. */
static int submit(u32 type, u64 sector, const void *buf, u32 len, int device_writes)
{
    req = (struct req){ type, 0, sector };
    status_byte = 0xff;
    int n = 0;
    q.desc[n++] = (struct vq_desc){ (u64)&req, sizeof(req), VQ_F_NEXT, 1 };
    if (len)
        q.desc[n++] = (struct vq_desc){ (u64)buf, len, VQ_F_NEXT | (device_writes ? VQ_F_WRITE : 0), 2 };
    q.desc[n] = (struct vq_desc){ (u64)&status_byte, 1, VQ_F_WRITE, 0 };
    vq_kick(SLOT, 0, &q, 0);
    vq_wait(&q);
    return status_byte;
}
#endif
