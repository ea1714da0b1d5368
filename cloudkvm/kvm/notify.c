/* Available buffer notifications served without Python (virtio 1.2 §2.7.13 the driver's notification, §4.2.3.4 a
 * virtio-mmio QueueNotify write, delivered by KVM as an ioeventfd), for devices/virtio/notifier.py.
 *
 * A thread polls the ioeventfds of the queues a device serves in C (virtio-blk's requests: virtio_blk.c). For a
 * notification it takes the transport's lock (`struct ckvm_transport`: the same recursive mutex mmio.py holds for
 * every register access and all queue work), and while the transport is live (DRIVER_OK, no DEVICE_NEEDS_RESET) and
 * the queue ready it runs the device's C path, decides the used buffer notification (`ckvm_vq_needs_interrupt`) and
 * raises it: InterruptStatus bit 0 set, the slot's irqfd written. Whenever the C path stops short (a request it
 * leaves to Python, a map miss, a queue it cannot use, a transport not live), the notification goes on to Python
 * through the queue's `python_fd`, an eventfd the I/O thread watches, where mmio.py handles it as any other.
 *
 * The thread runs at its process's nice plus CKVM_NOTIFY_NICE (favoured) where the host lets it (root, or
 * RLIMIT_NICE): on a CPU it shares with the vCPU, it does all the copying and so, at the same weight, the scheduler
 * lets the vCPU run on after a kick until the guest idles (a halt and a wake-up per request); favoured, it takes the
 * CPU at the kick and the guest finds its request done, as with QEMU's pool of I/O threads (bench/RESULTS.md,
 * guest_io 2026-12-05). */
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/syscall.h>

#define CKVM_NOTIFY_NICE (-5)

/* The transport's share: its lock, whether it is live, its InterruptStatus cell and irqfd (-1: none). */
struct ckvm_transport {
    pthread_mutex_t lock;
    uint32_t live;
    uint32_t *isr;
    int32_t irqfd;
};

int ckvm_transport_init(struct ckvm_transport *t)
{
    pthread_mutexattr_t attr;
    int rc = pthread_mutexattr_init(&attr);
    if (rc == 0)
        rc = pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE);
    if (rc == 0)
        rc = pthread_mutex_init(&t->lock, &attr);
    pthread_mutexattr_destroy(&attr);
    t->irqfd = -1;
    return -rc;
}

/* Python tries the lock first holding the GIL (kvm/native.py `quick`), and waits for it only with the GIL released
 * (cffi releases it around every call): a thread that waits for the lock never holds what the owner may need. */
int ckvm_transport_trylock(struct ckvm_transport *t) { return pthread_mutex_trylock(&t->lock) == 0; }
void ckvm_transport_lock(struct ckvm_transport *t) { pthread_mutex_lock(&t->lock); }
void ckvm_transport_unlock(struct ckvm_transport *t) { pthread_mutex_unlock(&t->lock); }
void ckvm_transport_destroy(struct ckvm_transport *t) { pthread_mutex_destroy(&t->lock); }

/* Which C path serves a queue: virtio_blk.c's ckvm_blk_serve (ctx: struct ckvm_blk); virtio-net's receive queue,
 * where a notification only means "buffers posted", which matters only when the backend keeps frames for the guest
 * (ctx: struct ckvm_netlink, `held`): then net.py retries them, else there is nothing to do; virtio-net's transmit
 * queue (ctx: struct ckvm_netlink): its plain chains into libslirp (ckvm_net_tx) while the backend lets C call it
 * (`tx_open`: only on the thread that owns libslirp, the I/O thread, in its wait in C: ioloop.c). */
enum { CKVM_SERVE_BLK = 1, CKVM_SERVE_NET_RX = 2, CKVM_SERVE_NET_TX = 3 };
#define CKVM_MAX_NOTIFY 64
#define CKVM_INT_VRING 1                   /* §4.2.2 InterruptStatus: used buffer notification */

struct ckvm_notify_queue {
    int32_t efd, python_fd;
    uint32_t kind;
    struct ckvm_transport *t;
    const struct ckvm_mem *mem;
    struct ckvm_vq *q;
    struct ckvm_walk *w;
    void *ctx;                             /* the C path's state (CKVM_SERVE_*) */
    uint64_t served, forwarded;            /* notifications served whole here, handed on to Python */
};

struct ckvm_notifier {
    uint32_t count;
    int32_t stop_fd;                       /* an eventfd: written to stop the thread */
    struct ckvm_notify_queue *queues[CKVM_MAX_NOTIFY];
    uint32_t running;
    int32_t failed;                        /* the thread ended by itself: errno (or -1); Python takes over */
    int32_t tid;                           /* the thread's id, once it runs */
    pthread_t thread;
};

static void ckvm_eventfd_signal(int fd)
{
    uint64_t one = 1;
    ssize_t n = write(fd, &one, sizeof(one));
    (void)n;                               /* EAGAIN: the counter is already non-zero, the reader wakes anyway */
}

/* The used buffer notification for `q` when the driver wants one (the caller holds t's lock): 1 raised, 0 not
 * wanted or not C's to decide (no irqfd: Python decides), -1 the rings are not usable. */
static int ckvm_raise_used(struct ckvm_transport *t, const struct ckvm_mem *mem, struct ckvm_vq *q)
{
    if (t->irqfd < 0)
        return 0;
    int wanted = ckvm_vq_needs_interrupt(mem, q);
    if (wanted > 0) {
        ckvm_isr_set(t->isr, CKVM_INT_VRING);
        ckvm_eventfd_signal(t->irqfd);
    }
    return wanted;
}

/* A call into libslirp that C makes itself, as net.py's _LinkSection is for Python's: the transport's lock held,
 * the link armed while net.py allows (`arm_ok`); leaving, the receive queue's used buffer notification for the
 * frames C placed meanwhile (net.py counts them when it next looks). Re-entrant: the lock is recursive, and the
 * link is left as it was found. */
struct ckvm_link_call { struct ckvm_transport *t; uint64_t rx_frames; uint32_t armed; };

static struct ckvm_link_call ckvm_link_enter(struct ckvm_netlink *l)
{
    struct ckvm_link_call call = { l->t, l->rx_frames, l->armed };   /* the transport locked: the one unlocked */
    if (call.t != NULL)
        pthread_mutex_lock(&call.t->lock);
    l->armed = l->armed || (call.t != NULL && l->arm_ok && l->rxq != NULL);
    return call;
}

static void ckvm_link_leave(struct ckvm_netlink *l, struct ckvm_link_call call)
{
    l->armed = call.armed;
    if (call.t == NULL)
        return;
    if (l->rx_frames != call.rx_frames && l->rxq != NULL && l->live != NULL && *l->live && l->rxq->ready) {
        if (call.t->irqfd < 0)
            l->back_to_python = 1;      /* not C's to raise: Python decides it (slirp.py after_wait) */
        else
            ckvm_raise_used(call.t, l->mem, l->rxq);
    }
    pthread_mutex_unlock(&call.t->lock);
}

/* The transmit queue's plain chains into libslirp (virtio_net.c ckvm_net_tx) inside a link call: 0 the queue is
 * empty, 1 net.py must go on (a chain it judges, C may not call libslirp now, the rings are not usable). */
static int ckvm_net_tx_serve(struct ckvm_notify_queue *nq)
{
    struct ckvm_netlink *l = nq->ctx;
    if (!l->tx_open || l->back_to_python)
        return 1;
    struct ckvm_link_call call = ckvm_link_enter(l);
    int code = ckvm_net_tx(nq->mem, nq->q, nq->w, l);
    ckvm_link_leave(l, call);
    return code != CKVM_NET_DONE;
}

/* One notification for `nq`, as the thread serves it (the tests call it directly). 1 when it went on to Python. */
int ckvm_notify_serve(struct ckvm_notify_queue *nq)
{
    struct ckvm_transport *t = nq->t;
    int forward = 1;
    pthread_mutex_lock(&t->lock);
    if (t->live && nq->q->ready && t->irqfd >= 0) {
        int code = -1;
        if (nq->kind == CKVM_SERVE_BLK)
            code = ckvm_blk_serve(nq->mem, nq->q, nq->w, nq->ctx);
        else if (nq->kind == CKVM_SERVE_NET_RX)
            code = ((const struct ckvm_netlink *)nq->ctx)->held != 0;
        else if (nq->kind == CKVM_SERVE_NET_TX)
            code = ckvm_net_tx_serve(nq);
        int wanted = ckvm_raise_used(t, nq->mem, nq->q);
        forward = code != 0 || wanted < 0;
    }
    pthread_mutex_unlock(&t->lock);
    if (forward) {
        nq->forwarded++;
        ckvm_eventfd_signal(nq->python_fd);
    } else {
        nq->served++;
    }
    return forward;
}

/* The thread cannot go on (poll failed, an ioeventfd went bad): say so, and wake Python on every queue, which then
 * watches the ioeventfds itself (notifier.py). */
static void *ckvm_notify_give_up(struct ckvm_notifier *n, uint32_t count, int err)
{
    __atomic_store_n(&n->failed, err ? err : -1, __ATOMIC_SEQ_CST);
    for (uint32_t i = 0; i < count; i++)
        ckvm_eventfd_signal(n->queues[i]->python_fd);
    return NULL;
}

static void *ckvm_notify_thread(void *arg)
{
    struct ckvm_notifier *n = arg;
    pid_t tid = (pid_t)syscall(SYS_gettid);
    __atomic_store_n(&n->tid, (int32_t)tid, __ATOMIC_RELEASE);
    errno = 0;
    int nice = getpriority(PRIO_PROCESS, (id_t)tid);
    if (errno == 0)     /* EACCES unprivileged: it stays as it is */
        setpriority(PRIO_PROCESS, (id_t)tid, nice + CKVM_NOTIFY_NICE);
    struct pollfd fds[CKVM_MAX_NOTIFY + 1];
    uint32_t count = n->count < CKVM_MAX_NOTIFY ? n->count : CKVM_MAX_NOTIFY;
    for (uint32_t i = 0; i < count; i++)
        fds[i] = (struct pollfd){ .fd = n->queues[i]->efd, .events = POLLIN };
    fds[count] = (struct pollfd){ .fd = n->stop_fd, .events = POLLIN };
    for (;;) {
        if (poll(fds, count + 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            return ckvm_notify_give_up(n, count, errno);
        }
        if (fds[count].revents)
            return NULL;
        for (uint32_t i = 0; i < count; i++) {
            if (fds[i].revents & (POLLERR | POLLNVAL | POLLHUP))
                return ckvm_notify_give_up(n, count, EBADF);
            uint64_t value;
            if (fds[i].revents & POLLIN && read(fds[i].fd, &value, sizeof(value)) == sizeof(value))
                ckvm_notify_serve(n->queues[i]);
        }
    }
}

/* Start the thread on the queues registered so far (none may be added later), every signal blocked in it: they
 * belong to the vCPU threads (the kick) and to Python's main thread. 0 or -errno. */
int ckvm_notifier_start(struct ckvm_notifier *n)
{
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&n->thread, NULL, ckvm_notify_thread, n);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc == 0)
        n->running = 1;
    return -rc;
}

/* Stop the thread and wait for it. Called without any transport's lock held: the thread may be waiting for one. */
void ckvm_notifier_stop(struct ckvm_notifier *n)
{
    if (!n->running)
        return;
    ckvm_eventfd_signal(n->stop_fd);
    pthread_join(n->thread, NULL);
    n->running = 0;
}
