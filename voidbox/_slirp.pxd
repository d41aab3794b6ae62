# C-level interface of voidbox/_slirp.pyx, the user-mode NAT's per-packet hot path.
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t


# RFC 9293 §3.4: sequence numbers compare modulo 2**32; valid within 2**31 of each other.
# a < b iff b is 1 to 2**31 - 1 ahead of a. Exactly 2**31 apart, neither is before the other
# (RFC 1982 §3.2 leaves that pair undefined): the sign of <int32_t>(a - b) would make each
# "before" the other there. The pure twin (voidbox/net/_slirp_py.py) defines the same.
cdef inline bint seq_lt_c(uint32_t a, uint32_t b) noexcept nogil:
    cdef uint32_t ahead = b - a  # unsigned: wraps modulo 2**32
    return ahead != 0 and ahead < (<uint32_t>1 << 31)


cdef inline bint seq_le_c(uint32_t a, uint32_t b) noexcept nogil:
    cdef uint32_t ahead = b - a
    return ahead < (<uint32_t>1 << 31)


cdef inline bint seq_gt_c(uint32_t a, uint32_t b) noexcept nogil:
    return seq_lt_c(b, a)


cdef inline bint seq_ge_c(uint32_t a, uint32_t b) noexcept nogil:
    return seq_le_c(b, a)


# Native-order one's complement sum of p[0:n] added to acc (RFC 1071 §2), unfolded.
cdef uint64_t csum_partial(const uint8_t *p, Py_ssize_t n, uint64_t acc) noexcept nogil
# Fold a csum_partial accumulator to 16 bits in network order and complement it.
cdef uint16_t csum_finish(uint64_t acc) noexcept nogil
# Write IPv4 + TCP headers, options and payload into out[0:cap]; -1 (no exception) if it
# does not fit. All pointers must be valid for their lengths.
cdef Py_ssize_t write_ipv4_tcp(uint8_t *out, Py_ssize_t cap,
                               const uint8_t *src_ip, const uint8_t *dst_ip, uint16_t ip_id,
                               uint16_t src_port, uint16_t dst_port, uint32_t seq, uint32_t ack,
                               uint8_t flags, uint16_t window,
                               const uint8_t *options, Py_ssize_t nopt,
                               const uint8_t *payload, Py_ssize_t npay) noexcept nogil
# Write IPv6 + TCP (RFC 8200 §3) into out[0:cap]; -1 (no exception) if it does not fit.
cdef Py_ssize_t write_ipv6_tcp(uint8_t *out, Py_ssize_t cap,
                               const uint8_t *src_ip, const uint8_t *dst_ip,
                               uint16_t src_port, uint16_t dst_port, uint32_t seq, uint32_t ack,
                               uint8_t flags, uint16_t window,
                               const uint8_t *options, Py_ssize_t nopt,
                               const uint8_t *payload, Py_ssize_t npay) noexcept nogil
# write_ipv4_tcp or write_ipv6_tcp as alen (4 or 16) says; -1 for another length. ip_id is
# IPv4's only (IPv6 has no identification outside a Fragment header).
cdef Py_ssize_t write_ip_tcp(uint8_t *out, Py_ssize_t cap, const uint8_t *src_ip,
                             const uint8_t *dst_ip, Py_ssize_t alen, uint16_t ip_id,
                             uint16_t src_port, uint16_t dst_port, uint32_t seq, uint32_t ack,
                             uint8_t flags, uint16_t window,
                             const uint8_t *options, Py_ssize_t nopt,
                             const uint8_t *payload, Py_ssize_t npay) noexcept nogil
# The IPv6 pseudo-header (RFC 8200 §8.1) for TCP summed.
cdef uint64_t pseudo_sum6(const uint8_t *src_ip, const uint8_t *dst_ip,
                          Py_ssize_t length) noexcept nogil
# An IPv6 header without extension headers, next header TCP, hop limit 64.
cdef void write_ipv6_header(uint8_t *out, uint16_t payload_len,
                            const uint8_t *src_ip, const uint8_t *dst_ip) noexcept nogil
# The IPv4 pseudo-header (RFC 9293 §3.1, RFC 768: addresses, zero, protocol, the
# upper-layer length) summed; pseudo_sum is TCP's.
cdef uint64_t pseudo_sum_ipv4(const uint8_t *src_ip, const uint8_t *dst_ip,
                              Py_ssize_t length, uint8_t proto) noexcept nogil
cdef uint64_t pseudo_sum(const uint8_t *src_ip, const uint8_t *dst_ip,
                         Py_ssize_t length) noexcept nogil
# An IPv4 header without options, DF, TTL 64, its checksum filled in; write_ipv4_header's
# protocol is TCP.
cdef void write_ipv4_header_proto(uint8_t *out, uint16_t total, uint16_t ip_id,
                                  const uint8_t *src_ip, const uint8_t *dst_ip,
                                  uint8_t proto) noexcept nogil
cdef void write_ipv4_header(uint8_t *out, uint16_t total, uint16_t ip_id,
                            const uint8_t *src_ip, const uint8_t *dst_ip) noexcept nogil
# A TCP header with checksum and urgent pointer zero (the caller fills the checksum).
cdef void write_tcp_header(uint8_t *t, uint16_t src_port, uint16_t dst_port,
                           uint32_t seq, uint32_t ack, Py_ssize_t header_len,
                           uint8_t flags, uint16_t window) noexcept nogil
