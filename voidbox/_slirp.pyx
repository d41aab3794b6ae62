# cython: language_level=3
"""The user-mode NAT's per-packet hot path (compiled twin of voidbox/net/_slirp_py.py).

- Sequence-number comparisons on uint32 with wraparound (RFC 9293 §3.4).
- The Internet checksum (RFC 1071) and the TCP checksum over the IPv4 pseudo-header
  (RFC 9293 §3.1) or the IPv6 one (RFC 8200 §8.1), chosen by the addresses' length.
- Building a whole IPv4 + TCP packet (RFC 791 §3.1, RFC 9293 §3.1), or IPv6 + TCP
  (RFC 8200 §3), into a caller's buffer.

The Python-level functions have the same names, results and errors as the pure twin.
"""
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

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
    IPV6_HEADER_LEN = 40
    IPV6_VERSION_BYTE = 0x60     # version 6, traffic class and flow label zero
    IPV6_DEFAULT_HOP_LIMIT = 64
    IPV6_MAX_PAYLOAD_LEN = 0xFFFF  # the 16-bit Payload Length (jumbograms are not used)
    IPV4_ALEN = 4
    IPV6_ALEN = 16

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


cdef uint64_t pseudo_sum_ipv4(const uint8_t *src_ip, const uint8_t *dst_ip,
                              Py_ssize_t length, uint8_t proto) noexcept nogil:
    # RFC 9293 §3.1, RFC 768: source, destination, zero, protocol, upper-layer length.
    cdef uint8_t ph[12]
    cdef uint16_t be_len = htobe16(<uint16_t>length)
    memcpy(ph, src_ip, 4)
    memcpy(ph + 4, dst_ip, 4)
    ph[8] = 0
    ph[9] = proto
    memcpy(ph + 10, &be_len, 2)
    return csum_partial(ph, 12, 0)


cdef uint64_t pseudo_sum(const uint8_t *src_ip, const uint8_t *dst_ip,
                         Py_ssize_t length) noexcept nogil:
    return pseudo_sum_ipv4(src_ip, dst_ip, length, IPPROTO_TCP)


cdef uint64_t pseudo_sum6(const uint8_t *src_ip, const uint8_t *dst_ip,
                          Py_ssize_t length) noexcept nogil:
    # RFC 8200 §8.1: source, destination, the 32-bit upper-layer length, three zero
    # octets and the next header.
    cdef uint8_t ph[40]
    cdef uint32_t be_len = htobe32(<uint32_t>length)
    memcpy(ph, src_ip, IPV6_ALEN)
    memcpy(ph + 16, dst_ip, IPV6_ALEN)
    memcpy(ph + 32, &be_len, 4)
    ph[36] = 0
    ph[37] = 0
    ph[38] = 0
    ph[39] = IPPROTO_TCP
    return csum_partial(ph, 40, 0)


cdef inline void put16(uint8_t *p, uint16_t v) noexcept nogil:
    cdef uint16_t be = htobe16(v)
    memcpy(p, &be, 2)


cdef inline void put32(uint8_t *p, uint32_t v) noexcept nogil:
    cdef uint32_t be = htobe32(v)
    memcpy(p, &be, 4)


cdef void write_ipv4_header_proto(uint8_t *out, uint16_t total, uint16_t ip_id,
                                  const uint8_t *src_ip, const uint8_t *dst_ip,
                                  uint8_t proto) noexcept nogil:
    # RFC 791 §3.1: no options, DF, TTL 64, with its header checksum.
    out[0] = IPV4_VERSION_IHL
    out[1] = 0
    put16(out + 2, total)
    put16(out + 4, ip_id)
    put16(out + 6, IPV4_FLAG_DF)
    out[8] = IPV4_DEFAULT_TTL
    out[9] = proto
    put16(out + 10, 0)
    memcpy(out + 12, src_ip, 4)
    memcpy(out + 16, dst_ip, 4)
    # csum_finish returns the checksum as a number; put16 stores it big-endian.
    put16(out + 10, csum_finish(csum_partial(out, IPV4_HEADER_LEN, 0)))


cdef void write_ipv4_header(uint8_t *out, uint16_t total, uint16_t ip_id,
                            const uint8_t *src_ip, const uint8_t *dst_ip) noexcept nogil:
    write_ipv4_header_proto(out, total, ip_id, src_ip, dst_ip, IPPROTO_TCP)


cdef void write_ipv6_header(uint8_t *out, uint16_t payload_len,
                            const uint8_t *src_ip, const uint8_t *dst_ip) noexcept nogil:
    # RFC 8200 §3: traffic class and flow label zero, no extension headers, next header
    # TCP, hop limit 64. IPv6 has no header checksum.
    out[0] = IPV6_VERSION_BYTE
    out[1] = 0
    out[2] = 0
    out[3] = 0
    put16(out + 4, payload_len)
    out[6] = IPPROTO_TCP
    out[7] = IPV6_DEFAULT_HOP_LIMIT
    memcpy(out + 8, src_ip, IPV6_ALEN)
    memcpy(out + 24, dst_ip, IPV6_ALEN)


cdef void write_tcp_header(uint8_t *t, uint16_t src_port, uint16_t dst_port,
                           uint32_t seq, uint32_t ack, Py_ssize_t header_len,
                           uint8_t flags, uint16_t window) noexcept nogil:
    # RFC 9293 §3.1, checksum and urgent pointer zero (the caller fills the checksum).
    put16(t, src_port)
    put16(t + 2, dst_port)
    put32(t + 4, seq)
    put32(t + 8, ack)
    t[12] = <uint8_t>((header_len >> 2) << 4)
    t[13] = flags
    put16(t + 14, window)
    put16(t + 16, 0)
    put16(t + 18, 0)


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
    # Every store below is inside out[0:total], checked just above.
    write_ipv4_header(out, <uint16_t>total, ip_id, src_ip, dst_ip)
    write_tcp_header(t, src_port, dst_port, seq, ack, TCP_HEADER_LEN + nopt, flags, window)
    cdef uint16_t c
    if nopt:
        memcpy(t + TCP_HEADER_LEN, options, nopt)
    if npay:
        memcpy(t + TCP_HEADER_LEN + nopt, payload, npay)
    c = csum_finish(csum_partial(t, tcp_len, pseudo_sum(src_ip, dst_ip, tcp_len)))
    put16(t + 16, c)
    return total


cdef Py_ssize_t write_ipv6_tcp(uint8_t *out, Py_ssize_t cap,
                               const uint8_t *src_ip, const uint8_t *dst_ip,
                               uint16_t src_port, uint16_t dst_port, uint32_t seq, uint32_t ack,
                               uint8_t flags, uint16_t window,
                               const uint8_t *options, Py_ssize_t nopt,
                               const uint8_t *payload, Py_ssize_t npay) noexcept nogil:
    cdef Py_ssize_t tcp_len = TCP_HEADER_LEN + nopt + npay
    cdef Py_ssize_t total = IPV6_HEADER_LEN + tcp_len
    cdef uint8_t *t = out + IPV6_HEADER_LEN
    if nopt < 0 or npay < 0 or nopt > TCP_MAX_OPTIONS_LEN or nopt & 3:
        return -1
    if tcp_len > IPV6_MAX_PAYLOAD_LEN or total > cap:
        return -1
    # Every store below is inside out[0:total], checked just above.
    write_ipv6_header(out, <uint16_t>tcp_len, src_ip, dst_ip)
    write_tcp_header(t, src_port, dst_port, seq, ack, TCP_HEADER_LEN + nopt, flags, window)
    cdef uint16_t c
    if nopt:
        memcpy(t + TCP_HEADER_LEN, options, nopt)
    if npay:
        memcpy(t + TCP_HEADER_LEN + nopt, payload, npay)
    c = csum_finish(csum_partial(t, tcp_len, pseudo_sum6(src_ip, dst_ip, tcp_len)))
    put16(t + 16, c)
    return total


cdef Py_ssize_t write_ip_tcp(uint8_t *out, Py_ssize_t cap, const uint8_t *src_ip,
                             const uint8_t *dst_ip, Py_ssize_t alen, uint16_t ip_id,
                             uint16_t src_port, uint16_t dst_port, uint32_t seq, uint32_t ack,
                             uint8_t flags, uint16_t window,
                             const uint8_t *options, Py_ssize_t nopt,
                             const uint8_t *payload, Py_ssize_t npay) noexcept nogil:
    if alen == IPV6_ALEN:
        return write_ipv6_tcp(out, cap, src_ip, dst_ip, src_port, dst_port, seq, ack, flags,
                              window, options, nopt, payload, npay)
    if alen != IPV4_ALEN:
        return -1
    return write_ipv4_tcp(out, cap, src_ip, dst_ip, ip_id, src_port, dst_port, seq, ack,
                          flags, window, options, nopt, payload, npay)


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
    """TCP checksum over the pseudo-header and segment (RFC 9293 §3.1; RFC 8200 §8.1 for
    16-byte addresses); 0 if intact."""
    cdef Py_ssize_t n = segment.shape[0]
    cdef uint64_t acc
    if src_ip.shape[0] == IPV6_ALEN and dst_ip.shape[0] == IPV6_ALEN:
        if n > IPV6_MAX_PAYLOAD_LEN:
            raise ValueError("TCP segment longer than an IPv6 packet can carry")
        acc = pseudo_sum6(&src_ip[0], &dst_ip[0], n)
        if n:
            acc = csum_partial(&segment[0], n, acc)
        return csum_finish(acc)
    if src_ip.shape[0] != 4 or dst_ip.shape[0] != 4:
        raise ValueError("IPv4 addresses are 4 bytes, IPv6 ones 16")
    if n > IPV4_MAX_TOTAL_LEN - IPV4_HEADER_LEN:
        raise ValueError("TCP segment longer than an IPv4 packet can carry")
    acc = pseudo_sum(&src_ip[0], &dst_ip[0], n)
    if n:
        acc = csum_partial(&segment[0], n, acc)
    return csum_finish(acc)


cdef enum:
    ETH_HEADER_LEN = 14
    ETH_ALEN = 6
    ETHERTYPE_IPV4 = 0x0800
    ETHERTYPE_IPV6 = 0x86DD
    IPPROTO_UDP = 17
    IPV4_FRAGMENT_BITS = 0x3FFF  # MF and the fragment offset (RFC 791 §3.1)


cdef inline bint from_guest(const uint8_t *f, bytes gateway_mac, bytes guest_mac,
                            uint16_t ethertype):
    """An Ethernet header from guest_mac to gateway_mac with this EtherType (the caller
    checked that the frame holds one and that the MACs are 6 bytes)."""
    return (memcmp(f, <const char *>gateway_mac, ETH_ALEN) == 0
            and memcmp(f + ETH_ALEN, <const char *>guest_mac, ETH_ALEN) == 0
            and f[12] == ethertype >> 8 and f[13] == (ethertype & 0xFF))


def guest_ipv4_split(const uint8_t[::1] frame, bytes gateway_mac, bytes guest_mac,
                     bytes guest_ip):
    """The engine's fast path (voidbox.net.engine.Engine.guest_frame): for an Ethernet
    frame from guest_mac to gateway_mac carrying one whole IPv4 packet from guest_ip (a
    valid header and header checksum, lengths within the frame, not a fragment), return
    (protocol, destination address, payload start, payload end) as offsets in the frame;
    None for anything else, which the engine's full path then parses and counts."""
    cdef Py_ssize_t n = frame.shape[0]
    cdef const uint8_t *f
    cdef Py_ssize_t ihl, total
    if (n < ETH_HEADER_LEN + IPV4_HEADER_LEN or len(gateway_mac) != ETH_ALEN
            or len(guest_mac) != ETH_ALEN or len(guest_ip) != IPV4_ALEN):
        return None
    f = &frame[0]
    if not from_guest(f, gateway_mac, guest_mac, ETHERTYPE_IPV4):
        return None
    f += ETH_HEADER_LEN
    if f[0] >> 4 != 4:
        return None
    ihl = (f[0] & 0x0F) * 4
    total = (<Py_ssize_t>f[2] << 8) | f[3]
    if (ihl < IPV4_HEADER_LEN or total < ihl or total > n - ETH_HEADER_LEN
            or ((f[6] << 8) | f[7]) & IPV4_FRAGMENT_BITS
            or memcmp(f + 12, <const char *>guest_ip, IPV4_ALEN) != 0
            or csum_finish(csum_partial(f, ihl, 0)) != 0):
        return None
    return (f[9], (<const char *>f + 16)[:IPV4_ALEN], ETH_HEADER_LEN + ihl,
            ETH_HEADER_LEN + total)


def guest_ipv6_split(const uint8_t[::1] frame, bytes gateway_mac, bytes guest_mac,
                     bytes prefix64):
    """guest_ipv4_split's IPv6 twin: for an Ethernet frame from guest_mac to gateway_mac
    carrying an IPv6 packet with no extension headers, TCP or UDP right after the fixed
    header (RFC 8200 §3), a payload length within the frame (not a jumbogram's 0 before a
    Hop-by-Hop header: that is not TCP or UDP), a source in the guest's /64 (prefix64, its
    first 8 bytes) and a destination that is not multicast, return (next header, source,
    destination, payload start, payload end); None for anything else. Which addresses of
    the /64 are the NAT's own is the caller's check."""
    cdef Py_ssize_t n = frame.shape[0]
    cdef const uint8_t *f
    cdef Py_ssize_t plen
    if (n < ETH_HEADER_LEN + IPV6_HEADER_LEN or len(gateway_mac) != ETH_ALEN
            or len(guest_mac) != ETH_ALEN or len(prefix64) != 8):
        return None
    f = &frame[0]
    if not from_guest(f, gateway_mac, guest_mac, ETHERTYPE_IPV6):
        return None
    f += ETH_HEADER_LEN
    plen = (<Py_ssize_t>f[4] << 8) | f[5]
    if (f[0] >> 4 != 6 or (f[6] != IPPROTO_TCP and f[6] != IPPROTO_UDP)
            or IPV6_HEADER_LEN + plen > n - ETH_HEADER_LEN
            or memcmp(f + 8, <const char *>prefix64, 8) != 0 or f[24] == 0xFF):
        return None
    return (f[6], (<const char *>f + 8)[:IPV6_ALEN], (<const char *>f + 24)[:IPV6_ALEN],
            ETH_HEADER_LEN + IPV6_HEADER_LEN, ETH_HEADER_LEN + IPV6_HEADER_LEN + plen)


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


def build_ipv6_tcp(uint8_t[::1] out, const uint8_t[::1] src_ip, const uint8_t[::1] dst_ip,
                   ip_id, src_port, dst_port, seq, ack, flags, window,
                   const uint8_t[::1] options, const uint8_t[::1] payload):
    """Write an IPv6 packet carrying one TCP segment into out; return its length.

    See voidbox.net._slirp_py.build_ipv6_tcp for the exact contract.
    """
    cdef Py_ssize_t nopt = options.shape[0]
    cdef Py_ssize_t npay = payload.shape[0]
    cdef Py_ssize_t n
    if nopt > TCP_MAX_OPTIONS_LEN or nopt & 3:
        raise ValueError("TCP options must be a multiple of 4 bytes, at most 40")
    if src_ip.shape[0] != IPV6_ALEN or dst_ip.shape[0] != IPV6_ALEN:
        raise ValueError("IPv6 addresses are 16 bytes")
    if not (0 <= src_port <= 0xFFFF and 0 <= dst_port <= 0xFFFF and 0 <= window <= 0xFFFF):
        raise ValueError("port or window out of range")
    if TCP_HEADER_LEN + nopt + npay > IPV6_MAX_PAYLOAD_LEN:
        raise ValueError("packet longer than IPv6 allows")
    if IPV6_HEADER_LEN + TCP_HEADER_LEN + nopt + npay > out.shape[0]:
        raise ValueError("output buffer too small for the packet")
    n = write_ipv6_tcp(&out[0], out.shape[0], &src_ip[0], &dst_ip[0],
                       src_port, dst_port, seq & SEQ_MASK, ack & SEQ_MASK, flags & 0xFF, window,
                       &options[0] if nopt else NULL, nopt,
                       &payload[0] if npay else NULL, npay)
    if n < 0:
        raise ValueError("packet does not fit")
    return n


# ---------------------------------------------------------------------------------------
# The allocator under a loop turn's batches.
# ---------------------------------------------------------------------------------------

cdef extern from "<malloc.h>" nogil:
    int mallopt(int param, int value)
    int M_TRIM_THRESHOLD
    int M_MMAP_THRESHOLD


def keep_freed_heap(int trim_threshold, int mmap_threshold):
    """Tell glibc's malloc to keep up to trim_threshold freed bytes at the heap's top rather
    than give them back to the kernel, and to serve blocks below mmap_threshold from the
    heap (mallopt(3)). Frames batched for one sendmsg are freed together at a turn's end:
    by default glibc returns that memory each turn and the next turn faults it back in,
    page by page. True if the allocator took both settings."""
    return (mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
            and mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1)


# ---------------------------------------------------------------------------------------
# Frame port: a TAP fd (or any fd that keeps frame boundaries) with virtio_net_hdr framing.
# ---------------------------------------------------------------------------------------

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.errno cimport EAGAIN, EINTR, errno  # EWOULDBLOCK == EAGAIN on Linux
from libc.stdlib cimport free, malloc

from voidbox.includes.sockio cimport MSG_DONTWAIT, c_read, c_recv, c_write, iovec, peek_iov, writev

cdef extern from "<string.h>" nogil:
    void *memset(void *s, int c, size_t n)

cdef enum:
    # virtio 1.2 §5.1.6 struct virtio_net_hdr (little-endian fields, as TUN uses by default).
    VIRTIO_NET_HDR_LEN = 10
    VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
    VIRTIO_NET_HDR_F_DATA_VALID = 2
    VIRTIO_NET_HDR_GSO_NONE = 0
    VIRTIO_NET_HDR_GSO_TCPV4 = 1
    VIRTIO_NET_HDR_GSO_TCPV6 = 4
    ETH_HLEN_C = 14
    ETH_P_IP_C = 0x0800
    ETH_P_IPV6_C = 0x86DD
    IPPROTO_UDP_C = 17
    UDP_HEADER_LEN_C = 8
    IPV4_UDP_HEADROOM = ETH_HLEN_C + IPV4_HEADER_LEN + UDP_HEADER_LEN_C
    UDP_CSUM_ALL_ONES = 0xFFFF  # RFC 768: a computed zero is sent as all ones
    TCP_CSUM_OFFSET = 16           # RFC 9293 §3.1: the checksum field's offset in the header
    TCP_FLAG_PSH = 0x08
    TCP_FLAG_ACK = 0x10
    SEG_HEADROOM = ETH_HLEN_C + IPV4_HEADER_LEN + TCP_HEADER_LEN
    SEG_HEADROOM6 = ETH_HLEN_C + IPV6_HEADER_LEN + TCP_HEADER_LEN
    # Frames per send_tcp_stream call; the caller loops for more.
    STREAM_MAX_FRAMES = 64
    # Largest TCP payload one IPv4 packet carries (RFC 791 total length is 16 bits).
    MAX_SEG_PAYLOAD = IPV4_MAX_TOTAL_LEN - IPV4_HEADER_LEN - TCP_HEADER_LEN
    # Over IPv6 a frame holds as much as an IPv4 one does (same slot size): 20 bytes less
    # payload behind the longer header, well inside the 16-bit Payload Length.
    MAX_SEG_PAYLOAD6 = MAX_SEG_PAYLOAD - (IPV6_HEADER_LEN - IPV4_HEADER_LEN)
    # Below this MSS no GSO: a peer announcing a tiny MSS must not make the kernel cut
    # a super-frame into thousands of segments (RFC 9293 §3.7.1 default MSS).
    TSO_MIN_MSS = 536

cdef enum StreamStatus:
    # send_tcp_stream: why the burst ended.
    S_MORE = 0      # the whole budget went out; the socket may hold more
    S_DRAINED = 1   # the socket had less than the budget (or nothing: EAGAIN)
    S_EOF = 2       # nothing left and the peer closed its side
    S_BLOCKED = 3   # the port refused a frame (EAGAIN): retry when it is writable

STREAM_MORE = S_MORE
STREAM_DRAINED = S_DRAINED
STREAM_EOF = S_EOF
STREAM_BLOCKED = S_BLOCKED

cdef enum DatagramStatus:
    # send_udp4: why the relay of a socket's datagrams ended.
    D_DRAINED = 0   # the socket had no more (EAGAIN)
    D_BUDGET = 1    # `budget` receives were made: the socket may hold more
    D_PAUSED = 2    # the owner has frames queued: nothing was received
    D_OVERSIZE = 3  # a datagram too long for one frame: its payload is in the buffer
    D_BLOCKED = 4   # the port refused a frame (EAGAIN): the frame is in the buffer

UDP_DRAINED = D_DRAINED
UDP_BUDGET = D_BUDGET
UDP_PAUSED = D_PAUSED
UDP_OVERSIZE = D_OVERSIZE
UDP_BLOCKED = D_BLOCKED


cdef inline void put16le(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = <uint8_t>(v & 0xFF)
    p[1] = <uint8_t>(v >> 8)


cdef inline uint16_t get16le(const uint8_t *p) noexcept nogil:
    return <uint16_t>(p[0] | (p[1] << 8))


cdef int rx_checksum_state(uint8_t *slot, Py_ssize_t length, int hl) noexcept nogil:
    """1: the frame's L4 checksum need not be checked; 0: check it; -1: drop the frame.

    virtio 1.2 §5.1.6.2: NEEDS_CSUM means the checksum from csum_start on is unfinished
    (the field holds the pseudo-header sum). If that is the IPv4 packet's own TCP/UDP
    header we relay only the payload, so nothing needs it. Otherwise (a tunnel's inner
    packet, say) it is finished here, as the kernel's skb_checksum_help would, because the
    payload we relay carries it.
    """
    cdef uint8_t *frame = slot + hl
    cdef Py_ssize_t flen = length - hl
    cdef Py_ssize_t start
    cdef Py_ssize_t field
    cdef uint16_t c
    if hl == 0:
        return 0
    if slot[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        start = get16le(slot + 6)
        field = start + get16le(slot + 8)
        if field + 2 > flen:
            return -1
        if (flen >= ETH_HLEN_C + IPV4_HEADER_LEN and frame[12] == (ETH_P_IP_C >> 8)
                and frame[13] == (ETH_P_IP_C & 0xFF)
                and start == ETH_HLEN_C + (frame[ETH_HLEN_C] & 0x0F) * 4):
            return 1
        if (flen >= ETH_HLEN_C + IPV6_HEADER_LEN and frame[12] == (ETH_P_IPV6_C >> 8)
                and frame[13] == (ETH_P_IPV6_C & 0xFF) and start == ETH_HLEN_C + IPV6_HEADER_LEN
                and (frame[ETH_HLEN_C + 6] == IPPROTO_TCP
                     or frame[ETH_HLEN_C + 6] == IPPROTO_UDP_C)):
            # The IPv6 packet's own TCP/UDP header, right behind the fixed header.
            return 1
        c = csum_finish(csum_partial(frame + start, flen - start, 0))
        put16(frame + field, c if c else 0xFFFF)  # RFC 768: a computed zero is sent as ~0
        return 0
    return 1 if slot[0] & VIRTIO_NET_HDR_F_DATA_VALID else 0


cdef class FramePort:
    """Batched frame I/O on an fd that carries one Ethernet frame per read and write.

    A TAP (Documentation/networking/tuntap.rst) or, in tests, an AF_UNIX datagram socket.
    With vnet_hdr_len > 0 every frame is preceded by a struct virtio_net_hdr (virtio 1.2
    §5.1.6; TUNSETVNETHDRSZ sets 10 or 12): frames that arrive with NEEDS_CSUM or DATA_VALID
    are reported as checksum-verified (the sender offloaded the checksum), and with
    tso=True the TCP stream sender writes GSO super-frames of up to 64 KiB that the other
    side segments (or, for local delivery, takes whole). The system calls run without the GIL.
    """

    cdef readonly int fd
    cdef readonly int vnet_hdr_len
    cdef readonly bint tso
    cdef readonly Py_ssize_t max_frame
    cdef readonly Py_ssize_t batch
    cdef uint8_t *rx
    cdef Py_ssize_t rx_slot
    cdef Py_ssize_t *rx_len
    cdef uint8_t *tx
    cdef Py_ssize_t tx_slot
    cdef public unsigned long long rx_frames, rx_dropped, tx_frames, tx_eagain, tx_dropped
    cdef public unsigned long long rx_oversize  # read_each's frames longer than `oversize`
    cdef public unsigned long long stream_frames, stream_bytes
    # Set while the owner has frames queued for the fd: stream sends then report
    # STREAM_BLOCKED rather than overtake them.
    cdef public bint paused
    # errno of the read that ended the last batch (0: EOF or a full batch). EBADFD after
    # EPOLLERR means the TAP's interface is gone (deleted): the owner stops watching it.
    cdef readonly int read_errno

    def __cinit__(self, int fd, int vnet_hdr_len=0, Py_ssize_t max_frame=65550,
                  Py_ssize_t batch=64, bint tso=False):
        if vnet_hdr_len not in (0, 10, 12):
            raise ValueError("vnet_hdr_len must be 0, 10 or 12")
        if tso and not vnet_hdr_len:
            raise ValueError("TSO needs the virtio_net_hdr")
        if max_frame < ETH_HLEN_C or batch < 1:
            raise ValueError("max_frame and batch must be positive")
        self.fd = fd
        self.vnet_hdr_len = vnet_hdr_len
        self.tso = tso
        self.max_frame = max_frame
        self.batch = batch
        self.rx_slot = vnet_hdr_len + max_frame
        self.rx = <uint8_t *>malloc(self.rx_slot * batch)
        self.rx_len = <Py_ssize_t *>malloc(sizeof(Py_ssize_t) * batch)
        self.tx_slot = vnet_hdr_len + SEG_HEADROOM + MAX_SEG_PAYLOAD
        self.tx = NULL  # allocated on the first stream send
        if self.rx == NULL or self.rx_len == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.rx)
        free(self.rx_len)
        free(self.tx)

    cdef Py_ssize_t _read_slots(self) noexcept:
        """Read up to `batch` frames into the slots without the GIL; returns how many.
        Stops at EAGAIN, at EOF and at a read error, setting read_errno."""
        cdef Py_ssize_t n = 0
        cdef ssize_t r
        self.read_errno = 0
        with nogil:
            while n < self.batch:
                r = c_read(self.fd, self.rx + n * self.rx_slot, self.rx_slot)
                if r < 0 and errno == EINTR:
                    continue
                if r <= 0:
                    if r < 0:
                        self.read_errno = errno
                    break
                self.rx_len[n] = r
                n += 1
        return n

    cdef int _slot_state(self, Py_ssize_t i) noexcept:
        """Slot i's checksum state (1: verified, 0: to check), or -1: dropped (counted)."""
        cdef uint8_t *slot = self.rx + i * self.rx_slot
        cdef int state
        if self.rx_len[i] < self.vnet_hdr_len + ETH_HLEN_C:
            self.rx_dropped += 1
            return -1
        state = rx_checksum_state(slot, self.rx_len[i], self.vnet_hdr_len)
        if state < 0:
            self.rx_dropped += 1
        return state

    def read_batch(self):
        """Read up to `batch` frames; return [(frame bytes, checksum_verified)].

        Stops at EAGAIN, at EOF and at a read error (EIO before the interface is up); those
        end the batch without raising, and read_errno tells which. Frames shorter than the
        virtio header, and frames whose NEEDS_CSUM points outside them, are dropped
        (rx_dropped).
        """
        cdef Py_ssize_t n = self._read_slots()
        cdef Py_ssize_t i
        cdef int state
        cdef int hl = self.vnet_hdr_len
        out = []
        for i in range(n):
            state = self._slot_state(i)
            if state < 0:
                continue
            out.append((PyBytes_FromStringAndSize(<char *>self.rx + i * self.rx_slot + hl,
                                                  self.rx_len[i] - hl), state == 1))
        self.rx_frames += len(out)
        return out

    def read_each(self, on_frame, Py_ssize_t oversize=0):
        """read_batch's work, each frame handed to on_frame(frame, checksum_verified) as
        soon as it is read and checked, before the next read: the answer to a lone request
        (the usual wakeup) leaves before the read that finds the fd empty, and the per-frame
        work stays in C.

        Frames longer than oversize (if > 0: the MTU's frame) are counted in rx_oversize
        (GSO super-frames). Returns the frames handed over. An exception from on_frame
        ends the batch; the frames behind it stay unread in the fd.
        """
        cdef Py_ssize_t n = 0
        cdef Py_ssize_t flen
        cdef Py_ssize_t handed = 0
        cdef ssize_t r
        cdef int state, err = 0
        cdef int hl = self.vnet_hdr_len
        cdef uint8_t *slot = self.rx
        self.read_errno = 0
        while n < self.batch:
            with nogil:
                r = c_read(self.fd, slot, self.rx_slot)
                while r < 0 and errno == EINTR:
                    r = c_read(self.fd, slot, self.rx_slot)
                if r < 0:
                    err = errno  # before the GIL is taken back
            if r <= 0:
                self.read_errno = err
                break
            n += 1
            self.rx_len[0] = r
            state = self._slot_state(0)
            if state < 0:
                continue
            flen = r - hl
            if 0 < oversize < flen:
                self.rx_oversize += 1
            self.rx_frames += 1
            handed += 1
            on_frame(PyBytes_FromStringAndSize(<char *>slot + hl, flen), state == 1)
        return handed

    def write(self, const uint8_t[::1] frame):
        """Write one frame (its checksums complete). 1: written, 0: EAGAIN, -1: error
        (counted in tx_dropped)."""
        cdef uint8_t hdr[12]
        cdef iovec iov[2]
        cdef ssize_t r
        cdef int cnt = 0
        cdef Py_ssize_t n = frame.shape[0]
        if n == 0:
            return -1
        memset(hdr, 0, sizeof(hdr))
        if self.vnet_hdr_len:
            iov[0].iov_base = hdr
            iov[0].iov_len = self.vnet_hdr_len
            cnt = 1
        iov[cnt].iov_base = <void *>&frame[0]
        iov[cnt].iov_len = n
        cnt += 1
        cdef int err = 0
        with nogil:
            while True:
                r = writev(self.fd, iov, cnt)
                if not (r < 0 and errno == EINTR):
                    break
            if r < 0:
                err = errno
        if r >= 0:
            self.tx_frames += 1
            return 1
        if err == EAGAIN:
            self.tx_eagain += 1
            return 0
        self.tx_dropped += 1
        return -1

    def send_udp4(self, int sockfd, uint8_t[::1] buf, const uint8_t[::1] eth_header,
                  const uint8_t[::1] src_ip, const uint8_t[::1] dst_ip, int src_port,
                  int dst_port, int ip_id, Py_ssize_t budget, Py_ssize_t mtu):
        """Relay datagrams from the connected UDP socket sockfd to the port: each is
        received straight into buf behind the room for its Ethernet, IPv4 and UDP headers
        (42 bytes), framed there (both checksums, DF, TTL 64, identification ip_id, then
        ip_id + 1, ...) and written. At most `budget` receives are made; one that fails
        with another error than EAGAIN (an ICMP error the socket reports, see IP_RECVERR)
        uses one up and is skipped, as the UDP NAT's own loop does.

        Returns (frames written, identifications used, status, n). Status:
        UDP_DRAINED: the socket had no more; UDP_BUDGET: all `budget` receives were made;
        UDP_PAUSED: the port is paused (its owner has frames queued), nothing was received;
        UDP_OVERSIZE: a datagram of n bytes is too long for one frame (28 + n > mtu): its
        payload is at buf[42:42 + n], for the caller to send as fragments;
        UDP_BLOCKED: the port refused the frame with EAGAIN: the whole frame, 42 + n bytes,
        is at buf[0:42 + n] for the caller to queue (its identification counts as used).
        A frame the port refuses for good is lost on the wire (tx_dropped).
        """
        cdef Py_ssize_t cap = buf.shape[0] - IPV4_UDP_HEADROOM
        cdef Py_ssize_t written = 0, ids = 0, tries = 0, n = 0
        cdef ssize_t r
        cdef int status = D_BUDGET
        cdef int hl = self.vnet_hdr_len
        cdef uint8_t vhdr[VIRTIO_NET_HDR_LEN + 2]
        cdef iovec iov[2]
        cdef uint8_t *p
        cdef uint8_t *u
        cdef uint16_t c
        if eth_header.shape[0] != ETH_HLEN_C or src_ip.shape[0] != 4 or dst_ip.shape[0] != 4:
            raise ValueError("Ethernet header is 14 bytes, IPv4 addresses 4")
        if cap < 0:
            raise ValueError("the buffer has no room behind the headers")
        if not (0 <= src_port <= 0xFFFF and 0 <= dst_port <= 0xFFFF and 0 <= ip_id <= 0xFFFF):
            raise ValueError("ports and the identification are 16-bit numbers")
        if self.paused:
            return 0, 0, D_PAUSED, 0
        p = &buf[0]
        u = p + ETH_HLEN_C + IPV4_HEADER_LEN
        memset(vhdr, 0, sizeof(vhdr))
        iov[0].iov_base = vhdr
        iov[0].iov_len = hl
        iov[1].iov_base = p
        with nogil:
            while tries < budget:
                tries += 1
                r = c_recv(sockfd, p + IPV4_UDP_HEADROOM, cap, MSG_DONTWAIT)
                if r < 0:
                    if errno == EINTR:
                        tries -= 1
                        continue
                    if errno == EAGAIN:
                        status = D_DRAINED
                        break
                    continue  # the socket's pending error, reported once
                n = r
                if IPV4_HEADER_LEN + UDP_HEADER_LEN_C + n > mtu:
                    status = D_OVERSIZE
                    break
                memcpy(p, &eth_header[0], ETH_HLEN_C)
                put16(u, <uint16_t>src_port)
                put16(u + 2, <uint16_t>dst_port)
                put16(u + 4, <uint16_t>(UDP_HEADER_LEN_C + n))
                put16(u + 6, 0)
                c = csum_finish(csum_partial(u, UDP_HEADER_LEN_C + n,
                                             pseudo_sum_ipv4(&src_ip[0], &dst_ip[0],
                                                             UDP_HEADER_LEN_C + n,
                                                             IPPROTO_UDP_C)))
                put16(u + 6, c if c else UDP_CSUM_ALL_ONES)
                write_ipv4_header_proto(p + ETH_HLEN_C,
                                        <uint16_t>(IPV4_HEADER_LEN + UDP_HEADER_LEN_C + n),
                                        <uint16_t>((ip_id + ids) & 0xFFFF), &src_ip[0],
                                        &dst_ip[0], IPPROTO_UDP_C)
                ids += 1
                iov[1].iov_len = IPV4_UDP_HEADROOM + n
                while True:
                    r = writev(self.fd, iov + (0 if hl else 1), 2 if hl else 1)
                    if not (r < 0 and errno == EINTR):
                        break
                if r < 0:
                    if errno == EAGAIN:
                        self.tx_eagain += 1
                        status = D_BLOCKED
                        break
                    self.tx_dropped += 1
                else:
                    written += 1
            self.tx_frames += written
        return written, ids, status, n

    def send_tcp_stream(self, int sockfd, const uint8_t[::1] eth_header,
                        const uint8_t[::1] src_ip, const uint8_t[::1] dst_ip,
                        int src_port, int dst_port, uint64_t seq, uint64_t ack, int window,
                        int mss, Py_ssize_t budget, int ip_id):
        """Peek up to budget bytes from the TCP socket sockfd (at its SO_PEEK_OFF) straight
        into frames, put Ethernet/IPv4/TCP headers (IPv6 for 16-byte addresses) in front and
        write them to the port.

        One recvmsg(MSG_PEEK) fills up to STREAM_MAX_FRAMES frames; segments carry at most
        mss bytes, or with tso a GSO super-frame of mss-sized segments. Every segment has
        ACK and the last one PSH. Returns (bytes sent, bytes peeked, frames written, status);
        bytes of frames the port rejected for good count as sent (lost on the wire); the
        caller commits the bytes sent to the TCP state and moves SO_PEEK_OFF back by
        peeked - sent. Status is STREAM_MORE, STREAM_DRAINED, STREAM_EOF, STREAM_BLOCKED, or
        a negative errno from recvmsg.
        """
        cdef bint v6 = src_ip.shape[0] == IPV6_ALEN and dst_ip.shape[0] == IPV6_ALEN
        if eth_header.shape[0] != ETH_HLEN_C or not (
                v6 or (src_ip.shape[0] == 4 and dst_ip.shape[0] == 4)):
            raise ValueError("Ethernet header is 14 bytes, IPv4 addresses 4, IPv6 ones 16")
        cdef Py_ssize_t max_seg = MAX_SEG_PAYLOAD6 if v6 else MAX_SEG_PAYLOAD
        if not (0 < mss <= max_seg) or budget < 0:
            raise ValueError("mss or budget out of range")
        if not (0 <= src_port <= 0xFFFF and 0 <= dst_port <= 0xFFFF and 0 <= window <= 0xFFFF):
            raise ValueError("port or window out of range")
        if self.paused:
            return 0, 0, 0, S_BLOCKED
        if self.tx == NULL:
            self.tx = <uint8_t *>malloc(self.tx_slot * STREAM_MAX_FRAMES)
            if self.tx == NULL:
                raise MemoryError()
        cdef Py_ssize_t seg_cap = mss
        if self.tso and mss >= TSO_MIN_MSS:
            # As many whole segments as one packet holds.
            seg_cap = (max_seg // mss) * mss
        cdef iovec iov[STREAM_MAX_FRAMES]
        cdef Py_ssize_t nframes = 0
        cdef Py_ssize_t want = 0
        cdef Py_ssize_t off = (SEG_HEADROOM6 if v6 else SEG_HEADROOM) + self.vnet_hdr_len
        while nframes < STREAM_MAX_FRAMES and want < budget:
            iov[nframes].iov_base = self.tx + nframes * self.tx_slot + off
            iov[nframes].iov_len = min(seg_cap, budget - want)
            want += iov[nframes].iov_len
            nframes += 1
        if want == 0:
            return 0, 0, 0, S_MORE
        cdef ssize_t got
        cdef Py_ssize_t sent = 0
        cdef Py_ssize_t frames = 0  # frames the port took
        cdef int status = S_MORE
        cdef int err = 0
        with nogil:
            got = peek_iov(sockfd, iov, nframes, &err)
            if got > 0:
                status = self._write_stream(got, want, &eth_header[0], &src_ip[0], &dst_ip[0],
                                            src_port, dst_port, <uint32_t>(seq & SEQ_MASK),
                                            <uint32_t>(ack & SEQ_MASK), window, mss,
                                            seg_cap, ip_id, v6, &sent, &frames)
        if got < 0:
            if err == EAGAIN:
                return 0, 0, 0, S_DRAINED
            return 0, 0, 0, -err
        if got == 0:
            return 0, 0, 0, S_EOF
        self.stream_frames += frames
        self.stream_bytes += sent
        self.tx_frames += frames
        return sent, got, frames, status

    cdef int _write_stream(self, Py_ssize_t got, Py_ssize_t want, const uint8_t *eth,
                           const uint8_t *src_ip, const uint8_t *dst_ip, int src_port,
                           int dst_port, uint32_t seq, uint32_t ack, int window, int mss,
                           Py_ssize_t seg_cap, int ip_id, bint v6, Py_ssize_t *sent_out,
                           Py_ssize_t *frames_out) noexcept nogil:
        # Headers go in front of each peeked payload; the last segment gets PSH.
        cdef Py_ssize_t done = 0
        cdef Py_ssize_t n
        cdef Py_ssize_t frame_len
        cdef uint8_t *slot
        cdef uint8_t *frame
        cdef uint8_t *ip
        cdef uint8_t *t
        cdef uint8_t flags
        cdef int hl = self.vnet_hdr_len
        cdef ssize_t r
        cdef uint16_t c
        cdef Py_ssize_t i = 0
        cdef Py_ssize_t written = 0
        cdef int status = S_MORE if got == want else S_DRAINED
        cdef Py_ssize_t iphl = IPV6_HEADER_LEN if v6 else IPV4_HEADER_LEN
        cdef Py_ssize_t headroom = ETH_HLEN_C + iphl + TCP_HEADER_LEN
        cdef uint64_t ph
        while done < got:
            n = min(seg_cap, got - done)
            slot = self.tx + i * self.tx_slot
            frame = slot + hl
            ip = frame + ETH_HLEN_C
            t = ip + iphl
            memcpy(frame, eth, ETH_HLEN_C)
            flags = TCP_FLAG_ACK
            if done + n >= got:
                flags |= TCP_FLAG_PSH
            if v6:
                write_ipv6_header(ip, <uint16_t>(TCP_HEADER_LEN + n), src_ip, dst_ip)
                ph = pseudo_sum6(src_ip, dst_ip, TCP_HEADER_LEN + n)
            else:
                write_ipv4_header(ip, <uint16_t>(IPV4_HEADER_LEN + TCP_HEADER_LEN + n),
                                  <uint16_t>((ip_id + i) & 0xFFFF), src_ip, dst_ip)
                ph = pseudo_sum(src_ip, dst_ip, TCP_HEADER_LEN + n)
            write_tcp_header(t, <uint16_t>src_port, <uint16_t>dst_port, <uint32_t>(seq + done),
                             ack, TCP_HEADER_LEN, flags, <uint16_t>window)
            if hl:
                memset(slot, 0, hl)
                # virtio 1.2 §5.1.6.2: the receiver completes the checksum from csum_start;
                # the field holds the pseudo-header sum (not complemented) meanwhile.
                slot[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM
                put16le(slot + 6, <uint16_t>(ETH_HLEN_C + iphl))
                put16le(slot + 8, TCP_CSUM_OFFSET)
                c = <uint16_t>(~csum_finish(ph))
                put16(t + 16, c)
                if n > mss:
                    slot[1] = VIRTIO_NET_HDR_GSO_TCPV6 if v6 else VIRTIO_NET_HDR_GSO_TCPV4
                    put16le(slot + 2, <uint16_t>headroom)
                    put16le(slot + 4, <uint16_t>mss)
            else:
                c = csum_finish(csum_partial(t, TCP_HEADER_LEN + n, ph))
                put16(t + 16, c)
            frame_len = hl + headroom + n
            while True:
                r = c_write(self.fd, slot, frame_len)
                if not (r < 0 and errno == EINTR):
                    break
            if r < 0:
                if errno == EAGAIN:
                    self.tx_eagain += 1
                    status = S_BLOCKED
                    break
                # A frame the port refused for good is lost on the wire: TCP retransmits.
                self.tx_dropped += 1
            else:
                written += 1
            done += n
            i += 1
        sent_out[0] = done
        frames_out[0] = written
        return status
