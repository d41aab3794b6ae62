/* hello: the smallest guest. Prints "hello from guest\n" and powers off through
 * the ACPI sleep control register. Proves: ELF entry, long mode, serial port I/O,
 * ACPI poweroff. */
#include "guest.h"

void guest_main(void)
{
    serial_puts("hello from guest\n");
    acpi_poweroff();
}
