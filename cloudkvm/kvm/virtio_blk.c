/* virtio-blk's data path (virtio 1.2 §5.2.6) for devices/virtio/blk.py: the requests that move sectors between the
 * disk and guest RAM, served from the split virtqueue (§2.7) without Python.
 *
 * `ckvm_blk_serve` takes the queue's available chains in order and serves each one it can: a chain the walk
 * (virtq.c) accepts whole, a 16-byte header alone in its first descriptor, a read (T_IN: the rest device-writable)
 * or a write (T_OUT: device-readable data, then the status byte alone), whole sectors inside the disk, on disk
 * ranges whose place is known (`map`). It returns, without consuming that chain, at the first it does not serve:
 * - CKVM_BLK_SLOW: blk.py serves it (errors, other request types, an unusual layout, a range the map says is not
 *   simple, a failed system call: blk.py then retries the request and answers what it finds);
 * - CKVM_BLK_MISS: the map does not know [miss_offset, +miss_length): blk.py fills it and calls again;
 * - CKVM_BLK_BADQUEUE: the avail ring is not usable (blk.py's own pop says why);
 * or CKVM_BLK_IDLE when nothing more is available. `served` counts the requests completed by the call.
 *
 * The map has one entry per 2^granule_bits bytes of the disk: 0 unknown, else KNOWN with ZERO (reads as zeros;
 * a write is blk.py's), SLOW (only blk.py handles it), a place: the index of the file in `fds` and the byte offset
 * there of the granule's first byte, and WRITABLE when a write may go there in place; or DEFLATE: the granule is one
 * compressed qcow2 cluster (qcow2 spec, "Compressed Clusters Descriptor"), raw deflate (RFC 1951) in file `fds[i]`
 * from byte offset DEFLATE_OFFSET to the end of its sector DEFLATE_SECTORS - 1 sectors further, read and inflated
 * here (zlib) into a small cache of whole clusters keyed by the entry (compressed data is never rewritten in place: a
 * write goes to a new cluster, by blk.py; the cache is keyed by file index, which is never reused). A cluster whose
 * data does not inflate to a whole granule is blk.py's, which then reports the corruption; inflated bytes past the
 * granule are never looked at (as blk.py and QEMU). blk.py forgets entries around every change it makes through the disk (storage decides
 * where data goes).
 *
 * Guest RAM is touched only through the region table: data segments, the header and the status byte were
 * validated by the walk; the rings lie inside one region each (checked here again). */
#include <errno.h>
#include <sys/uio.h>
#include <unistd.h>
#include <zlib.h>

#define CKVM_BLK_T_IN 0
#define CKVM_BLK_T_OUT 1
#define CKVM_BLK_SECTOR 512
#define CKVM_BLK_HEADER 16
#define CKVM_BLK_MAX_FILES 16
#define CKVM_BLK_MAX_IOV 1024

#define CKVM_MAP_KNOWN (1ULL << 63)
#define CKVM_MAP_ZERO (1ULL << 62)
#define CKVM_MAP_SLOW (1ULL << 61)
#define CKVM_MAP_WRITABLE (1ULL << 60)
#define CKVM_MAP_DEFLATE (1ULL << 59)
#define CKVM_MAP_FILE_SHIFT 52
#define CKVM_MAP_OFFSET_MASK ((1ULL << 52) - 1)
#define CKVM_MAP_DEFLATE_SECTORS_SHIFT 42       /* DEFLATE: sectors - 1 in bits 42-51, the offset in bits 0-41 */
#define CKVM_MAP_DEFLATE_SECTORS_MAX 1024
#define CKVM_MAP_DEFLATE_OFFSET_MASK ((1ULL << 42) - 1)
#define CKVM_BLK_SCRATCH (CKVM_MAP_DEFLATE_SECTORS_MAX * CKVM_BLK_SECTOR)  /* the longest compressed cluster */

enum { CKVM_BLK_IDLE = 0, CKVM_BLK_SLOW = 1, CKVM_BLK_MISS = 2, CKVM_BLK_BADQUEUE = 3 };

struct ckvm_blk {
    uint64_t capacity;              /* sectors */
    uint32_t read_only, granule_bits;
    uint64_t *map;                  /* one entry per granule, covering the capacity */
    int32_t fds[CKVM_BLK_MAX_FILES];
    /* inflated clusters: `slots` granules at `cache`, slot i holding the cluster of DEFLATE entry keys[i] (0: none);
     * `scratch` (CKVM_BLK_SCRATCH bytes) takes the compressed data */
    uint8_t *cache, *scratch;
    uint64_t *keys;
    uint32_t slots, next_slot;
    /* out */
    uint32_t served;
    int32_t err;                    /* errno of the system call that failed, for CKVM_BLK_SLOW */
    uint64_t miss_offset, miss_length;
    uint64_t served_total, inflated;    /* requests completed and clusters inflated, all told */
};

enum { CKVM_AT_PLACE = 0, CKVM_AT_ZEROS = 1, CKVM_AT_DEFLATE = 2, CKVM_AT_UNKNOWN = -1, CKVM_AT_SLOW = -2 };

/* Where disk byte `pos` is: CKVM_AT_PLACE (file index, host offset), CKVM_AT_ZEROS, CKVM_AT_DEFLATE (the map entry,
 * in *host), CKVM_AT_UNKNOWN or CKVM_AT_SLOW; `left` gets the bytes to the end of its granule. */
static int ckvm_blk_locate(const struct ckvm_blk *b, uint64_t pos, int write, uint32_t *file, uint64_t *host,
                           uint64_t *left)
{
    uint64_t g = pos >> b->granule_bits, e = b->map[g], within = pos - (g << b->granule_bits);
    *left = (1ULL << b->granule_bits) - within;
    if (!(e & CKVM_MAP_KNOWN))
        return CKVM_AT_UNKNOWN;
    if (e & CKVM_MAP_SLOW || (write && !(e & CKVM_MAP_WRITABLE)))
        return CKVM_AT_SLOW;
    if (e & CKVM_MAP_ZERO)              /* zeros are never written in place, whatever else the entry says */
        return write ? CKVM_AT_SLOW : CKVM_AT_ZEROS;
    if (e & CKVM_MAP_DEFLATE) {         /* never written in place, whatever else the entry says */
        *host = e;
        return write ? CKVM_AT_SLOW : CKVM_AT_DEFLATE;
    }
    *file = (uint32_t)(e >> CKVM_MAP_FILE_SHIFT) & (CKVM_BLK_MAX_FILES - 1);
    *host = (e & CKVM_MAP_OFFSET_MASK) + within;
    return CKVM_AT_PLACE;
}

/* The guest's buffers as a cursor: `take` fills iovecs with the next bytes. */
struct ckvm_cursor {
    const struct ckvm_mem *mem;
    const struct ckvm_seg *segs;    /* the data segments ... */
    uint32_t n, trim;               /* ... their count, and bytes left out at the end of the last (a status byte) */
    uint32_t i, used;               /* the position */
};

static int ckvm_cursor_take(struct ckvm_cursor *c, uint64_t len, struct iovec *iov, int max)
{
    int k = 0;
    while (len) {
        const struct ckvm_seg *s = &c->segs[c->i];
        uint32_t seg_len = s->len - (c->i == c->n - 1 ? c->trim : 0);
        uint64_t n = seg_len - c->used < len ? seg_len - c->used : len;
        if (k == max)
            return -1;
        iov[k].iov_base = ckvm_host(c->mem, s->region, s->gpa + c->used);
        iov[k].iov_len = n;
        k++;
        len -= n;
        c->used += (uint32_t)n;
        if (c->used == seg_len) {
            c->i++;
            c->used = 0;
        }
    }
    return k;
}

/* preadv/pwritev of a whole run, continuing after short transfers; a read past the end of the file gives zeros
 * (a qcow2 cluster allocated at the end is not always written whole). 0, or the errno. */
static int ckvm_blk_io(int fd, struct iovec *iov, int cnt, uint64_t off, int write)
{
    while (cnt > 0) {
        ssize_t r = write ? pwritev(fd, iov, cnt, (off_t)off) : preadv(fd, iov, cnt, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (r == 0) {
            if (write)
                return EIO;
            for (int i = 0; i < cnt; i++)
                memset(iov[i].iov_base, 0, iov[i].iov_len);
            return 0;
        }
        off += (uint64_t)r;
        while (cnt > 0 && (size_t)r >= iov->iov_len) {
            r -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + r;
            iov->iov_len -= (size_t)r;
        }
    }
    return 0;
}

/* The granule of DEFLATE entry `e`, inflated: from the cache, or read and inflated into the next slot. NULL (and
 * b->err set when a system call failed) when the data cannot be read or does not inflate to a whole granule. */
static const uint8_t *ckvm_blk_inflated(struct ckvm_blk *b, uint64_t e)
{
    size_t granule = (size_t)1 << b->granule_bits;
    for (uint32_t i = 0; i < b->slots; i++)
        if (b->keys[i] == e)
            return b->cache + i * granule;
    if (!b->slots || !b->cache || !b->scratch)
        return NULL;
    int fd = b->fds[(e >> CKVM_MAP_FILE_SHIFT) & (CKVM_BLK_MAX_FILES - 1)];
    uint64_t off = e & CKVM_MAP_DEFLATE_OFFSET_MASK;
    uint64_t sectors = ((e & CKVM_MAP_OFFSET_MASK) >> CKVM_MAP_DEFLATE_SECTORS_SHIFT) + 1;
    size_t want = (size_t)(sectors * CKVM_BLK_SECTOR - (off & (CKVM_BLK_SECTOR - 1))), got = 0;
    if (fd < 0) {
        b->err = EBADF;
        return NULL;
    }
    while (got < want) {                /* short at the end of the file: the stream may well be whole */
        ssize_t r = pread(fd, b->scratch + got, want - got, (off_t)(off + got));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            b->err = errno;
            return NULL;
        }
        if (r == 0)
            break;
        got += (size_t)r;
    }
    uint32_t slot = b->next_slot % b->slots;
    uint8_t *out = b->cache + slot * granule;
    b->keys[slot] = 0;
    z_stream z;
    memset(&z, 0, sizeof(z));
    if (inflateInit2(&z, -15) != Z_OK)  /* raw deflate, no zlib header (qcow2 spec; what QEMU writes) */
        return NULL;
    z.next_in = b->scratch;
    z.avail_in = (uInt)got;
    z.next_out = out;
    z.avail_out = (uInt)granule;
    int rc = inflate(&z, Z_FINISH);
    int whole = z.avail_out == 0 && (rc == Z_STREAM_END || rc == Z_OK || rc == Z_BUF_ERROR);
    inflateEnd(&z);
    if (!whole)
        return NULL;
    b->keys[slot] = e;
    b->next_slot = slot + 1;
    b->inflated++;
    return out;
}

/* Copy `len` bytes from `src` into the iovecs. */
static void ckvm_iov_fill(const struct iovec *iov, int cnt, const uint8_t *src)
{
    for (int i = 0; i < cnt; i++) {
        memcpy(iov[i].iov_base, src, iov[i].iov_len);
        src += iov[i].iov_len;
    }
}

/* Serve one validated chain; CKVM_BLK_IDLE when done (status OK written, *used_len set), else SLOW or MISS. */
static int ckvm_blk_request(const struct ckvm_mem *mem, const struct ckvm_walk *w, struct ckvm_blk *b,
                            uint32_t *used_len)
{
    const struct ckvm_seg *segs = w->segs;
    uint32_t n = w->nsegs;
    if (n < 2 || segs[0].write || segs[0].len != CKVM_BLK_HEADER || !segs[n - 1].write)
        return CKVM_BLK_SLOW;
    uint8_t header[CKVM_BLK_HEADER];
    memcpy(header, ckvm_host(mem, segs[0].region, segs[0].gpa), sizeof(header));
    uint32_t type;
    uint64_t sector;
    memcpy(&type, header, 4);
    memcpy(&sector, header + 8, 8);
    int write;
    uint64_t length = 0;
    if (type == CKVM_BLK_T_IN) {
        write = 0;
        for (uint32_t i = 1; i < n; i++) {
            if (!segs[i].write)
                return CKVM_BLK_SLOW;
            length += segs[i].len;
        }
        length--;                       /* the status byte */
    } else if (type == CKVM_BLK_T_OUT) {
        write = 1;
        if (segs[n - 1].len != 1 || b->read_only)
            return CKVM_BLK_SLOW;
        for (uint32_t i = 1; i < n - 1; i++) {
            if (segs[i].write)
                return CKVM_BLK_SLOW;
            length += segs[i].len;
        }
    } else {
        return CKVM_BLK_SLOW;
    }
    if (length % CKVM_BLK_SECTOR || sector > b->capacity || length / CKVM_BLK_SECTOR > b->capacity - sector)
        return CKVM_BLK_SLOW;
    uint64_t off = sector * CKVM_BLK_SECTOR, end = off + length;
    /* every granule known and simple before any byte moves */
    for (uint64_t pos = off; pos < end;) {
        uint32_t file;
        uint64_t host, left;
        int kind = ckvm_blk_locate(b, pos, write, &file, &host, &left);
        if (kind == CKVM_AT_UNKNOWN) {
            b->miss_offset = off;
            b->miss_length = length;
            return CKVM_BLK_MISS;
        }
        if (kind == CKVM_AT_SLOW)
            return CKVM_BLK_SLOW;
        pos += left < end - pos ? left : end - pos;
    }
    /* the data: a read's writable segments but the status byte; a write's readable ones after the header */
    struct ckvm_cursor cur = { mem, segs + 1, write ? n - 2 : n - 1, write ? 0 : 1, 0, 0 };
    struct iovec iov[CKVM_BLK_MAX_IOV];
    for (uint64_t pos = off; pos < end;) {
        uint32_t file, file2;
        uint64_t host, host2, left, left2;
        int kind = ckvm_blk_locate(b, pos, write, &file, &host, &left);
        if (kind < 0)                   /* the map changed since the first pass (it cannot today): Python's */
            return CKVM_BLK_SLOW;
        uint64_t run = left < end - pos ? left : end - pos;
        while (kind != CKVM_AT_DEFLATE && pos + run < end) {   /* join the granules that follow in the same place */
            int kind2 = ckvm_blk_locate(b, pos + run, write, &file2, &host2, &left2);
            if (kind2 != kind || (kind == CKVM_AT_PLACE && (file2 != file || host2 != host + run)))
                break;
            run += left2 < end - pos - run ? left2 : end - pos - run;
        }
        int cnt = ckvm_cursor_take(&cur, run, iov, CKVM_BLK_MAX_IOV);
        if (cnt < 0)
            return CKVM_BLK_SLOW;
        if (kind == CKVM_AT_ZEROS) {
            for (int i = 0; i < cnt; i++)
                memset(iov[i].iov_base, 0, iov[i].iov_len);
        } else if (kind == CKVM_AT_DEFLATE) {
            const uint8_t *cluster = ckvm_blk_inflated(b, host);
            if (!cluster)
                return CKVM_BLK_SLOW;
            ckvm_iov_fill(iov, cnt, cluster + (pos & ((1ULL << b->granule_bits) - 1)));
        } else {
            int fd = b->fds[file];
            int err = fd < 0 ? EBADF : ckvm_blk_io(fd, iov, cnt, host, write);
            if (err) {
                b->err = err;
                return CKVM_BLK_SLOW;
            }
        }
        pos += run;
    }
    const struct ckvm_seg *st = &segs[n - 1];
    *ckvm_host(mem, st->region, st->gpa + st->len - 1) = 0;     /* VIRTIO_BLK_S_OK */
    /* §2.7.8.2: bytes written from the first writable byte on: the data and the status for a read */
    *used_len = write ? 1 : (uint32_t)(length + 1);
    return CKVM_BLK_IDLE;
}

int ckvm_blk_serve(const struct ckvm_mem *mem, struct ckvm_vq *q, struct ckvm_walk *w, struct ckvm_blk *b)
{
    b->served = 0;
    b->err = 0;
    struct ckvm_rings r;
    if (ckvm_vq_rings(mem, q, w, &r) < 0)
        return CKVM_BLK_BADQUEUE;
    for (;;) {
        uint16_t head;
        int next = ckvm_vq_walk_next(mem, q, &r, w, q->last_avail, &head);
        if (next != CKVM_VQ_CHAIN)
            return next == CKVM_VQ_EMPTY ? CKVM_BLK_IDLE : next == CKVM_VQ_BROKEN ? CKVM_BLK_BADQUEUE : CKVM_BLK_SLOW;
        uint32_t used_len = 0;
        int code = ckvm_blk_request(mem, w, b, &used_len);
        if (code != CKVM_BLK_IDLE)
            return code;
        ckvm_vq_used_elem(q, &r, 0, head, used_len);
        ckvm_vq_publish(q, &r, 1);
        b->served++;
        b->served_total++;
    }
}
