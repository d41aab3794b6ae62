# cython: language_level=3
"""Split virtqueues over guest memory, device side (virtio 1.2 §2.7), compiled.

Behaves as voidbox._ring_py (read its docstring for the validation rules); this
module adds a batch path for Cython devices (see _ring.pxd): pop_batch fills
preallocated C arrays, chain_read/chain_write copy with memcpy per segment and no
GIL, push_batch publishes used->idx once.

Memory ordering (§2.7.13, §2.7.14): avail->idx is loaded with acquire semantics
before the ring entries it covers; used ring entries are stored before used->idx,
which is stored with release semantics; a full fence separates publishing used->idx
from reading used_event (and writing avail_event from re-reading avail->idx), the
pairing the driver's virtio_mb() expects. Every other guest field is read once
into a local (a relaxed atomic load or a memcpy into a local struct).
Fields are little-endian (§1.4); voidbox runs on x86-64 hosts only.

Unchecked accesses: `desc`, `avail` and `used` point at rings activate() found wholly
inside one region each at the validated size `_qsize` (event fields included), aligned;
slots are taken modulo `_qsize`; segments were checked against the region table when
popped. Each region's host pointer comes from a buffer export the queue holds until it
is freed (chains hold the queue), of at least the region's size (host_regions() checks
sizes, writability and alignment, shared with the pure twin).
"""

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

cdef extern from *:
    """
    #include <stdint.h>
    /* virtio 1.2 §2.7.13.3: avail->idx is read before the entries it covers. */
    static inline uint16_t vb_load_acquire_u16(const void *p) {
        return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
    }
    /* A single read of a guest field: the compiler may not re-read it later. */
    static inline uint16_t vb_load_once_u16(const void *p) {
        return __atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED);
    }
    static inline void vb_store_once_u16(void *p, uint16_t v) {
        __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELAXED);
    }
    /* virtio 1.2 §2.7.8.2: used ring entries are written before used->idx. */
    static inline void vb_store_release_u16(void *p, uint16_t v) {
        __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
    }
    static inline void vb_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    """
    uint16_t vb_load_acquire_u16(const void *p) noexcept nogil
    uint16_t vb_load_once_u16(const void *p) noexcept nogil
    void vb_store_once_u16(void *p, uint16_t v) noexcept nogil
    void vb_store_release_u16(void *p, uint16_t v) noexcept nogil
    void vb_fence() noexcept nogil


# virtio 1.2 §2.7.5: struct virtq_desc flags
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# §2.7.6 / §2.7.8
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1
VIRTQ_MAX_SIZE = 32768

cdef enum:
    C_DESC_F_NEXT = 1
    C_DESC_F_WRITE = 2
    C_DESC_F_INDIRECT = 4
    C_AVAIL_F_NO_INTERRUPT = 1
    C_USED_F_NO_NOTIFY = 1
    C_MAX_SIZE = 32768
    C_DESC_SIZE = 16
    C_DESC_ALIGN = 16
    C_AVAIL_ALIGN = 2
    C_USED_ALIGN = 4
    C_AVAIL_ELEM_SIZE = 2
    C_USED_ELEM_SIZE = 8
    C_RING_HEADER_SIZE = 4
    C_EVENT_SIZE = 2
    C_RING_IDX_OFFSET = 2
    # Segment scratch per queue: this many segments per queue entry, so a batch of
    # short chains never stops early and a batch of long ones still makes progress.
    SEGS_PER_ENTRY = 8
    # Copies at least this long release the GIL; shorter ones are cheaper than the
    # release and re-acquire.
    NOGIL_COPY_MIN = 4096
    BROKEN_AVAIL_JUMP = 1
    BROKEN_HEAD = 2
    WALK_OK = 0
    WALK_MALFORMED = 1
    POP_QUEUE_ERROR = -1

cdef struct vb_desc:
    uint64_t addr
    uint32_t len
    uint16_t flags
    uint16_t next

cdef struct vb_used_elem:
    uint32_t id
    uint32_t len


# One exception class for both twins, so devices catch it whichever is loaded; one
# validation of the region list, so both twins accept and refuse the same memory.
from voidbox._ring_py import MAX_REGIONS, QueueError, host_regions  # noqa: E402

import operator  # noqa: E402

U64_MAX = (1 << 64) - 1

assert MAX_REGIONS == VB_MAX_REGIONS


def vring_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx):
    """True if moving a ring index from old_idx to new_idx passed event_idx (§2.7.7, §2.7.10)."""
    return <uint16_t>(new_idx - event_idx - 1) < <uint16_t>(new_idx - old_idx)


def desc_table_size(uint32_t size):
    """Bytes of the descriptor table (§2.7)."""
    return C_DESC_SIZE * <uint64_t>size


def avail_ring_size(uint32_t size):
    """Bytes of the available ring including used_event (§2.7)."""
    return C_RING_HEADER_SIZE + C_AVAIL_ELEM_SIZE * <uint64_t>size + C_EVENT_SIZE


def used_ring_size(uint32_t size):
    """Bytes of the used ring including avail_event (§2.7)."""
    return C_RING_HEADER_SIZE + C_USED_ELEM_SIZE * <uint64_t>size + C_EVENT_SIZE


cdef uint64_t _gather(const vb_segment *segs, const vb_chain *chain,
                      uint64_t offset, uint8_t *dst, uint64_t length) noexcept nogil:
    """Copy up to `length` readable bytes from `offset`; returns the count copied."""
    cdef uint32_t i
    cdef uint64_t done = 0, take
    for i in range(chain.nreadable):
        if done == length:
            break
        if offset >= segs[i].len:
            offset -= segs[i].len
            continue
        take = segs[i].len - offset
        if take > length - done:
            take = length - done
        # segs[i] was validated at pop: its len bytes lie inside one region.
        memcpy(dst + done, segs[i].host + offset, take)
        done += take
        offset = 0
    return done


cdef uint64_t _scatter(const vb_segment *segs, const vb_chain *chain,
                       uint64_t offset, const uint8_t *src, uint64_t length) noexcept nogil:
    """Copy up to `length` bytes into the writable segments from `offset`; returns the count."""
    cdef uint32_t i
    cdef uint64_t done = 0, take
    for i in range(chain.nreadable, chain.nsegs):
        if done == length:
            break
        if offset >= segs[i].len:
            offset -= segs[i].len
            continue
        take = segs[i].len - offset
        if take > length - done:
            take = length - done
        # segs[i] was validated at pop: its len bytes lie inside one region.
        memcpy(segs[i].host + offset, src + done, take)
        done += take
        offset = 0
    return done


cdef class Chain:
    """One validated descriptor chain, owned by the device until pushed (§2.7.14).

    Device-readable segments come first (§2.7.4.2); offsets in read() count from the
    first readable byte and offsets in write() from the first writable byte.
    """

    def __init__(self):
        raise TypeError("chains come from Virtqueue.pop()")

    def __dealloc__(self):
        if self.segs != NULL and self.segs != self.inline_segs:
            free(self.segs)

    def __repr__(self):
        return f"Chain(head={self.head}, readable={self.readable}, writable={self.writable})"

    @property
    def segments(self):
        return [(self.segs[i].gpa, self.segs[i].len, bool(self.segs[i].writable))
                for i in range(self.info.nsegs)]

    def read(self, offset=0, length=None):
        """Gather `length` device-readable bytes from `offset` (all the rest if None).

        Allocates the bytes asked for: a device checks `readable` against its own cap
        first (a guest can describe far more than it has, by aliasing).
        """
        cdef uint64_t start, n
        if not 0 <= offset <= self.readable:
            raise ValueError(f"offset {offset} outside the {self.readable} readable bytes")
        start = offset
        if length is None:
            n = self.readable - start
        else:
            if not 0 <= length <= self.readable - start:
                raise ValueError(f"cannot read {length} bytes at {offset} of {self.readable}")
            n = length
        out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>n)
        cdef uint8_t *dst = <uint8_t *>PyBytes_AS_STRING(out)
        if n < NOGIL_COPY_MIN:
            _gather(self.segs, &self.info, start, dst, n)
        else:
            with nogil:
                _gather(self.segs, &self.info, start, dst, n)
        return out

    def read_into(self, buffer, offset=0):
        """Gather readable bytes from `offset` into `buffer`; returns the count copied."""
        cdef unsigned char[::1] dst = memoryview(buffer).cast("B")
        cdef uint64_t start, n, got
        if not 0 <= offset <= self.readable:
            raise ValueError(f"offset {offset} outside the {self.readable} readable bytes")
        start = offset
        n = min(<uint64_t>dst.shape[0], self.readable - start)
        if n == 0:
            return 0
        if n < NOGIL_COPY_MIN:
            return _gather(self.segs, &self.info, start, &dst[0], n)
        with nogil:
            got = _gather(self.segs, &self.info, start, &dst[0], n)
        return got

    def write(self, data, offset=0):
        """Scatter `data` into the writable segments from `offset`; returns bytes written.

        Data that does not fit is a ValueError, never a silent truncation.
        """
        cdef const unsigned char[::1] src = memoryview(data).cast("B")
        cdef uint64_t start, n = src.shape[0], got
        if not 0 <= offset <= self.writable or n > self.writable - offset:
            raise ValueError(f"cannot write {n} bytes at {offset} of {self.writable}")
        start = offset
        if n == 0:
            return 0
        if n < NOGIL_COPY_MIN:
            return _scatter(self.segs, &self.info, start, &src[0], n)
        with nogil:
            got = _scatter(self.segs, &self.info, start, &src[0], n)
        return got


cdef class Virtqueue:
    """Device side of one split virtqueue (virtio 1.2 §2.7).

    `memory` is the guest's regions (see voidbox._ring_py.host_regions()). The
    transport calls activate(size, desc_addr, avail_addr, used_addr, event_idx) with
    what the driver wrote once the driver sets the queue ready; size, desc_addr,
    avail_addr, used_addr, event_idx and ready then read back the active configuration
    (zero/False while the queue is inactive).
    """

    def __cinit__(self, memory, uint32_t max_size=256):
        if max_size == 0 or max_size > C_MAX_SIZE or (max_size & (max_size - 1)):
            raise ValueError(f"max_size must be a power of two in 1..{C_MAX_SIZE}, got {max_size}")
        self.memory = memory
        self.max_size = max_size
        self.nregions = 0
        for gpa, size, view in host_regions(memory):
            # A writable, C-contiguous export of at least `size` bytes: host_regions()
            # checked it on this very view, aligned like gpa modulo 16.
            PyObject_GetBuffer(view, &self._bufs[self.nregions], PyBUF_WRITABLE)
            self.regions[self.nregions].gpa = gpa
            self.regions[self.nregions].size = size
            self.regions[self.nregions].host = <uint8_t *>self._bufs[self.nregions].buf
            self.nregions += 1
        self.nsegs_cap = max_size * SEGS_PER_ENTRY
        self.chains = <vb_chain *>malloc(max_size * sizeof(vb_chain))
        self.segs = <vb_segment *>malloc(self.nsegs_cap * sizeof(vb_segment))
        if self.chains == NULL or self.segs == NULL:
            raise MemoryError()
        self.reset()

    def __dealloc__(self):
        cdef int i
        free(self.chains)
        free(self.segs)
        for i in range(self.nregions):
            PyBuffer_Release(&self._bufs[i])

    # -- configuration -------------------------------------------------------------

    def reset(self):
        """Back to the state after device reset (§2.1.2): inactive, indexes at zero."""
        self._deactivate()
        self.malformed = 0
        self.in_flight = 0
        self._broken_code = 0
        self._last_avail = 0
        self._next_used = 0
        self._signalled_used = 0
        self._notify = True

    cdef uint8_t *_translate(self, uint64_t gpa, uint64_t length) noexcept nogil:
        """Host pointer of [gpa, gpa+length) if it lies in one region, else NULL.

        No sum of guest values is formed, so addresses near 2^64 cannot wrap.
        """
        cdef int i
        cdef uint64_t rel
        for i in range(self.nregions):
            if gpa >= self.regions[i].gpa:
                rel = gpa - self.regions[i].gpa
                if rel <= self.regions[i].size and length <= self.regions[i].size - rel:
                    return self.regions[i].host + rel
        return NULL

    cdef void _deactivate(self) noexcept:
        self._active = False
        self._qsize = 0
        self.size = 0
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.event_idx = False

    def activate(self, size, desc_addr, avail_addr, used_addr, event_idx=False):
        """Validate the driver's configuration once and start the queue (§2.7: sizes,
        alignment, placement). Raises QueueError and leaves the queue inactive if it is
        bad. The ring indexes are kept: reset() sets them to zero.
        """
        cdef uint8_t *host
        self._deactivate()
        size = operator.index(size)
        if size <= 0 or size & (size - 1) or size > self.max_size:
            raise QueueError(f"queue size {size} is not a power of two in 1..{self.max_size}")
        parts = (
            ("descriptor table", operator.index(desc_addr), desc_table_size(size),
             C_DESC_ALIGN),
            ("available ring", operator.index(avail_addr), avail_ring_size(size),
             C_AVAIL_ALIGN),
            ("used ring", operator.index(used_addr), used_ring_size(size), C_USED_ALIGN),
        )
        hosts = []
        for name, addr, length, align in parts:
            if not 0 <= addr <= U64_MAX:
                raise QueueError(f"{name} at {addr:#x} is not a guest-physical address")
            if addr % align:
                raise QueueError(f"{name} at {addr:#x} is not {align}-byte aligned")
            # Each part lies in one region, not necessarily the others'.
            host = self._translate(addr, length)
            if host == NULL:
                raise QueueError(f"{name} {addr:#x}+{length:#x} is outside guest memory")
            hosts.append(<size_t>host)
        # Alignment of the host pointers follows: host_regions() keeps host and guest
        # addresses equal modulo 16.
        self.desc = <uint8_t *><size_t>hosts[0]
        self.avail = <uint8_t *><size_t>hosts[1]
        self.used = <uint8_t *><size_t>hosts[2]
        # Later writes to `size` (a register the driver controls) change nothing until
        # the next activate(): the hot paths use the size validated here.
        self._qsize = size
        self.size = size
        self.desc_addr, self.avail_addr, self.used_addr = (addr for _, addr, _, _ in parts)
        self.event_idx = bool(event_idx)
        self._broken_code = 0
        self._active = True

    @property
    def ready(self):
        return self._active

    cdef int _check_active(self) except -1:
        if not self._active:
            raise QueueError("queue is not activated")
        return 0

    cdef int _raise_broken(self) except -1:
        if self._broken_code == BROKEN_AVAIL_JUMP:
            raise QueueError(f"available index moved by {self._broken_value}, "
                             f"more than the queue size {self._qsize}")
        raise QueueError(f"available ring names head {self._broken_value}, "
                         f"queue size {self._qsize}")

    # -- available ring -----------------------------------------------------------------

    cdef int _walk(self, uint16_t head, int require, vb_segment *out,
                   vb_chain *chain) noexcept nogil:
        """Validate the chain at `head` into out[]; WALK_MALFORMED if it is (§2.7.5)."""
        cdef uint32_t size = self._qsize
        cdef const uint8_t *table = self.desc
        cdef uint32_t entries = size
        cdef uint32_t steps_left = size
        cdef uint32_t nsegs = 0, nreadable = 0, idx = head
        cdef uint64_t readable = 0, writable = 0
        cdef uint8_t *host
        cdef bint indirect = False, seen_writable = False
        cdef vb_desc d
        while True:
            if steps_left == 0:
                return WALK_MALFORMED  # a loop, or longer than the table allows
            steps_left -= 1
            # idx < entries (checked below); table holds `entries` descriptors in memory.
            memcpy(&d, table + C_DESC_SIZE * idx, C_DESC_SIZE)
            if d.flags & C_DESC_F_INDIRECT:
                # §2.7.5.3.1: one table per chain, never with NEXT; §2.7.5.3.2: ignore WRITE.
                if indirect or d.flags & C_DESC_F_NEXT:
                    return WALK_MALFORMED
                if d.len == 0 or d.len % C_DESC_SIZE or d.len // C_DESC_SIZE > size:
                    return WALK_MALFORMED
                host = self._translate(d.addr, d.len)
                if host == NULL:
                    return WALK_MALFORMED
                indirect = True
                table = host
                entries = d.len // C_DESC_SIZE
                steps_left = entries
                idx = 0
                continue
            if d.flags & C_DESC_F_WRITE:
                seen_writable = True
                if require == REQUIRE_READABLE:
                    return WALK_MALFORMED
            elif seen_writable or require == REQUIRE_WRITABLE:
                return WALK_MALFORMED  # §2.7.4.2: device-writable descriptors come last
            if nsegs >= size:
                return WALK_MALFORMED
            host = self._translate(d.addr, d.len)
            if host == NULL:
                return WALK_MALFORMED
            out[nsegs].gpa = d.addr
            out[nsegs].host = host
            out[nsegs].len = d.len
            out[nsegs].writable = (d.flags & C_DESC_F_WRITE) != 0
            nsegs += 1
            if d.flags & C_DESC_F_WRITE:
                writable += d.len
            else:
                readable += d.len
                nreadable += 1
            if not d.flags & C_DESC_F_NEXT:
                chain.head = head
                chain.nsegs = nsegs
                chain.nreadable = nreadable
                chain.readable = readable
                chain.writable = writable
                return WALK_OK
            if d.next >= entries:
                return WALK_MALFORMED
            idx = d.next

    cdef int _pop_raw(self, uint32_t max_entries, int require) noexcept nogil:
        """Take up to max_entries avail entries into chains[]/segs[]; chain count or -1.

        Stops early when the segment scratch could not hold another chain; the number
        of entries consumed is left in _consumed. A head out of range stops the batch
        and marks the queue broken; an avail->idx jump is POP_QUEUE_ERROR at once.
        """
        cdef uint32_t size = self._qsize
        # avail->idx lies in the ring activate() validated (see the module docstring).
        cdef uint16_t avail_idx = vb_load_acquire_u16(self.avail + C_RING_IDX_OFFSET)
        cdef uint32_t pending = <uint16_t>(avail_idx - self._last_avail)
        cdef uint32_t nchains = 0, nseg = 0, retired = 0, _entry
        cdef uint16_t head
        cdef const uint8_t *ring = self.avail + C_RING_HEADER_SIZE
        self._consumed = 0
        if pending > size:
            self._broken_code = BROKEN_AVAIL_JUMP
            self._broken_value = pending
            return POP_QUEUE_ERROR
        if pending > max_entries:
            pending = max_entries
        for _entry in range(pending):
            if self.nsegs_cap - nseg < size:
                break  # the next chain might not fit the scratch: leave it for later
            # (last_avail & (size - 1)) < size: the slot lies in the validated ring.
            head = vb_load_once_u16(ring + C_AVAIL_ELEM_SIZE * (self._last_avail & (size - 1)))
            if head >= size:
                self._broken_code = BROKEN_HEAD
                self._broken_value = head
                break
            self._last_avail += 1
            self._consumed += 1
            if self._walk(head, require, self.segs + nseg, &self.chains[nchains]) == WALK_OK:
                self.chains[nchains].first = nseg
                nseg += self.chains[nchains].nsegs
                nchains += 1
            else:
                self._write_used(head, 0)
                retired += 1
        if retired:
            self.malformed += retired
            self._publish_used()
        if self.event_idx and self._notify:
            # avail_event: validated with the used ring, whether EVENT_IDX is on or not.
            vb_store_once_u16(self.used + C_RING_HEADER_SIZE + C_USED_ELEM_SIZE * size,
                              self._last_avail)
        self.in_flight += nchains
        return nchains

    cdef int pop_batch(self, uint32_t max_chains, int require) except -1 nogil:
        """Pop up to max_chains chains into self.chains[0:n]; returns n.

        The chains (and their segments in self.segs) stay valid until the next
        pop_batch, pop or reset. Raises QueueError like pop().
        """
        cdef int n
        if not self._active or self._broken_code:
            with gil:
                self._check_active()
                self._raise_broken()
        n = self._pop_raw(max_chains, require)
        if n == POP_QUEUE_ERROR or (n == 0 and self._broken_code):
            with gil:
                self._raise_broken()
        return n

    def pop(self, max_chains=None, int require=REQUIRE_ANY):
        """New chains since the last pop, at most one queue's worth (§2.7.13).

        Malformed chains are retired to the used ring with length 0 and counted.
        Raises QueueError when the ring itself is corrupt.
        """
        cdef uint32_t limit, taken = 0
        cdef int n, i
        cdef Chain chain
        self._check_active()
        if require not in (REQUIRE_ANY, REQUIRE_READABLE, REQUIRE_WRITABLE):
            raise ValueError(f"unknown direction requirement {require}")
        if self._broken_code:
            self._raise_broken()
        limit = self._qsize
        if max_chains is not None:
            limit = max(0, min(max_chains, limit))
        chains = []
        while True:
            # Always at least once, so max_chains=0 still validates avail->idx. The walk
            # releases the GIL: vCPU and I/O threads run meanwhile.
            with nogil:
                n = self._pop_raw(limit - taken, require)
            if n == POP_QUEUE_ERROR:
                if chains:
                    break  # hand over what was taken; the next pop raises
                self._raise_broken()
            for i in range(n):
                chain = Chain.__new__(Chain)
                chain.queue = self
                chain.info = self.chains[i]
                chain.info.first = 0
                chain.head = chain.info.head
                chain.readable = chain.info.readable
                chain.writable = chain.info.writable
                if chain.info.nsegs <= 4:
                    chain.segs = chain.inline_segs
                else:
                    chain.segs = <vb_segment *>malloc(chain.info.nsegs * sizeof(vb_segment))
                    if chain.segs == NULL:
                        raise MemoryError()
                memcpy(chain.segs, self.segs + self.chains[i].first,
                       chain.info.nsegs * sizeof(vb_segment))
                chains.append(chain)
            taken += self._consumed
            # The scratch may stop a batch early: go on until the limit or the ring is done.
            if self._consumed == 0 or self._broken_code or taken >= limit:
                break
        if self._broken_code and not chains:
            self._raise_broken()
        return chains

    cdef uint64_t chain_read(self, const vb_chain *chain, uint64_t offset,
                             uint8_t *dst, uint64_t length) noexcept nogil:
        """Gather up to `length` readable bytes of a pop_batch chain; returns the count."""
        return _gather(self.segs + chain.first, chain, offset, dst, length)

    cdef uint64_t chain_write(self, const vb_chain *chain, uint64_t offset,
                              const uint8_t *src, uint64_t length) noexcept nogil:
        """Scatter up to `length` bytes into a pop_batch chain; returns the count."""
        return _scatter(self.segs + chain.first, chain, offset, src, length)

    # -- used ring ------------------------------------------------------------------------

    cdef void _write_used(self, uint32_t head, uint32_t written) noexcept nogil:
        cdef vb_used_elem elem
        elem.id = head
        elem.len = written
        # slot < size: the entry lies in the validated used ring.
        memcpy(self.used + C_RING_HEADER_SIZE
               + C_USED_ELEM_SIZE * (self._next_used & (self._qsize - 1)), &elem, sizeof(elem))
        self._next_used += 1

    cdef void _publish_used(self) noexcept nogil:
        vb_store_release_u16(self.used + C_RING_IDX_OFFSET, self._next_used)

    cdef int push_batch(self, const vb_used *items, uint32_t n) except -1 nogil:
        """Return n chains to the driver with one used->idx update (§2.7.8)."""
        cdef uint32_t i
        if not self._active:
            with gil:
                self._check_active()
        for i in range(n):
            if items[i].head >= self._qsize:
                with gil:
                    raise ValueError(f"head {items[i].head} outside the queue size {self._qsize}")
        for i in range(n):
            self._write_used(items[i].head, items[i].written)
        if n:
            self._publish_used()
            self.in_flight -= n
        return 0

    cdef int _check_completion(self, head, written) except -1:
        if not 0 <= head < self._qsize:
            raise ValueError(f"head {head} outside the queue size {self._qsize}")
        if not 0 <= written <= 0xFFFF_FFFF:
            raise ValueError(f"written length {written} does not fit le32")
        return 0

    def push(self, head, written):
        """Return one chain to the driver with `written` bytes in it (§2.7.8)."""
        self._check_active()
        self._check_completion(head, written)
        self._write_used(head, written)
        self._publish_used()
        self.in_flight -= 1

    def push_many(self, completions):
        """Return several chains [(head, written), ...] with one used->idx update."""
        self._check_active()
        items = list(completions)
        for head, written in items:
            self._check_completion(head, written)
        for head, written in items:
            self._write_used(head, written)
        if items:
            self._publish_used()
            self.in_flight -= len(items)

    # -- notifications ----------------------------------------------------------------------

    def needs_notification(self):
        """Whether the driver wants a used buffer notification now (§2.7.7).

        Call after pushing (and after a pop that retired malformed chains).
        """
        cdef uint16_t new, old, used_event
        self._check_active()
        new = self._next_used
        old = self._signalled_used
        self._signalled_used = new
        if self.event_idx:
            # Pairs with the driver's barrier between reading used->idx and used_event.
            vb_fence()
            used_event = vb_load_once_u16(self.avail + C_RING_HEADER_SIZE
                                          + C_AVAIL_ELEM_SIZE * self._qsize)
            return <uint16_t>(new - used_event - 1) < <uint16_t>(new - old)
        if new == old:
            return False
        vb_fence()
        return not (vb_load_once_u16(self.avail) & C_AVAIL_F_NO_INTERRUPT)

    def enable_notifications(self):
        """Ask the driver for available buffer notifications again (§2.7.10).

        Returns True if buffers arrived meanwhile: the caller pops again rather than
        wait for a notification that may never come.
        """
        self._check_active()
        self._notify = True
        if self.event_idx:
            vb_store_once_u16(self.used + C_RING_HEADER_SIZE + C_USED_ELEM_SIZE * self._qsize,
                              self._last_avail)
        else:
            vb_store_once_u16(self.used, 0)
        # The flag or avail_event must be visible before avail->idx is re-read.
        vb_fence()
        return vb_load_acquire_u16(self.avail + C_RING_IDX_OFFSET) != self._last_avail

    def disable_notifications(self):
        """Tell the driver not to notify (§2.7.10).

        Without EVENT_IDX this sets VIRTQ_USED_F_NO_NOTIFY; with it, avail_event simply
        stops moving forward, so the driver stops notifying once it is passed.
        """
        self._check_active()
        self._notify = False
        if not self.event_idx:
            vb_store_once_u16(self.used, C_USED_F_NO_NOTIFY)

    def resume(self, next_avail):
        """Continue a ring the driver side already used (vhost-user SET_VRING_BASE): the
        next available entry to take is next_avail, and completions continue from the
        used index the ring holds now (every chain taken before was completed)."""
        self._check_active()
        self._last_avail = <uint16_t>(int(next_avail) & 0xFFFF)
        self._next_used = vb_load_acquire_u16(self.used + C_RING_IDX_OFFSET)
        self._signalled_used = self._next_used
        self.in_flight = 0

    @property
    def last_avail_idx(self):
        return self._last_avail

    @property
    def used_idx(self):
        return self._next_used
