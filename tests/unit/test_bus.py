import pytest

from voidbox.devices.bus import Bus, BusConflict


class Recorder:
    def __init__(self):
        self.log = []

    def read(self, offset, size):
        self.log.append(("r", offset, size))
        return 0x1122334455667788

    def write(self, offset, size, value):
        self.log.append(("w", offset, size, value))


def test_routes_by_range_with_relative_offsets():
    bus = Bus("pio")
    a, b = Recorder(), Recorder()
    bus.register(0x3F8, 8, a)
    bus.register(0x60, 5, b)
    bus.write(0x3FA, 1, 0x41)
    assert bus.read(0x64, 1) == 0x88  # masked to the access width
    assert a.log == [("w", 2, 1, 0x41)]
    assert b.log == [("r", 4, 1)]


def test_unclaimed_accesses_read_all_ones_and_are_counted():
    bus = Bus("mmio")
    assert bus.read(0x1000, 4) == 0xFFFFFFFF
    bus.write(0x1000, 2, 7)
    assert (bus.unhandled_reads, bus.unhandled_writes) == (1, 1)


def test_access_straddling_the_end_of_a_device_is_unclaimed():
    bus = Bus("mmio")
    bus.register(0x1000, 4, Recorder())
    assert bus.read(0x1002, 4) == 0xFFFFFFFF


@pytest.mark.parametrize("base,length", [(0x100, 0x10), (0xF8, 0x10), (0x10F, 1)])
def test_overlapping_registration_is_refused(base, length):
    bus = Bus("pio")
    bus.register(0x100, 0x10, Recorder())
    with pytest.raises(BusConflict):
        bus.register(base, length, Recorder())
