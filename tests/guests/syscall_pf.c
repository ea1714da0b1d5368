/* `syscall` from user mode into a kernel entry on a supervisor-only page, as in every real kernel (Linux's
 * entry_SYSCALL_64): enter CPL3 with iretq, `syscall` twice into a CPL0 handler, `sysretq` back. Any page fault
 * is reported by its handler. Rings a doorbell (MMIO 0xd0000000, a test device) once `syscall` and the IDT are set
 * up. Prints where each step ran. */
#include "guest.h"

#define MSR_EFER 0xc0000080u
#define MSR_STAR 0xc0000081u
#define MSR_LSTAR 0xc0000082u
#define MSR_SFMASK 0xc0000084u
#define USER_BASE 0x400000ul   /* 2 MiB page 2: the only user-accessible memory */
#define USER_STACK_TOP 0x500000ul

struct gate { u16 off0; u16 sel; u8 ist; u8 flags; u16 off1; u32 off2; u32 zero; };
static u64 gdt[8] __attribute__((aligned(16)));
static struct gate idt[32] __attribute__((aligned(16)));
static u32 tss[26] __attribute__((aligned(16)));
u8 kstack[4096] __attribute__((aligned(16)));   /* syscall entry stack (used from the asm entry) */
static u8 trap_stack[4096] __attribute__((aligned(16)));

void syscall_entry(void);
void page_fault_entry(void);
void user_code(void);
void user_code_end(void);
void syscall_c(u64 nr);
void page_fault_c(u64 *frame);

__asm__(
    ".globl syscall_entry\n"
    "syscall_entry:\n"
    "  mov %rsp, %r15\n"
    "  lea kstack+4096(%rip), %rsp\n"
    "  push %rcx\n push %r11\n push %r15\n"
    "  mov %rax, %rdi\n"
    "  call syscall_c\n"
    "  pop %r15\n pop %r11\n pop %rcx\n"
    "  mov %r15, %rsp\n"
    "  sysretq\n"
    ".globl page_fault_entry\n"
    "page_fault_entry:\n"            /* error code, RIP, CS, RFLAGS, RSP, SS on the stack */
    "  mov %rsp, %rdi\n"
    "  call page_fault_c\n"
    "1: hlt\n jmp 1b\n"
    ".globl user_code, user_code_end\n"
    "user_code:\n"                   /* position independent: copied to USER_BASE */
    "  mov $1, %eax\n syscall\n"
    "  mov $2, %eax\n syscall\n"
    "2: jmp 2b\n"
    "user_code_end:\n");

void syscall_c(u64 nr)
{
    u16 cs;
    __asm__ __volatile__("mov %%cs, %0" : "=r"(cs));
    puts("syscall_pf: call ");
    putdec(nr);
    puts(" handled at CPL ");
    putdec(cs & 3);
    putc('\n');
    if (nr == 2) {
        puts("syscall_pf: user/kernel round trips work\n");
        acpi_poweroff();
    }
}

void page_fault_c(u64 *frame)
{
    u64 cr2;
    __asm__ __volatile__("mov %%cr2, %0" : "=r"(cr2));
    puts("syscall_pf: page fault at rip 0x");
    puthex(frame[1], 16);
    puts(" cr2 0x");
    puthex(cr2, 16);
    puts(" error 0x");
    puthex(frame[0], 2);
    puts(" from CPL ");
    putdec(frame[2] & 3);
    putc('\n');
    acpi_poweroff();
}

static void set_gate(int vector, void (*handler)(void))
{
    u64 a = (u64)handler;
    idt[vector] = (struct gate){ (u16)a, 0x08, 0, 0x8e, (u16)(a >> 16), (u32)(a >> 32), 0 };
}

static void map_user_page(void)
{
    u64 cr3;
    __asm__ __volatile__("mov %%cr3, %0" : "=r"(cr3));
    u64 *pml4 = (u64 *)(cr3 & ~0xfffUL), *pdpt = (u64 *)(pml4[0] & ~0xfffUL);
    u64 *pd = (u64 *)(pdpt[0] & ~0xfffUL);
    pml4[0] |= 4;
    pdpt[0] |= 4;
    pd[USER_BASE >> 21] |= 4;   /* only this 2 MiB page is user-accessible */
    __asm__ __volatile__("mov %0, %%cr3" :: "r"(cr3) : "memory");
}

int guest_main(u64 cpu, u64 ncpus)
{
    (void)ncpus;
    if (cpu)
        for (;;) __asm__ __volatile__("cli; hlt");
    u64 t = (u64)tss;
    tss[1] = (u32)((u64)trap_stack + sizeof(trap_stack));            /* RSP0 */
    tss[2] = (u32)(((u64)trap_stack + sizeof(trap_stack)) >> 32);
    gdt[1] = 0x00af9b000000ffffull;  /* 0x08 kernel code */
    gdt[2] = 0x00cf93000000ffffull;  /* 0x10 kernel data */
    gdt[3] = 0x00cff3000000ffffull;  /* 0x18 user data (DPL3) */
    gdt[4] = 0x00affb000000ffffull;  /* 0x20 user code (DPL3, L) */
    gdt[5] = (sizeof(tss) - 1) | ((t & 0xffffff) << 16) | (0x89ull << 40) | (((t >> 24) & 0xff) << 56);
    gdt[6] = t >> 32;                /* 0x28: 64-bit TSS */
    struct { u16 limit; u64 base; } __attribute__((packed)) gdtr = { sizeof(gdt) - 1, (u64)gdt },
                                                               idtr = { sizeof(idt) - 1, (u64)idt };
    set_gate(14, page_fault_entry);
    __asm__ __volatile__(
        "lgdt %0\n lidt %1\n"
        "mov $0x10, %%ax\n mov %%ax, %%ds\n mov %%ax, %%es\n mov %%ax, %%ss\n"
        "mov $0x28, %%ax\n ltr %%ax\n"
        "pushq $0x08\n lea 1f(%%rip), %%rax\n push %%rax\n lretq\n1:\n" :: "m"(gdtr), "m"(idtr) : "rax", "memory");
    memcpy((void *)USER_BASE, (void *)user_code, (u64)user_code_end - (u64)user_code);
    map_user_page();
    u32 lo, hi;
    __asm__ __volatile__("rdmsr" : "=a"(lo), "=d"(hi) : "c"(MSR_EFER));
    __asm__ __volatile__("wrmsr" :: "c"(MSR_EFER), "a"(lo | 1), "d"(hi));   /* SCE */
    __asm__ __volatile__("wrmsr" :: "c"(MSR_STAR), "a"(0), "d"(0x08 | (0x10 << 16)));
    __asm__ __volatile__("wrmsr" :: "c"(MSR_LSTAR), "a"((u32)(u64)syscall_entry), "d"((u32)((u64)syscall_entry >> 32)));
    __asm__ __volatile__("wrmsr" :: "c"(MSR_SFMASK), "a"(0x257fd5), "d"(0));  /* Linux 6.1's mask, RF included */
    mmio_write32(0xd0000000ul, 1);   /* the test's doorbell: "syscall and the IDT are set up" */
    puts("syscall_pf: entering CPL3\n");
    __asm__ __volatile__(
        "pushq $0x1b\n push %0\n pushq $0x2\n pushq $0x23\n push %1\n iretq\n"
        :: "r"(USER_STACK_TOP), "r"(USER_BASE) : "memory");
    return 1;
}
