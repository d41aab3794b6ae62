"""Twin parity for the TCP state machine: voidbox._tcp.TcpCore and its pure twin
voidbox.net.tcp.TcpCore, fed the same random sequences of guest segments, host events,
timer firings and deliveries, return the same action bits, queue the same segments,
write the same packets and end in the same state after every step.

Segments are drawn near the flow's own sequence space (around rcv_nxt, between snd_una
and snd_max), so the sequences reach every state: both handshakes, data both ways,
window updates, duplicate ACKs and fast retransmit, FINs, RSTs, TIME-WAIT, keepalive and
lifetime limits. Under VOIDBOX_PURE=1 there is no compiled side, and every test skips.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.twins import load_compiled
from voidbox.net import tcp as pure
from voidbox.net.tcp import (
    A_DELIVER,
    A_MALFORMED,
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    TCPOPT_MSS,
    TCPOPT_NOP,
    TCPOPT_WINDOW,
    Segment,
    TcpState,
    segment_bytes,
)

SEQ_MASK = 0xFFFFFFFF
GUEST = bytes([10, 0, 2, 15])
REMOTE = bytes([10, 0, 2, 2])
ETH_ROOM = 14
# Every field of TcpCore both twins expose; compared after each step.
FIELDS = (
    "port", "guest_port", "state", "iss", "snd_una", "snd_nxt", "snd_max", "snd_wnd",
    "snd_wl1", "snd_wl2", "irs", "rcv_nxt", "rcv_wnd", "our_mss", "our_wscale", "wscale_ok",
    "snd_mss", "snd_wscale", "rcv_wscale", "synack_sent", "fin_seq", "fin_received",
    "max_retries", "retries", "rto", "rto_base", "rto_min", "rto_max", "srtt", "rttvar",
    "rtt_seq", "rtt_time", "rto_deadline", "time_wait", "tw_deadline", "dupacks", "recover",
    "retransmits", "guest_blocked", "idle_timeout", "keepalive_interval", "keepalive_probes",
    "handshake_timeout", "fin_timeout", "born", "last_heard", "ka_sent", "ka_next",
    "expired", "last_ack", "ack_due", "n_out", "deadline", "closed",
)
LIMITS = dict(idle_timeout=30.0, keepalive_interval=5.0, keepalive_probes=2,
              handshake_timeout=20.0, fin_timeout=10.0)


@pytest.fixture(scope="module")
def compiled():
    return load_compiled("voidbox._tcp")


def snapshot(core) -> dict:
    return {name: getattr(core, name) for name in FIELDS}


def assert_same(a, b, where: str) -> None:
    sa, sb = snapshot(a), snapshot(b)
    diff = {k: (sa[k], sb[k]) for k in FIELDS if sa[k] != sb[k]}
    assert not diff, f"{where}: pure vs compiled differ in {diff}"


def options(mss, wscale) -> bytes:
    out = b""
    if mss is not None:
        out += struct.pack("!BBH", TCPOPT_MSS, 4, mss)
    if wscale is not None:
        out += struct.pack("!BBBB", TCPOPT_NOP, TCPOPT_WINDOW, 3, wscale)
    return out


# One step of a sequence: (kind, parameters); sequence numbers relative to the flow.
segment_steps = st.tuples(
    st.just("seg"),
    st.sampled_from([ACK, ACK, ACK, ACK | PSH, ACK | PSH, ACK | FIN, ACK | FIN | PSH, SYN,
                     SYN | ACK, RST, RST | ACK, FIN, 0, ACK | SYN | FIN]),
    st.one_of(st.just(0), st.just(0), st.integers(-3000, 3000),
              st.integers(0, SEQ_MASK)),  # seq - rcv_nxt
    st.one_of(st.none(), st.none(), st.integers(-3, 3),
              st.integers(0, SEQ_MASK)),  # ack: None = snd_max, else from mid-flight
    st.one_of(st.just(0xFFFF), st.integers(0, 0xFFFF)),  # window field
    st.one_of(st.just(0), st.integers(0, 3000)),  # payload length
    st.one_of(st.none(), st.integers(0, 0xFFFF)),  # MSS option
    st.one_of(st.none(), st.integers(0, 20)),  # window scale option
)
host_steps = st.one_of(
    st.tuples(st.sampled_from(["connected", "eof", "reset", "refused", "window_update",
                               "flush_ack", "out", "emit"])),
    st.tuples(st.just("timer"), st.floats(0.0, 100.0)),
    st.tuples(st.just("deadline")),
    st.tuples(st.just("send"), st.integers(0, 200000)),
    st.tuples(st.just("stream"), st.integers(0, 200000)),
    st.tuples(st.just("rcv_wnd"), st.integers(0, 1 << 24)),
    st.tuples(st.just("deliver"), st.sampled_from(["all", "none", "part", "broken"])),
)
steps = st.lists(st.one_of(segment_steps, segment_steps, host_steps), max_size=60)
# A well-behaved guest (no RST, no SYN, mostly in order): sequences reach the closing states.
gentle_steps = st.lists(st.one_of(
    st.tuples(st.just("seg"), st.sampled_from([ACK, ACK, ACK | PSH, ACK | FIN]),
              st.one_of(st.just(0), st.integers(-100, 100)),
              st.one_of(st.none(), st.integers(-2, 2)), st.integers(0, 0xFFFF),
              st.one_of(st.just(0), st.integers(0, 3000)), st.none(), st.none()),
    st.tuples(st.sampled_from(["eof", "emit", "flush_ack", "window_update"])),
    st.tuples(st.just("send"), st.integers(0, 200000)),
    st.tuples(st.just("deadline")),
    st.tuples(st.just("deliver"), st.sampled_from(["all", "all", "part", "none"])),
), max_size=40)


def raw_segment(core, step) -> bytes:
    _kind, flags, dseq, dack, window, plen, mss, wscale = step
    seq = (core.rcv_nxt + dseq) & SEQ_MASK
    if dack is None:  # everything sent so far
        ack = core.snd_max
    else:
        ack = (core.snd_una + ((core.snd_max - core.snd_una) & SEQ_MASK) // 2 + dack) & SEQ_MASK
    seg = Segment(core.guest_port, core.port, seq, ack, flags, window, bytes(plen % 251) *
                  (plen // 251) + bytes(plen % 251), mss, wscale)
    return segment_bytes(seg)


class Twins:
    """The same flow in both twins, driven step by step; every result compared."""

    def __init__(self, compiled, active: bool, syn_opts, now: float, kw: dict):
        self.a = pure.TcpCore(80, 40000, 0xFFFFF000, mss=1460, **kw)
        self.b = compiled.TcpCore(80, 40000, 0xFFFFF000, mss=1460, **kw)
        self.now = now
        self.pending = None  # (deliver_off, deliver_len) while a delivery is due
        if active:
            self.same("open_active", lambda c: c.open_active(now))
        else:
            mss, wscale, window = syn_opts
            syn = segment_bytes(Segment(40000, 80, 0xFFFFFFF0, 0, SYN, window, b"", mss,
                                        wscale))
            self.same("open_passive", lambda c: c.open_passive(syn, now))

    def same(self, what: str, call):
        ra, rb = call(self.a), call(self.b)
        assert ra == rb, f"{what}: {ra!r} vs {rb!r}"
        for name in ("consume_n", "deliver_off", "deliver_len"):
            assert getattr(self.a, name) == getattr(self.b, name), f"{what}: {name}"
        assert_same(self.a, self.b, what)
        return ra

    def drain(self, emit: bool) -> None:
        if emit:
            pa, pb = [], []
            bufa, bufb = bytearray(ETH_ROOM + 200), bytearray(ETH_ROOM + 200)
            self.same("emit", lambda c: c.emit(
                bufa if c is self.a else bufb, ETH_ROOM, REMOTE, GUEST, 0xFFFE, False,
                lambda buf, n, out=(pa if c is self.a else pb): out.append(
                    bytes(buf[ETH_ROOM:ETH_ROOM + n]))))
            assert pa == pb
        else:
            self.same("out_segments", lambda c: c.out_segments())

    def step(self, step) -> None:
        a = self.a
        kind = step[0]
        if self.pending is not None and kind != "deliver":
            step = ("deliver", "all")  # a delivery is due first, as the relay does
            kind = "deliver"
        if kind == "seg":
            raw = raw_segment(a, step)
            self.same("in_order", lambda c: c.in_order(raw))
            if self.same(f"guest_segment {step}",
                         lambda c: c.guest_segment(raw, self.now)) & A_DELIVER:
                self.pending = (a.deliver_off, a.deliver_len)
        elif kind == "deliver":
            if self.pending is None:
                return
            _off, length = self.pending
            n = {"all": length, "none": 0, "part": length // 2, "broken": -1}[step[1]]
            self.pending = None
            self.same(f"delivered {n}", lambda c: c.delivered(n, self.now))
        elif kind == "connected":
            self.same("host_connected", lambda c: c.host_connected(self.now))
        elif kind == "eof":
            self.same("host_eof", lambda c: c.host_eof(self.now))
        elif kind == "reset":
            self.same("host_reset", lambda c: c.host_reset())
        elif kind == "refused":
            self.same("host_refused", lambda c: c.host_refused())
        elif kind == "window_update":
            self.same("window_update", lambda c: c.window_update(self.now))
        elif kind == "flush_ack":
            self.same("flush_ack", lambda c: c.flush_ack())
        elif kind in ("out", "emit"):
            self.drain(kind == "emit")
        elif kind == "timer":
            self.now += step[1]
            self.same("on_timer", lambda c: c.on_timer(self.now))
        elif kind == "deadline":
            if a.deadline is not None:
                self.now = max(self.now, a.deadline)
            self.same("on_timer at deadline", lambda c: c.on_timer(self.now))
        elif kind == "send":
            n = min(step[1], a.send_budget())
            self.same("send_budget", lambda c: c.send_budget())
            self.same("in_flight", lambda c: c.in_flight())
            self.same(f"send_data {n}", lambda c: c.send_data(n, self.now))
            self.same("data_segments", lambda c: c.data_segments())
        elif kind == "stream":
            if a.fin_seq is None:
                n = min(step[1], a.send_budget())
                self.same(f"stream_sent {n}", lambda c: c.stream_sent(n, self.now))
        elif kind == "rcv_wnd":
            a.rcv_wnd = self.b.rcv_wnd = step[1]
        self.same("window_field", lambda c: c.window_field())
        if a.n_out > 4:
            self.drain(True)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(active=st.booleans(),
       syn_opts=st.tuples(st.one_of(st.none(), st.integers(0, 0xFFFF)),
                          st.one_of(st.none(), st.integers(0, 20)), st.integers(0, 0xFFFF)),
       limits=st.booleans(), wnd=st.integers(0, 1 << 22), establish=st.booleans(),
       script=steps)
def test_random_segment_sequences_leave_both_twins_alike(compiled, active, syn_opts, limits,
                                                         wnd, establish, script):
    t = Twins(compiled, active, syn_opts, 1.0, LIMITS if limits else {})
    t.a.rcv_wnd = t.b.rcv_wnd = wnd
    t.drain(True)
    if establish:  # most sequences then run in the synchronized states
        if active:
            script = [("seg", SYN | ACK, 0, None, 0xFFFF, 0, 1460, 7), *script]
        else:
            script = [("connected",), ("seg", ACK, 0, None, 0xFFFF, 0, None, None), *script]
    seen = set()
    for step in script:
        t.step(step)
        seen.add(t.a.state.name)
    t.drain(False)
    for name in sorted(seen):
        event(f"went through {name}")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(active=st.booleans(), limits=st.booleans(), script=gentle_steps)
def test_orderly_connections_leave_both_twins_alike(compiled, active, limits, script):
    t = Twins(compiled, active, (1460, 7, 29200), 0.0, LIMITS if limits else {})
    t.a.rcv_wnd = t.b.rcv_wnd = 1 << 20
    t.drain(True)
    if active:
        script = [("seg", SYN | ACK, 0, None, 0xFFFF, 0, 1460, 7), *script]
    else:
        script = [("connected",), ("seg", ACK, 0, None, 0xFFFF, 0, None, None), *script]
    seen = set()
    for step in script:
        t.step(step)
        seen.add(t.a.state.name)
    t.drain(False)
    for name in sorted(seen):
        event(f"went through {name}")


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=0, max_size=80), seq=st.integers(0, SEQ_MASK))
def test_malformed_and_odd_headers_are_read_alike(compiled, data, seq):
    """Random header bytes (bad data offsets, option lengths) through both parsers."""
    hdr = bytearray(struct.pack("!HHIIBBHHH", 40000, 80, seq, 0, 0, SYN, 1000, 0, 0)) + data
    if len(data) >= 1:
        hdr[12] = data[0] & 0xF0
    t = [m.TcpCore(80, 40000, 7, mss=1460) for m in (pure, compiled)]
    assert t[0].open_passive(bytes(hdr), 0.0) == t[1].open_passive(bytes(hdr), 0.0)
    assert_same(t[0], t[1], "open_passive")
    ra, rb = (c.guest_segment(bytes(hdr), 1.0) for c in t)
    assert ra == rb
    if ra == A_MALFORMED:
        assert t[0].last_heard == t[1].last_heard == 0.0  # nothing changed
    assert_same(t[0], t[1], "guest_segment")
    assert t[0].out_segments() == t[1].out_segments()


@given(src=st.binary(min_size=4, max_size=4), dst=st.binary(min_size=4, max_size=4),
       ports=st.binary(min_size=4, max_size=60))
def test_flow_keys_agree(compiled, src, dst, ports):
    assert pure.flow_key(src, dst, ports) == compiled.flow_key(src, dst, ports)
    assert compiled.flow_key(src, dst, ports) != compiled.flow_key(dst, src, ports) or \
        src == dst


def test_a_whole_connection_is_the_same_packets(compiled):
    """Passive open, data both ways, both FINs, TIME-WAIT expiry: identical packets."""
    t = Twins(compiled, False, (1460, 7, 29200), 0.0, {})
    t.a.rcv_wnd = t.b.rcv_wnd = 1 << 20
    script = [("connected",), ("emit",),
              ("seg", ACK, 0, None, 1000, 0, None, None),
              ("seg", ACK | PSH, 0, None, 1000, 500, None, None), ("deliver", "all"),
              ("emit",), ("flush_ack",), ("emit",), ("send", 3000), ("emit",),
              ("seg", ACK, 0, None, 1000, 0, None, None), ("eof",), ("emit",),
              ("seg", ACK | FIN, 0, None, 1000, 0, None, None), ("emit",)]
    for step in script:
        t.step(step)
    assert t.a.state is t.b.state is TcpState.TIME_WAIT
    t.step(("deadline",))
    assert t.a.closed and t.b.closed
