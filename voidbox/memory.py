"""Guest RAM: one shared memfd mapping, laid out around the MMIO gap below 4 GiB.

The mapping is MAP_SHARED over a memfd so that another process (a vhost-user
backend) can map the same pages. Guest-physical addresses translate to offsets in
the mapping through `regions`; every helper here checks bounds, because addresses
come from the guest.

Virtqueues take one host buffer per region (`ring_regions()`), as a vhost-user backend
gets one mmap per region; KVM memory slots take the mapping (`memory.mmap`) and
`regions`. numpy views are for the Python API and tests and import numpy lazily.
"""

from __future__ import annotations

import mmap
import os

from ._records import dataclass, named_tuple
from .errors import GuestMemoryError, UsageError
from .layout import MIN_MEM, MMIO_GAP_END, MMIO_GAP_START


@dataclass(frozen=True)
class MemoryRegion:
    """A guest-physical range backed by `size` bytes at `offset` in the memfd."""

    gpa: int
    size: int
    offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


@named_tuple
class HostRegion:
    """A guest-physical range and a writable buffer over its `size` bytes of host memory."""

    gpa: int
    size: int
    buffer: memoryview


def plan_regions(size: int) -> tuple[MemoryRegion, ...]:
    """Split `size` bytes of RAM around the MMIO gap [3 GiB, 4 GiB)."""
    low = min(size, MMIO_GAP_START)
    regions = [MemoryRegion(0, low, 0)]
    if size > low:
        regions.append(MemoryRegion(MMIO_GAP_END, size - low, low))
    return tuple(regions)


class GuestMemory:
    """Guest RAM backed by a memfd.

    >>> mem = GuestMemory(64 << 20)
    >>> mem.write(0x1000, b"hi"); mem.read(0x1000, 2)
    b'hi'
    """

    def __init__(self, size: int, name: str = "voidbox-ram"):
        if size < MIN_MEM or size % mmap.PAGESIZE:
            raise UsageError(
                f"guest memory must be a multiple of {mmap.PAGESIZE} bytes and at least "
                f"{MIN_MEM >> 20} MiB, got {size}"
            )
        self.size = size
        self.regions = plan_regions(size)
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.mmap = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(self.fd)
            raise
        self._view = memoryview(self.mmap)
        self._numpy = None

    # -- translation ---------------------------------------------------------------

    def translate(self, gpa: int, length: int = 1) -> int:
        """Offset in the mapping of [gpa, gpa+length); the range must lie in one region."""
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"bad guest range {gpa:#x}+{length}")
        for region in self.regions:
            if region.gpa <= gpa and gpa + length <= region.end:
                return region.offset + (gpa - region.gpa)
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is outside guest RAM")

    def contains(self, gpa: int, length: int = 1) -> bool:
        return any(r.gpa <= gpa and gpa + length <= r.end for r in self.regions)

    def ring_regions(self) -> tuple[HostRegion, ...]:
        """Each region with a view of its own host memory, for voidbox.ring.Virtqueue.

        The views are new on each call; whoever holds one keeps the mapping alive (close()
        then leaves it to the last holder).
        """
        return tuple(HostRegion(r.gpa, r.size, self._view[r.offset : r.offset + r.size])
                     for r in self.regions)

    # -- access --------------------------------------------------------------------

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy, writable view of guest memory."""
        offset = self.translate(gpa, length)
        return self._view[offset : offset + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.view(gpa, 8), "little")

    def write_u64(self, gpa: int, value: int) -> None:
        self.view(gpa, 8)[:] = value.to_bytes(8, "little")

    def numpy(self):
        """The whole mapping as a numpy uint8 array (numpy imported on first use)."""
        if self._numpy is None:
            import numpy

            self._numpy = numpy.frombuffer(self.mmap, dtype=numpy.uint8)
        return self._numpy

    def numpy_view(self, gpa: int, length: int):
        offset = self.translate(gpa, length)
        return self.numpy()[offset : offset + length]

    # -- lifetime ------------------------------------------------------------------

    def close(self) -> None:
        if self.fd < 0:
            return
        self._numpy = None
        self._view.release()
        try:
            self.mmap.close()
        except BufferError:
            # A caller still holds a view; the mapping goes when the last one does.
            pass
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
