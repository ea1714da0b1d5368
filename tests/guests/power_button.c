/* Waits for the ACPI power button (the board's GED edge on GSI 9), printing a heartbeat line now and then; on
 * the press it says so and powers off through ACPI S5, as an OS with a power-button handler would. */
#include "guest.h"

#define POWER_BUTTON_GSI 9
#define VECTOR 0x39

static volatile int pressed;

__attribute__((interrupt)) static void power_button(struct interrupt_frame *frame)
{
    (void)frame;
    pressed = 1;
    lapic_eoi();
}

int guest_main(u64 cpu, u64 ncpus)
{
    (void)ncpus;
    if (cpu != 0)
        for (;;) __asm__ __volatile__("cli; hlt");
    idt_set_gate(VECTOR, power_button);
    idt_load();
    pic_mask_all();
    lapic_enable();
    ioapic_route(POWER_BUTTON_GSI, VECTOR, 0);
    puts("power_button: ready\n");
    for (u64 beat = 0; !pressed; beat++) {
        if (beat % 100000 == 0) {
            puts("power_button: waiting ");
            putdec(beat / 100000);
            putc('\n');
        }
        sti();
        __asm__ __volatile__("pause");
        cli();
    }
    puts("power_button: pressed, powering off\n");
    return 0;
}
