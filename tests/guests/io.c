/*
 * io: port and MMIO exits of every width, in a fixed order the test can assert.
 *
 * Port writes to IO_TEST_PORT (0x510):   1 byte 0x11, 2 bytes 0x2233, 4 bytes 0x44556677
 * Port reads from IO_TEST_PORT + 1:      1, 2 and 4 bytes
 * MMIO writes to MMIO_TEST_ADDR:         1 byte 0x55, 2 bytes 0x6677, 4 bytes 0x8899aabb,
 *                                        8 bytes 0x0123456789abcdef
 * MMIO reads from MMIO_TEST_ADDR:        1, 2, 4 and 8 bytes
 *
 * Serial output (hex, lower case, zero-padded to the access width):
 *     io in8=XX in16=XXXX in32=XXXXXXXX
 *     mmio r8=XX r16=XXXX r32=XXXXXXXX r64=XXXXXXXXXXXXXXXX
 *     io done
 * then ACPI poweroff.
 */
#include "guest.h"

#define IO_TEST_PORT 0x510
#define MMIO_TEST_ADDR 0xD1000000UL

void guest_main(void)
{
    outb(IO_TEST_PORT, 0x11);
    outw(IO_TEST_PORT, 0x2233);
    outl(IO_TEST_PORT, 0x44556677);

    uint8_t in8 = inb(IO_TEST_PORT + 1);
    uint16_t in16 = inw(IO_TEST_PORT + 1);
    uint32_t in32 = inl(IO_TEST_PORT + 1);

    serial_puts("io in8=");
    serial_puthex(in8, 2);
    serial_puts(" in16=");
    serial_puthex(in16, 4);
    serial_puts(" in32=");
    serial_puthex(in32, 8);
    serial_puts("\n");

    mmio_write8(MMIO_TEST_ADDR, 0x55);
    mmio_write16(MMIO_TEST_ADDR, 0x6677);
    mmio_write32(MMIO_TEST_ADDR, 0x8899aabb);
    mmio_write64(MMIO_TEST_ADDR, 0x0123456789abcdefULL);

    uint8_t r8 = mmio_read8(MMIO_TEST_ADDR);
    uint16_t r16 = mmio_read16(MMIO_TEST_ADDR);
    uint32_t r32 = mmio_read32(MMIO_TEST_ADDR);
    uint64_t r64 = mmio_read64(MMIO_TEST_ADDR);

    serial_puts("mmio r8=");
    serial_puthex(r8, 2);
    serial_puts(" r16=");
    serial_puthex(r16, 4);
    serial_puts(" r32=");
    serial_puthex(r32, 8);
    serial_puts(" r64=");
    serial_puthex(r64, 16);
    serial_puts("\n");

    serial_puts("io done\n");
    acpi_poweroff();
}
