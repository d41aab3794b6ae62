"""bzImage setup-header parsing (voidbox.boot.bzimage) on synthetic images."""

import struct

import pytest

from voidbox.boot import bootparams as bp
from voidbox.boot import bzimage
from voidbox.errors import UsageError

PAYLOAD = b"\x90" * 0x200 + b"STARTUP_64" + b"\xcc" * 0x1000


def make_bzimage(
    *,
    version=0x020F,
    setup_sects=4,
    loadflags=bp.LOADED_HIGH,
    xloadflags=bp.XLF_KERNEL_64 | bp.XLF_CAN_BE_LOADED_ABOVE_4G,
    relocatable=1,
    kernel_alignment=0x200000,
    code32_start=0x100000,
    initrd_addr_max=0x7FFFFFFF,
    cmdline_size=2047,
    init_size=0x200000,
    header_end=bp.SETUP_HEADER_END,
    payload=PAYLOAD,
) -> bytes:
    """A bzImage: setup sectors holding a setup header, then the protected-mode payload."""
    setup = bytearray(((setup_sects or bzimage.DEFAULT_SETUP_SECTS) + 1) * bzimage.SECTOR_SIZE)
    put = struct.pack_into
    put("<B", setup, bp.SETUP_SECTS, setup_sects)
    put("<H", setup, bp.BOOT_FLAG, bp.BOOT_FLAG_MAGIC)
    put("<BB", setup, bp.JUMP, 0xEB, header_end - (bp.JUMP + 2))
    setup[bp.HEADER : bp.HEADER + 4] = bp.HEADER_MAGIC
    put("<H", setup, bp.VERSION, version)
    put("<B", setup, bp.LOADFLAGS, loadflags)
    put("<I", setup, bp.CODE32_START, code32_start)
    put("<I", setup, bp.INITRD_ADDR_MAX, initrd_addr_max)
    put("<I", setup, bp.KERNEL_ALIGNMENT, kernel_alignment)
    put("<B", setup, bp.RELOCATABLE_KERNEL, relocatable)
    put("<H", setup, bp.XLOADFLAGS, xloadflags)
    put("<I", setup, bp.CMDLINE_SIZE, cmdline_size)
    put("<Q", setup, bp.PREF_ADDRESS, 0x1000000)
    put("<I", setup, bp.INIT_SIZE, init_size)
    setup[0x260 + 8 : 0x260 + 12] = b"TAIL"  # kernel_info_offset: proves the copy reaches the end
    return bytes(setup) + payload


def parse(data: bytes) -> bzimage.BzImage:
    return bzimage.parse_bzimage(data[: bzimage.HEADER_READ_SIZE], len(data), "bzImage")


def test_parse_fields():
    data = make_bzimage()
    img = parse(data)
    assert img.version == 0x020F
    assert img.payload_offset == 5 * 512
    assert img.payload_size == len(PAYLOAD)
    assert img.xloadflags & bp.XLF_KERNEL_64
    assert img.relocatable and img.kernel_alignment == 0x200000
    assert img.cmdline_size == 2047
    assert img.initrd_addr_max == 0x7FFFFFFF
    assert img.init_size == 0x200000
    assert img.memory_size() == 0x200000
    assert img.setup_header == data[0x1F1 : bp.SETUP_HEADER_END]
    assert img.setup_header.endswith(b"TAIL")


def test_setup_sects_zero_means_four():
    img = parse(make_bzimage(setup_sects=0))
    assert img.payload_offset == (bzimage.DEFAULT_SETUP_SECTS + 1) * 512


def test_header_copy_stops_at_declared_end():
    # A 2.10-era header ends after init_size (0x264): later bytes are not header.
    img = parse(make_bzimage(header_end=0x264))
    assert len(img.setup_header) == 0x264 - 0x1F1


def test_load_address_relocatable_is_aligned():
    img = parse(make_bzimage(kernel_alignment=0x400000 << 4))
    assert img.load_address(0x1000000) == 0x4000000
    assert parse(make_bzimage()).load_address(0x1000000) == 0x1000000


def test_load_address_fixed_kernel_uses_code32_start():
    img = parse(make_bzimage(relocatable=0, code32_start=0x100000))
    assert img.load_address(0x1000000) == 0x100000


def test_defaults_for_zero_fields():
    img = parse(make_bzimage(initrd_addr_max=0, cmdline_size=0))
    assert img.initrd_addr_max == bzimage.DEFAULT_INITRD_ADDR_MAX
    assert img.cmdline_size == bzimage.DEFAULT_CMDLINE_SIZE


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"version": 0x0205}, "boot protocol 2.05"),
        ({"xloadflags": 0}, "XLF_KERNEL_64"),
        ({"loadflags": 0}, "zImage"),
        ({"kernel_alignment": 0x300000}, "kernel_alignment"),
        ({"kernel_alignment": 0}, "kernel_alignment"),
        ({"header_end": 0x230}, "setup header length"),
        ({"header_end": 0x2F0}, "setup header length"),
        ({"payload": b""}, "truncated"),
    ],
)
def test_bad_images(kwargs, message):
    with pytest.raises(UsageError, match=message):
        parse(make_bzimage(**kwargs))


def test_truncated_header():
    data = make_bzimage()
    with pytest.raises(UsageError, match="truncated"):
        bzimage.parse_bzimage(data[:0x220], 0x220, "bzImage")


def test_is_bzimage():
    assert bzimage.is_bzimage(make_bzimage())
    assert not bzimage.is_bzimage(b"\0" * 0x300)
    assert not bzimage.is_bzimage(b"HdrS")
