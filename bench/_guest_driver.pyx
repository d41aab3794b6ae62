# cython: language_level=3, boundscheck=False, wraparound=False
"""The guest driver's ring work in the bulk benchmark's rig, in C.

In tests/unit/test_virtio_net_tcp.py's BulkRig each used RX buffer costs the Python driver
mock about a dozen calls (read the used entry, read the buffer, recycle its descriptor,
write it again, offer it), and each TX frame a few more: at 2048-byte RX buffers that is
most of the rig's time host -> guest. It is the guest's work, which a real guest does on
its own vCPU. This module does the same driver steps (virtio 1.2 §2.7.13 and §2.7.14) in
loops over the rings in guest memory, so the benchmark can show what the VMM's side costs.

It keeps the rig's layouts:
- RX buffer `head` is descriptor `head`, one descriptor of `buf_len` bytes at
  `data_off + head * buf_len`, written once when the rig posted it. Giving a buffer back
  is one avail slot and the index; the descriptor stays as it is.
- TX frame i of a batch goes in slot i (descriptor i, `slot_len` bytes apart), one
  readable descriptor each; the rig retires the whole batch before the next.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

cdef enum:
    RING_HEADER = 4      # flags and idx, le16 each, before either ring's entries
    DESC_SIZE = 16       # le64 addr, le32 len, le16 flags, le16 next
    USED_ELEM = 8        # le32 id, le32 len
    AVAIL_ELEM = 2
    NET_HDR_LEN = 12     # virtio_net_hdr with num_buffers (VERSION_1)
    NUM_BUFFERS_AT = 10
    MAX_BUFFERS = 1024   # a frame's buffers: 64 KiB over 64-byte buffers
    SEEN_BYTES = 8192    # a bit per descriptor of the largest ring (32768)


cdef inline uint16_t _u16(const uint8_t *p) noexcept nogil:
    return p[0] | (p[1] << 8)


cdef inline uint32_t _u32(const uint8_t *p) noexcept nogil:
    return p[0] | (p[1] << 8) | (p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline void _set_u16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = v >> 8


cdef inline void _set_u32(uint8_t *p, uint32_t v) noexcept nogil:
    _set_u16(p, v & 0xFFFF)
    _set_u16(p + 2, v >> 16)


cdef int _check_ring(const uint8_t[::1] mem, Py_ssize_t off, Py_ssize_t elem,
                     uint16_t size) except -1:
    """A ring (flags, idx, `size` entries of `elem` bytes, an event index) inside mem."""
    if off < 0 or off + RING_HEADER + elem * size + 2 > mem.shape[0]:
        raise ValueError(f"a ring at offset {off} outside the memory given")
    return 0


def tx_offer(uint8_t[::1] mem, Py_ssize_t desc_off, Py_ssize_t avail_off, Py_ssize_t data_off,
             uint64_t data_gpa, Py_ssize_t slot_len, uint16_t size, uint16_t avail_idx,
             list frames):
    """Offer each (header, frame) of `frames` as one readable descriptor: frame i in slot i,
    header and frame back to back, published in avail->idx (the caller kicks). Returns the
    new avail_idx."""
    cdef Py_ssize_t i, n = len(frames), hlen, flen
    cdef const uint8_t[::1] header, frame
    cdef uint8_t *desc
    if n > size:
        raise ValueError(f"{n} frames for a ring of {size}")
    if data_off < 0 or data_off + n * slot_len > mem.shape[0] \
            or desc_off < 0 or desc_off + size * DESC_SIZE > mem.shape[0]:
        raise ValueError("the TX slots lie outside the memory given")
    _check_ring(mem, avail_off, AVAIL_ELEM, size)
    for i in range(n):
        header, frame = frames[i]
        hlen, flen = header.shape[0], frame.shape[0]
        if hlen + flen > slot_len:
            raise ValueError(f"a {hlen + flen}-byte frame for {slot_len}-byte slots")
        if hlen:
            memcpy(&mem[data_off + i * slot_len], &header[0], hlen)
        if flen:
            memcpy(&mem[data_off + i * slot_len + hlen], &frame[0], flen)
        desc = &mem[desc_off + i * DESC_SIZE]
        _set_u32(desc, <uint32_t>(data_gpa + i * slot_len))
        _set_u32(desc + 4, <uint32_t>((data_gpa + i * slot_len) >> 32))
        _set_u32(desc + 8, <uint32_t>(hlen + flen))
        _set_u16(desc + 12, 0)  # no NEXT, not WRITE: one readable buffer
        _set_u16(desc + 14, 0)
        _set_u16(&mem[avail_off + RING_HEADER + AVAIL_ELEM * (avail_idx % size)], <uint16_t>i)
        avail_idx += 1
    _set_u16(&mem[avail_off + 2], avail_idx)
    return avail_idx


def tx_retire(const uint8_t[::1] mem, Py_ssize_t used_off, uint16_t size, uint16_t last_used,
              uint16_t expected):
    """Check that the device used exactly the `expected` chains offered last, slots 0 to
    expected - 1 in any order; returns the new last_used. A device that left a chain, or
    returned one it was not given, raises ValueError."""
    cdef uint16_t used_idx, k, slot
    cdef uint32_t head
    cdef uint8_t seen[SEEN_BYTES]
    _check_ring(mem, used_off, USED_ELEM, size)
    used_idx = _u16(&mem[used_off + 2])
    if <uint16_t>(used_idx - last_used) != expected:
        raise ValueError(f"the device used {<uint16_t>(used_idx - last_used)} of {expected} chains")
    memset(seen, 0, sizeof(seen))
    for k in range(expected):
        slot = <uint16_t>(last_used + k) % size  # the index wraps at 2**16, then the ring
        head = _u32(&mem[used_off + RING_HEADER + USED_ELEM * slot])
        if head >= expected or seen[head >> 3] & (1 << (head & 7)):
            raise ValueError(f"used id {head} was not offered, or came back twice")
        seen[head >> 3] |= 1 << (head & 7)
    return used_idx


def rx_collect(uint8_t[::1] mem, Py_ssize_t used_off, Py_ssize_t avail_off, Py_ssize_t data_off,
               Py_ssize_t buf_len, uint16_t size, uint16_t last_used, uint16_t avail_idx):
    """Take the used RX buffers since `last_used`, join each frame's buffers, and give every
    buffer back at once (published in avail->idx; the caller kicks).

    Returns (frames, last_used, avail_idx): frames are (header, frame) bytes pairs, header
    the 12-byte virtio_net_hdr. A used entry the device should never write (an id outside
    the ring, a length beyond the buffer, num_buffers past what was used) raises
    ValueError, as the Python rig's asserts would fail.
    """
    cdef const uint8_t *used
    cdef uint8_t *avail
    cdef uint16_t used_idx, pending
    cdef uint16_t i = 0, k, nbuf, slot
    cdef uint32_t head, length, total, want = 0
    cdef uint32_t heads[MAX_BUFFERS]
    cdef uint32_t lengths[MAX_BUFFERS]
    cdef const uint8_t *buf
    cdef bytes frame
    cdef char *out
    _check_ring(mem, used_off, USED_ELEM, size)
    _check_ring(mem, avail_off, AVAIL_ELEM, size)
    if data_off < 0 or buf_len < 0 or data_off + <Py_ssize_t>size * buf_len > mem.shape[0]:
        raise ValueError("the RX buffers lie outside the memory given")
    used, avail = &mem[used_off], &mem[avail_off]
    used_idx = _u16(used + 2)
    pending = <uint16_t>(used_idx - last_used)
    if pending > size:
        raise ValueError(f"used->idx {used_idx} is {pending} ahead of {last_used}")
    frames = []
    while i < pending:
        # One frame: its first buffer carries the header and num_buffers.
        nbuf = 0
        total = 0
        while True:
            slot = <uint16_t>(last_used + i + nbuf) % size
            head = _u32(used + RING_HEADER + USED_ELEM * slot)
            length = _u32(used + RING_HEADER + USED_ELEM * slot + 4)
            if head >= size or length > <uint32_t>buf_len:
                raise ValueError(f"used entry ({head}, {length}) outside the RX buffers")
            if nbuf == 0:
                if length < NET_HDR_LEN:
                    raise ValueError(f"a {length}-byte first buffer holds no header")
                buf = &mem[data_off + head * buf_len]
                want = _u16(buf + NUM_BUFFERS_AT)
                if want < 1 or want > <uint32_t>(pending - i) or want > MAX_BUFFERS:
                    raise ValueError(f"num_buffers {want} past the {pending - i} used")
            heads[nbuf] = head
            lengths[nbuf] = length
            total += length
            nbuf += 1
            if nbuf == want:
                break
        buf = &mem[data_off + heads[0] * buf_len]
        header = PyBytes_FromStringAndSize(<const char *>buf, NET_HDR_LEN)
        frame = PyBytes_FromStringAndSize(NULL, total - NET_HDR_LEN)
        out = PyBytes_AS_STRING(frame)
        memcpy(out, buf + NET_HDR_LEN, lengths[0] - NET_HDR_LEN)
        out += lengths[0] - NET_HDR_LEN
        for k in range(1, nbuf):
            memcpy(out, &mem[data_off + heads[k] * buf_len], lengths[k])
            out += lengths[k]
        frames.append((header, frame))
        # Give the buffers back, in the order they were used.
        for k in range(nbuf):
            _set_u16(avail + RING_HEADER + AVAIL_ELEM * (avail_idx % size), <uint16_t>heads[k])
            avail_idx += 1
        i += nbuf
    _set_u16(avail + 2, avail_idx)
    return frames, <uint16_t>(last_used + pending), avail_idx
