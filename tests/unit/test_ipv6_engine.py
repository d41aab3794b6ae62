"""IPv6 on the guest's link, frame by frame through the engine (voidbox/net/engine.py,
ipv6.py, ndp.py, dhcpv6.py): NDP, router advertisements, DHCPv6, ICMPv6 echo to the NAT's
own addresses, extension headers, fragments and the hostile cases of issue 13.

The engine's checksums run through voidbox.net.fastpath: the suite runs these again with
VOIDBOX_PURE=1 for the pure twin.
"""

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.netframes import (
    DNS6,
    GATEWAY6,
    GATEWAY_HW,
    GUEST6,
    GUEST_HW,
    GUEST_LL6,
    ROUTER_LL6,
    Harness,
    guest_echo6_frame,
    guest_icmp6_frame,
    guest_ip6_frame,
    guest_udp6_frame,
    icmp6_messages,
    ip6_packets,
)
from voidbox.net.config import NatConfig
from voidbox.net.dhcpv6 import OPTION_CLIENTID, OPTION_DNS_SERVERS, OPTION_SERVERID, options
from voidbox.net.ipv6 import (
    ALL_DHCP_SERVERS,
    ALL_NODES,
    ALL_ROUTERS,
    ICMPV6_ECHO_REPLY,
    IPPROTO_DSTOPTS,
    IPPROTO_FRAGMENT,
    IPPROTO_HOPOPTS,
    IPPROTO_ICMPV6,
    IPPROTO_ROUTING,
    IPPROTO_UDP,
    UNSPECIFIED,
    build_icmpv6,
    build_ipv6,
    build_udp6,
    ip6_to_bytes,
    multicast_mac,
    parse_udp6,
    solicited_node,
)
from voidbox.net.ndp import (
    NA_FLAG_OVERRIDE,
    NA_FLAG_ROUTER,
    NA_FLAG_SOLICITED,
    ND_NEIGHBOR_ADVERT,
    ND_NEIGHBOR_SOLICIT,
    ND_OPT_MTU,
    ND_OPT_PREFIX_INFORMATION,
    ND_OPT_RDNSS,
    ND_OPT_SOURCE_LINKADDR,
    ND_OPT_TARGET_LINKADDR,
    ND_ROUTER_ADVERT,
    ND_ROUTER_SOLICIT,
    PI_FLAG_AUTO,
    PI_FLAG_ONLINK,
    nd_options,
)
from voidbox.net.packets import ETH_P_IPV6, Reassembler, build_ethernet
from voidbox.net.policy import Policy

OTHER_HW = bytes.fromhex("020000000099")


@pytest.fixture
def h():
    harness = Harness()
    yield harness
    harness.close()


def sll(mac: bytes = GUEST_HW) -> bytes:
    return bytes([ND_OPT_SOURCE_LINKADDR, 1]) + mac


def solicit(target: bytes, src: bytes = GUEST6, dst: bytes | None = None, opts: bytes | None = None,
            hop_limit: int = 255) -> bytes:
    if dst is None:
        dst = solicited_node(target)
    if opts is None:
        opts = sll() if src != UNSPECIFIED else b""
    return guest_icmp6_frame(dst, ND_NEIGHBOR_SOLICIT, 0, 0, target + opts, src=src,
                             hop_limit=hop_limit, dst_mac=multicast_mac(dst))


# ---------------------------------------------------------------- neighbour discovery


@pytest.mark.parametrize("target", [GATEWAY6, DNS6, ROUTER_LL6])
def test_solicitation_for_the_nats_addresses_is_answered(h, target):
    h.send(solicit(target, opts=sll(OTHER_HW)))
    [(eth, ip, hdr, body)] = icmp6_messages(h.out)
    assert hdr.type == ND_NEIGHBOR_ADVERT and ip.hop_limit == 255
    assert hdr.rest == NA_FLAG_ROUTER | NA_FLAG_SOLICITED | NA_FLAG_OVERRIDE
    assert body[:16] == target and (ip.src, ip.dst) == (target, GUEST6)
    assert nd_options(memoryview(body[16:]))[ND_OPT_TARGET_LINKADDR][2:] == GATEWAY_HW
    # The solicitation's source link-layer address is where the answer goes, and learned.
    assert eth.dst == OTHER_HW and h.engine.guest_mac == OTHER_HW


def test_solicitations_for_other_addresses_get_silence(h):
    h.send(solicit(GUEST6))  # the guest's own address
    h.send(solicit(ip6_to_bytes("fd00::55")))
    h.send(solicit(ip6_to_bytes("2001:db8::1")))
    assert h.out == [] and h.engine.counters["ndp_ns_not_ours"] == 3


def test_duplicate_address_detection_never_claims_the_guests_address(h):
    # RFC 4862 §5.4: the guest probes its tentative address from ::; silence means "free".
    h.send(solicit(GUEST6, src=UNSPECIFIED))
    h.send(solicit(ip6_to_bytes("fe80::1234"), src=UNSPECIFIED))
    assert h.out == [] and h.engine.counters["ndp_dad_silent"] == 2
    # A probe for the NAT's own address is defended, to all-nodes, unsolicited.
    h.send(solicit(GATEWAY6, src=UNSPECIFIED))
    [(eth, ip, hdr, body)] = icmp6_messages(h.out)
    assert (hdr.type, ip.dst, eth.dst) == (ND_NEIGHBOR_ADVERT, ALL_NODES, multicast_mac(ALL_NODES))
    assert not hdr.rest & NA_FLAG_SOLICITED and body[:16] == GATEWAY6


def test_malformed_dad_and_off_link_ndp_are_dropped(h):
    # DAD with a source link-layer address, and DAD not to the solicited-node group.
    h.send(solicit(GUEST6, src=UNSPECIFIED, opts=sll()))
    h.send(solicit(GATEWAY6, src=UNSPECIFIED, dst=ALL_NODES))
    # A hop limit below 255 means the message crossed a router (RFC 4861 §7.1.1).
    h.send(solicit(GATEWAY6, hop_limit=64))
    # A zero-length option (RFC 4861 §4.6: discard).
    h.send(solicit(GATEWAY6, opts=b"\x01\x00" + bytes(6)))
    assert h.out == []
    assert h.engine.counters["ndp_invalid"] == 3 and h.engine.counters["ndp_bad_option"] == 1


def test_advertisements_from_the_guest_claiming_the_gateway_are_ignored(h):
    na_body = GATEWAY6 + bytes([ND_OPT_TARGET_LINKADDR, 1]) + OTHER_HW
    h.send(guest_icmp6_frame(ALL_NODES, ND_NEIGHBOR_ADVERT, 0, NA_FLAG_OVERRIDE, na_body,
                             hop_limit=255, dst_mac=multicast_mac(ALL_NODES)))
    ra_body = struct.pack("!II", 0, 0) + sll(OTHER_HW)
    h.send(guest_icmp6_frame(ALL_NODES, ND_ROUTER_ADVERT, 0, 64 << 24 | 1800, ra_body,
                             src=GUEST_LL6, hop_limit=255, dst_mac=multicast_mac(ALL_NODES)))
    c = h.engine.counters
    assert h.out == [] and c["ndp_na_claims_ours_ignored"] == 1 and c["ndp_ra_from_guest_ignored"] == 1
    # The gateway is still the NAT's, at the NAT's MAC.
    h.send(solicit(GATEWAY6))
    [(_eth, _ip, hdr, body)] = icmp6_messages(h.out)
    assert nd_options(memoryview(body[16:]))[ND_OPT_TARGET_LINKADDR][2:] == GATEWAY_HW


def _ra_contents(h):
    [(eth, ip, hdr, body)] = icmp6_messages(h.out)
    h.out.clear()
    assert hdr.type == ND_ROUTER_ADVERT and ip.hop_limit == 255 and ip.src == ROUTER_LL6
    cur_hop_limit, lifetime = hdr.rest >> 24, hdr.rest & 0xFFFF
    opts = nd_options(memoryview(body[8:]))
    return eth, ip, cur_hop_limit, lifetime, opts


def test_router_solicitation_gets_an_advertisement_for_slaac(h):
    h.send(guest_icmp6_frame(ALL_ROUTERS, ND_ROUTER_SOLICIT, 0, 0, sll(), src=GUEST_LL6,
                             hop_limit=255, dst_mac=multicast_mac(ALL_ROUTERS)))
    eth, ip, cur_hop_limit, lifetime, opts = _ra_contents(h)
    assert ip.dst == GUEST_LL6 and eth.dst == GUEST_HW and cur_hop_limit == 64 and lifetime > 0
    _t, _l, plen, flags, valid, preferred, _r, prefix = struct.unpack(
        "!BBBBIII16s", opts[ND_OPT_PREFIX_INFORMATION])
    assert (plen, prefix) == (64, ip6_to_bytes("fd00::"))
    assert flags == PI_FLAG_ONLINK | PI_FLAG_AUTO and valid >= preferred > 0
    assert struct.unpack("!I", opts[ND_OPT_MTU][4:])[0] == 1500
    rdnss = opts[ND_OPT_RDNSS]
    assert struct.unpack("!I", rdnss[4:8])[0] > 0 and rdnss[8:24] == DNS6
    assert opts[ND_OPT_SOURCE_LINKADDR][2:] == GATEWAY_HW
    # From :: (before the guest has an address) the answer goes to all-nodes.
    h.send(guest_icmp6_frame(ALL_ROUTERS, ND_ROUTER_SOLICIT, 0, 0, b"", src=UNSPECIFIED,
                             hop_limit=255, dst_mac=multicast_mac(ALL_ROUTERS)))
    _eth, ip, *_ = _ra_contents(h)
    assert ip.dst == ALL_NODES


def test_advertisements_to_all_nodes_are_rate_limited(h):
    """RFC 4861 §6.2.6: at most one RA to all-nodes per MIN_DELAY_BETWEEN_RAS. A burst of
    solicitations from :: gets one answer; the unsolicited one counts too. Solicitations
    from an address are answered to that address, each of them."""
    from voidbox.net.ndp import MIN_DELAY_BETWEEN_RAS

    now = [1000.0]
    h.engine.ndp.clock = lambda: now[0]

    def solicit_from(src):
        h.send(guest_icmp6_frame(ALL_ROUTERS, ND_ROUTER_SOLICIT, 0, 0,
                                 b"" if src == UNSPECIFIED else sll(), src=src,
                                 hop_limit=255, dst_mac=multicast_mac(ALL_ROUTERS)))
        sent = [ip.dst for _eth, ip, _hdr, _body in icmp6_messages(h.out)]
        h.out.clear()
        return sent

    assert [solicit_from(UNSPECIFIED) for _ in range(50)] == [[ALL_NODES]] + [[]] * 49
    assert h.engine.counters["ndp_rs_rate_limited"] == 49
    assert [solicit_from(GUEST_LL6) for _ in range(3)] == [[GUEST_LL6]] * 3
    now[0] += MIN_DELAY_BETWEEN_RAS
    assert solicit_from(UNSPECIFIED) == [ALL_NODES]
    now[0] += MIN_DELAY_BETWEEN_RAS
    h.engine.link_up()  # the periodic one, to all-nodes
    h.out.clear()
    assert solicit_from(UNSPECIFIED) == []


def test_link_up_sends_an_unsolicited_advertisement_and_repeats_it(h):
    h.engine.link_up()
    eth, ip, *_ = _ra_contents(h)
    assert (ip.dst, eth.dst) == (ALL_NODES, multicast_mac(ALL_NODES))
    assert h.engine._ra_timer is not None  # re-armed; close() cancels it (the fixture checks)


def test_mtu_option_follows_the_config():
    h = Harness(NatConfig(mtu=9000))
    h.engine.link_up()
    *_, opts = _ra_contents(h)
    assert struct.unpack("!I", opts[ND_OPT_MTU][4:])[0] == 9000
    h.close()


# ---------------------------------------------------------------- DHCPv6 (RFC 3736)


def _dhcp6(msg_type: int, opts: bytes) -> bytes:
    msg = bytes([msg_type]) + b"\xab\xcd\xef" + opts
    return guest_udp6_frame(ALL_DHCP_SERVERS, 546, 547, msg, src=GUEST_LL6)


def test_information_request_gets_the_dns_server(h):
    client_id = struct.pack("!HH", 1, 10) + b"0123456789"
    h.send(_dhcp6(11, client_id))
    [(_eth, ip, data)] = ip6_packets(h.out)
    (sport, dport, _len), msg = parse_udp6(ip.src, ip.dst, data)
    assert (ip.src, ip.dst, sport, dport) == (ROUTER_LL6, GUEST_LL6, 547, 546)
    assert bytes(msg[:4]) == b"\x07\xab\xcd\xef"
    opts = options(memoryview(bytes(msg)))
    assert opts[OPTION_DNS_SERVERS] == DNS6 and opts[OPTION_CLIENTID] == client_id[4:]
    assert OPTION_SERVERID in opts


def test_stateful_dhcpv6_is_left_unanswered(h):
    h.send(_dhcp6(1, b""))  # Solicit
    assert h.out == [] and h.engine.counters["dhcp6_stateful_ignored"] == 1


# ---------------------------------------------------------------- ICMPv6 echo


@pytest.mark.parametrize("dst,src", [(GATEWAY6, GUEST6), (DNS6, GUEST6), (ROUTER_LL6, GUEST_LL6)])
def test_echo_to_the_nats_addresses_is_answered(h, dst, src):
    h.send(guest_echo6_frame(dst, 7, 9, b"hello", src=src))
    [(eth, ip, hdr, body)] = icmp6_messages(h.out)
    assert (hdr.type, hdr.rest, body) == (ICMPV6_ECHO_REPLY, 7 << 16 | 9, b"hello")
    assert (ip.src, ip.dst, eth.dst) == (dst, src, GUEST_HW)


def test_a_large_echo_is_answered_in_fragments(h):
    data = bytes(range(256)) * 12  # 3072 bytes: beyond a 1500-byte MTU
    h.send(guest_echo6_frame(GATEWAY6, 1, 2, data))
    packets = ip6_packets(h.out)
    assert len(packets) == 3 and all(len(f) <= 1514 for f in h.out)
    r = Reassembler()
    whole = None
    for _eth, ip, frag in packets:
        assert ip.is_fragment
        whole = r.push_piece(("k",), ip.frag_offset, ip.frag_more, frag, 0.0, 0xFFFF) or whole
    assert whole is not None and whole[0] == ICMPV6_ECHO_REPLY and whole[8:] == data


# ---------------------------------------------------------------- hostile input


def _raw6(payload: bytes, nh: int, src: bytes = GUEST6, dst: bytes = GATEWAY6,
          plen: int | None = None) -> bytes:
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(payload) if plen is None else plen, nh, 64,
                      src, dst)
    return build_ethernet(GATEWAY_HW, GUEST_HW, ETH_P_IPV6, hdr + payload)


def _echo_msg(src=GUEST6, dst=GATEWAY6, data=b"x"):
    return build_icmpv6(src, dst, 128, 0, 1 << 16 | 1, data)


def test_a_payload_length_beyond_the_frame_is_dropped(h):
    h.send(_raw6(_echo_msg(), IPPROTO_ICMPV6, plen=200))
    assert h.out == [] and h.engine.counters["ip6_length"] == 1


def test_jumbograms_are_refused(h):
    # RFC 2675: payload length 0, the length in a Hop-by-Hop Jumbo Payload option.
    jumbo = bytes([IPPROTO_ICMPV6, 0, 0xC2, 4]) + struct.pack("!I", 70000)
    h.send(_raw6(jumbo + _echo_msg(), IPPROTO_HOPOPTS, plen=0))
    h.send(_raw6(jumbo + _echo_msg(), IPPROTO_HOPOPTS))
    assert h.out == [] and h.engine.counters["ip6_jumbogram"] == 2


def test_a_chain_of_100_extension_headers_is_refused(h):
    chain = b"".join(bytes([IPPROTO_DSTOPTS, 0, 1, 4, 0, 0, 0, 0]) for _ in range(99))
    chain += bytes([IPPROTO_ICMPV6, 0, 1, 4, 0, 0, 0, 0])
    h.send(_raw6(chain + _echo_msg(), IPPROTO_DSTOPTS))
    assert h.out == [] and h.engine.counters["ip6_ext_chain_too_long"] == 1


def test_a_few_extension_headers_are_walked(h):
    hbh = bytes([IPPROTO_DSTOPTS, 0, 5, 2, 0, 0, 1, 0])  # router alert, PadN
    dst = bytes([IPPROTO_ROUTING, 0, 1, 4, 0, 0, 0, 0])
    rth = bytes([IPPROTO_ICMPV6, 0, 4, 0, 0, 0, 0, 0])  # segments left 0: ignored
    h.send(_raw6(hbh + dst + rth + _echo_msg(), IPPROTO_HOPOPTS))
    [(_eth, _ip, hdr, _body)] = icmp6_messages(h.out)
    assert hdr.type == ICMPV6_ECHO_REPLY


def test_routing_headers_and_misplaced_hop_by_hop_are_refused(h):
    rth = bytes([IPPROTO_ICMPV6, 2, 0, 1]) + bytes(4) + GATEWAY6  # type 0, one segment left
    h.send(_raw6(rth + _echo_msg(), IPPROTO_ROUTING))
    dst = bytes([IPPROTO_HOPOPTS, 0, 1, 4, 0, 0, 0, 0])
    hbh = bytes([IPPROTO_ICMPV6, 0, 1, 4, 0, 0, 0, 0])
    h.send(_raw6(dst + hbh + _echo_msg(), IPPROTO_DSTOPTS))
    truncated = bytes([IPPROTO_ICMPV6, 3])  # says 32 bytes, has 2
    h.send(_raw6(truncated, IPPROTO_DSTOPTS))
    c = h.engine.counters
    assert h.out == []
    assert (c["ip6_routing_header"], c["ip6_hopopts_not_first"], c["ip6_ext_truncated"]) == (1, 1, 1)


def _fragment(msg: bytes, off: int, chunk: bytes, more: bool, ident: int = 77) -> bytes:
    frag = struct.pack("!BBHI", IPPROTO_ICMPV6, 0, off | int(more), ident)
    return _raw6(frag + chunk, IPPROTO_FRAGMENT)


def test_fragments_are_reassembled_and_overlaps_discard_the_datagram(h):
    msg = _echo_msg(data=b"f" * 100)
    h.send(_fragment(msg, 0, msg[:56], True))
    assert h.out == []
    h.send(_fragment(msg, 56, msg[56:], False))
    [(_eth, _ip, hdr, body)] = icmp6_messages(h.out)
    assert hdr.type == ICMPV6_ECHO_REPLY and body == b"f" * 100
    h.out.clear()
    # RFC 5722: an overlap discards the whole datagram, and its late fragments too.
    h.send(_fragment(msg, 0, msg[:56], True, ident=78))
    h.send(_fragment(msg, 48, msg[48:], False, ident=78))
    h.send(_fragment(msg, 56, msg[56:], False, ident=78))
    assert h.out == [] and h.engine.counters["ip6_reassembly_dropped"] >= 2
    # A non-final fragment whose length is not a multiple of 8 (RFC 8200 §4.5).
    h.send(_fragment(msg, 0, msg[:50], True, ident=79))
    assert h.out == []


def test_an_atomic_fragment_is_the_whole_packet(h):
    h.send(_fragment(_echo_msg(), 0, _echo_msg(), False))
    [(_eth, _ip, hdr, _body)] = icmp6_messages(h.out)
    assert hdr.type == ICMPV6_ECHO_REPLY


@pytest.mark.parametrize("src", [
    ip6_to_bytes("2001:db8::1"),  # off the guest's link
    GATEWAY6,  # the NAT's own
    ip6_to_bytes("fd00::"),  # the subnet-router anycast address
    ip6_to_bytes("::1"),
])
def test_spoofed_sources_are_dropped(h, src):
    h.send(guest_echo6_frame(GATEWAY6, 1, 1, src=src))
    h.send(guest_udp6_frame(ip6_to_bytes("2001:db8::9"), 1000, 53, b"q", src=src))
    assert h.out == [] and h.engine.counters["ip6_spoofed_source"] == 2


def test_link_local_sources_reach_nothing_off_the_link(h):
    """RFC 4007 §9: never beyond the link; RFC 4443 §3.1 code 2 says so at once."""
    h.send(guest_udp6_frame(ip6_to_bytes("2001:db8::9"), 1000, 53, b"q", src=GUEST_LL6))
    h.send(guest_echo6_frame(ip6_to_bytes("2001:db8::9"), 1, 1, src=GUEST_LL6))
    answers = icmp6_messages(h.out)
    assert [(a[2].type, a[2].code, a[1].src, a[1].dst) for a in answers] == \
        [(1, 2, ROUTER_LL6, GUEST_LL6)] * 2
    assert h.engine.counters["ip6_link_local_beyond_scope"] == 2
    assert h.engine.flow_count() == 0


def test_bad_icmpv6_checksums_and_multicast_are_counted(h):
    frame = bytearray(guest_echo6_frame(GATEWAY6, 1, 1))
    frame[-1] ^= 0xFF
    h.send(bytes(frame))
    mld = build_icmpv6(GUEST_LL6, ip6_to_bytes("ff02::16"), 143, 0, 0, b"")
    h.send(build_ethernet(multicast_mac(ip6_to_bytes("ff02::16")), GUEST_HW, ETH_P_IPV6,
                          build_ipv6(GUEST_LL6, ip6_to_bytes("ff02::16"), IPPROTO_ICMPV6, mld)))
    c = h.engine.counters
    assert h.out == [] and c["icmp6_checksum"] == 1 and c["ip6_multicast_ignored"] == 1


def test_udp_over_ipv6_needs_a_checksum(h):
    udp = bytearray(build_udp6(GUEST6, GATEWAY6, 1000, 9, b"x"))
    udp[6:8] = b"\x00\x00"  # RFC 8200 §8.1: zero is not "no checksum" over IPv6
    h.send(guest_ip6_frame(GATEWAY6, IPPROTO_UDP, bytes(udp)))
    assert h.out == [] and h.engine.counters["udp_checksum"] == 1


def test_ipv6_off_drops_every_ipv6_frame():
    h = Harness(NatConfig(ipv6=False))
    h.send(solicit(GATEWAY6))
    h.send(guest_echo6_frame(GATEWAY6, 1, 1))
    h.engine.link_up()
    assert h.out == [] and h.engine.counters["eth_unsupported_type"] == 2
    h.close()


def test_a_vm_guests_partial_ipv6_checksum_is_vouched_for_at_its_own_header():
    """virtio-net TX (voidbox/virtio/net.py): NEEDS_CSUM at an IPv6 packet's own TCP or UDP
    checksum field is taken as is, as for IPv4; anything else is finished by the card."""
    from voidbox.virtio.net import l4_checksum_offset

    udp = guest_udp6_frame(GATEWAY6, 1, 2, b"x")
    assert l4_checksum_offset(udp) == 14 + 40 + 6
    tcp = bytearray(udp)
    tcp[14 + 6] = 6
    assert l4_checksum_offset(bytes(tcp)) == 14 + 40 + 16
    assert l4_checksum_offset(guest_echo6_frame(GATEWAY6, 1, 1)) is None
    hbh = bytearray(udp)
    hbh[14 + 6] = IPPROTO_HOPOPTS  # behind an extension header: not the packet's own
    assert l4_checksum_offset(bytes(hbh)) is None


def test_a_router_solicitation_starts_the_periodic_advertisements(h):
    assert h.engine._ra_timer is None  # a VM's card sends nothing before the guest asks
    h.send(guest_icmp6_frame(ALL_ROUTERS, ND_ROUTER_SOLICIT, 0, 0, sll(), src=GUEST_LL6,
                             hop_limit=255, dst_mac=multicast_mac(ALL_ROUTERS)))
    _ra_contents(h)
    assert h.engine._ra_timer is not None
    h.engine.link_up()  # what the timer runs, RA_INTERVAL later
    _eth, ip, *_ = _ra_contents(h)
    assert ip.dst == ALL_NODES and h.engine._ra_timer is not None


# ---------------------------------------------------------------- fuzz

_NEXT_HEADERS = st.sampled_from([0, 6, 17, 43, 44, 50, 51, 58, 59, 60, 135, 139, 140, 255])


@st.composite
def hostile_ipv6(draw):
    """An IPv6 packet from the guest: a plausible fixed header (or a lying one) and a body
    of extension-header-shaped and random bytes."""
    body = b""
    for _ in range(draw(st.integers(0, 12))):
        nh = draw(_NEXT_HEADERS)
        hlen = draw(st.integers(0, 3))
        body += bytes([nh, hlen]) + draw(st.binary(min_size=6 + 8 * hlen, max_size=6 + 8 * hlen))
    body += draw(st.binary(max_size=80))
    plen = draw(st.one_of(st.just(len(body)), st.integers(0, 0xFFFF)))
    src = draw(st.sampled_from([GUEST6, GUEST_LL6, UNSPECIFIED, GATEWAY6]))
    dst = draw(st.sampled_from([GATEWAY6, DNS6, ROUTER_LL6, ALL_NODES, ALL_ROUTERS,
                                solicited_node(GATEWAY6), ip6_to_bytes("fd00::99")]))
    hdr = struct.pack("!IHBB16s16s", draw(st.sampled_from([6 << 28, 4 << 28, (6 << 28) | 5])),
                      plen, draw(_NEXT_HEADERS), draw(st.sampled_from([255, 64, 1])), src, dst)
    return build_ethernet(GATEWAY_HW, GUEST_HW, ETH_P_IPV6, hdr + body)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(hostile_ipv6(), max_size=6))
def test_hostile_ipv6_frames_are_counted_never_raised(frames):
    """Whatever the guest sends, the engine parses within bounds, counts and drops or
    answers; no exception reaches the backend, and no flow outlives close()."""
    h = Harness(policy=Policy(deny=["::/0"], host_addrs=()))
    try:
        for frame in frames:
            h.send(frame)
        for frame in h.out:
            assert len(frame) <= 14 + 1500  # nothing sent beyond the link's MTU
    finally:
        h.close()
