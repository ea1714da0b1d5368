/* A minimal virtio-net driver and IPv4 responder over virtio-mmio slot 0 (virtio 1.2 §5.1): negotiates
 * VERSION_1 + MAC, posts 4 receive buffers, ARPs for the gateway 10.0.2.2 and prints its MAC, answers ARP for
 * its own address 10.0.2.15, and echoes every UDP datagram sent to port 7 until one starts with "quit".
 * Completions wake it from hlt through the slot's irqfd. */
#include "virtio_guest.h"

#define SLOT 0xd0000000ul
#define SLOT_GSI 5
#define VECTOR 0x41
#define NRX 4
#define BUF 2048
#define HDR 12
#define FEATURE_MAC 5

static struct vq rxq, txq;
static u8 rxbuf[NRX][BUF] __attribute__((aligned(16)));
static u8 txbuf[BUF] __attribute__((aligned(16)));
static u8 mac[6];
static const u8 my_ip[4] = {10, 0, 2, 15}, gw_ip[4] = {10, 0, 2, 2};
static volatile u32 interrupts;

__attribute__((interrupt)) static void isr(struct interrupt_frame *frame)
{
    (void)frame;
    virtio_ack_interrupt(SLOT);
    interrupts++;
    lapic_eoi();
}

static void post_rx(u16 id)
{
    rxq.desc[id] = (struct vq_desc){ (u64)rxbuf[id], BUF, VQ_F_WRITE, 0 };
    vq_kick(SLOT, 0, &rxq, id);
}

static void send(u32 len)  /* txbuf holds header + frame */
{
    txq.desc[0] = (struct vq_desc){ (u64)txbuf, HDR + len, 0, 0 };
    vq_kick(SLOT, 1, &txq, 0);
    vq_wait(&txq);
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
    virtio_irq_setup(SLOT_GSI, VECTOR, isr);
    if (virtio_init(SLOT, 1, 1u << FEATURE_MAC, "virtio_net") || virtio_queue(SLOT, 0, &rxq) ||
        virtio_queue(SLOT, 1, &txq))
        return 1;
    virtio_driver_ok(SLOT);
    for (int i = 0; i < 6; i++)
        mac[i] = mmio_read8(SLOT + VIRTIO_CONFIG + i);
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
        struct vq_used_elem e = vq_wait(&rxq);
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
