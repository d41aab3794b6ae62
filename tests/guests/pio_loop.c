/* pio_loop: the exit-rate benchmark's guest. Writes PIO_LOOP_COUNT bytes to port 0x510,
 * one vCPU exit each, then powers off. The loop is a handful of instructions per exit so
 * the host side dominates even under an emulating KVM. */
#include "guest.h"

#define BENCH_PORT 0x510
#define PIO_LOOP_COUNT 20000

void guest_main(void)
{
    for (unsigned int i = 0; i < PIO_LOOP_COUNT; i++)
        outb(BENCH_PORT, (uint8_t)i);
    acpi_poweroff();
}
