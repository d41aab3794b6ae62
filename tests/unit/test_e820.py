"""The e820 map (voidbox.boot.e820)."""

from types import SimpleNamespace

import pytest

from voidbox import layout
from voidbox.boot.e820 import E820_RAM, E820_RESERVED, E820Entry, build_e820
from voidbox.memory import GuestMemory, MemoryRegion, plan_regions


def test_small_guest():
    with GuestMemory(64 << 20) as mem:
        assert build_e820(mem) == [
            E820Entry(0, layout.EBDA_ADDR, E820_RAM),
            E820Entry(layout.EBDA_ADDR, layout.HIMEM_ADDR - layout.EBDA_ADDR, E820_RESERVED),
            E820Entry(layout.HIMEM_ADDR, (64 << 20) - layout.HIMEM_ADDR, E820_RAM),
        ]


def test_guest_larger_than_the_gap_gets_ram_above_4gib():
    size = 5 << 30
    table = build_e820(SimpleNamespace(regions=plan_regions(size)))
    assert table[2] == E820Entry(layout.HIMEM_ADDR, layout.MMIO_GAP_START - layout.HIMEM_ADDR, E820_RAM)
    assert table[3] == E820Entry(layout.MMIO_GAP_END, size - layout.MMIO_GAP_START, E820_RAM)
    assert sum(e.size for e in table if e.type == E820_RAM) == size - (layout.HIMEM_ADDR - layout.EBDA_ADDR)
    for entry in table:  # nothing in the MMIO gap
        assert entry.end <= layout.MMIO_GAP_START or entry.addr >= layout.MMIO_GAP_END
    for a, b in zip(table, table[1:], strict=False):  # sorted, no overlaps
        assert a.end <= b.addr


def test_ram_must_start_at_zero():
    with pytest.raises(ValueError):
        build_e820(SimpleNamespace(regions=(MemoryRegion(0x1000, 64 << 20, 0),)))
