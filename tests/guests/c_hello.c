/* The C guest runtime: every vCPU prints its index, vCPU 0 checks a little arithmetic and libc, then returns 0. */
#include "guest.h"

static volatile u32 lock;
static volatile u32 done;

int guest_main(u64 cpu, u64 ncpus)
{
    while (__atomic_exchange_n(&lock, 1, __ATOMIC_ACQUIRE))
        __asm__ __volatile__("pause");
    puts("c_hello: vCPU ");
    putdec(cpu);
    puts(" of ");
    putdec(ncpus);
    putc('\n');
    __atomic_store_n(&lock, 0, __ATOMIC_RELEASE);
    __atomic_add_fetch(&done, 1, __ATOMIC_SEQ_CST);
    if (cpu != 0)
        for (;;) __asm__ __volatile__("cli; hlt");
    while (done != ncpus)
        __asm__ __volatile__("pause");
    char buf[16];
    memset(buf, 'x', sizeof(buf));
    memcpy(buf, "cloudkvm", 8);
    puts(memcmp(buf, "cloudkvmxxxxxxxx", 16) == 0 ? "c_hello: libc ok\n" : "c_hello: libc BROKEN\n");
    puts("c_hello: 0x");
    puthex(0xC0FFEEull * 3, 8);
    putc('\n');
    return 0;
}
