"""The i8042 controller: Linux's probe sequence and both reset paths."""

import pytest

from voidbox.devices import i8042 as k
from voidbox.devices.bus import Bus
from voidbox.devices.i8042 import I8042
from voidbox.layout import I8042_COMMAND_PORT, I8042_DATA_PORT


@pytest.fixture
def kbc():
    resets = []
    bus = Bus("pio")
    dev = I8042(lambda: resets.append(1))
    dev.register(bus)
    return bus, dev, resets


def status(bus):
    return bus.read(I8042_COMMAND_PORT, 1)


def test_claims_only_its_two_ports(kbc):
    bus, dev, _ = kbc
    for port in (0x61, 0x62, 0x63):
        assert bus.find(port) is None  # 0x61 belongs to KVM's in-kernel PIT speaker
    assert bus.find(I8042_DATA_PORT) is not None
    assert bus.find(I8042_COMMAND_PORT) is not None


def test_idle_status_lets_reboot_proceed(kbc):
    bus, _, _ = kbc
    # reboot.c's kb_wait() spins while IBF is set; i8042_flush() reads while OBF is.
    assert status(bus) & (k.I8042_STR_IBF | k.I8042_STR_OBF) == 0


def test_pulse_reset_calls_on_reset(kbc):
    bus, dev, resets = kbc
    bus.write(I8042_COMMAND_PORT, 1, k.I8042_CMD_PULSE_RESET)
    assert resets == [1]
    assert dev.resets == 1


def test_output_port_reset_line(kbc):
    bus, _, resets = kbc
    bus.write(I8042_COMMAND_PORT, 1, k.I8042_CMD_READ_OUTPUT)
    assert bus.read(I8042_DATA_PORT, 1) == k.I8042_OUTPUT_DEFAULT
    bus.write(I8042_COMMAND_PORT, 1, k.I8042_CMD_WRITE_OUTPUT)
    bus.write(I8042_DATA_PORT, 1, k.I8042_OUTPUT_DEFAULT)  # reset line stays high
    assert resets == []
    bus.write(I8042_COMMAND_PORT, 1, k.I8042_CMD_WRITE_OUTPUT)
    bus.write(I8042_DATA_PORT, 1, k.I8042_OUTPUT_A20)  # reset line driven low
    assert resets == [1]


def test_self_test_and_command_byte(kbc):
    bus, _, _ = kbc
    bus.write(I8042_COMMAND_PORT, 1, k.I8042_CMD_CTL_TEST)
    assert status(bus) & k.I8042_STR_OBF
    assert bus.read(I8042_DATA_PORT, 1) == k.I8042_CTL_TEST_OK
    assert not status(bus) & k.I8042_STR_OBF
    bus.write(I8042_COMMAND_PORT, 1, k.I8042_CMD_CTL_RCTR)
    ctr = bus.read(I8042_DATA_PORT, 1)
    assert ctr & k.I8042_CTR_SYSFLAG
    bus.write(I8042_COMMAND_PORT, 1, k.I8042_CMD_CTL_WCTR)
    bus.write(I8042_DATA_PORT, 1, 0x65)
    bus.write(I8042_COMMAND_PORT, 1, k.I8042_CMD_CTL_RCTR)
    assert bus.read(I8042_DATA_PORT, 1) == 0x65


def test_interface_tests(kbc):
    bus, _, _ = kbc
    bus.write(I8042_COMMAND_PORT, 1, k.I8042_CMD_KBD_TEST)
    assert bus.read(I8042_DATA_PORT, 1) == k.I8042_KBD_TEST_OK
    bus.write(I8042_COMMAND_PORT, 1, k.I8042_CMD_AUX_TEST)
    assert bus.read(I8042_DATA_PORT, 1) == k.I8042_AUX_TEST_NO_DEVICE


def test_enable_disable_commands_edit_the_command_byte(kbc):
    bus, _, _ = kbc
    bus.write(I8042_COMMAND_PORT, 1, k.I8042_CMD_KBD_DISABLE)
    bus.write(I8042_COMMAND_PORT, 1, k.I8042_CMD_AUX_DISABLE)
    bus.write(I8042_COMMAND_PORT, 1, k.I8042_CMD_CTL_RCTR)
    ctr = bus.read(I8042_DATA_PORT, 1)
    assert ctr & k.I8042_CTR_KBDDIS and ctr & k.I8042_CTR_AUXDIS
    bus.write(I8042_COMMAND_PORT, 1, k.I8042_CMD_KBD_ENABLE)
    bus.write(I8042_COMMAND_PORT, 1, k.I8042_CMD_AUX_ENABLE)
    bus.write(I8042_COMMAND_PORT, 1, k.I8042_CMD_CTL_RCTR)
    assert bus.read(I8042_DATA_PORT, 1) & (k.I8042_CTR_KBDDIS | k.I8042_CTR_AUXDIS) == 0


def test_keyboard_bytes_are_acknowledged_and_aux_bytes_are_not(kbc):
    bus, _, _ = kbc
    bus.write(I8042_DATA_PORT, 1, 0xF2)  # GETID to the keyboard
    assert bus.read(I8042_DATA_PORT, 1) == k.KBD_REPLY_ACK
    bus.write(I8042_COMMAND_PORT, 1, k.I8042_CMD_AUX_SEND)
    bus.write(I8042_DATA_PORT, 1, 0xF2)
    assert not status(bus) & k.I8042_STR_OBF


def test_aux_loopback_echoes(kbc):
    bus, _, _ = kbc
    bus.write(I8042_COMMAND_PORT, 1, k.I8042_CMD_AUX_LOOP)
    bus.write(I8042_DATA_PORT, 1, 0x5A)
    assert bus.read(I8042_DATA_PORT, 1) == 0x5A


def test_command_flag_in_status(kbc):
    bus, _, _ = kbc
    bus.write(I8042_COMMAND_PORT, 1, k.I8042_CMD_KBD_ENABLE)
    assert status(bus) & k.I8042_STR_CMDDAT
    bus.write(I8042_DATA_PORT, 1, 0xF4)
    assert not status(bus) & k.I8042_STR_CMDDAT


def test_unknown_command_is_counted_and_harmless(kbc):
    bus, dev, resets = kbc
    bus.write(I8042_COMMAND_PORT, 1, 0xC0)
    assert dev.unknown_commands == 1
    assert resets == []
    assert not status(bus) & k.I8042_STR_OBF


def test_output_queue_is_bounded(kbc):
    bus, _, _ = kbc
    for _ in range(k.OUTPUT_QUEUE_LIMIT + 10):
        bus.write(I8042_DATA_PORT, 1, 0xEE)
    n = 0
    while status(bus) & k.I8042_STR_OBF:
        bus.read(I8042_DATA_PORT, 1)
        n += 1
    assert n == k.OUTPUT_QUEUE_LIMIT


def test_one_range_registration_also_works():
    # A VMM may register 0x60-0x64 as one range; offsets 0 and 4 mean the same.
    resets = []
    bus = Bus("pio")
    bus.register(I8042_DATA_PORT, 5, I8042(lambda: resets.append(1)))
    bus.write(I8042_COMMAND_PORT, 1, k.I8042_CMD_PULSE_RESET)
    assert resets == [1]
    assert bus.read(0x62, 1) == 0xFF
