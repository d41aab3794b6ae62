"""The TCP relay over IPv6 (voidbox.net.tcp_nat): the same flows as test_tcp_nat's, with
16-byte addresses, IPv6 headers and pseudo-header checksums, AF_INET6 host sockets on the
host's ::1. Runs against both twins (VOIDBOX_PURE=1 for the pure one) and with host data
through send_ip, the FramePort stream sender, and the stream sender with GSO (TCPV6).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import random
import socket
import struct
import threading

import pytest

from tests.unit import test_tcp_nat as v4
from tests.unit.test_tcp_nat import GPORT, VNET_HDR, VNET_HDR_LEN, AllowAll, Config, recv_all
from voidbox.net import fastpath
from voidbox.net.config import NatConfig
from voidbox.net.ipv6 import ip6_to_bytes
from voidbox.net.policy import Policy
from voidbox.net.tcp import ACK, RST, SYN, Segment, TcpFlow, TcpState, parse_segment

GUEST6 = ip6_to_bytes("fd00::100")
GATEWAY6 = ip6_to_bytes("fd00::2")
LOOPBACK6 = ip6_to_bytes("::1")
ETH_TO_GUEST6 = bytes.fromhex("525400123456" "525400000002" "86dd")
IPV6_HLEN = 40
CLONE_NEWNET = 0x40000000  # sched.h


def parse_packet6(pkt: bytes):
    assert pkt[0] >> 4 == 6 and pkt[6] == 6 and pkt[7] == 64
    plen = struct.unpack_from("!H", pkt, 4)[0]
    assert IPV6_HLEN + plen == len(pkt)
    src, dst = pkt[8:24], pkt[24:40]
    assert fastpath.tcp_checksum(src, dst, pkt[IPV6_HLEN:]) == 0
    return src, dst, parse_segment(memoryview(pkt)[IPV6_HLEN:])


def segment_bytes6(seg: Segment, src=GUEST6, dst=LOOPBACK6) -> bytes:
    buf = bytearray(70000)
    n = fastpath.build_ipv6_tcp(buf, src, dst, 0, seg.src_port, seg.dst_port, seg.seq,
                                seg.ack, seg.flags, seg.window, seg.options(), seg.payload)
    return bytes(buf[IPV6_HLEN:n])


def complete_partial_checksum6(pkt: bytearray) -> None:
    tcp = memoryview(pkt)[IPV6_HLEN:]
    pseudo = struct.unpack_from("!H", tcp, 16)[0]
    struct.pack_into("!H", tcp, 16, 0)
    assert pseudo != 0
    struct.pack_into("!H", tcp, 16, fastpath.tcp_checksum(bytes(pkt[8:24]), bytes(pkt[24:40]), tcp))


class Rig6(v4.Rig):
    """test_tcp_nat's Rig with the guest at fd00::100 and the remote at ::1 (or fd00::2)."""

    guest = GUEST6

    def __init__(self, policy=None, config=None, stream=None):
        super().__init__(policy=policy, config=config, stream=stream)
        self.remote = LOOPBACK6
        self.gso_types: set[int] = set()
        if stream:
            self.nat.set_stream_port(self.port, lambda ipv6=False: ETH_TO_GUEST6,
                                     self._port_blocked)

    def _read_port(self):
        if self.port_pair is None:
            return
        peer = self.port_pair[1]
        while True:
            try:
                raw = peer.recv(1 << 17)
            except BlockingIOError:
                return
            if self.port.vnet_hdr_len:
                flags, gso_type, hdr_len, gso_size, start, off = VNET_HDR.unpack_from(raw)
                raw = raw[VNET_HDR_LEN:]
                # The checksum starts behind the 40-byte IPv6 header; GSO is TCPV6 (4).
                assert flags == 1 and (start, off) == (14 + IPV6_HLEN, 16)
                assert gso_type in (0, 4) and (gso_type == 0 or (gso_size > 0 and hdr_len == 74))
                self.gso_types.add(gso_type)
            assert raw[:14] == ETH_TO_GUEST6
            pkt = bytearray(raw[14:])
            if self.port.vnet_hdr_len:
                complete_partial_checksum6(pkt)
            self.to_guest.append(bytes(pkt))

    def inject(self, seg: Segment, dst=None, src=GUEST6):
        dst = dst or self.remote
        self.nat.guest_segment(src, dst, memoryview(segment_bytes6(seg, src, dst)))

    def take(self):
        self._read_port()
        out = [parse_packet6(p) for p in self.to_guest]
        self.to_guest.clear()
        return out


class Server6(v4.Server):
    """test_tcp_nat's one-connection server thread, on ::1."""

    def __init__(self, handler, backlog=8):
        self.lsock = socket.socket(socket.AF_INET6)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("::1", 0))
        self.lsock.listen(backlog)
        self.port = self.lsock.getsockname()[1]
        self.result = {}
        self.error = None
        self.thread = threading.Thread(target=self._run, args=(handler,), daemon=True)
        self.thread.start()


@pytest.fixture(params=[None, "plain", "tso"], ids=["send_ip", "stream", "stream_tso"])
def rig(request):
    r = Rig6(stream=request.param)
    yield r
    r.close()


def test_4mib_each_way_matches_sha256(rig):
    up = random.Random(61).randbytes(4 << 20)
    down = random.Random(62).randbytes(4 << 20)

    def handler(conn, res):
        t = threading.Thread(target=lambda: res.update(up=hashlib.sha256(recv_all(conn))
                                                       .digest()))
        t.start()
        conn.sendall(down)
        conn.shutdown(socket.SHUT_WR)
        t.join()

    srv = Server6(handler)
    g = rig.connect(srv.port, up)
    rig.run(lambda: g.flow.closed and g.shut_wr == 1)
    assert srv.join()["up"] == hashlib.sha256(up).digest()
    assert hashlib.sha256(g.sink).digest() == hashlib.sha256(down).digest()
    rig.run(lambda: rig.nat.flow_count() == 0)
    assert rig.nat.counters["tcp6_flows_opened"] == 1
    if rig.port_pair is not None:
        assert rig.nat.counters["tcp_stream_frames"] > 0  # the stream sender wrote IPv6
    if rig.port_pair is not None and rig.port.vnet_hdr_len:
        assert 4 in rig.gso_types  # GSO super-frames, VIRTIO_NET_HDR_GSO_TCPV6


def test_gateway_is_the_hosts_ipv6_loopback(rig):
    def handler(conn, res):
        res["peer"] = conn.getpeername()[0]
        conn.sendall(b"hi over IPv6")

    srv = Server6(handler)
    rig.remote = GATEWAY6
    g = rig.connect(srv.port)
    rig.run(lambda: g.shut_wr == 1)
    assert g.sink == b"hi over IPv6" and srv.join()["peer"] == "::1"


@pytest.mark.parametrize("mtu", [1500, 9000])
def test_synack_mss_leaves_room_for_the_ipv6_header(mtu):
    srv = socket.socket(socket.AF_INET6)
    srv.bind(("::1", 0))
    srv.listen()
    r = Rig6(config=Config(mtu=mtu))
    try:
        r.inject(Segment(GPORT, srv.getsockname()[1], 7, 0, SYN, 5000, b"", 1440, 7))
        for _ in range(100):
            r.loop.run_once(0.01)
            if r.to_guest:
                break
        ((src, dst, sa),) = r.take()
        assert (src, dst) == (LOOPBACK6, GUEST6)
        assert sa.flags == SYN | ACK and sa.mss == mtu - 60
    finally:
        r.close()
        srv.close()


def syn(port, seq=1000):
    return Segment(GPORT, port, seq, 0, SYN, 65535, b"", 1440, 7)


def _first_answer(r):
    for _ in range(200):
        r.loop.run_once(0.01)
        if r.to_guest:
            break
    return r.take()


def test_connect_refused_is_a_prompt_rst(rig):
    s = socket.socket(socket.AF_INET6)
    s.bind(("::1", 0))
    port = s.getsockname()[1]
    s.close()
    rig.inject(syn(port))
    ((_s, _d, r),) = _first_answer(rig)
    assert r.flags == RST | ACK and r.ack == 1001
    assert rig.nat.flow_count() == 0 and rig.nat.counters["tcp_connect_failed"] == 1


def test_a_destination_the_host_cannot_reach_is_a_prompt_rst():
    """No IPv6 route to the destination: connect() fails at once (ENETUNREACH), so the
    guest hears RST now, never a hang. Run in a child inside a new network namespace that
    has no route at all, so nothing could leave this machine whatever the host routes."""
    if os.geteuid() != 0:
        pytest.skip("a new network namespace needs root here")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWNET) != 0:
                os._exit(3)
            r = Rig6(policy=AllowAll())
            r.inject(syn(80), dst=ip6_to_bytes("2001:db8::1"))
            answers = _first_answer(r)
            ok = ([a[2].flags for a in answers] == [RST | ACK]
                  and r.nat.counters.get("tcp_connect_failed") == 1 and r.nat.flow_count() == 0)
            r.close()
            code = 0 if ok else 1
        finally:
            os._exit(code)
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_guests_own_link_and_the_default_policy_refuse():
    srv = socket.socket(socket.AF_INET6)
    srv.bind(("::1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    r = Rig6(policy=Policy(host_addrs=()))  # the host's loopback closed, as by default
    try:
        r.inject(syn(port), dst=GATEWAY6)
        r.inject(syn(port, seq=5), dst=ip6_to_bytes("fd00::99"))
        r.inject(syn(port, seq=6), dst=ip6_to_bytes("fe80::1"))
        answers = r.take()
        assert [a[2].flags for a in answers] == [RST | ACK] * 3
        c = r.nat.counters
        assert c["tcp_denied"] == 1 and c["tcp_unreachable"] == 2 and r.nat.flow_count() == 0
    finally:
        r.close()
        srv.close()


def test_unknown_flows_and_bad_checksums(rig):
    rig.inject(Segment(GPORT, 80, 5, 777, ACK, 100, b"data"))
    ((src, dst, r),) = rig.take()
    assert (src, dst, r.flags, r.seq) == (LOOPBACK6, GUEST6, RST, 777)
    raw = bytearray(segment_bytes6(syn(80)))
    raw[16] ^= 0xFF
    rig.nat.guest_segment(GUEST6, LOOPBACK6, memoryview(raw))
    # An IPv4 pseudo-header would not make this segment valid either.
    good = segment_bytes6(syn(80))
    assert fastpath.tcp_checksum(GUEST6[:4], LOOPBACK6[:4], good) != 0
    assert rig.take() == [] and rig.nat.counters["tcp_bad_checksum"] == 1


def test_forward_on_the_hosts_ipv6_loopback_reaches_the_guest_over_ipv4():
    r = v4.Rig()
    try:
        r.nat.add_forward("::1", 0, 8080)
        ((host, port),) = r.nat.listener_addresses()
        assert host == "::1"
        result = {}

        def client():
            with socket.create_connection(("::1", port)) as c:
                c.sendall(b"over v6")
                c.shutdown(socket.SHUT_WR)
                result["echo"] = recv_all(c)

        t = threading.Thread(target=client, daemon=True)
        t.start()
        for _ in range(1000):
            r.loop.run_once(0.01)
            if r.to_guest:
                break
        ((src, dst, s),) = r.take()
        assert (src, dst, s.dst_port, s.flags) == (v4.GATEWAY, v4.GUEST, 8080, SYN)
        flow = TcpFlow.accept(s, 0xFFFFFFF0, r.loop.now, mss=1460)
        g = v4.Endpoint(flow, b"", eof=False)
        r.guests[8080] = g
        r.remote = v4.GATEWAY
        g.handle(flow.host_connected(r.loop.now))
        r.run(lambda: g.shut_wr == 1)
        assert bytes(g.sink) == b"over v6"
        g.src = memoryview(b"back")
        g.eof = True
        r.run(lambda: "echo" in result or not t.is_alive())
        t.join(10)
        assert result["echo"] == b"back"
        r.run(lambda: r.nat.flow_count() == 0)
    finally:
        r.close()


def test_flow_stats_show_ipv6_addresses(rig):
    def handler(conn, res):
        conn.recv(10)

    srv = Server6(handler)
    g = rig.connect(srv.port, b"x", eof=False)
    rig.run(lambda: g.flow.state is TcpState.ESTABLISHED)
    (stats,) = rig.nat.flow_stats()
    assert stats["guest"] == ("fd00::100", g.flow.port) and stats["remote"][0] == "::1"
    rig.inject(Segment(g.flow.port, srv.port, g.flow.snd_nxt, g.flow.rcv_nxt, RST, 0))
    srv.join()
    assert NatConfig().ipv6
