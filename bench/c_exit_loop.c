/* The C reference for bench/exit_rate: a minimal KVM loop that runs the same flat guest as cloudkvm (64-bit
 * entry, identity map, same GDT and register state) and counts the OUT exits it handles until the guest writes
 * the ACPI sleep port. Usage: c_exit_loop GUEST.bin  -> prints "exits=<n> seconds=<s>" */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE (256u << 20)
#define LOAD 0x100000
#define GDT 0x500
#define PT 0x9000
#define SLEEP_PORT 0x600

static void die(const char *what) { perror(what); exit(1); }

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static struct kvm_segment seg(uint16_t sel, uint8_t type, uint8_t l, uint8_t db, uint8_t s)
{
    struct kvm_segment g = { .base = 0, .limit = 0xffffffff, .selector = sel, .type = type, .present = 1,
                             .dpl = 0, .db = db, .s = s, .l = l, .g = 1 };
    return g;
}

int main(int argc, char **argv)
{
    if (argc != 2) { fprintf(stderr, "usage: %s GUEST.bin\n", argv[0]); return 2; }
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) die("mmap");
    struct kvm_userspace_memory_region region = { .slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE,
                                                  .userspace_addr = (uintptr_t)mem };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
    ioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, &(uint64_t){0xfffbc000});
    ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000);
    if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0) die("KVM_CREATE_IRQCHIP");

    FILE *f = fopen(argv[1], "rb");
    if (!f) die(argv[1]);
    size_t n = fread(mem + LOAD, 1, MEM_SIZE - LOAD, f);
    fclose(f);
    if (n == 0) die("empty guest");

    uint64_t gdt[5] = { 0, 0, 0x00af9b000000ffffull, 0x00cf93000000ffffull, 0x008f8b000000ffffull };
    memcpy(mem + GDT, gdt, sizeof(gdt));
    uint64_t *pml4 = (uint64_t *)(mem + PT), *pdpt = (uint64_t *)(mem + PT + 0x1000);
    pml4[0] = (PT + 0x1000) | 3;
    for (int i = 0; i < 4; i++) {
        uint64_t *pd = (uint64_t *)(mem + PT + 0x2000 + i * 0x1000);
        pdpt[i] = (PT + 0x2000 + i * 0x1000) | 3;
        for (int j = 0; j < 512; j++)
            pd[j] = ((uint64_t)(i * 512 + j) << 21) | 0x83;
    }

    int cpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (cpu < 0) die("KVM_CREATE_VCPU");
    struct { struct kvm_cpuid2 h; struct kvm_cpuid_entry2 e[256]; } cpuid = { .h.nent = 256 };
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &cpuid) < 0) die("KVM_GET_SUPPORTED_CPUID");
    if (ioctl(cpu, KVM_SET_CPUID2, &cpuid) < 0) die("KVM_SET_CPUID2");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, cpu, 0);
    if (run == MAP_FAILED) die("mmap kvm_run");

    struct kvm_sregs sregs;
    if (ioctl(cpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
    sregs.cs = seg(0x10, 11, 1, 0, 1);
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = seg(0x18, 3, 0, 1, 1);
    sregs.tr = seg(0x20, 11, 0, 0, 0);
    sregs.gdt.base = GDT; sregs.gdt.limit = sizeof(gdt) - 1;
    sregs.idt.base = 0x520; sregs.idt.limit = 0;
    sregs.cr0 = 0x80010033; sregs.cr3 = PT; sregs.cr4 = 0x620; sregs.efer = 0x501;
    if (ioctl(cpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
    struct kvm_regs regs = { .rip = LOAD, .rsp = 0x80000, .rflags = 2 };
    if (ioctl(cpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");

    unsigned long exits = 0;
    double t0 = now();
    for (;;) {
        if (ioctl(cpu, KVM_RUN, 0) < 0) die("KVM_RUN");
        exits++;
        if (run->exit_reason != KVM_EXIT_IO) {
            fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
            return 1;
        }
        if (run->io.port == SLEEP_PORT)
            break;
    }
    double t1 = now();
    printf("exits=%lu seconds=%.6f\n", exits, t1 - t0);
    return 0;
}
