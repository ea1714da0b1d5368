/* The Internet checksum's 16-bit ones' complement sum (RFC 1071), for virtio-net's checksum offloads
 * (virtio 1.2 §5.1.6.2 completing a transmitted frame's checksum, §5.1.6.4 validating a received one): the sum of
 * `data` as big-endian 16-bit words (an odd length padded with a zero byte), carries folded back in. It is 0 only
 * for all-zero words, else 1..0xFFFF. The words are added in the host's order, 32 bits at a time, and the folded
 * result byte-swapped on a little-endian host (RFC 1071 §2(B): the sum does not depend on byte order). */
uint32_t ckvm_ones_complement_sum(const uint8_t *data, size_t n)
{
    uint64_t sum = 0;
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        uint32_t w;
        memcpy(&w, data + i, 4);
        sum += w;
    }
    if (i + 2 <= n) {
        uint16_t w;
        memcpy(&w, data + i, 2);
        sum += w;
        i += 2;
    }
    if (i < n) {
        uint16_t w = 0;
        memcpy(&w, data + i, 1);    /* the last byte first in memory: the high byte of its big-endian word */
        sum += w;
    }
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    uint16_t s = (uint16_t)sum;
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    s = (uint16_t)(s << 8 | s >> 8);
#endif
    return s;
}

/* Whether `f` (n bytes) is TCP or UDP over IPv4 or IPv6 (one optional 802.1Q/802.1ad tag, not a fragment) whose
 * transport checksum holds: what VIRTIO_NET_HDR_F_DATA_VALID promises (virtio 1.2 §5.1.6.4.1: the device MUST have
 * validated it). IPv4 UDP without a checksum (0, RFC 768) holds. IPv6: up to four hop-by-hop or destination options
 * headers are skipped; any other extension header (a routing header changes the pseudo-header) leaves it unmarked.
 * The pseudo-header (RFC 793/768 for IPv4, RFC 8200 §8.1 for IPv6) has an even length, so its sum and the segment's
 * add up word for word. */
int ckvm_l4_checksum_valid(const uint8_t *f, size_t n)
{
    size_t l3 = 14;
    if (n < l3)
        return 0;
    unsigned ethertype = (unsigned)f[12] << 8 | f[13];
    if (ethertype == 0x8100 || ethertype == 0x88A8) {
        if (n < l3 + 4)
            return 0;
        ethertype = (unsigned)f[16] << 8 | f[17];
        l3 += 4;
    }
    uint8_t pseudo[40] = {0};
    size_t pseudo_len, l4, end;
    unsigned proto;
    if (ethertype == 0x0800) {
        if (n < l3 + 20 || f[l3] >> 4 != 4)
            return 0;
        size_t ihl = (size_t)(f[l3] & 0xF) * 4, total = (size_t)f[l3 + 2] << 8 | f[l3 + 3];
        if (ihl < 20 || total < ihl || l3 + total > n)
            return 0;
        if (((unsigned)f[l3 + 6] << 8 | f[l3 + 7]) & 0x3FFF)     /* more fragments, or a fragment offset */
            return 0;
        proto = f[l3 + 9];
        l4 = l3 + ihl;
        end = l3 + total;
        memcpy(pseudo, f + l3 + 12, 8);                          /* source, destination */
        pseudo[9] = (uint8_t)proto;
        pseudo[10] = (uint8_t)((end - l4) >> 8);
        pseudo[11] = (uint8_t)(end - l4);
        pseudo_len = 12;
    } else if (ethertype == 0x86DD) {
        if (n < l3 + 40 || f[l3] >> 4 != 6)
            return 0;
        end = l3 + 40 + ((size_t)f[l3 + 4] << 8 | f[l3 + 5]);
        if (end > n)
            return 0;
        proto = f[l3 + 6];
        l4 = l3 + 40;
        for (int i = 0; i < 4 && (proto == 0 || proto == 60); i++) {
            if (l4 + 8 > end)
                return 0;
            size_t header_len = ((size_t)f[l4 + 1] + 1) * 8;
            proto = f[l4];
            l4 += header_len;
        }
        if (l4 > end)
            return 0;
        uint32_t length = (uint32_t)(end - l4);
        memcpy(pseudo, f + l3 + 8, 32);                          /* source, destination */
        pseudo[32] = (uint8_t)(length >> 24);
        pseudo[33] = (uint8_t)(length >> 16);
        pseudo[34] = (uint8_t)(length >> 8);
        pseudo[35] = (uint8_t)length;
        pseudo[39] = (uint8_t)proto;
        pseudo_len = 40;
    } else {
        return 0;
    }
    if (proto == 6) {
        if (end - l4 < 20)
            return 0;
    } else if (proto == 17) {
        if (end - l4 < 8)
            return 0;
        if (ethertype == 0x0800 && f[l4 + 6] == 0 && f[l4 + 7] == 0)
            return 1;                                            /* IPv4 UDP without a checksum */
    } else {
        return 0;
    }
    uint32_t total = ckvm_ones_complement_sum(pseudo, pseudo_len) + ckvm_ones_complement_sum(f + l4, end - l4);
    return total % 0xFFFF == 0;
}

/* Complete a partial checksum in place (virtio 1.2 §5.1.6.2): the 16-bit field at start+offset holds the
 * pseudo-header's sum; the ones' complement of the sum from `start` to the end goes there. 0 becomes 0xFFFF (the
 * same value in ones' complement, and the only correct one for UDP, where 0 means "no checksum", RFC 768). The
 * caller has checked start + offset + 2 <= n. */
void ckvm_complete_checksum(uint8_t *frame, size_t n, size_t start, size_t offset)
{
    uint16_t checksum = (uint16_t)~ckvm_ones_complement_sum(frame + start, n - start);
    if (checksum == 0)
        checksum = 0xFFFF;
    frame[start + offset] = (uint8_t)(checksum >> 8);
    frame[start + offset + 1] = (uint8_t)checksum;
}
