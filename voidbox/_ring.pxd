# cython: language_level=3
"""C-level interface of voidbox._ring: split virtqueues (virtio 1.2 §2.7).

Cython devices cimport this to run the batch path without a Python object per chain:

    from voidbox._ring cimport Virtqueue, vb_chain, vb_used, REQUIRE_READABLE
    n = q.pop_batch(q.size, REQUIRE_READABLE)          # chains in q.chains[0:n]
    for i in range(n):
        got = q.chain_read(&q.chains[i], 0, buf, cap)  # gather, nogil-safe
        done[i].head = q.chains[i].head; done[i].written = 0
    q.push_batch(done, n)                              # one used->idx update

Chains from pop_batch live in scratch arrays of the queue (`chains`, `segs`) and are
valid until the next pop_batch, pop or reset.
"""

from cpython.buffer cimport Py_buffer
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

cdef enum:
    VB_MAX_REGIONS = 8      # voidbox._ring_py.MAX_REGIONS

cdef enum:
    # Direction requirement of pop_batch / pop (virtio 1.2 §2.7.5.1)
    REQUIRE_ANY = 0
    REQUIRE_READABLE = 1
    REQUIRE_WRITABLE = 2

cdef struct vb_region:
    uint64_t gpa
    uint64_t size
    uint8_t *host           # `size` bytes of host memory, exported to Virtqueue._bufs

cdef struct vb_segment:
    uint64_t gpa
    uint8_t *host           # validated: `len` bytes inside one region's host memory
    uint32_t len
    uint32_t writable

cdef struct vb_chain:
    uint32_t head
    uint32_t first          # index of its first segment in Virtqueue.segs
    uint32_t nsegs
    uint32_t nreadable      # device-readable segments come first (§2.7.4.2)
    uint64_t readable       # bytes in device-readable segments
    uint64_t writable       # bytes in device-writable segments

cdef struct vb_used:
    uint32_t head
    uint32_t written


cdef class Virtqueue:
    cdef readonly object memory
    cdef Py_buffer _bufs[VB_MAX_REGIONS]    # held exports of the regions' host buffers
    cdef vb_region regions[VB_MAX_REGIONS]
    cdef int nregions

    # The configuration activate() validated (zero while inactive); read-only.
    cdef readonly uint32_t size
    cdef readonly uint64_t desc_addr
    cdef readonly uint64_t avail_addr
    cdef readonly uint64_t used_addr
    cdef readonly bint event_idx
    cdef readonly uint32_t max_size
    cdef readonly uint64_t malformed
    cdef readonly int64_t in_flight

    cdef bint _active
    cdef uint32_t _qsize                # the size validated by activate()
    cdef uint8_t *desc
    cdef uint8_t *avail
    cdef uint8_t *used
    cdef uint16_t _last_avail
    cdef uint16_t _next_used
    cdef uint16_t _signalled_used
    cdef bint _notify
    cdef int _broken_code               # 0, or why the ring is unusable (BROKEN_*)
    cdef uint32_t _broken_value
    cdef uint32_t _consumed             # avail entries taken by the last _pop_raw

    # Scratch of pop_batch: `chains` holds max_size entries, `segs` nsegs_cap.
    cdef vb_chain *chains
    cdef vb_segment *segs
    cdef uint32_t nsegs_cap

    cdef uint8_t *_translate(self, uint64_t gpa, uint64_t length) noexcept nogil
    cdef int _walk(self, uint16_t head, int require, vb_segment *out,
                   vb_chain *chain) noexcept nogil
    cdef int _pop_raw(self, uint32_t max_entries, int require) noexcept nogil
    cdef void _deactivate(self) noexcept
    cdef int _check_active(self) except -1
    cdef int _raise_broken(self) except -1
    cdef int _check_completion(self, head, written) except -1
    cdef void _write_used(self, uint32_t head, uint32_t written) noexcept nogil
    cdef void _publish_used(self) noexcept nogil

    cdef int pop_batch(self, uint32_t max_chains, int require) except -1 nogil
    cdef int push_batch(self, const vb_used *items, uint32_t n) except -1 nogil
    cdef uint64_t chain_read(self, const vb_chain *chain, uint64_t offset,
                             uint8_t *dst, uint64_t length) noexcept nogil
    cdef uint64_t chain_write(self, const vb_chain *chain, uint64_t offset,
                              const uint8_t *src, uint64_t length) noexcept nogil


cdef class Chain:
    cdef readonly uint32_t head
    cdef readonly uint64_t readable
    cdef readonly uint64_t writable
    cdef Virtqueue queue
    cdef vb_segment *segs
    cdef vb_segment inline_segs[4]
    cdef vb_chain info
