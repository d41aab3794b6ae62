"""IPv6 and ICMPv6 parsing and building (sans-I/O): RFC 8200, RFC 4443.

As voidbox.net.packets does for IPv4, everything here takes bytes and returns bytes or
small tuples, and treats its input as hostile: the payload length is checked against the
frame, extension headers are walked with a bound on their number and on the bytes they
span, and a malformed packet raises PacketError with a short reason that callers count.

What the NAT accepts from a guest, and why:
- Hop-by-Hop options only right after the fixed header (RFC 8200 §4.1); options inside
  Hop-by-Hop and Destination options headers are walked, and a Jumbo Payload option
  (RFC 2675) is refused: no link here carries more than 65535 bytes, and a payload length
  of zero must not mean "trust an option".
- At most MAX_EXT_HEADERS extension headers: a guest's chain of a hundred costs a
  bounded walk and one counter.
- A Routing header with segments left is refused (RFC 8200 §4.4: the NAT is no router for
  source routes; RFC 5095 deprecated type 0 for the amplification it allowed).
- Fragments are returned to the caller for reassembly (packets.Reassembler, RFC 5722:
  overlaps discard the datagram); an atomic fragment (offset 0, M clear: RFC 6946) is
  processed as the whole packet it is.
"""

from __future__ import annotations

import ipaddress
import struct

from voidbox._records import named_tuple
from voidbox.net.packets import PacketError, checksum, ones_sum

# RFC 8200 §3
IPV6_VERSION = 6
IPV6_HLEN = 40
IPV6_ALEN = 16
IPV6_MAX_PAYLOAD = 0xFFFF  # the 16-bit Payload Length; jumbograms (RFC 2675) are refused
DEFAULT_HOP_LIMIT = 64
# RFC 8200 §4 extension headers (and the upper layers the NAT serves)
IPPROTO_HOPOPTS = 0
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_ESP = 50
IPPROTO_AH = 51
IPPROTO_ICMPV6 = 58
IPPROTO_NONE = 59
IPPROTO_DSTOPTS = 60
IPPROTO_MH = 135  # RFC 6275 Mobility, RFC 7401 HIP, RFC 5533 Shim6: same 8-octet units
IPPROTO_HIP = 139
IPPROTO_SHIM6 = 140
# Headers whose length octet counts 8-octet units beyond the first 8 (RFC 8200 §4.3-4.6).
_EXT_8 = frozenset({IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_DSTOPTS, IPPROTO_MH,
                    IPPROTO_HIP, IPPROTO_SHIM6})
_UPPER_LAYERS = frozenset({IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6})
# Bound on the walk: Linux's own stack accepts long chains, but a real guest sends at most
# a Hop-by-Hop, a Destination options, a Routing and a Fragment header.
MAX_EXT_HEADERS = 8
FRAG_HLEN = 8  # RFC 8200 §4.5
FRAG_OFFMASK = 0xFFF8
FRAG_MF = 0x0001
# RFC 8200 §4.2 options
OPT_PAD1 = 0
OPT_PADN = 1
OPT_JUMBO = 0xC2  # RFC 2675
OPT_ACTION_SKIP = 0  # the two high bits of an option type: 00 = skip if unrecognized

# RFC 4443 §2.1, §3, §4
ICMPV6_HLEN = 8
ICMPV6_DEST_UNREACH = 1
ICMPV6_PACKET_TOO_BIG = 2
ICMPV6_TIME_EXCEEDED = 3
ICMPV6_PARAM_PROB = 4
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129
# Destination unreachable codes (RFC 4443 §3.1)
ICMPV6_NOROUTE = 0
ICMPV6_ADM_PROHIBITED = 1
ICMPV6_BEYOND_SCOPE = 2  # beyond scope of source address
ICMPV6_ADDR_UNREACH = 3
ICMPV6_PORT_UNREACH = 4
# RFC 4443 §2.4 (c): an error quotes as much of the offending packet as fits the minimum MTU.
IPV6_MIN_MTU = 1280

_IPV6 = struct.Struct("!IHBB16s16s")
_ICMPV6 = struct.Struct("!BBHI")
_FRAG = struct.Struct("!BBHI")

UNSPECIFIED = bytes(IPV6_ALEN)
LOOPBACK = bytes(15) + b"\x01"
ALL_NODES = bytes.fromhex("ff020000000000000000000000000001")
ALL_ROUTERS = bytes.fromhex("ff020000000000000000000000000002")
# RFC 8415 §7.1: All_DHCP_Relay_Agents_and_Servers
ALL_DHCP_SERVERS = bytes.fromhex("ff020000000000000000000000010002")
LINK_LOCAL_PREFIX = bytes.fromhex("fe80000000000000")
# RFC 4291 §2.7.1: the solicited-node multicast prefix ff02::1:ff00:0/104
SOLICITED_NODE_PREFIX = bytes.fromhex("ff0200000000000000000001ff")


def solicited_node(addr: bytes) -> bytes:
    """The solicited-node multicast address of addr (RFC 4291 §2.7.1)."""
    return SOLICITED_NODE_PREFIX + addr[13:]


def multicast_mac(addr: bytes) -> bytes:
    """The Ethernet address an IPv6 multicast address maps to (RFC 2464 §7): 33:33 + low 32 bits."""
    return b"\x33\x33" + addr[12:]


def is_multicast(addr: bytes) -> bool:
    return addr[0] == 0xFF


def is_link_local(addr: bytes) -> bool:
    """fe80::/10 (RFC 4291 §2.5.6)."""
    return addr[0] == 0xFE and addr[1] & 0xC0 == 0x80


def ip6_to_bytes(ip: str) -> bytes:
    return ipaddress.IPv6Address(ip).packed


def ip6_to_str(ip: bytes) -> str:
    return str(ipaddress.IPv6Address(bytes(ip)))


def pseudo_header_sum6(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """The one's complement sum of the IPv6 pseudo-header (RFC 8200 §8.1): source,
    destination, the 32-bit upper-layer length, three zero octets and the next header."""
    return ones_sum(bytes(src) + bytes(dst) + struct.pack("!IxxxB", length, proto))


@named_tuple
class IPv6Header:
    tclass: int
    flow: int
    payload_length: int
    hop_limit: int
    src: bytes
    dst: bytes
    proto: int  # the upper-layer protocol after the extension headers (or IPPROTO_FRAGMENT)
    ext_len: int  # bytes of extension headers walked before the upper layer
    frag_offset: int  # fragments only: byte offset, M flag, identification
    frag_more: bool
    frag_ident: int
    is_fragment: bool
    frag_next: int  # the Next Header inside the Fragment header


def _walk_options(opts: memoryview) -> None:
    """Check the TLV options of a Hop-by-Hop or Destination options header (RFC 8200 §4.2)."""
    i = 0
    n = len(opts)
    while i < n:
        otype = opts[i]
        if otype == OPT_PAD1:
            i += 1
            continue
        if i + 2 > n:
            raise PacketError("ip6_option_truncated")
        olen = opts[i + 1]
        if i + 2 + olen > n:
            raise PacketError("ip6_option_truncated")
        if otype == OPT_JUMBO:
            raise PacketError("ip6_jumbogram")
        if otype != OPT_PADN and otype >> 6 != OPT_ACTION_SKIP:
            # RFC 8200 §4.2: 01, 10 and 11 all say discard an unrecognized option.
            raise PacketError("ip6_unknown_option")
        i += 2 + olen


def parse_ipv6(packet: bytes | memoryview) -> tuple[IPv6Header, memoryview]:
    """Validate an IPv6 header and its extension headers (RFC 8200 §3, §4) and return the
    header with the upper-layer payload (or, for a fragment, the fragment's data).

    Bytes beyond the payload length (Ethernet padding) are dropped.
    """
    mv = memoryview(packet)
    if len(mv) < IPV6_HLEN:
        raise PacketError("ip6_short")
    vtf, plen, nh, hlim, src, dst = _IPV6.unpack_from(mv)
    if vtf >> 28 != IPV6_VERSION:
        raise PacketError("ip6_version")
    if IPV6_HLEN + plen > len(mv):
        raise PacketError("ip6_length")
    if plen == 0 and nh == IPPROTO_HOPOPTS:
        # RFC 2675 §2: a zero Payload Length before a Hop-by-Hop header announces a
        # jumbogram, whose real length is in an option. Refused, not looked for.
        raise PacketError("ip6_jumbogram")
    end = IPV6_HLEN + plen
    if nh in _UPPER_LAYERS:
        # No extension headers, as nearly every packet: no walk (this runs per frame).
        return IPv6Header(vtf >> 20 & 0xFF, vtf & 0xFFFFF, plen, hlim, src, dst, nh, 0, 0,
                          False, 0, False, nh), mv[IPV6_HLEN:end]
    off = IPV6_HLEN
    walked = 0
    frag = None
    while True:
        if nh in _EXT_8 or nh == IPPROTO_AH:
            if nh == IPPROTO_HOPOPTS and walked:
                raise PacketError("ip6_hopopts_not_first")  # RFC 8200 §4.1
            walked += 1
            if walked > MAX_EXT_HEADERS:
                raise PacketError("ip6_ext_chain_too_long")
            if off + 2 > end:
                raise PacketError("ip6_ext_truncated")
            nxt, hlen = mv[off], mv[off + 1]
            size = (hlen + 2) * 4 if nh == IPPROTO_AH else (hlen + 1) * 8  # RFC 4302 §2.2
            if off + size > end:
                raise PacketError("ip6_ext_truncated")
            if nh in (IPPROTO_HOPOPTS, IPPROTO_DSTOPTS):
                _walk_options(mv[off + 2:off + size])
            elif nh == IPPROTO_ROUTING and mv[off + 3] != 0:
                raise PacketError("ip6_routing_header")  # segments left: not ours to route
            elif nh == IPPROTO_AH:
                raise PacketError("ip6_unsupported_proto")
            off += size
            nh = nxt
        elif nh == IPPROTO_FRAGMENT:
            walked += 1
            if walked > MAX_EXT_HEADERS:
                raise PacketError("ip6_ext_chain_too_long")
            if off + FRAG_HLEN > end:
                raise PacketError("ip6_ext_truncated")
            nxt, _res, offm, ident = _FRAG.unpack_from(mv, off)
            off += FRAG_HLEN
            if offm & FRAG_OFFMASK or offm & FRAG_MF:
                frag = (offm & FRAG_OFFMASK, bool(offm & FRAG_MF), ident, nxt)
                break
            nh = nxt  # an atomic fragment (RFC 6946): the packet is whole
        else:
            break
    if frag is not None:
        offset, more, ident, nxt = frag
        return IPv6Header(vtf >> 20 & 0xFF, vtf & 0xFFFFF, plen, hlim, src, dst,
                          IPPROTO_FRAGMENT, off - IPV6_HLEN, offset, more, ident, True,
                          nxt), mv[off:end]
    return IPv6Header(vtf >> 20 & 0xFF, vtf & 0xFFFFF, plen, hlim, src, dst, nh,
                      off - IPV6_HLEN, 0, False, 0, False, nh), mv[off:end]


def build_ipv6(src: bytes, dst: bytes, proto: int, payload: bytes | memoryview, *,
               hop_limit: int = DEFAULT_HOP_LIMIT, tclass: int = 0) -> bytes:
    """An IPv6 packet with no extension headers (RFC 8200 §3)."""
    if len(payload) > IPV6_MAX_PAYLOAD:
        raise PacketError("ip6_too_long")
    return _IPV6.pack(IPV6_VERSION << 28 | tclass << 20, len(payload), proto, hop_limit,
                      src, dst) + bytes(payload)


def build_ipv6_fragments(src: bytes, dst: bytes, proto: int, payload: bytes | memoryview,
                         mtu: int, ident: int, hop_limit: int = DEFAULT_HOP_LIMIT) -> list[bytes]:
    """One packet if it fits in mtu, else RFC 8200 §4.5 fragments (each with a Fragment
    header; offsets in 8-octet units)."""
    if IPV6_HLEN + len(payload) <= mtu:
        return [build_ipv6(src, dst, proto, payload, hop_limit=hop_limit)]
    step = ((mtu - IPV6_HLEN - FRAG_HLEN) // 8) * 8
    if step <= 0:
        raise PacketError("mtu_too_small")
    mv = memoryview(bytes(payload))
    out = []
    for off in range(0, len(mv), step):
        chunk = mv[off:off + step]
        more = off + step < len(mv)
        frag = _FRAG.pack(proto, 0, off | (FRAG_MF if more else 0), ident & 0xFFFFFFFF)
        out.append(build_ipv6(src, dst, IPPROTO_FRAGMENT, frag + bytes(chunk),
                              hop_limit=hop_limit))
    return out


# ---------------------------------------------------------------- ICMPv6


@named_tuple
class Icmp6Header:
    type: int
    code: int
    csum: int
    rest: int  # the 32-bit message body's first word: id<<16|seq for echo


def parse_icmpv6(src: bytes, dst: bytes, message: bytes | memoryview) -> tuple[Icmp6Header, memoryview]:
    """An ICMPv6 message (RFC 4443 §2.1) with its checksum, over the pseudo-header
    (RFC 4443 §2.3), verified."""
    mv = memoryview(message)
    if len(mv) < ICMPV6_HLEN:
        raise PacketError("icmp6_short")
    if checksum(mv, pseudo_header_sum6(src, dst, IPPROTO_ICMPV6, len(mv))) != 0:
        raise PacketError("icmp6_checksum")
    typ, code, csum, rest = _ICMPV6.unpack_from(mv)
    return Icmp6Header(typ, code, csum, rest), mv[ICMPV6_HLEN:]


def build_icmpv6(src: bytes, dst: bytes, typ: int, code: int, rest: int,
                 payload: bytes | memoryview) -> bytes:
    msg = bytearray(_ICMPV6.pack(typ, code, 0, rest & 0xFFFFFFFF))
    msg += payload
    struct.pack_into("!H", msg, 2, checksum(msg, pseudo_header_sum6(src, dst, IPPROTO_ICMPV6,
                                                                     len(msg))))
    return bytes(msg)


def icmpv6_packet(src: bytes, dst: bytes, typ: int, code: int, rest: int,
                  payload: bytes | memoryview, hop_limit: int = DEFAULT_HOP_LIMIT) -> bytes:
    """A whole IPv6 packet carrying one ICMPv6 message."""
    return build_ipv6(src, dst, IPPROTO_ICMPV6, build_icmpv6(src, dst, typ, code, rest, payload),
                      hop_limit=hop_limit)


def icmpv6_error_quote(ip_packet: bytes | memoryview) -> bytes:
    """What an ICMPv6 error quotes: as much of the offending packet as keeps the error
    within the minimum MTU (RFC 4443 §2.4 (c))."""
    return bytes(memoryview(ip_packet)[:IPV6_MIN_MTU - IPV6_HLEN - ICMPV6_HLEN])


def build_udp6(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes | memoryview) -> bytes:
    """A UDP datagram with its checksum over the IPv6 pseudo-header (RFC 8200 §8.1: the
    checksum is mandatory over IPv6; a computed zero is sent as all ones)."""
    length = 8 + len(payload)
    dgram = bytearray(struct.pack("!HHHH", sport, dport, length, 0))
    dgram += payload
    csum = checksum(dgram, pseudo_header_sum6(src, dst, IPPROTO_UDP, length))
    struct.pack_into("!H", dgram, 6, csum or 0xFFFF)
    return bytes(dgram)


def parse_udp6(src: bytes, dst: bytes, segment: bytes | memoryview,
               verify: bool = True) -> tuple[tuple[int, int, int], memoryview]:
    """(sport, dport, length) and the data of a UDP datagram over IPv6. A zero checksum is
    invalid over IPv6 (RFC 8200 §8.1) unless the frontend vouches for the datagram."""
    mv = memoryview(segment)
    if len(mv) < 8:
        raise PacketError("udp_short")
    sport, dport, length, csum = struct.unpack_from("!HHHH", mv)
    if length < 8 or length > len(mv):
        raise PacketError("udp_length")
    mv = mv[:length]
    if verify and (csum == 0 or checksum(mv, pseudo_header_sum6(src, dst, IPPROTO_UDP, length))):
        raise PacketError("udp_checksum")
    return (sport, dport, length), mv[8:]


IPV6_FRAG_KEY = "ip6"  # the first element of an IPv6 reassembly key, apart from IPv4's


def fragment_key(ip: IPv6Header) -> tuple:
    """RFC 8200 §4.5: a datagram's fragments share source, destination and identification;
    the Next Header is in the key too, so pieces that disagree on it never join."""
    return (IPV6_FRAG_KEY, ip.src, ip.dst, ip.frag_ident, ip.frag_next)


def rebuild_reassembled(ip: IPv6Header, whole: bytes) -> bytes:
    """The reassembled datagram as one packet without a Fragment header (RFC 8200 §4.5):
    parse_ipv6 walks what follows (further extension headers) as it would for any packet."""
    return build_ipv6(ip.src, ip.dst, ip.frag_next, whole, hop_limit=ip.hop_limit,
                      tclass=ip.tclass)
