/* virtio-net's receive path (virtio 1.2 §5.1.6.3, §5.1.6.4) for devices/virtio/net.py: one frame, its header
 * first, placed into the receive queue's available chains without Python.
 *
 * `ckvm_net_rx` looks at the chains from the next available one on, each walked (virtq.c) and copied aside, until
 * they hold the header and the frame (one chain when `mergeable` is 0, and it must hold them whole). It places
 * the frame only when every chain it needs is plain: accepted by the walk whole, only device-writable buffers, at
 * least one byte of them, and few enough segments to keep. Then every chain but the last is filled completely
 * (§5.1.6.4.1), num_buffers in the header says how many there are, the used elements are written and used->idx
 * moved once after them. Otherwise it changes nothing and returns CKVM_NET_SLOW: net.py places the frame (or
 * keeps or drops it) by its own rules, which log what was wrong; CKVM_NET_BADQUEUE: the avail ring is not usable
 * (net.py's pop says why). Guest RAM is written only inside the segments the walk validated. */

enum { CKVM_NET_DONE = 0, CKVM_NET_SLOW = 1, CKVM_NET_BADQUEUE = 2 };

#define CKVM_NET_NUM_BUFFERS_AT 10   /* struct virtio_net_hdr: num_buffers, the last of its 12 bytes */

struct ckvm_rx_chain { uint32_t head, first, nsegs, capacity; };

/* Scratch owned by the caller: `max_chains` chains, `max_segs` segments in all. */
struct ckvm_rx {
    struct ckvm_rx_chain *chains;
    struct ckvm_seg *segs;
    uint32_t max_chains, max_segs;
    uint32_t nchains;                   /* out: chains used for the frame */
};

int ckvm_net_rx(const struct ckvm_mem *mem, struct ckvm_vq *q, struct ckvm_walk *w, uint8_t *hdr, uint32_t hdr_len,
                const uint8_t *frame, uint32_t frame_len, uint32_t mergeable, struct ckvm_rx *rx)
{
    rx->nchains = 0;
    uint32_t size = q->size;
    if (size == 0 || size & (size - 1) || hdr_len < CKVM_NET_NUM_BUFFERS_AT + 2)
        return CKVM_NET_BADQUEUE;
    int ar = ckvm_region_of(mem, q->avail_ring, 6 + 2 * (uint64_t)size);
    int ur = ckvm_region_of(mem, q->used_ring, 6 + 8 * (uint64_t)size);
    if (ar < 0 || ur < 0)
        return CKVM_NET_BADQUEUE;
    uint8_t *avail = ckvm_host(mem, (uint8_t)ar, q->avail_ring), *used = ckvm_host(mem, (uint8_t)ur, q->used_ring);
    w->desc_table = q->desc_table;
    w->size = size;
    w->indirect = q->indirect;
    uint64_t total = (uint64_t)hdr_len + frame_len, room = 0;
    uint32_t nsegs = 0, nchains = 0;
    uint16_t next = q->last_avail;
    /* the chains, looked at and kept aside; nothing is consumed yet */
    while (room < total) {
        if (next == q->avail_idx) {
            if (q->event_idx) {     /* §2.7.10: avail_event, written before idx is read again */
                __atomic_store_n((uint16_t *)(used + 4 + 8 * (uint64_t)size), next, __ATOMIC_RELAXED);
                __atomic_thread_fence(__ATOMIC_SEQ_CST);
            }
            uint16_t idx = __atomic_load_n((uint16_t *)(avail + 2), __ATOMIC_ACQUIRE);
            if ((uint16_t)(idx - q->last_avail) > size)
                return CKVM_NET_BADQUEUE;
            q->avail_idx = idx;
            if (idx == next)
                return CKVM_NET_SLOW;   /* not enough buffers: net.py keeps or drops the frame */
        }
        if (nchains == rx->max_chains || (!mergeable && nchains == 1))
            return CKVM_NET_SLOW;
        uint16_t head = __atomic_load_n((uint16_t *)(avail + 4 + 2 * (uint64_t)(next % size)), __ATOMIC_RELAXED);
        if (head >= size)
            return CKVM_NET_SLOW;
        ckvm_walk_chain(mem, w, head);
        if (w->error || w->problem || w->nsegs == 0 || nsegs + w->nsegs > rx->max_segs)
            return CKVM_NET_SLOW;
        uint64_t capacity = 0;
        for (uint32_t i = 0; i < w->nsegs; i++) {
            if (!w->segs[i].write)
                return CKVM_NET_SLOW;
            capacity += w->segs[i].len;
        }
        if (!mergeable && capacity < total)
            return CKVM_NET_SLOW;
        memcpy(rx->segs + nsegs, w->segs, w->nsegs * sizeof(*w->segs));
        rx->chains[nchains] = (struct ckvm_rx_chain){ head, nsegs, w->nsegs, (uint32_t)capacity };
        nsegs += w->nsegs;
        nchains++;
        room += capacity;
        next++;
    }
    /* §5.1.6.4.1: num_buffers, the chains the frame spans (1 without MRG_RXBUF) */
    uint16_t num_buffers = (uint16_t)nchains;
    memcpy(hdr + CKVM_NET_NUM_BUFFERS_AT, &num_buffers, 2);
    uint64_t pos = 0;
    for (uint32_t c = 0; c < nchains; c++) {
        const struct ckvm_rx_chain *ch = &rx->chains[c];
        uint32_t written = 0;
        for (uint32_t i = 0; i < ch->nsegs && pos < total; i++) {
            const struct ckvm_seg *s = &rx->segs[ch->first + i];
            uint8_t *dst = ckvm_host(mem, s->region, s->gpa);
            uint64_t take = s->len < total - pos ? s->len : total - pos, done = 0;
            if (pos < hdr_len) {
                uint64_t h = hdr_len - pos < take ? hdr_len - pos : take;
                memcpy(dst, hdr + pos, h);
                done = h;
            }
            if (done < take)
                memcpy(dst + done, frame + (pos + done - hdr_len), take - done);
            pos += take;
            written += (uint32_t)take;
        }
        uint8_t *elem = used + 4 + 8 * (uint64_t)((uint16_t)(q->used_idx + c) % size);
        memcpy(elem, &ch->head, 4);
        memcpy(elem + 4, &written, 4);
    }
    q->last_avail = (uint16_t)(q->last_avail + nchains);
    q->used_idx = (uint16_t)(q->used_idx + nchains);
    __atomic_store_n((uint16_t *)(used + 2), q->used_idx, __ATOMIC_RELEASE);   /* §2.7.8.2: after the elements */
    rx->nchains = nchains;
    return CKVM_NET_DONE;
}
