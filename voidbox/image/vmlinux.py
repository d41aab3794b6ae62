"""Extract the uncompressed ELF vmlinux from a bzImage.

On a software-only KVM a bzImage spends minutes in its own decompressor, so voidbox boots the
ELF inside it instead (entered through PVH). The x86 boot protocol (Linux
`Documentation/arch/x86/boot.rst`, protocol 2.08+) says where the compressed kernel is:
``payload_offset`` (setup header 0x248) counts from the start of the protected-mode code, which
follows the ``setup_sects`` + 1 real-mode sectors, and ``payload_length`` (0x24c) is its length.
The build (`scripts/Makefile.lib` ``size_append``, read by `arch/x86/boot/compressed/mkpiggy.c`)
ends the payload with the uncompressed length as a 32-bit little-endian number, which we use to
check the result.
"""

from __future__ import annotations

import bz2
import lzma
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass

from voidbox.errors import VoidboxError

# x86 boot protocol, setup header offsets (boot.rst "The real-mode kernel header").
SETUP_SECTS_OFFSET = 0x1F1
SETUP_SECTS_DEFAULT = 4  # "if this field is 0, the real value is 4"
SECTOR_SIZE = 512
HEADER_MAGIC_OFFSET = 0x202
HEADER_MAGIC = b"HdrS"
VERSION_OFFSET = 0x206
PAYLOAD_OFFSET_OFFSET = 0x248
PAYLOAD_LENGTH_OFFSET = 0x24C
PROTOCOL_PAYLOAD_FIELDS = 0x0208  # payload_offset/payload_length appeared in protocol 2.08
SIZE_TRAILER_LEN = 4  # size_append's little-endian uncompressed length

# Compressed payload signatures (lib/decompress.c compressed_formats[]).
GZIP_MAGIC = b"\x1f\x8b"
XZ_MAGIC = b"\xfd7zXZ\x00"
LZMA_MAGIC = b"\x5d\x00\x00"
BZIP2_MAGIC = b"BZh"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
LZO_MAGIC = b"\x89LZO"
LZ4_LEGACY_MAGIC = 0x184C2102  # lib/decompress_unlz4.c ARCHIVE_MAGICNUMBER
LZ4_LEGACY_MAGIC_BYTES = struct.pack("<I", LZ4_LEGACY_MAGIC)
LZ4_LEGACY_BLOCK_SIZE = 8 << 20  # "lz4 -l": legacy frames hold blocks of at most 8 MiB


def lz4_compress_bound(size: int) -> int:
    """LZ4_COMPRESSBOUND from lz4.h: the largest a block of `size` bytes can compress to."""
    return size + size // 255 + 16


LZ4_LEGACY_MAX_CHUNK = lz4_compress_bound(LZ4_LEGACY_BLOCK_SIZE)

# ELF64 (System V gABI, "ELF Header" and "Program Header").
ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
EI_CLASS = 4
ELF64_EHDR_SIZE = 64
ELF64_PHDR_SIZE = 56
ELF64_SHDR_SIZE = 64
PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18  # include/xen/interface/elfnote.h: the PVH entry point
XEN_NOTE_NAME = b"Xen\0"
MAX_UNCOMPRESSED = 1 << 30  # a kernel image larger than this is not one we should load


@dataclass(frozen=True)
class SetupHeader:
    protocol: int  # e.g. 0x020F for 2.15
    setup_sects: int
    payload_offset: int  # absolute, in the bzImage file
    payload_length: int


def parse_setup_header(image: bytes) -> SetupHeader:
    """Read the fields of the setup header that locate the compressed payload."""
    if len(image) < PAYLOAD_LENGTH_OFFSET + 4 or image[
        HEADER_MAGIC_OFFSET:HEADER_MAGIC_OFFSET + len(HEADER_MAGIC)
    ] != HEADER_MAGIC:
        raise VoidboxError("not a bzImage: no 'HdrS' setup header at 0x202")
    (protocol,) = struct.unpack_from("<H", image, VERSION_OFFSET)
    if protocol < PROTOCOL_PAYLOAD_FIELDS:
        raise VoidboxError(
            f"bzImage boot protocol {protocol >> 8}.{protocol & 0xFF:02d} is older than 2.08 "
            "and does not say where its payload is"
        )
    setup_sects = image[SETUP_SECTS_OFFSET] or SETUP_SECTS_DEFAULT
    offset, length = struct.unpack_from("<II", image, PAYLOAD_OFFSET_OFFSET)
    start = (setup_sects + 1) * SECTOR_SIZE + offset
    if length <= SIZE_TRAILER_LEN or start + length > len(image):
        raise VoidboxError(
            f"bzImage payload ({length} bytes at {start:#x}) lies outside the "
            f"{len(image)}-byte file"
        )
    return SetupHeader(protocol, setup_sects, start, length)


def extract_vmlinux(image: bytes) -> bytes:
    """Return the ELF vmlinux inside a bzImage, trimmed to the ELF's own extent.

    Raises VoidboxError naming the compression when it is not one we can undo.
    """
    header = parse_setup_header(image)
    payload = image[header.payload_offset:header.payload_offset + header.payload_length]
    (expected,) = struct.unpack_from("<I", payload, len(payload) - SIZE_TRAILER_LEN)
    if not 0 < expected <= MAX_UNCOMPRESSED:
        raise VoidboxError(f"bzImage payload claims an implausible size of {expected} bytes")
    body = payload[:-SIZE_TRAILER_LEN]
    elf = decompress_payload(body, expected)
    if len(elf) != expected:
        raise VoidboxError(
            f"bzImage payload decompressed to {len(elf)} bytes, its trailer says {expected}"
        )
    return trim_elf(elf)


def decompress_payload(body: bytes, expected: int) -> bytes:
    """Undo the kernel's payload compression (the size trailer already removed)."""
    if body.startswith(LZ4_LEGACY_MAGIC_BYTES):
        return lz4_legacy_decompress(body, expected)
    if body.startswith(GZIP_MAGIC):
        return _bounded(zlib.decompressobj(wbits=16 + zlib.MAX_WBITS), body, expected)
    if body.startswith(XZ_MAGIC):
        return _bounded(lzma.LZMADecompressor(lzma.FORMAT_XZ), body, expected)
    if body.startswith(LZMA_MAGIC):
        return _bounded(lzma.LZMADecompressor(lzma.FORMAT_ALONE), body, expected)
    if body.startswith(BZIP2_MAGIC):
        return _bounded(bz2.BZ2Decompressor(), body, expected)
    if body.startswith(ZSTD_MAGIC):
        return _decompress_with_cli("zstd", ["zstd", "-dcq"], body, expected)
    kind = "LZO" if body.startswith(LZO_MAGIC) else f"unknown (magic {body[:6].hex()})"
    raise VoidboxError(f"cannot extract vmlinux: {kind} kernel compression is not supported")


def lz4_legacy_decompress(body: bytes, limit: int) -> bytes:
    """Decompress an LZ4 legacy stream (lib/decompress_unlz4.c, `lz4 -l`).

    The stream is the magic, then blocks each preceded by a 4-byte little-endian compressed
    size; a magic may recur between blocks (concatenated streams). Each block decompresses to at
    most 8 MiB. The total output is capped at `limit`.
    """
    try:
        import lz4.block
    except ImportError:
        return _decompress_with_cli("lz4", ["lz4", "-dcq"], body, limit)
    out = bytearray()
    pos = 0
    end = len(body)
    while pos < end:
        if end - pos < 4:
            raise VoidboxError(f"LZ4 stream has {end - pos} stray bytes at its end")
        (size,) = struct.unpack_from("<I", body, pos)
        pos += 4
        if size == LZ4_LEGACY_MAGIC:
            continue
        if size == 0 or size > LZ4_LEGACY_MAX_CHUNK or size > end - pos:
            raise VoidboxError(f"LZ4 block of {size} bytes at offset {pos - 4} is invalid")
        try:
            block = lz4.block.decompress(
                body[pos:pos + size], uncompressed_size=LZ4_LEGACY_BLOCK_SIZE
            )
        except lz4.block.LZ4BlockError as exc:
            raise VoidboxError(f"LZ4 block at offset {pos - 4} is corrupt: {exc}") from None
        pos += size
        out += block
        if len(out) > limit:
            raise VoidboxError(f"LZ4 stream decompresses past its declared {limit} bytes")
    return bytes(out)


def _bounded(decompressor, body: bytes, limit: int) -> bytes:
    """Run a stdlib decompressor with an output cap, so a bad payload cannot exhaust memory."""
    try:
        out = decompressor.decompress(body, limit + 1)
    except (zlib.error, lzma.LZMAError, OSError, EOFError) as exc:
        raise VoidboxError(f"kernel payload is corrupt: {exc}") from None
    if len(out) > limit:
        raise VoidboxError(f"kernel payload decompresses past its declared {limit} bytes")
    return out


def _decompress_with_cli(tool: str, argv: list[str], body: bytes, limit: int) -> bytes:
    if shutil.which(tool) is None:
        raise VoidboxError(
            f"cannot extract vmlinux: the kernel is {tool}-compressed and the `{tool}` "
            "command is not installed"
        )
    result = subprocess.run(argv, input=body, capture_output=True, check=False)
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip().splitlines()
        raise VoidboxError(f"{tool} failed on the kernel payload: {message[-1:]}")
    if len(result.stdout) > limit:
        raise VoidboxError(f"kernel payload decompresses past its declared {limit} bytes")
    return result.stdout


def trim_elf(data: bytes) -> bytes:
    """Check `data` is an ELF64 file and cut what follows it.

    A relocatable kernel's payload is vmlinux.bin followed by its relocation table
    (arch/x86/boot/compressed/Makefile); the relocations belong to the decompressor, not to
    the ELF.
    """
    if not data.startswith(ELF_MAGIC):
        raise VoidboxError("the decompressed kernel is not an ELF file")
    if len(data) < ELF64_EHDR_SIZE or data[EI_CLASS] != ELFCLASS64:
        raise VoidboxError("the decompressed kernel is not a 64-bit ELF file")
    phoff, shoff = struct.unpack_from("<QQ", data, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 0x36)
    extent = ELF64_EHDR_SIZE
    for offset, entsize, count, minimum in (
        (phoff, phentsize, phnum, ELF64_PHDR_SIZE),
        (shoff, shentsize, shnum, ELF64_SHDR_SIZE),
    ):
        if count and entsize < minimum:
            raise VoidboxError("vmlinux has malformed ELF header tables")
        extent = max(extent, offset + entsize * count)
    for index in range(phnum):
        base = phoff + index * phentsize
        if base + ELF64_PHDR_SIZE > len(data):
            raise VoidboxError("vmlinux program headers run past the end of the file")
        p_offset, = struct.unpack_from("<Q", data, base + 8)
        p_filesz, = struct.unpack_from("<Q", data, base + 0x20)
        extent = max(extent, p_offset + p_filesz)
    if extent > len(data):
        raise VoidboxError(f"vmlinux is truncated: its headers need {extent} bytes")
    return data[:extent]


def pvh_entry(elf: bytes) -> int | None:
    """The PVH entry point from the XEN_ELFNOTE_PHYS32_ENTRY note, or None without one.

    Xen's `include/public/elfnote.h`; Linux emits it from arch/x86/platform/pvh/head.S.
    """
    if len(elf) < ELF64_EHDR_SIZE or not elf.startswith(ELF_MAGIC):
        return None
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for index in range(phnum):
        base = phoff + index * phentsize
        if phentsize < ELF64_PHDR_SIZE or base + ELF64_PHDR_SIZE > len(elf):
            return None
        p_type, = struct.unpack_from("<I", elf, base)
        if p_type != PT_NOTE:
            continue
        p_offset, = struct.unpack_from("<Q", elf, base + 8)
        p_filesz, = struct.unpack_from("<Q", elf, base + 0x20)
        pos, end = p_offset, min(p_offset + p_filesz, len(elf))
        while pos + 12 <= end:  # Elf64_Nhdr: namesz, descsz, type (4 bytes each)
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name_at = pos + 12
            desc_at = name_at + ((namesz + 3) & ~3)
            pos = desc_at + ((descsz + 3) & ~3)
            if pos > end:
                break
            if (ntype == XEN_ELFNOTE_PHYS32_ENTRY and elf[name_at:name_at + namesz] == XEN_NOTE_NAME
                    and descsz >= 4):
                return struct.unpack_from("<I", elf, desc_at)[0]
    return None
