"""vCPU exit handling as a pure function: synthetic exits, recording buses, no /dev/kvm."""

import pytest

from voidbox.devices.bus import Bus
from voidbox.exits import (
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    InterruptedExit,
    IoExit,
    MmioExit,
    ShutdownExit,
    SystemEventExit,
    UnknownExit,
)
from voidbox.vcpu import Action, handle_exit


class Recorder:
    def __init__(self, value=0):
        self.value = value
        self.log = []

    def read(self, offset, size):
        self.log.append(("r", offset, size))
        return self.value

    def write(self, offset, size, value):
        self.log.append(("w", offset, size, value))


@pytest.fixture
def buses():
    pio, mmio = Bus("pio"), Bus("mmio")
    port_dev, mmio_dev = Recorder(0xA1B2C3D4), Recorder(0x1122334455667788)
    pio.register(0x510, 8, port_dev)
    mmio.register(0xD1000000, 0x1000, mmio_dev)
    return pio, mmio, port_dev, mmio_dev


@pytest.mark.parametrize("size,data,value", [(1, b"\x11", 0x11), (2, b"\x33\x22", 0x2233), (4, b"\x77\x66\x55\x44", 0x44556677)])
def test_port_write_widths(buses, size, data, value):
    pio, mmio, dev, _ = buses
    outcome = handle_exit(IoExit(port=0x510, size=size, is_write=True, count=1, data=data), pio, mmio)
    assert outcome.action is Action.CONTINUE and outcome.reply is None
    assert dev.log == [("w", 0, size, value)]


@pytest.mark.parametrize("size,reply", [(1, b"\xd4"), (2, b"\xd4\xc3"), (4, b"\xd4\xc3\xb2\xa1")])
def test_port_read_widths(buses, size, reply):
    pio, mmio, dev, _ = buses
    outcome = handle_exit(IoExit(port=0x511, size=size, is_write=False, count=1, data=b""), pio, mmio)
    assert outcome.reply == reply
    assert dev.log == [("r", 1, size)]


def test_string_io_repeats_per_element(buses):
    pio, mmio, dev, _ = buses
    handle_exit(IoExit(port=0x510, size=1, is_write=True, count=3, data=b"abc"), pio, mmio)
    assert [entry[3] for entry in dev.log] == [0x61, 0x62, 0x63]
    outcome = handle_exit(IoExit(port=0x510, size=2, is_write=False, count=2, data=b""), pio, mmio)
    assert outcome.reply == b"\xd4\xc3\xd4\xc3"


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_mmio_widths(buses, size):
    pio, mmio, _, dev = buses
    data = bytes(range(1, size + 1))
    handle_exit(MmioExit(addr=0xD1000008, size=size, is_write=True, data=data.ljust(8, b"\0")), pio, mmio)
    assert dev.log[-1] == ("w", 8, size, int.from_bytes(data, "little"))
    outcome = handle_exit(MmioExit(addr=0xD1000010, size=size, is_write=False, data=bytes(8)), pio, mmio)
    assert outcome.reply == (0x1122334455667788).to_bytes(8, "little")[:size]


def test_unclaimed_reads_are_all_ones(buses):
    pio, mmio, _, _ = buses
    outcome = handle_exit(IoExit(port=0x80, size=1, is_write=False, count=1, data=b""), pio, mmio)
    assert outcome.reply == b"\xff"


@pytest.mark.parametrize(
    "exit,action",
    [
        (InterruptedExit(), Action.CONTINUE),
        (ShutdownExit(), Action.TRIPLE_FAULT),
        (SystemEventExit(type=1, flags=0), Action.POWEROFF),
        (SystemEventExit(type=2, flags=0), Action.RESET),
        (SystemEventExit(type=3, flags=0), Action.INTERNAL_ERROR),
        (HltExit(), Action.POWEROFF),
        (InternalErrorExit(suberror=1, data=()), Action.INTERNAL_ERROR),
        (FailEntryExit(reason=0x21, cpu=0), Action.INTERNAL_ERROR),
        (UnknownExit(reason=999), Action.INTERNAL_ERROR),
    ],
)
def test_stop_exits(buses, exit, action):
    pio, mmio, _, _ = buses
    outcome = handle_exit(exit, pio, mmio)
    assert outcome.action is action
    if action is Action.INTERNAL_ERROR:
        assert outcome.detail and "\n" not in outcome.detail


def test_emulation_failure_is_named(buses):
    pio, mmio, _, _ = buses
    outcome = handle_exit(InternalErrorExit(suberror=1, data=()), pio, mmio)
    assert "emulation failed" in outcome.detail
