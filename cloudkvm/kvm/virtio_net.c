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
        if (nchains == rx->max_chains || (!mergeable && nchains == 1))
            return CKVM_NET_SLOW;
        uint16_t head;
        int walked = ckvm_vq_walk_next(mem, q, &r, w, next, &head);
        if (walked != CKVM_VQ_CHAIN)    /* not enough buffers, or a chain net.py judges: it keeps or drops the frame */
            return walked == CKVM_VQ_BROKEN ? CKVM_NET_BADQUEUE : CKVM_NET_SLOW;
        if (w->nsegs == 0 || nsegs + w->nsegs > rx->max_segs)
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

/* ---- the frame path between libslirp and the queues, without Python -------------------------------------------
 * `struct ckvm_netlink` is what net/slirp.py hands libslirp as the opaque of its callbacks, with
 * `ckvm_net_link_send` as its send_packet: a frame for the guest goes straight into the receive queue while
 * devices/virtio/net.py has the link `armed` (it holds the transport's lock around every call into libslirp and the
 * receive queue is live) and the backend keeps no earlier frame (`held`); any other frame, and any frame
 * ckvm_net_rx leaves (not plain, not enough buffers), goes to `fallback`, slirp.py's send_packet in Python, which
 * hands it to net.py's rules. net.py decides the used-buffer interrupt after the call into libslirp returns.
 * `ckvm_net_tx` is the transmit queue's plain case: each frame straight into libslirp's slirp_input. */
#define CKVM_NET_HDR_LEN 12
#define CKVM_NET_HDR_F_NEEDS_CSUM 1
#define CKVM_NET_HDR_F_DATA_VALID 2
#define CKVM_NET_HDR_GSO_NONE 0
#define CKVM_ETH_HLEN 14
#define CKVM_VLAN_HLEN 4

typedef ssize_t (*ckvm_send_fn)(const void *buf, size_t len, void *opaque);
typedef void (*ckvm_input_fn)(void *slirp, const uint8_t *pkt, int len);

struct ckvm_transport;

struct ckvm_netlink {
    /* the transport's `live` (DRIVER_OK, no DEVICE_NEEDS_RESET), looked at for every frame and chain: a frame left
     * to Python may put the device into DEVICE_NEEDS_RESET in the middle of a call into libslirp */
    const uint32_t *live;
    /* for calls into libslirp C makes itself (notify.c ckvm_link_enter, ioloop.c): the transport whose lock they
     * take, whether net.py lets C place frames at all (`arm_ok`), whether the backend's owner is in C now so C may
     * call libslirp (`tx_open`), and `back_to_python`, which Python sets when it must run before C goes on */
    struct ckvm_transport *t;
    uint32_t arm_ok, tx_open, back_to_python;
    /* receive: set by net.py while armed */
    const struct ckvm_mem *mem;
    struct ckvm_vq *rxq;
    struct ckvm_walk *rxwalk;
    struct ckvm_rx *rx;
    uint32_t armed, held, mergeable, guest_csum, max_frame;
    uint64_t rx_frames;                 /* frames placed here */
    ckvm_send_fn fallback;              /* slirp.py's send_packet */
    /* transmit */
    ckvm_input_fn input;                /* libslirp's slirp_input and its instance */
    void *slirp;
    uint32_t csum;                      /* VIRTIO_NET_F_CSUM negotiated */
    uint32_t tx_cap;                    /* bytes in tx_buf: at least the header and max_frame */
    uint8_t *tx_buf;
    uint64_t tx_frames;                 /* frames sent here */
};

/* §5.1.4.1: the largest frame the guest takes, the Ethernet header and (when tagged) the VLAN tag included. */
static size_t ckvm_net_rx_limit(const uint8_t *frame, size_t len, uint32_t max_frame)
{
    unsigned ethertype = len >= CKVM_ETH_HLEN ? (unsigned)frame[12] << 8 | frame[13] : 0;
    return ethertype == 0x8100 || ethertype == 0x88A8 ? max_frame : max_frame - CKVM_VLAN_HLEN;
}

ssize_t ckvm_net_link_send(const void *buf, size_t len, void *opaque)
{
    struct ckvm_netlink *l = opaque;
    const uint8_t *frame = buf;
    if (l->armed && !l->held && l->live != NULL && *l->live && l->rxq->ready && len >= CKVM_ETH_HLEN
        && len <= ckvm_net_rx_limit(frame, len, l->max_frame)) {
        uint8_t hdr[CKVM_NET_HDR_LEN] = {0};
        if (l->guest_csum && ckvm_l4_checksum_valid(frame, len))
            hdr[0] = CKVM_NET_HDR_F_DATA_VALID;
        if (ckvm_net_rx(l->mem, l->rxq, l->rxwalk, hdr, sizeof(hdr), frame, (uint32_t)len, l->mergeable, l->rx)
            == CKVM_NET_DONE) {
            l->rx_frames++;
            return (ssize_t)len;
        }
    }
    return l->fallback(buf, len, opaque);
}

/* Send the transmit queue's available frames to libslirp while each chain is plain: walked whole, only
 * device-readable buffers, a header and an Ethernet header at least, at most the header and max_frame, no
 * segmentation asked (§5.1.6.2), a checksum to complete only with VIRTIO_NET_F_CSUM and inside the frame. A chain
 * is returned (used length 0) before its frame goes to libslirp, as net.py does. Returns CKVM_NET_DONE when the
 * queue is empty, CKVM_NET_SLOW when the next chain is for net.py (not consumed: its rules drop and log it),
 * CKVM_NET_BADQUEUE when the rings are not usable (net.py's pop says why). Guest RAM is only read. */
int ckvm_net_tx(const struct ckvm_mem *mem, struct ckvm_vq *q, struct ckvm_walk *w, struct ckvm_netlink *l)
{
    struct ckvm_rings r;
    if (ckvm_vq_rings(mem, q, w, &r) < 0 || l->tx_cap < CKVM_NET_HDR_LEN + CKVM_ETH_HLEN)
        return CKVM_NET_BADQUEUE;
    for (;;) {
        if (l->input == NULL || l->live == NULL || !*l->live || !q->ready)
            return CKVM_NET_SLOW;   /* libslirp gone, or the device no longer live: net.py's rules */
        uint16_t head;
        int next = ckvm_vq_walk_next(mem, q, &r, w, q->last_avail, &head);
        if (next != CKVM_VQ_CHAIN)
            return next == CKVM_VQ_EMPTY ? CKVM_NET_DONE : next == CKVM_VQ_BROKEN ? CKVM_NET_BADQUEUE : CKVM_NET_SLOW;
        uint64_t total = 0;
        for (uint32_t i = 0; i < w->nsegs; i++) {
            if (w->segs[i].write)
                return CKVM_NET_SLOW;
            total += w->segs[i].len;
        }
        if (total < CKVM_NET_HDR_LEN + CKVM_ETH_HLEN || total > CKVM_NET_HDR_LEN + (uint64_t)l->max_frame
            || total > l->tx_cap)
            return CKVM_NET_SLOW;
        uint64_t pos = 0;           /* one private copy: the guest cannot change the frame under libslirp */
        for (uint32_t i = 0; i < w->nsegs; i++) {
            memcpy(l->tx_buf + pos, ckvm_host(mem, w->segs[i].region, w->segs[i].gpa), w->segs[i].len);
            pos += w->segs[i].len;
        }
        uint8_t flags = l->tx_buf[0], gso_type = l->tx_buf[1];
        uint16_t csum_start, csum_offset;
        memcpy(&csum_start, l->tx_buf + 6, 2);
        memcpy(&csum_offset, l->tx_buf + 8, 2);
        uint8_t *frame = l->tx_buf + CKVM_NET_HDR_LEN;
        size_t frame_len = (size_t)(total - CKVM_NET_HDR_LEN);
        if (gso_type != CKVM_NET_HDR_GSO_NONE)
            return CKVM_NET_SLOW;
        if (flags & CKVM_NET_HDR_F_NEEDS_CSUM) {
            if (!l->csum || (size_t)csum_start + csum_offset + 2 > frame_len)
                return CKVM_NET_SLOW;
            ckvm_complete_checksum(frame, frame_len, csum_start, csum_offset);
        }
        ckvm_vq_used_elem(q, &r, 0, head, 0);       /* the device writes nothing into transmit buffers */
        ckvm_vq_publish(q, &r, 1);
        l->tx_frames++;
        l->input(l->slirp, frame, (int)frame_len);
    }
}
