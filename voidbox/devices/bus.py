"""Port-I/O and MMIO buses: route a vCPU exit's address to the device that owns it.

A device on a bus implements `read(offset, size) -> int` and
`write(offset, size, value) -> None`, with `offset` relative to the base it was
registered at. Accesses that hit no device read as all-ones and are dropped,
as on real hardware; they are counted so tests and `--debug` can see them.
"""

from __future__ import annotations

import bisect
import threading

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at start-up
if TYPE_CHECKING:
    from typing import Protocol

    class BusDevice(Protocol):
        def read(self, offset: int, size: int) -> int: ...

        def write(self, offset: int, size: int, value: int) -> None: ...


class BusConflict(ValueError):
    """Two devices claimed overlapping ranges."""


class Bus:
    def __init__(self, name: str):
        self.name = name
        self._starts: list[int] = []
        self._entries: list[tuple[int, int, BusDevice]] = []
        self.unhandled_reads = 0
        self.unhandled_writes = 0
        # Devices with several vCPUs are serialized per device by their own locks; the
        # bus lock only guards registration.
        self._lock = threading.Lock()

    def register(self, base: int, length: int, device: BusDevice) -> None:
        if length <= 0:
            raise ValueError("bus range must not be empty")
        with self._lock:
            i = bisect.bisect_left(self._starts, base)
            if i > 0:
                pbase, plen, _ = self._entries[i - 1]
                if pbase + plen > base:
                    raise BusConflict(f"{self.name}: {base:#x} overlaps {pbase:#x}+{plen:#x}")
            if i < len(self._entries) and base + length > self._entries[i][0]:
                raise BusConflict(f"{self.name}: {base:#x}+{length:#x} overlaps {self._entries[i][0]:#x}")
            self._starts.insert(i, base)
            self._entries.insert(i, (base, length, device))

    def find(self, addr: int, size: int = 1) -> tuple[int, BusDevice] | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        base, length, device = self._entries[i]
        if addr + size > base + length:
            return None
        return base, device

    def read(self, addr: int, size: int) -> int:
        hit = self.find(addr, size)
        if hit is None:
            self.unhandled_reads += 1
            return (1 << (8 * size)) - 1
        base, device = hit
        return device.read(addr - base, size) & ((1 << (8 * size)) - 1)

    def write(self, addr: int, size: int, value: int) -> None:
        hit = self.find(addr, size)
        if hit is None:
            self.unhandled_writes += 1
            return
        base, device = hit
        device.write(addr - base, size, value)
