"""Hardware-reduced ACPI sleep registers: S5 powers off, nothing else does."""

import pytest

from voidbox.devices import acpi_pm as a
from voidbox.devices.acpi_pm import AcpiPm
from voidbox.devices.bus import Bus
from voidbox.layout import ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT


def sleep_value(sleep_type, enable=True):
    return (sleep_type << a.ACPI_SLEEP_TYPE_SHIFT) | (a.ACPI_SLEEP_ENABLE if enable else 0)


@pytest.fixture
def pm():
    events = []
    bus = Bus("pio")
    dev = AcpiPm(lambda: events.append("off"), lambda: events.append("reset"))
    bus.register(ACPI_SLEEP_CONTROL_PORT, a.ACPI_PM_PORTS, dev)
    return bus, dev, events


def test_layout_and_constants_agree():
    assert a.ACPI_PM_PORTS == 2
    assert sleep_value(a.ACPI_S5_SLEEP_TYPE) == 0x34  # what the tiny guests write
    assert a.ACPI_SLEEP_TYPE_MASK >> a.ACPI_SLEEP_TYPE_SHIFT == 0b111


def test_s5_powers_off(pm):
    bus, dev, events = pm
    bus.write(ACPI_SLEEP_CONTROL_PORT, 1, sleep_value(a.ACPI_S5_SLEEP_TYPE))
    assert events == ["off"]
    assert dev.poweroffs == 1


def test_linux_sequence(pm):
    # acpi_hw_extended_sleep: clear WAK_STS, then SLP_TYP | SLP_EN.
    bus, _, events = pm
    bus.write(ACPI_SLEEP_STATUS_PORT, 1, a.ACPI_WAKE_STATUS)
    bus.write(ACPI_SLEEP_CONTROL_PORT, 1, sleep_value(5))
    assert events == ["off"]


@pytest.mark.parametrize("sleep_type", [0, 1, 2, 3, 4, 6, 7])
def test_other_sleep_types_are_ignored_and_counted(pm, sleep_type):
    bus, dev, events = pm
    bus.write(ACPI_SLEEP_CONTROL_PORT, 1, sleep_value(sleep_type))
    assert events == []
    assert dev.ignored_sleeps == 1


def test_s5_without_slp_en_does_nothing(pm):
    bus, dev, events = pm
    bus.write(ACPI_SLEEP_CONTROL_PORT, 1, sleep_value(5, enable=False))
    assert events == []
    assert dev.ignored_writes == 1


def test_reset_value(pm):
    bus, dev, events = pm
    bus.write(ACPI_SLEEP_CONTROL_PORT, 1, a.ACPI_RESET_VALUE)
    assert events == ["reset"]
    assert dev.resets == 1


def test_reset_value_without_handler_is_ignored():
    events = []
    dev = AcpiPm(lambda: events.append("off"))
    dev.write(a.SLEEP_CONTROL_OFFSET, 1, a.ACPI_RESET_VALUE)
    assert events == []
    assert dev.ignored_writes == 1


def test_registers_read(pm):
    bus, _, _ = pm
    assert bus.read(ACPI_SLEEP_CONTROL_PORT, 1) == 0  # write-only, SLP_EN reads 0
    assert bus.read(ACPI_SLEEP_STATUS_PORT, 1) & a.ACPI_WAKE_STATUS == 0


def test_wide_write_reaches_both_registers(pm):
    bus, _, events = pm
    bus.write(ACPI_SLEEP_CONTROL_PORT, 2, (a.ACPI_WAKE_STATUS << 8) | sleep_value(5))
    assert events == ["off"]


def test_poweroff_callback_runs_outside_the_lock():
    # The VMM's stop path may touch the device again (another vCPU's exit) from the
    # callback; a lock held across it would deadlock.
    seen = []
    dev = AcpiPm(lambda: seen.append(dev.read(a.SLEEP_STATUS_OFFSET, 1)))
    dev.write(a.SLEEP_CONTROL_OFFSET, 1, sleep_value(5))
    assert seen == [0]
