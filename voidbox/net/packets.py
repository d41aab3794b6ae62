"""Ethernet, ARP, IPv4, UDP and ICMP parsing and building (sans-I/O).

Everything here takes bytes and returns bytes or small tuples: no sockets, no clock.
Parsers treat their input as hostile: every length is checked against the buffer before
it is used, and a malformed packet raises PacketError with a short reason that callers
count.
"""

from __future__ import annotations

import struct

from voidbox._records import named_tuple
from voidbox.net.fastpath import inet_checksum

# IEEE 802.3 / RFC 894
ETH_HLEN = 14
ETH_ALEN = 6
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
ETH_BROADCAST = b"\xff" * ETH_ALEN

# RFC 826
ARPHRD_ETHER = 1
ARPOP_REQUEST = 1
ARPOP_REPLY = 2
ARP_LEN = 28

# RFC 791 §3.1
IPV4_VERSION = 4
IPV4_MIN_IHL = 5
IPV4_HLEN = 20
IP_DF = 0x4000
IP_MF = 0x2000
IP_OFFMASK = 0x1FFF
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
DEFAULT_TTL = 64

# RFC 768
UDP_HLEN = 8

# RFC 792
ICMP_HLEN = 8
ICMP_ECHOREPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_ECHO = 8
ICMP_TIME_EXCEEDED = 11
ICMP_NET_UNREACH = 0
ICMP_HOST_UNREACH = 1
ICMP_PROT_UNREACH = 2
ICMP_PORT_UNREACH = 3
ICMP_FRAG_NEEDED = 4
ICMP_NET_ANO = 9  # network administratively prohibited (RFC 1122 §3.2.2.1)
ICMP_HOST_ANO = 10
ICMP_PKT_FILTERED = 13  # communication administratively prohibited (RFC 1812 §5.2.7.1)

_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_ICMP = struct.Struct("!BBHHH")


class PacketError(ValueError):
    """A malformed packet; str(err) is a short reason used as a counter name."""


# ---------------------------------------------------------------- checksums

def ones_sum(data: bytes | memoryview, start: int = 0) -> int:
    """The 16-bit one's complement sum of data in network order (RFC 1071), folded.

    2**16 is 1 modulo 0xFFFF, so the end-around-carry sum of the big-endian words is the
    whole buffer read as one big integer modulo 0xFFFF (RFC 1071 §2(C) deferred carries),
    with a folded sum of nonzero data never 0 but 0xFFFF. An odd length is padded with
    a zero byte at the end.
    """
    raw = bytes(data)
    value = int.from_bytes(raw, "big")
    if len(raw) & 1:
        value <<= 8
    total = value % 0xFFFF
    if total == 0 and value:
        total = 0xFFFF
    total += start
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def checksum(data: bytes | memoryview, start: int = 0) -> int:
    """The Internet checksum of data (RFC 1071), as a host-order int."""
    return (~ones_sum(data, start)) & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """The one's complement sum of the IPv4 pseudo-header (RFC 768, RFC 9293 §3.1)."""
    return ones_sum(src + dst + struct.pack("!BBH", 0, proto, length))


# ---------------------------------------------------------------- Ethernet


@named_tuple
class EthHeader:
    dst: bytes
    src: bytes
    ethertype: int


def parse_ethernet(frame: bytes | memoryview) -> tuple[EthHeader, memoryview]:
    """Split an Ethernet II frame into its header and payload (RFC 894)."""
    mv = memoryview(frame)
    if len(mv) < ETH_HLEN:
        raise PacketError("eth_short")
    dst, src, ethertype = _ETH.unpack_from(mv)
    return EthHeader(dst, src, ethertype), mv[ETH_HLEN:]


def build_ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes | memoryview) -> bytes:
    return _ETH.pack(dst, src, ethertype) + bytes(payload)


# ---------------------------------------------------------------- ARP


@named_tuple
class Arp:
    op: int
    sha: bytes
    spa: bytes
    tha: bytes
    tpa: bytes


def parse_arp(payload: bytes | memoryview) -> Arp:
    """An Ethernet/IPv4 ARP packet (RFC 826); other hardware or protocol types raise."""
    if len(payload) < ARP_LEN:
        raise PacketError("arp_short")
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(payload)
    if htype != ARPHRD_ETHER or ptype != ETH_P_IP or hlen != ETH_ALEN or plen != 4:
        raise PacketError("arp_unsupported")
    return Arp(op, sha, spa, tha, tpa)


def build_arp(op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes) -> bytes:
    return _ARP.pack(ARPHRD_ETHER, ETH_P_IP, ETH_ALEN, 4, op, sha, spa, tha, tpa)


# ---------------------------------------------------------------- IPv4


@named_tuple
class IPv4Header:
    ihl: int  # header length in bytes
    tos: int
    total_length: int
    ident: int
    flags_frag: int
    ttl: int
    proto: int
    src: bytes
    dst: bytes

    @property
    def is_fragment(self) -> bool:
        return bool(self.flags_frag & (IP_MF | IP_OFFMASK))


def parse_ipv4(packet: bytes | memoryview) -> tuple[IPv4Header, memoryview]:
    """Validate an IPv4 header (RFC 791 §3.1, RFC 1122 §3.2.1) and return it with its payload.

    Checks version, IHL, total length against the buffer and the header checksum. Bytes
    beyond the total length (Ethernet padding) are dropped from the payload.
    """
    mv = memoryview(packet)
    if len(mv) < IPV4_HLEN:
        raise PacketError("ip_short")
    vihl, tos, total, ident, ff, ttl, proto, _csum, src, dst = _IPV4.unpack_from(mv)
    if vihl >> 4 != IPV4_VERSION:
        raise PacketError("ip_version")
    ihl = (vihl & 0x0F) * 4
    if ihl < IPV4_HLEN:
        raise PacketError("ip_ihl")
    if total < ihl or total > len(mv):
        raise PacketError("ip_length")
    if inet_checksum(mv[:ihl]) != 0:  # the compiled RFC 1071 sum: this runs per frame
        raise PacketError("ip_checksum")
    return IPv4Header(ihl, tos, total, ident, ff, ttl, proto, src, dst), mv[ihl:total]


def build_ipv4(
    src: bytes,
    dst: bytes,
    proto: int,
    payload: bytes | memoryview,
    *,
    ident: int = 0,
    ttl: int = DEFAULT_TTL,
    tos: int = 0,
    df: bool = True,
) -> bytes:
    """An IPv4 packet with a 20-byte header and a valid header checksum."""
    total = IPV4_HLEN + len(payload)
    if total > 0xFFFF:
        raise PacketError("ip_too_long")
    hdr = bytearray(
        _IPV4.pack(
            (IPV4_VERSION << 4) | IPV4_MIN_IHL, tos, total, ident & 0xFFFF,
            IP_DF if df else 0, ttl, proto, 0, src, dst,
        )
    )
    struct.pack_into("!H", hdr, 10, checksum(hdr))
    return bytes(hdr) + bytes(payload)


# ---------------------------------------------------------------- UDP


@named_tuple
class UdpHeader:
    sport: int
    dport: int
    length: int
    csum: int


def parse_udp(src: bytes, dst: bytes, segment: bytes | memoryview,
              verify: bool = True) -> tuple[UdpHeader, memoryview]:
    """A UDP datagram (RFC 768); the checksum is verified when the sender set one, unless
    verify=False (the frontend vouches for it, or it is a partial offloaded checksum)."""
    mv = memoryview(segment)
    if len(mv) < UDP_HLEN:
        raise PacketError("udp_short")
    sport, dport, length, csum = _UDP.unpack_from(mv)
    if length < UDP_HLEN or length > len(mv):
        raise PacketError("udp_length")
    mv = mv[:length]
    # RFC 768: an all-zero checksum means the sender computed none.
    if verify and csum and checksum(mv, pseudo_header_sum(src, dst, IPPROTO_UDP, length)) != 0:
        raise PacketError("udp_checksum")
    return UdpHeader(sport, dport, length, csum), mv[UDP_HLEN:]


def build_udp(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes | memoryview) -> bytes:
    """A UDP datagram with its checksum over the IPv4 pseudo-header."""
    length = UDP_HLEN + len(payload)
    dgram = bytearray(_UDP.pack(sport, dport, length, 0))
    dgram += payload
    csum = checksum(dgram, pseudo_header_sum(src, dst, IPPROTO_UDP, length))
    # RFC 768: a computed zero is transmitted as all ones.
    struct.pack_into("!H", dgram, 6, csum or 0xFFFF)
    return bytes(dgram)


# ---------------------------------------------------------------- ICMP


@named_tuple
class IcmpHeader:
    type: int
    code: int
    csum: int
    rest: int  # the 32-bit "rest of header": id<<16|seq for echo


def parse_icmp(message: bytes | memoryview) -> tuple[IcmpHeader, memoryview]:
    """An ICMP message (RFC 792) with its checksum verified."""
    mv = memoryview(message)
    if len(mv) < ICMP_HLEN:
        raise PacketError("icmp_short")
    if checksum(mv) != 0:
        raise PacketError("icmp_checksum")
    typ, code, csum, hi, lo = _ICMP.unpack_from(mv)
    return IcmpHeader(typ, code, csum, (hi << 16) | lo), mv[ICMP_HLEN:]


def build_icmp(typ: int, code: int, rest: int, payload: bytes | memoryview) -> bytes:
    msg = bytearray(_ICMP.pack(typ, code, 0, rest >> 16, rest & 0xFFFF))
    msg += payload
    struct.pack_into("!H", msg, 2, checksum(msg))
    return bytes(msg)


def icmp_error_quote(ip_packet: bytes | memoryview) -> bytes:
    """What an ICMP error quotes: the offending IP header plus 8 bytes (RFC 792)."""
    mv = memoryview(ip_packet)
    ihl = (mv[0] & 0x0F) * 4 if len(mv) else 0
    return bytes(mv[: ihl + 8])


# ---------------------------------------------------------------- addresses


def ip_to_bytes(ip: str) -> bytes:
    parts = ip.split(".")
    if len(parts) != 4:
        raise ValueError(f"bad IPv4 address {ip!r}")
    return bytes(int(p) for p in parts)


def ip_to_str(ip: bytes) -> str:
    return f"{ip[0]}.{ip[1]}.{ip[2]}.{ip[3]}"


def build_ipv4_fragments(
    src: bytes, dst: bytes, proto: int, payload: bytes | memoryview, mtu: int, *, ident: int = 0,
    ttl: int = DEFAULT_TTL,
) -> list[bytes]:
    """One packet if it fits in mtu, else RFC 791 §2.3 fragments (offsets in 8-byte units)."""
    if IPV4_HLEN + len(payload) <= mtu:
        return [build_ipv4(src, dst, proto, payload, ident=ident, ttl=ttl)]
    step = ((mtu - IPV4_HLEN) // 8) * 8
    if step <= 0:
        raise PacketError("mtu_too_small")
    mv = memoryview(bytes(payload))
    out = []
    for off in range(0, len(mv), step):
        chunk = mv[off : off + step]
        more = off + step < len(mv)
        hdr = bytearray(
            _IPV4.pack(
                (IPV4_VERSION << 4) | IPV4_MIN_IHL, 0, IPV4_HLEN + len(chunk), ident & 0xFFFF,
                (IP_MF if more else 0) | (off >> 3), ttl, proto, 0, src, dst,
            )
        )
        struct.pack_into("!H", hdr, 10, checksum(hdr))
        out.append(bytes(hdr) + bytes(chunk))
    return out


# ---------------------------------------------------------------- reassembly

# RFC 791 §3.2 suggests a 15 s reassembly timer; Linux uses 30 s (ipfrag_time).
REASSEMBLY_TIMEOUT = 30.0
# Datagrams being reassembled at once, and fragments per datagram: bounds on memory the
# guest can make us hold.
MAX_REASSEMBLIES = 64
MAX_FRAGMENTS = 64
# Datagrams remembered as discarded (their late fragments are dropped too).
MAX_DISCARDED = 256
IPV4_MAX_PAYLOAD = 0xFFFF - IPV4_HLEN


class Reassembler:
    """IPv4 reassembly (RFC 791 §3.2, RFC 815) with overlap rejection (as RFC 5722 does for IPv6).

    push() takes a fragment and `now`, and returns the whole payload once every piece has
    arrived, else None. Overlapping or inconsistent fragments discard the datagram, so
    crafted overlaps (teardrop) cannot change what is delivered.
    """

    def __init__(self, timeout: float = REASSEMBLY_TIMEOUT):
        self.timeout = timeout
        # key -> [deadline, {offset: bytes}, total length or None]
        self.pending: dict[tuple, list] = {}
        # Datagrams discarded for an anomaly -> until when their late fragments are
        # discarded too (RFC 5722 §4: "including those not yet received"); else the rest
        # of a crafted overlap would assemble as a fresh datagram.
        self.discarded: dict[tuple, float] = {}
        self.dropped = 0

    def push(self, ip: IPv4Header, payload: bytes | memoryview, now: float) -> bytes | None:
        return self.push_piece((ip.src, ip.dst, ip.proto, ip.ident),
                               (ip.flags_frag & IP_OFFMASK) * 8, bool(ip.flags_frag & IP_MF),
                               payload, now, IPV4_MAX_PAYLOAD)

    def push_piece(self, key: tuple, offset: int, more: bool, payload: bytes | memoryview,
                   now: float, max_payload: int) -> bytes | None:
        """One fragment of the datagram `key` at byte offset `offset` (more: not the last):
        the family-independent part, shared with IPv6 (voidbox.net.ipv6, RFC 8200 §4.5,
        whose fragments follow the same 8-byte rule and whose overlap rule RFC 5722 is)."""
        self.expire(now)
        if key in self.discarded:
            self.dropped += 1
            return None
        if more and (len(payload) % 8 or not payload):
            # Every fragment but the last carries a multiple of 8 bytes (RFC 791 §3.2), and
            # an empty one carries nothing but a way to slip past an overlap check.
            self._discard(key, now)
            return None
        if offset + len(payload) > max_payload:
            self._discard(key, now)
            return None
        entry = self.pending.get(key)
        if entry is None:
            if len(self.pending) >= MAX_REASSEMBLIES:
                # Evict the datagram closest to expiry.
                oldest = min(self.pending, key=lambda k: self.pending[k][0])
                self._drop(oldest)
            entry = self.pending[key] = [now + self.timeout, {}, None]
        pieces: dict[int, bytes] = entry[1]
        if not more:
            end = offset + len(payload)
            if entry[2] is not None and entry[2] != end:
                self._discard(key, now)
                return None
            entry[2] = end
        if len(pieces) >= MAX_FRAGMENTS:
            self._discard(key, now)
            return None
        start, stop = offset, offset + len(payload)
        for o, data in pieces.items():
            # Any shared byte, and for an empty final piece any piece covering its offset
            # or starting there, is an overlap (RFC 5722's rule: discard the datagram).
            if (o < stop and start < o + len(data)) or (start == stop and o <= start < o + len(data)) \
                    or o == start:
                self._discard(key, now)
                return None
        if entry[2] is not None and stop > entry[2]:
            self._discard(key, now)
            return None
        pieces[offset] = bytes(payload)
        total = entry[2]
        if total is None or sum(len(d) for d in pieces.values()) != total:
            return None
        # No overlaps and the sizes add up to the total, so the pieces tile [0, total).
        del self.pending[key]
        return b"".join(pieces[o] for o in sorted(pieces))

    def _discard(self, key, now: float) -> None:
        """Discard a datagram for an anomaly, and its fragments still to come."""
        self._drop(key)
        if len(self.discarded) >= MAX_DISCARDED:
            self.discarded.pop(next(iter(self.discarded)))  # the oldest (insertion order)
        self.discarded[key] = now + self.timeout

    def _drop(self, key) -> None:
        """Discard a datagram (or a fragment that starts none): counted either way."""
        self.pending.pop(key, None)
        self.dropped += 1

    def expire(self, now: float) -> None:
        for key in [k for k, e in self.pending.items() if e[0] <= now]:
            self._drop(key)
        if self.discarded:
            for key in [k for k, until in self.discarded.items() if until <= now]:
                del self.discarded[key]
