/* reset: asks the i8042 keyboard controller to pulse the CPU reset line
 * (command 0xFE to port 0x64), as Linux does for "reboot=k". voidbox stops the VM
 * with its reset status. If the write is ignored the guest prints
 * "reset ignored\n" and powers off, so the test fails on the message. */
#include "guest.h"

void guest_main(void)
{
    serial_puts("resetting\n");
    outb(I8042_COMMAND_PORT, I8042_CMD_PULSE_RESET);
    serial_puts("reset ignored\n");
    acpi_poweroff();
}
