"""The tiny KVM test guests build cleanly, load at 1 MiB and use no SSE."""

import re
import struct

import pytest

from tests.guests.build import GUEST_LOAD_ADDR, GUEST_NAMES, GUESTS_DIR, build_guest, disassemble
from voidbox import layout

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_X86_64 = 62
PT_LOAD = 1
PF_X = 1
PF_W = 2
ELF64_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
ELF64_PHDR = struct.Struct("<IIQQQQQQ")

# A guest is a few hundred instructions of code; anything near this is a mistake
# (a pulled-in library, a giant table) that KVM's emulator would crawl through.
MAX_LOADED_CODE = 16 * 1024

# Registers and instructions that need SSE/x87/AVX state the guests never enable.
FORBIDDEN = re.compile(r"%[xyz]mm\d|%mm\d|%st\b|\bendbr64\b|\bf(?:ld|st|x)\w*\b")


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("guests")


def read_elf(path):
    data = path.read_bytes()
    (ident, e_type, e_machine, _, e_entry, e_phoff, _, _, _, e_phentsize, e_phnum,
     _, _, _) = ELF64_EHDR.unpack_from(data)
    phdrs = [ELF64_PHDR.unpack_from(data, e_phoff + i * e_phentsize) for i in range(e_phnum)]
    return ident, e_type, e_machine, e_entry, phdrs


@pytest.mark.parametrize("name", GUEST_NAMES)
def test_guest_is_a_small_elf64_at_1mib(build_dir, name):
    elf = build_guest(name, build_dir)
    ident, e_type, e_machine, e_entry, phdrs = read_elf(elf)
    assert ident[:4] == ELF_MAGIC
    assert (ident[4], ident[5]) == (ELFCLASS64, ELFDATA2LSB)
    assert (e_type, e_machine) == (ET_EXEC, EM_X86_64)
    assert e_entry == GUEST_LOAD_ADDR == layout.HIMEM_ADDR
    loads = [p for p in phdrs if p[0] == PT_LOAD]
    assert loads
    for _, flags, _, vaddr, paddr, filesz, memsz, _ in loads:
        assert vaddr == paddr >= GUEST_LOAD_ADDR
        assert memsz >= filesz
        assert not (flags & PF_X and flags & PF_W), "no writable code segment"
        assert paddr + memsz < layout.KERNEL_LOAD_ADDR
    code = [p for p in loads if p[1] & PF_X]
    assert len(code) == 1 and code[0][3] == GUEST_LOAD_ADDR
    assert code[0][5] <= MAX_LOADED_CODE


@pytest.mark.parametrize("name", GUEST_NAMES)
def test_guest_uses_general_registers_only(build_dir, name):
    text = disassemble(build_guest(name, build_dir))
    assert "<_start>:" in text and "<guest_main>" in text
    bad = [line for line in text.splitlines() if FORBIDDEN.search(line)]
    assert bad == []


def test_forbidden_pattern_catches_sse():
    # The check above is only as good as this pattern.
    assert FORBIDDEN.search("  100020:\tmovaps %xmm0,(%rsp)")
    assert FORBIDDEN.search("  100020:\tpxor   %xmm1,%xmm1")
    assert FORBIDDEN.search("  100020:\tendbr64")
    assert FORBIDDEN.search("  100020:\tfldz")
    assert not FORBIDDEN.search("  100020:\tmov    %rdi,%rax")


def test_guests_end_the_way_the_tests_expect(build_dir):
    # hello/io/irq power off through the ACPI sleep register with S5.
    s5 = (5 << 2) | (1 << 5)
    for name in ("hello", "io", "irq"):
        text = disassemble(build_guest(name, build_dir))
        assert f"${s5:#x},%eax" in text and f"${layout.ACPI_SLEEP_CONTROL_PORT:#x},%edx" in text
    assert "ud2" in disassemble(build_guest("triple", build_dir))
    assert "lidt" in disassemble(build_guest("irq", build_dir))


def test_guest_h_agrees_with_layout():
    header = (GUESTS_DIR / "guest.h").read_text()
    defines = dict(re.findall(r"^#define (\w+) (0x[0-9A-Fa-f]+|\d+)U?L?\b", header, re.M))
    shared = {name: value for name, value in defines.items() if hasattr(layout, name)}
    assert {"SERIAL_COM1_PORT", "ACPI_SLEEP_CONTROL_PORT", "I8042_COMMAND_PORT",
            "IOAPIC_ADDR", "LAPIC_ADDR", "HIMEM_ADDR"} <= shared.keys()
    for name, value in shared.items():
        assert int(value, 0) == getattr(layout, name), name


def test_build_rejects_unknown_names(build_dir):
    with pytest.raises(ValueError):
        build_guest("../../etc/passwd", build_dir)
    with pytest.raises(ValueError):
        build_guest("nosuchguest", build_dir)


def test_build_reports_compiler_errors(tmp_path, monkeypatch):
    from tests.guests import build

    broken = tmp_path / "broken.c"
    broken.write_text('#include "guest.h"\nvoid guest_main(void) { int unused; }\n')
    monkeypatch.setattr(build, "GUESTS_DIR", tmp_path)
    monkeypatch.setattr(build, "CFLAGS", (*build.CFLAGS, f"-I{GUESTS_DIR}"))
    with pytest.raises(build.GuestBuildError, match="unused"):
        build.build_guest("broken", tmp_path)


def test_missing_gcc_skips_with_a_reason_and_fails_under_ci(tmp_path, monkeypatch):
    from tests.guests import build

    monkeypatch.setenv("CC", "no-such-compiler-voidbox")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs gcc"):
        build.build_guest("hello", tmp_path)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="needs gcc.*under CI a skip is a failure"):
        build.build_guest("hello", tmp_path)


def test_rebuilds_only_when_sources_change(tmp_path):
    elf = build_guest("hello", tmp_path)
    first = elf.stat().st_mtime_ns
    assert build_guest("hello", tmp_path) == elf
    assert elf.stat().st_mtime_ns == first
