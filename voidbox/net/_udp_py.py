"""The UDP relay's per-datagram work: the readable specification of voidbox/_udp.pyx (same
names, results and errors; VOIDBOX_PURE=1 or a checkout without build_ext uses this one).

- guest_udp_split: the UDP header of a guest IPv4 datagram the engine's fast path found
  (RFC 768), checked as packets.parse_udp checks it, in one call.
- build_ipv4_udp: the IPv4 and UDP headers of a reply (RFC 791 §3.1, RFC 768), both
  checksums included, written in front of a payload already in the caller's buffer.
"""

from __future__ import annotations

import struct

from voidbox.net._slirp_py import _bytes_view, inet_checksum
from voidbox.net.packets import PacketError

IPV4_HEADER_LEN = 20
UDP_HEADER_LEN = 8
IPV4_UDP_HEADER_LEN = IPV4_HEADER_LEN + UDP_HEADER_LEN
IPPROTO_UDP = 17
IPV4_VERSION_IHL = 0x45  # version 4, 5 header words (no IP options)
IPV4_FLAG_DF = 0x4000  # RFC 791 §3.1: don't fragment
IPV4_DEFAULT_TTL = 64
IPV4_MAX_TOTAL_LEN = 0xFFFF
UDP_CSUM_NONE = 0xFFFF  # RFC 768: a computed zero is sent as all ones
DHCP_SERVER_PORT = 67
DHCP_CLIENT_PORT = 68
PORT_MAX = 0xFFFF
_PSEUDO = struct.Struct("!4s4sBBH")  # RFC 768: source, destination, zero, protocol, length
_UDP = struct.Struct("!HHHH")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")


def _udp_checksum(src_ip, dst_ip, datagram) -> int:
    """The UDP checksum over the pseudo-header and datagram (0 when a datagram that
    carries its checksum is intact)."""
    return inet_checksum(_PSEUDO.pack(bytes(src_ip), bytes(dst_ip), 0, IPPROTO_UDP,
                                      len(datagram)) + bytes(datagram))


def guest_udp_split(frame, start: int, end: int, src_ip, dst_ip, verify: bool):
    """The UDP datagram at frame[start:end] (an IPv4 payload, src_ip and dst_ip its 4-byte
    addresses): (source port, destination port, end of its payload in frame), the payload
    starting 8 bytes after start. None for a DHCP client's datagram to the server port
    (68 -> 67, read wherever the frame holds 4 bytes there), which the engine's full path
    takes. PacketError as packets.parse_udp raises it: udp_short, udp_length (the UDP
    length outside [8, end - start]), and with verify, udp_checksum (a non-zero
    checksum that does not sum to zero over the pseudo-header and datagram)."""
    f, src_ip, dst_ip = _bytes_view(frame), _bytes_view(src_ip), _bytes_view(dst_ip)
    if len(src_ip) != 4 or len(dst_ip) != 4:
        raise ValueError("IPv4 addresses are 4 bytes")
    if start < 0 or end < start or end > len(f):
        raise ValueError("the datagram's bounds are outside the frame")
    if (len(f) >= start + 4 and int.from_bytes(f[start:start + 2], "big") == DHCP_CLIENT_PORT
            and int.from_bytes(f[start + 2:start + 4], "big") == DHCP_SERVER_PORT):
        return None
    if end - start < UDP_HEADER_LEN:
        raise PacketError("udp_short")
    sport, dport, length, csum = _UDP.unpack_from(f, start)
    if length < UDP_HEADER_LEN or length > end - start:
        raise PacketError("udp_length")
    # RFC 768: an all-zero checksum means the sender computed none.
    if verify and csum and _udp_checksum(src_ip, dst_ip, f[start:start + length]) != 0:
        raise PacketError("udp_checksum")
    return sport, dport, start + length


def build_ipv4_udp(buf, off: int, src_ip, dst_ip, ident: int, sport: int, dport: int,
                   n: int) -> int:
    """Write an IPv4 header (no options, DF, TTL 64, identification ident) and a UDP header
    at buf[off:off + 28], both checksums computed, in front of the n payload bytes already
    at buf[off + 28:]; return the packet's length, 28 + n. ValueError for what does not
    fit (the buffer, a 16-bit total length, ports and ident of 16 bits)."""
    out, src_ip, dst_ip = _bytes_view(buf, writable=True), _bytes_view(src_ip), _bytes_view(dst_ip)
    total = IPV4_UDP_HEADER_LEN + n
    if len(src_ip) != 4 or len(dst_ip) != 4:
        raise ValueError("IPv4 addresses are 4 bytes")
    if not (0 <= sport <= PORT_MAX and 0 <= dport <= PORT_MAX and 0 <= ident <= PORT_MAX):
        raise ValueError("ports and the identification are 16-bit numbers")
    if n < 0 or total > IPV4_MAX_TOTAL_LEN:
        raise ValueError("a UDP payload longer than an IPv4 packet can carry")
    if off < 0 or off + total > len(out):
        raise ValueError("the packet does not fit the buffer")
    udp_at = off + IPV4_HEADER_LEN
    ulen = UDP_HEADER_LEN + n
    _UDP.pack_into(out, udp_at, sport, dport, ulen, 0)
    csum = _udp_checksum(src_ip, dst_ip, out[udp_at:udp_at + ulen])
    _UDP.pack_into(out, udp_at, sport, dport, ulen, csum or UDP_CSUM_NONE)
    _IPV4.pack_into(out, off, IPV4_VERSION_IHL, 0, total, ident, IPV4_FLAG_DF,
                    IPV4_DEFAULT_TTL, IPPROTO_UDP, 0, bytes(src_ip), bytes(dst_ip))
    struct.pack_into("!H", out, off + 10, inet_checksum(out[off:off + IPV4_HEADER_LEN]))
    return total
