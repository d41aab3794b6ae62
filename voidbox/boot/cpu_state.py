"""The boot vCPU's entry state: GDT, identity page tables, segment and control registers.

Three entry modes:

- ``linux64``: the 64-bit boot protocol (Documentation/arch/x86/boot.rst, "64-bit BOOT
  PROTOCOL"): long mode, paging on with an identity map of the loaded kernel, zero page
  and command line; CS = __BOOT_CS (0x10) a 64-bit code segment, DS/ES/SS = __BOOT_DS
  (0x18), RSI = the zero page, interrupts off.
- ``elf64``: a freestanding 64-bit program, entered exactly like ``linux64``.
- ``pvh``: the PVH ABI (xen/include/public/arch-x86/hvm/start_info.h, "Machine state"):
  32-bit protected mode, paging off, flat 4 GiB CS (read/execute) and DS/ES/SS
  (read/write), TR a 32-bit TSS, CR4 = 0, EBX = hvm_start_info.

CR0 is set in full (0x80000011 in long mode) instead of OR-ing bits into KVM's reset
value 0x60000010, whose CD/NW bits would leave caching disabled for the whole boot.

Only the boot vCPU (vCPU 0) gets this state. The others keep KVM's reset state, halted
in wait-for-SIPI, until the guest wakes them with INIT/SIPI through the in-kernel LAPIC
(a Linux guest's real-mode trampoline sets up everything it needs itself).
"""

from __future__ import annotations

import copy
import struct

from ..kvm_types import DTable, Regs, Segment, Sregs
from ..layout import (
    BOOT_STACK_ADDR,
    GDT_ADDR,
    PD_ADDR,
    PDPT_ADDR,
    PML4_ADDR,
    PVH_START_INFO_ADDR,
    ZERO_PAGE_ADDR,
)

ENTRY_LINUX64 = "linux64"
ENTRY_ELF64 = "elf64"
ENTRY_PVH = "pvh"
ENTRY_MODES = (ENTRY_LINUX64, ENTRY_ELF64, ENTRY_PVH)

# Control registers (Intel SDM vol. 3A §2.5, §2.2.1).
X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

CR0_LONG_MODE = X86_CR0_PG | X86_CR0_ET | X86_CR0_PE  # 0x80000011
CR0_PROTECTED_MODE = X86_CR0_ET | X86_CR0_PE  # 0x11
CR4_LONG_MODE = X86_CR4_PAE
EFER_LONG_MODE = EFER_LME | EFER_LMA

X86_EFLAGS_FIXED = 1 << 1  # reserved bit 1 always reads as 1; IF (bit 9) stays clear

# GDT layout, indexes as Linux's boot GDT (arch/x86/include/asm/segment.h).
GDT_ENTRY_BOOT_CS = 2
GDT_ENTRY_BOOT_DS = 3
GDT_ENTRY_BOOT_TSS = 4
GDT_ENTRIES = 5
BOOT_CS = GDT_ENTRY_BOOT_CS * 8  # Linux's __BOOT_CS, 0x10
BOOT_DS = GDT_ENTRY_BOOT_DS * 8  # __BOOT_DS, 0x18
BOOT_TSS = GDT_ENTRY_BOOT_TSS * 8  # __BOOT_TSS, 0x20

# Descriptor "flags" as Linux's GDT_ENTRY(flags, base, limit): access byte in bits 0-7
# (type, S, DPL, P), G/D/L/AVL in bits 12-15 (SDM vol. 3A §3.4.5).
DESC_CODE64 = 0xA09B  # G, L, P, S, execute/read accessed
DESC_CODE32 = 0xC09B  # G, D, P, S, execute/read accessed
DESC_DATA = 0xC093  # G, B, P, S, read/write accessed
DESC_TSS_BUSY = 0x008B  # P, 32/64-bit busy TSS: the only TR type VM entry accepts
FLAT_LIMIT = 0xFFFFF  # 4 GiB in 4 KiB units
TSS_LIMIT = 0x67  # a minimal 32-bit TSS (start_info.h: "limit 0x67")

# Page-table entry bits (SDM vol. 3A §4.5).
PTE_PRESENT = 1 << 0
PTE_RW = 1 << 1
PTE_PS = 1 << 7  # in a PD entry: maps a 2 MiB page
PAGE_SIZE = 0x1000
PT_ENTRIES = 512
PD_COUNT = 4  # four PDs of 512 x 2 MiB = 4 GiB identity-mapped
LARGE_PAGE_SHIFT = 21


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """A segment descriptor, the same packing as Linux's GDT_ENTRY()."""
    return (
        ((base & 0xFF000000) << 32)
        | ((flags & 0xF0FF) << 40)
        | ((limit & 0xF0000) << 32)
        | ((base & 0x00FFFFFF) << 16)
        | (limit & 0x0000FFFF)
    )


def segment_from_descriptor(selector: int, desc: int) -> Segment:
    """The struct kvm_segment (hidden descriptor cache) KVM needs for a loaded selector."""
    g = (desc >> 55) & 1
    limit = (desc & 0xFFFF) | ((desc >> 32) & 0xF0000)
    present = (desc >> 47) & 1
    return Segment(
        base=((desc >> 16) & 0xFFFFFF) | ((desc >> 32) & 0xFF000000),
        limit=(limit << 12) | 0xFFF if g else limit,
        selector=selector,
        type=(desc >> 40) & 0xF,
        present=present,
        dpl=(desc >> 45) & 3,
        db=(desc >> 54) & 1,
        s=(desc >> 44) & 1,
        l=(desc >> 53) & 1,
        g=g,
        avl=(desc >> 52) & 1,
        unusable=0 if present else 1,
    )


def gdt_table(mode: str) -> list[int]:
    """The boot GDT: null, null, __BOOT_CS, __BOOT_DS, __BOOT_TSS."""
    _check_mode(mode)
    code = DESC_CODE32 if mode == ENTRY_PVH else DESC_CODE64
    return [
        0,
        0,
        gdt_entry(code, 0, FLAT_LIMIT),
        gdt_entry(DESC_DATA, 0, FLAT_LIMIT),
        gdt_entry(DESC_TSS_BUSY, 0, TSS_LIMIT),
    ]


def write_gdt(memory, mode: str) -> list[int]:
    table = gdt_table(mode)
    memory.write(GDT_ADDR, struct.pack(f"<{len(table)}Q", *table))
    return table


def page_tables() -> bytes:
    """PML4, PDPT and four PDs (contiguous from PML4_ADDR) identity-mapping 4 GiB with 2 MiB pages."""
    pml4 = [0] * PT_ENTRIES
    pml4[0] = PDPT_ADDR | PTE_PRESENT | PTE_RW
    pdpt = [0] * PT_ENTRIES
    for i in range(PD_COUNT):
        pdpt[i] = (PD_ADDR + i * PAGE_SIZE) | PTE_PRESENT | PTE_RW
    pds = [(i << LARGE_PAGE_SHIFT) | PTE_PRESENT | PTE_RW | PTE_PS for i in range(PD_COUNT * PT_ENTRIES)]
    return (
        struct.pack(f"<{PT_ENTRIES}Q", *pml4)
        + struct.pack(f"<{PT_ENTRIES}Q", *pdpt)
        + struct.pack(f"<{len(pds)}Q", *pds)
    )


assert PDPT_ADDR == PML4_ADDR + PAGE_SIZE and PD_ADDR == PDPT_ADDR + PAGE_SIZE


def write_page_tables(memory) -> None:
    memory.write(PML4_ADDR, page_tables())


def write_boot_tables(memory, mode: str) -> list[int]:
    """Write the GDT and, for the 64-bit modes, the identity page tables; return the GDT."""
    table = write_gdt(memory, mode)
    if mode != ENTRY_PVH:
        write_page_tables(memory)
    return table


def entry_sregs(mode: str, table: list[int], sregs: Sregs) -> Sregs:
    """The boot vCPU's entry Sregs, given the GDT `write_boot_tables` wrote.

    `sregs` is the vCPU's current state (KVM_GET_SREGS); a modified copy comes back,
    keeping what the entry protocol leaves alone (LDT, APIC base, CR8, pending
    interrupts). For the boot vCPU only: see the module docstring for SMP.
    """
    out = copy.deepcopy(sregs)
    code = segment_from_descriptor(BOOT_CS, table[GDT_ENTRY_BOOT_CS])
    data = segment_from_descriptor(BOOT_DS, table[GDT_ENTRY_BOOT_DS])
    out.cs = code
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(out, name, copy.copy(data))
    out.tr = segment_from_descriptor(BOOT_TSS, table[GDT_ENTRY_BOOT_TSS])
    out.gdt = DTable(base=GDT_ADDR, limit=len(table) * 8 - 1)
    # No IDT: interrupts stay off until the kernel installs its own.
    out.idt = DTable(base=0, limit=0)
    if mode == ENTRY_PVH:
        out.cr0 = CR0_PROTECTED_MODE
        out.cr3 = 0
        out.cr4 = 0
        out.efer = 0
    else:
        out.cr0 = CR0_LONG_MODE
        out.cr3 = PML4_ADDR
        out.cr4 = CR4_LONG_MODE
        out.efer = EFER_LONG_MODE
    return out


def setup_sregs(memory, mode: str, sregs: Sregs) -> Sregs:
    """Write the boot tables and return the entry Sregs (both steps of the above)."""
    return entry_sregs(mode, write_boot_tables(memory, mode), sregs)


def entry_regs(mode: str, entry: int) -> Regs:
    """General registers at entry for the boot vCPU.

    linux64/elf64: RIP = entry, RSI = the zero page, RSP = the boot stack.
    pvh: RIP = EIP = entry, RBX = hvm_start_info (the ABI leaves the stack undefined;
    voidbox still points RSP at the boot stack).
    """
    _check_mode(mode)
    regs = Regs(rip=entry, rsp=BOOT_STACK_ADDR, rflags=X86_EFLAGS_FIXED)
    if mode == ENTRY_PVH:
        regs.rbx = PVH_START_INFO_ADDR
    else:
        regs.rsi = ZERO_PAGE_ADDR
    return regs


def _check_mode(mode: str) -> None:
    if mode not in ENTRY_MODES:
        raise ValueError(f"unknown entry mode {mode!r}, expected one of {', '.join(ENTRY_MODES)}")
