"""Hardware-reduced ACPI sleep registers: how a guest powers itself off.

A hardware-reduced platform (FADT flag HW_REDUCED_ACPI) has no PM1 blocks; the FADT's
SLEEP_CONTROL_REG and SLEEP_STATUS_REG point here instead (ACPI 6.4 §4.8.3.7 Sleep
Control Register, §4.8.3.8 Sleep Status Register):

    SLEEP_CONTROL_REG (ACPI_SLEEP_CONTROL_PORT), write-only
        bits 2-4  SLP_TYPx  the sleep type, from the DSDT's \\_Sx_ package
        bit 5     SLP_EN    write 1 to enter that sleep state
    SLEEP_STATUS_REG (ACPI_SLEEP_STATUS_PORT)
        bit 7     WAK_STS   set on wake; write 1 to clear

Linux writes SLP_TYP from \\_S5_ (Package {5, ...} in voidbox's DSDT) with SLP_EN
to power off (drivers/acpi/acpica/hwxfsleep.c, acpi_hw_extended_sleep). S5 calls
`on_poweroff`; other sleep types are not supported and are counted.

Reset: the FADT's RESET_REG may name SLEEP_CONTROL_REG with RESET_VALUE =
ACPI_RESET_VALUE (as Cloud Hypervisor does). Bit 0 is reserved in the sleep control
register, so a write of exactly that value cannot mean a sleep request; it calls
`on_reset` when one was given. The ACPI table writer chooses whether to advertise it.

Register one device covering both ports: base ACPI_SLEEP_CONTROL_PORT, length
ACPI_PM_PORTS.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..layout import ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT

SLEEP_CONTROL_OFFSET = 0
SLEEP_STATUS_OFFSET = ACPI_SLEEP_STATUS_PORT - ACPI_SLEEP_CONTROL_PORT
ACPI_PM_PORTS = SLEEP_STATUS_OFFSET + 1

ACPI_SLEEP_TYPE_SHIFT = 2
ACPI_SLEEP_TYPE_MASK = 0x1C  # SLP_TYPx, bits 2-4
ACPI_SLEEP_ENABLE = 0x20  # SLP_EN, bit 5
ACPI_WAKE_STATUS = 0x80  # WAK_STS, bit 7 of the status register

ACPI_S5_SLEEP_TYPE = 5
"""SLP_TYP of \\_S5_ in voidbox's DSDT (the ACPI table writer must match it)."""

ACPI_RESET_VALUE = 1
"""FADT RESET_VALUE when RESET_REG names the sleep control register (bit 0, reserved)."""


class AcpiPm:
    """The two hardware-reduced sleep registers at ACPI_SLEEP_CONTROL_PORT."""

    def __init__(self, on_poweroff: Callable[[], None],
                 on_reset: Callable[[], None] | None = None):
        self._on_poweroff = on_poweroff
        self._on_reset = on_reset
        self._lock = threading.Lock()
        self._wake_status = 0
        self.poweroffs = 0
        self.resets = 0
        self.ignored_sleeps = 0
        self.ignored_writes = 0

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == SLEEP_STATUS_OFFSET:
                return self._wake_status
            # The sleep control register is write-only; SLP_EN reads as 0 (§4.8.3.7).
            return 0

    def write(self, offset: int, size: int, value: int) -> None:
        action = None
        with self._lock:
            if offset == SLEEP_STATUS_OFFSET:
                # WAK_STS is write-1-to-clear (§4.8.3.8); Linux clears it before sleeping.
                if value & ACPI_WAKE_STATUS:
                    self._wake_status = 0
                return
            # A wider write at the control port also reaches the status port, as
            # the two byte registers sit side by side.
            if size > 1 and value >> 8 & ACPI_WAKE_STATUS:
                self._wake_status = 0
            control = value & 0xFF
            if control & ACPI_SLEEP_ENABLE:
                sleep_type = (control & ACPI_SLEEP_TYPE_MASK) >> ACPI_SLEEP_TYPE_SHIFT
                if sleep_type == ACPI_S5_SLEEP_TYPE:
                    self.poweroffs += 1
                    action = self._on_poweroff
                else:
                    self.ignored_sleeps += 1
            elif control == ACPI_RESET_VALUE and self._on_reset is not None:
                self.resets += 1
                action = self._on_reset
            else:
                self.ignored_writes += 1
        # Outside the lock: the VMM's stop path may wait for other vCPUs in here.
        if action is not None:
            action()
