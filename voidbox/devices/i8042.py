"""The i8042 keyboard controller, reduced to what a Linux guest touches.

There is no keyboard or mouse behind it. Linux uses the controller for two things
here: probing it (drivers/input/serio/i8042.c: flush, self-test 0xAA, read and
write the command byte) and rebooting (arch/x86/kernel/reboot.c, "reboot=k":
wait for the input buffer to drain, then pulse the CPU reset line with command
0xFE). The pulse calls `on_reset`; so does clearing bit 0 (the reset line) of the
output port through command 0xD1.

Ports: 0x60 (data) and 0x64 (status on read, command on write). They are
registered as two one-port bus ranges (`I8042.register(bus)`), not one range
0x60-0x64, so that 0x61-0x63 stay unclaimed: port 0x61 (NMI status and the PIT
channel 2 speaker gate) belongs to KVM's in-kernel PIT when it is created with
KVM_PIT_SPEAKER_DUMMY (Documentation/virt/kvm/api.rst, KVM_CREATE_PIT2), and
nothing else lives at 0x62-0x63.

`read`/`write` take offsets relative to I8042_DATA_PORT (0 = data, 4 = status/command),
which is what the two bus windows pass on.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from ..layout import I8042_COMMAND_PORT, I8042_DATA_PORT
from .bus import Bus

DATA_OFFSET = 0
COMMAND_OFFSET = I8042_COMMAND_PORT - I8042_DATA_PORT

# Controller commands written to port 0x64
I8042_CMD_CTL_RCTR = 0x20  # read the command byte (controller configuration)
I8042_CMD_CTL_WCTR = 0x60  # write the command byte (next data byte)
I8042_CMD_AUX_DISABLE = 0xA7
I8042_CMD_AUX_ENABLE = 0xA8
I8042_CMD_AUX_TEST = 0xA9
I8042_CMD_CTL_TEST = 0xAA  # self-test: answers 0x55
I8042_CMD_KBD_TEST = 0xAB  # keyboard interface test: answers 0x00 (no error)
I8042_CMD_KBD_DISABLE = 0xAD
I8042_CMD_KBD_ENABLE = 0xAE
I8042_CMD_READ_OUTPUT = 0xD0
I8042_CMD_WRITE_OUTPUT = 0xD1  # next data byte is the output port
I8042_CMD_AUX_LOOP = 0xD3
I8042_CMD_AUX_SEND = 0xD4
I8042_CMD_PULSE_RESET = 0xFE  # pulse output port bit 0 (CPU reset) low

# Status register bits (port 0x64 read)
I8042_STR_OBF = 0x01  # output buffer full: a byte waits at port 0x60
I8042_STR_IBF = 0x02  # input buffer full: never, writes are handled at once
I8042_STR_SYSFLAG = 0x04  # set after a successful self-test (POST done)
I8042_STR_CMDDAT = 0x08  # last write went to the command port
I8042_STR_KEYLOCK = 0x10  # keyboard not inhibited
I8042_STR_AUXDATA = 0x20

# Command byte bits
I8042_CTR_KBDINT = 0x01
I8042_CTR_AUXINT = 0x02
I8042_CTR_SYSFLAG = 0x04
I8042_CTR_KBDDIS = 0x10
I8042_CTR_AUXDIS = 0x20
I8042_CTR_XLATE = 0x40

I8042_CTL_TEST_OK = 0x55
I8042_KBD_TEST_OK = 0x00
I8042_AUX_TEST_NO_DEVICE = 0x01  # "clock line stuck low": no mouse behind the port

# Output port: bit 0 is the CPU reset line (active low), bit 1 the A20 gate.
I8042_OUTPUT_RESET_N = 0x01
I8042_OUTPUT_A20 = 0x02
I8042_OUTPUT_DEFAULT = I8042_OUTPUT_RESET_N | I8042_OUTPUT_A20

# A byte sent to the keyboard is acknowledged, as a keyboard would; there is none,
# but an ACK keeps drivers that poll for one from waiting out their timeout.
KBD_REPLY_ACK = 0xFA
KBD_REPLY_RESEND = 0xFE

OUTPUT_QUEUE_LIMIT = 16


class _PortWindow:
    """One port of the controller as a bus device: adds the port's offset back."""

    def __init__(self, device: I8042, offset: int):
        self._device = device
        self._offset = offset

    def read(self, offset: int, size: int) -> int:
        return self._device.read(self._offset + offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._device.write(self._offset + offset, size, value)


class I8042:
    """The 8042 controller at ports 0x60 and 0x64; no keyboard, no mouse."""

    def __init__(self, on_reset: Callable[[], None]):
        self._on_reset = on_reset
        self._lock = threading.Lock()
        self._ctr = I8042_CTR_SYSFLAG | I8042_CTR_XLATE | I8042_CTR_KBDINT
        self._output_port = I8042_OUTPUT_DEFAULT
        self._status = I8042_STR_SYSFLAG | I8042_STR_KEYLOCK
        self._pending_command: int | None = None
        self._out: deque[int] = deque(maxlen=OUTPUT_QUEUE_LIMIT)
        self.resets = 0
        self.unknown_commands = 0

    def register(self, bus: Bus) -> None:
        """Claim ports 0x60 and 0x64 only (see the module docstring)."""
        bus.register(I8042_DATA_PORT, 1, _PortWindow(self, DATA_OFFSET))
        bus.register(I8042_COMMAND_PORT, 1, _PortWindow(self, COMMAND_OFFSET))

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == DATA_OFFSET:
                value = self._out.popleft() if self._out else 0
            elif offset == COMMAND_OFFSET:
                value = self._status | (I8042_STR_OBF if self._out else 0)
            else:
                return (1 << (8 * size)) - 1
        # Byte-wide registers: the upper lanes of a wider access float high.
        return value | (((1 << (8 * size)) - 1) & ~0xFF)

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        reset = False
        with self._lock:
            if offset == COMMAND_OFFSET:
                self._status |= I8042_STR_CMDDAT
                reset = self._command(value)
            elif offset == DATA_OFFSET:
                self._status &= ~I8042_STR_CMDDAT
                reset = self._data(value)
            if reset:
                self.resets += 1
        # Outside the lock: the VMM's reset path may stop vCPUs that are waiting on it.
        if reset:
            self._on_reset()

    def _command(self, cmd: int) -> bool:
        self._pending_command = None
        if cmd == I8042_CMD_CTL_RCTR:
            self._out.append(self._ctr)
        elif cmd in (I8042_CMD_CTL_WCTR, I8042_CMD_WRITE_OUTPUT, I8042_CMD_AUX_LOOP,
                     I8042_CMD_AUX_SEND):
            self._pending_command = cmd
        elif cmd == I8042_CMD_CTL_TEST:
            self._out.append(I8042_CTL_TEST_OK)
        elif cmd == I8042_CMD_KBD_TEST:
            self._out.append(I8042_KBD_TEST_OK)
        elif cmd == I8042_CMD_AUX_TEST:
            self._out.append(I8042_AUX_TEST_NO_DEVICE)
        elif cmd == I8042_CMD_KBD_DISABLE:
            self._ctr |= I8042_CTR_KBDDIS
        elif cmd == I8042_CMD_KBD_ENABLE:
            self._ctr &= ~I8042_CTR_KBDDIS
        elif cmd == I8042_CMD_AUX_DISABLE:
            self._ctr |= I8042_CTR_AUXDIS
        elif cmd == I8042_CMD_AUX_ENABLE:
            self._ctr &= ~I8042_CTR_AUXDIS
        elif cmd == I8042_CMD_READ_OUTPUT:
            self._out.append(self._output_port)
        elif cmd == I8042_CMD_PULSE_RESET:
            return True
        else:
            self.unknown_commands += 1
        return False

    def _data(self, value: int) -> bool:
        cmd, self._pending_command = self._pending_command, None
        if cmd == I8042_CMD_CTL_WCTR:
            self._ctr = value
        elif cmd == I8042_CMD_WRITE_OUTPUT:
            self._output_port = value
            return not value & I8042_OUTPUT_RESET_N
        elif cmd == I8042_CMD_AUX_LOOP:
            self._out.append(value)
        elif cmd == I8042_CMD_AUX_SEND:
            # No mouse: an absent AUX device answers nothing; Linux times out and
            # reports no mouse, which is the truth.
            pass
        else:
            self._out.append(KBD_REPLY_ACK)
        return False
