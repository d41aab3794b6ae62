# cython: language_level=3
"""The user-mode NAT's per-packet hot path (compiled twin of voidbox/net/_slirp_py.py).

- Sequence-number comparisons on uint32 with wraparound (RFC 9293 §3.4).
- The Internet checksum (RFC 1071) and the TCP checksum over the IPv4 pseudo-header
  (RFC 9293 §3.1).
- Building a whole IPv4 + TCP packet (RFC 791 §3.1, RFC 9293 §3.1) into a caller's buffer.

The Python-level functions have the same names, results and errors as the pure twin.
"""
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

cdef extern from "<endian.h>" nogil:
    uint16_t htobe16(uint16_t x)
    uint32_t htobe32(uint32_t x)
    uint16_t be16toh(uint16_t x)

cdef enum:
    IPV4_HEADER_LEN = 20
    TCP_HEADER_LEN = 20
    TCP_MAX_OPTIONS_LEN = 40
    IPPROTO_TCP = 6
    IPV4_VERSION_IHL = 0x45      # version 4, 5 header words (no IP options)
    IPV4_FLAG_DF = 0x4000        # RFC 791 §3.1: don't fragment
    IPV4_DEFAULT_TTL = 64
    IPV4_MAX_TOTAL_LEN = 0xFFFF

cdef uint64_t SEQ_MASK = 0xFFFFFFFF


cdef uint64_t csum_partial(const uint8_t *p, Py_ssize_t n, uint64_t acc) noexcept nogil:
    # RFC 1071 §2(B): the sum is byte-order independent, so add native 32-bit words into a
    # 64-bit accumulator (no carry can be lost below 2**32 words) and swap once at the end.
    cdef uint32_t w32
    cdef uint32_t w[4]
    cdef uint64_t a1 = 0
    cdef uint64_t a2 = 0
    cdef uint64_t a3 = 0
    cdef uint16_t w16
    cdef uint8_t tail[2]
    cdef Py_ssize_t i = 0
    # Sixteen bytes per pass into four independent accumulators, so the adds overlap
    # (setup.py builds with -O2, which does not vectorize the one-word loop below).
    while i + 16 <= n:
        memcpy(w, p + i, 16)  # memcpy: p + i may be unaligned
        acc += w[0]
        a1 += w[1]
        a2 += w[2]
        a3 += w[3]
        i += 16
    acc += a1 + a2 + a3
    while i + 4 <= n:
        memcpy(&w32, p + i, 4)  # memcpy: p + i may be unaligned
        acc += w32
        i += 4
    if i + 2 <= n:
        memcpy(&w16, p + i, 2)
        acc += w16
        i += 2
    if i < n:
        # The odd trailing byte is the high byte of a big-endian word padded with zero.
        tail[0] = p[i]
        tail[1] = 0
        memcpy(&w16, tail, 2)
        acc += w16
    return acc


cdef uint16_t csum_finish(uint64_t acc) noexcept nogil:
    while acc >> 16:
        acc = (acc & 0xFFFF) + (acc >> 16)
    # The folded native-order sum, read back as a network-order 16-bit value.
    return <uint16_t>(~be16toh(<uint16_t>acc)) & 0xFFFF


cdef inline uint64_t pseudo_sum(const uint8_t *src_ip, const uint8_t *dst_ip,
                                Py_ssize_t length) noexcept nogil:
    cdef uint8_t ph[12]
    cdef uint16_t be_len = htobe16(<uint16_t>length)
    memcpy(ph, src_ip, 4)
    memcpy(ph + 4, dst_ip, 4)
    ph[8] = 0
    ph[9] = IPPROTO_TCP
    memcpy(ph + 10, &be_len, 2)
    return csum_partial(ph, 12, 0)


cdef inline void put16(uint8_t *p, uint16_t v) noexcept nogil:
    cdef uint16_t be = htobe16(v)
    memcpy(p, &be, 2)


cdef inline void put32(uint8_t *p, uint32_t v) noexcept nogil:
    cdef uint32_t be = htobe32(v)
    memcpy(p, &be, 4)


cdef Py_ssize_t write_ipv4_tcp(uint8_t *out, Py_ssize_t cap,
                               const uint8_t *src_ip, const uint8_t *dst_ip, uint16_t ip_id,
                               uint16_t src_port, uint16_t dst_port, uint32_t seq, uint32_t ack,
                               uint8_t flags, uint16_t window,
                               const uint8_t *options, Py_ssize_t nopt,
                               const uint8_t *payload, Py_ssize_t npay) noexcept nogil:
    cdef Py_ssize_t tcp_len = TCP_HEADER_LEN + nopt + npay
    cdef Py_ssize_t total = IPV4_HEADER_LEN + tcp_len
    cdef uint8_t *t = out + IPV4_HEADER_LEN
    if nopt < 0 or npay < 0 or nopt > TCP_MAX_OPTIONS_LEN or nopt & 3:
        return -1
    if total > IPV4_MAX_TOTAL_LEN or total > cap:
        return -1
    # RFC 791 §3.1 header; every store below is inside out[0:total] checked just above.
    out[0] = IPV4_VERSION_IHL
    out[1] = 0
    put16(out + 2, <uint16_t>total)
    put16(out + 4, ip_id)
    put16(out + 6, IPV4_FLAG_DF)
    out[8] = IPV4_DEFAULT_TTL
    out[9] = IPPROTO_TCP
    put16(out + 10, 0)
    memcpy(out + 12, src_ip, 4)
    memcpy(out + 16, dst_ip, 4)
    # csum_finish returns the checksum as a number; put16 stores it big-endian.
    cdef uint16_t c = csum_finish(csum_partial(out, IPV4_HEADER_LEN, 0))
    put16(out + 10, c)
    # RFC 9293 §3.1 header.
    put16(t, src_port)
    put16(t + 2, dst_port)
    put32(t + 4, seq)
    put32(t + 8, ack)
    t[12] = <uint8_t>(((TCP_HEADER_LEN + nopt) >> 2) << 4)
    t[13] = flags
    put16(t + 14, window)
    put16(t + 16, 0)
    put16(t + 18, 0)
    if nopt:
        memcpy(t + TCP_HEADER_LEN, options, nopt)
    if npay:
        memcpy(t + TCP_HEADER_LEN + nopt, payload, npay)
    c = csum_finish(csum_partial(t, tcp_len, pseudo_sum(src_ip, dst_ip, tcp_len)))
    put16(t + 16, c)
    return total


def seq_lt(uint32_t a, uint32_t b):
    """a < b in sequence space (RFC 9293 §3.4)."""
    return seq_lt_c(a, b)


def seq_le(uint32_t a, uint32_t b):
    """a <= b in sequence space (RFC 9293 §3.4)."""
    return seq_le_c(a, b)


def seq_gt(uint32_t a, uint32_t b):
    """a > b in sequence space (RFC 9293 §3.4)."""
    return seq_gt_c(a, b)


def seq_ge(uint32_t a, uint32_t b):
    """a >= b in sequence space (RFC 9293 §3.4)."""
    return seq_ge_c(a, b)


def seq_add(uint32_t a, long long n):
    """a + n modulo 2**32."""
    return <uint32_t>((a + <uint64_t>n) & SEQ_MASK)


def seq_diff(uint32_t a, uint32_t b):
    """a - b as a signed 32-bit distance (positive when a is after b)."""
    return <int32_t>(a - b)


def inet_checksum(const uint8_t[::1] data):
    """The Internet checksum of data (RFC 1071); 0 over a header including a valid checksum."""
    if data.shape[0] == 0:
        return 0xFFFF
    return csum_finish(csum_partial(&data[0], data.shape[0], 0))


def tcp_checksum(const uint8_t[::1] src_ip, const uint8_t[::1] dst_ip,
                 const uint8_t[::1] segment):
    """TCP checksum over the IPv4 pseudo-header and segment (RFC 9293 §3.1); 0 if intact."""
    cdef Py_ssize_t n = segment.shape[0]
    if src_ip.shape[0] != 4 or dst_ip.shape[0] != 4:
        raise ValueError("IPv4 addresses are 4 bytes")
    if n > IPV4_MAX_TOTAL_LEN - IPV4_HEADER_LEN:
        raise ValueError("TCP segment longer than an IPv4 packet can carry")
    cdef uint64_t acc = pseudo_sum(&src_ip[0], &dst_ip[0], n)
    if n:
        acc = csum_partial(&segment[0], n, acc)
    return csum_finish(acc)


def build_ipv4_tcp(uint8_t[::1] out, const uint8_t[::1] src_ip, const uint8_t[::1] dst_ip,
                   ip_id, src_port, dst_port, seq, ack, flags, window,
                   const uint8_t[::1] options, const uint8_t[::1] payload):
    """Write an IPv4 packet carrying one TCP segment into out; return its length.

    See voidbox.net._slirp_py.build_ipv4_tcp for the exact contract.
    """
    cdef Py_ssize_t nopt = options.shape[0]
    cdef Py_ssize_t npay = payload.shape[0]
    cdef Py_ssize_t n
    if nopt > TCP_MAX_OPTIONS_LEN or nopt & 3:
        raise ValueError("TCP options must be a multiple of 4 bytes, at most 40")
    if src_ip.shape[0] != 4 or dst_ip.shape[0] != 4:
        raise ValueError("IPv4 addresses are 4 bytes")
    if not (0 <= src_port <= 0xFFFF and 0 <= dst_port <= 0xFFFF and 0 <= window <= 0xFFFF):
        raise ValueError("port or window out of range")
    if IPV4_HEADER_LEN + TCP_HEADER_LEN + nopt + npay > IPV4_MAX_TOTAL_LEN:
        raise ValueError("packet longer than IPv4 allows")
    if IPV4_HEADER_LEN + TCP_HEADER_LEN + nopt + npay > out.shape[0]:
        raise ValueError("output buffer too small for the packet")
    # Empty memoryviews have no element 0 to take the address of.
    n = write_ipv4_tcp(&out[0], out.shape[0], &src_ip[0], &dst_ip[0], ip_id & 0xFFFF,
                       src_port, dst_port, seq & SEQ_MASK, ack & SEQ_MASK, flags & 0xFF, window,
                       &options[0] if nopt else NULL, nopt,
                       &payload[0] if npay else NULL, npay)
    if n < 0:
        raise ValueError("packet does not fit")
    return n
