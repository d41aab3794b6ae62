"""A guest-side virtio driver mock: writes descriptor tables and rings into guest memory.

Plays the driver of virtio 1.2 §2.7.13 (supplying buffers) and §2.7.14 (receiving used
buffers) over a voidbox.memory.GuestMemory, so queue tests need no guest. It can also
write anything a hostile driver would: raw descriptors, raw ring slots and indexes.
"""

from __future__ import annotations

import mmap
import struct

from voidbox._ring_py import (
    VIRTQ_AVAIL_ELEM_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_DESC_SIZE,
    VIRTQ_RING_HEADER_SIZE,
    VIRTQ_USED_ELEM_SIZE,
)

DESC_ADDR = 0x10_0000
AVAIL_ADDR = 0x20_0000
USED_ADDR = 0x30_0000
INDIRECT_ADDR = 0x40_0000  # indirect tables, bump-allocated
DATA_ADDR = 0x100_0000  # buffers, bump-allocated

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


class RegionMemory:
    """Guest memory made of separate anonymous mmaps, one per region, like a vhost-user
    backend's memory table: `layout` is [(gpa, size), ...]. Offers what Driver and
    Virtqueue use (read, write, ring_regions) and nothing that assumes one mapping.
    """

    def __init__(self, layout):
        self.regions = [(gpa, size, mmap.mmap(-1, size)) for gpa, size in layout]

    def ring_regions(self):
        return [(gpa, size, memoryview(area)) for gpa, size, area in self.regions]

    def _view(self, gpa: int, length: int) -> memoryview:
        for rgpa, size, area in self.regions:
            if rgpa <= gpa and gpa + length <= rgpa + size:
                return memoryview(area)[gpa - rgpa : gpa - rgpa + length]
        raise ValueError(f"{gpa:#x}+{length:#x} is not inside one region")

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self._view(gpa, length))

    def write(self, gpa: int, data) -> None:
        self._view(gpa, len(data))[:] = data


class Driver:
    """The driver side of one split virtqueue in `memory`.

    configure(queue) activates a device Virtqueue with the ring addresses, the way the
    transport would after the driver's register writes.
    """

    def __init__(self, memory, size: int = 256, desc_addr: int = DESC_ADDR,
                 avail_addr: int = AVAIL_ADDR, used_addr: int = USED_ADDR, event_idx: bool = False):
        self.memory = memory
        self.size = size
        self.desc_addr = desc_addr
        self.avail_addr = avail_addr
        self.used_addr = used_addr
        self.event_idx = event_idx
        self.avail_idx = 0
        self.last_used = 0
        self.free = list(range(size))
        self._data_next = DATA_ADDR
        self._indirect_next = INDIRECT_ADDR

    def ring_config(self) -> dict:
        """The keyword arguments of Virtqueue.activate() for this driver's rings."""
        return {"size": self.size, "desc_addr": self.desc_addr, "avail_addr": self.avail_addr,
                "used_addr": self.used_addr, "event_idx": self.event_idx}

    def configure(self, queue, **overrides):
        """queue.activate() with this driver's rings, `overrides` replacing any of them
        (a hostile driver's registers); returns the queue."""
        queue.activate(**{**self.ring_config(), **overrides})
        return queue

    # -- memory ------------------------------------------------------------------------

    def alloc(self, length: int, fill: bytes | None = None) -> int:
        """A fresh data buffer (16-byte aligned), optionally filled."""
        gpa = self._data_next
        self._data_next += (max(length, 1) + 15) & ~15
        if fill is not None:
            self.memory.write(gpa, fill)
        return gpa

    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next: int = 0,
                   table: int | None = None) -> None:
        base = self.desc_addr if table is None else table
        self.memory.write(base + VIRTQ_DESC_SIZE * index, _DESC.pack(addr, length, flags, next))

    def read_desc(self, index: int) -> tuple[int, int, int, int]:
        return _DESC.unpack(self.memory.read(self.desc_addr + VIRTQ_DESC_SIZE * index, VIRTQ_DESC_SIZE))

    def _u16(self, gpa: int) -> int:
        return _U16.unpack(self.memory.read(gpa, 2))[0]

    def _set_u16(self, gpa: int, value: int) -> None:
        self.memory.write(gpa, _U16.pack(value & 0xFFFF))

    # -- available ring -----------------------------------------------------------------

    def set_avail_slot(self, slot: int, head: int) -> None:
        self._set_u16(self.avail_addr + VIRTQ_RING_HEADER_SIZE + VIRTQ_AVAIL_ELEM_SIZE * slot, head)

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self._set_u16(self.avail_addr + 2, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self._set_u16(self.avail_addr, flags)

    def set_used_event(self, value: int) -> None:
        self._set_u16(self.avail_addr + VIRTQ_RING_HEADER_SIZE + VIRTQ_AVAIL_ELEM_SIZE * self.size, value)

    def offer(self, head: int, publish: bool = True) -> None:
        """Put `head` in the next available slot and (by default) bump avail->idx."""
        self.set_avail_slot(self.avail_idx % self.size, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.set_avail_idx(self.avail_idx)

    def add_chain(self, buffers, publish: bool = True) -> int:
        """Chain [(gpa, length, writable), ...] through free descriptors; returns the head."""
        indexes = [self.free.pop(0) for _ in buffers]
        for i, (gpa, length, writable) in enumerate(buffers):
            last = i == len(buffers) - 1
            flags = (0 if last else VIRTQ_DESC_F_NEXT) | (VIRTQ_DESC_F_WRITE if writable else 0)
            self.write_desc(indexes[i], gpa, length, flags, 0 if last else indexes[i + 1])
        self.offer(indexes[0], publish)
        return indexes[0]

    def add_buffers(self, readable=(), writable=(), publish: bool = True) -> int:
        """A chain over fresh buffers: `readable` are bytes to send, `writable` lengths."""
        bufs = [(self.alloc(len(data), data), len(data), False) for data in readable]
        bufs += [(self.alloc(n, bytes(n)), n, True) for n in writable]
        return self.add_chain(bufs, publish)

    def indirect_table(self, entries) -> tuple[int, int]:
        """Write raw [(addr, len, flags, next), ...] as an indirect table; (gpa, bytes)."""
        gpa = self._indirect_next
        self._indirect_next += (VIRTQ_DESC_SIZE * max(len(entries), 1) + 15) & ~15
        for i, (addr, length, flags, nxt) in enumerate(entries):
            self.write_desc(i, addr, length, flags, nxt, table=gpa)
        return gpa, VIRTQ_DESC_SIZE * len(entries)

    def add_indirect(self, buffers, publish: bool = True) -> int:
        """One main descriptor pointing at an indirect table of `buffers` (§2.7.5.3)."""
        entries = []
        for i, (gpa, length, writable) in enumerate(buffers):
            last = i == len(buffers) - 1
            flags = (0 if last else VIRTQ_DESC_F_NEXT) | (VIRTQ_DESC_F_WRITE if writable else 0)
            entries.append((gpa, length, flags, 0 if last else i + 1))
        table, nbytes = self.indirect_table(entries)
        head = self.free.pop(0)
        self.write_desc(head, table, nbytes, VIRTQ_DESC_F_INDIRECT)
        self.offer(head, publish)
        return head

    # -- used ring -------------------------------------------------------------------------

    @property
    def used_idx(self) -> int:
        return self._u16(self.used_addr + 2)

    @property
    def used_flags(self) -> int:
        return self._u16(self.used_addr)

    @property
    def avail_event(self) -> int:
        return self._u16(self.used_addr + VIRTQ_RING_HEADER_SIZE + VIRTQ_USED_ELEM_SIZE * self.size)

    def used_entry(self, slot: int) -> tuple[int, int]:
        gpa = self.used_addr + VIRTQ_RING_HEADER_SIZE + VIRTQ_USED_ELEM_SIZE * (slot % self.size)
        return _USED_ELEM.unpack(self.memory.read(gpa, VIRTQ_USED_ELEM_SIZE))

    def collect(self, recycle: bool = False) -> list[tuple[int, int]]:
        """Used entries (id, len) published since the last collect (§2.7.14)."""
        out = []
        idx = self.used_idx
        while self.last_used != idx:
            out.append(self.used_entry(self.last_used))
            self.last_used = (self.last_used + 1) & 0xFFFF
        if recycle:
            for head, _ in out:
                self.recycle(head)
        return out

    def recycle(self, head: int) -> None:
        """Return the descriptors of the chain at `head` to the free list (driver-side)."""
        idx = head
        for _ in range(self.size):
            self.free.append(idx)
            _addr, _len, flags, nxt = self.read_desc(idx)
            if not flags & VIRTQ_DESC_F_NEXT or flags & VIRTQ_DESC_F_INDIRECT:
                return
            idx = nxt
