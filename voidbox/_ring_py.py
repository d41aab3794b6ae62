"""Split virtqueues over guest memory, device side: the pure-Python twin of `_ring.pyx`.

virtio 1.2 §2.7 (split virtqueues). Both implementations expose the same names and
behave the same way; `voidbox.ring` picks one. The guest is hostile, so:

- activate(size, desc_addr, avail_addr, used_addr, event_idx) takes the driver's whole
  configuration in one call and validates it once: size a power of two in 1..max_size,
  each ring aligned (§2.7: 16/2/4) and inside one guest memory region at its full
  size, used_event and avail_event included. The queue keeps its own copy (the
  attributes of that name are read-only), so a driver rewriting its registers changes
  nothing until the next activate(), and the used slot is always writable before any
  side effect. A configuration that fails leaves the queue inactive.
- every ring index and descriptor is read once into a local, then validated;
- a chain walk is bounded by the queue size (§2.7.5.3.1: no chain longer than the
  Queue Size), which catches loops and self-referential `next`; the only legitimate
  end of a chain is a descriptor without VIRTQ_DESC_F_NEXT. A chain holds at most
  `size` data descriptors in all (the indirect pointer not counted), and an indirect
  table at most `size` entries;
- malformed: `next` >= the table's entry count; a buffer not wholly inside one memory
  region (checked without forming addr+len, so addresses near 2^64 cannot wrap; a
  buffer that crosses from one region into the next is malformed too, even when the
  regions are adjacent in guest-physical space); a
  device-readable descriptor after a device-writable one (§2.7.4.2); a direction the
  caller excluded with `require`; for indirect tables (§2.7.5.3): INDIRECT inside a
  table, INDIRECT together with NEXT, a length that is zero or not a multiple of 16,
  a table outside memory. WRITE on the indirect pointer is ignored (§2.7.5.3.2), and
  normal descriptors may precede the indirect one;
- a malformed chain is consumed: its head goes to the used ring with length 0,
  `malformed` goes up, and the queue carries on; it is never handed to the device;
- a head >= queue size in the available ring cannot be retired (the driver rejects a
  used entry naming it), so the ring is unusable: the chains before it are handed
  over and the next pop() raises QueueError (at once if it was the first entry);
  the device then sets DEVICE_NEEDS_RESET (§2.1.2); reset() + activate() recover;
- the available index moving by more than the queue size is a QueueError too;
- each pop takes at most one queue's worth of entries, every ring offset is taken
  modulo the queue size and indexes are free-running u16.

Guest memory is a list of regions, each with its own host memory (see host_regions()):
the VMM passes the regions of its one memfd mapping, a vhost-user backend one mmap per
region of the frontend's memory table. A ring part or a buffer lies in one region; a
chain's segments may each sit in a different one.

`in_flight` counts chains popped and not yet pushed (a debug count: tests assert it
returns to zero). A Virtqueue belongs to one device thread; it takes no locks.

Memory ordering (§2.7.13, §2.7.14): the device reads avail->idx before the ring
entries it covers, and writes used ring entries before used->idx. Python executes
the accesses in program order and x86-64 keeps loads and stores in order (TSO), so
no fence is needed here; the compiled twin uses explicit acquire/release atomics.
Fields are little-endian (§1.4); voidbox runs on x86-64 hosts only.
"""

from __future__ import annotations

import operator
import struct

# virtio 1.2 §2.7.5: struct virtq_desc flags
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# §2.7.6 / §2.7.8: ring flags
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

# §2.7: Queue Size is a power of two, at most 32768
VIRTQ_MAX_SIZE = 32768
# §2.7 table: alignment of each part
VIRTQ_DESC_ALIGN = 16
VIRTQ_AVAIL_ALIGN = 2
VIRTQ_USED_ALIGN = 4
# struct sizes (§2.7.5, §2.7.6, §2.7.8)
VIRTQ_DESC_SIZE = 16
VIRTQ_AVAIL_ELEM_SIZE = 2
VIRTQ_USED_ELEM_SIZE = 8
VIRTQ_RING_HEADER_SIZE = 4  # le16 flags, le16 idx
VIRTQ_EVENT_SIZE = 2  # le16 used_event / avail_event after the ring
RING_IDX_OFFSET = 2  # idx follows flags in both rings

# Direction requirements a device passes to pop() (§2.7.5.1: a device never writes a
# device-readable buffer; a TX queue carries only readable buffers, RX only writable).
REQUIRE_ANY = 0
REQUIRE_READABLE = 1  # every descriptor must be device-readable
REQUIRE_WRITABLE = 2  # every descriptor must be device-writable

_U16_MASK = 0xFFFF
_U32_MAX = 0xFFFFFFFF
_U64_MAX = (1 << 64) - 1

# Guest memory regions a queue can span (VB_MAX_REGIONS in _ring.pxd)
MAX_REGIONS = 8

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


def _check_u32(size: int) -> None:
    """Refuse what the compiled twin's uint32_t argument refuses."""
    if size < 0:
        raise OverflowError("can't convert negative value to uint32_t")
    if size > 0xFFFF_FFFF:
        raise OverflowError("value too large to convert to uint32_t")


def desc_table_size(size: int) -> int:
    """Bytes of the descriptor table (§2.7)."""
    _check_u32(size)
    return VIRTQ_DESC_SIZE * size


def avail_ring_size(size: int) -> int:
    """Bytes of the available ring including used_event (§2.7)."""
    _check_u32(size)
    return VIRTQ_RING_HEADER_SIZE + VIRTQ_AVAIL_ELEM_SIZE * size + VIRTQ_EVENT_SIZE


def used_ring_size(size: int) -> int:
    """Bytes of the used ring including avail_event (§2.7)."""
    _check_u32(size)
    return VIRTQ_RING_HEADER_SIZE + VIRTQ_USED_ELEM_SIZE * size + VIRTQ_EVENT_SIZE


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """True if moving a ring index from old_idx to new_idx passed event_idx (§2.7.7, §2.7.10).

    All three are free-running u16 indexes; the comparison is wraparound-safe.
    """
    if not (0 <= event_idx <= _U16_MASK and 0 <= new_idx <= _U16_MASK
            and 0 <= old_idx <= _U16_MASK):
        # As the compiled twin's uint16_t arguments refuse them.
        worst = min(event_idx, new_idx, old_idx)
        raise OverflowError("can't convert negative value to uint16_t" if worst < 0
                            else "value too large to convert to uint16_t")
    return ((new_idx - event_idx - 1) & _U16_MASK) < ((new_idx - old_idx) & _U16_MASK)


class QueueError(Exception):
    """The queue itself is unusable: the device must set DEVICE_NEEDS_RESET (§2.1.2)."""


def host_regions(memory) -> tuple[tuple[int, int, memoryview], ...]:
    """The validated (gpa, size, view) regions a Virtqueue runs over, sorted by gpa.

    `memory` is a sequence of (gpa, size, buffer), or an object with ring_regions()
    returning one (voidbox.memory.GuestMemory). Each buffer exports that region's host
    memory: writable, contiguous, at least `size` bytes, and aligned like the guest
    address modulo 16 (the largest ring alignment, §2.7), so a ring part aligned in the
    guest is aligned on the host. Regions must not be empty or overlap, and there are at
    most MAX_REGIONS. Anything else is a ValueError. Shared by both twins.
    """
    ring_regions = getattr(memory, "ring_regions", None)
    regions = tuple(ring_regions() if ring_regions is not None else memory)
    if len(regions) > MAX_REGIONS:
        raise ValueError(f"at most {MAX_REGIONS} memory regions, got {len(regions)}")
    table = []
    for region in regions:
        gpa, size, buffer = region
        gpa, size = operator.index(gpa), operator.index(size)
        if not 0 <= gpa <= _U64_MAX or not 0 < size <= (1 << 64) - gpa:
            raise ValueError(f"memory region {gpa:#x}+{size:#x} is not a guest-physical range")
        try:
            view = memoryview(buffer).cast("B")
        except TypeError as error:
            raise ValueError(f"memory region at {gpa:#x}: host buffer is not contiguous") from error
        if view.readonly:
            raise ValueError(f"memory region at {gpa:#x}: host buffer is read-only")
        if view.nbytes < size:
            raise ValueError(f"memory region at {gpa:#x}: host buffer holds {view.nbytes} bytes, "
                             f"fewer than the region's {size:#x}")
        view = view[:size]
        import ctypes  # here: importing it costs every start-up ~3 ms, and only this needs it

        host = ctypes.addressof(ctypes.c_char.from_buffer(view))
        if (host - gpa) % VIRTQ_DESC_ALIGN:
            raise ValueError(f"memory region at {gpa:#x}: host buffer at {host:#x} is not "
                             f"aligned like the guest address")
        table.append((gpa, size, view))
    table.sort(key=lambda r: r[0])
    for (gpa, size, _), (next_gpa, _, _) in zip(table, table[1:], strict=False):
        if next_gpa - gpa < size:
            raise ValueError(f"memory regions at {gpa:#x} and {next_gpa:#x} overlap")
    return tuple(table)


class Chain:
    """One validated descriptor chain, owned by the device until pushed (§2.7.14).

    Device-readable segments come first (§2.7.4.2); offsets in read() count from the
    first readable byte and offsets in write() from the first writable byte.
    """

    __slots__ = ("head", "readable", "writable", "segments", "_spans")

    def __init__(self, head, spans, readable, writable):
        self.head = head
        self.readable = readable
        self.writable = writable
        # (region view, offset in it, length, writable, gpa) per data descriptor
        self._spans = spans
        self.segments = [(gpa, length, bool(w)) for _view, _off, length, w, gpa in spans]

    def __repr__(self) -> str:
        return f"Chain(head={self.head}, readable={self.readable}, writable={self.writable})"

    def _pieces(self, writable: bool, offset: int, length: int):
        """(view, offset, length) pieces covering [offset, offset+length) of one direction."""
        for view, off, seg_len, w, _gpa in self._spans:
            if bool(w) != writable:
                continue
            if length == 0:
                return
            if offset >= seg_len:
                offset -= seg_len
                continue
            take = min(seg_len - offset, length)
            yield view, off + offset, take
            length -= take
            offset = 0

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        """Gather `length` device-readable bytes from `offset` (all the rest if None).

        Allocates the bytes asked for: a device checks `readable` against its own cap
        first (a guest can describe far more than it has, by aliasing).
        """
        if offset < 0 or offset > self.readable:
            raise ValueError(f"offset {offset} outside the {self.readable} readable bytes")
        if length is None:
            length = self.readable - offset
        if length < 0 or length > self.readable - offset:
            raise ValueError(f"cannot read {length} bytes at {offset} of {self.readable}")
        return b"".join(bytes(view[off : off + n]) for view, off, n in self._pieces(False, offset, length))

    def read_into(self, buffer, offset: int = 0) -> int:
        """Gather readable bytes from `offset` into `buffer`; returns the count copied."""
        if offset < 0 or offset > self.readable:
            raise ValueError(f"offset {offset} outside the {self.readable} readable bytes")
        dst = memoryview(buffer).cast("B")
        length = min(len(dst), self.readable - offset)
        pos = 0
        for view, off, n in self._pieces(False, offset, length):
            dst[pos : pos + n] = view[off : off + n]
            pos += n
        return pos

    def write(self, data, offset: int = 0) -> int:
        """Scatter `data` into the writable segments from `offset`; returns bytes written.

        Data that does not fit is a ValueError, never a silent truncation.
        """
        src = memoryview(data).cast("B")
        if offset < 0 or offset > self.writable or len(src) > self.writable - offset:
            raise ValueError(f"cannot write {len(src)} bytes at {offset} of {self.writable}")
        pos = 0
        for view, off, n in self._pieces(True, offset, len(src)):
            view[off : off + n] = src[pos : pos + n]
            pos += n
        return pos


class Virtqueue:
    """Device side of one split virtqueue (virtio 1.2 §2.7).

    `memory` is the guest's regions (see host_regions()). The transport calls
    activate(size, desc_addr, avail_addr, used_addr, event_idx) with what the driver
    wrote once the driver sets the queue ready; size, desc_addr, avail_addr, used_addr,
    event_idx and ready then read back the active configuration (zero/False while the
    queue is inactive).
    """

    def __init__(self, memory, max_size: int = 256):
        if not 0 < max_size <= VIRTQ_MAX_SIZE or max_size & (max_size - 1):
            raise ValueError(f"max_size must be a power of two in 1..{VIRTQ_MAX_SIZE}, got {max_size}")
        self.memory = memory
        self.max_size = max_size
        self._regions = host_regions(memory)
        self.malformed = 0
        self.reset()

    # -- configuration -------------------------------------------------------------

    def reset(self) -> None:
        """Back to the state after device reset (§2.1.2): inactive, indexes at zero."""
        self._deactivate()
        self.malformed = 0
        self.in_flight = 0
        self._broken = None
        self._last_avail = 0
        self._next_used = 0
        self._signalled_used = 0
        self._notify = True

    def _translate(self, gpa: int, length: int) -> tuple[memoryview, int] | None:
        """(region view, offset in it) of [gpa, gpa+length) if it lies in one region."""
        for rgpa, rsize, view in self._regions:
            rel = gpa - rgpa
            if 0 <= rel <= rsize and length <= rsize - rel:
                return view, rel
        return None

    def _deactivate(self) -> None:
        self._active = False
        self._qsize = 0
        self._desc_addr = self._avail_addr = self._used_addr = 0
        self._event_idx = False

    def activate(self, size: int, desc_addr: int, avail_addr: int, used_addr: int,
                 event_idx: bool = False) -> None:
        """Validate the driver's configuration once and start the queue (§2.7: sizes,
        alignment, placement). Raises QueueError and leaves the queue inactive if it is
        bad. The ring indexes are kept: reset() sets them to zero.
        """
        self._deactivate()
        size = operator.index(size)
        if size <= 0 or size & (size - 1) or size > self.max_size:
            raise QueueError(f"queue size {size} is not a power of two in 1..{self.max_size}")
        parts = (
            ("descriptor table", operator.index(desc_addr), desc_table_size(size),
             VIRTQ_DESC_ALIGN),
            ("available ring", operator.index(avail_addr), avail_ring_size(size),
             VIRTQ_AVAIL_ALIGN),
            ("used ring", operator.index(used_addr), used_ring_size(size), VIRTQ_USED_ALIGN),
        )
        places = []
        for name, addr, length, align in parts:
            if not 0 <= addr <= _U64_MAX:
                raise QueueError(f"{name} at {addr:#x} is not a guest-physical address")
            if addr % align:
                raise QueueError(f"{name} at {addr:#x} is not {align}-byte aligned")
            # Each part lies in one region, not necessarily the others' (host_regions()
            # keeps host and guest alignment equal).
            place = self._translate(addr, length)
            if place is None:
                raise QueueError(f"{name} {addr:#x}+{length:#x} is outside guest memory")
            places.append(place)
        (self._desc_view, self._desc_off), (self._avail_view, self._avail_off), \
            (self._used_view, self._used_off) = places
        # Later writes to `size` (a register the driver controls) change nothing until
        # the next activate(): everything else uses the size validated here.
        self._qsize = size
        self._desc_addr, self._avail_addr, self._used_addr = (addr for _, addr, _, _ in parts)
        self._event_idx = bool(event_idx)
        self._broken = None
        self._active = True

    def resume(self, next_avail: int) -> None:
        """Continue a ring the driver side already used (vhost-user SET_VRING_BASE): the
        next available entry to take is next_avail, and completions continue from the
        used index the ring holds now (every chain taken before was completed)."""
        self._check_active()
        self._last_avail = operator.index(next_avail) & _U16_MASK
        self._next_used = self._signalled_used = self._u16(
            self._used_view, self._used_off + RING_IDX_OFFSET)
        self.in_flight = 0

    @property
    def size(self) -> int:
        return self._qsize

    @property
    def desc_addr(self) -> int:
        return self._desc_addr

    @property
    def avail_addr(self) -> int:
        return self._avail_addr

    @property
    def used_addr(self) -> int:
        return self._used_addr

    @property
    def event_idx(self) -> bool:
        return self._event_idx

    @property
    def ready(self) -> bool:
        return self._active

    def _check_active(self) -> None:
        if not self._active:
            raise QueueError("queue is not activated")

    # -- guest memory accessors -------------------------------------------------------

    @staticmethod
    def _u16(view: memoryview, off: int) -> int:
        return _U16.unpack_from(view, off)[0]

    @staticmethod
    def _set_u16(view: memoryview, off: int, value: int) -> None:
        _U16.pack_into(view, off, value)

    # -- available ring -----------------------------------------------------------------

    def pop(self, max_chains: int | None = None, require: int = REQUIRE_ANY) -> list[Chain]:
        """New chains since the last pop, at most one queue's worth (§2.7.13).

        Malformed chains are retired to the used ring with length 0 and counted.
        Raises QueueError when the ring itself is corrupt.
        """
        self._check_active()
        if require not in (REQUIRE_ANY, REQUIRE_READABLE, REQUIRE_WRITABLE):
            raise ValueError(f"unknown direction requirement {require}")
        if self._broken:
            raise QueueError(self._broken)
        size = self._qsize
        # Read avail->idx once; the entries it covers are read after it (§2.7.13.3).
        avail_idx = self._u16(self._avail_view, self._avail_off + RING_IDX_OFFSET)
        pending = (avail_idx - self._last_avail) & _U16_MASK
        if pending > size:
            self._broken = f"available index moved by {pending}, more than the queue size {size}"
            raise QueueError(self._broken)
        if max_chains is not None:
            pending = min(pending, max(max_chains, 0))
        chains = []
        retired = 0
        ring_off = self._avail_off + VIRTQ_RING_HEADER_SIZE
        for _ in range(pending):
            head = self._u16(self._avail_view, ring_off + VIRTQ_AVAIL_ELEM_SIZE * (self._last_avail & (size - 1)))
            if head >= size:
                self._broken = f"available ring names head {head}, queue size {size}"
                break
            self._last_avail = (self._last_avail + 1) & _U16_MASK
            chain = self._walk(head, require)
            if chain is None:
                self._write_used(head, 0)
                retired += 1
            else:
                chains.append(chain)
        if retired:
            self.malformed += retired
            self._publish_used()
        if self._event_idx and self._notify:
            self._set_u16(self._used_view, self._used_off + VIRTQ_RING_HEADER_SIZE
                          + VIRTQ_USED_ELEM_SIZE * size, self._last_avail)
        self.in_flight += len(chains)
        if self._broken and not chains:
            raise QueueError(self._broken)
        return chains

    def _walk(self, head: int, require: int) -> Chain | None:
        """Validate the chain at `head`; None if it is malformed (§2.7.5, §2.7.5.3)."""
        size = self._qsize
        view = self._desc_view
        table_off = self._desc_off
        entries = size
        steps_left = size  # a table of n entries holds no legitimate chain longer than n
        indirect = False
        seen_writable = False
        spans = []
        readable = writable = 0
        idx = head
        while True:
            if steps_left == 0:
                return None  # a loop, or longer than the table allows
            steps_left -= 1
            addr, length, flags, nxt = _DESC.unpack_from(view, table_off + VIRTQ_DESC_SIZE * idx)
            if flags & VIRTQ_DESC_F_INDIRECT:
                # §2.7.5.3.1: one table per chain, never with NEXT; §2.7.5.3.2: ignore WRITE.
                if indirect or flags & VIRTQ_DESC_F_NEXT:
                    return None
                if length == 0 or length % VIRTQ_DESC_SIZE or length // VIRTQ_DESC_SIZE > size:
                    return None
                place = self._translate(addr, length)
                if place is None:
                    return None
                indirect = True
                view, table_off = place
                entries = steps_left = length // VIRTQ_DESC_SIZE
                idx = 0
                continue
            is_writable = flags & VIRTQ_DESC_F_WRITE
            if is_writable:
                seen_writable = True
                if require == REQUIRE_READABLE:
                    return None
            elif seen_writable or require == REQUIRE_WRITABLE:
                return None  # §2.7.4.2: device-writable descriptors come last
            if len(spans) >= size:
                return None
            place = self._translate(addr, length)
            if place is None:
                return None
            spans.append((*place, length, is_writable, addr))
            if is_writable:
                writable += length
            else:
                readable += length
            if not flags & VIRTQ_DESC_F_NEXT:
                return Chain(head, spans, readable, writable)
            if nxt >= entries:
                return None
            idx = nxt

    # -- used ring ------------------------------------------------------------------------

    def _write_used(self, head: int, written: int) -> None:
        slot = self._next_used & (self._qsize - 1)
        _USED_ELEM.pack_into(self._used_view, self._used_off + VIRTQ_RING_HEADER_SIZE
                             + VIRTQ_USED_ELEM_SIZE * slot, head, written)
        self._next_used = (self._next_used + 1) & _U16_MASK

    def _publish_used(self) -> None:
        # §2.7.8.2: the entries are written before used->idx (program order, TSO).
        self._set_u16(self._used_view, self._used_off + RING_IDX_OFFSET, self._next_used)

    def _check_completion(self, head: int, written: int) -> None:
        if not 0 <= head < self._qsize:
            raise ValueError(f"head {head} outside the queue size {self._qsize}")
        if not 0 <= written <= _U32_MAX:
            raise ValueError(f"written length {written} does not fit le32")

    def push(self, head: int, written: int) -> None:
        """Return one chain to the driver with `written` bytes in it (§2.7.8)."""
        self._check_active()
        self._check_completion(head, written)
        self._write_used(head, written)
        self._publish_used()
        self.in_flight -= 1

    def push_many(self, completions) -> None:
        """Return several chains [(head, written), ...] with one used->idx update."""
        self._check_active()
        completions = list(completions)
        for head, written in completions:
            self._check_completion(head, written)
        for head, written in completions:
            self._write_used(head, written)
        if completions:
            self._publish_used()
            self.in_flight -= len(completions)

    # -- notifications ----------------------------------------------------------------------

    def needs_notification(self) -> bool:
        """Whether the driver wants a used buffer notification now (§2.7.7).

        Call after pushing (and after a pop that retired malformed chains).
        """
        self._check_active()
        new = self._next_used
        old = self._signalled_used
        self._signalled_used = new
        if self._event_idx:
            used_event = self._u16(self._avail_view, self._avail_off + VIRTQ_RING_HEADER_SIZE
                                   + VIRTQ_AVAIL_ELEM_SIZE * self._qsize)
            return vring_need_event(used_event, new, old)
        if new == old:
            return False
        return not self._u16(self._avail_view, self._avail_off) & VIRTQ_AVAIL_F_NO_INTERRUPT

    def enable_notifications(self) -> bool:
        """Ask the driver for available buffer notifications again (§2.7.10).

        Returns True if buffers arrived meanwhile: the caller pops again rather than
        wait for a notification that may never come.
        """
        self._check_active()
        self._notify = True
        if self._event_idx:
            self._set_u16(self._used_view, self._used_off + VIRTQ_RING_HEADER_SIZE
                          + VIRTQ_USED_ELEM_SIZE * self._qsize, self._last_avail)
        else:
            self._set_u16(self._used_view, self._used_off, 0)
        return self._u16(self._avail_view, self._avail_off + RING_IDX_OFFSET) != self._last_avail

    def disable_notifications(self) -> None:
        """Tell the driver not to notify (§2.7.10).

        Without EVENT_IDX this sets VIRTQ_USED_F_NO_NOTIFY; with it, avail_event simply
        stops moving forward, so the driver stops notifying once it is passed.
        """
        self._check_active()
        self._notify = False
        if not self._event_idx:
            self._set_u16(self._used_view, self._used_off, VIRTQ_USED_F_NO_NOTIFY)

    @property
    def last_avail_idx(self) -> int:
        return self._last_avail

    @property
    def used_idx(self) -> int:
        return self._next_used
