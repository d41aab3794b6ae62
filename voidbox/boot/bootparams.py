"""struct boot_params, the "zero page" of the Linux x86 boot protocol.

Offsets are named as the fields of arch/x86/include/uapi/asm/bootparam.h and
Documentation/arch/x86/zero-page.rst; the setup header (struct setup_header, at
0x1f1 both in a bzImage file and in boot_params) is described in
Documentation/arch/x86/boot.rst, "The Real-Mode Kernel Header". All fields are
little-endian.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from .e820 import E820_MAX_ENTRIES_ZEROPAGE, E820Entry

BOOT_PARAMS_SIZE = 0x1000

# struct boot_params (zero-page.rst).
ACPI_RSDP_ADDR = 0x070  # u64, protocol 2.14 field but read by every 64-bit kernel
EXT_RAMDISK_IMAGE = 0x0C0  # u32: ramdisk_image >> 32
EXT_RAMDISK_SIZE = 0x0C4  # u32: ramdisk_size >> 32
EXT_CMD_LINE_PTR = 0x0C8  # u32: cmd_line_ptr >> 32
E820_ENTRIES = 0x1E8  # u8
SENTINEL = 0x1EF  # u8: must stay 0 or the kernel wipes fields it thinks are stale
SETUP_HEADER = 0x1F1  # struct setup_header starts here
E820_TABLE = 0x2D0  # struct boot_e820_entry[E820_MAX_ENTRIES_ZEROPAGE]
E820_ENTRY_FORMAT = "<QQI"  # addr, size, type (packed, 20 bytes)
E820_ENTRY_SIZE = struct.calcsize(E820_ENTRY_FORMAT)

# struct setup_header fields, as offsets in boot_params (boot.rst).
SETUP_SECTS = 0x1F1  # u8
BOOT_FLAG = 0x1FE  # u16
JUMP = 0x200  # u16; its second byte is the header length past 0x202
HEADER = 0x202  # u32 "HdrS"
VERSION = 0x206  # u16
TYPE_OF_LOADER = 0x210  # u8
LOADFLAGS = 0x211  # u8
CODE32_START = 0x214  # u32
RAMDISK_IMAGE = 0x218  # u32
RAMDISK_SIZE = 0x21C  # u32
HEAP_END_PTR = 0x224  # u16
CMD_LINE_PTR = 0x228  # u32
INITRD_ADDR_MAX = 0x22C  # u32 (2.03+)
KERNEL_ALIGNMENT = 0x230  # u32 (2.05+)
RELOCATABLE_KERNEL = 0x234  # u8 (2.05+)
XLOADFLAGS = 0x236  # u16 (2.12+)
CMDLINE_SIZE = 0x238  # u32 (2.06+)
PREF_ADDRESS = 0x258  # u64 (2.10+)
INIT_SIZE = 0x260  # u32 (2.10+)
SETUP_HEADER_END = 0x26C  # end of the fields this module knows (kernel_info_offset, 2.15)
EDD_MBR_SIG_BUFFER = 0x290  # first boot_params field after the room reserved for the header

BOOT_FLAG_MAGIC = 0xAA55
HEADER_MAGIC = b"HdrS"
TYPE_OF_LOADER_UNDEFINED = 0xFF  # boot.rst: "0xFF: no boot loader ID assigned"

# loadflags (boot.rst).
LOADED_HIGH = 0x01
KASLR_FLAG = 0x02
QUIET_FLAG = 0x20
KEEP_SEGMENTS = 0x40
CAN_USE_HEAP = 0x80

# xloadflags (boot.rst, protocol 2.12).
XLF_KERNEL_64 = 0x01
XLF_CAN_BE_LOADED_ABOVE_4G = 0x02

# Values a boot loader writes (boot.rst, "Sample Boot Configuration"): the heap ends
# 0x200 below the 0x10000-byte real-mode segment; unused by the 64-bit entry but read
# by kernels that check CAN_USE_HEAP.
HEAP_END_PTR_VALUE = 0xFE00

# The header voidbox synthesizes for ELF kernels, which carry none.
SYNTHETIC_VERSION = 0x020F
SYNTHETIC_KERNEL_ALIGNMENT = 0x200000  # CONFIG_PHYSICAL_ALIGN default (2 MiB)

_U8, _U16, _U32, _U64 = "<B", "<H", "<I", "<Q"


def _put(page: bytearray, fmt: str, offset: int, value: int) -> None:
    struct.pack_into(fmt, page, offset, value)


def get(page: bytes | bytearray, fmt: str, offset: int) -> int:
    """Read one little-endian field (`fmt` is "<B", "<H", "<I" or "<Q")."""
    return struct.unpack_from(fmt, page, offset)[0]


def build_boot_params(
    *,
    setup_header: bytes | None,
    cmdline_addr: int,
    cmdline_size: int,
    e820: Iterable[E820Entry],
    initrd: tuple[int, int] | None = None,
    rsdp_addr: int = 0,
    code32_start: int = 0,
) -> bytearray:
    """Build the 4 KiB zero page for the 64-bit boot protocol (boot.rst §"64-bit BOOT PROTOCOL").

    `setup_header` is the bzImage's header bytes from file offset 0x1f1 up to the end
    the image declares (0x202 + byte at 0x201); None synthesizes a header for an ELF
    kernel; a copied header keeps the kernel's own fields (cmdline_size, xloadflags,
    init_size, ...) and gets the loader's (type_of_loader, loadflags, heap_end_ptr,
    cmd_line_ptr, ramdisk_*). `cmdline_size` (the longest command line, excluding the
    NUL) goes only into a synthesized header. Returns the page; the caller writes it at
    ZERO_PAGE_ADDR.
    """
    page = bytearray(BOOT_PARAMS_SIZE)
    if setup_header is not None:
        if len(setup_header) > BOOT_PARAMS_SIZE - SETUP_HEADER:
            raise ValueError("setup header longer than the zero page")
        page[SETUP_HEADER : SETUP_HEADER + len(setup_header)] = setup_header
    else:
        _put(page, _U16, BOOT_FLAG, BOOT_FLAG_MAGIC)
        page[HEADER : HEADER + 4] = HEADER_MAGIC
        _put(page, _U16, VERSION, SYNTHETIC_VERSION)
        _put(page, _U32, KERNEL_ALIGNMENT, SYNTHETIC_KERNEL_ALIGNMENT)
        _put(page, _U32, CMDLINE_SIZE, cmdline_size)
        _put(page, _U8, LOADFLAGS, LOADED_HIGH)
    _put(page, _U8, TYPE_OF_LOADER, TYPE_OF_LOADER_UNDEFINED)
    _put(page, _U8, LOADFLAGS, get(page, _U8, LOADFLAGS) | LOADED_HIGH | CAN_USE_HEAP)
    _put(page, _U16, HEAP_END_PTR, HEAP_END_PTR_VALUE)
    if code32_start:
        _put(page, _U32, CODE32_START, code32_start)
    _put(page, _U32, CMD_LINE_PTR, cmdline_addr & 0xFFFFFFFF)
    _put(page, _U32, EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    if initrd is not None:
        gpa, size = initrd
        _put(page, _U32, RAMDISK_IMAGE, gpa & 0xFFFFFFFF)
        _put(page, _U32, RAMDISK_SIZE, size & 0xFFFFFFFF)
        _put(page, _U32, EXT_RAMDISK_IMAGE, gpa >> 32)
        _put(page, _U32, EXT_RAMDISK_SIZE, size >> 32)
    else:
        _put(page, _U32, RAMDISK_IMAGE, 0)
        _put(page, _U32, RAMDISK_SIZE, 0)
    _put(page, _U64, ACPI_RSDP_ADDR, rsdp_addr)

    entries = list(e820)
    if len(entries) > E820_MAX_ENTRIES_ZEROPAGE:
        raise ValueError(f"{len(entries)} e820 entries, the zero page holds {E820_MAX_ENTRIES_ZEROPAGE}")
    _put(page, _U8, E820_ENTRIES, len(entries))
    for i, entry in enumerate(entries):
        struct.pack_into(
            E820_ENTRY_FORMAT, page, E820_TABLE + i * E820_ENTRY_SIZE, entry.addr, entry.size, entry.type
        )
    return page
