/*
 * irq: an IOAPIC interrupt wakes a halted vCPU.
 *
 * Masks the 8259s, fills the IDT, enables the local APIC, routes IOAPIC pin
 * IRQ_TEST_PIN (GSI 10) to IRQ_TEST_VECTOR (edge, fixed, physical APIC 0), prints
 * "waiting\n" and halts with interrupts enabled until the handler has run. The
 * host raises GSI 10 (KVM_IRQ_LINE 1 then 0, or an irqfd) once it reads "waiting".
 * The handler prints "irq!\n" and sends EOI; the guest then prints "irq done\n"
 * and powers off. Any other vector prints "unexpected interrupt ..." and powers off.
 */
#include "guest.h"

#define IRQ_TEST_PIN 10
#define IRQ_TEST_VECTOR 0x30
#define LAPIC_BSP_ID 0

static volatile int irq_count;

__attribute__((interrupt)) static void irq_handler(struct interrupt_frame *frame)
{
    (void)frame;
    serial_puts("irq!\n");
    irq_count++;
    lapic_eoi();
}

void guest_main(void)
{
    pic_mask_all();
    idt_init();
    idt_set_gate(IRQ_TEST_VECTOR, irq_handler);
    lapic_enable();
    ioapic_route(IRQ_TEST_PIN, IRQ_TEST_VECTOR, LAPIC_BSP_ID);

    serial_puts("waiting\n");
    while (!irq_count) {
        sti_hlt();
        cli();
    }
    serial_puts("irq done\n");
    acpi_poweroff();
}
