"""UDP NAT (voidbox/net/udp.py) against real sockets on the host's loopback (no root)."""

import errno
import importlib
import os
import socket

import pytest

from tests.twins import pure_only
from tests.unit.netframes import (
    GATEWAY,
    GUEST,
    MAX_PUMP,
    PUMP_SLICE,
    Harness,
    PortHarness,
    RefusingLoop,
    frame_of,
    guest_udp_frame,
)
from voidbox.eventloop import EventLoop
from voidbox.net import _slirp_py
from voidbox.net.config import Forward, NatConfig
from voidbox.net.packets import (
    ETH_HLEN,
    ICMP_DEST_UNREACH,
    ICMP_PKT_FILTERED,
    ICMP_PORT_UNREACH,
    IPPROTO_ICMP,
    IPPROTO_UDP,
    build_ipv4,
    build_ipv4_fragments,
    build_udp,
    parse_icmp,
    parse_ipv4,
    parse_udp,
)
from voidbox.net.policy import Policy
from voidbox.net.udp import UDP_BATCH, UDP_SPARE_SOCKETS, UdpNat

_compiled_slirp = None if pure_only() else importlib.import_module("voidbox._slirp")


@pytest.fixture(params=["engine", "port-pure", "port-cython"])
def make(request):
    """A Harness whose UDP replies go Python's way (send_ip_buf), or a PortHarness whose
    replies the frame port relays itself (FramePort.send_udp4, either twin)."""
    if request.param == "engine":
        return Harness
    if request.param == "port-pure":
        return lambda *a, **k: PortHarness(*a, impl=_slirp_py, **k)
    if _compiled_slirp is None:
        pytest.skip("VOIDBOX_PURE=1: pure twin only")
    return lambda *a, **k: PortHarness(*a, impl=_compiled_slirp, **k)


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


def test_gateway_maps_to_loopback_and_replies_come_back(make, server):
    h = make()
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


def test_large_replies_are_fragmented_to_the_mtu(make, server):
    h = make(NatConfig(mtu=1500))
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


@pytest.mark.parametrize("dst", [b"\xff" * 4, bytes([224, 0, 0, 251]), bytes([10, 0, 2, 0]),
                                 bytes([10, 0, 2, 255])])
def test_broadcast_and_multicast_go_nowhere_silently(dst):
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


def test_reply_is_byte_for_byte_what_the_packet_builders_make(make, server):
    # The reply is assembled in place (headers packed in front of the received payload,
    # checksums by the compiled RFC 1071 sum): it must equal the reference builders' packet.
    h = make()
    port = server.getsockname()[1]
    h.send(guest_udp_frame(GATEWAY, 40010, port, b"q"))
    _, peer = server.recvfrom(100)
    for payload in (b"odd", b"even", b""):  # odd lengths pad the checksum; empty is legal
        server.sendto(payload, peer)
        h.pump(lambda: h.out)
        [frame] = h.out
        h.out.clear()
        ident = int.from_bytes(frame[14 + 4 : 14 + 6], "big")
        want = build_ipv4(GATEWAY, GUEST, IPPROTO_UDP,
                          build_udp(GATEWAY, GUEST, port, 40010, payload), ident=ident)
        assert frame[14:] == want
    h.close()


def test_send_ip_buf_gets_the_reply_in_the_nats_buffer(server):
    loop = EventLoop(debug=True)
    sent = []

    def send_ip(packet):
        raise AssertionError("a reply that fits must go through send_ip_buf")

    def send_ip_buf(buf, n):
        buf[:ETH_HLEN] = b"E" * ETH_HLEN  # the engine writes its Ethernet header here
        sent.append(bytes(buf[ETH_HLEN : ETH_HLEN + n]))

    nat = UdpNat(loop, NatConfig(), Policy(host_loopback=True), send_ip, send_ip_buf=send_ip_buf)
    port = server.getsockname()[1]
    query = memoryview(build_ipv4(GUEST, GATEWAY, IPPROTO_UDP,
                                  build_udp(GUEST, GATEWAY, 40011, port, b"q")))
    nat.guest_datagram(GATEWAY, 40011, port, query[28:], query)
    _, peer = server.recvfrom(100)
    server.sendto(b"answer", peer)
    for _ in range(MAX_PUMP):
        if sent:
            break
        loop.run_once(PUMP_SLICE)
    [packet] = sent
    ip, payload = parse_ipv4(packet)
    hdr, data = parse_udp(ip.src, ip.dst, payload)
    assert (ip.src, ip.dst, hdr.sport, hdr.dport, bytes(data)) == (
        GATEWAY, GUEST, port, 40011, b"answer")
    nat.close()
    loop.close()


def test_a_burst_larger_than_a_batch_arrives_complete_and_in_order(make, server):
    # A flow's first wakeup reads one datagram and each full batch doubles the next, so a
    # burst is relayed across several loop turns: nothing may be lost or reordered.
    h = make()
    port = server.getsockname()[1]
    h.send(guest_udp_frame(GATEWAY, 40012, port, b"q"))
    _, peer = server.recvfrom(100)
    burst = 3 * UDP_BATCH
    for i in range(burst):
        server.sendto(i.to_bytes(2, "big"), peer)
    h.pump(lambda: len(h.out) >= burst)
    got = [int.from_bytes(data, "big") for _ip, _hdr, data in h.udp_replies()]
    assert got == list(range(burst))
    [flow] = h.engine.udp.flows.values()
    assert flow.batch == UDP_BATCH  # grew from one datagram per wakeup to a full batch
    h.close()


def test_idle_expiry_closes_only_flows_idle_for_the_timeout(monkeypatch):
    # A fake clock (far ahead of the real one, so no loop timer fires on its own) and
    # direct sweeps: the decision is tested without timing anything.
    timeout = 10.0
    h = Harness(NatConfig(udp_idle_timeout=timeout))
    clock = [h.loop.time() + 1000.0]
    monkeypatch.setattr(h.loop, "time", lambda: clock[0])
    udp = h.engine.udp
    start = clock[0]
    busy, idle = free_udp_port(), free_udp_port()
    h.send(guest_udp_frame(GATEWAY, 40013, busy, b"x"))
    h.send(guest_udp_frame(GATEWAY, 40014, idle, b"x"))
    assert udp.flow_count() == 2 and udp._sweep_timer.when == start + timeout
    clock[0] = start + timeout / 2
    h.send(guest_udp_frame(GATEWAY, 40013, busy, b"again"))  # keeps its flow alive
    clock[0] = start + timeout
    udp._sweep()
    assert [k[2] for k in udp.flows] == [busy]
    assert h.engine.counters["udp_flows_expired"] == 1 and h.loop.watched_count() == 1
    # The busy flow is looked at again one timeout after its last datagram, not before.
    assert udp._sweep_timer.when == start + timeout / 2 + timeout
    clock[0] = start + timeout / 2 + timeout - 0.001
    udp._sweep()
    assert udp.flow_count() == 1
    clock[0] = start + timeout / 2 + timeout
    udp._sweep()
    assert udp.flow_count() == 0 and udp._sweep_timer is None
    assert h.engine.counters["udp_flows_expired"] == 2
    h.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_spare_sockets_are_made_after_the_turn_and_closed_with_the_nat(server):
    before = open_fds()
    h = Harness()
    port = server.getsockname()[1]
    h.send(guest_udp_frame(GATEWAY, 40015, port, b"x"))
    assert h.engine.udp._spare == []  # the first flow made its own socket
    h.loop.run_once(0)  # the refill runs after the loop turn's events
    assert len(h.engine.udp._spare) == UDP_SPARE_SOCKETS
    h.send(guest_udp_frame(GATEWAY, 40016, port, b"y"))  # takes a spare
    assert server.recvfrom(100)[0] == b"x" and server.recvfrom(100)[0] == b"y"
    assert len(h.engine.udp._spare) == UDP_SPARE_SOCKETS - 1
    assert h.loop.timer_count() == 1  # one idle sweep for both flows
    h.engine.udp.close()
    assert h.loop.timer_count() == 0  # and none left behind for a closed NAT
    h.close()
    assert open_fds() == before


def test_socket_exhaustion_drops_the_datagram_and_counts_it(monkeypatch, server):
    h = Harness()
    port = server.getsockname()[1]
    h.send(guest_udp_frame(GATEWAY, 40017, port, b"x"))  # schedules a refill

    def no_socket():
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(h.engine.udp, "_new_socket", no_socket)
    h.loop.run_once(0)  # the refill fails: counted, nothing else
    assert h.engine.counters["udp_spare_socket_error"] == 1
    assert h.engine.udp._spare == []
    h.send(guest_udp_frame(GATEWAY, 40018, port, b"y"))
    assert h.engine.udp.flow_count() == 1  # only the first flow
    assert h.engine.counters["udp_socket_error"] == 1
    assert server.recvfrom(100)[0] == b"x"
    h.close()


def test_a_flow_the_loop_cannot_watch_is_closed_not_left_unpolled(monkeypatch, server):
    """epoll_ctl may fail (ENOMEM, the user's max_user_watches spent): the datagram has
    left, but a flow nothing polls or expires would keep its socket for good, so it goes."""
    h = Harness()
    port = server.getsockname()[1]
    refusing = RefusingLoop(h.loop)
    monkeypatch.setattr(h.engine.udp, "loop", refusing)
    fds = len(os.listdir("/proc/self/fd"))
    h.send(guest_udp_frame(GATEWAY, 40019, port, b"x"))
    assert server.recvfrom(100)[0] == b"x"
    assert refusing.refused == 1
    assert h.engine.udp.flow_count() == 0
    assert h.engine.counters["udp_watch_failed"] == 1
    assert h.engine.counters["flows_refused_no_watch"] == 1
    assert len(os.listdir("/proc/self/fd")) == fds  # the flow's socket did not stay open
    monkeypatch.undo()
    h.send(guest_udp_frame(GATEWAY, 40019, port, b"y"))  # the next one opens a flow
    assert server.recvfrom(100)[0] == b"y" and h.engine.udp.flow_count() == 1
    h.close()


def test_forward_never_shares_a_port_held_with_so_reuseaddr():
    """Issue 8, defect 2: a service holding 127.0.0.1:P with SO_REUSEADDR kept binding
    rights for anyone else who set it too; the forward took the service's datagrams."""
    from voidbox.errors import VoidboxError

    service = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    service.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    service.bind(("127.0.0.1", 0))
    port = service.getsockname()[1]
    loop = EventLoop(debug=True)
    nat = UdpNat(loop, NatConfig(), Policy(host_loopback=True), lambda pkt: None)
    try:
        with pytest.raises(VoidboxError, match=f"cannot forward udp 127.0.0.1:{port}: Address already in use"):
            nat.add_forward("127.0.0.1", port, 5300)
        assert not nat.listeners
    finally:
        nat.close()
        loop.close()
        service.close()


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_parse_recverr_reads_the_error_and_its_offender_and_refuses_the_rest(v6):
    """The error queue's control message (ip(7) IP_RECVERR, ipv6(7) IPV6_RECVERR): type,
    code, info and the offender's address; another origin, a short message or another
    level say nothing."""
    import socket as s
    import struct as st

    from voidbox.net import udp

    level, ctype = (s.IPPROTO_IPV6, udp.IPV6_RECVERR) if v6 else (s.IPPROTO_IP, udp.IP_RECVERR)
    origin = udp.SO_EE_ORIGIN_ICMP6 if v6 else udp.SO_EE_ORIGIN_ICMP
    offender = bytes(range(1, 17)) if v6 else bytes([10, 0, 0, 9])
    err = udp._SOCK_EXTENDED_ERR.pack(113, origin, 2 if v6 else 3, 1, 0, 1280, 0)
    sockaddr = (st.pack("=HHI", s.AF_INET6, 0, 0) + offender + b"\0" * 4 if v6
                else st.pack("=HH", s.AF_INET, 0) + offender + b"\0" * 8)
    assert udp.parse_recverr([(level, ctype, err + sockaddr)], v6) == \
        (2 if v6 else 3, 1, 1280, offender)
    assert udp.parse_recverr([(level, ctype, err)], v6) == (2 if v6 else 3, 1, 1280, None)
    assert udp.parse_recverr([(level, ctype, err + sockaddr[:3])], v6)[3] is None  # cut short
    local = udp._SOCK_EXTENDED_ERR.pack(113, 1, 0, 0, 0, 0, 0)  # SO_EE_ORIGIN_LOCAL
    assert udp.parse_recverr([(level, ctype, local + sockaddr)], v6) is None
    assert udp.parse_recverr([(level, ctype, err[:8])], v6) is None
    assert udp.parse_recverr([(s.SOL_SOCKET, ctype, err + sockaddr)], v6) is None
    assert udp.parse_recverr([(level, ctype, err + sockaddr)], not v6) is None  # the other family


@pytest.fixture(params=["pure", "cython"])
def port_impl(request):
    if request.param == "pure":
        return _slirp_py
    if _compiled_slirp is None:
        pytest.skip("VOIDBOX_PURE=1: pure twin only")
    return _compiled_slirp


def _open_flow(h, server, guest_port):
    port = server.getsockname()[1]
    h.send(guest_udp_frame(GATEWAY, guest_port, port, b"q"))
    return port, server.recvfrom(100)[1]


def test_the_port_relays_replies_with_no_python_per_datagram(port_impl, server):
    """Through the frame port, send_ip_buf (Python's way) is never called: the batch is
    received, framed and written in one call per wakeup, and counted as Python's way is."""
    h = PortHarness(impl=port_impl)
    port, peer = _open_flow(h, server, 40020)

    def refuse(buf, n):
        raise AssertionError("a reply the port can take must not come this way")

    h.engine.udp.send_ip_buf = refuse
    before = dict(h.engine.counters)
    for i in range(5):
        server.sendto(b"r%d" % i, peer)
    h.pump(lambda: len(h.out) >= 5)
    assert [d for _ip, _hdr, d in h.udp_replies()] == [b"r%d" % i for i in range(5)]
    c = h.engine.counters
    assert c["udp_rx"] - before.get("udp_rx", 0) == 5
    assert c["frames_to_guest"] - before.get("frames_to_guest", 0) == 5
    assert h.port.tx_frames == 5
    h.close()


def test_replies_wait_behind_frames_the_tap_has_queued(port_impl, server):
    """A paused port (the TAP's backlog holds frames the full TAP refused) takes nothing:
    the reply goes Python's way into that backlog, behind what is queued, and all arrive
    in order once the TAP drains."""
    from voidbox.net.fastpath import UDP_PAUSED

    h = PortHarness(impl=port_impl, sndbuf=4096)
    port, peer = _open_flow(h, server, 40021)
    eth = h.engine._guest_eth_header()

    def frame(data):
        return eth + build_ipv4(GATEWAY, GUEST, IPPROTO_UDP,
                                build_udp(GATEWAY, GUEST, port, 40021, data))

    fills = 0
    while h.port.write(frame(b"fill%03d" % fills)) == 1:  # the TAP is full, unread
        fills += 1
    h.tap._enqueue(frame(b"first"))
    assert h.port.paused
    statuses = []
    relay = h.engine.udp._relay

    def spy(flow, batch):
        got = relay(flow, batch)
        statuses.append(got[1])
        return got

    h.engine.udp._relay = spy
    server.sendto(b"second", peer)
    for _ in range(MAX_PUMP):  # no reading at the peer yet: the TAP stays full
        if statuses:
            break
        h.loop.run_once(PUMP_SLICE)
    assert statuses == [UDP_PAUSED]
    h.pump(lambda: len(h.out) >= fills + 2)
    got = [d for _ip, _hdr, d in h.udp_replies()]
    assert got == [b"fill%03d" % i for i in range(fills)] + [b"first", b"second"]
    h.close()


def test_a_burst_of_datagrams_beyond_the_mtu_is_relayed_a_batch_per_wakeup(port_impl, server):
    """Fragmenting one datagram does not end the port's batch: the relay carries on, and
    the batch grows as for datagrams that fit."""
    h = PortHarness(NatConfig(mtu=1500), impl=port_impl)
    port, peer = _open_flow(h, server, 40023)
    burst = [bytes([i]) * 3000 for i in range(24)]
    for payload in burst:
        server.sendto(payload, peer)
    wholes = []
    r = h.engine.reassembler  # the engine's own reassembler stands in for the guest's

    def collected():
        for ip, payload in h.ip_packets():
            whole = r.push(ip, payload, 0.0)
            if whole is not None:
                wholes.append(whole)
        return len(wholes) >= len(burst)

    h.pump(collected)
    assert wholes == [build_udp(GATEWAY, GUEST, port, 40023, p) for p in burst]
    [flow] = h.engine.udp.flows.values()
    assert flow.batch > 4  # grew: each wakeup relayed a whole batch, not one datagram
    h.close()


def test_replies_the_tap_refuses_are_queued_not_lost(port_impl, server):
    """A burst larger than the TAP's buffer: the frame the port could not write (EAGAIN)
    goes to the backlog, the rest follow it there, and all arrive in order once it drains."""
    h = PortHarness(impl=port_impl, sndbuf=4096)
    port, peer = _open_flow(h, server, 40022)
    burst = [b"%04d" % i + b"b" * 900 for i in range(60)]
    for payload in burst:
        server.sendto(payload, peer)
    h.pump(lambda: len(h.out) >= len(burst))
    assert [d for _ip, _hdr, d in h.udp_replies()] == burst
    assert h.port.tx_eagain >= 1  # the port did hit a full TAP
    assert h.tap.backlog_dropped == 0
    h.close()
