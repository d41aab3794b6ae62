"""The TCP relay's per-segment cost (pytest-benchmark).

    VOIDBOX_ONLY=_slirp .venv/bin/python setup.py -q build_ext --inplace   # once
    .venv/bin/pytest bench/bench_tcp.py --benchmark-only -q

- checksum and packet building for a full 1460-byte segment, compiled voidbox._slirp beside
  the pure twin voidbox.net._slirp_py;
- parse_segment of a data segment;
- one guest data segment through TcpCore.guest_segment and delivered (the sans-I/O core:
  the raw segment in, its ACK held back by emit as the relay does), compiled voidbox._tcp
  beside the pure twin voidbox.net.tcp, and through TcpFlow (the tests' list interface);
- one guest data segment through TcpNat.guest_segment into a real host socket on 127.0.0.1
  (checksum, parse, core, send(), ACK built and handed to send_ip): the relay's guest->host
  cost per segment. A thread drains the host side.

Whole-NAT throughput against slirp4netns and pasta is bench/net_compare.py.
"""

from __future__ import annotations

import importlib
import select
import socket
import struct
import threading

import pytest

from voidbox.net import _slirp_py
from voidbox.net import tcp as _tcp_py
from voidbox.net.tcp import (
    A_DELIVER,
    ACK,
    SYN,
    Segment,
    TcpFlow,
    TcpState,
    parse_segment,
    segment_bytes,
)

try:
    _compiled = importlib.import_module("voidbox._slirp")
except ImportError:  # not built
    _compiled = None
try:
    _tcp_compiled = importlib.import_module("voidbox._tcp")
except ImportError:  # not built
    _tcp_compiled = None

GUEST = bytes([10, 0, 2, 15])
REMOTE = bytes([127, 0, 0, 1])
MSS = 1460
PAYLOAD = bytes(range(256)) * 6  # 1536 bytes, cut to MSS below

IMPLS = [pytest.param(_slirp_py, id="pure"),
         pytest.param(_compiled, id="cython",
                      marks=pytest.mark.skipif(_compiled is None, reason="_slirp not built"))]
CORES = [pytest.param(_tcp_py, id="pure"),
         pytest.param(_tcp_compiled, id="cython",
                      marks=pytest.mark.skipif(_tcp_compiled is None, reason="_tcp not built"))]


def _segment_bytes(impl, seq: int, ack: int, flags: int, payload: bytes,
                   options: bytes = b"", sport: int = 40000, dport: int = 80) -> bytes:
    buf = bytearray(2048)
    n = impl.build_ipv4_tcp(buf, GUEST, REMOTE, 0, sport, dport, seq, ack, flags, 65535,
                            options, payload)
    return bytes(buf[20:n])


@pytest.mark.parametrize("impl", IMPLS)
def test_tcp_checksum_1460(benchmark, impl):
    seg = _segment_bytes(_slirp_py, 1, 1, ACK, PAYLOAD[:MSS])
    assert benchmark(impl.tcp_checksum, GUEST, REMOTE, seg) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_build_ipv4_tcp_1460(benchmark, impl):
    out = bytearray(2048)
    payload = memoryview(PAYLOAD)[:MSS]
    n = benchmark(impl.build_ipv4_tcp, out, REMOTE, GUEST, 1, 80, 40000, 5, 7, ACK, 1000, b"",
                  payload)
    assert n == 20 + 20 + MSS


def test_parse_segment_1460(benchmark):
    seg = memoryview(_segment_bytes(_slirp_py, 1, 1, ACK, PAYLOAD[:MSS]))
    assert len(benchmark(parse_segment, seg).payload) == MSS


@pytest.mark.parametrize("impl", CORES)
def test_core_guest_data_segment(benchmark, impl):
    core = impl.TcpCore(80, 40000, 5000, mss=MSS)
    core.open_passive(segment_bytes(Segment(40000, 80, 1000, 0, SYN, 65535, b"", MSS, 7)), 0.0)
    core.host_connected(0.0)
    core.guest_segment(segment_bytes(Segment(40000, 80, 1001, 5001, ACK, 65535)), 0.0)
    core.out_segments()
    assert core.state is TcpState.ESTABLISHED
    core.rcv_wnd = 1 << 30
    raw = bytearray(segment_bytes(Segment(40000, 80, 1001, 5001, ACK, 65535, PAYLOAD[:MSS])))
    pkt = bytearray(2048)
    state = {"seq": 1001}

    def one():
        struct.pack_into("!I", raw, 4, state["seq"])
        if core.guest_segment(raw, 0.0) & A_DELIVER:
            core.delivered(core.deliver_len, 0.0)
        core.emit(pkt, 14, REMOTE, GUEST, 1, False, None)  # the ACK is held back
        state["seq"] = (state["seq"] + MSS) & 0xFFFFFFFF

    benchmark(one)
    assert core.rcv_nxt == state["seq"] and core.ack_due


def test_flow_wrapper_guest_data_segment(benchmark):
    syn = Segment(40000, 80, 1000, 0, SYN, 65535, b"", MSS, 7)
    flow = TcpFlow.accept(syn, 5000, 0.0, mss=MSS)
    flow.host_connected(0.0)
    flow.guest_segment(Segment(40000, 80, 1001, 5001, ACK, 65535), 0.0, None)
    assert flow.state is TcpState.ESTABLISHED
    payload = memoryview(PAYLOAD)[:MSS]
    state = {"seq": 1001}

    def one():
        seg = Segment(40000, 80, state["seq"], 5001, ACK, 65535, payload)
        state["seq"] = (state["seq"] + MSS) & 0xFFFFFFFF
        return flow.guest_segment(seg, 0.0, len)

    benchmark(one)
    assert flow.rcv_nxt == state["seq"]


class _Loop:
    """The EventLoop contract, enough for one established flow (polled by hand)."""

    def __init__(self):
        self.ep = select.epoll()
        self.cbs = {}
        self.soon = []

    def watch(self, fd, events, cb, defer=False):
        if fd in self.cbs:
            self.ep.modify(fd, events)
        else:
            self.ep.register(fd, events)
        self.cbs[fd] = cb

    def unwatch(self, fd):
        if self.cbs.pop(fd, None) is not None:
            self.ep.unregister(fd)

    def time(self):
        return 0.0

    def call_at(self, when, cb):
        class T:
            def cancel(self):
                pass
        return T()

    def call_soon(self, cb):
        self.soon.append(cb)

    def poll(self, timeout=0.5):
        for fd, ev in self.ep.poll(timeout):
            self.cbs[fd](ev)


class _Config:
    guest_ip = "10.0.2.15"
    gateway_ip = "10.0.2.2"
    dns_ip = "10.0.2.3"
    mtu = 1500
    max_flows = 16
    max_conn_rate = None

    def translate(self, ip):
        return ip


    def host_endpoint(self, ip, port):
        return ip, port


class _Allow:
    def allows(self, proto, ip, port, guest_dst=None):
        return True


def test_nat_guest_data_segment_to_host_socket(benchmark):
    from voidbox.net import fastpath
    from voidbox.net.tcp_nat import TcpNat

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    port = lsock.getsockname()[1]
    received = [0]

    def drain():
        conn, _ = lsock.accept()
        with conn:
            while True:
                try:
                    b = conn.recv(1 << 20)
                except ConnectionResetError:  # nat.close() resets its flows
                    return
                if not b:
                    return
                received[0] += len(b)

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    loop = _Loop()
    out: list[bytes] = []
    nat = TcpNat(loop, out.append, _Allow(), _Config())
    impl = fastpath.impl
    nat.guest_segment(GUEST, REMOTE, memoryview(_segment_bytes(impl, 1000, 0, SYN, b"",
                                                               b"\x02\x04\x05\xb4", dport=port)))
    while not out:
        loop.poll()
    synack = parse_segment(memoryview(out.pop())[20:])
    state = {"seq": 1001, "ack": (synack.seq + 1) & 0xFFFFFFFF}
    nat.guest_segment(GUEST, REMOTE, memoryview(_segment_bytes(impl, 1001, state["ack"], ACK,
                                                               b"", dport=port)))
    (flow,) = nat.flows.values()
    payload = PAYLOAD[:MSS]

    def one():
        raw = _segment_bytes(impl, state["seq"], state["ack"], ACK, payload, dport=port)
        nat.guest_segment(GUEST, REMOTE, memoryview(raw))
        out.clear()
        if flow.want_out:  # the drain thread fell behind: let EPOLLOUT reopen the window
            loop.poll(0.5)
        state["seq"] = flow.core.rcv_nxt

    benchmark.pedantic(one, rounds=2000, iterations=1, warmup_rounds=50)
    nat.close()
    t.join(10)
    lsock.close()
    assert received[0] == (state["seq"] - 1001) & 0xFFFFFFFF
