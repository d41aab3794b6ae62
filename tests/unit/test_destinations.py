"""Where a guest's flows may go: the guest's own subnet, the DNS address, and egress rules
written with the address the guest sees (issue 8, defects 1, 3 and 11).

Every case runs through the real Engine with real loopback sockets: a listener that must
not be reached counts its accepts or datagrams.
"""

from __future__ import annotations

import socket

import pytest

from tests.unit.netframes import (
    GATEWAY,
    GUEST,
    Harness,
    guest_echo_frame,
    guest_ip_frame,
    guest_udp_frame,
)
from voidbox.net import fastpath
from voidbox.net.config import NatConfig
from voidbox.net.packets import (
    ICMP_DEST_UNREACH,
    ICMP_HOST_UNREACH,
    ICMP_PKT_FILTERED,
    ICMP_PORT_UNREACH,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    parse_icmp,
)
from voidbox.net.policy import Policy
from voidbox.net.tcp import ACK, RST, SYN, Segment, parse_segment

DNS = bytes([10, 0, 2, 3])
SUBNET_OTHER = bytes([10, 0, 2, 77])
GPORT = 40001


def syn_frame(dst: bytes, dport: int) -> bytes:
    seg = Segment(GPORT, dport, 1000, 0, SYN, 65535)
    buf = bytearray(200)
    n = fastpath.build_ipv4_tcp(buf, GUEST, dst, 1, seg.src_port, seg.dst_port, seg.seq,
                                seg.ack, seg.flags, seg.window, seg.options(), b"")
    return guest_ip_frame(dst, IPPROTO_TCP, bytes(buf[20:n]))


def tcp_answers(h: Harness):
    out = []
    for ip, payload in h.ip_packets():
        if ip.proto == IPPROTO_TCP:
            out.append((ip, parse_segment(payload)))
    return out


def icmp_answers(h: Harness):
    out = []
    for ip, payload in h.ip_packets():
        assert ip.proto == IPPROTO_ICMP
        hdr, _data = parse_icmp(payload)
        out.append((ip.src, hdr.type, hdr.code))
    return out


@pytest.fixture
def listener():
    """A TCP listener on 127.0.0.1 that must not see a connection."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    s.setblocking(False)
    yield s
    s.close()


def accepted(s: socket.socket) -> bool:
    try:
        conn, _ = s.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


def settle(h: Harness, rounds: int = 20) -> None:
    for _ in range(rounds):
        h.loop.run_once(0.01)


def expect_rst(h: Harness, src: bytes) -> None:
    settle(h)
    answers = tcp_answers(h)
    assert answers, "no answer to the SYN"
    ip, seg = answers[0]
    assert ip.src == src and seg.flags & RST and seg.flags & ACK and seg.ack == 1001
    assert h.engine.tcp.flow_count() == 0


# ---- defect 3: 10.0.2.3 serves DNS on port 53 only ------------------------------------

def test_tcp_to_the_dns_address_on_another_port_is_reset_not_relayed(listener):
    port = listener.getsockname()[1]
    h = Harness(NatConfig(dns_upstreams=[("127.0.0.1", port)]))
    try:
        h.send(syn_frame(DNS, port))  # the upstream's address, a port that is not 53
        expect_rst(h, DNS)
        assert not accepted(listener)
    finally:
        h.close()


def test_tcp_dns_on_port_53_still_reaches_the_upstream(listener):
    port = listener.getsockname()[1]
    h = Harness(NatConfig(dns_upstreams=[("127.0.0.1", port)]))
    try:
        h.send(syn_frame(DNS, 53))
        settle(h)
        ((ip, seg),) = tcp_answers(h)
        assert seg.flags == SYN | ACK and ip.src == DNS
        assert accepted(listener)
    finally:
        h.close()


def test_udp_to_the_dns_address_on_another_port_is_port_unreachable():
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setblocking(False)
    port = sink.getsockname()[1]
    h = Harness(NatConfig(dns_upstreams=[("127.0.0.1", port)]))
    try:
        h.send(guest_udp_frame(DNS, 5555, port, b"not dns"))
        settle(h)
        assert icmp_answers(h) == [(DNS, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH)]
        with pytest.raises(BlockingIOError):
            sink.recv(100)
    finally:
        h.close()
        sink.close()


# ---- defect 11: the guest's subnet holds only the gateway and the DNS relay ------------

def test_tcp_to_another_address_of_the_guest_subnet_is_reset():
    h = Harness()
    try:
        h.send(syn_frame(SUBNET_OTHER, 80))
        expect_rst(h, SUBNET_OTHER)
        assert h.engine.tcp.counters.get("tcp_unreachable") == 1
    finally:
        h.close()


def test_udp_to_another_address_of_the_guest_subnet_is_host_unreachable():
    h = Harness()
    try:
        h.send(guest_udp_frame(SUBNET_OTHER, 5555, 53, b"x"))
        settle(h)
        assert icmp_answers(h) == [(SUBNET_OTHER, ICMP_DEST_UNREACH, ICMP_HOST_UNREACH)]
        # The subnet's broadcast address stays silent (RFC 1122 §3.2.2: no ICMP errors
        # about broadcasts).
        h.send(guest_udp_frame(bytes([10, 0, 2, 255]), 5555, 53, b"x"))
        settle(h)
        assert icmp_answers(h) == []
    finally:
        h.close()


# ---- defect 1: rules match the address the guest sees, and the translated one ---------

@pytest.mark.parametrize("rule", ["10.0.2.2", "10.0.2.0/24", "10.0.2.2:1-65535", "127.0.0.1"])
def test_deny_written_with_the_gateway_address_blocks_tcp(listener, rule):
    port = listener.getsockname()[1]
    h = Harness(policy=Policy(deny=[rule], host_loopback=True))
    try:
        h.send(syn_frame(GATEWAY, port))
        expect_rst(h, GATEWAY)
        assert not accepted(listener)
        assert h.engine.tcp.counters["tcp_denied"] == 1
    finally:
        h.close()


def test_deny_written_with_the_gateway_address_blocks_udp_and_icmp():
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setblocking(False)
    port = sink.getsockname()[1]
    h = Harness(policy=Policy(deny=["10.0.2.2"], host_loopback=True))
    try:
        h.send(guest_udp_frame(GATEWAY, 5555, port, b"x"))
        settle(h)
        assert icmp_answers(h) == [(GATEWAY, ICMP_DEST_UNREACH, ICMP_PKT_FILTERED)]
        with pytest.raises(BlockingIOError):
            sink.recv(100)
    finally:
        h.close()
        sink.close()


def test_allow_of_host_loopback_beats_a_broad_deny_for_the_gateway(listener):
    """`--deny 0.0.0.0/0 --allow 127.0.0.1`: the most specific rule over either address
    wins, so the host's loopback stays reachable through 10.0.2.2."""
    port = listener.getsockname()[1]
    h = Harness(policy=Policy(allow=["127.0.0.1"], deny=["0.0.0.0/0"]))
    try:
        h.send(syn_frame(GATEWAY, port))
        settle(h)
        ((_ip, seg),) = tcp_answers(h)
        assert seg.flags == SYN | ACK
        assert accepted(listener)
    finally:
        h.close()


def test_policy_matches_either_address_most_specific_first():
    p = Policy(allow=["127.0.0.1"], deny=["10.0.2.0/24"], host_loopback=True)
    assert p.allows("tcp", "127.0.0.1", 80, guest_dst="10.0.2.2")  # /32 allow beats /24
    p = Policy(deny=["10.0.2.2"], host_loopback=True)
    assert not p.allows("tcp", "127.0.0.1", 80, guest_dst="10.0.2.2")
    assert p.allows("tcp", "127.0.0.1", 80)  # a host-side connection not via the gateway
    p = Policy(deny=["127.0.0.0/8"], allow=["10.0.2.2:8080"], host_loopback=True)
    assert p.allows("tcp", "127.0.0.1", 8080, guest_dst="10.0.2.2")
    assert not p.allows("tcp", "127.0.0.1", 8081, guest_dst="10.0.2.2")
    # The verdict cache keys on both addresses.
    p = Policy(deny=["10.0.2.2"], host_loopback=True)
    assert p.allows("tcp", "127.0.0.1", 80, guest_dst="127.0.0.1")
    assert not p.allows("tcp", "127.0.0.1", 80, guest_dst="10.0.2.2")


def test_echo_to_a_denied_guest_visible_outside_address_is_filtered():
    h = Harness(policy=Policy(deny=["192.0.2.9"]))
    try:
        h.send(guest_echo_frame(bytes([192, 0, 2, 9]), 5, 1))
        assert icmp_answers(h) == [(bytes([192, 0, 2, 9]), ICMP_DEST_UNREACH, ICMP_PKT_FILTERED)]
    finally:
        h.close()


