"""Sans-I/O TCP for the user-mode NAT: segment parsing and building, and the per-flow
state machine the NAT plays towards the guest (RFC 9293).

Nothing here touches a socket or reads a clock. A `TcpFlow` takes parsed guest segments, host
events and a `now`, and returns a list of actions `(Act, value)` for the relay
(voidbox.net.tcp_nat) to carry out: segments to send to the guest, bytes to drop from the
host socket once the guest acknowledged them, shutdowns, resets. Host-to-guest data is never
stored here: the host kernel socket is the buffer, and the flow only tracks which sequence
numbers it covers (`snd_una` is the first unconsumed byte of the host socket).
Guest-to-host data is handed to a `write` callable the caller passes in, and is acknowledged
only as far as `write` accepted it.

All sequence arithmetic goes through the wraparound-safe helpers of voidbox.net.fastpath.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable

from voidbox.net.fastpath import seq_add, seq_diff, seq_ge, seq_gt, seq_le, seq_lt

# RFC 9293 §3.1 control bits.
FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80

# RFC 9293 §3.2 option kinds, RFC 7323 §2 (window scale), RFC 2018 (SACK), RFC 7323 §3.
TCPOPT_EOL = 0
TCPOPT_NOP = 1
TCPOPT_MSS = 2
TCPOPT_WINDOW = 3
TCPOPT_SACK_PERMITTED = 4
TCPOPT_TIMESTAMP = 8
TCPOLEN_MSS = 4
TCPOLEN_WINDOW = 3

TCP_HEADER_LEN = 20
TCP_MAX_HEADER_LEN = 60
TCP_DEFAULT_MSS = 536  # RFC 9293 §3.7.1: assumed when the SYN carries no MSS option
TCP_MIN_SND_MSS = 48  # Linux's net.ipv4.tcp_min_snd_mss default
TCP_MAX_WSCALE = 14  # RFC 7323 §2.3: larger shift counts are treated as 14
TCP_MAX_WINDOW_FIELD = 0xFFFF
IPV4_TCP_OVERHEAD = 40  # IPv4 header + TCP header, both without options

# RFC 6298 §2: initial RTO 1 s; §2.4 a minimum of 1 s "SHOULD", 200 ms is what Linux uses
# and what a relay on a local link can afford; §2.5 a maximum of at least 60 s.
RTO_INITIAL = 1.0
RTO_MIN = 0.2
RTO_MAX = 60.0
RTO_CLOCK_GRANULARITY = 0.001
MAX_RETRIES = 8  # then both sides are reset (RFC 9293 §3.8.3 R2 "close the connection")
TIME_WAIT_S = 2.0  # RFC 9293 says 2 MSL; a NAT only needs to re-ACK a retransmitted FIN
# Lifetime limits (see TcpFlow; off unless passed in, TcpNat takes them from NatConfig).
# Keepalive as Linux does it for SO_KEEPALIVE sockets (tcp(7): tcp_keepalive_time 7200 s,
# tcp_keepalive_intvl 75 s, tcp_keepalive_probes 9); passt also drops a flow after 2 h
# without activity. Half-open and closing flows: 60 s, Linux's tcp_fin_timeout.
IDLE_TIMEOUT_S = 7200.0
KEEPALIVE_INTERVAL_S = 75.0
KEEPALIVE_PROBES = 9
HANDSHAKE_TIMEOUT_S = 60.0
FIN_TIMEOUT_S = 60.0
DUPACK_THRESHOLD = 3  # RFC 5681 §3.2 fast retransmit

_HDR = struct.Struct("!HHIIBBHHH")


class SegmentError(ValueError):
    """A guest segment that cannot be parsed (short, bad data offset, bad option length)."""


class TcpState(enum.Enum):
    """RFC 9293 §3.3.2 connection states."""

    CLOSED = "CLOSED"
    LISTEN = "LISTEN"
    SYN_SENT = "SYN-SENT"
    SYN_RECEIVED = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN-WAIT-1"
    FIN_WAIT_2 = "FIN-WAIT-2"
    CLOSE_WAIT = "CLOSE-WAIT"
    CLOSING = "CLOSING"
    LAST_ACK = "LAST-ACK"
    TIME_WAIT = "TIME-WAIT"


class Act(enum.IntEnum):
    """What a TcpFlow asks its relay to do; each action is a tuple (Act, value)."""

    SEND = 1  # value: Segment for the guest
    CONSUME = 2  # value: byte count the guest acknowledged: drop it from the host socket
    REWIND = 3  # retransmit from snd_una: the next peek starts at the acknowledged point
    SHUT_WR = 4  # the guest sent FIN: shutdown(SHUT_WR) on the host socket
    ABORT = 5  # reset the host connection (SO_LINGER 0) and forget the flow
    CLOSE = 6  # the flow ended cleanly: close the host socket and forget the flow


class Segment:
    """One TCP segment (RFC 9293 §3.1); payload may be a memoryview into a guest frame."""

    __slots__ = ("src_port", "dst_port", "seq", "ack", "flags", "window", "payload", "mss",
                 "wscale")

    def __init__(self, src_port: int, dst_port: int, seq: int, ack: int, flags: int,
                 window: int, payload=b"", mss: int | None = None, wscale: int | None = None):
        self.src_port = src_port
        self.dst_port = dst_port
        self.seq = seq
        self.ack = ack
        self.flags = flags
        self.window = window
        self.payload = payload
        self.mss = mss
        self.wscale = wscale

    @property
    def seg_len(self) -> int:
        """SEG.LEN (RFC 9293 §3.4): payload octets plus one for SYN and one for FIN."""
        return len(self.payload) + (1 if self.flags & SYN else 0) + (1 if self.flags & FIN else 0)

    def options(self) -> bytes:
        """The option bytes to put on the wire, padded to a multiple of 4 (RFC 9293 §3.1)."""
        out = b""
        if self.mss is not None:
            out += struct.pack("!BBH", TCPOPT_MSS, TCPOLEN_MSS, self.mss)
        if self.wscale is not None:
            # NOP first so the 3-byte option ends on a 4-byte boundary (RFC 7323 §2.2).
            out += struct.pack("!BBBB", TCPOPT_NOP, TCPOPT_WINDOW, TCPOLEN_WINDOW, self.wscale)
        return out

    def __repr__(self) -> str:
        names = "".join(n for bit, n in ((SYN, "S"), (FIN, "F"), (RST, "R"), (PSH, "P"),
                                         (ACK, "."))
                        if self.flags & bit)
        return (f"Segment({self.src_port}->{self.dst_port} [{names}] seq={self.seq} "
                f"ack={self.ack} win={self.window} len={len(self.payload)})")


def parse_segment(tcp) -> Segment:
    """Parse a TCP header, its options and payload (RFC 9293 §3.1, §3.2); no checksum check.

    The option walk is bounded by the header length; MSS and window scale are kept, other
    options skipped. Raises SegmentError on malformed input.
    """
    mv = memoryview(tcp)
    n = len(mv)
    if n < TCP_HEADER_LEN:
        raise SegmentError("TCP segment shorter than its header")
    sport, dport, seq, ack, off, flags, window, _csum, _urg = _HDR.unpack_from(mv)
    hlen = (off >> 4) * 4
    if hlen < TCP_HEADER_LEN or hlen > n:
        raise SegmentError(f"TCP data offset {hlen} outside 20..{min(n, TCP_MAX_HEADER_LEN)}")
    mss = wscale = None
    i = TCP_HEADER_LEN
    while i < hlen:  # every pass advances i by at least 1
        kind = mv[i]
        if kind == TCPOPT_EOL:
            break
        if kind == TCPOPT_NOP:
            i += 1
            continue
        if i + 1 >= hlen:
            raise SegmentError("TCP option without a length")
        olen = mv[i + 1]
        if olen < 2 or i + olen > hlen:
            raise SegmentError(f"TCP option {kind} length {olen} runs past the header")
        if kind == TCPOPT_MSS and olen == TCPOLEN_MSS:
            mss = (mv[i + 2] << 8) | mv[i + 3]
        elif kind == TCPOPT_WINDOW and olen == TCPOLEN_WINDOW:
            wscale = mv[i + 2]
        i += olen
    return Segment(sport, dport, seq, ack, flags, window, mv[hlen:], mss, wscale)


def reset_for(seg: Segment) -> Segment | None:
    """The RST answering a segment that matches no connection (RFC 9293 §3.10.7.1).

    Returns None for a segment that is itself a RST (never answer a reset).
    """
    if seg.flags & RST:
        return None
    if seg.flags & ACK:
        return Segment(seg.dst_port, seg.src_port, seg.ack, 0, RST, 0)
    return Segment(seg.dst_port, seg.src_port, 0, seq_add(seg.seq, seg.seg_len), RST | ACK, 0)


# Tuples, not sets: `in` on a tuple matches members by identity, while a set would call
# Enum.__hash__, a Python-level function, on every segment.
# States in which we may still send data to the guest (before our FIN).
_SEND_STATES = (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT, TcpState.FIN_WAIT_1,
                TcpState.CLOSING, TcpState.LAST_ACK)
# States in which guest data is still expected (the guest has not sent FIN).
_RECV_STATES = (TcpState.SYN_RECEIVED, TcpState.ESTABLISHED, TcpState.FIN_WAIT_1,
                TcpState.FIN_WAIT_2)
# Lifetime limits: states kept alive by probes, and those where our FIN is unacknowledged.
_KEEPALIVE_STATES = (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT, TcpState.FIN_WAIT_2)
_FIN_SENT_STATES = (TcpState.FIN_WAIT_1, TcpState.CLOSING, TcpState.LAST_ACK)

Actions = list[tuple[Act, object]]
Writer = Callable[[memoryview], int]


class TcpFlow:
    """The NAT's end of one guest TCP connection (RFC 9293 §3.10 event processing).

    Names follow RFC 9293 §3.3.1: snd_una, snd_nxt, snd_wnd, snd_wl1, snd_wl2, iss, rcv_nxt,
    rcv_wnd, irs. `snd_max` is the highest sequence number sent so far (after a rewind for
    retransmission snd_nxt is below it). `port` is our port as the guest sees it,
    `guest_port` the guest's.

    `rcv_wnd` is set by the relay from the host socket's free send buffer before it feeds
    segments in; the flow only scales and clamps it.

    Lifetime limits, for flows whose guest side went away without a RST that reached us
    (each None = no limit, the default here; TcpNat passes NatConfig's, whose defaults are
    the module's *_S constants). "Heard from the guest" means any segment of the flow.
    - idle_timeout (7200 s): ESTABLISHED or CLOSE-WAIT and nothing heard for this long:
      keepalive probes (an ACK one below snd_una, which a live guest answers with an ACK
      and a guest without the connection with a RST), keepalive_interval (75 s) apart;
      after keepalive_probes (9) unanswered ones, both sides are reset.
    - handshake_timeout (60 s): still SYN-SENT or SYN-RECEIVED (host connect pending or
      our SYN-ACK unanswered) this long after the flow began: both sides are reset (the
      guest's SYN refused as by a closed port if it never had a SYN-ACK).
    - fin_timeout (60 s): FIN-WAIT-1, CLOSING or LAST-ACK (our FIN unacknowledged) and
      nothing heard for this long: both sides are reset. FIN-WAIT-2 (the host half-closed,
      the guest may still send) is probed as ESTABLISHED is, after fin_timeout.
    `expired` is set when a limit ended the flow. TIME-WAIT keeps `time_wait`.
    """

    def __init__(self, port: int, guest_port: int, iss: int, *, mss: int,
                 wscale: int | None = 7, max_retries: int = MAX_RETRIES,
                 rto_initial: float = RTO_INITIAL, rto_min: float = RTO_MIN,
                 rto_max: float = RTO_MAX, time_wait: float = TIME_WAIT_S,
                 idle_timeout: float | None = None,
                 keepalive_interval: float = KEEPALIVE_INTERVAL_S,
                 keepalive_probes: int = KEEPALIVE_PROBES,
                 handshake_timeout: float | None = None,
                 fin_timeout: float | None = None):
        self.port = port
        self.guest_port = guest_port
        self.state = TcpState.CLOSED
        self.iss = iss
        self.snd_una = iss
        self.snd_nxt = iss
        self.snd_max = iss
        self.snd_wnd = 0
        self.snd_wl1 = 0
        self.snd_wl2 = 0
        self.irs = 0
        self.rcv_nxt = 0
        self.rcv_wnd = TCP_MAX_WINDOW_FIELD
        self.our_mss = mss
        self.our_wscale = None if wscale is None else min(wscale, TCP_MAX_WSCALE)
        self.wscale_ok = False  # RFC 7323 §2.2: both SYNs carried the option
        self.snd_mss = TCP_DEFAULT_MSS
        self.snd_wscale = 0  # shift applied to the guest's window fields
        self.rcv_wscale = 0  # shift the guest applies to ours
        self.synack_sent = False
        self.fin_seq: int | None = None  # sequence number of our FIN once the host sent EOF
        self.fin_received = False
        self.max_retries = max_retries
        self.retries = 0
        self.rto = rto_initial  # current, including exponential backoff
        self.rto_base = rto_initial  # from RTT samples, without backoff
        self.rto_min = rto_min
        self.rto_max = rto_max
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rtt_seq: int | None = None  # segment being timed (Karn: never a retransmission)
        self.rtt_time = 0.0
        self.rto_deadline: float | None = None
        self.time_wait = time_wait
        self.tw_deadline: float | None = None
        self.dupacks = 0
        self.recover = iss  # RFC 6582 §3.2: no second fast retransmit below this point
        self.retransmits = 0
        self.guest_blocked = False  # the last guest data hit a full host socket
        self.idle_timeout = idle_timeout
        self.keepalive_interval = keepalive_interval
        self.keepalive_probes = keepalive_probes
        self.handshake_timeout = handshake_timeout
        self.fin_timeout = fin_timeout
        self.born = 0.0  # when the flow began (accept/connect)
        self.last_heard = 0.0  # when the guest last sent a segment of this flow
        self.ka_sent = 0  # keepalive probes since then
        self.ka_next = 0.0  # when the next one is due (while ka_sent)
        self.expired = False

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def accept(cls, syn: Segment, iss: int, now: float, **kw) -> TcpFlow:
        """A flow for a guest SYN (RFC 9293 §3.10.7.2, LISTEN state, SYN bit).

        The SYN-ACK waits for `host_connected`: the guest sees the connection only once the
        host connect succeeded.
        """
        flow = cls(syn.dst_port, syn.src_port, iss, **kw)
        flow.born = flow.last_heard = now
        flow.state = TcpState.SYN_RECEIVED
        flow.irs = syn.seq
        flow.rcv_nxt = seq_add(syn.seq, 1)
        flow._take_syn_options(syn)
        flow.snd_wnd = syn.window  # RFC 7323 §2.2: the window of a SYN is never scaled
        flow.snd_wl1 = syn.seq
        return flow

    @classmethod
    def connect(cls, port: int, guest_port: int, iss: int, now: float,
                **kw) -> tuple[TcpFlow, Actions]:
        """A flow we open towards the guest (port forwards): SYN-SENT and the SYN to send."""
        flow = cls(port, guest_port, iss, **kw)
        flow.born = flow.last_heard = now
        flow.state = TcpState.SYN_SENT
        flow.snd_nxt = flow.snd_max = seq_add(iss, 1)
        flow._arm(now, restart=True)
        return flow, [(Act.SEND, flow._syn(SYN, iss))]

    def _take_syn_options(self, syn: Segment) -> None:
        mss = syn.mss if syn.mss else TCP_DEFAULT_MSS
        # A floor as Linux's tcp_min_snd_mss: a peer announcing a tiny MSS must not make
        # us cut the stream into thousands of segments per window (CVE-2019-11479).
        self.snd_mss = max(TCP_MIN_SND_MSS, min(mss, self.our_mss))
        # RFC 7323 §2.2: scaling is in effect only if both SYNs carried the option.
        self.wscale_ok = self.our_wscale is not None and syn.wscale is not None
        if self.wscale_ok:
            self.snd_wscale = min(syn.wscale, TCP_MAX_WSCALE)
            self.rcv_wscale = self.our_wscale
        else:
            self.snd_wscale = self.rcv_wscale = 0

    def _syn(self, flags: int, seq: int) -> Segment:
        # The SYN carries our MSS and, when the guest offered scaling (or we open the
        # connection), our shift; its window field is never scaled (RFC 7323 §2.2).
        wscale = None
        if self.state is TcpState.SYN_SENT or self.wscale_ok:
            wscale = self.our_wscale
        return Segment(self.port, self.guest_port, seq, self.rcv_nxt if flags & ACK else 0,
                       flags, min(self.rcv_wnd, TCP_MAX_WINDOW_FIELD), b"", self.our_mss, wscale)

    # ---- helpers ------------------------------------------------------------------------

    def _window_field(self) -> int:
        return min(max(self.rcv_wnd, 0) >> self.rcv_wscale, TCP_MAX_WINDOW_FIELD)

    def ack_segment(self) -> Segment:
        """A pure ACK for everything received so far, with the current window."""
        return Segment(self.port, self.guest_port, self.snd_nxt, self.rcv_nxt, ACK,
                       self._window_field())

    def _reset_segment(self) -> Segment:
        return Segment(self.port, self.guest_port, self.snd_nxt, self.rcv_nxt, RST | ACK, 0)

    def _in_flight_any(self) -> bool:
        return self.snd_una != self.snd_max

    def in_flight(self) -> int:
        """Data bytes sent to the guest and not acknowledged (the host socket's peeked part)."""
        end = self.snd_nxt
        if self.fin_seq is not None and seq_gt(end, self.fin_seq):
            end = self.fin_seq
        start = self.snd_una
        if start == self.iss and self.state in (TcpState.SYN_SENT, TcpState.SYN_RECEIVED):
            return 0
        return max(0, seq_diff(end, start))

    def _probe_needed(self) -> bool:
        return (self.snd_wnd == 0 and self.state in _SEND_STATES and self.fin_seq is None
                and not self._in_flight_any())

    def _arm(self, now: float, restart: bool = False) -> None:
        """RFC 6298 §5: a running timer while anything is unacknowledged (or a probe is due)."""
        pending = (self.state is TcpState.SYN_SENT
                   or (self.state is TcpState.SYN_RECEIVED and self.synack_sent)
                   or self._in_flight_any() or self._probe_needed())
        if not pending:
            self.rto_deadline = None
        elif restart or self.rto_deadline is None:
            self.rto_deadline = now + self.rto

    def _rtt_sample(self, r: float) -> None:
        # RFC 6298 §2.2 and §2.3.
        if self.srtt is None:
            self.srtt = r
            self.rttvar = r / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - r)
            self.srtt = 0.875 * self.srtt + 0.125 * r
        rto = self.srtt + max(RTO_CLOCK_GRANULARITY, 4 * self.rttvar)
        self.rto = self.rto_base = min(max(rto, self.rto_min), self.rto_max)

    def _abort(self, out: Actions, rst: bool = True) -> Actions:
        if rst:
            out.append((Act.SEND, self._reset_segment()))
        self.state = TcpState.CLOSED
        self.rto_deadline = self.tw_deadline = None
        out.append((Act.ABORT, None))
        return out

    @property
    def deadline(self) -> float | None:
        """When on_timer must next run, or None."""
        d = self.rto_deadline
        t = self.tw_deadline
        if t is not None and (d is None or t < d):
            d = t
        t = self._limit_deadline()
        if t is not None and (d is None or t < d):
            d = t
        return d

    def _limit_deadline(self) -> float | None:
        """When a lifetime limit (see the class docstring) next acts, or None."""
        st = self.state
        if st is TcpState.ESTABLISHED or st is TcpState.CLOSE_WAIT:
            idle = self.idle_timeout
        elif st is TcpState.FIN_WAIT_2:
            idle = self.fin_timeout
        elif st is TcpState.SYN_RECEIVED or st is TcpState.SYN_SENT:
            t = self.handshake_timeout
            return None if t is None else self.born + t
        elif st in _FIN_SENT_STATES:
            t = self.fin_timeout
            return None if t is None else self.last_heard + t
        else:
            return None
        if idle is None:
            return None
        if self.ka_sent:
            return self.ka_next
        return self.last_heard + idle

    def _limit_reached(self, now: float, out: Actions) -> Actions:
        """on_timer past _limit_deadline: probe, or reset both sides."""
        st = self.state
        if (st in _KEEPALIVE_STATES and self.ka_sent < self.keepalive_probes):
            self.ka_sent += 1
            self.ka_next = now + self.keepalive_interval
            out.append((Act.SEND, self._probe()))
            return out
        self.expired = True
        if st is TcpState.SYN_RECEIVED and not self.synack_sent:
            return self.host_refused()
        return self._abort(out)

    @property
    def closed(self) -> bool:
        return self.state is TcpState.CLOSED

    # ---- host events --------------------------------------------------------------------

    def host_connected(self, now: float) -> Actions:
        """The host connect completed: answer the guest's SYN (RFC 9293 §3.10.7.2)."""
        if self.state is not TcpState.SYN_RECEIVED or self.synack_sent:
            return []
        self.synack_sent = True
        self.snd_nxt = self.snd_max = seq_add(self.iss, 1)
        self._arm(now, restart=True)
        return [(Act.SEND, self._syn(SYN | ACK, self.iss))]

    def host_refused(self) -> Actions:
        """The host connect failed: refuse the guest's SYN the way a closed port does."""
        seg = Segment(self.port, self.guest_port, 0, self.rcv_nxt, RST | ACK, 0)
        return self._abort([(Act.SEND, seg)], rst=False)

    def host_eof(self, now: float) -> Actions:
        """The host sent FIN and every byte before it was sent to the guest: send our FIN."""
        if self.fin_seq is not None or self.state not in _SEND_STATES:
            return []
        self.fin_seq = self.snd_nxt
        self._fin_state()
        return self._send_fin(now)

    def _fin_state(self) -> None:
        if self.state is TcpState.ESTABLISHED:
            self.state = TcpState.FIN_WAIT_1
        elif self.state is TcpState.CLOSE_WAIT:
            self.state = TcpState.LAST_ACK

    def _send_fin(self, now: float) -> Actions:
        seg = Segment(self.port, self.guest_port, self.fin_seq, self.rcv_nxt, FIN | ACK,
                      self._window_field())
        self.snd_nxt = seq_add(self.fin_seq, 1)
        if seq_gt(self.snd_nxt, self.snd_max):
            self.snd_max = self.snd_nxt
        self._arm(now)
        return [(Act.SEND, seg)]

    def host_reset(self) -> Actions:
        """The host connection was reset or failed: reset the guest's side too."""
        if self.state is TcpState.CLOSED:
            return []
        if self.state is TcpState.SYN_RECEIVED and not self.synack_sent:
            return self.host_refused()
        return self._abort([])

    def window_update(self, now: float) -> Actions:
        """rcv_wnd grew (the host socket drained): tell the guest (RFC 9293 §3.8.6.2.2)."""
        self.guest_blocked = False
        if self.state in _RECV_STATES and self.state is not TcpState.SYN_RECEIVED:
            return [(Act.SEND, self.ack_segment())]
        return []

    # ---- host-to-guest data -------------------------------------------------------------

    def send_budget(self) -> int:
        """How many data bytes may be sent now: the guest's window less what is in flight."""
        if self.state not in _SEND_STATES:
            return 0
        budget = seq_diff(seq_add(self.snd_una, self.snd_wnd), self.snd_nxt)
        if self.fin_seq is not None:
            budget = min(budget, seq_diff(self.fin_seq, self.snd_nxt))
        return max(0, budget)

    def send_data(self, payload, now: float) -> Actions:
        """Segments carrying payload (peeked at the host socket offset snd_nxt - snd_una).

        The caller keeps len(payload) within send_budget(). After a rewind, the last
        retransmitted segment also carries our FIN if it was sent before.
        """
        mv = memoryview(payload)
        out: Actions = []
        n = len(mv)
        if n == 0:
            return out
        new = self.snd_nxt == self.snd_max
        window = self._window_field()
        mss = self.snd_mss
        off = 0
        while off < n:
            chunk = mv[off:off + mss]
            off += len(chunk)
            flags = ACK
            last = off >= n
            if last:
                flags |= PSH
            seq = self.snd_nxt
            self.snd_nxt = seq_add(seq, len(chunk))
            if last and self.fin_seq is not None and self.snd_nxt == self.fin_seq:
                flags |= FIN
                self.snd_nxt = seq_add(self.snd_nxt, 1)
            out.append((Act.SEND, Segment(self.port, self.guest_port, seq, self.rcv_nxt, flags,
                                          window, chunk)))
        self._after_send(new, now)
        return out

    def _after_send(self, new: bool, now: float) -> None:
        """snd_nxt has moved over data just sent: extend snd_max, time a new segment for
        the RTT (RFC 6298 §3, Karn: never a retransmitted one) and arm the RTO."""
        if seq_gt(self.snd_nxt, self.snd_max):
            self.snd_max = self.snd_nxt
        if new and self.rtt_seq is None:
            self.rtt_seq = self.snd_nxt
            self.rtt_time = now
        self._arm(now)

    def stream_sent(self, n: int, now: float) -> None:
        """Record n payload bytes sent from snd_nxt in segments the caller built itself
        (FramePort.send_tcp_stream: ACK, rcv_nxt, window_field()); as send_data does, minus
        the segments. Only while no FIN is due (fin_seq is None): send_data adds it."""
        if n <= 0:
            return
        new = self.snd_nxt == self.snd_max
        self.snd_nxt = seq_add(self.snd_nxt, n)
        self._after_send(new, now)

    def window_field(self) -> int:
        """The window field for our next segment (scaled, RFC 7323 §2.3)."""
        return self._window_field()

    # ---- timers -------------------------------------------------------------------------

    def on_timer(self, now: float) -> Actions:
        """Retransmission (RFC 6298 §5.4-5.6), zero-window probes (RFC 9293 §3.8.6.1),
        TIME-WAIT expiry and the lifetime limits (keepalive probes, timeouts). Harmless to
        call early."""
        out: Actions = []
        if self.tw_deadline is not None and now >= self.tw_deadline:
            self.state = TcpState.CLOSED
            self.tw_deadline = self.rto_deadline = None
            out.append((Act.CLOSE, None))
            return out
        limit = self._limit_deadline()
        if limit is not None and now >= limit:
            out = self._limit_reached(now, out)
            if self.state is TcpState.CLOSED:
                return out
        if self.rto_deadline is None or now < self.rto_deadline:
            return out
        self.retries += 1
        if self.retries > self.max_retries:
            self.snd_nxt = self.snd_una
            return self._abort(out)
        self.rto = min(self.rto * 2, self.rto_max)  # RFC 6298 §5.5
        self.rtt_seq = None  # Karn's algorithm: no sample from a retransmitted segment
        self.rto_deadline = now + self.rto
        if self.state is TcpState.SYN_SENT:
            out.append((Act.SEND, self._syn(SYN, self.iss)))
        elif self.state is TcpState.SYN_RECEIVED:
            out.append((Act.SEND, self._syn(SYN | ACK, self.iss)))
        elif self._in_flight_any():
            self.retransmits += 1
            self.snd_nxt = self.snd_una
            self.dupacks = 0
            if self.fin_seq is not None and self.snd_una == self.fin_seq:
                out.extend(self._send_fin(now))
            elif self.snd_wnd == 0:
                # The guest closed its window with our data outstanding: what it dropped
                # goes again from snd_una once it reopens; until then, probe.
                out.append((Act.REWIND, None))
                out.append((Act.SEND, self._probe()))
            else:
                out.append((Act.REWIND, None))
        elif self._probe_needed():
            out.append((Act.SEND, self._probe()))
        else:
            self.rto_deadline = None
        return out

    def _probe(self) -> Segment:
        # Zero-window probe (RFC 9293 §3.8.6.1) the way Linux sends it: an ACK one below
        # snd_una is outside the guest's window, so it answers with its current window
        # (RFC 9293 §3.10.7.4 first check).
        return Segment(self.port, self.guest_port, seq_add(self.snd_una, -1), self.rcv_nxt,
                       ACK, self._window_field())

    # ---- guest segments -----------------------------------------------------------------

    def guest_segment(self, seg: Segment, now: float, write: Writer) -> Actions:
        """Process one segment from the guest (RFC 9293 §3.10.7.3, §3.10.7.4).

        write(data) hands in-order guest data to the host and returns how many bytes the
        host accepted (0 if none, -1 if the host connection is broken).
        """
        out: Actions = []
        st = self.state
        flags = seg.flags
        self.last_heard = now  # the guest is there (lifetime limits)
        self.ka_sent = 0
        if st is TcpState.CLOSED:
            rst = reset_for(seg)
            if rst is not None:
                out.append((Act.SEND, rst))
            return out
        if st is TcpState.SYN_SENT:
            return self._syn_sent(seg, now, out)
        if st is TcpState.SYN_RECEIVED and not self.synack_sent:
            # Still connecting to the host: a retransmitted SYN must not disturb the flow.
            if flags & RST and seg.seq == self.rcv_nxt:
                return self._abort(out, rst=False)
            return out

        # First check: sequence number. Only the RST case and the trimming need it here.
        if flags & RST:
            # RFC 9293 §3.10.7.4: RST valid if its seq is in the receive window. The guest
            # is our own link's peer; accept the window (and the exact match) rather than
            # challenge, since a blocked host socket can leave the guest's snd_nxt ahead.
            span = max(self._window_field() << self.rcv_wscale, TCP_MAX_WINDOW_FIELD)
            if seq_ge(seg.seq, self.rcv_nxt) and seq_lt(seg.seq, seq_add(self.rcv_nxt, span)):
                if st is TcpState.TIME_WAIT:
                    self.state = TcpState.CLOSED
                    self.tw_deadline = self.rto_deadline = None
                    out.append((Act.CLOSE, None))
                    return out
                return self._abort(out, rst=False)
            return out
        if flags & SYN:
            if st is TcpState.SYN_RECEIVED and seg.seq == self.irs and not flags & ACK:
                # Duplicate SYN: our SYN-ACK was lost; send it again.
                out.append((Act.SEND, self._syn(SYN | ACK, self.iss)))
                return out
            # RFC 9293 §3.10.7.4 fourth check (RFC 5961 §4): challenge ACK.
            out.append((Act.SEND, self.ack_segment()))
            return out
        if not flags & ACK:
            return out  # fifth check: a segment without ACK is dropped

        # Fifth check: the ACK field.
        if st is TcpState.SYN_RECEIVED:
            if seq_gt(seg.ack, self.snd_una) and seq_le(seg.ack, self.snd_max):
                self.state = st = TcpState.ESTABLISHED
                self.snd_una = seg.ack
                self.snd_wnd = seg.window << self.snd_wscale
                self.snd_wl1 = seg.seq
                self.snd_wl2 = seg.ack
                self.retries = 0
                self._arm(now, restart=True)
            else:
                out.append((Act.SEND, Segment(self.port, self.guest_port, seg.ack, 0, RST, 0)))
                return out
        else:
            if seq_gt(seg.ack, self.snd_max):
                # RFC 9293 §3.10.7.4: ACK for data not yet sent: ACK and drop.
                out.append((Act.SEND, self.ack_segment()))
                return out
            self._process_ack(seg, now, out)
            st = self.state
            if st is TcpState.CLOSED:
                return out

        # Sixth/seventh: segment text and FIN.
        plen = len(seg.payload)
        fin = bool(flags & FIN)
        if plen == 0 and not fin:
            if seq_lt(seg.seq, self.rcv_nxt):
                # RFC 9293 §3.10.7.4 first check: an unacceptable segment (here a
                # zero-window probe or keepalive below rcv_nxt) is answered with an ACK.
                out.append((Act.SEND, self.ack_segment()))
            return out
        seg_end = seq_add(seg.seq, plen + (1 if fin else 0))
        if seq_le(seg_end, self.rcv_nxt):
            # Entirely old: a retransmission of data (or a FIN) already acknowledged.
            if st is TcpState.TIME_WAIT and fin:
                self.tw_deadline = now + self.time_wait  # RFC 9293 §3.10.7.4 TIME-WAIT
            out.append((Act.SEND, self.ack_segment()))
            return out
        if seq_gt(seg.seq, self.rcv_nxt):
            # Out of order: never written ahead of the gap; a duplicate ACK asks for it.
            out.append((Act.SEND, self.ack_segment()))
            return out
        if st not in _RECV_STATES:
            # New data after the guest's FIN: nothing to deliver it to.
            out.append((Act.SEND, self.ack_segment()))
            return out
        # In order, possibly starting before rcv_nxt: trim what the host already has.
        skip = seq_diff(self.rcv_nxt, seg.seq)
        accepted_all = True
        if plen > skip:
            data = seg.payload[skip:]
            n = write(data)
            if n < 0:
                return self.host_reset()
            if n:
                self.rcv_nxt = seq_add(self.rcv_nxt, n)
            if n < len(data):
                accepted_all = False
                self.guest_blocked = True
        if fin and accepted_all:
            self.rcv_nxt = seq_add(self.rcv_nxt, 1)
            self.fin_received = True
            out.append((Act.SHUT_WR, None))
            if st in (TcpState.SYN_RECEIVED, TcpState.ESTABLISHED):
                self.state = TcpState.CLOSE_WAIT
            elif st is TcpState.FIN_WAIT_1:
                self.state = TcpState.CLOSING
            elif st is TcpState.FIN_WAIT_2:
                self._enter_time_wait(now)
        out.append((Act.SEND, self.ack_segment()))
        return out

    def _enter_time_wait(self, now: float) -> None:
        self.state = TcpState.TIME_WAIT
        self.rto_deadline = None
        self.tw_deadline = now + self.time_wait

    def _syn_sent(self, seg: Segment, now: float, out: Actions) -> Actions:
        # RFC 9293 §3.10.7.3.
        flags = seg.flags
        if flags & ACK and seg.ack != self.snd_max:
            if not flags & RST:
                out.append((Act.SEND, Segment(self.port, self.guest_port, seg.ack, 0, RST, 0)))
            return out
        if flags & RST:
            if flags & ACK:
                return self._abort(out, rst=False)  # the guest port is closed
            return out
        if not flags & SYN or not flags & ACK:
            return out  # simultaneous open is not supported: the guest never initiates here
        self.irs = seg.seq
        self.rcv_nxt = seq_add(seg.seq, 1)
        self._take_syn_options(seg)
        self.snd_una = seg.ack
        self.snd_wnd = seg.window  # never scaled in a SYN (RFC 7323 §2.2)
        self.snd_wl1 = seg.seq
        self.snd_wl2 = seg.ack
        self.state = TcpState.ESTABLISHED
        self.retries = 0
        self._arm(now, restart=True)
        out.append((Act.SEND, self.ack_segment()))
        return out

    def _process_ack(self, seg: Segment, now: float, out: Actions) -> None:
        ack = seg.ack
        advanced = seq_gt(ack, self.snd_una)
        if advanced:
            acked = seq_diff(ack, self.snd_una)
            data = acked
            if self.fin_seq is not None and seq_gt(ack, self.fin_seq):
                data -= 1  # the FIN occupies a sequence number but no host byte
            if data > 0:
                out.append((Act.CONSUME, data))
            if self.rtt_seq is not None and seq_ge(ack, self.rtt_seq):
                self._rtt_sample(now - self.rtt_time)
                self.rtt_seq = None
            self.snd_una = ack
            # New data acknowledged: the path works again, drop the backoff (as Linux does;
            # RFC 6298 §5.7 leaves it to the next RTT sample, which Karn may long withhold).
            self.rto = self.rto_base
            if seq_lt(self.snd_nxt, ack):
                self.snd_nxt = ack  # the original transmission arrived after all
            self.retries = 0
            self.dupacks = 0
        # Window update rule, RFC 9293 §3.10.7.4 fifth check.
        if seq_lt(self.snd_wl1, seg.seq) or (
                self.snd_wl1 == seg.seq and seq_le(self.snd_wl2, ack)):
            old = self.snd_wnd
            self.snd_wnd = seg.window << self.snd_wscale
            self.snd_wl1 = seg.seq
            self.snd_wl2 = ack
            if old == 0 and self.snd_wnd:
                self.retries = 0
        else:
            old = self.snd_wnd
        if not advanced:
            if self.snd_wnd == 0:
                self.retries = 0  # the guest answered a probe: it is alive
            if (self._in_flight_any() and ack == self.snd_una and len(seg.payload) == 0
                    and not seg.flags & FIN and self.snd_wnd == old):
                self.dupacks += 1
                if self.dupacks == DUPACK_THRESHOLD and seq_ge(self.snd_una, self.recover):
                    # RFC 5681 §3.2 fast retransmit, go-back-N from the hole.
                    self.recover = self.snd_max
                    self.retransmits += 1
                    self.rtt_seq = None
                    self.snd_nxt = self.snd_una
                    if self.fin_seq is not None and self.snd_una == self.fin_seq:
                        out.extend(self._send_fin(now))
                    else:
                        out.append((Act.REWIND, None))
        if advanced or self.rto_deadline is None:
            self._arm(now, restart=advanced)
        # Our FIN acknowledged?
        if self.fin_seq is not None and seq_gt(self.snd_una, self.fin_seq):
            st = self.state
            if st is TcpState.FIN_WAIT_1:
                self.state = TcpState.FIN_WAIT_2
            elif st is TcpState.CLOSING:
                self._enter_time_wait(now)
            elif st is TcpState.LAST_ACK:
                self.state = TcpState.CLOSED
                self.rto_deadline = None
                out.append((Act.CLOSE, None))
