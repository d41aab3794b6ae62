"""The AML encoder: exact encodings from ACPI 6.5 §20.2 and §6.4, then iasl's opinion."""

import shutil
import subprocess

import pytest

from tests.requires import requires
from voidbox.boot import aml
from voidbox.boot.acpi import sdt

needs_iasl = requires(shutil.which("iasl") is not None, "needs iasl (acpica-tools) to disassemble AML")
needs_acpiexec = requires(
    shutil.which("acpiexec") is not None, "needs acpiexec (acpica-tools) to run AML"
)


def decode_pkg_length(data: bytes) -> tuple[int, int]:
    """(value, bytes used): an independent PkgLength decoder written from §20.2.4."""
    lead = data[0]
    follow = lead >> 6
    if follow == 0:
        return lead & 0x3F, 1
    assert lead & 0x30 == 0, "bits 5-4 of a multi-byte lead byte are reserved (zero)"
    value = lead & 0x0F
    for i in range(follow):
        value |= data[1 + i] << (4 + 8 * i)
    return value, 1 + follow


# --- names -------------------------------------------------------------------------------


def test_name_seg_pads_with_underscores():
    assert aml.name_seg("_SB") == b"_SB_"
    assert aml.name_seg("VR00") == b"VR00"
    assert aml.name_seg("A") == b"A___"


@pytest.mark.parametrize("bad", ["", "TOOLONG", "0ABC", "vr00", "A-B", "A.B"])
def test_name_seg_rejects_invalid(bad):
    with pytest.raises(ValueError):
        aml.name_seg(bad)


def test_name_string_prefixes_and_segment_counts():
    assert aml.name_string("_S5_") == b"_S5_"
    assert aml.name_string("\\_SB_") == b"\\_SB_"
    assert aml.name_string("\\") == b"\\\x00"
    assert aml.name_string("^^FOO") == b"^^FOO_"
    assert aml.name_string("\\_SB_.VR00") == b"\\\x2e_SB_VR00"
    assert aml.name_string("_SB_.PCI0.COM1") == b"\x2f\x03_SB_PCI0COM1"
    with pytest.raises(ValueError):
        aml.name_string("")


# --- PkgLength (§20.2.4) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (63, b"\x3f"),  # largest one-byte value
        (64, b"\x40\x04"),  # smallest two-byte value: low nibble 0, next byte 64 >> 4
        (4095, b"\x4f\xff"),  # largest two-byte value (12 bits)
        (4096, b"\x80\x00\x01"),
        ((1 << 20) - 1, b"\x8f\xff\xff"),  # largest three-byte value (20 bits)
        (1 << 20, b"\xc0\x00\x00\x01"),
        ((1 << 28) - 1, b"\xcf\xff\xff\xff"),  # largest encodable value (28 bits)
    ],
)
def test_pkg_length_boundaries(value, encoded):
    assert aml.pkg_length(value) == encoded
    assert decode_pkg_length(encoded) == (value, len(encoded))


@pytest.mark.parametrize("value", [-1, 1 << 28])
def test_pkg_length_out_of_range(value):
    with pytest.raises(ValueError):
        aml.pkg_length(value)


@pytest.mark.parametrize(
    ("body_len", "prefix_len"),
    [
        (0, 1),
        (62, 1),  # 62 + 1 = 63 still fits the lead byte
        (63, 2),  # 63 + 1 = 64 does not: two bytes, total 65
        (4093, 2),  # 4093 + 2 = 4095
        (4094, 3),  # 4094 + 2 = 4096 needs a third byte
        ((1 << 20) - 4, 3),
        ((1 << 20) - 3, 4),
    ],
)
def test_pkg_counts_its_own_bytes(body_len, prefix_len):
    body = bytes(body_len)
    out = aml.pkg(body)
    value, used = decode_pkg_length(out)
    assert used == prefix_len
    assert value == len(out) == body_len + prefix_len
    assert out[used:] == body


# --- data objects ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, "00"),
        (1, "01"),
        (2, "0a02"),
        (0xFF, "0aff"),
        (0x100, "0b0001"),
        (0xFFFF, "0bffff"),
        (0x1_0000, "0c00000100"),
        (0xD000_0000, "0c000000d0"),
        (0xFFFF_FFFF, "0cffffffff"),
        (0x1_0000_0000, "0e0000000001000000"),
        ((1 << 64) - 1, "0effffffffffffffff"),
    ],
)
def test_integer_picks_the_shortest_encoding(value, encoded):
    assert aml.integer(value).hex() == encoded


@pytest.mark.parametrize("value", [-1, 1 << 64])
def test_integer_out_of_range(value):
    with pytest.raises(ValueError):
        aml.integer(value)


def test_string():
    assert aml.string("LNRO0005") == b"\x0dLNRO0005\x00"
    with pytest.raises(ValueError):
        aml.string("a\x00b")
    with pytest.raises(ValueError):  # UnicodeEncodeError is a ValueError
        aml.string("é")


def test_package_and_buffer_bytes():
    assert aml.package(5, 5, 0, 0).hex() == "1208040a050a050000"
    assert aml.package().hex() == "120200"  # PackageOp, PkgLength 2, NumElements 0
    assert aml.package(aml.string("A")).hex() == "1205010d4100"
    assert aml.buffer(b"\x01\x02\x03").hex() == "1106" + "0a03" + "010203"
    with pytest.raises(ValueError):
        aml.package(*range(256))
    with pytest.raises(TypeError):
        aml.package(True)


def test_name_scope_device_method_return_bytes():
    assert aml.name("_UID", 0).hex() == "08" + b"_UID".hex() + "00"
    assert aml.scope("\\_SB_").hex() == "10065c" + b"_SB_".hex()
    assert aml.device("VR00").hex() == "5b8205" + b"VR00".hex()
    assert aml.return_(0x0F).hex() == "a40a0f"
    # MethodFlags: ArgCount 2 | Serialized (bit 3) | SyncLevel 3 (bits 4-7) = 0x3a
    assert aml.method("FOO", args=2, serialized=True, sync_level=3).hex() == (
        "1406" + b"FOO_".hex() + "3a"
    )
    with pytest.raises(ValueError):
        aml.method("FOO", args=8)
    with pytest.raises(ValueError):
        aml.method("FOO", sync_level=16)


@pytest.mark.parametrize(
    ("text", "value"),
    [("PNP0501", 0x0105D041), ("PNP0A03", 0x030AD041), ("PNP0C0F", 0x0F0CD041)],
)
def test_eisa_id(text, value):
    assert aml.eisa_id(text) == value


@pytest.mark.parametrize("bad", ["PNP050", "pnp0501", "PNP05G1", "1NP0501"])
def test_eisa_id_rejects_invalid(bad):
    with pytest.raises(ValueError):
        aml.eisa_id(bad)


# --- resource descriptors (§6.4) ---------------------------------------------------------


def test_resource_descriptor_bytes():
    assert (
        aml.memory32_fixed(0xD000_0000, 0x1000).hex() == "860900" + "01" + "000000d0" + "00100000"
    )
    assert aml.memory32_fixed(0x1000, 0x10, writable=False)[3] == 0
    # Consumer | Edge = 0x03; one interrupt, GSI 5.
    assert aml.extended_interrupt(5).hex() == "890600" + "03" + "01" + "05000000"
    # Level, ActiveLow, Shared, Producer: 0b01100
    assert (
        aml.extended_interrupt(9, consumer=False, edge=False, active_low=True, shared=True)[3]
        == 0x0C
    )
    assert aml.io_port(0x3F8, 8).hex() == "47" + "01" + "f803" + "f803" + "01" + "08"
    assert aml.irq_no_flags(4).hex() == "22" + "1000"
    with pytest.raises(ValueError):
        aml.memory32_fixed(0xFFFF_F000, 0x2000)
    with pytest.raises(ValueError):
        aml.irq_no_flags(16)
    with pytest.raises(ValueError):
        aml.extended_interrupt()


def test_resource_template_end_tag_checksum():
    template = aml.resource_template(
        aml.memory32_fixed(0xD000_0000, 0x1000), aml.extended_interrupt(5)
    )
    value, used = decode_pkg_length(template[1:])
    assert template[0] == aml.BufferOp and value == len(template) - 1
    size_term = template[1 + used :]
    assert size_term[0] == aml.BytePrefix
    data = size_term[2:]
    assert len(data) == size_term[1]
    assert data[-2] == 0x79  # End Tag, length 1
    assert sum(data) % 256 == 0
    assert data[-1] != 0  # a real checksum, not the "assume valid" zero


# --- the real disassembler and interpreter -----------------------------------------------


def _sample_block() -> bytes:
    big = bytes(range(256)) * 20  # 5120 bytes: the Buffer needs a three-byte PkgLength
    body = (
        aml.name("PKG0", aml.package(1, 0x1234, 0xDEADBEEF, 0x1_2345_6789, aml.string("hi")))
        + aml.name("BIGB", aml.buffer(big))
        + aml.scope(
            "\\_SB_",
            aml.device(
                "DEV0",
                aml.name("_HID", aml.eisa_id("PNP0501")),
                aml.method("_STA", aml.return_(0x0F)),
                aml.method(
                    "ADD2", aml.return_(aml.integer(7)), args=2, serialized=True, sync_level=3
                ),
                aml.name("_CRS", aml.resource_template(aml.io_port(0x3F8, 8), aml.irq_no_flags(4))),
            ),
        )
        + aml.scope("\\_SB_.DEV0", aml.name("EXTR", aml.string("x" * 100)))
    )
    return sdt(b"DSDT", 2, body)


@needs_iasl
def test_iasl_disassembles_every_encoder(tmp_path):
    (tmp_path / "sample.dat").write_bytes(_sample_block())
    proc = subprocess.run(
        ["iasl", "-d", "sample.dat"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Error" not in output and "Warning" not in output, output
    dsl = (tmp_path / "sample.dsl").read_text()
    for needle in [
        "Name (PKG0, Package (0x05)",
        "0x1234,",
        "0xDEADBEEF,",
        "0x0000000123456789,",
        '"hi"',
        "Name (BIGB, Buffer (0x1400)",
        "Scope (\\_SB)",
        "Device (DEV0)",
        'Name (_HID, EisaId ("PNP0501")',
        "Method (_STA, 0, NotSerialized)",
        "Return (0x0F)",
        "Method (ADD2, 2, Serialized, 3)",
        "Return (0x07)",
        "IO (Decode16,",
        "0x03F8,             // Range Minimum",
        "IRQNoFlags ()",
        "{4}",
        "Scope (\\_SB.DEV0)",
        'Name (EXTR, "' + "x" * 100 + '")',
    ]:
        assert needle in dsl, f"{needle!r} missing from:\n{dsl}"


@needs_acpiexec
def test_acpiexec_evaluates_the_sample(tmp_path):
    (tmp_path / "sample.dat").write_bytes(_sample_block())
    proc = subprocess.run(
        [
            "acpiexec",
            "-b",
            "evaluate \\_SB.DEV0._STA; evaluate \\PKG0; evaluate \\_SB.DEV0.EXTR",
            "sample.dat",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "[Integer] = 000000000000000F" in output, output
    assert "[Integer] = 0000000123456789" in output, output
    assert "[Integer] = 00000000DEADBEEF" in output, output
    assert "Exception" not in output and "Error" not in output, output
