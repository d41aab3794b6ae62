"""ELF kernel parsing and loading (voidbox.boot.elf) against synthetic and gcc-built files."""

import io
import shutil
import struct
import subprocess

import pytest

from tests.requires import requires
from voidbox.boot import elf
from voidbox.errors import UsageError
from voidbox.memory import GuestMemory

KERNEL_VADDR = elf.START_KERNEL_MAP + 0x1000000


def note(name: bytes, ntype: int, desc: bytes, align: int = 4) -> bytes:
    def pad(b):
        return b + bytes(-len(b) % align)

    return struct.pack("<III", len(name) + 1, len(desc), ntype) + pad(name + b"\0") + pad(desc)


def pvh_note(entry: int, size: int = 8) -> bytes:
    return note(b"Xen", elf.XEN_ELFNOTE_PHYS32_ENTRY, entry.to_bytes(size, "little"))


def make_elf(
    segments=((0x100000, 0x100000, b"\xf4" * 16, 0x1000),),
    entry=0x100000,
    notes=b"",
    notes_as_section=False,
    e_type=elf.ET_EXEC,
    machine=elf.EM_X86_64,
    elf_class=elf.ELFCLASS64,
) -> bytes:
    """An ELF64 file: `segments` are (paddr, vaddr, data, memsz); `notes` raw note bytes,
    in a PT_NOTE segment or (notes_as_section) only in an SHT_NOTE section."""
    phnum = len(segments) + (1 if notes and not notes_as_section else 0)
    blobs = bytearray()
    data_start = 64 + phnum * elf.ELF64_PHDR.size
    phdrs = b""
    for paddr, vaddr, data, memsz in segments:
        offset = data_start + len(blobs)
        blobs += data + bytes(-len(data) % 16)
        phdrs += elf.ELF64_PHDR.pack(elf.PT_LOAD, 7, offset, vaddr, paddr, len(data), memsz, 0x1000)
    shoff = shnum = 0
    if notes:
        offset = data_start + len(blobs)
        blobs += notes
        if notes_as_section:
            blobs += bytes(-len(blobs) % 8)
            shoff = data_start + len(blobs)
            shnum = 2
            blobs += bytes(elf.ELF64_SHDR.size)  # SHN_UNDEF
            blobs += elf.ELF64_SHDR.pack(0, elf.SHT_NOTE, 2, 0, offset, len(notes), 0, 0, 4, 0)
        else:
            phdrs += elf.ELF64_PHDR.pack(elf.PT_NOTE, 4, offset, 0, 0, len(notes), len(notes), 4)
    ident = b"\x7fELF" + bytes([elf_class, elf.ELFDATA2LSB, 1]) + bytes(9)
    ehdr = elf.ELF64_EHDR.pack(
        ident, e_type, machine, 1, entry, 64, shoff, 0, 64, elf.ELF64_PHDR.size, phnum,
        elf.ELF64_SHDR.size, shnum, 0,
    )
    return ehdr + phdrs + bytes(blobs)


def parse(data: bytes) -> elf.ElfKernel:
    return elf.parse_elf(io.BytesIO(data), len(data), "kernel")


def test_freestanding_elf_segments_and_entry():
    data = make_elf(segments=[(0x100000, 0x100000, b"A" * 10, 0x2000), (0x200000, 0x200000, b"B", 1)], entry=0x100004)
    k = parse(data)
    assert [(s.paddr, s.filesz, s.memsz) for s in k.segments] == [(0x100000, 10, 0x2000), (0x200000, 1, 1)]
    assert k.physical_entry() == 0x100004
    assert k.end == 0x200001
    assert not k.is_linux and k.pvh_entry is None


def test_vmlinux_virtual_entry_translates_through_its_segment():
    k = parse(make_elf(segments=[(0x1000000, KERNEL_VADDR, b"x" * 64, 0x1000)], entry=KERNEL_VADDR + 0x40))
    assert k.is_linux
    assert k.physical_entry() == 0x1000040


def test_vmlinux_virtual_entry_outside_segments_uses_start_kernel_map():
    # p_vaddr that does not follow __START_KERNEL_map still lets the fallback apply.
    k = parse(make_elf(segments=[(0x1000000, 0x1000000, b"x" * 64, 0x1000)], entry=KERNEL_VADDR + 8))
    assert k.physical_entry() == 0x1000008


def test_physical_entry_is_kept():
    k = parse(make_elf(segments=[(0x1000000, KERNEL_VADDR, b"x" * 64, 0x1000)], entry=0x1000000))
    assert k.physical_entry() == 0x1000000


def test_entry_outside_every_segment_is_rejected():
    k = parse(make_elf(entry=0x5000000))
    with pytest.raises(UsageError, match="entry point"):
        k.physical_entry()


@pytest.mark.parametrize("desc_size", [4, 8])
def test_pvh_note_in_note_segment(desc_size):
    notes = note(b"Xen", 6, b"linux\0") + pvh_note(0x1000850, desc_size) + note(b"GNU", 3, b"x" * 20)
    k = parse(make_elf(notes=notes))
    assert k.pvh_entry == 0x1000850
    assert k.is_linux


def test_pvh_note_found_in_sections_without_pt_note():
    k = parse(make_elf(notes=pvh_note(0x100010), notes_as_section=True))
    assert k.pvh_entry == 0x100010


def test_pvh_note_above_4gib_is_ignored():
    assert parse(make_elf(notes=pvh_note(1 << 32))).pvh_entry is None


def test_notes_with_8_byte_alignment():
    data = note(b"GNU", 5, b"\1" * 12, align=8) + note(b"Xen", 18, (0x100000).to_bytes(4, "little"), align=8)
    assert [n[:2] for n in elf.parse_notes(data, 8)] == [(b"GNU", 5), (b"Xen", 18)]


def test_malformed_note_ends_the_walk():
    good = note(b"Linux", 1, b"abcd")
    bad = struct.pack("<III", 4, 0xFFFFFFF0, elf.XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0"
    assert [n[0] for n in elf.parse_notes(good + bad + pvh_note(0x100000), 4)] == [b"Linux"]
    assert list(elf.parse_notes(b"\1\2\3", 4)) == []


@pytest.mark.parametrize(
    "data, message",
    [
        (make_elf()[:40], "truncated"),
        (make_elf(elf_class=1), "not a bzImage or x86-64 ELF kernel"),
        (make_elf(machine=3), "not a bzImage or x86-64 ELF kernel"),
        (make_elf(e_type=3), "ET_EXEC"),
        (make_elf(segments=[]), "program header"),
        (make_elf(segments=[(0x100000, 0x100000, b"", 0)]), "no loadable segments"),
        (make_elf()[:100], "truncated"),
    ],
)
def test_corrupt_headers_are_usage_errors(data, message):
    with pytest.raises(UsageError, match=message):
        parse(data)


def test_segment_past_end_of_file():
    data = make_elf(segments=[(0x100000, 0x100000, b"x" * 64, 64)])
    with pytest.raises(UsageError, match="past the end"):
        parse(data[:-40])


def test_filesz_larger_than_memsz():
    with pytest.raises(UsageError, match="p_filesz > p_memsz"):
        parse(make_elf(segments=[(0x100000, 0x100000, b"x" * 64, 16)]))


def test_phdr_table_outside_file():
    data = bytearray(make_elf())
    struct.pack_into("<Q", data, 32, 1 << 40)  # e_phoff
    with pytest.raises(UsageError, match="outside the file"):
        parse(bytes(data))


def test_too_many_program_headers():
    data = bytearray(make_elf())
    struct.pack_into("<H", data, 56, elf.PN_XNUM)  # e_phnum
    with pytest.raises(UsageError, match="program header table"):
        parse(bytes(data))


def test_load_segments_copies_data_and_zeroes_bss():
    data = make_elf(segments=[(0x100000, 0x100000, b"code", 0x3000)])
    with GuestMemory(16 << 20) as mem:
        mem.write(0x100000, b"\xff" * 0x4000)
        k = parse(data)
        elf.load_segments(mem, io.BytesIO(data), k)
        assert mem.read(0x100000, 4) == b"code"
        assert mem.read(0x100004, 0x3000 - 4) == bytes(0x3000 - 4)
        assert mem.read(0x103000, 4) == b"\xff" * 4  # past p_memsz: untouched


def test_zero_crosses_chunks():
    with GuestMemory(16 << 20) as mem:
        length = 2 * (1 << 20) + 5
        mem.write(0x200000, b"\xaa" * (length + 1))
        elf.zero(mem, 0x200000, length)
        assert mem.read(0x200000, length) == bytes(length)
        assert mem.read(0x200000 + length, 1) == b"\xaa"


@requires(shutil.which("gcc") is not None, "needs gcc to build a freestanding guest")
def test_gcc_built_freestanding_guest(tmp_path):
    src = tmp_path / "g.c"
    src.write_text(
        "int counter = 5; char buf[100];\n"
        "void _start(void) { buf[0] = counter; for (;;) __asm__ volatile(\"hlt\"); }\n"
    )
    out = tmp_path / "g"
    subprocess.run(
        ["gcc", "-ffreestanding", "-nostdlib", "-static", "-fno-pic", "-no-pie",
         "-fno-stack-protector", "-mgeneral-regs-only", "-mno-red-zone", "-O2",
         "-Wl,-Ttext-segment=0x100000", "-o", str(out), str(src)],
        check=True,
    )
    data = out.read_bytes()
    k = parse(data)
    assert not k.is_linux and k.pvh_entry is None
    assert all(s.paddr >= 0x100000 for s in k.segments)
    assert k.holds(k.physical_entry())
    assert any(s.memsz > s.filesz for s in k.segments)  # buf[] is bss


def test_oversized_note_areas_are_not_read():
    notes = pvh_note(0x100000) + bytes(elf.MAX_NOTES_BYTES)
    assert parse(make_elf(notes=notes)).pvh_entry is None
    assert parse(make_elf(notes=notes[: elf.MAX_NOTES_BYTES])).pvh_entry == 0x100000
