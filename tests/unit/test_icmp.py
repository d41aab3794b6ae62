"""ICMP echo (voidbox/net/icmp.py): local answers, policy, and the no-privilege fallback."""

import logging

import pytest

from tests.unit.netframes import DNS, GATEWAY, GUEST, Harness, guest_echo_frame, guest_ip_frame
from voidbox.net.packets import (
    ICMP_DEST_UNREACH,
    ICMP_ECHOREPLY,
    ICMP_HOST_UNREACH,
    ICMP_PKT_FILTERED,
    IPPROTO_ICMP,
    build_icmp,
    build_ipv4,
)
from voidbox.net.policy import Policy

OUTSIDE = bytes([192, 0, 2, 9])


@pytest.mark.parametrize("dst", [GATEWAY, DNS])
def test_echo_to_gateway_and_dns_is_answered_locally(dst):
    h = Harness()
    h.send(guest_echo_frame(dst, 0x4242, 7, b"abcdefgh" * 7))
    [(ip, hdr, data)] = h.icmp_replies()
    assert (ip.src, ip.dst) == (dst, GUEST)
    assert (hdr.type, hdr.code, hdr.rest) == (ICMP_ECHOREPLY, 0, (0x4242 << 16) | 7)
    assert data == b"abcdefgh" * 7
    h.close()


def test_echo_reply_golden():
    h = Harness()
    h.send(guest_echo_frame(GATEWAY, 1, 2, b"hi"))
    # Checksum by hand: ~(0x0001 + 0x0002 + 0x6869) = 0x9793.
    expected = build_ipv4(GATEWAY, GUEST, IPPROTO_ICMP, bytes.fromhex("0000979300010002") + b"hi")
    assert h.out[0][14:] == expected
    h.close()


def test_denied_destination_gets_admin_prohibited():
    h = Harness(policy=Policy(deny=["192.0.2.0/24"]))
    frame = guest_echo_frame(OUTSIDE, 5, 1)
    h.send(frame)
    [(ip, hdr, data)] = h.icmp_replies()
    assert ip.src == OUTSIDE
    assert (hdr.type, hdr.code) == (ICMP_DEST_UNREACH, ICMP_PKT_FILTERED)
    assert data == frame[14 : 14 + 20 + 8]  # quotes the guest's header and 8 bytes
    assert h.engine.counters["icmp_denied"] == 1
    h.close()


def test_without_ping_socket_or_raw_socket_host_unreachable_and_one_warning(caplog):
    h = Harness()
    h.engine.icmp.mode = "none"  # what an unprivileged host without ping_group_range gets
    with caplog.at_level(logging.WARNING):
        h.send(guest_echo_frame(OUTSIDE, 5, 1))
        h.send(guest_echo_frame(OUTSIDE, 5, 2))
    replies = h.icmp_replies()
    assert [(r[1].type, r[1].code) for r in replies] == [(ICMP_DEST_UNREACH, ICMP_HOST_UNREACH)] * 2
    assert len([r for r in caplog.records if "ICMP echo" in r.message]) == 1
    h.close()


def test_guest_subnet_and_broadcast_are_unreachable():
    h = Harness()
    # Twice each: the second answer comes from the remembered per-destination verdict.
    for _ in range(2):
        h.send(guest_echo_frame(bytes([10, 0, 2, 77]), 1, 1))
        h.send(guest_echo_frame(b"\xff" * 4, 1, 1))
    assert [r[1].code for r in h.icmp_replies()] == [ICMP_HOST_UNREACH] * 4
    assert h.engine.icmp.flow_count() == 0
    h.close()


def test_other_icmp_types_and_bad_checksums_are_dropped():
    h = Harness()
    h.send(guest_ip_frame(GATEWAY, IPPROTO_ICMP, build_icmp(13, 0, 0, b"x" * 12)))  # timestamp
    bad = bytearray(build_icmp(8, 0, 1, b"x"))
    bad[-1] ^= 1
    h.send(guest_ip_frame(GATEWAY, IPPROTO_ICMP, bytes(bad)))
    assert h.out == []
    assert h.engine.counters["icmp_ignored_type"] == 1
    assert h.engine.counters["icmp_checksum"] == 1
    h.close()


def test_echo_reply_larger_than_the_mtu_is_fragmented():
    """Found by the frame fuzzer: a 3000-byte ping of the gateway (sent in fragments) was
    answered with one 3034-byte frame, over a 1500-byte MTU."""
    from tests.unit.netframes import frame_of
    from voidbox.net.packets import IP_MF, IPV4_HLEN, Reassembler, build_ipv4_fragments

    h = Harness()
    data = bytes(range(256)) * 11 + b"x" * 164  # 2980 bytes
    request = build_icmp(8, 0, (0x77 << 16) | 1, data)
    for packet in build_ipv4_fragments(GUEST, GATEWAY, IPPROTO_ICMP, request, 1500, ident=9):
        h.send(frame_of(packet))
    packets = h.ip_packets()
    assert len(packets) == 3 and all(IPV4_HLEN + len(p) <= 1500 for _ip, p in packets)
    assert [bool(ip.flags_frag & IP_MF) for ip, _ in packets] == [True, True, False]
    r = Reassembler()
    whole = [r.push(ip, payload, now=0.0) for ip, payload in packets][-1]
    assert whole == build_icmp(ICMP_ECHOREPLY, 0, (0x77 << 16) | 1, data)
    h.close()


class ErrQueueSocket:
    """A ping socket's stand-in: one error in its queue, then one echo reply, then EAGAIN."""

    def __init__(self, ancdata, reply: bytes):
        self.ancdata, self.reply = ancdata, reply

    def recvmsg(self, _size, _space, _flags):
        if self.ancdata is None:
            raise BlockingIOError
        anc, self.ancdata = self.ancdata, None
        return b"", anc, 0, None

    def recv(self, _size):
        if self.reply is None:
            raise BlockingIOError
        reply, self.reply = self.reply, None
        return reply


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_a_ping_sockets_error_and_reply_reach_the_guest(v6):
    """What the host's stack says about an echo flow (ip(7) IP_RECVERR / IPV6_RECVERR):
    the error goes to the guest from the address it pinged, quoting its request, and a
    reply on the same socket is relayed with the guest's id."""
    import select
    import socket
    import struct

    from tests.unit.netframes import GUEST6, icmp6_messages
    from voidbox.net import udp
    from voidbox.net.icmp import _Flow
    from voidbox.net.packets import parse_ethernet, parse_icmp, parse_ipv4

    far = bytes([192, 0, 2, 9]) if not v6 else bytes.fromhex("20010db8" + "00" * 11 + "09")
    h = Harness()
    try:
        level, ctype = ((socket.IPPROTO_IPV6, udp.IPV6_RECVERR) if v6
                        else (socket.IPPROTO_IP, udp.IP_RECVERR))
        origin = udp.SO_EE_ORIGIN_ICMP6 if v6 else udp.SO_EE_ORIGIN_ICMP
        etype, code = (1, 3) if v6 else (ICMP_DEST_UNREACH, ICMP_HOST_UNREACH)
        err = udp._SOCK_EXTENDED_ERR.pack(113, origin, etype, code, 0, 0, 0)
        reply_type = 129 if v6 else ICMP_ECHOREPLY
        reply = struct.pack("!BBHHH", reply_type, 0, 0, 4321, 7) + b"pong"
        flow = _Flow("k", far, far, 77, GUEST6 if v6 else b"")
        flow.quote = b"the guest's request"
        flow.sock = ErrQueueSocket([(level, ctype, err)], reply)
        h.engine.icmp._ping_event(flow, select.EPOLLERR | select.EPOLLIN)
        if v6:
            (_e, ip_err, hdr_err, body_err), (_e2, ip_rep, hdr_rep, body_rep) = icmp6_messages(h.out)
            assert (ip_err.src, ip_err.dst, hdr_err.type, hdr_err.code) == (far, GUEST6, 1, 3)
            assert body_err.endswith(b"the guest's request")
            assert (ip_rep.src, hdr_rep.type) == (far, 129) and body_rep.endswith(b"pong")
            assert h.engine.counters["icmp6_error_reflected"] == 1
        else:
            err_frame, reply_frame = h.out
            for frame, want in ((err_frame, ICMP_DEST_UNREACH), (reply_frame, ICMP_ECHOREPLY)):
                ip, payload = parse_ipv4(parse_ethernet(frame)[1])
                assert ip.src == far and ip.dst == GUEST and ip.proto == IPPROTO_ICMP
                assert parse_icmp(payload)[0].type == want
            assert bytes(err_frame).endswith(b"the guest's request")
            assert bytes(reply_frame).endswith(b"pong")
            assert h.engine.counters["icmp_error_reflected"] == 1
    finally:
        h.close()


def test_an_echo_socket_the_loop_cannot_watch_is_closed_and_refused(monkeypatch):
    """epoll_ctl may fail (ENOMEM, max_user_watches spent): the ping socket is closed and
    the guest told unreachable, counted and logged with the watch hint, rather than a flow
    whose socket nothing polls. Ping sockets are off on many hosts (ping_group_range), so
    a UDP socket stands in for one; nothing is sent: the watch fails before the echo."""
    import socket
    import types

    from tests.unit.netframes import RefusingLoop
    from voidbox.net import icmp

    opened = []

    def udp_instead_of_ping(family, kind, _proto):
        opened.append(socket.socket(family, kind, 0))
        return opened[-1]

    fake = types.SimpleNamespace(**{k: getattr(socket, k) for k in dir(socket) if k.isupper()})
    fake.socket = udp_instead_of_ping
    monkeypatch.setattr(icmp, "socket", fake)
    h = Harness()
    refusing = RefusingLoop(h.loop)
    monkeypatch.setattr(h.engine.icmp, "loop", refusing)
    refused = []
    flow = icmp._Flow("k", OUTSIDE, OUTSIDE, 77)
    assert h.engine.icmp._open_flow(icmp._V4, "ping", flow, lambda: refused.append(1)) is None
    assert refusing.refused == 1 and refused == [1]
    assert [s.fileno() for s in opened] == [-1]  # closed
    assert flow.sock is None and not h.engine.icmp.flows
    assert h.engine.counters["flows_refused_no_watch"] == 1
    h.close()
