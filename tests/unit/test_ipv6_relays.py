"""UDP, DNS and ICMPv6 echo over IPv6 through the NAT (voidbox/net/udp.py, dns.py, icmp.py)
against real sockets on the host's ::1 and 127.0.0.1 only: nothing leaves this machine
(outside destinations are denied before a socket is made)."""

import logging
import socket
import struct

import pytest

from tests.unit.netframes import (
    DNS6,
    GATEWAY6,
    GUEST6,
    Harness,
    guest_echo6_frame,
    guest_udp6_frame,
    icmp6_messages,
    ip6_packets,
)
from voidbox.net.config import NatConfig
from voidbox.net.ipv6 import (
    ICMPV6_ADDR_UNREACH,
    ICMPV6_ADM_PROHIBITED,
    ICMPV6_DEST_UNREACH,
    ICMPV6_ECHO_REPLY,
    ICMPV6_PORT_UNREACH,
    IPPROTO_UDP,
    ip6_to_bytes,
    parse_udp6,
)
from voidbox.net.policy import Policy

LOOPBACK6 = ip6_to_bytes("::1")
OUTSIDE6 = ip6_to_bytes("2001:db8::9")  # RFC 3849 documentation prefix


@pytest.fixture
def server6():
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.bind(("::1", 0))
    s.settimeout(5)
    yield s
    s.close()


def udp6_replies(h):
    frames, h.out[:] = list(h.out), []
    out = []
    for _eth, ip, data in ip6_packets(frames):
        assert ip.proto == IPPROTO_UDP
        (sport, dport, _len), payload = parse_udp6(ip.src, ip.dst, data)
        out.append((ip, sport, dport, bytes(payload)))
    return out


def test_gateway_reaches_the_hosts_ipv6_loopback_and_replies_come_back(server6):
    h = Harness()
    port = server6.getsockname()[1]
    h.send(guest_udp6_frame(GATEWAY6, 4000, port, b"ping6"))
    data, peer = server6.recvfrom(100)
    assert data == b"ping6" and peer[0] == "::1"
    server6.sendto(b"pong6", peer)
    h.pump(lambda: h.out)
    [(ip, sport, dport, payload)] = udp6_replies(h)
    assert (ip.src, ip.dst, sport, dport, payload) == (GATEWAY6, GUEST6, port, 4000, b"pong6")
    assert h.engine.counters["udp6_flows_opened"] == 1
    h.close()


def test_replies_go_to_the_guest_address_that_sent(server6):
    h = Harness()
    other = ip6_to_bytes("fd00::abcd")  # a SLAAC guest has more than one address
    h.send(guest_udp6_frame(GATEWAY6, 4001, server6.getsockname()[1], b"a", src=other))
    _data, peer = server6.recvfrom(100)
    server6.sendto(b"b", peer)
    h.pump(lambda: h.out)
    [(ip, *_rest)] = udp6_replies(h)
    assert ip.dst == other
    h.close()


def test_each_guest_address_is_a_flow_of_its_own(server6):
    """Two of the guest's addresses, the same port, the same remote: two flows, two host
    ports, and each reply goes back to the address it answers (the flows were keyed
    without the source, and replies went to whichever address had sent last)."""
    h = Harness()
    other = ip6_to_bytes("fd00::abcd")
    port = server6.getsockname()[1]
    h.send(guest_udp6_frame(GATEWAY6, 4002, port, b"from-a", src=GUEST6))
    _d, peer_a = server6.recvfrom(100)
    h.send(guest_udp6_frame(GATEWAY6, 4002, port, b"from-b", src=other))
    _d, peer_b = server6.recvfrom(100)
    assert peer_a != peer_b and h.engine.udp.flow_count() == 2
    server6.sendto(b"to-a", peer_a)
    server6.sendto(b"to-b", peer_b)
    h.pump(lambda: len(h.out) >= 2)
    got = sorted((payload, ip.dst) for ip, _s, _d, payload in udp6_replies(h))
    assert got == [(b"to-a", GUEST6), (b"to-b", other)]
    h.close()


def test_large_replies_are_fragmented_to_the_mtu(server6):
    h = Harness()
    h.send(guest_udp6_frame(GATEWAY6, 4002, server6.getsockname()[1], b"x"))
    _data, peer = server6.recvfrom(100)
    server6.sendto(b"y" * 4000, peer)
    h.pump(lambda: len(h.out) >= 3)
    packets = ip6_packets(h.out)
    assert all(ip.is_fragment for _e, ip, _d in packets) and all(len(f) <= 1514 for f in h.out)
    h.close()


def test_the_hosts_loopback_is_closed_by_default(server6):
    h = Harness(policy=Policy())
    frame = guest_udp6_frame(GATEWAY6, 4003, server6.getsockname()[1], b"x")
    h.send(frame)
    [(_eth, ip, hdr, body)] = icmp6_messages(h.out)
    assert (hdr.type, hdr.code, ip.src, ip.dst) == (ICMPV6_DEST_UNREACH, ICMPV6_ADM_PROHIBITED,
                                                    GATEWAY6, GUEST6)
    assert body == frame[14:]  # the whole offending packet (it fits in 1280 bytes)
    assert h.engine.counters["udp_denied"] == 1 and h.engine.flow_count() == 0
    h.close()


@pytest.mark.parametrize("dst", ["fd00::55", "fe80::9"])
def test_the_guests_own_link_holds_nothing_else(dst):
    h = Harness()
    h.send(guest_udp6_frame(ip6_to_bytes(dst), 4004, 9, b"x"))
    [(_eth, ip, hdr, _body)] = icmp6_messages(h.out)
    assert (hdr.type, hdr.code, ip.src) == (ICMPV6_DEST_UNREACH, ICMPV6_ADDR_UNREACH, ip6_to_bytes(dst))
    h.close()


def test_denied_outside_destination_gets_admin_prohibited():
    h = Harness(policy=Policy(deny=["2001:db8::/32"], host_addrs=()))
    h.send(guest_udp6_frame(OUTSIDE6, 4005, 53, b"x"))
    [(_eth, ip, hdr, _body)] = icmp6_messages(h.out)
    assert (hdr.code, ip.src) == (ICMPV6_ADM_PROHIBITED, OUTSIDE6)
    h.close()


def test_host_port_unreachable_is_reflected_as_icmpv6():
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.bind(("::1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    h = Harness()
    frame = guest_udp6_frame(GATEWAY6, 4006, port, b"anyone?")
    h.send(frame)
    h.pump(lambda: h.out)
    [(_eth, ip, hdr, body)] = icmp6_messages(h.out)
    assert (hdr.type, hdr.code, ip.src, ip.dst) == (ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH,
                                                    GATEWAY6, GUEST6)
    assert body == frame[14:]
    assert h.engine.counters["udp_icmp6_reflected"] == 1
    h.close()


def _query(ident: int) -> bytes:
    qname = b"\x07example\x04test\x00"
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + qname + b"\x00\x1c\x00\x01"


@pytest.mark.parametrize("upstream_family", [socket.AF_INET, socket.AF_INET6])
def test_dns_at_fd00_3_is_relayed(upstream_family):
    up = socket.socket(upstream_family, socket.SOCK_DGRAM)
    host = "127.0.0.1" if upstream_family == socket.AF_INET else "::1"
    up.bind((host, 0))
    up.settimeout(5)
    h = Harness(NatConfig(dns_upstreams=[(host, up.getsockname()[1])]))
    q = _query(0x6666)
    h.send(guest_udp6_frame(DNS6, 5353, 53, q))
    got, peer = up.recvfrom(512)
    assert got == q
    answer = bytearray(q)
    answer[2] |= 0x80  # QR
    up.sendto(bytes(answer), peer)
    h.pump(lambda: h.out)
    [(ip, sport, dport, payload)] = udp6_replies(h)
    assert (ip.src, ip.dst, sport, dport, payload) == (DNS6, GUEST6, 53, 5353, bytes(answer))
    # fd00::3 serves DNS only.
    h.send(guest_udp6_frame(DNS6, 5353, 54, q))
    [(_eth, _ip, hdr, _body)] = icmp6_messages(h.out)
    assert (hdr.type, hdr.code) == (ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH)
    h.close()
    up.close()


def test_echo_to_the_hosts_loopback_goes_through_an_icmpv6_socket():
    h = Harness()  # host loopback open
    h.engine.icmp.prepare()
    if h.engine.icmp.mode6 == "none":
        h.close()
        pytest.skip("neither an ICMPv6 ping socket (ping_group_range) nor CAP_NET_RAW here")
    h.send(guest_echo6_frame(LOOPBACK6, 0x77, 3, b"echo6"))
    h.pump(lambda: h.out)
    [(_eth, ip, hdr, body)] = icmp6_messages(h.out)
    assert (hdr.type, hdr.rest, body) == (ICMPV6_ECHO_REPLY, 0x77 << 16 | 3, b"echo6")
    assert (ip.src, ip.dst) == (LOOPBACK6, GUEST6)
    assert h.engine.counters["icmp6_echo_rx"] == 1
    h.close()


def test_echoes_from_two_guest_addresses_come_back_to_each():
    """The same identifier from two of the guest's addresses: two flows, each reply to
    the address that asked (the flows were keyed without the source)."""
    h = Harness()
    h.engine.icmp.prepare()
    if h.engine.icmp.mode6 == "none":
        h.close()
        pytest.skip("neither an ICMPv6 ping socket (ping_group_range) nor CAP_NET_RAW here")
    other = ip6_to_bytes("fd00::abcd")
    h.send(guest_echo6_frame(LOOPBACK6, 0x78, 1, b"from-a"))
    h.send(guest_echo6_frame(LOOPBACK6, 0x78, 1, b"from-b", src=other))
    h.pump(lambda: len(h.out) >= 2)
    got = sorted((bytes(body), ip.dst) for _eth, ip, _hdr, body in icmp6_messages(h.out))
    assert got == [(b"from-a", GUEST6), (b"from-b", other)]
    assert h.engine.icmp.flow_count() == 2
    h.close()


def test_echo_denied_and_echo_without_a_socket(caplog):
    h = Harness(policy=Policy(deny=["2001:db8::/32"], host_loopback=True))
    h.send(guest_echo6_frame(OUTSIDE6, 1, 1))
    [(_eth, _ip, hdr, _body)] = icmp6_messages(h.out)
    h.out.clear()
    assert (hdr.type, hdr.code) == (ICMPV6_DEST_UNREACH, ICMPV6_ADM_PROHIBITED)
    h.engine.icmp.mode6 = "none"  # an unprivileged host without ping_group_range
    with caplog.at_level(logging.WARNING):
        h.send(guest_echo6_frame(LOOPBACK6, 1, 1))
        h.send(guest_echo6_frame(LOOPBACK6, 1, 2))
    replies = icmp6_messages(h.out)
    assert [(r[2].type, r[2].code) for r in replies] == [(ICMPV6_DEST_UNREACH, ICMPV6_ADDR_UNREACH)] * 2
    assert sum("ICMPv6 echo" in r.message for r in caplog.records) == 1
    h.close()


def test_the_unspecified_address_reaches_nothing():
    """:: is no destination (RFC 4291 §2.5.2), though a host socket's connect() would take
    it for its own loopback."""
    h = Harness()
    h.send(guest_udp6_frame(bytes(16), 4010, 9, b"x"))
    assert h.out == [] and h.engine.counters["udp_dropped_local"] == 1
    h.send(guest_echo6_frame(bytes(16), 1, 1))
    [(_eth, _ip, hdr, _body)] = icmp6_messages(h.out)
    assert (hdr.type, hdr.code) == (ICMPV6_DEST_UNREACH, ICMPV6_ADDR_UNREACH)
    assert NatConfig().host_endpoint("::", 80) is None
    h.close()


def test_a_reply_built_in_place_is_what_the_packet_builders_make(server6):
    from voidbox.net.ipv6 import build_ipv6, build_udp6

    h = Harness()
    port = server6.getsockname()[1]
    h.send(guest_udp6_frame(GATEWAY6, 4011, port, b"q"))
    _data, peer = server6.recvfrom(100)
    for payload in (b"", b"odd", bytes(range(256)) * 5):
        server6.sendto(payload, peer)
        h.pump(lambda: h.out)
        [frame] = h.out
        h.out.clear()
        expected = build_ipv6(GATEWAY6, GUEST6, IPPROTO_UDP,
                              build_udp6(GATEWAY6, GUEST6, port, 4011, payload))
        assert bytes(frame[14:]) == expected
    assert h.engine.udp._spare6  # IPv6 flows keep ready sockets of their own now
    h.close()


def test_a_link_local_source_reaches_the_gateway(server6):
    """During DAD a guest's global address is tentative and Linux sends from its link-local
    address even to fd00::2 (RFC 6724 rule 2): that is on the link, so it is relayed, and
    the replies go back to the link-local address."""
    from tests.unit.netframes import GUEST_LL6

    h = Harness()
    port = server6.getsockname()[1]
    h.send(guest_udp6_frame(GATEWAY6, 4012, port, b"ll", src=GUEST_LL6))
    data, peer = server6.recvfrom(100)
    server6.sendto(b"back", peer)
    h.pump(lambda: h.out)
    [(ip, sport, dport, payload)] = udp6_replies(h)
    assert (ip.src, ip.dst, sport, dport, payload) == (GATEWAY6, GUEST_LL6, port, 4012, b"back")
    h.close()
