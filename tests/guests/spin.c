/* spin: never exits on its own. Prints "spinning\n" and loops with pause, with
 * interrupts off, for the timeout test: voidbox must stop it from the host. */
#include "guest.h"

void guest_main(void)
{
    serial_puts("spinning\n");
    for (;;)
        cpu_pause();
}
