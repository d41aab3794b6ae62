"""The TCP relay (voidbox.net.tcp_nat) between a guest endpoint and real host sockets.

The guest is voidbox's own sans-I/O TcpFlow (see test_tcp.Endpoint) exchanging serialized
IPv4 packets with TcpNat; the host side is a real server on 127.0.0.1 run by a thread.
The loop is `StepLoop`: real epoll for fds, a fake clock for timers, and a count of fd
callbacks so tests can assert the relay never spins.
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import itertools
import os
import random
import select
import socket
import struct
import threading
import time

import pytest

from tests.unit.test_tcp import Endpoint
from voidbox.eventloop import WATCH_FAILED
from voidbox.net import fastpath, tcp_nat
from voidbox.net.config import NatConfig
from voidbox.net.tcp import (
    ACK,
    FIN,
    RST,
    SYN,
    Segment,
    TcpFlow,
    TcpState,
    parse_segment,
    seq_add,
)
from voidbox.net.tcp_nat import TcpNat

GUEST = bytes([10, 0, 2, 15])
GATEWAY = bytes([10, 0, 2, 2])
REMOTE = bytes([127, 0, 0, 1])
GPORT = 40000


class StepLoop:
    """EventLoop's contract with a test-driven clock; fds are polled for real."""

    def __init__(self):
        self.ep = select.epoll()
        self.cbs: dict[int, object] = {}
        self.ev: dict[int, int] = {}
        self.now = 1000.0
        self.timers: list = []
        self.seq = itertools.count()
        self.ready: collections.deque = collections.deque()
        self.fd_calls = 0
        self.fail_deferred = False
        self.failed: list[int] = []  # refused deferred watches not yet unwatched

    def watch(self, fd, events, callback, defer=False):
        # defer: registered at once all the same (this loop's turns are driven by hand),
        # unless fail_deferred: then refused as EventLoop reports a registration the kernel
        # refused (ENOMEM, max_user_watches): EPOLLERR | WATCH_FAILED to the callback in
        # the next turn,
        # the entry kept until the caller unwatches.
        if defer and self.fail_deferred:
            self.failed.append(fd)
            self.cbs[fd] = callback
            self.ev[fd] = events
            self.ready.append(lambda: self.cbs.get(fd) is callback
                              and callback(select.EPOLLERR | WATCH_FAILED))
            return
        if fd in self.cbs:
            if self.ev[fd] != events:
                self.ep.modify(fd, events)
        else:
            self.ep.register(fd, events)
        self.cbs[fd] = callback
        self.ev[fd] = events

    def unwatch(self, fd):
        if self.cbs.pop(fd, None) is not None:
            del self.ev[fd]
            if fd in self.failed:
                self.failed.remove(fd)
                return
            try:
                self.ep.unregister(fd)
            except OSError:
                pass

    def time(self):
        return self.now

    class Timer:
        def __init__(self, when, cb):
            self.when, self.cb, self.cancelled = when, cb, False

        def cancel(self):
            self.cancelled = True

    def call_at(self, when, callback):
        t = self.Timer(when, callback)
        heapq.heappush(self.timers, (when, next(self.seq), t))
        return t

    def call_soon(self, callback):
        self.ready.append(callback)

    def next_timer(self):
        while self.timers and self.timers[0][2].cancelled:
            heapq.heappop(self.timers)
        return self.timers[0][0] if self.timers else None

    def run_once(self, timeout=0.0):
        for fd, ev in self.ep.poll(timeout):
            cb = self.cbs.get(fd)
            if cb is not None:
                self.fd_calls += 1
                cb(ev)
        for _ in range(len(self.ready)):
            self.ready.popleft()()
        while self.timers and self.timers[0][0] <= self.now:
            _, _, t = heapq.heappop(self.timers)
            if not t.cancelled:
                t.cancelled = True
                t.cb()

    def close(self):
        self.ep.close()


class AllowAll:
    def __init__(self, deny=()):
        self.deny = set(deny)
        self.calls = []

    def allows(self, proto, dst_ip, dst_port, guest_dst=None):
        self.calls.append((proto, dst_ip, dst_port))
        return (dst_ip, dst_port) not in self.deny


def Config(mtu=1500, max_flows=65536, max_conn_rate=None) -> NatConfig:
    return NatConfig(mtu=mtu, max_flows=max_flows, max_conn_rate=max_conn_rate)


def parse_packet(pkt: bytes):
    assert fastpath.inet_checksum(pkt[:20]) == 0
    total = struct.unpack_from("!H", pkt, 2)[0]
    assert total == len(pkt) and pkt[9] == 6
    src, dst = pkt[12:16], pkt[16:20]
    assert fastpath.tcp_checksum(src, dst, pkt[20:]) == 0
    return src, dst, parse_segment(memoryview(pkt)[20:])


def segment_bytes(seg: Segment, src=GUEST, dst=REMOTE) -> bytes:
    buf = bytearray(70000)
    n = fastpath.build_ipv4_tcp(buf, src, dst, 0, seg.src_port, seg.dst_port, seg.seq,
                                seg.ack, seg.flags, seg.window, seg.options(), seg.payload)
    return bytes(buf[20:n])


ETH_TO_GUEST = bytes.fromhex("525400123456" "525400000002" "0800")
VNET_HDR = struct.Struct("<BBHHHH")  # virtio 1.2 §5.1.6 struct virtio_net_hdr
VNET_HDR_LEN = 10


def complete_partial_checksum(pkt: bytearray) -> None:
    """What the receiver of a NEEDS_CSUM frame does: checksum from csum_start on, with the
    pseudo-header sum already in the field (virtio 1.2 §5.1.6.2)."""
    tcp = memoryview(pkt)[20:]
    src, dst = bytes(pkt[12:16]), bytes(pkt[16:20])
    pseudo = struct.unpack_from("!H", tcp, 16)[0]
    struct.pack_into("!H", tcp, 16, 0)
    full = fastpath.tcp_checksum(src, dst, tcp)
    assert pseudo != 0  # the sender filled the field in
    struct.pack_into("!H", tcp, 16, full)


class Rig:
    """TcpNat on a StepLoop, with the guest's packets queued both ways (no re-entrancy).

    stream="plain" or "tso" attaches a FramePort (set_stream_port) on a datagram socketpair
    standing in for the TAP, without or with virtio_net_hdr and GSO: host data then reaches
    the guest as frames read from the pair, as it does from a real TAP.
    """

    guest = GUEST  # the guest's address: every segment to it goes there

    def __init__(self, policy=None, config=None, stream=None):
        self.loop = StepLoop()
        self.to_guest: list[bytes] = []
        self.policy = policy or AllowAll()
        self.nat = TcpNat(self.loop, self.to_guest.append, self.policy, config or Config())
        self.guests: dict[int, Endpoint] = {}  # by guest port
        self.remote = REMOTE
        self.drop = None  # drop(packet) -> True loses a packet on its way to the guest
        self.port_pair = None
        self.blocked = 0
        if stream:
            ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            ours.setblocking(False)
            peer.setblocking(False)
            self.port_pair = (ours, peer)
            tso = stream == "tso"
            self.port = fastpath.FramePort(ours.fileno(), VNET_HDR_LEN if tso else 0, tso=tso)
            self.nat.set_stream_port(self.port, lambda: ETH_TO_GUEST, self._port_blocked)

    def _port_blocked(self):
        # As TapIO does: EPOLLOUT on the port's fd, then port_writable().
        self.blocked += 1
        fd = self.port_pair[0].fileno()

        def writable(_ev):
            self.loop.unwatch(fd)
            self.nat.port_writable()
        self.loop.watch(fd, select.EPOLLOUT, writable)

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
                flags, gso_type, _hl, gso_size, start, off = VNET_HDR.unpack_from(raw)
                raw = raw[VNET_HDR_LEN:]
                assert flags == 1 and (start, off) == (34, 16)
                assert gso_type == 0 or gso_size > 0
            assert raw[:14] == ETH_TO_GUEST
            pkt = bytearray(raw[14:])
            if self.port.vnet_hdr_len:
                complete_partial_checksum(pkt)
            self.to_guest.append(bytes(pkt))

    def inject(self, seg: Segment, dst=None, src=GUEST):
        self.nat.guest_segment(src, dst or self.remote, memoryview(segment_bytes(seg, src,
                                                                                 dst or self.remote)))

    def take(self):
        self._read_port()
        out = [parse_packet(p) for p in self.to_guest
               if self.drop is None or not self.drop(p)]
        self.to_guest.clear()
        return out

    def connect(self, port: int, data: bytes = b"", eof=True, iss=None, **kw) -> Endpoint:
        flow, acts = TcpFlow.connect(GPORT + len(self.guests), port,
                                     iss if iss is not None else random.getrandbits(32),
                                     self.loop.now, mss=1460, **kw)
        ep = Endpoint(flow, data, eof=eof)
        ep.handle(acts)
        self.guests[flow.port] = ep
        return ep

    def step(self, timeout=0.002) -> bool:
        moved = False
        self.loop.run_once(timeout)
        for _src, dst, seg in self.take():
            assert dst == self.guest
            ep = self.guests.get(seg.dst_port)
            if ep is None:
                continue
            ep.receive(seg, self.loop.now)
            moved = True
        for ep in self.guests.values():
            ep.pump(self.loop.now)
            batch, ep.outbox = ep.outbox, []
            for seg in batch:
                moved = True
                self.inject(seg)
        return moved

    def run(self, until, max_steps=200000, idle_steps=50, fake_seconds=120.0):
        """Step until until() holds. Bounded by steps and by fake time, so a stuck flow
        fails the test instead of hanging it."""
        idle = 0
        start = self.loop.now
        for _ in range(max_steps):
            if until():
                return
            assert self.loop.now - start <= fake_seconds, f"no progress: {self.describe()}"
            if self.step():
                idle = 0
                continue
            idle += 1
            if idle >= idle_steps:
                # Nothing moved for a while: let the earliest timer (ours or the guest's) fire.
                ds = [d for d in [self.loop.next_timer()] +
                      [ep.flow.deadline for ep in self.guests.values()] if d is not None]
                if ds:
                    self.loop.now = max(self.loop.now, min(ds))
                    for ep in self.guests.values():
                        ep.handle(ep.flow.on_timer(self.loop.now))
                idle = 0
        raise AssertionError("relay did not reach the expected state")

    def describe(self) -> str:
        out = [f"counters={self.nat.counters}"]
        for f in self.nat.flows.values():
            c = f.core
            out.append(f"nat {c.state.value} una={c.snd_una} nxt={c.snd_nxt} max={c.snd_max} "
                       f"wnd={c.snd_wnd} inflight={c.in_flight()} rto={c.rto} "
                       f"deadline={c.deadline} events={f.events} eof={f.host_eof} "
                       f"peek_off={f.peek_off} rcv_nxt={c.rcv_nxt} rcv_wnd={c.rcv_wnd}")
        for ep in self.guests.values():
            c = ep.flow
            out.append(f"guest {c.state.value} rcv_nxt={c.rcv_nxt} got={len(ep.sink)} "
                       f"una={c.snd_una} nxt={c.snd_nxt} deadline={c.deadline}")
        return "; ".join(out)

    def close(self):
        self.nat.close()
        self.loop.close()
        for s in self.port_pair or ():
            s.close()


class Server:
    """A real TCP server on 127.0.0.1, one connection, run by a thread."""

    def __init__(self, handler, backlog=8):
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(backlog)
        self.port = self.lsock.getsockname()[1]
        self.result = {}
        self.error = None
        self.thread = threading.Thread(target=self._run, args=(handler,), daemon=True)
        self.thread.start()

    def _run(self, handler):
        try:
            conn, _ = self.lsock.accept()
            with conn:
                handler(conn, self.result)
        except Exception as e:  # surfaced by join()
            self.error = e

    def join(self):
        self.thread.join(30)
        assert not self.thread.is_alive(), "server thread hung"
        self.lsock.close()
        if self.error:
            raise self.error
        return self.result


def recv_all(conn) -> bytes:
    chunks = []
    while True:
        b = conn.recv(1 << 20)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(params=[None, "plain", "tso"], ids=["send_ip", "stream", "stream_tso"])
def rig(request):
    """Host data to the guest through send_ip, or a FramePort (see Rig)."""
    r = Rig(stream=request.param)
    yield r
    r.close()


# ---- bulk transfers ---------------------------------------------------------------------

class CountingStruct:
    """Stands in for tcp_nat._MEMINFO to count the SO_MEMINFO reads."""

    def __init__(self, real):
        self.real = real
        self.size = real.size
        self.calls = 0

    def unpack(self, raw):
        self.calls += 1
        return self.real.unpack(raw)


@pytest.mark.parametrize("size", [1 << 20, 4 << 20])
def test_upload_to_host_matches_sha256(rig, size, monkeypatch):
    data = random.Random(size).randbytes(size)
    meminfo = CountingStruct(tcp_nat._MEMINFO)
    monkeypatch.setattr(tcp_nat, "_MEMINFO", meminfo)

    def handler(conn, res):
        res["sha"] = hashlib.sha256(recv_all(conn)).hexdigest()

    srv = Server(handler)
    g = rig.connect(srv.port, data)
    rig.run(lambda: g.flow.closed or g.flow.state is TcpState.TIME_WAIT)
    assert srv.join()["sha"] == hashlib.sha256(data).hexdigest()
    assert g.consumed == size
    rig.run(lambda: rig.nat.flow_count() == 0)
    # The window's getsockopt is cached (WINDOW_CACHE_S), not issued per segment; the fake
    # clock only moves when the link is idle, so a handful of reads cover the transfer.
    segments = size // 1460
    assert 0 < meminfo.calls < segments // 100
    # The segments of one turn went to the host together: far fewer sends than segments.
    assert 0 < rig.nat.counters["tcp_host_sends"] < segments // 4


def test_batched_data_refused_in_part_is_not_acknowledged(rig):
    """Three in-order segments in one turn; the host takes only the first: the turn's ACK
    covers exactly that, the window closes, and the rest is left for retransmission."""
    def handler(conn, res):
        try:
            res["data"] = conn.recv(1000)
            conn.recv(1000)
        except ConnectionResetError:
            pass

    srv = Server(handler)
    g = rig.connect(srv.port, eof=False)
    rig.run(lambda: g.flow.state is TcpState.ESTABLISHED and not g.outbox
            and not rig.to_guest)
    (flow,) = rig.nat.flows.values()
    real = flow.sock

    class Stingy:  # the host takes one buffer of a sendmsg, as a nearly full socket does
        def __getattr__(self, name):
            return getattr(real, name)

        def sendmsg(self, bufs):
            return real.send(bufs[0])

    flow.sock = Stingy()
    rcv, seq, ack = flow.core.rcv_nxt, g.flow.snd_nxt, g.flow.rcv_nxt
    for i in range(3):
        rig.inject(Segment(GPORT, srv.port, (seq + 100 * i) & 0xFFFFFFFF, ack, ACK, 1000,
                           bytes([65 + i]) * 100))
    assert rig.take() == [] and flow.tx_len == 300  # nothing sent or acknowledged yet
    rig.loop.run_once(0)
    ((_s, _d, a),) = rig.take()
    assert a.flags == ACK and a.ack == (rcv + 100) & 0xFFFFFFFF and a.window == 0
    assert flow.core.rcv_nxt == a.ack and rig.nat.counters["tcp_bytes_to_host"] == 100
    assert flow.events & select.EPOLLOUT and rig.nat.counters["tcp_host_eagain"] == 1
    flow.sock = real
    rig.inject(Segment(GPORT, srv.port, (seq + 100) & 0xFFFFFFFF, ack, RST, 0))
    assert srv.join()["data"] == b"A" * 100


@pytest.mark.parametrize("size", [1 << 20, 4 << 20])
def test_download_from_host_matches_sha256(rig, size, monkeypatch):
    data = random.Random(size + 1).randbytes(size)
    consumes = []
    real_consume = rig.nat._consume
    monkeypatch.setattr(rig.nat, "_consume", lambda f, n: consumes.append(n) or
                        real_consume(f, n))
    acks = []
    real_inject = rig.inject

    def inject(seg, *a, **kw):
        if seg.flags & ACK and not seg.payload:
            acks.append(seg.ack)
        real_inject(seg, *a, **kw)

    monkeypatch.setattr(rig, "inject", inject)

    def handler(conn, res):
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        res["rest"] = recv_all(conn)

    srv = Server(handler)
    g = rig.connect(srv.port)
    rig.run(lambda: g.shut_wr == 1 and g.flow.closed)
    assert hashlib.sha256(g.sink).digest() == hashlib.sha256(data).digest()
    assert srv.join()["rest"] == b""
    rig.run(lambda: rig.nat.flow_count() == 0)
    assert rig.nat.counters["tcp_bytes_to_guest"] == size
    # Every acknowledged byte was dropped from the host socket exactly once, and the ACKs
    # a turn brings are dropped together: fewer drops than ACKs.
    assert sum(consumes) == size
    assert len(consumes) < len(set(acks)) // 2


def test_batched_data_on_a_broken_host_socket_resets_both_sides(rig):
    def handler(conn, res):
        try:
            res["data"] = conn.recv(1000)
            res["eof"] = conn.recv(1000)
        except ConnectionResetError:
            res["reset"] = True

    srv = Server(handler)
    g = rig.connect(srv.port, eof=False)
    rig.run(lambda: g.flow.state is TcpState.ESTABLISHED and not g.outbox
            and not rig.to_guest)
    (flow,) = rig.nat.flows.values()
    real = flow.sock

    class Broken:  # send fails as on a connection the host reset
        def __getattr__(self, name):
            return getattr(real, name)

        def sendmsg(self, bufs):
            raise ConnectionResetError(104, "Connection reset by peer")

    flow.sock = Broken()
    seq, ack = g.flow.snd_nxt, g.flow.rcv_nxt
    for i in range(2):
        rig.inject(Segment(GPORT, srv.port, (seq + 10 * i) & 0xFFFFFFFF, ack, ACK, 1000,
                           b"z" * 10))
    rig.loop.run_once(0)
    rig.loop.run_once(0)
    flow.sock = real  # the flow is gone; its socket was closed with RST
    assert rig.nat.flow_count() == 0 and rig.nat.counters["tcp_host_reset"] == 1
    segs = [seg for _s, _d, seg in rig.take()]
    assert segs and segs[-1].flags & RST
    # Nothing the host refused was acknowledged on the way.
    assert all((seg.ack - seq) & 0xFFFFFFFF == 0 for seg in segs if seg.flags & ACK)
    assert srv.join().get("reset") is True


def test_acknowledged_bytes_leave_the_host_socket_at_the_end_of_the_turn(rig):
    data = bytes(range(256)) * 40

    def handler(conn, res):
        conn.sendall(data)
        try:
            conn.recv(1)
        except ConnectionResetError:
            pass

    srv = Server(handler)
    g = rig.connect(srv.port, eof=False)
    rig.run(lambda: len(g.sink) == len(data) and not g.outbox and not rig.to_guest)
    (flow,) = rig.nat.flows.values()
    # The guest's last ACK was injected after the loop's turn: its bytes wait for the next.
    assert flow.core.in_flight() == 0 and flow.unconsumed > 0
    rig.loop.run_once(0)
    assert flow.unconsumed == 0
    # All of it acknowledged and dropped: a peek finds nothing left to send.
    with pytest.raises(BlockingIOError):
        flow.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    rig.inject(Segment(GPORT, srv.port, g.flow.snd_nxt, g.flow.rcv_nxt, RST, 0))
    srv.join()


@pytest.mark.slow
def test_16mib_each_way(rig):
    up = random.Random(5).randbytes(16 << 20)
    down = random.Random(6).randbytes(16 << 20)

    def handler(conn, res):
        t = threading.Thread(target=lambda: res.update(up=hashlib.sha256(recv_all(conn))
                                                       .digest()))
        t.start()
        conn.sendall(down)
        conn.shutdown(socket.SHUT_WR)
        t.join()

    srv = Server(handler)
    g = rig.connect(srv.port, up)
    rig.run(lambda: g.flow.closed and g.shut_wr == 1)
    assert srv.join()["up"] == hashlib.sha256(up).digest()
    assert hashlib.sha256(g.sink).digest() == hashlib.sha256(down).digest()


@pytest.mark.parametrize("peek_off", [True, False], ids=["SO_PEEK_OFF", "peek-from-0"])
def test_lossy_link_recovers(rig, peek_off):
    """2% of the data packets to the guest are lost; the relay retransmits from the socket,
    with SO_PEEK_OFF and with the fallback for kernels without it."""
    if not peek_off:
        rig.nat.peek_off_supported = False
    data = random.Random(7).randbytes(1 << 20)

    def handler(conn, res):
        conn.sendall(data)

    srv = Server(handler)
    g = rig.connect(srv.port)
    rng = random.Random(11)  # not periodic: a fixed period can align with every rewind
    dropped = []

    def drop(pkt):
        # 2% of MSS-sized packets; GSO super-frames (16 per MiB) are lost more often.
        lose = len(pkt) > 60 and rng.random() < (0.2 if len(pkt) > 10000 else 0.02)
        dropped.append(lose)
        return lose

    rig.drop = drop
    rig.run(lambda: g.shut_wr == 1)
    assert bytes(g.sink) == data
    assert any(dropped)
    assert rig.nat.counters.get("tcp_retransmits", 0) > 0
    (flow,) = rig.nat.flows.values() or [None]
    srv.join()
    if not peek_off:
        assert flow is None or flow.peek_off == 0  # the fallback never sets SO_PEEK_OFF


# ---- flow control -----------------------------------------------------------------------

def assert_no_spinning(rig, turns: int = 50) -> None:
    """Loop turns with nothing to do for the relay fire (almost) no fd callbacks: a
    spinning relay fires one per turn. Behind a full loopback socket the kernel may still
    free room once or twice meanwhile (a zero-window probe answered, the receiver
    collapsing its queue): one EPOLLOUT each, handled, not a spin."""
    before = rig.loop.fd_calls
    for _ in range(turns):
        rig.loop.run_once(0)
    assert rig.loop.fd_calls - before <= 2


def _slow_reader(go, data_len):
    def handler(conn, res):
        go.wait(60)
        res["sha"] = hashlib.sha256(recv_all(conn)).hexdigest()
    return handler


def test_host_backpressure_closes_the_guest_window_without_spinning(rig):
    data = random.Random(8).randbytes(8 << 20)
    go = threading.Event()
    srv = Server(_slow_reader(go, len(data)))
    g = rig.connect(srv.port, data)
    # The server does not read: the free send buffer, and with it our window, goes to 0.
    rig.run(lambda: g.flow.snd_wnd == 0 and g.consumed > 0, idle_steps=10 ** 9,
            max_steps=20000)
    (flow,) = rig.nat.flows.values()
    assert flow.core.state is TcpState.ESTABLISHED and g.consumed < len(data)
    assert_no_spinning(rig)
    go.set()
    rig.run(lambda: g.flow.closed or g.flow.state is TcpState.TIME_WAIT)
    assert srv.join()["sha"] == hashlib.sha256(data).hexdigest()


def test_full_host_socket_is_eagain_not_close(rig, monkeypatch):
    """Advertise far more than the socket takes: send() hits EAGAIN, only what it accepted
    is acknowledged, the flow stays up and the transfer completes by retransmission."""
    data = random.Random(12).randbytes(1 << 20)
    go = threading.Event()
    srv = Server(_slow_reader(go, len(data)))

    def lying_window(f, now, force=False, fresh=False):
        f.core.rcv_wnd = 0 if f.want_out else (8 << 20)

    monkeypatch.setattr(rig.nat, "_refresh_window", lying_window)
    monkeypatch.setattr(tcp_nat, "HOST_SNDBUF", 16 * 1024)
    g = rig.connect(srv.port, data)

    def host_full() -> bool:
        # A batched sendmsg can stop at the send buffer before the receiver's window is
        # full; the ACKs then free room once (one EPOLLOUT, a window update). Wait for the
        # state the test is about: EAGAIN and a socket that stays unwritable.
        if rig.nat.counters.get("tcp_host_eagain", 0) == 0 or not rig.nat.flows:
            return False
        (f,) = rig.nat.flows.values()
        p = select.poll()
        p.register(f.fd, select.POLLOUT)
        return bool(f.events & select.EPOLLOUT) and f.core.rcv_wnd == 0 and not p.poll(0)

    rig.run(host_full)
    (flow,) = rig.nat.flows.values()
    assert flow.core.state is TcpState.ESTABLISHED
    assert flow.events & select.EPOLLOUT and flow.core.rcv_wnd == 0
    # rcv_nxt (what every ACK carries) covers exactly what send() took, nothing more.
    acked = (flow.core.rcv_nxt - g.flow.iss - 1) & 0xFFFFFFFF
    assert acked == rig.nat.counters["tcp_bytes_to_host"]
    assert_no_spinning(rig)
    go.set()
    rig.run(lambda: g.flow.closed or g.flow.state is TcpState.TIME_WAIT)
    assert srv.join()["sha"] == hashlib.sha256(data).hexdigest()
    assert rig.nat.counters["tcp_bytes_to_host"] == len(data)  # nothing written twice


def test_guest_zero_window_stops_polling_then_resumes(rig):
    data = random.Random(9).randbytes(2 << 20)

    def handler(conn, res):
        conn.sendall(data)

    srv = Server(handler)
    g = rig.connect(srv.port)
    g.sink_cap = 100_000  # the guest application stops reading
    rig.run(lambda: len(g.sink) >= 100_000 and not rig.to_guest, idle_steps=10 ** 9,
            max_steps=100000)
    (flow,) = rig.nat.flows.values()
    assert flow.core.snd_wnd == 0
    assert flow.events == 0  # neither EPOLLIN nor EPOLLOUT while blocked on the guest
    before = rig.loop.fd_calls
    for _ in range(50):
        rig.loop.run_once(0)
    assert rig.loop.fd_calls == before
    # Zero-window probe on the timer (a timer may fire early and just re-arm).
    probes = []
    for _ in range(5):
        rig.loop.now = rig.loop.next_timer()
        rig.loop.run_once(0)
        probes = [seg for _s, _d, seg in rig.take() if not seg.payload]
        if probes:
            break
    assert probes and probes[0].flags == ACK
    assert probes[0].seq == (flow.core.snd_una - 1) & 0xFFFFFFFF
    g.sink_cap = None
    g.receive(probes[0], rig.loop.now)  # answered with an open window
    for seg in g.outbox:
        rig.inject(seg)
    g.outbox.clear()
    rig.run(lambda: len(g.sink) == len(data))
    assert bytes(g.sink) == data
    srv.join()


def test_window_advertised_from_host_send_buffer(rig):
    def handler(conn, res):
        recv_all(conn)

    srv = Server(handler)
    g = rig.connect(srv.port, b"", eof=False)
    rig.run(lambda: g.flow.state is TcpState.ESTABLISHED)
    (flow,) = rig.nat.flows.values()
    sndbuf = flow.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    assert 0 < flow.core.rcv_wnd <= sndbuf
    g.eof = True
    rig.run(lambda: g.flow.closed or g.flow.state is TcpState.TIME_WAIT)
    srv.join()


def test_new_flows_share_one_window_reading_and_draw_their_iss_from_a_pool(rig, monkeypatch):
    """A connected socket that was never written has every new socket's free send buffer:
    read once (SO_MEMINFO), not per connection. Initial sequence numbers come from one
    os.urandom draw per ISS_POOL flows, and still differ."""
    meminfo = CountingStruct(tcp_nat._MEMINFO)
    monkeypatch.setattr(tcp_nat, "_MEMINFO", meminfo)
    draws = []
    real_urandom = os.urandom
    monkeypatch.setattr(tcp_nat.os, "urandom", lambda n: draws.append(n) or real_urandom(n))

    def handler(conn, res):
        recv_all(conn)

    servers = [Server(handler) for _ in range(3)]
    guests = [rig.connect(srv.port, b"", eof=False) for srv in servers]
    rig.run(lambda: all(g.flow.state is TcpState.ESTABLISHED for g in guests))
    flows = list(rig.nat.flows.values())
    assert len(flows) == 3 and meminfo.calls == 1
    assert len({f.core.rcv_wnd for f in flows}) == 1 and flows[0].core.rcv_wnd > 0
    assert len({f.core.snd_una for f in flows}) == 3  # the ISSs (+1 for the SYN)
    assert draws == [4 * tcp_nat.ISS_POOL]
    for g in guests:
        g.eof = True
    rig.run(lambda: all(g.flow.closed or g.flow.state is TcpState.TIME_WAIT for g in guests))
    for srv in servers:
        srv.join()


# ---- half-close ---------------------------------------------------------------------------

def test_guest_fin_then_host_replies(rig):
    """Guest FIN only shuts the host's write side; the host's answer still reaches the guest."""
    def handler(conn, res):
        req = recv_all(conn)  # EOF = the guest's FIN became shutdown(SHUT_WR)
        conn.sendall(b"reply to " + req)

    srv = Server(handler)
    g = rig.connect(srv.port, b"request")
    rig.run(lambda: g.shut_wr == 1)
    assert bytes(g.sink) == b"reply to request"
    srv.join()
    rig.run(lambda: rig.nat.flow_count() == 0)


def test_host_eof_then_guest_keeps_sending(rig):
    def handler(conn, res):
        conn.sendall(b"banner")
        conn.shutdown(socket.SHUT_WR)
        res["got"] = recv_all(conn)

    srv = Server(handler)
    g = rig.connect(srv.port, b"", eof=False)
    rig.run(lambda: g.shut_wr == 1)
    assert bytes(g.sink) == b"banner"
    (flow,) = rig.nat.flows.values()
    assert flow.core.state is TcpState.FIN_WAIT_2
    g.src = memoryview(b"after the host's FIN" * 1000)
    g.eof = True
    rig.run(lambda: g.flow.closed or g.flow.state is TcpState.TIME_WAIT)
    assert srv.join()["got"] == b"after the host's FIN" * 1000


def _segments_to_guest(rig) -> list[Segment]:
    """From now on, every segment the NAT sends the guest, in order."""
    seen: list[Segment] = []
    take = rig.take

    def recording_take():
        out = take()
        seen.extend(seg for _src, _dst, seg in out)
        return out
    rig.take = recording_take
    return seen


def _guest_sends_then_closes(rig, port: int, data: bytes):
    """Connect, have `data` taken, then close the guest's side: (its endpoint, the NAT's
    flow, every segment to the guest from the FIN on, the FIN's sequence number)."""
    g = rig.connect(port, data, eof=False)
    rig.run(lambda: g.consumed == len(data))
    seen = _segments_to_guest(rig)
    fin_seq = g.flow.snd_nxt
    g.eof = True
    (flow,) = rig.nat.flows.values()
    return g, flow, seen, fin_seq


def _server_holding_its_side_open() -> tuple[Server, threading.Event]:
    """A server that reads to the guest's FIN, then keeps its side open until `go`."""
    go = threading.Event()

    def handler(conn, res):
        res["got"] = recv_all(conn)
        go.wait(10)

    return Server(handler), go


def test_guest_close_ends_in_three_segments_when_the_host_closes_too(rig):
    """The ACK of the guest's FIN waits for the host's FIN and rides on it: no lone ACK,
    even when the host closes some turns after the FIN came in."""
    go = threading.Event()

    def handler(conn, res):
        conn.sendall(conn.recv(64))
        res["rest"] = recv_all(conn)  # the guest's FIN
        assert go.wait(10)  # then the server closes, a few turns later

    srv = Server(handler)
    g = rig.connect(srv.port, b"ping", eof=False)
    rig.run(lambda: bytes(g.sink) == b"ping")
    seen = _segments_to_guest(rig)
    fin_seq = g.flow.snd_nxt
    g.eof = True
    (flow,) = rig.nat.flows.values()
    rig.run(lambda: flow.core.state is TcpState.CLOSE_WAIT)
    for _ in range(5):  # turns in which an unheld ACK would go out (no fake time passes)
        rig.step()
    assert seen == []
    go.set()
    # Patient: the fake clock must not jump to the held ACK's timer while the server
    # thread is still closing (a loaded machine may take well over 100 ms).
    rig.run(lambda: g.flow.state is TcpState.TIME_WAIT, idle_steps=5000)
    assert srv.join()["rest"] == b""
    assert [(s.flags, s.ack) for s in seen] == [(FIN | ACK, seq_add(fin_seq, 1))]
    assert "tcp_fin_acks_alone" not in rig.nat.counters
    rig.run(lambda: rig.nat.flow_count() == 0)


def test_guest_fin_is_acknowledged_alone_when_the_host_stays_open(rig):
    """A host that keeps its side open (a half-close) gets the guest's FIN acknowledged
    after FIN_ACK_DELAY_S, and its later data and FIN still reach the guest."""
    go = threading.Event()

    def handler(conn, res):
        res["got"] = recv_all(conn)
        assert go.wait(10)
        conn.sendall(b"late reply")

    srv = Server(handler)
    g = rig.connect(srv.port, b"request", eof=False)
    rig.run(lambda: g.consumed == len(b"request"))
    g.eof = True
    rig.run(lambda: g.flow.fin_seq is not None)
    fin_sent = rig.loop.now
    rig.run(lambda: g.flow.state is TcpState.FIN_WAIT_2)
    # Held no longer than FIN_ACK_DELAY_S (plus a 1 ms timer tick): the guest never had
    # to retransmit its FIN.
    assert rig.loop.now - fin_sent <= tcp_nat.FIN_ACK_DELAY_S + 0.001
    assert g.flow.retransmits == 0
    (flow,) = rig.nat.flows.values()
    assert flow.core.state is TcpState.CLOSE_WAIT and not flow.host_eof
    assert rig.nat.counters["tcp_fin_acks_alone"] == 1
    go.set()
    rig.run(lambda: g.flow.state is TcpState.TIME_WAIT)
    assert bytes(g.sink) == b"late reply"
    assert srv.join()["got"] == b"request"
    rig.run(lambda: rig.nat.flow_count() == 0)


def test_host_data_after_the_guests_fin_carries_the_held_ack(rig):
    """A half-close answered by data: the reply carries the FIN's ACK, and so does the
    host's FIN after it; nothing goes out alone."""
    go, go2 = threading.Event(), threading.Event()

    def handler(conn, res):
        res["got"] = recv_all(conn)
        assert go.wait(10)
        conn.sendall(b"reply")
        assert go2.wait(10)

    srv = Server(handler)
    g, flow, seen, fin_seq = _guest_sends_then_closes(rig, srv.port, b"req")
    rig.run(lambda: flow.core.state is TcpState.CLOSE_WAIT)
    for _ in range(3):
        rig.step()
    go.set()
    rig.run(lambda: bytes(g.sink) == b"reply", idle_steps=5000)
    for _ in range(3):
        rig.step()
    go2.set()
    rig.run(lambda: rig.nat.flow_count() == 0, idle_steps=5000)
    assert srv.join()["got"] == b"req"
    assert seen and all(s.ack == seq_add(fin_seq, 1) for s in seen)
    assert seen[-1].flags & FIN
    assert "tcp_fin_acks_alone" not in rig.nat.counters


def test_a_retransmitted_fin_while_held_gets_one_ack(rig):
    srv, go = _server_holding_its_side_open()
    g, flow, seen, fin_seq = _guest_sends_then_closes(rig, srv.port, b"x")
    rig.run(lambda: flow.ack_timer is not None)
    for _ in range(3):  # the guest's FIN again, as a retransmission would send it
        rig.inject(Segment(g.flow.port, srv.port, fin_seq, g.flow.rcv_nxt, FIN | ACK, 1000,
                           b""))
        rig.step()
    assert seen == []
    rig.run(lambda: g.flow.state is TcpState.FIN_WAIT_2)
    assert [(s.flags, s.ack) for s in seen] == [(ACK, seq_add(fin_seq, 1))]
    go.set()
    srv.join()
    rig.run(lambda: rig.nat.flow_count() == 0)


def test_a_held_fin_ack_is_dropped_with_its_flow(rig):
    """A guest RST while the FIN's ACK is held ends the flow and cancels the timer."""
    srv, go = _server_holding_its_side_open()
    g = rig.connect(srv.port, b"x", eof=True)
    rig.run(lambda: g.flow.fin_seq is not None and g.flow.state is TcpState.FIN_WAIT_1
            and any(f.ack_timer is not None for f in rig.nat.flows.values()))
    (flow,) = rig.nat.flows.values()
    timer = flow.ack_timer
    rig.inject(Segment(g.flow.port, srv.port, g.flow.snd_nxt, 0, RST, 0, b""))
    assert rig.nat.flow_count() == 0 and flow.ack_timer is None
    assert timer.cancelled
    go.set()
    srv.join()


def test_time_wait_is_reaped_and_fds_return(rig):
    base = open_fds()

    def handler(conn, res):
        conn.sendall(b"x")
        conn.shutdown(socket.SHUT_WR)
        recv_all(conn)

    srv = Server(handler)
    # The guest closes only once the NAT's FIN is in: the NAT closes first, so it is the
    # side that waits in TIME-WAIT (RFC 9293 §3.6).
    g = rig.connect(srv.port, b"y", eof=False)
    rig.run(lambda: g.flow.state is TcpState.CLOSE_WAIT)
    g.eof = True
    rig.run(lambda: rig.nat.flow_count() == 1 and
            next(iter(rig.nat.flows.values())).core.state is TcpState.TIME_WAIT)
    (flow,) = rig.nat.flows.values()
    assert flow.sock is None  # the host socket is closed as soon as both FINs are done
    deadline = flow.core.deadline
    # A timer armed earlier (the RTO) may fire first and re-arm for TIME-WAIT's end.
    for _ in range(5):
        if not rig.nat.flow_count():
            break
        rig.loop.now = rig.loop.next_timer()
        rig.loop.run_once(0)
    assert rig.nat.flow_count() == 0 and rig.loop.now >= deadline
    srv.join()
    assert open_fds() == base  # the NAT keeps no socket; the server has closed its own
    assert g.sink == b"x"


# ---- resets, refusals, policy ----------------------------------------------------------

def syn(port, seq=1000, sport=GPORT):
    return Segment(sport, port, seq, 0, SYN, 65535, b"", 1460, 7)


@pytest.mark.parametrize(("mtu", "wscale"), [(1500, 7), (9000, None), (65520, 3)])
def test_synack_options_follow_mtu_and_the_guests_offer(mtu, wscale):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    r = Rig(config=Config(mtu=mtu))
    try:
        r.inject(Segment(GPORT, srv.getsockname()[1], 7, 0, SYN, 5000, b"", 536, wscale))
        for _ in range(100):
            r.loop.run_once(0.01)
            if r.to_guest:
                break
        ((_s, _d, sa),) = r.take()
        assert sa.flags == SYN | ACK and sa.mss == mtu - 40
        # Our shift only when the guest offered one (RFC 7323 §2.2); SYN-ACK window unscaled.
        assert (sa.wscale is None) == (wscale is None)
        assert sa.window <= 0xFFFF
        (flow,) = r.nat.flows.values()
        assert flow.core.snd_mss == 536  # we never send segments above the guest's MSS
        assert flow.core.snd_wnd == 5000  # the guest's SYN window, unscaled
    finally:
        r.close()
        srv.close()


def test_connect_refused_is_rst(rig):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    rig.inject(syn(port, seq=0xFFFFFFFF))
    for _ in range(100):
        rig.loop.run_once(0.01)
        if rig.to_guest:
            break
    ((_s, _d, r),) = rig.take()
    assert r.flags == RST | ACK and r.ack == 0 and r.dst_port == GPORT
    assert rig.nat.flow_count() == 0
    assert rig.nat.counters["tcp_connect_failed"] == 1


def test_policy_denied_is_rst_and_counted():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    r = Rig(policy=AllowAll(deny={("127.0.0.1", port)}))
    try:
        r.inject(syn(port), dst=GATEWAY)  # the gateway is translated to 127.0.0.1
        ((_s, src, seg),) = [(a, b, c) for a, b, c in r.take()]
        assert seg.flags == RST | ACK and seg.ack == 1001
        assert r.policy.calls == [("tcp", "127.0.0.1", port)]
        assert r.nat.counters["tcp_denied"] == 1 and r.nat.flow_count() == 0
    finally:
        r.close()
        srv.close()


def test_gateway_is_host_loopback(rig):
    def handler(conn, res):
        conn.sendall(b"hi from the host")

    srv = Server(handler)
    rig.remote = GATEWAY
    g = rig.connect(srv.port)
    rig.run(lambda: g.shut_wr == 1)
    assert g.sink == b"hi from the host"
    srv.join()


def test_unknown_flow_gets_rst_but_rst_does_not(rig):
    rig.inject(Segment(GPORT, 80, 5, 777, ACK, 100, b"data"))
    ((src, dst, r),) = rig.take()
    assert (src, dst) == (REMOTE, GUEST)
    assert r.flags == RST and r.seq == 777
    rig.inject(Segment(GPORT, 80, 5, 777, RST, 0))
    assert rig.take() == []
    assert rig.nat.counters["tcp_rst_unknown_flow"] == 1


def test_bad_checksum_and_malformed_are_dropped(rig):
    raw = bytearray(segment_bytes(syn(80)))
    raw[16] ^= 0xFF
    rig.nat.guest_segment(GUEST, REMOTE, memoryview(raw))
    short = bytes(10)
    rig.nat.guest_segment(GUEST, REMOTE, memoryview(short))
    assert rig.take() == [] and rig.nat.flow_count() == 0
    assert rig.nat.counters["tcp_bad_checksum"] == 2 or (
        rig.nat.counters["tcp_bad_checksum"] == 1 and rig.nat.counters["tcp_malformed"] == 1)


def test_loopback_connect_answers_the_syn_at_once(rig):
    def handler(conn, res):
        try:
            conn.recv(10)
        except ConnectionResetError:
            pass

    srv = Server(handler)
    rig.inject(syn(srv.port, seq=42))
    # No loop turn in between: the connect to 127.0.0.1 finished inside connect().
    ((_s, _d, sa),) = rig.take()
    assert sa.flags == SYN | ACK and sa.ack == 43
    (flow,) = rig.nat.flows.values()
    assert not flow.connecting and rig.nat.counters["tcp_connect_immediate"] == 1
    rig.inject(Segment(GPORT, srv.port, 43, (sa.seq + 1) & 0xFFFFFFFF, RST, 0))
    srv.join()


def test_duplicate_syn_while_connecting_keeps_the_flow(rig, monkeypatch):
    # A remote connect still in SYN-SENT (loopback ones finish inside connect()).
    monkeypatch.setattr(TcpNat, "_connect_done", staticmethod(lambda sock: False))

    def handler(conn, res):
        try:
            conn.sendall(b"ok")
            res["eof"] = conn.recv(10)
        except ConnectionResetError:
            res["reset"] = True

    srv = Server(handler)
    s = syn(srv.port, seq=42)
    rig.inject(s)
    (flow,) = rig.nat.flows.values()
    assert flow.connecting  # the EPOLLOUT for the connect has not been handled yet
    rig.inject(s)  # the guest retransmits its SYN
    assert rig.take() == [] and rig.nat.flow_count() == 1
    for _ in range(100):
        rig.loop.run_once(0.01)
        if rig.to_guest:
            break
    ((_s, _d, sa),) = rig.take()
    assert sa.flags == SYN | ACK and sa.ack == 43
    rig.inject(Segment(GPORT, srv.port, 43, (sa.seq + 1) & 0xFFFFFFFF, RST, 0))
    assert rig.nat.flow_count() == 0
    assert srv.join().get("reset") is True  # the guest's RST became a host RST


def test_host_reset_resets_the_guest(rig):
    def handler(conn, res):
        conn.recv(1)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    srv = Server(handler)
    g = rig.connect(srv.port, b"x", eof=False)
    rig.run(lambda: g.ended is not None)
    srv.join()
    assert rig.nat.flow_count() == 0 and g.flow.closed


def test_a_socket_the_loop_cannot_watch_resets_the_flow_instead_of_hanging(rig):
    """The kernel may refuse to watch a host socket (ENOMEM, max_user_watches spent): the
    loop reports that as EPOLLERR with no socket error. That flow could never be polled
    again, so both sides get a RST, it is counted, and the socket and the loop's entry go."""
    def handler(conn, res):
        res["data"] = conn.recv(100)
        try:
            res["eof"] = conn.recv(100)
        except ConnectionResetError:
            res["reset"] = True

    srv = Server(handler)
    rig.loop.fail_deferred = True  # the host socket's first watch (EPOLLIN) is refused
    g = rig.connect(srv.port, b"x", eof=False)
    rig.run(lambda: g.ended is not None)
    assert g.flow.closed
    assert rig.nat.counters["tcp_watch_failed"] == 1, rig.nat.counters
    assert rig.nat.flow_count() == 0
    assert rig.loop.cbs == {} and rig.loop.failed == []
    assert srv.join() == {"data": b"x", "reset": True}  # the guest's byte, then a RST


def test_guest_reset_resets_the_host(rig):
    def handler(conn, res):
        try:
            res["data"] = conn.recv(100)
            res["eof"] = conn.recv(100)
        except ConnectionResetError:
            res["reset"] = True

    srv = Server(handler)
    g = rig.connect(srv.port, b"x", eof=False)
    rig.run(lambda: g.consumed == 1)
    f = g.flow
    rig.inject(Segment(f.port, f.guest_port, f.snd_nxt, 0, RST, 0))
    assert rig.nat.flow_count() == 0
    assert srv.join().get("reset") is True


def test_max_flows_and_rate_limit():
    r = Rig(config=Config(max_flows=1))
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    try:
        r.inject(syn(port, sport=1111))
        r.inject(syn(port, sport=2222))
        assert r.nat.flow_count() == 1 and r.nat.counters["tcp_flow_limit"] == 1
        resets = [seg for _s, _d, seg in r.take() if seg.flags & RST]
        assert [seg.dst_port for seg in resets] == [2222]
    finally:
        r.close()
    r = Rig(config=Config(max_conn_rate=2))
    try:
        for p in range(3000, 3005):
            r.inject(syn(port, sport=p))
        assert r.nat.flow_count() == 2 and r.nat.counters["tcp_rate_limited"] == 3
        r.loop.now += 1.0  # two more tokens
        r.inject(syn(port, sport=4000))
        assert r.nat.flow_count() == 3
    finally:
        r.close()
        srv.close()


def test_close_releases_every_fd():
    base = open_fds()
    r = Rig()
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    for p in range(5000, 5010):
        r.inject(syn(port, sport=p))
    r.nat.add_forward("127.0.0.1", 0, 8080)
    assert r.nat.flow_count() == 10
    r.close()
    srv.close()
    assert open_fds() == base


# ---- port forwards --------------------------------------------------------------------

def test_port_forward_round_trip(rig):
    rig.nat.add_forward("127.0.0.1", 0, 8080)
    ((host, port),) = rig.nat.listener_addresses()
    payload = random.Random(10).randbytes(300_000)
    result = {}

    def client():
        with socket.create_connection((host, port)) as c:
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)
            result["echo"] = recv_all(c)

    t = threading.Thread(target=client, daemon=True)
    t.start()
    # The NAT sends a SYN from the gateway to guest port 8080.
    for _ in range(1000):
        rig.loop.run_once(0.01)
        if rig.to_guest:
            break
    ((src, dst, s),) = rig.take()
    assert (src, dst, s.dst_port, s.flags) == (GATEWAY, GUEST, 8080, SYN)
    assert s.mss == 1460 and s.wscale == 7
    flow = TcpFlow.accept(s, 0xFFFFFFF0, rig.loop.now, mss=1460)
    g = Endpoint(flow, b"", eof=False)
    rig.guests[8080] = g
    rig.remote = GATEWAY
    g.handle(flow.host_connected(rig.loop.now))
    rig.run(lambda: g.shut_wr == 1)
    assert bytes(g.sink) == payload
    g.src = memoryview(payload[::-1])
    g.eof = True
    rig.run(lambda: "echo" in result or not t.is_alive())
    t.join(10)
    assert result["echo"] == payload[::-1]
    rig.run(lambda: rig.nat.flow_count() == 0)


def test_port_forward_guest_refuses(rig):
    rig.nat.add_forward("127.0.0.1", 0, 8081)
    ((host, port),) = rig.nat.listener_addresses()
    result = {}

    def client():
        with socket.create_connection((host, port)) as c:
            try:
                result["data"] = c.recv(10)
            except ConnectionResetError:
                result["reset"] = True

    t = threading.Thread(target=client, daemon=True)
    t.start()
    for _ in range(1000):
        rig.loop.run_once(0.01)
        if rig.to_guest:
            break
    ((_src, _dst, s),) = rig.take()
    # Nothing listens on the guest port: the guest's stack answers RST|ACK.
    rig.remote = GATEWAY
    rig.inject(Segment(8081, s.src_port, 0, (s.seq + 1) & 0xFFFFFFFF, RST | ACK, 0),
               dst=GATEWAY)
    t.join(10)
    assert result.get("reset") is True
    assert rig.nat.flow_count() == 0


def test_forward_bind_failure_is_a_usage_level_error(rig):
    from voidbox.errors import VoidboxError
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        with pytest.raises(VoidboxError, match="cannot forward"):
            rig.nat.add_forward("127.0.0.1", s.getsockname()[1], 80)
    finally:
        s.close()



# ---- the engine's real event loop -------------------------------------------------------

def test_with_the_real_event_loop_and_config():
    """Contract check against voidbox.eventloop.EventLoop, NatConfig and Policy."""
    from voidbox.eventloop import EventLoop
    from voidbox.net.policy import Policy

    loop = EventLoop(debug=True)
    out: list[bytes] = []
    nat = TcpNat(loop, out.append, Policy(host_loopback=True), NatConfig())
    data = random.Random(13).randbytes(1 << 20)

    def handler(conn, res):
        conn.sendall(data)
        res["up"] = recv_all(conn)

    srv = Server(handler)
    flow, acts = TcpFlow.connect(GPORT, srv.port, 123, loop.time(), mss=1460)
    g = Endpoint(flow, b"upload", eof=True)
    g.handle(acts)
    try:
        for _ in range(100000):
            if g.flow.state is TcpState.TIME_WAIT or g.flow.closed:
                break
            for seg in g.outbox:
                nat.guest_segment(GUEST, GATEWAY, memoryview(segment_bytes(seg, GUEST, GATEWAY)))
            g.outbox.clear()
            loop.run_once(0.01)
            for pkt in out:
                _src, _dst, seg = parse_packet(pkt)
                g.receive(seg, loop.time())
            out.clear()
            g.pump(loop.time())
        assert hashlib.sha256(g.sink).digest() == hashlib.sha256(data).digest()
        assert srv.join()["up"] == b"upload"
        assert loop.errors == 0
    finally:
        nat.close()
        assert loop.watched_count() == 0
        loop.close()


@pytest.mark.parametrize("stream", ["plain", "tso"])
def test_stream_port_full_stops_the_flow_until_writable(stream):
    """The FramePort refuses frames (EAGAIN): what was peeked for them is peeked again
    later, the flow waits for the port's EPOLLOUT, and the transfer completes intact."""
    rig = Rig(stream=stream)
    try:
        # Room for a few frames: GSO super-frames need more of it.
        room = 200_000 if stream == "tso" else 8192
        rig.port_pair[0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, room)
        data = random.Random(5).randbytes(2 << 20)

        def handler(conn, res):
            conn.sendall(data)

        srv = Server(handler)
        g = rig.connect(srv.port)
        rig.run(lambda: g.shut_wr == 1)
        srv.join()
        assert hashlib.sha256(g.sink).digest() == hashlib.sha256(data).digest()
        assert rig.blocked > 0 and rig.nat.counters["tcp_port_blocked"] == rig.blocked
        assert rig.port.tx_eagain >= rig.blocked
        assert rig.nat.counters["tcp_bytes_to_guest"] == len(data)
    finally:
        rig.close()


def test_full_port_before_any_data_does_not_spin():
    """The port refuses the flow's first frame: with nothing in flight the host socket
    must not stay polled (its data is only peeked, so EPOLLIN would fire every turn)."""
    rig = Rig(stream="plain")
    try:
        ours, peer = rig.port_pair
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        go = threading.Event()

        def handler(conn, res):
            go.wait(30)
            conn.sendall(b"r" * 5000)
            res["done"] = True
            go.wait(30)

        srv = Server(handler)
        g = rig.connect(srv.port, eof=False)
        rig.run(lambda: g.flow.state is TcpState.ESTABLISHED and rig.nat.flows)
        while True:  # fill the stand-in TAP
            try:
                ours.send(b"\0" * 1000)
            except BlockingIOError:
                break
        go.set()
        deadline = time.monotonic() + 10
        while not rig.blocked and time.monotonic() < deadline:
            rig.loop.run_once(0.01)
        assert rig.blocked >= 1
        calls, blocked = rig.loop.fd_calls, rig.blocked
        for _ in range(50):
            rig.loop.run_once(0.001)
        # Nothing polled, nothing retried while the port is full.
        assert (rig.loop.fd_calls, rig.blocked) == (calls, blocked)
        while True:  # the TAP drains: the flow resumes by itself
            try:
                peer.recv(2000)
            except BlockingIOError:
                break
        rig.run(lambda: len(g.sink) == 5000)
        assert bytes(g.sink) == b"r" * 5000
    finally:
        go.set()
        rig.close()
