"""Pure-Python twin of voidbox/_slirp.pyx: the user-mode NAT's per-packet hot path.

Same functions, same results, same errors as the compiled module; tests run against both.
voidbox.net.fastpath picks one of the two.

- Sequence-number comparisons on uint32 with wraparound (RFC 9293 §3.4: "arithmetic
  modulo 2**32"), valid while the two numbers are less than 2**31 apart.
- The Internet checksum (RFC 1071) and the TCP checksum over the IPv4 pseudo-header
  (RFC 9293 §3.1, "Checksum").
- Building a whole IPv4 + TCP packet (RFC 791 §3.1, RFC 9293 §3.1) into a caller's buffer.
"""

import struct
import sys

SEQ_MOD = 1 << 32
SEQ_MASK = SEQ_MOD - 1
SEQ_HALF = 1 << 31

IPV4_HEADER_LEN = 20
TCP_HEADER_LEN = 20
TCP_MAX_OPTIONS_LEN = 40
IPPROTO_TCP = 6
IPV4_VERSION_IHL = 0x45  # version 4, header length 5 words (no IP options)
IPV4_FLAG_DF = 0x4000  # RFC 791 §3.1: don't fragment
IPV4_DEFAULT_TTL = 64
IPV4_MAX_TOTAL_LEN = 0xFFFF

_LITTLE = sys.byteorder == "little"
_IPV4_HDR = struct.Struct("!BBHHHBBH4s4s")
_TCP_HDR = struct.Struct("!HHIIBBHHH")


def seq_lt(a: int, b: int) -> bool:
    """a < b in sequence space (RFC 9293 §3.4)."""
    return 0 < ((b - a) & SEQ_MASK) < SEQ_HALF


def seq_le(a: int, b: int) -> bool:
    """a <= b in sequence space (RFC 9293 §3.4)."""
    return ((b - a) & SEQ_MASK) < SEQ_HALF


def seq_gt(a: int, b: int) -> bool:
    """a > b in sequence space (RFC 9293 §3.4)."""
    return 0 < ((a - b) & SEQ_MASK) < SEQ_HALF


def seq_ge(a: int, b: int) -> bool:
    """a >= b in sequence space (RFC 9293 §3.4)."""
    return ((a - b) & SEQ_MASK) < SEQ_HALF


def seq_add(a: int, n: int) -> int:
    """a + n modulo 2**32."""
    return (a + n) & SEQ_MASK


def seq_diff(a: int, b: int) -> int:
    """a - b as a signed 32-bit distance (positive when a is after b)."""
    d = (a - b) & SEQ_MASK
    return d - SEQ_MOD if d >= SEQ_HALF else d


def _sum16(data, acc: int = 0) -> int:
    """Native-order sum of 16-bit words, unfolded (RFC 1071 §2(B): byte order independence)."""
    mv = memoryview(data).cast("B")
    if len(mv) & 1:
        # An odd trailing byte is the high byte of a big-endian word padded with zero.
        mv = memoryview(bytes(mv) + b"\0")
    return acc + sum(mv.cast("H"))


def _fold(acc: int) -> int:
    while acc >> 16:
        acc = (acc & 0xFFFF) + (acc >> 16)
    if _LITTLE:
        acc = ((acc & 0xFF) << 8) | (acc >> 8)
    return acc


def inet_checksum(data) -> int:
    """The Internet checksum of data (RFC 1071): one's complement of the one's complement sum.

    Over a header that includes its own checksum field the result is 0 when it is valid.
    """
    return ~_fold(_sum16(data)) & 0xFFFF


def _pseudo_sum(src_ip, dst_ip, length: int) -> int:
    if len(src_ip) != 4 or len(dst_ip) != 4:
        raise ValueError("IPv4 addresses are 4 bytes")
    return _sum16(bytes(src_ip) + bytes(dst_ip) + struct.pack("!BBH", 0, IPPROTO_TCP, length))


def tcp_checksum(src_ip, dst_ip, segment) -> int:
    """TCP checksum over the IPv4 pseudo-header and segment (RFC 9293 §3.1).

    With the segment's checksum field included the result is 0 when the segment is intact.
    """
    seg = memoryview(segment).cast("B")
    if len(seg) > IPV4_MAX_TOTAL_LEN - IPV4_HEADER_LEN:
        raise ValueError("TCP segment longer than an IPv4 packet can carry")
    return ~_fold(_sum16(seg, _pseudo_sum(src_ip, dst_ip, len(seg)))) & 0xFFFF


def build_ipv4_tcp(out, src_ip, dst_ip, ip_id: int, src_port: int, dst_port: int, seq: int,
                   ack: int, flags: int, window: int, options, payload) -> int:
    """Write an IPv4 packet carrying one TCP segment into out; return its length.

    The IPv4 header has no options, DF set, TTL 64 and a valid header checksum (RFC 791 §3.1);
    the TCP header carries `options` (already padded to 4 bytes, RFC 9293 §3.1) and a valid
    checksum. Raises ValueError if out is too small or a field is out of range.
    """
    buf = memoryview(out).cast("B")
    opts = memoryview(options).cast("B")
    data = memoryview(payload).cast("B")
    nopt = len(opts)
    if nopt > TCP_MAX_OPTIONS_LEN or nopt & 3:
        raise ValueError("TCP options must be a multiple of 4 bytes, at most 40")
    if len(src_ip) != 4 or len(dst_ip) != 4:
        raise ValueError("IPv4 addresses are 4 bytes")
    if not (0 <= src_port <= 0xFFFF and 0 <= dst_port <= 0xFFFF and 0 <= window <= 0xFFFF):
        raise ValueError("port or window out of range")
    tcp_len = TCP_HEADER_LEN + nopt + len(data)
    total = IPV4_HEADER_LEN + tcp_len
    if total > IPV4_MAX_TOTAL_LEN:
        raise ValueError("packet longer than IPv4 allows")
    if total > len(buf):
        raise ValueError("output buffer too small for the packet")
    _IPV4_HDR.pack_into(buf, 0, IPV4_VERSION_IHL, 0, total, ip_id & 0xFFFF, IPV4_FLAG_DF,
                        IPV4_DEFAULT_TTL, IPPROTO_TCP, 0, bytes(src_ip), bytes(dst_ip))
    struct.pack_into("!H", buf, 10, inet_checksum(buf[:IPV4_HEADER_LEN]))
    t = IPV4_HEADER_LEN
    data_offset = (TCP_HEADER_LEN + nopt) >> 2
    _TCP_HDR.pack_into(buf, t, src_port, dst_port, seq & SEQ_MASK, ack & SEQ_MASK,
                       data_offset << 4, flags & 0xFF, window, 0, 0)
    buf[t + TCP_HEADER_LEN:t + TCP_HEADER_LEN + nopt] = opts
    buf[t + TCP_HEADER_LEN + nopt:total] = data
    struct.pack_into("!H", buf, t + 16, tcp_checksum(src_ip, dst_ip, buf[t:total]))
    return total
