/* Freestanding helpers for purpose-built C guests (x86_64, CPL0, identity-mapped, no SSE: -mgeneral-regs-only).
 * Ports and addresses follow cloudkvm/boards/x86.py. */
#ifndef CLOUDKVM_GUEST_H
#define CLOUDKVM_GUEST_H
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef unsigned long size_t;

#define COM1 0x3f8
#define barrier() __asm__ __volatile__("" ::: "memory")
#define mb() __asm__ __volatile__("mfence" ::: "memory")

static inline void outb(u16 port, u8 v) { __asm__ __volatile__("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ __volatile__("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u8 mmio_read8(u64 addr) { return *(volatile u8 *)addr; }

static inline void putc(char c) { outb(COM1, (u8)c); }
static inline void puts(const char *s) { while (*s) putc(*s++); }
static inline void puthex(u64 v, int digits)
{
    for (int i = digits - 1; i >= 0; i--)
        putc("0123456789abcdef"[(v >> (4 * i)) & 0xf]);
}
static inline void putdec(u64 v)
{
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do { buf[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    puts(&buf[i]);
}

/* Interrupts: an IDT of 64-bit gates, the local APIC and IOAPIC at the board's addresses (x86.py). */
#define LAPIC 0xfee00000ul
#define IOAPIC 0xfec00000ul
struct interrupt_frame;
typedef void (*isr_t)(struct interrupt_frame *);
void idt_set_gate(u8 vector, isr_t handler);
void idt_load(void);
void pic_mask_all(void);
void lapic_enable(void);
void ioapic_route(u8 pin, u8 vector, int level_triggered);
static inline void lapic_eoi(void) { mmio_write32(LAPIC + 0xb0, 0); }
static inline void sti(void) { __asm__ __volatile__("sti"); }
static inline void cli(void) { __asm__ __volatile__("cli"); }
static inline void sti_hlt(void) { __asm__ __volatile__("sti; hlt; cli" ::: "memory"); }
/* let interrupts that became pending while IF was clear be delivered (sti takes effect after one instruction) */
static inline void drain_interrupts(void) { __asm__ __volatile__("sti; nop; nop; nop; cli" ::: "memory"); }
static inline void acpi_poweroff(void) { outb(0x600, (5 << 2) | (1 << 5)); }

void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
#endif
