# cython: language_level=3
"""The UDP relay's per-datagram work (compiled twin of voidbox/net/_udp_py.py, which is the
specification: same names, results and errors).

- guest_udp_split: the UDP header of a guest IPv4 datagram the engine's fast path found
  (RFC 768), checked as packets.parse_udp checks it, in one call.
- build_ipv4_udp: the IPv4 and UDP headers of a reply (RFC 791 §3.1, RFC 768), both
  checksums included, written in front of a payload already in the caller's buffer.

Each new-socket query (a DNS lookup) is one datagram each way: these replace a dozen
Python-level steps per datagram with one call.
"""
from libc.stdint cimport uint8_t, uint16_t

from voidbox._slirp cimport csum_finish, csum_partial, pseudo_sum_ipv4, write_ipv4_header_proto

from voidbox.net.packets import PacketError

cdef enum:
    IPV4_HEADER_LEN = 20
    UDP_HEADER_LEN = 8
    IPV4_UDP_HEADER_LEN = 28
    IPV4_ALEN = 4
    IPPROTO_UDP = 17
    IPV4_MAX_TOTAL_LEN = 0xFFFF
    UDP_CSUM_NONE = 0xFFFF       # RFC 768: a computed zero is sent as all ones
    DHCP_SERVER_PORT = 67
    DHCP_CLIENT_PORT = 68
    PORT_MAX = 0xFFFF


cdef inline uint16_t get16(const uint8_t *p) noexcept nogil:
    return (p[0] << 8) | p[1]


cdef inline void put16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = v >> 8
    p[1] = v & 0xFF


def guest_udp_split(const uint8_t[::1] frame, Py_ssize_t start, Py_ssize_t end,
                    const uint8_t[::1] src_ip, const uint8_t[::1] dst_ip, bint verify):
    """The UDP datagram at frame[start:end] (an IPv4 payload, src_ip and dst_ip its 4-byte
    addresses): (source port, destination port, end of its payload in frame), the payload
    starting 8 bytes after start. None for a DHCP client's datagram to the server port
    (68 -> 67, read wherever the frame holds 4 bytes there), which the engine's full path
    takes. PacketError as packets.parse_udp raises it: udp_short, udp_length (the UDP
    length outside [8, end - start]), and with verify, udp_checksum (a non-zero
    checksum that does not sum to zero over the pseudo-header and datagram)."""
    cdef Py_ssize_t n = frame.shape[0]
    cdef const uint8_t *u
    cdef Py_ssize_t length
    if src_ip.shape[0] != IPV4_ALEN or dst_ip.shape[0] != IPV4_ALEN:
        raise ValueError("IPv4 addresses are 4 bytes")
    if start < 0 or end < start or end > n:
        raise ValueError("the datagram's bounds are outside the frame")
    u = &frame[0] + start
    if (n >= start + 4 and get16(u) == DHCP_CLIENT_PORT
            and get16(u + 2) == DHCP_SERVER_PORT):
        return None
    if end - start < UDP_HEADER_LEN:
        raise PacketError("udp_short")
    length = get16(u + 4)
    if length < UDP_HEADER_LEN or length > end - start:
        raise PacketError("udp_length")
    # RFC 768: an all-zero checksum means the sender computed none.
    if (verify and get16(u + 6) != 0
            and csum_finish(csum_partial(u, length,
                                         pseudo_sum_ipv4(&src_ip[0], &dst_ip[0], length,
                                                         IPPROTO_UDP))) != 0):
        raise PacketError("udp_checksum")
    return get16(u), get16(u + 2), start + length


def build_ipv4_udp(uint8_t[::1] buf, Py_ssize_t off, const uint8_t[::1] src_ip,
                   const uint8_t[::1] dst_ip, int ident, int sport, int dport,
                   Py_ssize_t n):
    """Write an IPv4 header (no options, DF, TTL 64, identification ident) and a UDP header
    at buf[off:off + 28], both checksums computed, in front of the n payload bytes already
    at buf[off + 28:]; return the packet's length, 28 + n. ValueError for what does not
    fit (the buffer, a 16-bit total length, ports and ident of 16 bits)."""
    cdef uint8_t *p
    cdef Py_ssize_t total = IPV4_UDP_HEADER_LEN + n
    cdef uint16_t csum
    if src_ip.shape[0] != IPV4_ALEN or dst_ip.shape[0] != IPV4_ALEN:
        raise ValueError("IPv4 addresses are 4 bytes")
    if not (0 <= sport <= PORT_MAX and 0 <= dport <= PORT_MAX and 0 <= ident <= PORT_MAX):
        raise ValueError("ports and the identification are 16-bit numbers")
    if n < 0 or total > IPV4_MAX_TOTAL_LEN:
        raise ValueError("a UDP payload longer than an IPv4 packet can carry")
    if off < 0 or off + total > buf.shape[0]:
        raise ValueError("the packet does not fit the buffer")
    p = &buf[0] + off
    with nogil:
        # UDP header first, its checksum over the pseudo-header and datagram.
        put16(p + 20, <uint16_t>sport)
        put16(p + 22, <uint16_t>dport)
        put16(p + 24, <uint16_t>(UDP_HEADER_LEN + n))
        put16(p + 26, 0)
        csum = csum_finish(csum_partial(p + IPV4_HEADER_LEN, UDP_HEADER_LEN + n,
                                        pseudo_sum_ipv4(&src_ip[0], &dst_ip[0],
                                                        UDP_HEADER_LEN + n, IPPROTO_UDP)))
        put16(p + 26, csum if csum else UDP_CSUM_NONE)
        write_ipv4_header_proto(p, <uint16_t>total, <uint16_t>ident, &src_ip[0], &dst_ip[0],
                                IPPROTO_UDP)
    return total
