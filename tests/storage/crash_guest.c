/* Crash-run guest: a write storm on the virtio-blk disk in slot 0 (virtio 1.2 §5.2.6 requests over the split
 * queue of virtio_guest.h), with a FLUSH every `flush_every` operations; each acknowledged flush is reported on
 * COM1 as "flush N" (N: the operations it covers) before the next operation starts, so the host knows what must
 * survive when it SIGKILLs the VMM. The storm is read from sector 0 (struct config, written by the host) and
 * replayed on the host side by tests/storage/crashrun.py: keep the two in step.
 *
 * Operation i (from 1): n = 1 + r % max_sectors sectors at first_sector + r' % (last_sector - first_sector - n + 1)
 * (r, r' successive splitmix64 outputs); then, if WRITE_ZEROES was negotiated and the next output % 16 == 0,
 * a WRITE_ZEROES with the unmap flag; otherwise a write whose sector s holds the 64-bit words i, s,
 * seed ^ k for k = 2..62, and v ^ s (v the next output). */
#include "virtio_blk_guest.h"

#define F_FLUSH 9
#define F_WRITE_ZEROES 14
#define MAX_SECTORS 64
enum { WZ_FLAG_UNMAP = 1 };

struct wz_seg { u64 sector; u32 num_sectors, flags; };
struct config {
    char magic[8];  /* "CKCRASH1" */
    u64 seed;
    u32 flush_every, max_sectors;
    u64 first_sector, last_sector, max_ops;
};

static struct wz_seg wz;
static u64 data[MAX_SECTORS * 64] __attribute__((aligned(512)));

static u64 splitmix64(u64 *state)
{
    u64 z = (*state += 0x9e3779b97f4a7c15ul);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ul;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebul;
    return z ^ (z >> 31);
}

static int fail(const char *what, u64 op, int status)
{
    puts("crash_guest: ");
    puts(what);
    puts(" failed at op ");
    putdec(op);
    puts(" status ");
    putdec(status);
    putc('\n');
    return 1;
}

int guest_main(u64 cpu, u64 ncpus)
{
    (void)ncpus;
    if (cpu)
        for (;;) __asm__ __volatile__("cli; hlt");
    virtio_irq_setup(SLOT_GSI, VECTOR, virtio_isr);
    mmio_write32(SLOT + VIRTIO_DEV_FEAT_SEL, 0);
    u32 offered = mmio_read32(SLOT + VIRTIO_DEV_FEAT);
    u32 wanted = offered & (1u << F_FLUSH | 1u << F_WRITE_ZEROES);
    if (!(wanted & 1u << F_FLUSH)) {
        puts("crash_guest: the device offers no FLUSH\n");
        return 1;
    }
    if (virtio_init(SLOT, 2, wanted, "crash_guest") || virtio_queue(SLOT, 0, &q))
        return 1;
    virtio_driver_ok(SLOT);

    int st = submit(T_IN, 0, data, 512, 1);
    struct config cfg;
    memcpy(&cfg, data, sizeof(cfg));
    if (st || memcmp(cfg.magic, "CKCRASH1", 8) || !cfg.flush_every || !cfg.max_sectors ||
        cfg.max_sectors > MAX_SECTORS || cfg.last_sector < cfg.first_sector + cfg.max_sectors) {
        puts("crash_guest: no valid config in sector 0\n");
        return 1;
    }
    int zeroes = (wanted & 1u << F_WRITE_ZEROES) != 0;
    puts("crash_guest: start write_zeroes=");
    putdec(zeroes);
    putc('\n');

    u64 rng = cfg.seed;
    for (u32 k = 0; k < MAX_SECTORS * 64; k++)
        data[k] = cfg.seed ^ (k % 64);
    for (u64 op = 1; op <= cfg.max_ops; op++) {
        u32 n = 1 + (u32)(splitmix64(&rng) % cfg.max_sectors);
        u64 sector = cfg.first_sector + splitmix64(&rng) % (cfg.last_sector - cfg.first_sector - n + 1);
        if (zeroes && splitmix64(&rng) % 16 == 0) {
            wz = (struct wz_seg){ sector, n, WZ_FLAG_UNMAP };
            if ((st = submit(T_WRITE_ZEROES, 0, &wz, sizeof(wz), 0)))
                return fail("write_zeroes", op, st);
        } else {
            u64 v = splitmix64(&rng);
            for (u32 s = 0; s < n; s++) {  /* the body words were set once: guest code is slow on a software KVM */
                u64 *w = &data[s * 64];
                w[0] = op;
                w[1] = sector + s;
                w[63] = v ^ (sector + s);
            }
            if ((st = submit(T_OUT, sector, data, n * 512, 0)))
                return fail("write", op, st);
        }
        if (op % cfg.flush_every == 0) {
            if ((st = submit(T_FLUSH, 0, 0, 0, 0)))
                return fail("flush", op, st);
            puts("flush ");
            putdec(op);
            putc('\n');
        }
    }
    puts("crash_guest: done\n");
    return 0;
}
