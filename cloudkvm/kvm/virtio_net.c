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
    struct ckvm_rings r;
    if (hdr_len < CKVM_NET_NUM_BUFFERS_AT + 2 || ckvm_vq_rings(mem, q, w, &r) < 0)
        return CKVM_NET_BADQUEUE;
    uint64_t total = (uint64_t)hdr_len + frame_len, room = 0;
    uint32_t nsegs = 0, nchains = 0;
    uint16_t next = q->last_avail;
    /* the chains, looked at and kept aside; nothing is consumed yet */
    while (room < total) {
        int available = ckvm_vq_available(q, &r, next);
        if (available <= 0)     /* not enough buffers: net.py keeps or drops the frame */
            return available < 0 ? CKVM_NET_BADQUEUE : CKVM_NET_SLOW;
        if (nchains == rx->max_chains || (!mergeable && nchains == 1))
            return CKVM_NET_SLOW;
        uint16_t head = ckvm_vq_head(&r, next);
        if (head >= r.size)
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
        ckvm_vq_used_elem(q, &r, c, ch->head, written);
    }
    ckvm_vq_publish(q, &r, (uint16_t)nchains);
    rx->nchains = nchains;
    return CKVM_NET_DONE;
}
