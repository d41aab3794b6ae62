# cython: language_level=3, boundscheck=False, wraparound=False
"""Device-side loops over voidbox._ring's C-level batch API (a Cython caller of _ring.pxd).

Built by bench/conftest.py. The "driver" of these loops is minimal on purpose: the
ring is pre-filled once, and each round only moves avail->idx forward by the chains
just retired (re-offering them), so the time measured is the device side
(pop_batch, chain_read/chain_write, push_batch).
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from voidbox._ring cimport REQUIRE_READABLE, REQUIRE_WRITABLE, Virtqueue, vb_used

# avail->idx follows the le16 flags (virtio 1.2 §2.7.6)
cdef enum:
    AVAIL_IDX_OFFSET = 2


def run_tx(Virtqueue q, uint32_t rounds, uint32_t batch, uint8_t[::1] scratch):
    """Pop `batch` readable chains per round, gather each into scratch, retire them.

    Returns (chains, bytes) processed; raises QueueError like pop().
    """
    cdef vb_used *done = <vb_used *>malloc(batch * sizeof(vb_used))
    cdef uint16_t *avail_idx = <uint16_t *>(q.avail + AVAIL_IDX_OFFSET)
    cdef uint64_t chains = 0, nbytes = 0
    cdef uint32_t _round, i
    cdef int n
    if done == NULL:
        raise MemoryError()
    # The driver keeps `batch` chains offered: all at first, then each one retired.
    avail_idx[0] = <uint16_t>(q._last_avail + batch)
    try:
        with nogil:
            for _round in range(rounds):
                n = q.pop_batch(batch, REQUIRE_READABLE)
                for i in range(<uint32_t>n):
                    nbytes += q.chain_read(&q.chains[i], 0, &scratch[0], scratch.shape[0])
                    done[i].head = q.chains[i].head
                    done[i].written = 0
                q.push_batch(done, n)
                avail_idx[0] = <uint16_t>(avail_idx[0] + n)
                chains += n
    finally:
        free(done)
    return chains, nbytes


def run_rx(Virtqueue q, uint32_t rounds, uint32_t batch, const uint8_t[::1] frame):
    """Pop `batch` writable chains per round, scatter `frame` into each, retire them."""
    cdef vb_used *done = <vb_used *>malloc(batch * sizeof(vb_used))
    cdef uint16_t *avail_idx = <uint16_t *>(q.avail + AVAIL_IDX_OFFSET)
    cdef uint64_t chains = 0, nbytes = 0, got
    cdef uint32_t _round, i
    cdef int n
    if done == NULL:
        raise MemoryError()
    avail_idx[0] = <uint16_t>(q._last_avail + batch)
    try:
        with nogil:
            for _round in range(rounds):
                n = q.pop_batch(batch, REQUIRE_WRITABLE)
                for i in range(<uint32_t>n):
                    got = q.chain_write(&q.chains[i], 0, &frame[0], frame.shape[0])
                    nbytes += got
                    done[i].head = q.chains[i].head
                    done[i].written = <uint32_t>got
                q.push_batch(done, n)
                avail_idx[0] = <uint16_t>(avail_idx[0] + n)
                chains += n
    finally:
        free(done)
    return chains, nbytes


def pop_batch_summary(Virtqueue q, uint32_t max_chains, int require):
    """[(head, readable, writable, nsegs, data)] of one pop_batch, for the unit tests."""
    cdef int n = q.pop_batch(max_chains, require)
    cdef int i
    out = []
    for i in range(n):
        buf = bytearray(q.chains[i].readable)
        if q.chains[i].readable:
            q.chain_read(&q.chains[i], 0, <uint8_t *><char *>buf, q.chains[i].readable)
        out.append((q.chains[i].head, q.chains[i].readable, q.chains[i].writable,
                    q.chains[i].nsegs, bytes(buf)))
    return out


def push_batch(Virtqueue q, completions):
    """push_batch from a Python list of (head, written), for the unit tests."""
    cdef uint32_t n = len(completions), i = 0
    cdef vb_used *items = <vb_used *>malloc(max(n, 1) * sizeof(vb_used))
    if items == NULL:
        raise MemoryError()
    try:
        for head, written in completions:
            items[i].head = head
            items[i].written = written
            i += 1
        q.push_batch(items, n)
    finally:
        free(items)


def memcpy_loop(uint8_t[::1] dst, const uint8_t[::1] src, uint32_t rounds):
    """Plain memcpy of src into dst, `rounds` times: the baseline for scatter-gather."""
    cdef uint32_t _round
    with nogil:
        for _round in range(rounds):
            memcpy(&dst[0], &src[0], src.shape[0])


def gather_loop(Virtqueue q, uint8_t[::1] dst, uint32_t rounds):
    """chain_read of q.chains[0] (from an earlier pop_batch) into dst, `rounds` times."""
    cdef uint32_t _round
    cdef uint64_t got = 0
    with nogil:
        for _round in range(rounds):
            got = q.chain_read(&q.chains[0], 0, &dst[0], dst.shape[0])
    return got
