import pytest

from voidbox.errors import GuestMemoryError, UsageError
from voidbox.layout import MMIO_GAP_END, MMIO_GAP_START, GiB, MiB
from voidbox.memory import GuestMemory, MemoryRegion, plan_regions


def test_small_ram_is_one_region():
    assert plan_regions(64 * MiB) == (MemoryRegion(0, 64 * MiB, 0),)


def test_ram_above_the_gap_continues_at_4g():
    regions = plan_regions(4 * GiB)
    assert regions[0] == MemoryRegion(0, MMIO_GAP_START, 0)
    assert regions[1] == MemoryRegion(MMIO_GAP_END, 4 * GiB - MMIO_GAP_START, MMIO_GAP_START)


def test_read_write_and_translate():
    with GuestMemory(32 * MiB) as mem:
        mem.write(0x1000, b"voidbox")
        assert mem.read(0x1000, 7) == b"voidbox"
        assert mem.translate(0x1000) == 0x1000
        mem.write_u64(0x2000, 0x1122334455667788)
        assert mem.read_u64(0x2000) == 0x1122334455667788


@pytest.mark.parametrize("gpa,length", [(32 * MiB - 4, 8), (32 * MiB, 1), (-1, 1), (2**64 - 1, 2)])
def test_out_of_range_access_is_refused(gpa, length):
    with GuestMemory(32 * MiB) as mem:
        with pytest.raises(GuestMemoryError):
            mem.read(gpa, length)


def test_access_inside_the_mmio_gap_is_refused():
    with GuestMemory(64 * MiB) as mem:
        with pytest.raises(GuestMemoryError):
            mem.write(MMIO_GAP_START, b"x")


def test_numpy_view_shares_the_mapping():
    with GuestMemory(32 * MiB) as mem:
        view = mem.numpy_view(0x3000, 4)
        view[:] = [1, 2, 3, 4]
        assert mem.read(0x3000, 4) == bytes([1, 2, 3, 4])
        del view


def test_memory_is_a_shareable_memfd():
    import os

    with GuestMemory(32 * MiB) as mem:
        mem.write(0x10, b"shared")
        assert os.pread(mem.fd, 6, 0x10) == b"shared"


@pytest.mark.parametrize("size", [1 * MiB, 16 * MiB + 1])
def test_bad_sizes_are_usage_errors(size):
    with pytest.raises(UsageError):
        GuestMemory(size)


def test_ring_regions_give_each_region_its_own_view():
    with GuestMemory(MMIO_GAP_START + 16 * MiB) as mem:
        low, high = mem.ring_regions()
        assert (low.gpa, low.size, high.gpa, high.size) == (
            0, MMIO_GAP_START, MMIO_GAP_END, 16 * MiB)
        assert len(low.buffer) == low.size and len(high.buffer) == high.size
        assert not low.buffer.readonly
        mem.write(MMIO_GAP_END + 5, b"high")
        assert bytes(high.buffer[5:9]) == b"high"
        high.buffer[:3] = b"abc"
        assert mem.read(MMIO_GAP_END, 3) == b"abc"
