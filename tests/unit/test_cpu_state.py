"""Entry state (voidbox.boot.cpu_state): GDT, page tables, sregs and regs per mode."""

import struct

import pytest

from voidbox import layout
from voidbox.boot import cpu_state as cs
from voidbox.kvm_types import DTable, Segment, Sregs
from voidbox.memory import GuestMemory

KVM_RESET_CR0 = 0x60000010  # CD | NW | ET: what KVM_GET_SREGS returns after vCPU creation


def reset_sregs() -> Sregs:
    return Sregs(
        cs=Segment(base=0xFFFF0000, limit=0xFFFF, selector=0xF000, type=11, present=1, s=1),
        tr=Segment(limit=0xFFFF, type=11, present=1),
        ldt=Segment(limit=0xFFFF, type=2, present=1),
        gdt=DTable(0, 0xFFFF), idt=DTable(0, 0xFFFF),
        cr0=KVM_RESET_CR0, cr8=3, apic_base=0xFEE00900, interrupt_bitmap=b"\1" + bytes(31),
    )


@pytest.fixture
def mem():
    with GuestMemory(16 << 20) as m:
        yield m


def test_descriptor_encodings():
    # The values Linux, QEMU and Firecracker use for the same descriptors.
    assert cs.gdt_entry(cs.DESC_CODE64, 0, cs.FLAT_LIMIT) == 0x00AF9B000000FFFF
    assert cs.gdt_entry(cs.DESC_CODE32, 0, cs.FLAT_LIMIT) == 0x00CF9B000000FFFF
    assert cs.gdt_entry(cs.DESC_DATA, 0, cs.FLAT_LIMIT) == 0x00CF93000000FFFF
    assert cs.gdt_entry(cs.DESC_TSS_BUSY, 0, cs.TSS_LIMIT) == 0x00008B0000000067
    assert cs.gdt_entry(0x0093, 0x12345678, 0xABCDE) == 0x120A93345678BCDE


def test_segment_from_descriptor():
    seg = cs.segment_from_descriptor(0x10, 0x00AF9B000000FFFF)
    assert seg == Segment(base=0, limit=0xFFFFFFFF, selector=0x10, type=0xB, present=1, dpl=0,
                          db=0, s=1, l=1, g=1, avl=0, unusable=0)
    seg = cs.segment_from_descriptor(0x18, cs.gdt_entry(0x4093, 0x12345678, 0xABCDE))
    assert (seg.base, seg.limit, seg.db, seg.g, seg.l) == (0x12345678, 0xABCDE, 1, 0, 0)
    assert cs.segment_from_descriptor(0, 0).unusable == 1


@pytest.mark.parametrize("mode", [cs.ENTRY_LINUX64, cs.ENTRY_ELF64])
def test_long_mode_sregs(mem, mode):
    before = reset_sregs()
    out = cs.setup_sregs(mem, mode, before)
    assert out.cr0 == 0x80000011  # set in full: CD/NW from the reset value are gone
    assert out.cr4 == 0x20
    assert out.efer == 0x500
    assert out.cr3 == layout.PML4_ADDR
    assert (out.cs.selector, out.cs.l, out.cs.db, out.cs.type, out.cs.s, out.cs.present) == (0x10, 1, 0, 0xB, 1, 1)
    for seg in (out.ds, out.es, out.fs, out.gs, out.ss):
        assert (seg.selector, seg.type, seg.db, seg.s, seg.present, seg.limit) == (0x18, 3, 1, 1, 1, 0xFFFFFFFF)
    assert (out.tr.selector, out.tr.type, out.tr.s, out.tr.present, out.tr.limit) == (0x20, 11, 0, 1, 0x67)
    assert out.gdt == DTable(layout.GDT_ADDR, 5 * 8 - 1)
    assert out.idt.limit == 0
    # Untouched state is kept, and the caller's object is not modified.
    assert (out.apic_base, out.cr8, out.ldt, out.interrupt_bitmap) == (
        before.apic_base, before.cr8, before.ldt, before.interrupt_bitmap)
    assert before.cr0 == KVM_RESET_CR0 and before.cs.selector == 0xF000
    # The GDT in guest memory matches the hidden segment state.
    gdt = struct.unpack("<5Q", mem.read(layout.GDT_ADDR, 40))
    assert gdt == (0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00008B0000000067)
    assert cs.segment_from_descriptor(0x10, gdt[2]) == out.cs


def test_page_tables(mem):
    cs.setup_sregs(mem, cs.ENTRY_LINUX64, Sregs())
    pml4 = struct.unpack("<512Q", mem.read(layout.PML4_ADDR, 4096))
    pdpt = struct.unpack("<512Q", mem.read(layout.PDPT_ADDR, 4096))
    pds = struct.unpack("<2048Q", mem.read(layout.PD_ADDR, 4 * 4096))
    assert pml4[0] == layout.PDPT_ADDR | 3 and not any(pml4[1:])
    assert pdpt[:4] == tuple(layout.PD_ADDR + i * 4096 | 3 for i in range(4)) and not any(pdpt[4:])
    assert pds[0] == 0x83
    assert pds[8] == (16 << 20) | 0x83  # the kernel load address
    assert pds[2047] == 0xFFE00000 | 0x83  # the last 2 MiB below 4 GiB
    assert all(pd == (i << 21) | 0x83 for i, pd in enumerate(pds))


def test_pvh_sregs(mem):
    mem.write(layout.PML4_ADDR, b"\xee" * 8)
    out = cs.setup_sregs(mem, cs.ENTRY_PVH, reset_sregs())
    assert out.cr0 == 0x11
    assert (out.cr3, out.cr4, out.efer) == (0, 0, 0)
    assert (out.cs.selector, out.cs.db, out.cs.l, out.cs.g, out.cs.limit, out.cs.base) == (0x10, 1, 0, 1, 0xFFFFFFFF, 0)
    assert (out.ss.db, out.ds.type, out.es.limit) == (1, 3, 0xFFFFFFFF)
    assert (out.tr.type, out.tr.limit, out.tr.base) == (11, 0x67, 0)
    assert struct.unpack_from("<Q", mem.read(layout.GDT_ADDR + 16, 8))[0] == 0x00CF9B000000FFFF
    assert mem.read(layout.PML4_ADDR, 8) == b"\xee" * 8  # paging off: no tables written


def test_entry_regs():
    regs = cs.entry_regs(cs.ENTRY_LINUX64, 0x1000200)
    assert (regs.rip, regs.rsi, regs.rsp, regs.rflags, regs.rbx) == (
        0x1000200, layout.ZERO_PAGE_ADDR, layout.BOOT_STACK_ADDR, 2, 0)
    regs = cs.entry_regs(cs.ENTRY_ELF64, 0x101000)
    assert (regs.rip, regs.rsi) == (0x101000, layout.ZERO_PAGE_ADDR)
    regs = cs.entry_regs(cs.ENTRY_PVH, 0x1000850)
    assert (regs.rip, regs.rbx, regs.rflags, regs.rsi) == (0x1000850, layout.PVH_START_INFO_ADDR, 2, 0)


def test_unknown_mode(mem):
    with pytest.raises(ValueError, match="entry mode"):
        cs.entry_regs("real", 0)
    with pytest.raises(ValueError, match="entry mode"):
        cs.setup_sregs(mem, "real", Sregs())
