/* guest_io's helper in the benchmark guest's initramfs (static, no libc beyond glibc's static one):
 *   gio now                          the monotonic clock in seconds, for timing busybox dd from the shell
 *   gio randread DEV QD SECONDS SPAN 4 KiB O_DIRECT reads at scattered block offsets inside the first SPAN MiB of
 *                                    DEV, QD of them in flight (Linux native AIO: io_setup/io_submit/io_getevents),
 *                                    for SECONDS; prints "<reads> <elapsed seconds>"
 * The offsets: block k is (k * STEP) mod blocks, STEP odd and large, so every block is visited in a scattered
 * order before any repeats, as the host-side disk benchmark (bench/disk) and `qemu-img bench` do. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096
#define STEP 40009u
#define MAX_QD 256

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int randread(const char *dev, int qd, double seconds, uint64_t span_mib)
{
    int fd = open(dev, O_RDONLY | O_DIRECT);
    if (fd < 0) {
        perror(dev);
        return 1;
    }
    uint64_t blocks = span_mib * (1 << 20) / BLOCK, next = 0;
    char *buffers;
    if (posix_memalign((void **)&buffers, BLOCK, (size_t)qd * BLOCK)) {
        perror("posix_memalign");
        return 1;
    }
    aio_context_t ctx = 0;
    if (syscall(SYS_io_setup, qd, &ctx) < 0) {
        perror("io_setup");
        return 1;
    }
    struct iocb cbs[MAX_QD], *submit[MAX_QD];
    struct io_event events[MAX_QD];
    memset(cbs, 0, sizeof(cbs));
    for (int i = 0; i < qd; i++) {
        cbs[i].aio_fildes = fd;
        cbs[i].aio_lio_opcode = IOCB_CMD_PREAD;
        cbs[i].aio_buf = (uint64_t)(uintptr_t)(buffers + (size_t)i * BLOCK);
        cbs[i].aio_nbytes = BLOCK;
        cbs[i].aio_data = i;
        cbs[i].aio_offset = (int64_t)((next++ * STEP) % blocks) * BLOCK;
        submit[i] = &cbs[i];
    }
    double start = now(), end = start + seconds;
    uint64_t done = 0;
    if (syscall(SYS_io_submit, ctx, qd, submit) != qd) {
        perror("io_submit");
        return 1;
    }
    int in_flight = qd;
    while (in_flight) {
        long got = syscall(SYS_io_getevents, ctx, 1, qd, events, NULL);
        if (got < 0) {
            perror("io_getevents");
            return 1;
        }
        int again = 0;
        for (long e = 0; e < got; e++) {
            if (events[e].res != BLOCK) {
                fprintf(stderr, "gio: a read returned %lld\n", (long long)events[e].res);
                return 1;
            }
            done++;
            in_flight--;
            if (now() < end) {
                struct iocb *cb = &cbs[events[e].data];
                cb->aio_offset = (int64_t)((next++ * STEP) % blocks) * BLOCK;
                submit[again++] = cb;
            }
        }
        if (again) {
            if (syscall(SYS_io_submit, ctx, again, submit) != again) {
                perror("io_submit");
                return 1;
            }
            in_flight += again;
        }
    }
    printf("%llu %.6f\n", (unsigned long long)done, now() - start);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 2 && !strcmp(argv[1], "now")) {
        printf("%.6f\n", now());
        return 0;
    }
    if (argc == 6 && !strcmp(argv[1], "randread")) {
        int qd = atoi(argv[3]);
        if (qd < 1 || qd > MAX_QD) {
            fprintf(stderr, "gio: queue depth 1..%d\n", MAX_QD);
            return 2;
        }
        return randread(argv[2], qd, atof(argv[4]), strtoull(argv[5], NULL, 10));
    }
    fprintf(stderr, "usage: gio now | gio randread DEV QD SECONDS SPAN_MIB\n");
    return 2;
}
