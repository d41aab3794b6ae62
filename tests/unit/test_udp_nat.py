"""UDP NAT (voidbox/net/udp.py) against real sockets on the host's loopback (no root)."""

import socket

import pytest

from tests.unit.netframes import GATEWAY, GUEST, Harness, frame_of, guest_udp_frame
from voidbox.net.config import Forward, NatConfig
from voidbox.net.packets import (
    ICMP_DEST_UNREACH,
    ICMP_PKT_FILTERED,
    ICMP_PORT_UNREACH,
    IPPROTO_ICMP,
    IPPROTO_UDP,
    build_ipv4_fragments,
    build_udp,
    parse_icmp,
)
from voidbox.net.policy import Policy


@pytest.fixture
def server():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(5)
    yield s
    s.close()


def free_udp_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_gateway_maps_to_loopback_and_replies_come_back(server):
    h = Harness()
    port = server.getsockname()[1]
    h.send(guest_udp_frame(GATEWAY, 40000, port, b"hello"))
    data, peer = server.recvfrom(100)
    assert data == b"hello" and peer[0] == "127.0.0.1"
    server.sendto(b"world", peer)
    h.pump(lambda: h.out)
    [(ip, hdr, payload)] = h.udp_replies()
    assert (ip.src, ip.dst, hdr.sport, hdr.dport, payload) == (GATEWAY, GUEST, port, 40000, b"world")
    # The same 5-tuple reuses its flow (same host source port).
    h.send(guest_udp_frame(GATEWAY, 40000, port, b"again"))
    assert server.recvfrom(100) == (b"again", peer)
    assert h.engine.udp.flow_count() == 1
    h.close()


def test_large_replies_are_fragmented_to_the_mtu(server):
    h = Harness(NatConfig(mtu=1500))
    port = server.getsockname()[1]
    h.send(guest_udp_frame(GATEWAY, 40001, port, b"q"))
    _, peer = server.recvfrom(100)
    server.sendto(b"z" * 4000, peer)
    h.pump(lambda: len(h.out) >= 3)
    assert all(len(f) <= 1514 for f in h.out)
    r = h.engine.reassembler  # the engine's own reassembler stands in for the guest's
    whole = None
    for ip, payload in h.ip_packets():
        whole = r.push(ip, payload, 0.0) or whole
    assert whole == build_udp(GATEWAY, GUEST, port, 40001, b"z" * 4000)
    h.close()


def test_guest_fragments_are_reassembled(server):
    h = Harness()
    port = server.getsockname()[1]
    udp = build_udp(GUEST, GATEWAY, 40002, port, b"f" * 3000)
    for pkt in build_ipv4_fragments(GUEST, GATEWAY, IPPROTO_UDP, udp, 1500, ident=9):
        h.send(frame_of(pkt))
    assert server.recvfrom(4000)[0] == b"f" * 3000
    assert h.engine.counters["ip_reassembled"] == 1
    h.close()


def test_denied_destination_gets_admin_prohibited(server):
    port = server.getsockname()[1]
    # Checked on the translated address: 10.0.2.2 is 127.0.0.1.
    h = Harness(policy=Policy(deny=[f"127.0.0.1:{port}"]))
    h.send(guest_udp_frame(GATEWAY, 40003, port, b"no"))
    [(ip, hdr, _)] = h.icmp_replies()
    assert (hdr.type, hdr.code) == (ICMP_DEST_UNREACH, ICMP_PKT_FILTERED)
    server.settimeout(0.2)
    with pytest.raises(TimeoutError):
        server.recvfrom(100)
    assert h.engine.udp.flow_count() == 0
    h.close()


def test_host_port_unreachable_is_reflected_quoting_the_guest_datagram():
    h = Harness()
    port = free_udp_port()
    frame = guest_udp_frame(GATEWAY, 40004, port, b"anyone?")
    h.send(frame)
    h.pump(lambda: h.out)
    [(ip, payload)] = h.ip_packets()
    assert ip.proto == IPPROTO_ICMP and ip.src == GATEWAY
    hdr, quote = parse_icmp(payload)
    assert (hdr.type, hdr.code) == (ICMP_DEST_UNREACH, ICMP_PORT_UNREACH)
    assert bytes(quote) == frame[14 : 14 + 28]
    h.close()


def test_idle_flows_expire():
    h = Harness(NatConfig(udp_idle_timeout=0.05))
    h.send(guest_udp_frame(GATEWAY, 40005, free_udp_port(), b"x"))
    assert h.engine.udp.flow_count() == 1
    h.pump(lambda: h.engine.udp.flow_count() == 0)
    assert h.engine.counters["udp_flows_expired"] == 1
    assert h.loop.watched_count() == 0
    h.close()


def test_flow_limit_is_enforced(server):
    h = Harness(NatConfig(max_flows=2))
    port = server.getsockname()[1]
    for sport in (1, 2, 3):
        h.send(guest_udp_frame(GATEWAY, sport, port, b"x"))
    assert h.engine.udp.flow_count() == 2
    assert h.engine.counters["udp_dropped_flow_limit"] == 1
    h.close()


@pytest.mark.parametrize("dst", [b"\xff" * 4, bytes([224, 0, 0, 251]), bytes([10, 0, 2, 99]),
                                 bytes([10, 0, 2, 255])])
def test_broadcast_multicast_and_local_subnet_go_nowhere(dst):
    h = Harness()
    h.send(guest_udp_frame(dst, 5353, 5353, b"x"))
    assert h.engine.udp.flow_count() == 0 and h.out == []
    h.close()


def test_port_forward_presents_loopback_peers_as_the_gateway():
    port = free_udp_port()
    h = Harness(NatConfig(forwards=[Forward("udp", "127.0.0.1", port, 7000)]))
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.settimeout(5)
    peer.bind(("127.0.0.1", 0))
    try:
        peer.sendto(b"in", ("127.0.0.1", port))
        h.pump(lambda: h.out)
        [(ip, hdr, data)] = h.udp_replies()
        peer_port = peer.getsockname()[1]
        assert (ip.src, hdr.sport, hdr.dport, data) == (GATEWAY, peer_port, 7000, b"in")
        h.send(guest_udp_frame(GATEWAY, 7000, peer_port, b"out"))
        assert peer.recvfrom(100) == (b"out", ("127.0.0.1", port))
        assert h.engine.udp.flow_count() == 1
    finally:
        peer.close()
        h.close()
