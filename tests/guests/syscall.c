/* The user/kernel round trip every Linux process needs: enter CPL3 with iretq, `syscall` into a CPL0 handler
 * (LSTAR/STAR/SFMASK, EFER.SCE), `sysretq` back, twice. Prints where each step ran. */
#include "guest.h"

#define MSR_EFER 0xc0000080u
#define MSR_STAR 0xc0000081u
#define MSR_LSTAR 0xc0000082u
#define MSR_SFMASK 0xc0000084u

static u64 gdt[8] __attribute__((aligned(16)));
u8 kstack[4096] __attribute__((aligned(16)));  /* used from the asm entry */
static u8 ustack[4096] __attribute__((aligned(16)));
static volatile u64 calls, cpl_seen;

static inline void wrmsr(u32 msr, u64 v) { __asm__ __volatile__("wrmsr" :: "c"(msr), "a"((u32)v), "d"((u32)(v >> 32))); }
static inline u64 rdmsr(u32 msr) { u32 lo, hi; __asm__ __volatile__("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr)); return ((u64)hi << 32) | lo; }

void syscall_entry(void);
void user_code(void);
void syscall_c(u64 nr);

__asm__(
    ".globl syscall_entry\n"
    "syscall_entry:\n"
    "  mov %rsp, %r15\n"               /* user RSP (no swapgs: one CPU, no per-cpu data) */
    "  lea kstack+4096(%rip), %rsp\n"
    "  push %rcx\n push %r11\n push %r15\n"
    "  mov %rax, %rdi\n"
    "  call syscall_c\n"
    "  pop %r15\n pop %r11\n pop %rcx\n"
    "  mov %r15, %rsp\n"
    "  sysretq\n"
    ".globl user_code\n"
    "user_code:\n"
    "  mov $1, %eax\n syscall\n"
    "  mov $2, %eax\n syscall\n"
    "1: jmp 1b\n");

void syscall_c(u64 nr)
{
    u16 cs;
    __asm__ __volatile__("mov %%cs, %0" : "=r"(cs));
    cpl_seen = cs & 3;
    calls++;
    puts("syscall: call ");
    putdec(nr);
    puts(" handled at CPL ");
    putdec(cs & 3);
    putc('\n');
    if (nr == 2) {
        puts("syscall: user/kernel round trips work\n");
        acpi_poweroff();
    }
}

static void make_user_accessible(void)
{
    u64 cr3;
    __asm__ __volatile__("mov %%cr3, %0" : "=r"(cr3));
    u64 *pml4 = (u64 *)(cr3 & ~0xfffUL), *pdpt = (u64 *)(pml4[0] & ~0xfffUL);
    pml4[0] |= 4;
    for (int i = 0; i < 4; i++) {
        pdpt[i] |= 4;
        u64 *pd = (u64 *)(pdpt[i] & ~0xfffUL);
        for (int j = 0; j < 512; j++)
            pd[j] |= 4;
    }
    __asm__ __volatile__("mov %0, %%cr3" :: "r"(cr3) : "memory");
}

int guest_main(u64 cpu, u64 ncpus)
{
    (void)ncpus;
    if (cpu)
        for (;;) __asm__ __volatile__("cli; hlt");
    gdt[1] = 0x00af9b000000ffffull;  /* 0x08 kernel code */
    gdt[2] = 0x00cf93000000ffffull;  /* 0x10 kernel data */
    gdt[3] = 0x00cff3000000ffffull;  /* 0x18 user data (DPL3) */
    gdt[4] = 0x00affb000000ffffull;  /* 0x20 user code (DPL3, L) */
    struct { u16 limit; u64 base; } __attribute__((packed)) gdtr = { sizeof(gdt) - 1, (u64)gdt };
    __asm__ __volatile__(
        "lgdt %0\n"
        "mov $0x10, %%ax\n mov %%ax, %%ds\n mov %%ax, %%es\n mov %%ax, %%ss\n"
        "pushq $0x08\n lea 1f(%%rip), %%rax\n push %%rax\n lretq\n1:\n" :: "m"(gdtr) : "rax", "memory");
    make_user_accessible();
    wrmsr(MSR_EFER, rdmsr(MSR_EFER) | 1);            /* SCE */
    wrmsr(MSR_STAR, (0x08ull << 32) | (0x10ull << 48)); /* sysret: CS 0x20|3, SS 0x18|3 */
    wrmsr(MSR_LSTAR, (u64)syscall_entry);
    wrmsr(MSR_SFMASK, 0x200);
    puts("syscall: entering CPL3\n");
    __asm__ __volatile__(
        "pushq $0x1b\n push %0\n pushq $0x2\n pushq $0x23\n push %1\n iretq\n"
        :: "r"((u64)ustack + sizeof(ustack)), "r"((u64)user_code) : "memory");
    return 1;
}
