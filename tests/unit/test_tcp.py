"""The sans-I/O TCP core (voidbox.net.tcp), frame by frame and against itself.

`Endpoint` wraps a TcpFlow with an in-memory stand-in for its host socket (bytes to send,
a sink with an optional capacity). Two endpoints over an in-memory link, every segment
serialized, checksummed and parsed again, play guest and NAT; the NAT tests reuse it.
"""

from __future__ import annotations

import hashlib
import random

import pytest

from voidbox.net import fastpath
from voidbox.net.tcp import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    TCP_DEFAULT_MSS,
    Act,
    Segment,
    SegmentError,
    TcpFlow,
    TcpState,
    parse_segment,
    reset_for,
)

GUEST_IP = bytes([10, 0, 2, 15])
NAT_IP = bytes([10, 0, 2, 2])
MSS = 1460


def wire(seg: Segment, src=NAT_IP, dst=GUEST_IP) -> Segment:
    """Serialize, check both checksums, parse back: what the peer would see."""
    buf = bytearray(65536)
    n = fastpath.build_ipv4_tcp(buf, src, dst, 1, seg.src_port, seg.dst_port, seg.seq,
                                seg.ack, seg.flags, seg.window, seg.options(), seg.payload)
    pkt = bytes(buf[:n])
    assert fastpath.inet_checksum(pkt[:20]) == 0
    assert fastpath.tcp_checksum(src, dst, pkt[20:]) == 0
    return parse_segment(memoryview(pkt)[20:])


class Endpoint:
    """A TcpFlow and its in-memory host side: `src` to send, `sink` receiving."""

    def __init__(self, flow: TcpFlow, data: bytes = b"", eof: bool = True,
                 sink_cap: int | None = None):
        self.flow = flow
        self.src = memoryview(data)
        self.consumed = 0
        self.eof = eof
        self.sink = bytearray()
        self.sink_cap = sink_cap
        self.shut_wr = 0
        self.ended: Act | None = None
        self.outbox: list[Segment] = []
        self.writes = 0

    def write(self, data) -> int:
        self.writes += 1
        n = len(data)
        if self.sink_cap is not None:
            n = max(0, min(n, self.sink_cap - len(self.sink)))
        self.sink += data[:n]
        return n

    def handle(self, actions) -> None:
        for kind, value in actions:
            if kind is Act.SEND:
                self.outbox.append(wire(value))
            elif kind is Act.CONSUME:
                self.consumed += value
                assert self.consumed <= len(self.src), "consumed more than was ever sent"
            elif kind is Act.SHUT_WR:
                self.shut_wr += 1
            elif kind in (Act.ABORT, Act.CLOSE):
                self.ended = kind

    def set_window(self) -> None:
        if self.sink_cap is None:
            self.flow.rcv_wnd = 1 << 20
        else:
            self.flow.rcv_wnd = max(0, self.sink_cap - len(self.sink))

    def pump(self, now: float) -> None:
        flow = self.flow
        if flow.closed:
            return
        self.set_window()
        budget = flow.send_budget()
        off = self.consumed + flow.in_flight()
        chunk = self.src[off:off + budget]
        if len(chunk):
            self.handle(flow.send_data(chunk, now))
        elif self.eof and off == len(self.src) and flow.fin_seq is None and \
                flow.state in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT):
            self.handle(flow.host_eof(now))

    def receive(self, seg: Segment, now: float) -> None:
        self.set_window()
        self.handle(self.flow.guest_segment(seg, now, self.write))


def handshake(guest_data=b"", nat_data=b"", *, giss=1000, niss=5000, gwscale=7, nwscale=7,
              g_mss=MSS, n_mss=MSS, **kw):
    guest_flow, acts = TcpFlow.connect(40000, 80, giss, 0.0, mss=g_mss, wscale=gwscale, **kw)
    guest = Endpoint(guest_flow, guest_data)
    guest.handle(acts)
    syn = guest.outbox.pop()
    nat = Endpoint(TcpFlow.accept(syn, niss, 0.0, mss=n_mss, wscale=nwscale, **kw), nat_data)
    nat.handle(nat.flow.host_connected(0.0))
    guest.receive(nat.outbox.pop(), 0.0)
    nat.receive(guest.outbox.pop(), 0.0)
    assert guest.flow.state is TcpState.ESTABLISHED
    assert nat.flow.state is TcpState.ESTABLISHED
    return guest, nat


def run(a: Endpoint, b: Endpoint, now: float = 0.0, *, drop=None, shuffle: random.Random | None
        = None, until=None, max_steps: int = 200000) -> float:
    """Exchange segments until both sides are quiet; fire timers when nothing else moves."""
    count = 0
    for _ in range(max_steps):
        a.pump(now)
        b.pump(now)
        moved = False
        for src, dst in ((a, b), (b, a)):
            batch, src.outbox = src.outbox, []
            if shuffle is not None:
                shuffle.shuffle(batch)
            for seg in batch:
                count += 1
                moved = True
                if drop is not None and drop(count, seg):
                    continue
                dst.receive(seg, now)
        if until is not None and until():
            return now
        if moved:
            continue
        deadlines = [d for d in (a.flow.deadline, b.flow.deadline) if d is not None]
        if not deadlines:
            return now
        now = max(now, min(deadlines))
        a.handle(a.flow.on_timer(now))
        b.handle(b.flow.on_timer(now))
    raise AssertionError("link did not settle")


def sends(actions) -> list[Segment]:
    return [v for k, v in actions if k is Act.SEND]


def kinds(actions) -> list[Act]:
    return [k for k, _ in actions]


# ---- parsing -------------------------------------------------------------------------------

def raw(sport=40000, dport=80, seq=1, ack=0, flags=SYN, window=65535, options=b"",
        payload=b"") -> memoryview:
    buf = bytearray(2000)
    n = fastpath.build_ipv4_tcp(buf, GUEST_IP, NAT_IP, 0, sport, dport, seq, ack, flags,
                                window, options, payload)
    return memoryview(bytes(buf[20:n]))


def test_parse_reads_mss_and_window_scale():
    seg = parse_segment(raw(options=b"\x02\x04\x05\xb4\x01\x03\x03\x07\x04\x02\x00\x00"))
    assert (seg.mss, seg.wscale, seg.flags, seg.seq) == (1460, 7, SYN, 1)


def test_parse_stops_at_eol_and_skips_unknown_options():
    seg = parse_segment(raw(options=b"\x08\x0a" + b"\0" * 8 + b"\x00\x02\x04\x05\x00\x00"))
    assert seg.mss is None  # after EOL nothing is read


@pytest.mark.parametrize("options", [
    b"\x02\x00\x00\x00",          # length 0 would never advance the walk
    b"\x02\x01\x00\x00",          # length 1 is shorter than kind+length
    b"\x01\x01\x01\x02",          # kind in the last byte, no room for its length
    b"\x02\x08\x05\xb4",          # runs past the header
])
def test_parse_rejects_bad_option_lengths(options):
    with pytest.raises(SegmentError):
        parse_segment(raw(options=options))


def test_parse_rejects_short_and_bad_offset():
    with pytest.raises(SegmentError):
        parse_segment(b"\0" * 19)
    seg = bytearray(raw())
    seg[12] = 0x40  # data offset 4 words < 5
    with pytest.raises(SegmentError):
        parse_segment(seg)
    seg[12] = 0xF0  # 60 bytes of header in a 20-byte segment
    with pytest.raises(SegmentError):
        parse_segment(seg)


def test_reset_for_unknown_flows():
    # RFC 9293 §3.10.7.1: ACK set -> <SEQ=SEG.ACK><CTL=RST>.
    r = reset_for(Segment(40000, 80, 77, 1234, ACK, 100, b"abc"))
    assert (r.src_port, r.dst_port, r.seq, r.flags) == (80, 40000, 1234, RST)
    # no ACK -> <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>; a SYN counts one.
    r = reset_for(Segment(40000, 80, 0xFFFFFFFF, 0, SYN, 100))
    assert (r.seq, r.ack, r.flags) == (0, 0, RST | ACK)
    r = reset_for(Segment(40000, 80, 10, 0, FIN, 100, b"xy"))
    assert (r.ack, r.flags) == (13, RST | ACK)
    assert reset_for(Segment(40000, 80, 10, 0, RST, 0)) is None


def test_closed_flow_answers_with_reset():
    _guest, nat = handshake()
    nat.flow.state = TcpState.CLOSED
    out = sends(nat.flow.guest_segment(Segment(40000, 80, 1, 999, ACK, 10), 1.0, nat.write))
    assert out[0].flags == RST and out[0].seq == 999


# ---- handshake and options ------------------------------------------------------------------

def syn_seg(seq=1000, wscale=7, mss=1460, window=29200):
    return Segment(40000, 80, seq, 0, SYN, window, b"", mss, wscale)


def test_synack_waits_for_host_connect_and_duplicate_syn_is_harmless():
    flow = TcpFlow.accept(syn_seg(), 5000, 0.0, mss=MSS)
    assert flow.state is TcpState.SYN_RECEIVED and flow.deadline is None
    # The guest retransmits its SYN while the host connect is in progress.
    assert flow.guest_segment(syn_seg(), 1.0, lambda d: 0) == []
    assert flow.state is TcpState.SYN_RECEIVED
    out = sends(flow.host_connected(1.5))
    assert len(out) == 1
    sa = out[0]
    assert sa.flags == SYN | ACK and sa.seq == 5000 and sa.ack == 1001
    assert sa.mss == MSS and sa.wscale == 7
    # Duplicate SYN after the SYN-ACK: the SYN-ACK was lost, send it again.
    again = sends(flow.guest_segment(syn_seg(), 2.0, lambda d: 0))
    assert again[0].flags == SYN | ACK and again[0].seq == 5000
    assert flow.state is TcpState.SYN_RECEIVED


def test_synack_retransmitted_on_timeout_then_given_up():
    flow = TcpFlow.accept(syn_seg(), 5000, 0.0, mss=MSS, max_retries=2)
    flow.host_connected(0.0)
    t1 = flow.deadline
    assert t1 == pytest.approx(1.0)
    assert sends(flow.on_timer(t1))[0].flags == SYN | ACK
    t2 = flow.deadline
    assert t2 - t1 == pytest.approx(2.0)  # RFC 6298 §5.5 backoff
    flow.on_timer(t2)
    out = flow.on_timer(flow.deadline)
    assert Act.ABORT in kinds(out) and sends(out)[0].flags & RST
    assert flow.closed


def test_reset_while_connecting_cancels():
    flow = TcpFlow.accept(syn_seg(), 5000, 0.0, mss=MSS)
    assert kinds(flow.guest_segment(Segment(40000, 80, 1001, 0, RST, 0), 0.1, None)) == \
        [Act.ABORT]


def test_host_refused_resets_the_syn():
    flow = TcpFlow.accept(syn_seg(seq=0xFFFFFFFF), 5000, 0.0, mss=MSS)
    out = flow.host_refused()
    assert kinds(out) == [Act.SEND, Act.ABORT]
    r = sends(out)[0]
    assert r.flags == RST | ACK and r.ack == 0  # SYN at 2**32-1 wraps to 0


def test_window_scale_only_when_both_offer():
    flow = TcpFlow.accept(syn_seg(wscale=None), 5000, 0.0, mss=MSS)
    flow.rcv_wnd = 1 << 20
    sa = sends(flow.host_connected(0.0))[0]
    assert sa.wscale is None and sa.window == 0xFFFF  # no scaling: clamp, never shift
    flow.guest_segment(Segment(40000, 80, 1001, 5001, ACK, 1000), 0.1, None)
    assert flow.snd_wnd == 1000  # unscaled
    flow.rcv_wnd = 1 << 20
    assert flow.ack_segment().window == 0xFFFF

    flow = TcpFlow.accept(syn_seg(wscale=3, window=100), 5000, 0.0, mss=MSS, wscale=5)
    assert flow.snd_wnd == 100  # the SYN's own window is never scaled
    flow.rcv_wnd = 1 << 20
    sa = sends(flow.host_connected(0.0))[0]
    assert sa.wscale == 5 and sa.window == 0xFFFF  # SYN-ACK window unscaled too
    flow.guest_segment(Segment(40000, 80, 1001, 5001, ACK, 1000), 0.1, None)
    assert flow.snd_wnd == 1000 << 3
    assert flow.ack_segment().window == (1 << 20) >> 5


def test_window_scale_clamped_to_14():
    flow = TcpFlow.accept(syn_seg(wscale=20), 5000, 0.0, mss=MSS)
    assert flow.snd_wscale == 14


def test_mss_negotiation_limits_segments():
    guest, nat = handshake(nat_data=b"x" * 3000, g_mss=500)
    nat.pump(0.0)
    assert [len(s.payload) for s in nat.outbox] == [500] * 6
    assert nat.outbox[-1].flags & PSH
    flow = TcpFlow.accept(syn_seg(mss=None), 5000, 0.0, mss=MSS)
    assert flow.snd_mss == TCP_DEFAULT_MSS


def test_unacceptable_ack_in_syn_received_is_reset():
    flow = TcpFlow.accept(syn_seg(), 5000, 0.0, mss=MSS)
    flow.host_connected(0.0)
    out = sends(flow.guest_segment(Segment(40000, 80, 1001, 9999, ACK, 100), 0.1, None))
    assert out[0].flags == RST and out[0].seq == 9999
    assert flow.state is TcpState.SYN_RECEIVED


# ---- data transfer ----------------------------------------------------------------------

@pytest.mark.parametrize(("giss", "niss"), [(0xFFFFFF00, 0xFFFFFFF0), (0x7FFFFFF0, 0xFFFFFFFF)])
def test_transfer_both_ways_across_sequence_wraparound(giss, niss):
    up = random.Random(1).randbytes(200_000)
    down = random.Random(2).randbytes(300_000)
    guest, nat = handshake(up, down, giss=giss, niss=niss)
    run(guest, nat, until=lambda: guest.flow.closed and nat.flow.closed)
    assert hashlib.sha256(nat.sink).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(guest.sink).digest() == hashlib.sha256(down).digest()
    assert nat.consumed == len(down) and guest.consumed == len(up)
    assert nat.shut_wr == 1 and guest.shut_wr == 1
    assert nat.ended is Act.CLOSE


def test_lost_segments_are_retransmitted():
    down = random.Random(3).randbytes(100_000)
    guest, nat = handshake(b"", down)
    lost = set()

    def drop(n, seg):
        # Lose every 17th NAT data segment the first time it is sent.
        if seg.src_port == 80 and seg.payload and n % 17 == 0 and seg.seq not in lost:
            lost.add(seg.seq)
            return True
        return False

    run(guest, nat, drop=drop, until=lambda: nat.flow.closed)
    assert lost
    assert bytes(guest.sink) == down
    assert nat.flow.retransmits > 0


def test_a_single_lost_tail_segment_is_recovered_by_timeout():
    guest, nat = handshake(b"", b"y" * 2000, n_mss=MSS)
    nat.eof = False
    nat.pump(0.0)
    first, second = nat.outbox
    nat.outbox = []
    guest.receive(first, 0.0)  # second is lost; no later data -> no duplicate ACKs
    nat.receive(guest.outbox.pop(), 0.01)
    assert nat.consumed == MSS
    deadline = nat.flow.deadline
    out = nat.flow.on_timer(deadline)
    assert kinds(out) == [Act.REWIND]
    assert nat.flow.in_flight() == 0
    nat.pump(deadline)
    (again,) = nat.outbox
    assert again.seq == second.seq and bytes(again.payload) == bytes(second.payload)


def test_reordered_guest_segments_never_written_ahead_of_the_gap():
    guest, nat = handshake()
    base = nat.flow.rcv_nxt
    s1 = Segment(40000, 80, base, nat.flow.snd_nxt, ACK, 1000, b"AAAA")
    s2 = Segment(40000, 80, (base + 4) & 0xFFFFFFFF, nat.flow.snd_nxt, ACK, 1000, b"BBBB")
    nat.receive(s2, 0.1)
    assert nat.sink == b"" and nat.writes == 0
    assert nat.outbox.pop().ack == base  # duplicate ACK for the hole
    nat.receive(s1, 0.2)
    assert nat.sink == b"AAAA" and nat.outbox.pop().ack == base + 4
    nat.receive(s2, 0.3)
    assert nat.sink == b"AAAABBBB"


def test_retransmitted_guest_data_reaches_the_host_once():
    guest, nat = handshake()
    base = nat.flow.rcv_nxt
    una = nat.flow.snd_nxt
    nat.receive(Segment(40000, 80, base, una, ACK, 1000, b"hello"), 0.1)
    nat.receive(Segment(40000, 80, base, una, ACK, 1000, b"hello"), 0.2)  # full duplicate
    assert nat.sink == b"hello"
    assert nat.outbox[-1].ack == base + 5  # re-ACKed
    nat.receive(Segment(40000, 80, base + 3, una, ACK, 1000, b"lo world"), 0.3)  # overlap
    assert nat.sink == b"hello world"


def test_guest_data_acked_only_as_far_as_the_host_accepted():
    guest, nat = handshake()
    nat.sink_cap = 3
    base = nat.flow.rcv_nxt
    una = nat.flow.snd_nxt
    nat.receive(Segment(40000, 80, base, una, ACK, 1000, b"abcdef"), 0.1)
    assert nat.sink == b"abc"
    ack = nat.outbox.pop()
    assert ack.ack == base + 3 and ack.window == 0  # full host buffer: zero window
    assert nat.flow.guest_blocked and nat.ended is None
    # EAGAIN (nothing accepted): no ACK advance, flow stays.
    nat.receive(Segment(40000, 80, base + 3, una, ACK, 1000, b"def"), 0.2)
    assert nat.outbox.pop().ack == base + 3 and nat.flow.state is TcpState.ESTABLISHED
    nat.sink_cap = None
    nat.set_window()
    upd = sends(nat.flow.window_update(0.3))
    assert upd[0].window > 0 and not nat.flow.guest_blocked
    nat.receive(Segment(40000, 80, base + 3, una, ACK, 1000, b"def"), 0.4)
    assert nat.sink == b"abcdef"


def test_eagain_transfer_completes_with_retransmissions():
    up = random.Random(4).randbytes(150_000)
    guest, nat = handshake(up, b"")
    nat.sink_cap = 10_000

    def drain():
        # The host application reads slowly: every time the NAT is quiet, it frees space.
        if nat.sink_cap is not None and len(nat.sink) >= nat.sink_cap:
            nat.sink_cap += 7_000
            if nat.sink_cap >= len(up):
                nat.sink_cap = None
            nat.set_window()
            nat.handle(nat.flow.window_update(0.0))
        return guest.flow.closed and nat.flow.closed

    run(guest, nat, until=drain)
    assert bytes(nat.sink) == up


def test_duplicate_acks_trigger_one_fast_retransmit():
    guest, nat = handshake(b"", b"z" * 10 * MSS)
    nat.eof = False
    nat.pump(0.0)
    segs, nat.outbox = nat.outbox, []
    guest.receive(segs[0], 0.0)
    for s in segs[2:6]:  # segs[1] lost
        guest.receive(s, 0.0)
    acks, guest.outbox = guest.outbox, []
    out = []
    for a in acks:
        out += nat.flow.guest_segment(a, 0.01, nat.write)
    assert kinds(out).count(Act.REWIND) == 1
    assert nat.flow.snd_nxt == segs[1].seq


# ---- FIN, half-close, RST ----------------------------------------------------------------

def test_fin_with_data_acknowledges_seq_len_plus_one_and_repeat_is_reacked():
    guest, nat = handshake()
    base = nat.flow.rcv_nxt
    una = nat.flow.snd_nxt
    fin = Segment(40000, 80, base, una, ACK | FIN, 1000, b"bye")
    nat.receive(fin, 0.1)
    assert nat.sink == b"bye" and nat.shut_wr == 1
    assert nat.outbox.pop().ack == base + 4
    assert nat.flow.state is TcpState.CLOSE_WAIT
    nat.receive(fin, 0.2)  # repeated FIN: ACK again, no second shutdown
    assert nat.outbox.pop().ack == base + 4
    assert nat.shut_wr == 1 and nat.sink == b"bye"


def test_fin_behind_blocked_data_waits():
    guest, nat = handshake()
    nat.sink_cap = 2
    base = nat.flow.rcv_nxt
    nat.receive(Segment(40000, 80, base, nat.flow.snd_nxt, ACK | FIN, 1000, b"bye"), 0.1)
    assert nat.shut_wr == 0 and nat.outbox.pop().ack == base + 2


def test_guest_half_close_keeps_host_data_flowing():
    down = b"d" * 50_000
    guest, nat = handshake(b"up", down)
    nat.eof = False  # the host keeps its side open for now
    run(guest, nat, until=lambda: nat.shut_wr == 1 and len(guest.sink) == len(down))
    assert nat.flow.state is TcpState.CLOSE_WAIT and nat.sink == b"up"
    assert bytes(guest.sink) == down
    nat.eof = True
    run(guest, nat, until=lambda: nat.ended is not None)
    assert nat.ended is Act.CLOSE and guest.shut_wr == 1


def test_host_eof_keeps_guest_data_flowing_then_time_wait_is_reaped():
    up = b"u" * 40_000
    guest, nat = handshake(up, b"ok")
    guest.eof = False
    run(guest, nat)
    assert guest.shut_wr == 1 and bytes(nat.sink) == up
    assert nat.flow.state is TcpState.FIN_WAIT_2
    guest.eof = True
    now = run(guest, nat, until=lambda: nat.flow.state is TcpState.TIME_WAIT)
    assert nat.ended is None
    # The guest's FIN is retransmitted (our ACK was lost): re-ACK, stay in TIME-WAIT.
    gf = guest.flow
    fin = Segment(40000, 80, (gf.fin_seq) & 0xFFFFFFFF, gf.rcv_nxt, ACK | FIN, 100)
    nat.receive(fin, now + 0.5)
    assert nat.outbox.pop().ack == (gf.fin_seq + 1) & 0xFFFFFFFF
    assert nat.flow.deadline == pytest.approx(now + 0.5 + nat.flow.time_wait)
    assert kinds(nat.flow.on_timer(nat.flow.deadline)) == [Act.CLOSE]


def test_last_ack_without_final_ack_is_reaped():
    guest, nat = handshake(b"", b"", max_retries=3)
    base = nat.flow.rcv_nxt
    nat.receive(Segment(40000, 80, base, nat.flow.snd_nxt, ACK | FIN, 1000), 0.1)
    nat.pump(0.1)  # host EOF -> our FIN, LAST-ACK
    assert nat.flow.state is TcpState.LAST_ACK
    fins = 0
    now = 0.1
    for _ in range(10):
        if nat.flow.closed:
            break
        now = nat.flow.deadline
        out = nat.flow.on_timer(now)
        fins += sum(1 for s in sends(out) if s.flags & FIN)
    assert nat.flow.closed and fins == 3


def test_guest_reset_aborts_and_out_of_window_reset_is_ignored():
    guest, nat = handshake()
    base = nat.flow.rcv_nxt
    assert nat.flow.guest_segment(Segment(40000, 80, base - 10, 0, RST, 0), 0.1, None) == []
    assert nat.flow.state is TcpState.ESTABLISHED
    out = nat.flow.guest_segment(Segment(40000, 80, base, 0, RST, 0), 0.2, None)
    assert kinds(out) == [Act.ABORT] and nat.flow.closed


# (window scale, rcv_wnd, the receive window the guest was told): 2**20 is advertised exactly
# at scale 7; unscaled, the 16-bit field caps it at 65535.
RST_WINDOWS = [(7, 1 << 20, 1 << 20), (0, 1 << 20, 65535)]


@pytest.mark.parametrize("wscale,rcv_wnd,window", RST_WINDOWS, ids=["wscale7", "unscaled"])
@pytest.mark.parametrize("giss", [1000, 2**32 - 50_000], ids=["low", "wrapping"])
@pytest.mark.parametrize("offset,accepted", [
    (-1, False), (0, True), (1, True), ("window-1", True), ("window", False),
    ("window+1", False), (2**31 - 1, False), (2**31, False),
])
def test_guest_reset_is_accepted_exactly_within_the_receive_window(
        wscale, rcv_wnd, window, giss, offset, accepted):
    """RFC 9293 §3.10.7.4: a RST is acceptable iff RCV.NXT =< SEG.SEQ < RCV.NXT+RCV.WND.

    The NAT accepts the whole window rather than challenging (RFC 5961 §3.2 would ask for
    an exact match); beyond its last byte, and before RCV.NXT, the RST is ignored.
    """
    guest, nat = handshake(giss=giss, gwscale=wscale, nwscale=wscale)
    flow = nat.flow
    flow.rcv_wnd = rcv_wnd
    assert flow.window_field() << wscale == window  # what the guest was told
    if isinstance(offset, str):
        offset = window + {"window-1": -1, "window": 0, "window+1": 1}[offset]
    seq = (flow.rcv_nxt + offset) % 2**32
    out = flow.guest_segment(Segment(40000, 80, seq, 0, RST, 0), 0.1, None)
    if accepted:
        assert kinds(out) == [Act.ABORT] and flow.closed
    else:
        assert out == [] and flow.state is TcpState.ESTABLISHED


def test_an_older_ack_with_the_same_seq_leaves_the_window_alone():
    """RFC 9293 §3.10.7.4 fifth check: the window comes from a segment only if SND.WL1 <
    SEG.SEQ, or SND.WL1 = SEG.SEQ and SND.WL2 =< SEG.ACK. A reordered older ACK with the same
    SEQ must not replace a newer window (it would if seq_lt(WL1, SEQ) were seq_le)."""
    guest, nat = handshake(nat_data=b"x" * 1000)
    nat.pump(0.0)
    for seg in nat.outbox:
        guest.receive(seg, 0.01)
    latest = guest.outbox[-1]
    nat.receive(latest, 0.02)
    flow = nat.flow
    assert (flow.snd_wl1, flow.snd_wl2, flow.snd_una) == (latest.seq, latest.ack, latest.ack)
    window = flow.snd_wnd
    older = Segment(40000, 80, latest.seq, fastpath.seq_add(latest.ack, -1000), ACK, 1)
    flow.guest_segment(older, 0.03, nat.write)
    assert flow.snd_wnd == window
    same = Segment(40000, 80, latest.seq, latest.ack, ACK, 1)  # WL2 =< SEG.ACK: taken
    flow.guest_segment(same, 0.04, nat.write)
    assert flow.snd_wnd == 1 << flow.snd_wscale


def test_host_reset_resets_the_guest():
    guest, nat = handshake()
    out = nat.flow.host_reset()
    assert kinds(out) == [Act.SEND, Act.ABORT]
    guest.receive(wire(sends(out)[0]), 0.1)
    assert guest.ended is Act.ABORT


def test_host_write_failure_resets_the_guest():
    guest, nat = handshake()
    seg = Segment(40000, 80, nat.flow.rcv_nxt, nat.flow.snd_nxt, ACK, 100, b"x")
    out = nat.flow.guest_segment(seg, 0.1, lambda d: -1)
    assert Act.ABORT in kinds(out) and sends(out)[0].flags & RST


def test_syn_in_established_gets_challenge_ack():
    guest, nat = handshake()
    out = sends(nat.flow.guest_segment(syn_seg(seq=123), 0.1, None))
    assert out[0].flags == ACK and out[0].ack == nat.flow.rcv_nxt
    assert nat.flow.state is TcpState.ESTABLISHED


def test_ack_for_unsent_data_is_answered_and_dropped():
    guest, nat = handshake()
    base = nat.flow.rcv_nxt
    seg = Segment(40000, 80, base, (nat.flow.snd_max + 100) & 0xFFFFFFFF, ACK, 100, b"x")
    out = nat.flow.guest_segment(seg, 0.1, nat.write)
    assert nat.sink == b"" and sends(out)[0].ack == base


# ---- windows ------------------------------------------------------------------------------

def test_zero_window_stops_data_and_probes():
    guest, nat = handshake(b"", b"p" * 5000)
    nat.eof = False
    g = guest.flow
    # The guest's application stops reading: zero window.
    nat.receive(Segment(40000, 80, g.snd_nxt, g.rcv_nxt, ACK, 0), 0.1)
    assert nat.flow.send_budget() == 0
    nat.pump(0.1)
    assert nat.outbox == []
    t = nat.flow.deadline
    assert t is not None
    probe = sends(nat.flow.on_timer(t))
    assert len(probe) == 1 and probe[0].payload == b""
    assert probe[0].seq == (nat.flow.snd_una - 1) & 0xFFFFFFFF
    # The guest answers the probe with an open window; data flows again.
    nat.receive(Segment(40000, 80, g.snd_nxt, g.rcv_nxt, ACK, 100), t + 0.01)
    assert nat.flow.send_budget() == 100 << nat.flow.snd_wscale
    assert nat.flow.retries == 0


def test_zero_window_probe_unanswered_gives_up():
    guest, nat = handshake(b"", b"", max_retries=2)
    g = guest.flow
    nat.receive(Segment(40000, 80, g.snd_nxt, g.rcv_nxt, ACK, 0), 0.1)
    out = []
    for _ in range(5):
        if nat.flow.closed:
            break
        out = nat.flow.on_timer(nat.flow.deadline)
    assert nat.flow.closed and Act.ABORT in kinds(out)


def test_send_budget_respects_the_guest_window():
    guest, nat = handshake(b"", b"w" * 100_000, gwscale=None)
    g = guest.flow
    nat.receive(Segment(40000, 80, g.snd_nxt, g.rcv_nxt, ACK, 3000), 0.1)
    nat.eof = False
    nat.pump(0.1)
    assert sum(len(s.payload) for s in nat.outbox) == 3000
    assert nat.flow.send_budget() == 0
