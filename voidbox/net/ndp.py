"""Neighbour Discovery for the NAT's side of the guest's link (RFC 4861), sans-I/O.

The NAT is the only other node on the guest's link. It answers neighbour solicitations
for its own addresses (the gateway fd00::2, the DNS relay fd00::3 and the router's
link-local fe80::2, all at the gateway MAC), and router solicitations with an
advertisement that lets the guest configure itself (RFC 4862 SLAAC): the /64 prefix with
the A and L flags, the link MTU, RDNSS with the DNS relay (RFC 8106), a router lifetime.

What it never does, and why:
- Claim the guest's address. Duplicate address detection (a solicitation from ::) for any
  address but the NAT's own gets silence, which is the answer DAD waits for
  (RFC 4862 §5.4.3); a DAD probe for one of the NAT's own addresses is defended with an
  advertisement to all-nodes (RFC 4861 §7.2.4), so the guest does not take it.
- Believe the guest about the NAT's addresses: an advertisement (NA) or a router
  advertisement (RA) from the guest is never acted on; one that claims a NAT address is
  counted apart, as the hostile input it is.
- Take an NDP message that could have come from off the link: the hop limit must be 255
  (RFC 4861 §6.1.1, §7.1.1), the code 0, the lengths whole, every option non-empty.

Replies are whole Ethernet frames; handle() also returns the guest MAC the message
taught (its source link-layer address option), if any.
"""

from __future__ import annotations

import struct
import time

from voidbox.net.config import NatConfig, parse_mac
from voidbox.net.ipv6 import (
    ALL_NODES,
    UNSPECIFIED,
    Icmp6Header,
    IPv6Header,
    icmpv6_packet,
    ip6_to_bytes,
    is_multicast,
    multicast_mac,
    solicited_node,
)
from voidbox.net.packets import ETH_P_IPV6, PacketError, build_ethernet

# RFC 4861 §4
ND_ROUTER_SOLICIT = 133
ND_ROUTER_ADVERT = 134
ND_NEIGHBOR_SOLICIT = 135
ND_NEIGHBOR_ADVERT = 136
ND_REDIRECT = 137
NDP_TYPES = frozenset(range(ND_ROUTER_SOLICIT, ND_REDIRECT + 1))
NDP_HOP_LIMIT = 255  # RFC 4861 §6.1.1: proves the sender is on the link
# RFC 4861 §4.6 option types (and RFC 8106's RDNSS)
ND_OPT_SOURCE_LINKADDR = 1
ND_OPT_TARGET_LINKADDR = 2
ND_OPT_PREFIX_INFORMATION = 3
ND_OPT_MTU = 5
ND_OPT_RDNSS = 25
ND_OPT_UNIT = 8  # option lengths count 8-octet units
MAX_ND_OPTIONS = 32  # a walk bound; a real message carries two or three
# RFC 4861 §4.4 NA flags (the first word of the message body)
NA_FLAG_ROUTER = 0x80000000
NA_FLAG_SOLICITED = 0x40000000
NA_FLAG_OVERRIDE = 0x20000000
# RFC 4861 §4.6.2 prefix flags
PI_FLAG_ONLINK = 0x80
PI_FLAG_AUTO = 0x40
# RFC 4861 §4.2: M (managed) and O (other configuration) flags. O: stateless DHCPv6
# (RFC 3736) answers for the DNS servers as well.
RA_FLAG_OTHER = 0x40
# Lifetimes (seconds). RFC 4861 §6.2.1 defaults: MaxRtrAdvInterval 600, AdvDefaultLifetime
# 3 x that. RA_INTERVAL is how often an unsolicited RA goes out (below Max, so a guest
# never loses its default route); RFC 8106 §5.1 wants RDNSS to outlive a few intervals.
RA_INTERVAL = 200.0
# RFC 4861 §6.2.6: router advertisements to all-nodes at most once per this many seconds
# (MIN_DELAY_BETWEEN_RAS); a solicitation from :: can only be answered that way.
MIN_DELAY_BETWEEN_RAS = 3.0
ROUTER_LIFETIME = 1800
PREFIX_VALID_LIFETIME = 86400
PREFIX_PREFERRED_LIFETIME = 14400
RDNSS_LIFETIME = 1800
RA_CUR_HOP_LIMIT = 64
NS_LEN = 20  # reserved word + target address
RS_LEN = 4

_PREFIX_OPT = struct.Struct("!BBBBIII16s")
_MTU_OPT = struct.Struct("!BBHI")
_RDNSS_HEAD = struct.Struct("!BBHI")
_RA_HEAD = struct.Struct("!BBHII")  # cur hop limit, flags, router lifetime, reachable, retrans


def nd_options(body: memoryview) -> dict[int, bytes]:
    """The options after a message's fixed part (RFC 4861 §4.6): type -> the first such
    option's bytes. A zero length or an option running past the end is malformed (§4.6
    says discard the whole message)."""
    opts: dict[int, bytes] = {}
    i = 0
    n = len(body)
    count = 0
    while i < n:
        count += 1
        if count > MAX_ND_OPTIONS or i + 2 > n:
            raise PacketError("ndp_bad_option")
        otype, olen = body[i], body[i + 1] * ND_OPT_UNIT
        if olen == 0 or i + olen > n:
            raise PacketError("ndp_bad_option")
        opts.setdefault(otype, bytes(body[i:i + olen]))
        i += olen
    return opts


def _lladdr_option(otype: int, mac: bytes) -> bytes:
    return bytes([otype, 1]) + mac  # RFC 4861 §4.6.1: one unit for an Ethernet address


class NdpResponder:
    def __init__(self, config: NatConfig, counters: dict[str, int]):
        self.config = config
        self.counters = counters
        self.mac = parse_mac(config.gateway_mac)
        self.router_ll = ip6_to_bytes(config.router_ll6)
        self.gateway = ip6_to_bytes(config.gateway_ip6)
        self.dns = ip6_to_bytes(config.dns_ip6)
        self.prefix = ip6_to_bytes(config.prefix6)
        # Every address the NAT answers for, all at its one MAC.
        self.own = frozenset({self.gateway, self.dns, self.router_ll})
        self.ra_flags = RA_FLAG_OTHER
        self.clock = time.monotonic
        self._last_multicast_ra: float | None = None  # when an RA last went to all-nodes

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def handle(self, eth_src: bytes, ip: IPv6Header, hdr: Icmp6Header,
               body: memoryview) -> tuple[list[bytes], bytes | None]:
        """One NDP message (type in NDP_TYPES) from the guest: (frames to send, learned MAC)."""
        if ip.hop_limit != NDP_HOP_LIMIT or hdr.code != 0:
            self._count("ndp_invalid")
            return [], None
        if hdr.type == ND_NEIGHBOR_SOLICIT:
            return self._solicit(eth_src, ip, hdr, body)
        if hdr.type == ND_ROUTER_SOLICIT:
            return self._router_solicit(eth_src, ip, body)
        if hdr.type in (ND_NEIGHBOR_ADVERT, ND_ROUTER_ADVERT):
            # The guest is no router, and the NAT's addresses are the NAT's: neither kind
            # changes anything here. A claim on ours is worth its own counter.
            target = bytes(body[:16]) if hdr.type == ND_NEIGHBOR_ADVERT and len(body) >= 16 \
                else None
            if hdr.type == ND_ROUTER_ADVERT:
                self._count("ndp_ra_from_guest_ignored")
            elif target in self.own:
                self._count("ndp_na_claims_ours_ignored")
            else:
                self._count("ndp_na_ignored")
            return [], None
        self._count("ndp_redirect_ignored")
        return [], None

    def _solicit(self, eth_src: bytes, ip: IPv6Header, hdr: Icmp6Header,
                 body: memoryview) -> tuple[list[bytes], bytes | None]:
        if len(body) < NS_LEN - 4:  # the reserved word is hdr.rest
            self._count("ndp_short")
            return [], None
        target = bytes(body[:16])
        opts = nd_options(body[16:])
        if is_multicast(target):
            self._count("ndp_invalid")  # RFC 4861 §7.1.1
            return [], None
        sll = opts.get(ND_OPT_SOURCE_LINKADDR)
        dad = ip.src == UNSPECIFIED
        if dad:
            # RFC 4861 §7.1.1: DAD goes to the target's solicited-node group, without a
            # source link-layer address.
            if ip.dst != solicited_node(target) or sll is not None:
                self._count("ndp_invalid")
                return [], None
            if target not in self.own:
                self._count("ndp_dad_silent")  # the guest's address stays the guest's
                return [], None
            # Defend ours (RFC 4861 §7.2.4): to all-nodes, not solicited.
            self._count("ndp_dad_defended")
            return [self._advert(target, ALL_NODES, multicast_mac(ALL_NODES), solicited=False)], None
        learned = None
        if sll is not None and len(sll) >= 8:
            learned = sll[2:8]
        if target not in self.own:
            self._count("ndp_ns_not_ours")
            return [], learned
        self._count("ndp_na_sent")
        return [self._advert(target, ip.src, learned or eth_src, solicited=True)], learned

    def _advert(self, target: bytes, dst: bytes, dst_mac: bytes, solicited: bool) -> bytes:
        # R: the NAT routes for the guest (RFC 4861 §4.4); O: this is the address's owner.
        flags = NA_FLAG_ROUTER | NA_FLAG_OVERRIDE | (NA_FLAG_SOLICITED if solicited else 0)
        body = target + _lladdr_option(ND_OPT_TARGET_LINKADDR, self.mac)
        # The source is the target itself: the guest's stack takes NAs from any address,
        # and one from the address asked about reads plainly in a capture.
        pkt = icmpv6_packet(target, dst, ND_NEIGHBOR_ADVERT, 0, flags, body,
                            hop_limit=NDP_HOP_LIMIT)
        return build_ethernet(dst_mac, self.mac, ETH_P_IPV6, pkt)

    def _router_solicit(self, eth_src: bytes, ip: IPv6Header,
                        body: memoryview) -> tuple[list[bytes], bytes | None]:
        opts = nd_options(body)
        sll = opts.get(ND_OPT_SOURCE_LINKADDR)
        if ip.src == UNSPECIFIED and sll is not None:
            self._count("ndp_invalid")  # RFC 4861 §6.1.1
            return [], None
        learned = sll[2:8] if sll is not None and len(sll) >= 8 else None
        if ip.src == UNSPECIFIED:
            # Only all-nodes can answer it: at most one RA per MIN_DELAY_BETWEEN_RAS, the
            # rest of a burst of solicitations goes unanswered (the first answer serves).
            now = self.clock()
            if (self._last_multicast_ra is not None
                    and now - self._last_multicast_ra < MIN_DELAY_BETWEEN_RAS):
                self._count("ndp_rs_rate_limited")
                return [], None
            self._last_multicast_ra = now
            self._count("ndp_ra_solicited")
            return [self.advertisement()], None
        self._count("ndp_ra_solicited")
        # RFC 4861 §6.2.6 allows a unicast answer to the soliciting address.
        return [self.advertisement(ip.src, learned or eth_src)], learned

    def periodic_advertisement(self) -> bytes:
        """The unsolicited RA to all-nodes (RFC 4861 §6.2.4), counted against the rate
        limit of §6.2.6 as an answer to a solicitation from :: is."""
        self._last_multicast_ra = self.clock()
        return self.advertisement()

    def advertisement(self, dst: bytes = ALL_NODES, dst_mac: bytes | None = None) -> bytes:
        """A router advertisement (RFC 4861 §4.2) from the router's link-local address:
        the guest's /64 for SLAAC (L and A), the link MTU, RDNSS (RFC 8106) with the DNS
        relay, and the gateway's link-layer address."""
        cfg = self.config
        ra = _RA_HEAD.pack(RA_CUR_HOP_LIMIT, self.ra_flags, ROUTER_LIFETIME, 0, 0)
        opts = _lladdr_option(ND_OPT_SOURCE_LINKADDR, self.mac)
        opts += _MTU_OPT.pack(ND_OPT_MTU, 1, 0, cfg.mtu)
        opts += _PREFIX_OPT.pack(ND_OPT_PREFIX_INFORMATION, 4, 64,
                                 PI_FLAG_ONLINK | PI_FLAG_AUTO, PREFIX_VALID_LIFETIME,
                                 PREFIX_PREFERRED_LIFETIME, 0, self.prefix)
        opts += _RDNSS_HEAD.pack(ND_OPT_RDNSS, 3, 0, RDNSS_LIFETIME) + self.dns
        body = ra + opts
        # The ICMPv6 header's second word is the RA's first: split it off as `rest`.
        rest = int.from_bytes(body[:4], "big")
        pkt = icmpv6_packet(self.router_ll, dst, ND_ROUTER_ADVERT, 0, rest, body[4:],
                            hop_limit=NDP_HOP_LIMIT)
        self._count("ndp_ra_sent")
        return build_ethernet(dst_mac or multicast_mac(dst), self.mac, ETH_P_IPV6, pkt)
