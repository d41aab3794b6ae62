"""The PVH boot ABI: struct hvm_start_info and its memory map.

xen/include/public/arch-x86/hvm/start_info.h (version 1). A PVH kernel is entered in
32-bit protected mode with paging off and EBX holding the physical address of
hvm_start_info; Linux (arch/x86/platform/pvh/enlighten.c) builds its own boot_params
from it: command line, RSDP, memory map, and module 0 as the initrd.

Placement (voidbox.layout): hvm_start_info at PVH_START_INFO_ADDR, the memory map at
PVH_MEMMAP_ADDR (room for PVH_MEMMAP_MAX_ENTRIES), the module list right after it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from ..layout import PVH_MEMMAP_ADDR, PVH_MEMMAP_MAX_ENTRIES, PVH_START_INFO_ADDR, ZERO_PAGE_ADDR
from .e820 import E820Entry

XEN_HVM_START_MAGIC_VALUE = 0x336EC578
HVM_START_INFO_VERSION = 1  # version 1 added memmap_paddr/memmap_entries

# struct hvm_start_info: magic, version, flags, nr_modules, modlist_paddr, cmdline_paddr,
# rsdp_paddr, memmap_paddr, memmap_entries, reserved.
HVM_START_INFO = struct.Struct("<IIIIQQQQII")
# struct hvm_memmap_table_entry: addr, size, type, reserved. The type numbers are the
# e820 ones (XEN_HVM_MEMMAP_TYPE_RAM = 1, ...).
HVM_MEMMAP_TABLE_ENTRY = struct.Struct("<QQII")
# struct hvm_modlist_entry: paddr, size, cmdline_paddr, reserved.
HVM_MODLIST_ENTRY = struct.Struct("<QQQQ")

PVH_MODLIST_ADDR = PVH_MEMMAP_ADDR + PVH_MEMMAP_MAX_ENTRIES * HVM_MEMMAP_TABLE_ENTRY.size
assert PVH_START_INFO_ADDR + HVM_START_INFO.size <= PVH_MEMMAP_ADDR
assert PVH_MODLIST_ADDR + HVM_MODLIST_ENTRY.size <= ZERO_PAGE_ADDR


def build_start_info(
    *, cmdline_addr: int, rsdp_addr: int, memmap_entries: int, initrd: tuple[int, int] | None
) -> bytes:
    """hvm_start_info with the memory map at PVH_MEMMAP_ADDR and the initrd, if any, as module 0."""
    return HVM_START_INFO.pack(
        XEN_HVM_START_MAGIC_VALUE,
        HVM_START_INFO_VERSION,
        0,  # flags: SIF_PRIVILEGED / SIF_INITDOMAIN are Xen dom0 notions
        1 if initrd else 0,
        PVH_MODLIST_ADDR if initrd else 0,
        cmdline_addr,
        rsdp_addr,
        PVH_MEMMAP_ADDR,
        memmap_entries,
        0,
    )


def build_memmap(e820: Iterable[E820Entry]) -> bytes:
    entries = list(e820)
    if len(entries) > PVH_MEMMAP_MAX_ENTRIES:
        raise ValueError(f"{len(entries)} memory map entries, room for {PVH_MEMMAP_MAX_ENTRIES}")
    return b"".join(HVM_MEMMAP_TABLE_ENTRY.pack(e.addr, e.size, e.type, 0) for e in entries)


def build_modlist(initrd: tuple[int, int]) -> bytes:
    gpa, size = initrd
    return HVM_MODLIST_ENTRY.pack(gpa, size, 0, 0)  # 0: the module has no command line


def write_start_info(
    memory, *, cmdline_addr: int, rsdp_addr: int, e820: Iterable[E820Entry],
    initrd: tuple[int, int] | None = None,
) -> None:
    """Write hvm_start_info, its memory map and module list into guest memory."""
    entries = list(e820)
    memory.write(PVH_MEMMAP_ADDR, build_memmap(entries))
    if initrd:
        memory.write(PVH_MODLIST_ADDR, build_modlist(initrd))
    memory.write(
        PVH_START_INFO_ADDR,
        build_start_info(
            cmdline_addr=cmdline_addr, rsdp_addr=rsdp_addr, memmap_entries=len(entries), initrd=initrd
        ),
    )
