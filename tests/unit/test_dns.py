"""DNS relay (voidbox/net/dns.py): truncation, failover, hostile replies; loopback upstreams."""

import socket
import struct

import pytest

from tests.unit.netframes import DNS, GUEST, Harness, RefusingLoop, guest_udp_frame
from voidbox.net.config import NatConfig, read_resolv_conf
from voidbox.net.dns import DNS_FLAG_TC, question_end, truncate_response
from voidbox.net.packets import PacketError

QNAME = b"\x07example\x04test\x00"


def query(ident: int = 0x1111) -> bytes:
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 1) + QNAME + b"\x00\x01\x00\x01" + b"\x00" * 11


def response(q: bytes, answers: int = 1) -> bytes:
    ident = struct.unpack_from("!H", q)[0]
    rr = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\xc0\x00\x02\x01"
    return (struct.pack("!HHHHHH", ident, 0x8180, 1, answers, 0, 0) + QNAME + b"\x00\x01\x00\x01"
            + rr * answers)


def upstream():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(5)
    return s


def test_question_end_and_its_bounds():
    assert question_end(query()) == 12 + len(QNAME) + 4
    with pytest.raises(PacketError, match="truncated"):
        question_end(query()[:20])
    with pytest.raises(PacketError, match="bad_label"):
        question_end(b"\x00" * 12 + b"\xc0\x0c")  # no pointers in a question
    with pytest.raises(PacketError, match="too_long"):
        question_end(b"\x00" * 12 + (b"\x3f" + b"a" * 63) * 5 + b"\x00\x00\x01\x00\x01")


def test_truncate_keeps_header_and_question_and_sets_tc():
    big = response(query(), answers=200)
    cut = truncate_response(big)
    ident, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", cut)
    assert (ident, qd, an, ns, ar) == (0x1111, 1, 0, 0, 0)
    assert flags == 0x8180 | DNS_FLAG_TC
    assert cut[12:] == QNAME + b"\x00\x01\x00\x01"


def test_relay_roundtrip_from_the_dns_address():
    up = upstream()
    h = Harness(NatConfig(dns_upstreams=[up.getsockname()]))
    try:
        h.send(guest_udp_frame(DNS, 33333, 53, query()))
        q, peer = up.recvfrom(4096)
        assert q == query()
        up.sendto(response(q), peer)
        h.pump(lambda: h.out)
        [(ip, hdr, data)] = h.udp_replies()
        assert (ip.src, ip.dst, hdr.sport, hdr.dport) == (DNS, GUEST, 53, 33333)
        assert data == response(q)
        assert not h.engine.dns.pending
    finally:
        up.close()
        h.close()


def test_a_query_socket_the_loop_cannot_watch_gets_servfail_at_once(monkeypatch):
    """epoll_ctl may fail (ENOMEM, max_user_watches spent): the query socket goes and the
    guest hears SERVFAIL now, rather than a query pending forever with no timer."""
    up = upstream()
    h = Harness(NatConfig(dns_upstreams=[up.getsockname()]))
    try:
        monkeypatch.setattr(h.engine.dns, "loop", RefusingLoop(h.loop))
        h.send(guest_udp_frame(DNS, 33334, 53, query()))
        [(_ip, hdr, data)] = h.udp_replies()
        assert (hdr.sport, hdr.dport) == (53, 33334)
        ident, flags = struct.unpack_from("!HH", data)
        assert ident == 0x1111 and flags & 0x800F == 0x8002  # a response: SERVFAIL
        assert not h.engine.dns.pending
        assert h.engine.counters["dns_servfail"] == 1
        assert h.engine.counters["flows_refused_no_watch"] == 1
    finally:
        up.close()
        h.close()


def test_answers_larger_than_a_frame_arrive_truncated():
    up = upstream()
    h = Harness(NatConfig(dns_upstreams=[up.getsockname()]))
    try:
        h.send(guest_udp_frame(DNS, 33334, 53, query()))
        q, peer = up.recvfrom(4096)
        up.sendto(response(q, answers=200), peer)  # 3.2 KB
        h.pump(lambda: h.out)
        [(_ip, _hdr, data)] = h.udp_replies()
        assert data == truncate_response(response(q, answers=200))
        assert h.engine.counters["dns_truncated"] == 1
    finally:
        up.close()
        h.close()


def test_mismatched_ids_are_ignored_and_timeouts_fail_over():
    first, second = upstream(), upstream()
    h = Harness(NatConfig(dns_upstreams=[first.getsockname(), second.getsockname()], dns_timeout=0.05))
    try:
        h.send(guest_udp_frame(DNS, 33335, 53, query()))
        q, peer = first.recvfrom(4096)
        first.sendto(response(query(ident=0x2222)), peer)  # a forged id
        first.sendto(b"\x11", peer)                          # garbage
        # The first upstream never answers properly: the query moves to the second.
        h.pump(lambda: h.engine.counters.get("dns_timeouts", 0) == 1)
        q2, peer2 = second.recvfrom(4096)
        assert q2 == q
        second.sendto(response(q2), peer2)
        h.pump(lambda: h.out)
        assert [r[2] for r in h.udp_replies()] == [response(q)]
        assert h.engine.counters["dns_mismatched_reply"] == 1
        assert h.engine.counters["dns_malformed_reply"] == 1
    finally:
        first.close()
        second.close()
        h.close()


def test_every_upstream_failing_drops_the_query_and_frees_it():
    s = upstream()
    dead = s.getsockname()
    s.close()
    h = Harness(NatConfig(dns_upstreams=[dead], dns_timeout=0.05))
    h.send(guest_udp_frame(DNS, 33336, 53, query()))
    h.pump(lambda: h.engine.counters.get("dns_failed", 0) == 1)
    assert not h.engine.dns.pending and h.out == []
    h.close()


def test_other_ports_on_the_dns_address_are_unreachable_and_garbage_is_dropped():
    h = Harness(NatConfig(dns_upstreams=[("127.0.0.1", 9)]))
    h.send(guest_udp_frame(DNS, 33337, 54, query()))
    h.send(guest_udp_frame(DNS, 33337, 53, b"\x01"))
    assert not h.engine.dns.pending
    assert h.engine.counters["udp_dns_address_other_port"] == 1
    assert len(h.out) == 1  # ICMP port unreachable for port 54, nothing for the garbage
    assert h.engine.counters["dns_malformed"] == 1
    h.close()


def test_resolv_conf_parsing(tmp_path):
    path = tmp_path / "resolv.conf"
    path.write_text("# comment\nnameserver 127.0.0.53\nnameserver ::1\nsearch x\n"
                    "nameserver fe80::1%eth0\nnameserver 10.1.1.1\n")
    assert read_resolv_conf(str(path)) == [("127.0.0.53", 53), ("::1", 53), ("10.1.1.1", 53)]
    assert read_resolv_conf(str(tmp_path / "missing")) == []


def test_host_endpoint_sends_dns_to_the_upstream_and_nothing_else():
    cfg = NatConfig(dns_upstreams=[("127.0.0.1", 5353)])
    assert cfg.host_endpoint("10.0.2.3", 53) == ("127.0.0.1", 5353)
    assert cfg.host_endpoint("10.0.2.3", 80) is None  # DNS only (issue 8, defect 3)
    assert cfg.host_endpoint("10.0.2.2", 80) == ("127.0.0.1", 80)
    assert cfg.host_endpoint("10.0.2.77", 80) is None  # the subnet (defect 11)
    assert cfg.host_endpoint("192.0.2.1", 80) == ("192.0.2.1", 80)
    assert cfg.translate("10.0.2.2") == "127.0.0.1"
    assert cfg.translate("10.0.2.3") == "10.0.2.3"
    assert cfg.translate("192.0.2.1") == "192.0.2.1"
