/* The I/O thread's wait in C (kvm/iowait.py, iothread.py): poll(2) on Python's fds, on the ioeventfds of the
 * queues the I/O thread serves in C, and on libslirp's sockets, for as long as only C has work.
 *
 * A turn: libslirp says which of its sockets to watch and how long it may wait (slirp_pollfds_fill), poll() waits
 * on everything, a notified queue is served (notify.c ckvm_notify_serve: a transmit chain goes into libslirp, its
 * answer straight into the receive queue, the interrupts decided), libslirp reads and writes its sockets and runs
 * its TCP timers (slirp_pollfds_poll). Every call into libslirp is a link call (notify.c): the transport's lock
 * held, the frame path armed. The wait returns to Python when one of Python's fds is ready, its time-out passed, a
 * libslirp callback left Python something to do (`back_to_python`), or poll() failed. The wait runs with the GIL
 * released; libslirp's callbacks in Python (frames C did not place, timers, guest errors) take it back. */

#include <time.h>

#define CKVM_IOWAIT_MAX_QUEUES 8
#define CKVM_SLIRP_POLL_IN 1       /* libslirp.h SLIRP_POLL_* */
#define CKVM_SLIRP_POLL_OUT 2
#define CKVM_SLIRP_POLL_PRI 4
#define CKVM_SLIRP_POLL_ERR 8
#define CKVM_SLIRP_POLL_HUP 16

typedef void (*ckvm_slirp_fill_fn)(void *slirp, uint32_t *timeout, int (*add_poll)(int fd, int events, void *),
                                   void *opaque);
typedef void (*ckvm_slirp_poll_fn)(void *slirp, int select_error, int (*get_revents)(int idx, void *), void *opaque);

/* One libslirp instance whose sockets the wait serves, and the device link its calls go through. */
struct ckvm_slirp_hook {
    void *slirp;
    ckvm_slirp_fill_fn fill;
    ckvm_slirp_poll_fn poll;
    struct ckvm_netlink *link;
};

struct ckvm_iowait {
    struct pollfd *fds;                /* Python's fds [0, n_py), the queues' [n_py, +nqueues), libslirp's after;
                                        * C's memory (ckvm_iowait_reserve, grown for libslirp as it asks) */
    uint32_t cap;
    uint32_t n_py, nqueues;
    struct ckvm_notify_queue *queues[CKVM_IOWAIT_MAX_QUEUES];
    struct ckvm_slirp_hook *slirp;     /* NULL: none */
    uint32_t n_slirp;                  /* libslirp's fds this turn */
    uint64_t waits, turns, slirp_calls;
    int32_t failed_queue;              /* a queue's ioeventfd was found closed: its index, else -1 */
};

/* Room for `n` pollfds (what is there is kept): 0, or -ENOMEM (the array is as it was). */
int ckvm_iowait_reserve(struct ckvm_iowait *w, uint32_t n)
{
    if (n <= w->cap)
        return 0;
    uint32_t cap = w->cap ? w->cap : 64;
    while (cap < n)
        cap *= 2;
    struct pollfd *fds = realloc(w->fds, cap * sizeof(*fds));
    if (fds == NULL)
        return -ENOMEM;
    w->fds = fds;
    w->cap = cap;
    return 0;
}

void ckvm_iowait_free(struct ckvm_iowait *w)
{
    free(w->fds);
    w->fds = NULL;
    w->cap = 0;
}

/* libslirp's SLIRP_POLL_* events as poll(2) events, and poll(2)'s revents back (the one conversion: net/slirp.py's
 * Python poll source builds its tables from these two). */
int ckvm_slirp_to_poll(int events)
{
    int ev = 0;
    if (events & CKVM_SLIRP_POLL_IN) ev |= POLLIN;
    if (events & CKVM_SLIRP_POLL_OUT) ev |= POLLOUT;
    if (events & CKVM_SLIRP_POLL_PRI) ev |= POLLPRI;
    if (events & CKVM_SLIRP_POLL_ERR) ev |= POLLERR;
    if (events & CKVM_SLIRP_POLL_HUP) ev |= POLLHUP;
    return ev;
}

int ckvm_poll_to_slirp(int revents)
{
    int out = 0;
    if (revents & POLLIN) out |= CKVM_SLIRP_POLL_IN;
    if (revents & POLLOUT) out |= CKVM_SLIRP_POLL_OUT;
    if (revents & POLLPRI) out |= CKVM_SLIRP_POLL_PRI;
    if (revents & (POLLERR | POLLNVAL)) out |= CKVM_SLIRP_POLL_ERR;   /* a closed fd is an error for libslirp */
    if (revents & POLLHUP) out |= CKVM_SLIRP_POLL_HUP;
    return out;
}

static int ckvm_slirp_add_poll(int fd, int events, void *opaque)
{
    struct ckvm_iowait *w = opaque;
    uint32_t at = w->n_py + w->nqueues + w->n_slirp;
    if (ckvm_iowait_reserve(w, at + 1) < 0)
        return -1;                     /* no memory: libslirp asks get_revents(-1), which says nothing happened */
    w->fds[at] = (struct pollfd){ .fd = fd, .events = (short)ckvm_slirp_to_poll(events) };
    return (int)w->n_slirp++;
}

static int ckvm_slirp_get_revents(int idx, void *opaque)
{
    struct ckvm_iowait *w = opaque;
    if (idx < 0 || (uint32_t)idx >= w->n_slirp)
        return 0;
    return ckvm_poll_to_slirp(w->fds[w->n_py + w->nqueues + (uint32_t)idx].revents);
}

static uint32_t ckvm_slirp_fill(struct ckvm_iowait *w, struct ckvm_slirp_hook *h)
{
    uint32_t timeout = UINT32_MAX;
    struct ckvm_link_call call = ckvm_link_enter(h->link);
    h->fill(h->slirp, &timeout, ckvm_slirp_add_poll, w);
    ckvm_link_leave(h->link, call);
    w->slirp_calls++;
    return timeout;
}

static void ckvm_slirp_poll(struct ckvm_iowait *w, struct ckvm_slirp_hook *h, int select_error)
{
    struct ckvm_link_call call = ckvm_link_enter(h->link);
    h->poll(h->slirp, select_error, ckvm_slirp_get_revents, w);
    ckvm_link_leave(h->link, call);
    w->slirp_calls++;
}

static int64_t ckvm_monotonic_ms(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)now.tv_sec * 1000 + now.tv_nsec / 1000000;
}

/* Wait until Python has something to do, at most `timeout_ms` (-1: no limit). Returns how many of Python's fds
 * are ready (their revents in fds[0, n_py)), or -errno when poll() failed (EINTR included). */
int ckvm_io_wait(struct ckvm_iowait *w, int timeout_ms)
{
    int64_t deadline = timeout_ms >= 0 ? ckvm_monotonic_ms() + timeout_ms : -1;
    w->waits++;
    for (;;) {
        /* looked at every turn: a callback may have closed the backend (slirp.py _destroy empties the hook) */
        struct ckvm_slirp_hook *h = w->slirp != NULL && w->slirp->slirp != NULL ? w->slirp : NULL;
        int wait_ms = -1;
        if (deadline >= 0) {
            int64_t left = deadline - ckvm_monotonic_ms();
            wait_ms = left > 0 ? (int)left : 0;
        }
        w->n_slirp = 0;
        if (h != NULL) {
            uint32_t slirp_ms = ckvm_slirp_fill(w, h);
            if (slirp_ms != UINT32_MAX && (wait_ms < 0 || slirp_ms < (uint32_t)wait_ms))
                wait_ms = slirp_ms > INT32_MAX ? INT32_MAX : (int)slirp_ms;
        }
        uint32_t base = w->n_py + w->nqueues;
        for (uint32_t i = 0; i < base + w->n_slirp; i++)
            w->fds[i].revents = 0;
        int n = poll(w->fds, base + w->n_slirp, wait_ms);
        int err = n < 0 ? errno : 0;
        int ready = 0;
        if (n > 0) {
            for (uint32_t i = 0; i < w->n_py; i++)
                ready += w->fds[i].revents != 0;
            for (uint32_t i = 0; i < w->nqueues; i++) {
                short rev = w->fds[w->n_py + i].revents;
                uint64_t value;
                if (rev & POLLNVAL) {
                    w->failed_queue = (int32_t)i;   /* Python takes it over (iowait.py) */
                    err = EBADF;
                } else if (rev & POLLIN && read(w->fds[w->n_py + i].fd, &value, sizeof(value)) == sizeof(value)) {
                    ckvm_notify_serve(w->queues[i]);
                }
            }
        }
        if (h != NULL && h->slirp != NULL)
            ckvm_slirp_poll(w, h, err != 0);
        w->turns++;
        if (ready || err || (h != NULL && (h->slirp == NULL || h->link->back_to_python))
                || (deadline >= 0 && ckvm_monotonic_ms() >= deadline))
            return err ? -err : ready;
    }
}

/* libslirp callbacks with nothing for Python to do: its clock (CLOCK_MONOTONIC, Python's time.monotonic_ns), its
 * notify (libslirp is only called on the thread that waits, which fills anew every turn) and its fd
 * (un)registration (the fds are asked for anew by every fill). */
int64_t ckvm_clock_ns(void *opaque)
{
    (void)opaque;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
}

void ckvm_slirp_no_op(void *opaque) { (void)opaque; }
void ckvm_slirp_fd_no_op(int fd, void *opaque) { (void)fd; (void)opaque; }
