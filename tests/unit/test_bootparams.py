"""The zero page (voidbox.boot.bootparams): bytes at the offsets bootparam.h documents."""

import struct

import pytest

from voidbox.boot import bootparams as bp
from voidbox.boot.e820 import E820_RAM, E820_RESERVED, E820Entry

E820 = [E820Entry(0, 0x9FC00, E820_RAM), E820Entry(0x9FC00, 0x60400, E820_RESERVED),
        E820Entry(0x100000, 0x3F00000, E820_RAM)]


def u(page, fmt, offset):
    return struct.unpack_from(fmt, page, offset)[0]


def test_documented_offsets():
    # Spelled out once from zero-page.rst / boot.rst, so a typo in a constant fails here.
    assert (bp.ACPI_RSDP_ADDR, bp.E820_ENTRIES, bp.SENTINEL, bp.SETUP_HEADER, bp.E820_TABLE) == (
        0x070, 0x1E8, 0x1EF, 0x1F1, 0x2D0)
    assert (bp.BOOT_FLAG, bp.HEADER, bp.VERSION, bp.TYPE_OF_LOADER, bp.LOADFLAGS) == (
        0x1FE, 0x202, 0x206, 0x210, 0x211)
    assert (bp.RAMDISK_IMAGE, bp.RAMDISK_SIZE, bp.HEAP_END_PTR, bp.CMD_LINE_PTR) == (
        0x218, 0x21C, 0x224, 0x228)
    assert (bp.INITRD_ADDR_MAX, bp.KERNEL_ALIGNMENT, bp.XLOADFLAGS, bp.CMDLINE_SIZE) == (
        0x22C, 0x230, 0x236, 0x238)
    assert bp.E820_ENTRY_SIZE == 20


def test_synthesized_header_for_elf():
    page = bp.build_boot_params(
        setup_header=None, cmdline_addr=0x20000, cmdline_size=0xFFFF, e820=E820,
        initrd=(0x3000000, 0x12345), rsdp_addr=0xE0000, code32_start=0x1000000,
    )
    assert len(page) == 4096
    assert u(page, "<H", 0x1FE) == 0xAA55
    assert page[0x202:0x206] == b"HdrS"
    assert u(page, "<H", 0x206) == 0x020F
    assert page[0x210] == 0xFF
    assert page[0x211] == bp.LOADED_HIGH | bp.CAN_USE_HEAP
    assert u(page, "<I", 0x214) == 0x1000000
    assert u(page, "<I", 0x218) == 0x3000000
    assert u(page, "<I", 0x21C) == 0x12345
    assert u(page, "<H", 0x224) == 0xFE00
    assert u(page, "<I", 0x228) == 0x20000
    assert u(page, "<I", 0x230) == 0x200000
    assert u(page, "<I", 0x238) == 0xFFFF
    assert u(page, "<Q", 0x070) == 0xE0000
    assert page[0x1EF] == 0  # sentinel
    assert page[0x1E8] == 3
    for i, entry in enumerate(E820):
        assert struct.unpack_from("<QQI", page, 0x2D0 + 20 * i) == tuple(entry)
    assert page[0x2D0 + 60 : 0x2D0 + 80] == bytes(20)


def test_copied_header_keeps_kernel_fields_and_sets_loader_fields():
    header = bytearray(0x26C - 0x1F1)

    def put(fmt, offset, value):
        struct.pack_into(fmt, header, offset - 0x1F1, value)

    put("<B", 0x1F1, 27)  # setup_sects
    put("<I", 0x202, int.from_bytes(b"HdrS", "little"))
    put("<H", 0x206, 0x020F)
    put("<B", 0x211, bp.LOADED_HIGH | bp.KASLR_FLAG)
    put("<H", 0x236, 0x7F)  # xloadflags
    put("<I", 0x238, 2047)  # cmdline_size
    put("<I", 0x260, 0x2DE0000)  # init_size
    page = bp.build_boot_params(setup_header=bytes(header), cmdline_addr=0x20000, cmdline_size=2047,
                                e820=E820, code32_start=0x1000000)
    assert page[0x1F1] == 27
    assert u(page, "<H", 0x236) == 0x7F
    assert u(page, "<I", 0x238) == 2047
    assert u(page, "<I", 0x260) == 0x2DE0000
    assert page[0x211] == bp.LOADED_HIGH | bp.KASLR_FLAG | bp.CAN_USE_HEAP
    assert page[0x210] == 0xFF
    assert u(page, "<I", 0x228) == 0x20000
    assert u(page, "<I", 0x218) == 0 and u(page, "<I", 0x21C) == 0
    assert u(page, "<Q", 0x070) == 0
    assert u(page, "<I", 0x214) == 0x1000000


def test_initrd_and_cmdline_above_4gib_use_ext_fields():
    page = bp.build_boot_params(setup_header=None, cmdline_addr=0x1_0002_0000, cmdline_size=100,
                                e820=E820, initrd=(0x1_2000_0000, 0x1000))
    assert u(page, "<I", 0x228) == 0x20000 and u(page, "<I", 0x0C8) == 1
    assert u(page, "<I", 0x218) == 0x20000000 and u(page, "<I", 0x0C0) == 1
    assert u(page, "<I", 0x0C4) == 0


def test_too_many_e820_entries():
    with pytest.raises(ValueError, match="e820"):
        bp.build_boot_params(setup_header=None, cmdline_addr=0, cmdline_size=0,
                             e820=[E820Entry(i << 20, 1 << 20, E820_RAM) for i in range(129)])


def test_128_e820_entries_fit():
    page = bp.build_boot_params(setup_header=None, cmdline_addr=0, cmdline_size=0,
                                e820=[E820Entry(i << 20, 1 << 20, E820_RAM) for i in range(128)])
    assert page[0x1E8] == 128
    assert struct.unpack_from("<QQI", page, 0x2D0 + 127 * 20) == (127 << 20, 1 << 20, E820_RAM)
