/* A minimal virtio-net driver and IPv4 responder over virtio-mmio slot 0 (virtio 1.2 §5.1): negotiates
 * VERSION_1 + MAC, posts 4 receive buffers, ARPs for the gateway 10.0.2.2 and prints its MAC, answers ARP for
 * its own address 10.0.2.15, and echoes every UDP datagram sent to port 7 until one starts with "quit".
 * Completions wake it from hlt through the slot's irqfd. */
#include "guest.h"

#define SLOT 0xd0000000ul
#define SLOT_GSI 5
#define VECTOR 0x41
#define QSIZE 8
#define NRX 4
#define BUF 2048
#define HDR 12

enum { MAGIC = 0x000, VERSION = 0x004, DEVICE_ID = 0x008, DEV_FEAT = 0x010, DEV_FEAT_SEL = 0x014,
       DRV_FEAT = 0x020, DRV_FEAT_SEL = 0x024, QUEUE_SEL = 0x030, QUEUE_NUM_MAX = 0x034, QUEUE_NUM = 0x038,
       QUEUE_READY = 0x044, QUEUE_NOTIFY = 0x050, INT_STATUS = 0x060, INT_ACK = 0x064, STATUS = 0x070,
       DESC_LO = 0x080, DESC_HI = 0x084, AVAIL_LO = 0x090, AVAIL_HI = 0x094, USED_LO = 0x0a0, USED_HI = 0x0a4,
       CONFIG = 0x100 };
#define F_WRITE 2
#define FEATURE_MAC 5

struct desc { u64 addr; u32 len; u16 flags, next; };
struct avail { u16 flags, idx, ring[QSIZE], used_event; };
struct used_elem { u32 id, len; };
struct used { u16 flags, idx; struct used_elem ring[QSIZE]; u16 avail_event; };
struct queue {
    struct desc desc[QSIZE] __attribute__((aligned(16)));
    struct avail avail __attribute__((aligned(2)));
    struct used used __attribute__((aligned(4)));
    u16 last_used;
};

static struct queue rxq, txq;
static u8 rxbuf[NRX][BUF] __attribute__((aligned(16)));
static u8 txbuf[BUF] __attribute__((aligned(16)));
static u8 mac[6];
static const u8 my_ip[4] = {10, 0, 2, 15}, gw_ip[4] = {10, 0, 2, 2};
static volatile u32 interrupts;

__attribute__((interrupt)) static void isr(struct interrupt_frame *frame)
{
    (void)frame;
    mmio_write32(SLOT + INT_ACK, mmio_read32(SLOT + INT_STATUS));
    interrupts++;
    lapic_eoi();
}

static void setup_queue(u32 index, struct queue *q)
{
    mmio_write32(SLOT + QUEUE_SEL, index);
    mmio_write32(SLOT + QUEUE_NUM, QSIZE);
    mmio_write32(SLOT + DESC_LO, (u32)(u64)q->desc);
    mmio_write32(SLOT + DESC_HI, 0);
    mmio_write32(SLOT + AVAIL_LO, (u32)(u64)&q->avail);
    mmio_write32(SLOT + AVAIL_HI, 0);
    mmio_write32(SLOT + USED_LO, (u32)(u64)&q->used);
    mmio_write32(SLOT + USED_HI, 0);
    mmio_write32(SLOT + QUEUE_READY, 1);
}

static void post_rx(u16 id)
{
    rxq.desc[id] = (struct desc){ (u64)rxbuf[id], BUF, F_WRITE, 0 };
    rxq.avail.ring[rxq.avail.idx % QSIZE] = id;
    mb();
    rxq.avail.idx++;
    mb();
    mmio_write32(SLOT + QUEUE_NOTIFY, 0);
}

static void send(u32 len)  /* txbuf holds header + frame */
{
    txq.desc[0] = (struct desc){ (u64)txbuf, HDR + len, 0, 0 };
    txq.avail.ring[txq.avail.idx % QSIZE] = 0;
    mb();
    txq.avail.idx++;
    mb();
    mmio_write32(SLOT + QUEUE_NOTIFY, 1);
    while (*(volatile u16 *)&txq.used.idx == txq.last_used)
        sti_hlt();
    txq.last_used++;
}

static u16 be16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static void put16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }

static u16 ip_checksum(const u8 *p, int n)
{
    u32 sum = 0;
    for (int i = 0; i < n; i += 2)
        sum += be16(p + i);
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (u16)~sum;
}

static void arp(u16 op, const u8 *target_mac, const u8 *target_ip)
{
    u8 *f = txbuf + HDR;
    memset(txbuf, 0, HDR);
    memcpy(f, op == 1 ? (const u8 *)"\xff\xff\xff\xff\xff\xff" : target_mac, 6);
    memcpy(f + 6, mac, 6);
    put16(f + 12, 0x0806);
    put16(f + 14, 1);           /* Ethernet */
    put16(f + 16, 0x0800);      /* IPv4 */
    f[18] = 6;
    f[19] = 4;
    put16(f + 20, op);
    memcpy(f + 22, mac, 6);
    memcpy(f + 28, my_ip, 4);
    memcpy(f + 32, op == 1 ? (const u8 *)"\0\0\0\0\0\0" : target_mac, 6);
    memcpy(f + 38, target_ip, 4);
    send(42);
}

/* returns 1 when the datagram said "quit" */
static int udp_echo(const u8 *f, u32 len)
{
    const u8 *ip = f + 14;
    u32 ihl = (ip[0] & 0xf) * 4;
    const u8 *udp = ip + ihl;
    u16 ulen = be16(udp + 4);
    if (len < 14 + ihl + 8 || ulen < 8 || 14 + ihl + ulen > len || be16(udp + 2) != 7)
        return 0;
    u8 *o = txbuf + HDR;
    memset(txbuf, 0, HDR);
    memcpy(o, f + 6, 6);
    memcpy(o + 6, mac, 6);
    put16(o + 12, 0x0800);
    u8 *oip = o + 14;
    memset(oip, 0, 20);
    oip[0] = 0x45;
    put16(oip + 2, (u16)(20 + ulen));
    oip[8] = 64;
    oip[9] = 17;
    memcpy(oip + 12, my_ip, 4);
    memcpy(oip + 16, ip + 12, 4);
    put16(oip + 10, ip_checksum(oip, 20));
    u8 *oudp = oip + 20;
    put16(oudp, 7);
    memcpy(oudp + 2, udp, 2);
    put16(oudp + 4, ulen);
    put16(oudp + 6, 0);         /* no UDP checksum (allowed over IPv4) */
    memcpy(oudp + 8, udp + 8, ulen - 8);
    puts("virtio_net: echo ");
    for (u32 i = 8; i < ulen && i < 40; i++)
        putc((char)udp[i]);
    putc('\n');
    send(14 + 20 + ulen);
    return ulen >= 12 && memcmp(udp + 8, "quit", 4) == 0;
}

int guest_main(u64 cpu, u64 ncpus)
{
    (void)ncpus;
    if (cpu)
        for (;;) __asm__ __volatile__("cli; hlt");
    idt_set_gate(VECTOR, isr);
    idt_load();
    pic_mask_all();
    lapic_enable();
    ioapic_route(SLOT_GSI, VECTOR, 0);
    if (mmio_read32(SLOT + MAGIC) != 0x74726976 || mmio_read32(SLOT + DEVICE_ID) != 1) {
        puts("virtio_net: no virtio-net device at slot 0\n");
        return 1;
    }
    mmio_write32(SLOT + STATUS, 0);
    mmio_write32(SLOT + STATUS, 1);
    mmio_write32(SLOT + STATUS, 3);
    mmio_write32(SLOT + DRV_FEAT_SEL, 0);
    mmio_write32(SLOT + DRV_FEAT, 1u << FEATURE_MAC);
    mmio_write32(SLOT + DRV_FEAT_SEL, 1);
    mmio_write32(SLOT + DRV_FEAT, 1);   /* VIRTIO_F_VERSION_1 */
    mmio_write32(SLOT + STATUS, 11);
    if (!(mmio_read32(SLOT + STATUS) & 8)) {
        puts("virtio_net: FEATURES_OK refused\n");
        return 1;
    }
    setup_queue(0, &rxq);
    setup_queue(1, &txq);
    mmio_write32(SLOT + STATUS, 15);
    for (int i = 0; i < 6; i++)
        mac[i] = mmio_read8(SLOT + CONFIG + i);
    puts("virtio_net: mac ");
    for (int i = 0; i < 6; i++) {
        puthex(mac[i], 2);
        putc(i < 5 ? ':' : '\n');
    }
    for (u16 i = 0; i < NRX; i++)
        post_rx(i);
    arp(1, 0, gw_ip);

    int gateway_known = 0, quit = 0;
    while (!quit) {
        while (*(volatile u16 *)&rxq.used.idx == rxq.last_used)
            sti_hlt();
        struct used_elem e = rxq.used.ring[rxq.last_used % QSIZE];
        rxq.last_used++;
        const u8 *f = rxbuf[e.id] + HDR;
        u32 len = e.len > HDR ? e.len - HDR : 0;
        if (len >= 42 && be16(f + 12) == 0x0806) {
            if (be16(f + 20) == 2 && memcmp(f + 28, gw_ip, 4) == 0 && !gateway_known) {
                gateway_known = 1;
                puts("virtio_net: gateway 10.0.2.2 is at ");
                for (int i = 0; i < 6; i++) {
                    puthex(f[22 + i], 2);
                    putc(i < 5 ? ':' : '\n');
                }
                puts("virtio_net: ready\n");
            } else if (be16(f + 20) == 1 && memcmp(f + 38, my_ip, 4) == 0) {
                u8 who_mac[6], who_ip[4];
                memcpy(who_mac, f + 22, 6);
                memcpy(who_ip, f + 28, 4);
                arp(2, who_mac, who_ip);
            }
        } else if (len >= 42 && be16(f + 12) == 0x0800 && f[14 + 9] == 17) {
            quit = udp_echo(f, len);
        }
        post_rx((u16)e.id);
    }
    drain_interrupts();
    puts("virtio_net: interrupts ");
    putdec(interrupts);
    putc('\n');
    return 0;
}
