"""The guest-physical memory map every voidbox VM shares.

One place for the addresses the boot code, ACPI tables and devices agree on.

    0x0000_0500  GDT used at entry
    0x0000_6000  PVH hvm_start_info, then its memory map
    0x0000_7000  boot_params (the "zero page")
    0x0000_8ff0  initial stack (grows down)
    0x0000_9000  identity page tables: PML4, PDPT, 4 PDs of 2 MiB pages (4 GiB)
    0x0002_0000  kernel command line
    0x0009_fc00  EBDA (reserved)
    0x000e_0000  ACPI tables, RSDP first (the legacy scan range)
    0x0010_0000  high memory
    0x0100_0000  kernel load address (16 MiB)
    0xc000_0000  MMIO gap up to 4 GiB: virtio-mmio, IOAPIC, LAPIC
    0x1_0000_0000 RAM above the gap
"""

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

GDT_ADDR = 0x500
PVH_START_INFO_ADDR = 0x6000
PVH_MEMMAP_ADDR = 0x6040
PVH_MEMMAP_MAX_ENTRIES = 64
ZERO_PAGE_ADDR = 0x7000
BOOT_STACK_ADDR = 0x8FF0
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000  # four consecutive page directories
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000
EBDA_ADDR = 0x9FC00
ACPI_ADDR = 0xE0000
ACPI_END = 0x100000
HIMEM_ADDR = 0x100000
KERNEL_LOAD_ADDR = 0x1000000

MMIO_GAP_START = 0xC000_0000
MMIO_GAP_END = 0x1_0000_0000

VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_MMIO_SIZE = 0x1000
VIRTIO_MMIO_FIRST_IRQ = 5  # IRQ 4 is the serial port
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000

# I/O ports
SERIAL_COM1_PORT = 0x3F8
SERIAL_COM1_IRQ = 4
I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
ACPI_SLEEP_CONTROL_PORT = 0x600  # FADT SLEEP_CONTROL_REG (hardware-reduced, ACPI 6.x §4.8.3.7)
ACPI_SLEEP_STATUS_PORT = 0x601  # FADT SLEEP_STATUS_REG
ACPI_SCI_IRQ = 9

MIN_MEM = 16 * MiB
