"""A small AML encoder: pure functions that return the bytes of AML terms.

Enough of the ACPI Machine Language to write a micro-VM's DSDT: names, integers,
strings, packages, buffers, scopes, devices, methods that return a value, and the
resource descriptors a `_CRS` ResourceTemplate needs. Every function returns `bytes`
and composes by concatenation:

    >>> device("VR00", name("_HID", string("LNRO0005")))[:2].hex()
    '5b82'

References (ACPI 6.5): §20.2 AML grammar (§20.2.2 names, §20.2.3 data objects,
§20.2.4 PkgLength, §20.2.5 term objects), §6.4 resource data types, §19.6 EISAID.
"""

from __future__ import annotations

import re

# --- AML opcodes and prefixes (ACPI 6.5 §20.2, §20.3 "AML byte stream byte values") ----

ZeroOp = 0x00
OneOp = 0x01
NameOp = 0x08
BytePrefix = 0x0A
WordPrefix = 0x0B
DWordPrefix = 0x0C
StringPrefix = 0x0D
QWordPrefix = 0x0E
ScopeOp = 0x10
BufferOp = 0x11
PackageOp = 0x12
MethodOp = 0x14
DualNamePrefix = 0x2E
MultiNamePrefix = 0x2F
ExtOpPrefix = 0x5B
DeviceOp = 0x82  # after ExtOpPrefix
RootChar = 0x5C  # '\'
ParentPrefixChar = 0x5E  # '^'
ReturnOp = 0xA4
NullName = 0x00

# --- limits --------------------------------------------------------------------------

NAME_SEG_LEN = 4
# PkgLength: one lead byte holds 6 bits; with 1..3 follow bytes it holds 4 bits plus 8 per
# follow byte (§20.2.4), so the largest encodable value is 28 bits.
PKG_LENGTH_1_BYTE_MAX = (1 << 6) - 1
PKG_LENGTH_MAX = (1 << 28) - 1
PACKAGE_MAX_ELEMENTS = 255  # NumElements is a ByteData (§20.2.5.4 DefPackage)
METHOD_MAX_ARGS = 7  # MethodFlags bits 0-2 (§20.2.5.2 DefMethod)
METHOD_MAX_SYNC_LEVEL = 15  # MethodFlags bits 4-7
METHOD_FLAG_SERIALIZED = 1 << 3
METHOD_SYNC_LEVEL_SHIFT = 4

_LEAD_NAME_CHAR = re.compile(r"[A-Z_]")
_NAME_CHARS = re.compile(r"[A-Z0-9_]{1,4}")

# --- resource data (ACPI 6.5 §6.4) -----------------------------------------------------

# Small resource items: tag byte = (item name << 3) | length of the data that follows.
SMALL_IRQ_NAME = 0x04  # §6.4.2.1 IRQ descriptor
SMALL_IO_NAME = 0x08  # §6.4.2.5 I/O port descriptor
SMALL_END_TAG_NAME = 0x0F  # §6.4.2.9 End tag
IRQ_NO_FLAGS_LEN = 2  # mask only: edge-triggered, active-high, exclusive
IO_DESCRIPTOR_LEN = 7
END_TAG_LEN = 1
IO_DECODE16 = 1 << 0  # Information bit 0: the device decodes 16 address bits
ISA_IRQ_COUNT = 16  # the small IRQ descriptor's 16-bit mask

# Large resource items: tag byte = 0x80 | item name, then a 16-bit length.
LARGE_ITEM = 0x80
LARGE_MEMORY32_FIXED_NAME = 0x06  # §6.4.3.4 32-bit fixed memory range
LARGE_EXTENDED_IRQ_NAME = 0x09  # §6.4.3.6 Extended interrupt descriptor
MEMORY32_FIXED_LEN = 9
MEMORY32_READ_WRITE = 1 << 0
# Extended interrupt "Interrupt Vector Flags" (§6.4.3.6, Table 6.49).
EXT_IRQ_CONSUMER = 1 << 0  # ResourceConsumer (0 = ResourceProducer)
EXT_IRQ_EDGE = 1 << 1  # Edge (0 = Level)
EXT_IRQ_ACTIVE_LOW = 1 << 2  # ActiveLow (0 = ActiveHigh)
EXT_IRQ_SHARED = 1 << 3  # Shared (0 = Exclusive)
EXT_IRQ_WAKE_CAPABLE = 1 << 4
EXT_IRQ_MAX_COUNT = 255  # Interrupt Table Length is one byte

U8_MAX = 0xFF
U16_MAX = 0xFFFF
U32_MAX = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF


# --- names (§20.2.2) -------------------------------------------------------------------


def name_seg(seg: str) -> bytes:
    """A NameSeg: 1-4 characters [A-Z_][A-Z0-9_]*, padded with '_' to four bytes."""
    if not _NAME_CHARS.fullmatch(seg) or not _LEAD_NAME_CHAR.match(seg):
        raise ValueError(f"invalid AML NameSeg {seg!r}")
    return seg.ljust(NAME_SEG_LEN, "_").encode("ascii")


def name_string(path: str) -> bytes:
    r"""A NameString: optional '\' or '^'s, then NameSegs separated by '.'.

    One segment is a bare NameSeg, two use DualNamePrefix, more use MultiNamePrefix;
    a bare prefix (e.g. '\') is followed by NullName.
    """
    prefix = bytearray()
    rest = path
    if rest.startswith("\\"):
        prefix.append(RootChar)
        rest = rest[1:]
    else:
        while rest.startswith("^"):
            prefix.append(ParentPrefixChar)
            rest = rest[1:]
    segs = rest.split(".") if rest else []
    encoded = b"".join(name_seg(seg) for seg in segs)
    if not segs:
        if not prefix:
            raise ValueError("empty AML NameString")
        return bytes(prefix) + bytes([NullName])
    if len(segs) == 1:
        return bytes(prefix) + encoded
    if len(segs) == 2:
        return bytes(prefix) + bytes([DualNamePrefix]) + encoded
    if len(segs) > U8_MAX:
        raise ValueError(f"AML NameString {path!r} has more than {U8_MAX} segments")
    return bytes(prefix) + bytes([MultiNamePrefix, len(segs)]) + encoded


# --- package length (§20.2.4) ----------------------------------------------------------


def pkg_length(length: int) -> bytes:
    """The PkgLength encoding of `length` (which must already count these bytes).

    Values up to 63 fit the lead byte. Otherwise bits 7-6 of the lead byte give the
    number of follow bytes (1-3), bits 3-0 hold the low nibble and each follow byte
    the next 8 bits, least significant first.
    """
    if length < 0 or length > PKG_LENGTH_MAX:
        raise ValueError(f"AML PkgLength {length} out of range 0..{PKG_LENGTH_MAX}")
    if length <= PKG_LENGTH_1_BYTE_MAX:
        return bytes([length])
    follow = 1
    while length >= 1 << (4 + 8 * follow):
        follow += 1
    rest = length >> 4
    return bytes([(follow << 6) | (length & 0x0F)]) + rest.to_bytes(follow, "little")


def pkg(body: bytes) -> bytes:
    """`body` preceded by its PkgLength, which counts itself and the body."""
    for size in range(1, 5):
        total = len(body) + size
        encoded = pkg_length(total) if total <= PKG_LENGTH_MAX else b""
        if len(encoded) == size:
            return encoded + body
    raise ValueError(f"AML package body of {len(body)} bytes is too long")


# --- data objects (§20.2.3) ------------------------------------------------------------


def integer(value: int) -> bytes:
    """The shortest ComputationalData for `value`: Zero, One, Byte/Word/DWord/QWordConst."""
    if value < 0 or value > U64_MAX:
        raise ValueError(f"AML integer {value} out of range 0..2^64-1")
    if value == 0:
        return bytes([ZeroOp])
    if value == 1:
        return bytes([OneOp])
    if value <= U8_MAX:
        return bytes([BytePrefix]) + value.to_bytes(1, "little")
    if value <= U16_MAX:
        return bytes([WordPrefix]) + value.to_bytes(2, "little")
    if value <= U32_MAX:
        return bytes([DWordPrefix]) + value.to_bytes(4, "little")
    return bytes([QWordPrefix]) + value.to_bytes(8, "little")


def string(text: str) -> bytes:
    """A String: StringPrefix, ASCII characters 0x01-0x7F, NullChar (§20.2.3)."""
    data = text.encode("ascii")
    if b"\x00" in data:
        raise ValueError("AML strings cannot contain NUL")
    return bytes([StringPrefix]) + data + b"\x00"


def _data(value: int | bytes) -> bytes:
    """An int becomes an integer; bytes are taken as an already-encoded AML object."""
    if isinstance(value, bool) or not isinstance(value, int | bytes):
        raise TypeError(f"AML data must be int or encoded bytes, not {type(value).__name__}")
    return integer(value) if isinstance(value, int) else value


def package(*elements: int | bytes) -> bytes:
    """DefPackage: PackageOp PkgLength NumElements PackageElementList (§20.2.5.4)."""
    if len(elements) > PACKAGE_MAX_ELEMENTS:
        raise ValueError(f"AML Package holds at most {PACKAGE_MAX_ELEMENTS} elements")
    body = bytes([len(elements)]) + b"".join(_data(e) for e in elements)
    return bytes([PackageOp]) + pkg(body)


def buffer(data: bytes) -> bytes:
    """DefBuffer: BufferOp PkgLength BufferSize ByteList (§20.2.5.4)."""
    return bytes([BufferOp]) + pkg(integer(len(data)) + bytes(data))


# --- named objects and statements (§20.2.5) --------------------------------------------


def name(path: str, value: int | bytes) -> bytes:
    """DefName: NameOp NameString DataRefObject (§20.2.5.1)."""
    return bytes([NameOp]) + name_string(path) + _data(value)


def scope(path: str, *terms: bytes) -> bytes:
    """DefScope: ScopeOp PkgLength NameString TermList (§20.2.5.1)."""
    return bytes([ScopeOp]) + pkg(name_string(path) + b"".join(terms))


def device(path: str, *terms: bytes) -> bytes:
    """DefDevice: ExtOpPrefix DeviceOp PkgLength NameString TermList (§20.2.5.2)."""
    return bytes([ExtOpPrefix, DeviceOp]) + pkg(name_string(path) + b"".join(terms))


def method(
    path: str, *terms: bytes, args: int = 0, serialized: bool = False, sync_level: int = 0
) -> bytes:
    """DefMethod: MethodOp PkgLength NameString MethodFlags TermList (§20.2.5.2)."""
    if not 0 <= args <= METHOD_MAX_ARGS:
        raise ValueError(f"AML Method takes 0..{METHOD_MAX_ARGS} arguments, not {args}")
    if not 0 <= sync_level <= METHOD_MAX_SYNC_LEVEL:
        raise ValueError(f"AML Method SyncLevel must be 0..{METHOD_MAX_SYNC_LEVEL}")
    flags = args | (sync_level << METHOD_SYNC_LEVEL_SHIFT)
    if serialized:
        flags |= METHOD_FLAG_SERIALIZED
    return bytes([MethodOp]) + pkg(name_string(path) + bytes([flags]) + b"".join(terms))


def return_(value: int | bytes) -> bytes:
    """DefReturn: ReturnOp ArgObject (§20.2.5.3)."""
    return bytes([ReturnOp]) + _data(value)


# --- EISA IDs (§19.6 EISAID, §6.1.5 _HID) ----------------------------------------------

_EISA_ID = re.compile(r"[A-Z]{3}[0-9A-F]{4}")
EISA_LETTER_BASE = 0x40  # 'A' compresses to 1


def eisa_id(text: str) -> int:
    """The 32-bit compressed EISA ID of e.g. "PNP0501", as EISAID() compiles it.

    Three letters of five bits each and four hex digits, stored big-endian in the
    integer's bytes (so the value is the byte-swapped big-endian number).
    """
    if not _EISA_ID.fullmatch(text):
        raise ValueError(f"invalid EISA ID {text!r} (want three letters and four hex digits)")
    letters = [ord(c) - EISA_LETTER_BASE for c in text[:3]]
    vendor = (letters[0] << 10) | (letters[1] << 5) | letters[2]
    product = int(text[3:], 16)
    big_endian = (vendor << 16) | product
    return int.from_bytes(big_endian.to_bytes(4, "big"), "little")


# --- resource descriptors (§6.4) -------------------------------------------------------


def _small_tag(item_name: int, length: int) -> bytes:
    return bytes([(item_name << 3) | length])


def _large_tag(item_name: int, length: int) -> bytes:
    return bytes([LARGE_ITEM | item_name]) + length.to_bytes(2, "little")


def io_port(base: int, length: int, *, alignment: int = 1) -> bytes:
    """IO (Decode16, base, base, alignment, length): a fixed 16-bit I/O range (§6.4.2.5)."""
    if not 0 <= base <= U16_MAX or not 0 <= length <= U8_MAX or not 0 <= alignment <= U8_MAX:
        raise ValueError(f"I/O descriptor {base:#x}+{length:#x} out of range")
    return (
        _small_tag(SMALL_IO_NAME, IO_DESCRIPTOR_LEN)
        + bytes([IO_DECODE16])
        + base.to_bytes(2, "little")
        + base.to_bytes(2, "little")
        + bytes([alignment, length])
    )


def irq_no_flags(*irqs: int) -> bytes:
    """IRQNoFlags () {irqs}: ISA IRQs, edge-triggered, active-high, exclusive (§6.4.2.1)."""
    mask = 0
    for irq in irqs:
        if not 0 <= irq < ISA_IRQ_COUNT:
            raise ValueError(f"ISA IRQ {irq} out of range 0..{ISA_IRQ_COUNT - 1}")
        mask |= 1 << irq
    return _small_tag(SMALL_IRQ_NAME, IRQ_NO_FLAGS_LEN) + mask.to_bytes(2, "little")


def memory32_fixed(base: int, length: int, *, writable: bool = True) -> bytes:
    """Memory32Fixed (ReadWrite|ReadOnly, base, length) (§6.4.3.4)."""
    if not 0 <= base <= U32_MAX or not 0 <= length <= U32_MAX or base + length > U32_MAX + 1:
        raise ValueError(f"Memory32Fixed {base:#x}+{length:#x} does not fit 32 bits")
    info = MEMORY32_READ_WRITE if writable else 0
    return (
        _large_tag(LARGE_MEMORY32_FIXED_NAME, MEMORY32_FIXED_LEN)
        + bytes([info])
        + base.to_bytes(4, "little")
        + length.to_bytes(4, "little")
    )


def extended_interrupt(
    *irqs: int,
    consumer: bool = True,
    edge: bool = True,
    active_low: bool = False,
    shared: bool = False,
    wake_capable: bool = False,
) -> bytes:
    """Interrupt (Consumer, Edge|Level, ActiveHigh|ActiveLow, Exclusive|Shared) {irqs}.

    The Extended Interrupt descriptor (§6.4.3.6) with no resource source: flags byte,
    table length, then one 32-bit GSI per entry.
    """
    if not 1 <= len(irqs) <= EXT_IRQ_MAX_COUNT:
        raise ValueError(f"an Interrupt descriptor lists 1..{EXT_IRQ_MAX_COUNT} interrupts")
    for irq in irqs:
        if not 0 <= irq <= U32_MAX:
            raise ValueError(f"interrupt {irq} does not fit 32 bits")
    flags = (
        (EXT_IRQ_CONSUMER if consumer else 0)
        | (EXT_IRQ_EDGE if edge else 0)
        | (EXT_IRQ_ACTIVE_LOW if active_low else 0)
        | (EXT_IRQ_SHARED if shared else 0)
        | (EXT_IRQ_WAKE_CAPABLE if wake_capable else 0)
    )
    body = bytes([flags, len(irqs)]) + b"".join(irq.to_bytes(4, "little") for irq in irqs)
    return _large_tag(LARGE_EXTENDED_IRQ_NAME, len(body)) + body


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate () {...}: a Buffer of descriptors closed by an End Tag.

    The End Tag's checksum byte makes the whole template sum to zero mod 256
    (§6.4.2.9; zero would also be accepted, a real sum costs nothing).
    """
    data = b"".join(descriptors) + _small_tag(SMALL_END_TAG_NAME, END_TAG_LEN)
    return buffer(data + bytes([-sum(data) & U8_MAX]))
