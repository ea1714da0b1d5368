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
