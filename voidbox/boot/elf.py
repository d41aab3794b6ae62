"""Parse an x86-64 ELF kernel: an uncompressed Linux vmlinux or a freestanding guest.

ELF-64 Object File Format (version 1.5) for the headers; the PVH entry point is the
Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY (xen/include/public/elfnote.h), which Linux
emits in arch/x86/platform/pvh/head.S. The file is untrusted: every offset and size
is checked against the file before it is read, and every walk is bounded.

Parsing reads only headers and notes; `load_segments` copies the PT_LOAD segments
straight from the file into guest memory.
"""

from __future__ import annotations

import struct

from .._records import dataclass, field
from ..errors import UsageError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at start-up
if TYPE_CHECKING:
    from typing import BinaryIO

ELFMAG = b"\x7fELF"
EI_CLASS = 4
EI_DATA = 5
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_X86_64 = 62

PT_LOAD = 1
PT_NOTE = 4
SHT_NOTE = 7
PN_XNUM = 0xFFFF  # e_phnum escape: the real count lives in section 0; never used by kernels

# Elf64_Ehdr after e_ident: e_type, e_machine, e_version, e_entry, e_phoff, e_shoff,
# e_flags, e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx.
ELF64_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
# Elf64_Phdr: p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align.
ELF64_PHDR = struct.Struct("<IIQQQQQQ")
# Elf64_Shdr: sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, sh_info,
# sh_addralign, sh_entsize.
ELF64_SHDR = struct.Struct("<IIQQQQIIQQ")
ELF64_NHDR = struct.Struct("<III")  # n_namesz, n_descsz, n_type

XEN_ELFNOTE_PHYS32_ENTRY = 18
XEN_NOTE_NAME = b"Xen"
LINUX_NOTE_NAME = b"Linux"

# __START_KERNEL_map (arch/x86/include/asm/page_64_types.h): where x86-64 Linux maps
# its image; a vmlinux's virtual addresses are physical + this.
START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000

# Bounds on what a kernel plausibly has; a file beyond them is rejected, not walked.
MAX_PHNUM = 512
MAX_SHNUM = 8192
MAX_NOTES_BYTES = 1 << 20  # a vmlinux has about 512 bytes of notes


@dataclass(frozen=True)
class LoadSegment:
    """One PT_LOAD program header."""

    offset: int
    filesz: int
    vaddr: int
    paddr: int
    memsz: int

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


@dataclass
class ElfKernel:
    """A parsed ELF vmlinux: its entry point and loadable segments."""

    path: str
    entry: int  # e_entry as written (virtual or physical)
    segments: list[LoadSegment] = field(default_factory=list)
    pvh_entry: int | None = None  # XEN_ELFNOTE_PHYS32_ENTRY, a 32-bit physical address
    is_linux: bool = False  # a Linux vmlinux rather than a freestanding program

    @property
    def end(self) -> int:
        return max(seg.end for seg in self.segments)

    def holds(self, paddr: int) -> bool:
        return any(seg.paddr <= paddr < seg.end for seg in self.segments)

    def physical_entry(self) -> int:
        """e_entry as a guest-physical address inside a loaded segment.

        A vmlinux's e_entry is usually physical already (ENTRY(phys_startup_64) in
        vmlinux.lds); a virtual kernel address is translated through the segment whose
        p_vaddr range holds it, or else by subtracting __START_KERNEL_map.
        """
        entry = self.entry
        if entry >= START_KERNEL_MAP or not self.holds(entry):
            for seg in self.segments:
                if seg.vaddr <= entry < seg.vaddr + seg.memsz:
                    entry = seg.paddr + (entry - seg.vaddr)
                    break
            else:
                if entry >= START_KERNEL_MAP:
                    entry -= START_KERNEL_MAP
        if not self.holds(entry):
            raise UsageError(f"{self.path}: entry point {self.entry:#x} is not in any loadable segment")
        return entry


def _read(f: BinaryIO, file_size: int, offset: int, length: int, path: str, what: str) -> bytes:
    if offset < 0 or length < 0 or offset + length > file_size:
        raise UsageError(f"{path} is truncated or corrupt: {what} lies outside the file")
    f.seek(offset)
    data = f.read(length)
    if len(data) != length:
        raise UsageError(f"{path} is truncated: short read of {what}")
    return data


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & -alignment


def parse_notes(data: bytes, alignment: int):
    """Yield (name, type, desc) for each note in a note segment or section.

    A malformed note ends the walk (notes are advisory: the kernel still loads through
    its ELF entry); the position strictly grows, so the walk is bounded by len(data).
    """
    pos = 0
    while pos + ELF64_NHDR.size <= len(data):
        namesz, descsz, ntype = ELF64_NHDR.unpack_from(data, pos)
        name_start = pos + ELF64_NHDR.size
        desc_start = name_start + _align(namesz, alignment)
        desc_end = desc_start + descsz
        if desc_end > len(data):
            return
        yield data[name_start : name_start + namesz].rstrip(b"\0"), ntype, data[desc_start:desc_end]
        pos = desc_start + _align(descsz, alignment)


def _note_alignment(align: int) -> int:
    # As readelf does: 8-byte aligned note areas use 8-byte padding, everything else 4.
    return 8 if align == 8 else 4


def _scan_notes(kernel: ElfKernel, data: bytes, alignment: int) -> None:
    for name, ntype, desc in parse_notes(data, alignment):
        if name in (XEN_NOTE_NAME, LINUX_NOTE_NAME):
            kernel.is_linux = True
        if name == XEN_NOTE_NAME and ntype == XEN_ELFNOTE_PHYS32_ENTRY and len(desc) in (4, 8):
            # Linux writes the address as _ASM_PTR (8 bytes on x86-64); only 32 bits
            # are meaningful, the entry runs with paging off.
            value = int.from_bytes(desc, "little")
            if value < 1 << 32:
                kernel.pvh_entry = value


def parse_elf(f: BinaryIO, file_size: int, path: str) -> ElfKernel:
    """Read and validate the headers and notes of an ELF kernel file."""
    ehdr = ELF64_EHDR.unpack(_read(f, file_size, 0, ELF64_EHDR.size, path, "the ELF header"))
    ident, e_type, e_machine, _, e_entry, e_phoff, e_shoff = ehdr[:7]
    e_phentsize, e_phnum, e_shentsize, e_shnum = ehdr[9:13]
    if ident[EI_CLASS] != ELFCLASS64 or ident[EI_DATA] != ELFDATA2LSB or e_machine != EM_X86_64:
        raise UsageError(f"{path} is not a bzImage or x86-64 ELF kernel (ELF for another machine or class)")
    if e_type != ET_EXEC:
        raise UsageError(f"{path} is not a bzImage or x86-64 ELF kernel (ELF type {e_type}, expected ET_EXEC)")
    if e_phnum == 0 or e_phnum == PN_XNUM or e_phnum > MAX_PHNUM or e_phentsize < ELF64_PHDR.size:
        raise UsageError(f"{path} is corrupt: bad program header table ({e_phnum} x {e_phentsize} bytes)")

    kernel = ElfKernel(path=path, entry=e_entry)
    table = _read(f, file_size, e_phoff, e_phnum * e_phentsize, path, "the program header table")
    notes = []
    for i in range(e_phnum):
        p_type, _, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align = ELF64_PHDR.unpack_from(
            table, i * e_phentsize
        )
        if p_type == PT_LOAD and p_memsz:
            if p_filesz > p_memsz:
                raise UsageError(f"{path} is corrupt: segment {i} has p_filesz > p_memsz")
            if p_offset + p_filesz > file_size:
                raise UsageError(f"{path} is truncated: segment {i} extends past the end of the file")
            if p_paddr + p_memsz > 1 << 64 or p_vaddr + p_memsz > 1 << 64:
                raise UsageError(f"{path} is corrupt: segment {i} wraps the address space")
            kernel.segments.append(LoadSegment(p_offset, p_filesz, p_vaddr, p_paddr, p_memsz))
            if p_vaddr >= START_KERNEL_MAP:
                kernel.is_linux = True
        elif p_type == PT_NOTE and p_filesz:
            notes.append((p_offset, p_filesz, p_align))
    if not kernel.segments:
        raise UsageError(f"{path} has no loadable segments")

    budget = MAX_NOTES_BYTES  # across all note areas: a hostile file cannot make us read more
    for offset, size, align in notes:
        if size > budget:
            break
        budget -= size
        _scan_notes(kernel, _read(f, file_size, offset, size, path, "a note segment"), _note_alignment(align))

    # Section headers are optional (the program headers are what a loader uses); look in
    # SHT_NOTE sections only when the segments did not carry the PVH note, and skip a
    # section table that does not fit the file rather than rejecting a loadable kernel.
    if (
        kernel.pvh_entry is None
        and e_shoff
        and 0 < e_shnum <= MAX_SHNUM
        and e_shentsize >= ELF64_SHDR.size
        and e_shoff + e_shnum * e_shentsize <= file_size
    ):
        shdrs = _read(f, file_size, e_shoff, e_shnum * e_shentsize, path, "the section header table")
        for i in range(e_shnum):
            sh = ELF64_SHDR.unpack_from(shdrs, i * e_shentsize)
            sh_type, sh_offset, sh_size, sh_addralign = sh[1], sh[4], sh[5], sh[8]
            if sh_type != SHT_NOTE or not sh_size or sh_offset + sh_size > file_size:
                continue
            if sh_size > budget:
                break
            budget -= sh_size
            data = _read(f, file_size, sh_offset, sh_size, path, "a note section")
            _scan_notes(kernel, data, _note_alignment(sh_addralign))
    return kernel


def load_segments(memory, f: BinaryIO, kernel: ElfKernel) -> None:
    """Copy each PT_LOAD segment to p_paddr and zero its bss tail (p_memsz > p_filesz).

    The caller has checked that every segment lies in guest RAM.
    """
    for seg in kernel.segments:
        if seg.filesz:
            read_exact(f, seg.offset, memory.view(seg.paddr, seg.filesz), kernel.path)
        zero(memory, seg.paddr + seg.filesz, seg.memsz - seg.filesz)


_ZERO_CHUNK = 1 << 20


def zero(memory, gpa: int, length: int) -> None:
    """Zero guest memory in bounded chunks (a bss can be many MiB)."""
    chunk = bytes(min(length, _ZERO_CHUNK))
    while length > 0:
        n = min(length, len(chunk))
        memory.view(gpa, n)[:] = chunk[:n]
        gpa += n
        length -= n


def read_exact(f: BinaryIO, offset: int, view: memoryview, path: str) -> None:
    """Fill `view` from the file at `offset`, without an intermediate copy."""
    f.seek(offset)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise UsageError(f"{path} is truncated: it ended while loading")
        done += n
