"""vmlinux extraction from synthetic bzImages (LZ4 legacy, gzip, xz payloads)."""

import gzip
import lzma
import struct

import lz4.block
import pytest

from voidbox.errors import VoidboxError
from voidbox.image import vmlinux

SETUP_SECTS = 4
PVH_ENTRY = 0x1000850


def fake_elf(body_size: int = 50_000) -> bytes:
    """An ELF64 header, one PT_NOTE holding a Xen PHYS32_ENTRY note, one PT_LOAD."""
    note = struct.pack("<III", 4, 4, vmlinux.XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0"
    note += struct.pack("<I", PVH_ENTRY)
    phoff = 64
    note_off = phoff + 2 * 56
    load_off = note_off + len(note)
    body = bytes((i * 7 + i // 251) & 0xFF for i in range(body_size))
    ehdr = bytearray(64)
    ehdr[0:4] = b"\x7fELF"
    ehdr[4] = 2  # ELFCLASS64
    ehdr[5] = 1  # little-endian
    struct.pack_into("<QQ", ehdr, 0x20, phoff, 0)  # e_phoff, e_shoff (no sections)
    struct.pack_into("<HHHH", ehdr, 0x36, 56, 2, 64, 0)
    phdrs = struct.pack("<IIQQQQQQ", 4, 0, note_off, 0, 0, len(note), len(note), 4)
    phdrs += struct.pack("<IIQQQQQQ", 1, 5, load_off, 0x1000000, 0x1000000, len(body),
                         len(body), 0x200000)
    return bytes(ehdr) + phdrs + note + body


def lz4_legacy(data: bytes, block: int = vmlinux.LZ4_LEGACY_BLOCK_SIZE,
               magic_every: int = 0) -> bytes:
    out = bytearray(vmlinux.LZ4_LEGACY_MAGIC_BYTES)
    for index, start in enumerate(range(0, len(data), block)):
        if magic_every and index and index % magic_every == 0:
            out += vmlinux.LZ4_LEGACY_MAGIC_BYTES  # concatenated streams
        chunk = lz4.block.compress(data[start:start + block], store_size=False)
        out += struct.pack("<I", len(chunk)) + chunk
    return bytes(out)


def bzimage(compressed: bytes, uncompressed_len: int, *, protocol: int = 0x020F,
            trailer: int | None = None) -> bytes:
    """A file with a setup header pointing at `compressed` + size trailer (mkpiggy layout)."""
    setup = bytearray((SETUP_SECTS + 1) * 512)
    setup[0x1F1] = SETUP_SECTS
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, protocol)
    payload = compressed + struct.pack("<I", uncompressed_len if trailer is None else trailer)
    header_gap = 0x300  # the decompressor's own code sits before the payload
    struct.pack_into("<II", setup, 0x248, header_gap, len(payload))
    return bytes(setup) + b"\x90" * header_gap + payload + b"\0" * 64


def test_lz4_legacy_payload_gives_trimmed_elf():
    elf = fake_elf()
    relocs = b"R" * 4096  # the decompressor's relocation table follows vmlinux.bin
    image = bzimage(lz4_legacy(elf + relocs, block=16384, magic_every=2), len(elf) + len(relocs))
    out = vmlinux.extract_vmlinux(image)
    assert out == elf
    assert vmlinux.pvh_entry(out) == PVH_ENTRY


def test_setup_header_fields():
    image = bzimage(b"\x02\x21\x4c\x18", 4)
    header = vmlinux.parse_setup_header(image)
    assert header.protocol == 0x020F
    assert header.setup_sects == SETUP_SECTS
    assert header.payload_offset == (SETUP_SECTS + 1) * 512 + 0x300
    assert header.payload_length == 8


def test_setup_sects_zero_means_four():
    image = bytearray(bzimage(b"\x1f\x8b", 4))
    image[0x1F1] = 0
    assert vmlinux.parse_setup_header(bytes(image)).setup_sects == 4


@pytest.mark.parametrize("compress", [
    lambda d: gzip.compress(d, mtime=0),
    lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
    lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),
], ids=["gzip", "xz", "lzma"])
def test_stdlib_payloads(compress):
    elf = fake_elf()
    assert vmlinux.extract_vmlinux(bzimage(compress(elf), len(elf))) == elf


def test_trailer_mismatch_is_an_error():
    elf = fake_elf()
    with pytest.raises(VoidboxError, match="trailer says"):
        vmlinux.extract_vmlinux(bzimage(lz4_legacy(elf), len(elf) + 100))


def test_output_larger_than_trailer_is_refused():
    elf = fake_elf()
    with pytest.raises(VoidboxError, match="past its declared"):
        vmlinux.extract_vmlinux(bzimage(lz4_legacy(elf, block=4096), 5000))


def test_bad_lz4_block_size():
    bad = vmlinux.LZ4_LEGACY_MAGIC_BYTES + struct.pack("<I", 1 << 30) + b"x" * 16
    with pytest.raises(VoidboxError, match="LZ4 block"):
        vmlinux.extract_vmlinux(bzimage(bad, 100))


def test_corrupt_lz4_block():
    bad = vmlinux.LZ4_LEGACY_MAGIC_BYTES + struct.pack("<I", 8) + b"\xff" * 8
    with pytest.raises(VoidboxError, match="corrupt"):
        vmlinux.extract_vmlinux(bzimage(bad, 100))


def test_not_a_bzimage():
    with pytest.raises(VoidboxError, match="HdrS"):
        vmlinux.extract_vmlinux(b"\0" * 4096)


def test_old_protocol():
    with pytest.raises(VoidboxError, match="older than 2.08"):
        vmlinux.extract_vmlinux(bzimage(b"\x1f\x8b", 4, protocol=0x0206))


def test_payload_outside_file():
    image = bytearray(bzimage(b"\x1f\x8b", 4))
    struct.pack_into("<I", image, 0x24C, 1 << 24)
    with pytest.raises(VoidboxError, match="outside"):
        vmlinux.extract_vmlinux(bytes(image))


def test_unknown_compression():
    with pytest.raises(VoidboxError, match="not supported"):
        vmlinux.extract_vmlinux(bzimage(b"\x89LZO\0\0\0\0", 100))


def test_payload_that_is_not_elf():
    data = b"not an elf" * 100
    with pytest.raises(VoidboxError, match="not an ELF"):
        vmlinux.extract_vmlinux(bzimage(lz4_legacy(data), len(data)))


def test_truncated_elf():
    elf = fake_elf()[:2000]  # PT_LOAD claims 50,000 bytes
    with pytest.raises(VoidboxError, match="truncated"):
        vmlinux.extract_vmlinux(bzimage(lz4_legacy(elf), len(elf)))


def test_pvh_entry_absent():
    elf = bytearray(fake_elf())
    struct.pack_into("<I", elf, 64, 1)  # the PT_NOTE becomes a PT_LOAD
    assert vmlinux.pvh_entry(bytes(elf)) is None
