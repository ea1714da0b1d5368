/* The few libc functions the compiler may call in a freestanding guest. */
#include "guest.h"

void *memset(void *d, int c, size_t n)
{
    u8 *p = d;
    while (n--) *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
    u8 *p = d;
    const u8 *q = s;
    while (n--) *p++ = *q++;
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *p = a, *q = b;
    for (; n; n--, p++, q++)
        if (*p != *q) return *p - *q;
    return 0;
}

struct gate {
    u16 offset_low, selector;
    u8 ist, type_attr;
    u16 offset_mid;
    u32 offset_high, zero;
} __attribute__((packed));

static struct gate idt[256] __attribute__((aligned(16)));

void idt_set_gate(u8 vector, isr_t handler)
{
    u64 addr = (u64)handler;
    struct gate g = { (u16)addr, 0x10 /* board code segment */, 0, 0x8e /* present, DPL0, interrupt gate */,
                      (u16)(addr >> 16), (u32)(addr >> 32), 0 };
    idt[vector] = g;
}

void idt_load(void)
{
    struct { u16 limit; u64 base; } __attribute__((packed)) idtr = { sizeof(idt) - 1, (u64)idt };
    __asm__ __volatile__("lidt %0" :: "m"(idtr));
}

void pic_mask_all(void)
{
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
}

void lapic_enable(void)
{
    mmio_write32(LAPIC + 0xf0, 0x1ff);  /* SVR: software enable, spurious vector 0xff (SDM Vol. 3A §11.9) */
}

void ioapic_route(u8 pin, u8 vector, int level_triggered)
{
    mmio_write32(IOAPIC, 0x10 + 2 * pin);  /* 82093AA §3.2.4: redirection entry, low half */
    mmio_write32(IOAPIC + 0x10, vector | ((u32)(level_triggered ? 1 : 0) << 15));
    mmio_write32(IOAPIC, 0x11 + 2 * pin);
    mmio_write32(IOAPIC + 0x10, 0);         /* destination: APIC 0 */
}
