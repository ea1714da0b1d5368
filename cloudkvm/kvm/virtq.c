/* The split virtqueue's descriptor chain walk (virtio 1.2 §2.7.5, §2.7.5.3), for devices/virtio/queue.py.
 *
 * A driver's descriptors are read from guest RAM only through `ckvm_mem`, the region table of kvm/memory.py: every
 * read is of a whole descriptor inside one region, copied once before it is looked at (the driver may change it
 * meanwhile), so nothing a driver writes can make this read outside guest RAM. The walk only reads.
 *
 * Outcome, in `struct ckvm_walk`:
 * - `error` != 0: the chain's structure is broken (CKVM_WALK_* below; `idx`, `entries`, `addr`, `len`,
 *   `in_indirect` say where), nothing else is known;
 * - else `problem` != 0: the structure is whole and `segs` holds the whole chain, but a buffer is wrong
 *   (outside RAM, readable after writable, over 2^32 bytes in all: the first problem met);
 * - else `segs` is the validated chain. Segments are (gpa, len, write, region): zero-length descriptors dropped.
 * The checks, their order and their kinds are those queue.py documents and its tests (tests/virtio) pin.
 *
 * Below the walk: the rings (avail idx and entries, used elements and idx) for the device paths in C that pop and
 * push themselves (virtio_blk.c, virtio_net.c), on the indices queue.py hands them in a struct ckvm_vq. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CKVM_VIRTQ_DESC_F_NEXT 1
#define CKVM_VIRTQ_DESC_F_WRITE 2
#define CKVM_VIRTQ_DESC_F_INDIRECT 4
#define CKVM_MAX_CHAIN_BYTES (1ULL << 32)
#define CKVM_MAX_REGIONS 8

enum {
    CKVM_WALK_OK = 0,
    /* structural errors */
    CKVM_WALK_NEXT_OUT_OF_RANGE = 1, CKVM_WALK_LOOP = 2, CKVM_WALK_INDIRECT_NOT_NEGOTIATED = 3,
    CKVM_WALK_NESTED_INDIRECT = 4, CKVM_WALK_INDIRECT_NEXT = 5, CKVM_WALK_INDIRECT_LEN = 6,
    CKVM_WALK_INDIRECT_OUTSIDE_RAM = 7, CKVM_WALK_TOO_LONG = 8, CKVM_WALK_TABLE_OUTSIDE_RAM = 9,
    /* buffer problems */
    CKVM_WALK_ORDER = 20, CKVM_WALK_TOO_LARGE = 21, CKVM_WALK_BUFFER_OUTSIDE_RAM = 22,
};

struct ckvm_region { uint64_t gpa; uint64_t size; uint8_t *host; };
struct ckvm_mem { uint32_t count; struct ckvm_region regions[CKVM_MAX_REGIONS]; };
struct ckvm_seg { uint64_t gpa; uint32_t len; uint8_t write; uint8_t region; uint16_t pad; };
struct ckvm_walk {
    /* in: the queue */
    uint64_t desc_table; uint32_t size; uint32_t indirect;
    /* out */
    int32_t error; int32_t problem; uint32_t nsegs; uint32_t in_indirect;
    uint32_t idx; uint32_t entries; uint64_t addr; uint64_t len;      /* where the error or problem is */
    /* scratch owned by the caller: `size` segments, `size` + 1 visited indices */
    struct ckvm_seg *segs; uint32_t *visited;
};

/* The region holding [gpa, gpa+len) whole, or -1. */
static int ckvm_region_of(const struct ckvm_mem *mem, uint64_t gpa, uint64_t len)
{
    for (uint32_t i = 0; i < mem->count && i < CKVM_MAX_REGIONS; i++) {
        const struct ckvm_region *r = &mem->regions[i];
        if (gpa >= r->gpa && gpa - r->gpa < r->size)
            return len <= r->size - (gpa - r->gpa) ? (int)i : -1;
    }
    return -1;
}

static int ckvm_cmp_pos(const void *a, const void *b)
{
    const uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* The first index visited twice among `visited[0..n)`, or -1: (index << 32 | position) pairs sorted. */
static int64_t ckvm_first_revisit(const uint32_t *visited, uint32_t n)
{
    uint64_t *pairs = malloc((size_t)n * sizeof(*pairs));
    if (pairs == NULL)
        return -2;
    for (uint32_t i = 0; i < n; i++)
        pairs[i] = (uint64_t)visited[i] << 32 | i;
    qsort(pairs, n, sizeof(*pairs), ckvm_cmp_pos);
    int64_t best = -1;
    uint32_t best_pos = UINT32_MAX;
    for (uint32_t i = 1; i < n; i++)
        if (pairs[i] >> 32 == pairs[i - 1] >> 32 && (uint32_t)pairs[i] < best_pos) {
            best_pos = (uint32_t)pairs[i];
            best = (int64_t)(pairs[i] >> 32);
        }
    free(pairs);
    return best;
}

/* Walk the chain starting at descriptor `head` (< w->size). A loop is found without a visited set: every walk
 * ends by the queue-size bound on descriptors, and then the indices visited in the current table say whether one
 * came twice (reported as the loop queue.py's visited set would have found first) or the chain is just long. */
void ckvm_walk_chain(const struct ckvm_mem *mem, struct ckvm_walk *w, uint32_t head)
{
    uint64_t table = w->desc_table, entries = w->size, total = 0;
    uint32_t idx = head, count = 0, nvisited = 0;
    int writing = 0;
    w->error = w->problem = 0;
    w->nsegs = w->in_indirect = 0;
    int tr = ckvm_region_of(mem, table, 16 * entries);
    if (tr < 0) {
        w->error = CKVM_WALK_TABLE_OUTSIDE_RAM;
        w->addr = table;
        w->len = 16 * entries;
        return;
    }
    const uint8_t *thost = mem->regions[tr].host + (table - mem->regions[tr].gpa);
    for (;;) {
        if (idx >= entries) {
            w->error = CKVM_WALK_NEXT_OUT_OF_RANGE;
            w->idx = idx;
            w->entries = (uint32_t)entries;
            return;
        }
        w->visited[nvisited++] = idx;
        uint64_t addr;
        uint32_t len;
        uint16_t flags, next;
        uint8_t raw[16];
        memcpy(raw, thost + 16 * (uint64_t)idx, 16);  /* once: the driver may rewrite it meanwhile */
        memcpy(&addr, raw, 8);
        memcpy(&len, raw + 8, 4);
        memcpy(&flags, raw + 12, 2);
        memcpy(&next, raw + 14, 2);
        if (flags & CKVM_VIRTQ_DESC_F_INDIRECT) {
            int err = !w->indirect ? CKVM_WALK_INDIRECT_NOT_NEGOTIATED
                      : w->in_indirect ? CKVM_WALK_NESTED_INDIRECT
                      : flags & CKVM_VIRTQ_DESC_F_NEXT ? CKVM_WALK_INDIRECT_NEXT
                      : len == 0 || len % 16 ? CKVM_WALK_INDIRECT_LEN : 0;
            int ir = err ? -1 : ckvm_region_of(mem, addr, len);
            if (!err && ir < 0)
                err = CKVM_WALK_INDIRECT_OUTSIDE_RAM;
            if (err) {
                w->error = err;
                w->addr = addr;
                w->len = len;
                return;
            }
            table = addr;
            entries = len / 16;
            thost = mem->regions[ir].host + (addr - mem->regions[ir].gpa);
            w->in_indirect = 1;
            idx = 0;
            nvisited = 0;
            continue;
        }
        if (++count > w->size) {
            int64_t again = ckvm_first_revisit(w->visited, nvisited);
            w->error = again >= 0 ? CKVM_WALK_LOOP : CKVM_WALK_TOO_LONG;
            w->idx = again >= 0 ? (uint32_t)again : 0;
            return;
        }
        int is_write = (flags & CKVM_VIRTQ_DESC_F_WRITE) != 0;
        if (is_write)
            writing = 1;
        else if (writing && !w->problem)
            w->problem = CKVM_WALK_ORDER;
        total += len;
        if (total > CKVM_MAX_CHAIN_BYTES && !w->problem)
            w->problem = CKVM_WALK_TOO_LARGE;
        if (len) {
            int r = ckvm_region_of(mem, addr, len);
            if (r < 0 && !w->problem) {
                w->problem = CKVM_WALK_BUFFER_OUTSIDE_RAM;
                w->addr = addr;
                w->len = len;
            }
            struct ckvm_seg *s = &w->segs[w->nsegs++];
            s->gpa = addr;
            s->len = len;
            s->write = (uint8_t)is_write;
            s->region = r < 0 ? 0xff : (uint8_t)r;
            s->pad = 0;
        }
        if (!(flags & CKVM_VIRTQ_DESC_F_NEXT))
            return;
        idx = next;
    }
}

/* ---- the rings, for the device paths in C (virtio_blk.c, virtio_net.c, notify.c) ---------------------------------
 * A split virtqueue's addresses, indices and state: the one copy, which queue.py reads and writes as properties. */
struct ckvm_vq {
    uint64_t desc_table, avail_ring, used_ring;
    uint32_t size, event_idx, indirect, ready;
    uint16_t last_avail, avail_idx, used_idx, signalled_used;
};

/* The avail and used rings in host memory. */
struct ckvm_rings { uint8_t *avail, *used; uint32_t size; };

static uint8_t *ckvm_host(const struct ckvm_mem *mem, uint8_t region, uint64_t gpa)
{
    return mem->regions[region].host + (gpa - mem->regions[region].gpa);
}

/* Find `q`'s rings (each whole inside one region) and set the walk (if any) up for its table; 0, or -1 when the
 * queue is not usable (queue.py's own checks then say why). */
static int ckvm_vq_rings(const struct ckvm_mem *mem, const struct ckvm_vq *q, struct ckvm_walk *w,
                         struct ckvm_rings *r)
{
    uint32_t size = q->size;
    if (size == 0 || size & (size - 1))
        return -1;
    int ar = ckvm_region_of(mem, q->avail_ring, 6 + 2 * (uint64_t)size);
    int ur = ckvm_region_of(mem, q->used_ring, 6 + 8 * (uint64_t)size);
    if (ar < 0 || ur < 0)
        return -1;
    r->avail = ckvm_host(mem, (uint8_t)ar, q->avail_ring);
    r->used = ckvm_host(mem, (uint8_t)ur, q->used_ring);
    r->size = size;
    if (w != NULL) {
        w->desc_table = q->desc_table;
        w->size = size;
        w->indirect = q->indirect;
    }
    return 0;
}

/* Whether avail ring entry `next` has been made available: 1 yes, 0 not yet, -1 avail idx moved further than the
 * queue size from last_avail (§2.7.6). avail idx is read again only once `next` reaches the copy in q; with
 * EVENT_IDX avail_event asks first to be notified of `next` (§2.7.10), so a buffer added meanwhile is either seen
 * now or notified. */
static int ckvm_vq_available(struct ckvm_vq *q, const struct ckvm_rings *r, uint16_t next)
{
    if (next != q->avail_idx)
        return 1;
    if (q->event_idx) {
        __atomic_store_n((uint16_t *)(r->used + 4 + 8 * (uint64_t)r->size), next, __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
    }
    uint16_t idx = __atomic_load_n((uint16_t *)(r->avail + 2), __ATOMIC_ACQUIRE);
    if ((uint16_t)(idx - q->last_avail) > r->size)
        return -1;
    q->avail_idx = idx;
    return idx != next;
}

/* The head index in avail ring entry `next`. */
static uint16_t ckvm_vq_head(const struct ckvm_rings *r, uint16_t next)
{
    return __atomic_load_n((uint16_t *)(r->avail + 4 + 2 * (uint64_t)(next % r->size)), __ATOMIC_RELAXED);
}

enum { CKVM_VQ_BROKEN = -1, CKVM_VQ_EMPTY = 0, CKVM_VQ_CHAIN = 1, CKVM_VQ_PYTHON = 2 };

/* Avail ring entry `next`, its chain walked into `w`: CKVM_VQ_CHAIN when the entry is available and its chain whole
 * and valid (`*head` set), CKVM_VQ_EMPTY when the driver has not made it available yet, CKVM_VQ_PYTHON when its head
 * or its chain is wrong (queue.py's pop says why), CKVM_VQ_BROKEN when avail idx moved too far (§2.7.6). */
static int ckvm_vq_walk_next(const struct ckvm_mem *mem, struct ckvm_vq *q, const struct ckvm_rings *r,
                             struct ckvm_walk *w, uint16_t next, uint16_t *head)
{
    int available = ckvm_vq_available(q, r, next);
    if (available <= 0)
        return available < 0 ? CKVM_VQ_BROKEN : CKVM_VQ_EMPTY;
    *head = ckvm_vq_head(r, next);
    if (*head >= r->size)
        return CKVM_VQ_PYTHON;
    ckvm_walk_chain(mem, w, *head);
    return w->error || w->problem ? CKVM_VQ_PYTHON : CKVM_VQ_CHAIN;
}

/* Used ring element `k` after used_idx: (head, len); used->idx is published separately (ckvm_vq_publish). */
static void ckvm_vq_used_elem(const struct ckvm_vq *q, const struct ckvm_rings *r, uint32_t k, uint32_t head,
                              uint32_t len)
{
    uint8_t *elem = r->used + 4 + 8 * (uint64_t)((uint16_t)(q->used_idx + k) % r->size);
    memcpy(elem, &head, 4);
    memcpy(elem + 4, &len, 4);
}

/* Consume `n` avail entries and publish `n` used elements: used->idx after them (§2.7.8.2). */
static void ckvm_vq_publish(struct ckvm_vq *q, const struct ckvm_rings *r, uint16_t n)
{
    q->last_avail = (uint16_t)(q->last_avail + n);
    q->used_idx = (uint16_t)(q->used_idx + n);
    __atomic_store_n((uint16_t *)(r->used + 2), q->used_idx, __ATOMIC_RELEASE);
}

/* Whether the driver wants a used buffer notification for the used elements published since the last decision
 * (which this moves on): 1 yes, 0 no, -1 the rings are not usable. With VIRTIO_F_EVENT_IDX, when used idx passed
 * used_event (§2.7.7.2: the wrap-safe test of used_event in [old, new), as the spec's vring_need_event); else
 * unless the driver set VIRTQ_AVAIL_F_NO_INTERRUPT (§2.7.7.1). Read after used idx was published (a full fence), so
 * a driver that re-enables interrupts meanwhile is either seen now or sees the new used idx itself. */
int ckvm_vq_needs_interrupt(const struct ckvm_mem *mem, struct ckvm_vq *q)
{
    uint16_t now = q->used_idx, old = q->signalled_used;
    if (now == old)
        return 0;
    struct ckvm_rings r;
    if (ckvm_vq_rings(mem, q, NULL, &r) < 0)
        return -1;              /* decided nothing: Python's call meets the same and says why */
    q->signalled_used = now;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (q->event_idx) {
        uint16_t used_event = __atomic_load_n((uint16_t *)(r.avail + 4 + 2 * (uint64_t)r.size), __ATOMIC_RELAXED);
        return (uint16_t)(now - used_event - 1) < (uint16_t)(now - old);
    }
    return !(__atomic_load_n((uint16_t *)r.avail, __ATOMIC_RELAXED) & 1);
}
