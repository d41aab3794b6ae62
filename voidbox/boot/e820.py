"""The BIOS e820 memory map voidbox reports to the guest.

One list feeds both boot_params.e820_table (Linux boot protocol, zero-page.rst) and
the PVH memory map (hvm_memmap_table_entry, start_info.h); the type numbers are the
same in both (E820_TYPE_* in arch/x86/include/asm/e820/types.h, XEN_HVM_MEMMAP_TYPE_*).

    [0, EBDA_ADDR)                 RAM (real-mode area: GDT, zero page, page tables, cmdline)
    [EBDA_ADDR, HIMEM_ADDR)        reserved (EBDA, VGA hole, ACPI tables, BIOS area)
    [HIMEM_ADDR, end of low RAM)   RAM (kernel, initrd)
    [MMIO_GAP_END, ...)            RAM above 4 GiB, when the guest has more than the gap allows

Nothing is reported in the MMIO gap: the kernel must not treat device windows as RAM.
"""

from __future__ import annotations

from .._records import named_tuple
from ..layout import EBDA_ADDR, HIMEM_ADDR

# struct boot_e820_entry.type (arch/x86/include/uapi/asm/bootparam.h, e820/types.h).
E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
E820_UNUSABLE = 5

E820_MAX_ENTRIES_ZEROPAGE = 128  # bootparam.h: room in boot_params.e820_table


@named_tuple
class E820Entry:
    """struct boot_e820_entry: a range [addr, addr + size) of one type."""

    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size


def build_e820(memory) -> list[E820Entry]:
    """The e820 map of `memory` (a GuestMemory, or anything with `.regions`).

    The first region must start at 0 and reach past HIMEM_ADDR (GuestMemory guarantees
    both: it is at least MIN_MEM and starts at 0).
    """
    regions = sorted(memory.regions, key=lambda r: r.gpa)
    if not regions or regions[0].gpa != 0 or regions[0].end <= HIMEM_ADDR:
        raise ValueError("guest RAM must start at 0 and extend above 1 MiB")
    low = regions[0]
    table = [
        E820Entry(0, EBDA_ADDR, E820_RAM),
        E820Entry(EBDA_ADDR, HIMEM_ADDR - EBDA_ADDR, E820_RESERVED),
        E820Entry(HIMEM_ADDR, low.end - HIMEM_ADDR, E820_RAM),
    ]
    table.extend(E820Entry(r.gpa, r.size, E820_RAM) for r in regions[1:] if r.size)
    return table
