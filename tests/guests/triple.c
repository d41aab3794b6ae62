/* triple: a triple fault. With an empty IDT (limit 0) the #UD from ud2 cannot be
 * delivered (#GP), neither can the #GP (#DF), nor the #DF: the CPU shuts down and
 * KVM reports KVM_EXIT_SHUTDOWN. Prints "triple\n" first; prints
 * "still alive\n" if the fault somehow returned. */
#include "guest.h"

void guest_main(void)
{
    serial_puts("triple\n");
    lidt(0, 0);
    __asm__ volatile("ud2" : : : "memory");
    serial_puts("still alive\n");
    acpi_poweroff();
}
