"""Sans-I/O TCP for the user-mode NAT: segment parsing and building, and the per-flow
state machine the NAT plays towards the guest (RFC 9293).

Nothing here touches a socket or reads a clock. `TcpCore` is the state machine of one flow,
the readable specification and the pure-Python twin of the compiled voidbox._tcp.TcpCore
(voidbox.net.tcpcore picks one; both have the interface below and are tested alike):

- Entry points take the guest's raw TCP segment (header and payload, checksum already
  checked) or a host event, and a `now`. Each returns an int of action bits (`A_*`): bytes
  the guest acknowledged to drop from the host socket (`consume_n`), a rewind for
  retransmission, shutdown(SHUT_WR), abort or close. Nothing is allocated per segment in
  the compiled twin.
- Segments for the guest are queued in the flow as plain fields (sequence numbers, flags,
  window, SYN options) and written out by `emit` straight into the caller's packet buffer,
  one send(buf, n) per segment; the tests read them with `out_segments`. Host data to send
  is one run (`send_data`), written by `emit_data` from the caller's peek buffer.
- Guest data is handed over in two steps: `guest_segment` says A_DELIVER and where the new
  bytes are in the segment (`deliver_off`, `deliver_len`); the caller writes them to the
  host and reports how many were taken with `delivered`, which finishes the segment
  (acknowledgement, FIN). The guest is acknowledged only as far as the host accepted.

Host-to-guest data is never stored here: the host kernel socket is the buffer, and the flow
only tracks which sequence numbers it covers (`snd_una` is the first unconsumed byte of the
host socket).

`TcpFlow` wraps either twin with the older, list-returning interface ((Act, value) tuples,
Segment objects): the tests play guests and NATs with it. All sequence arithmetic goes
through the wraparound-safe helpers of voidbox.net.fastpath.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable

from voidbox.net.fastpath import (
    build_ip_tcp,
    seq_add,
    seq_diff,
    seq_ge,
    seq_gt,
    seq_le,
    seq_lt,
)

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
IPV6_TCP_OVERHEAD = 60  # IPv6 header (RFC 8200 §3) + TCP header, without options

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


# Action bits an entry point of TcpCore returns (both twins; voidbox/_tcp.pxd repeats them).
A_DELIVER = 0x01  # new guest data at deliver_off, deliver_len: write it, then delivered()
A_CONSUME = 0x02  # consume_n bytes the guest acknowledged: drop them from the host socket
A_REWIND = 0x04  # retransmit from snd_una: the next peek starts at the acknowledged point
A_SHUT_WR = 0x08  # the guest sent FIN: shutdown(SHUT_WR) on the host socket
A_ABORT = 0x10  # reset the host connection (SO_LINGER 0) and forget the flow
A_CLOSE = 0x20  # the flow ended cleanly: close the host socket and forget the flow
A_RST = 0x40  # a RST is among the queued segments (counted by the relay)
A_MALFORMED = 0x80  # the segment could not be parsed: nothing changed

OUT_MAX = 8  # queued segments per flow; no sequence of entry points queues more undrained

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
# The compiled twin keeps the state as an index into this tuple.
STATES = tuple(TcpState)

Actions = list[tuple[Act, object]]
Writer = Callable[[memoryview], int]


class TcpCore:
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

    Output (see the module docstring): the action bits each entry point returns, the
    segment queue (`n_out`, drained by `emit` or `out_segments`), the data run of
    `send_data` (`emit_data`, `data_segments`) and `consume_n`. `last_ack` is the ack field
    of the last segment written for the guest; a pure ACK for new data whose ack differs
    from it is not written by `emit` but left due (`ack_due`), and `flush_ack` sends one
    for the whole batch of guest segments (the relay calls it at the end of a loop turn).
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
        # Output.
        self.consume_n = 0
        self.deliver_off = 0
        self.deliver_len = 0
        self.last_ack: int | None = None
        self.ack_due = False
        # (seq, ack, flags, window, mss option, wscale option, hold: emit may hold it back)
        self._out: list[tuple] = []
        self._data: tuple | None = None  # (seq, ack, window, length, mss, fin) of send_data
        self._mask = 0
        self._pend_fin = False  # guest_segment -> delivered: the segment's FIN
        self._pend_state = TcpState.CLOSED

    @property
    def n_out(self) -> int:
        """Segments queued for the guest."""
        return len(self._out)

    def _queue(self, seq: int, ack: int, flags: int, window: int, mss: int | None = None,
               wscale: int | None = None, hold: bool = True) -> None:
        if len(self._out) >= OUT_MAX:
            raise AssertionError("TcpCore output queue overflow: the caller never drained it")
        if flags & RST:
            self._mask |= A_RST
        self._out.append((seq, ack, flags, window, mss, wscale, hold))

    # ---- construction -------------------------------------------------------------------

    def open_passive(self, tcp, now: float) -> int:
        """Become the flow for the guest's SYN `tcp` (RFC 9293 §3.10.7.2, LISTEN state,
        SYN bit), with `port` and `guest_port` its ports. A_MALFORMED if it does not parse.

        The SYN-ACK waits for `host_connected`: the guest sees the connection only once the
        host connect succeeded.
        """
        try:
            syn = parse_segment(tcp)
        except SegmentError:
            return A_MALFORMED
        self.born = self.last_heard = now
        self.state = TcpState.SYN_RECEIVED
        self.irs = syn.seq
        self.rcv_nxt = seq_add(syn.seq, 1)
        self._take_syn_options(syn.mss, syn.wscale)
        self.snd_wnd = syn.window  # RFC 7323 §2.2: the window of a SYN is never scaled
        self.snd_wl1 = syn.seq
        return 0

    def open_active(self, now: float) -> int:
        """Open the connection towards the guest (port forwards): SYN-SENT, our SYN queued."""
        self._mask = 0
        self.born = self.last_heard = now
        self.state = TcpState.SYN_SENT
        self.snd_nxt = self.snd_max = seq_add(self.iss, 1)
        self._arm(now, restart=True)
        self._syn(SYN, self.iss)
        return self._mask

    def _take_syn_options(self, mss: int | None, wscale: int | None) -> None:
        mss = mss if mss else TCP_DEFAULT_MSS
        # A floor as Linux's tcp_min_snd_mss: a peer announcing a tiny MSS must not make
        # us cut the stream into thousands of segments per window (CVE-2019-11479).
        self.snd_mss = max(TCP_MIN_SND_MSS, min(mss, self.our_mss))
        # RFC 7323 §2.2: scaling is in effect only if both SYNs carried the option.
        self.wscale_ok = self.our_wscale is not None and wscale is not None
        if self.wscale_ok:
            self.snd_wscale = min(wscale, TCP_MAX_WSCALE)
            self.rcv_wscale = self.our_wscale
        else:
            self.snd_wscale = self.rcv_wscale = 0

    def _syn(self, flags: int, seq: int) -> None:
        # The SYN carries our MSS and, when the guest offered scaling (or we open the
        # connection), our shift; its window field is never scaled (RFC 7323 §2.2).
        wscale = None
        if self.state is TcpState.SYN_SENT or self.wscale_ok:
            wscale = self.our_wscale
        self._queue(seq, self.rcv_nxt if flags & ACK else 0, flags,
                    min(self.rcv_wnd, TCP_MAX_WINDOW_FIELD), self.our_mss, wscale)

    # ---- helpers ------------------------------------------------------------------------

    def window_field(self) -> int:
        """The window field for our next segment (scaled, RFC 7323 §2.3)."""
        return min(max(self.rcv_wnd, 0) >> self.rcv_wscale, TCP_MAX_WINDOW_FIELD)

    def _ack(self, hold: bool = True) -> None:
        """A pure ACK for everything received so far, with the current window."""
        self._queue(self.snd_nxt, self.rcv_nxt, ACK, self.window_field(), hold=hold)

    def _reset(self) -> None:
        self._queue(self.snd_nxt, self.rcv_nxt, RST | ACK, 0)

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

    def _abort(self, rst: bool = True) -> int:
        if rst:
            self._reset()
        self.state = TcpState.CLOSED
        self.rto_deadline = self.tw_deadline = None
        self._mask |= A_ABORT
        return self._mask

    def _close(self) -> int:
        self.state = TcpState.CLOSED
        self.rto_deadline = self.tw_deadline = None
        self._mask |= A_CLOSE
        return self._mask

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

    def _limit_reached(self, now: float) -> None:
        """on_timer past _limit_deadline: probe, or reset both sides."""
        st = self.state
        if (st in _KEEPALIVE_STATES and self.ka_sent < self.keepalive_probes):
            self.ka_sent += 1
            self.ka_next = now + self.keepalive_interval
            self._probe()
            return
        self.expired = True
        if st is TcpState.SYN_RECEIVED and not self.synack_sent:
            self._refuse()
        else:
            self._abort()

    @property
    def closed(self) -> bool:
        return self.state is TcpState.CLOSED

    # ---- host events --------------------------------------------------------------------

    def host_connected(self, now: float) -> int:
        """The host connect completed: answer the guest's SYN (RFC 9293 §3.10.7.2)."""
        self._mask = 0
        self.consume_n = 0
        if self.state is not TcpState.SYN_RECEIVED or self.synack_sent:
            return 0
        self.synack_sent = True
        self.snd_nxt = self.snd_max = seq_add(self.iss, 1)
        self._arm(now, restart=True)
        self._syn(SYN | ACK, self.iss)
        return self._mask

    def host_refused(self) -> int:
        """The host connect failed: refuse the guest's SYN the way a closed port does."""
        self._mask = 0
        self.consume_n = 0
        return self._refuse()

    def _refuse(self) -> int:
        self._queue(0, self.rcv_nxt, RST | ACK, 0)
        return self._abort(rst=False)

    def host_eof(self, now: float) -> int:
        """The host sent FIN and every byte before it was sent to the guest: send our FIN."""
        self._mask = 0
        self.consume_n = 0
        if self.fin_seq is not None or self.state not in _SEND_STATES:
            return 0
        self.fin_seq = self.snd_nxt
        if self.state is TcpState.ESTABLISHED:
            self.state = TcpState.FIN_WAIT_1
        elif self.state is TcpState.CLOSE_WAIT:
            self.state = TcpState.LAST_ACK
        self._send_fin(now)
        return self._mask

    def _send_fin(self, now: float) -> None:
        self._queue(self.fin_seq, self.rcv_nxt, FIN | ACK, self.window_field())
        self.snd_nxt = seq_add(self.fin_seq, 1)
        if seq_gt(self.snd_nxt, self.snd_max):
            self.snd_max = self.snd_nxt
        self._arm(now)

    def host_reset(self) -> int:
        """The host connection was reset or failed: reset the guest's side too."""
        self._mask = 0
        self.consume_n = 0
        return self._host_reset()

    def _host_reset(self) -> int:
        if self.state is TcpState.CLOSED:
            return self._mask
        if self.state is TcpState.SYN_RECEIVED and not self.synack_sent:
            return self._refuse()
        return self._abort()

    def window_update(self, now: float) -> int:
        """rcv_wnd grew (the host socket drained): tell the guest (RFC 9293 §3.8.6.2.2)."""
        self._mask = 0
        self.consume_n = 0
        self.guest_blocked = False
        if self.state in _RECV_STATES and self.state is not TcpState.SYN_RECEIVED:
            self._ack()
        return self._mask

    def flush_ack(self) -> int:
        """End of a batch: queue the ACK `emit` left due, unless a later segment already
        carried its ack field. Returns the number of segments queued (0 or 1)."""
        due, self.ack_due = self.ack_due, False
        if not due or self.state is TcpState.CLOSED or self.last_ack == self.rcv_nxt:
            return 0
        self._ack(hold=False)
        return 1

    # ---- host-to-guest data -------------------------------------------------------------

    def send_budget(self) -> int:
        """How many data bytes may be sent now: the guest's window less what is in flight."""
        if self.state not in _SEND_STATES:
            return 0
        budget = seq_diff(seq_add(self.snd_una, self.snd_wnd), self.snd_nxt)
        if self.fin_seq is not None:
            budget = min(budget, seq_diff(self.fin_seq, self.snd_nxt))
        return max(0, budget)

    def send_data(self, n: int, now: float) -> int:
        """Queue n bytes of host data (peeked at offset snd_nxt - snd_una) as one run of
        segments of at most snd_mss, the last with PSH; `emit_data` writes them.

        The caller keeps n within send_budget(). After a rewind, the last retransmitted
        segment also carries our FIN if it was sent before.
        """
        self._mask = 0
        self.consume_n = 0
        self._data = None
        if n <= 0:
            return 0
        new = self.snd_nxt == self.snd_max
        seq = self.snd_nxt
        self.snd_nxt = seq_add(seq, n)
        fin = self.fin_seq is not None and self.snd_nxt == self.fin_seq
        if fin:
            self.snd_nxt = seq_add(self.snd_nxt, 1)
        self._data = (seq, self.rcv_nxt, self.window_field(), n, self.snd_mss, fin)
        self._after_send(new, now)
        return 0

    def data_segments(self) -> list[tuple[int, int, int, int, int, int]]:
        """The run `send_data` queued, as (seq, ack, flags, window, offset, length) per
        segment (offset into the caller's payload); the run is then gone."""
        run, self._data = self._data, None
        if run is None:
            return []
        seq, ack, window, n, mss, fin = run
        out = []
        off = 0
        while off < n:
            length = min(mss, n - off)
            flags = ACK
            if off + length >= n:
                flags |= PSH | (FIN if fin else 0)
            out.append((seq_add(seq, off), ack, flags, window, off, length))
            off += length
        return out

    def emit_data(self, buf, off: int, src_ip, dst_ip, ip_id: int, payload, send) -> int:
        """Write each segment of the queued run (see send_data) as an IPv4 (or, for 16-byte
        addresses, IPv6) packet into buf[off:] and call send(buf, length); returns the
        segments written (IP ids used from ip_id on)."""
        segs = self.data_segments()
        pay = memoryview(payload)
        view = memoryview(buf)[off:]
        for i, (seq, ack, flags, window, start, length) in enumerate(segs):
            n = build_ip_tcp(view, src_ip, dst_ip, (ip_id + i) & 0xFFFF, self.port,
                             self.guest_port, seq, ack, flags, window, b"",
                             pay[start:start + length])
            self.last_ack = ack
            send(buf, n)
        return len(segs)

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

    # ---- output -------------------------------------------------------------------------

    def out_segments(self) -> list[tuple]:
        """The queued segments as (seq, ack, flags, window, mss option, wscale option), each
        option None when absent; the queue is then empty. No ACK is held back."""
        out, self._out = self._out, []
        for _seq, ack, flags, _w, _m, _s, _h in out:
            if flags & ACK:
                self.last_ack = ack
        return [e[:6] for e in out]

    def emit(self, buf, off: int, src_ip, dst_ip, ip_id: int, clamp: bool, send) -> int:
        """Write each queued segment as an IPv4 (or IPv6) packet into buf[off:] and call
        send(buf, length); returns the segments written (IP ids used from ip_id on).

        A pure ACK for new guest data (its ack differs from `last_ack`, its seq is snd_nxt)
        is held back and `ack_due` set: one ACK per batch is enough (see flush_ack).
        clamp: the host refused batched data, so no ack field may exceed rcv_nxt.
        """
        out, self._out = self._out, []
        view = memoryview(buf)[off:]
        sent = 0
        for seq, ack, flags, window, mss, wscale, hold in out:
            if hold and flags == ACK and ack != self.last_ack and seq == self.snd_nxt:
                self.ack_due = True
                continue
            if flags & ACK:
                if clamp and seq_gt(ack, self.rcv_nxt):
                    ack = self.rcv_nxt
                self.last_ack = ack
            opts = b""
            if flags & SYN:
                opts = Segment(0, 0, 0, 0, flags, 0, b"", mss, wscale).options()
            n = build_ip_tcp(view, src_ip, dst_ip, (ip_id + sent) & 0xFFFF, self.port,
                             self.guest_port, seq, ack, flags, window, opts, b"")
            sent += 1
            send(buf, n)
        return sent

    def holds_unacked_ack(self) -> bool:
        """Would `emit` write a segment now (not only hold back an ACK)? The relay then
        sends its batched guest data first, so that segment may acknowledge it."""
        for seq, ack, flags, _w, _m, _s, hold in self._out:
            if not (hold and flags == ACK and ack != self.last_ack and seq == self.snd_nxt):
                return True
        return False

    # ---- timers -------------------------------------------------------------------------

    def on_timer(self, now: float) -> int:
        """Retransmission (RFC 6298 §5.4-5.6), zero-window probes (RFC 9293 §3.8.6.1),
        TIME-WAIT expiry and the lifetime limits (keepalive probes, timeouts). Harmless to
        call early."""
        self._mask = 0
        self.consume_n = 0
        if self.tw_deadline is not None and now >= self.tw_deadline:
            return self._close()
        limit = self._limit_deadline()
        if limit is not None and now >= limit:
            self._limit_reached(now)
            if self.state is TcpState.CLOSED:
                return self._mask
        if self.rto_deadline is None or now < self.rto_deadline:
            return self._mask
        self.retries += 1
        if self.retries > self.max_retries:
            self.snd_nxt = self.snd_una
            return self._abort()
        self.rto = min(self.rto * 2, self.rto_max)  # RFC 6298 §5.5
        self.rtt_seq = None  # Karn's algorithm: no sample from a retransmitted segment
        self.rto_deadline = now + self.rto
        if self.state is TcpState.SYN_SENT:
            self._syn(SYN, self.iss)
        elif self.state is TcpState.SYN_RECEIVED:
            self._syn(SYN | ACK, self.iss)
        elif self._in_flight_any():
            self.retransmits += 1
            self.snd_nxt = self.snd_una
            self.dupacks = 0
            if self.fin_seq is not None and self.snd_una == self.fin_seq:
                self._send_fin(now)
            elif self.snd_wnd == 0:
                # The guest closed its window with our data outstanding: what it dropped
                # goes again from snd_una once it reopens; until then, probe.
                self._mask |= A_REWIND
                self._probe()
            else:
                self._mask |= A_REWIND
        elif self._probe_needed():
            self._probe()
        else:
            self.rto_deadline = None
        return self._mask

    def _probe(self) -> None:
        # Zero-window probe (RFC 9293 §3.8.6.1) the way Linux sends it: an ACK one below
        # snd_una is outside the guest's window, so it answers with its current window
        # (RFC 9293 §3.10.7.4 first check).
        self._queue(seq_add(self.snd_una, -1), self.rcv_nxt, ACK, self.window_field())

    # ---- guest segments -----------------------------------------------------------------

    def in_order(self, tcp) -> bool:
        """Is `tcp` plain in-order data or ACK for ESTABLISHED (no SYN, RST or FIN, its seq
        rcv_nxt)? Its only answer is then an ACK, so the relay may batch its data."""
        if len(tcp) < TCP_HEADER_LEN:
            return False
        _sp, _dp, seq, _ack, _off, flags = struct.unpack_from("!HHIIBB", tcp)
        return (not flags & (SYN | RST | FIN) and self.state is TcpState.ESTABLISHED
                and seq == self.rcv_nxt)

    def guest_segment(self, tcp, now: float) -> int:
        """Process one segment from the guest (RFC 9293 §3.10.7.3, §3.10.7.4), its TCP
        header and payload `tcp` (the checksum is the caller's to check).

        With A_DELIVER in the result, the new data is tcp[deliver_off:deliver_off +
        deliver_len]: the caller writes it to the host and calls delivered() with how many
        bytes the host took; the segment is finished there.
        """
        try:
            seg = parse_segment(tcp)
        except SegmentError:
            return A_MALFORMED
        self._mask = 0
        self.consume_n = 0
        return self._segment(seg, len(tcp) - len(seg.payload), now)

    def _segment(self, seg: Segment, hlen: int, now: float) -> int:
        st = self.state
        flags = seg.flags
        self.last_heard = now  # the guest is there (lifetime limits)
        self.ka_sent = 0
        if st is TcpState.CLOSED:
            rst = reset_for(seg)
            if rst is not None:
                self._queue(rst.seq, rst.ack, rst.flags, 0)
            return self._mask
        if st is TcpState.SYN_SENT:
            return self._syn_sent(seg, now)
        if st is TcpState.SYN_RECEIVED and not self.synack_sent:
            # Still connecting to the host: a retransmitted SYN must not disturb the flow.
            if flags & RST and seg.seq == self.rcv_nxt:
                return self._abort(rst=False)
            return self._mask

        # First check: sequence number. Only the RST case and the trimming need it here.
        if flags & RST:
            # RFC 9293 §3.10.7.4: RST valid if its seq is in the receive window. The guest
            # is our own link's peer; accept the window (and the exact match) rather than
            # challenge, since a blocked host socket can leave the guest's snd_nxt ahead.
            span = max(self.window_field() << self.rcv_wscale, TCP_MAX_WINDOW_FIELD)
            if seq_ge(seg.seq, self.rcv_nxt) and seq_lt(seg.seq, seq_add(self.rcv_nxt, span)):
                if st is TcpState.TIME_WAIT:
                    return self._close()
                return self._abort(rst=False)
            return self._mask
        if flags & SYN:
            if st is TcpState.SYN_RECEIVED and seg.seq == self.irs and not flags & ACK:
                # Duplicate SYN: our SYN-ACK was lost; send it again.
                self._syn(SYN | ACK, self.iss)
                return self._mask
            # RFC 9293 §3.10.7.4 fourth check (RFC 5961 §4): challenge ACK.
            self._ack()
            return self._mask
        if not flags & ACK:
            return self._mask  # fifth check: a segment without ACK is dropped

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
                self._queue(seg.ack, 0, RST, 0)
                return self._mask
        else:
            if seq_gt(seg.ack, self.snd_max):
                # RFC 9293 §3.10.7.4: ACK for data not yet sent: ACK and drop.
                self._ack()
                return self._mask
            self._process_ack(seg, now)
            st = self.state
            if st is TcpState.CLOSED:
                return self._mask

        # Sixth/seventh: segment text and FIN.
        plen = len(seg.payload)
        fin = bool(flags & FIN)
        if plen == 0 and not fin:
            if seq_lt(seg.seq, self.rcv_nxt):
                # RFC 9293 §3.10.7.4 first check: an unacceptable segment (here a
                # zero-window probe or keepalive below rcv_nxt) is answered with an ACK.
                self._ack()
            return self._mask
        seg_end = seq_add(seg.seq, plen + (1 if fin else 0))
        if seq_le(seg_end, self.rcv_nxt):
            # Entirely old: a retransmission of data (or a FIN) already acknowledged.
            if st is TcpState.TIME_WAIT and fin:
                self.tw_deadline = now + self.time_wait  # RFC 9293 §3.10.7.4 TIME-WAIT
            self._ack()
            return self._mask
        if seq_gt(seg.seq, self.rcv_nxt):
            # Out of order: never written ahead of the gap; a duplicate ACK asks for it.
            self._ack()
            return self._mask
        if st not in _RECV_STATES:
            # New data after the guest's FIN: nothing to deliver it to.
            self._ack()
            return self._mask
        # In order, possibly starting before rcv_nxt: trim what the host already has.
        skip = seq_diff(self.rcv_nxt, seg.seq)
        if plen > skip:
            self.deliver_off = hlen + skip
            self.deliver_len = plen - skip
            self._pend_fin = fin
            self._pend_state = st
            self._mask |= A_DELIVER
            return self._mask
        return self._finish(fin, True, st, now)

    def delivered(self, n: int, now: float) -> int:
        """After A_DELIVER: the host took n of the deliver_len bytes (-1: the host
        connection is broken). Finishes the segment; returns the action bits of this step."""
        self._mask = 0
        if n < 0:
            self._out = []
            return self._host_reset()
        accepted_all = True
        if n:
            self.rcv_nxt = seq_add(self.rcv_nxt, n)
        if n < self.deliver_len:
            accepted_all = False
            self.guest_blocked = True
        return self._finish(self._pend_fin, accepted_all, self._pend_state, now)

    def _finish(self, fin: bool, accepted_all: bool, st: TcpState, now: float) -> int:
        if fin and accepted_all:
            self.rcv_nxt = seq_add(self.rcv_nxt, 1)
            self.fin_received = True
            self._mask |= A_SHUT_WR
            if st in (TcpState.SYN_RECEIVED, TcpState.ESTABLISHED):
                self.state = TcpState.CLOSE_WAIT
            elif st is TcpState.FIN_WAIT_1:
                self.state = TcpState.CLOSING
            elif st is TcpState.FIN_WAIT_2:
                self._enter_time_wait(now)
        self._ack()
        return self._mask

    def _enter_time_wait(self, now: float) -> None:
        self.state = TcpState.TIME_WAIT
        self.rto_deadline = None
        self.tw_deadline = now + self.time_wait

    def _syn_sent(self, seg: Segment, now: float) -> int:
        # RFC 9293 §3.10.7.3.
        flags = seg.flags
        if flags & ACK and seg.ack != self.snd_max:
            if not flags & RST:
                self._queue(seg.ack, 0, RST, 0)
            return self._mask
        if flags & RST:
            if flags & ACK:
                return self._abort(rst=False)  # the guest port is closed
            return self._mask
        if not flags & SYN or not flags & ACK:
            return self._mask  # simultaneous open is not supported
        self.irs = seg.seq
        self.rcv_nxt = seq_add(seg.seq, 1)
        self._take_syn_options(seg.mss, seg.wscale)
        self.snd_una = seg.ack
        self.snd_wnd = seg.window  # never scaled in a SYN (RFC 7323 §2.2)
        self.snd_wl1 = seg.seq
        self.snd_wl2 = seg.ack
        self.state = TcpState.ESTABLISHED
        self.retries = 0
        self._arm(now, restart=True)
        self._ack()
        return self._mask

    def _process_ack(self, seg: Segment, now: float) -> None:
        ack = seg.ack
        advanced = seq_gt(ack, self.snd_una)
        if advanced:
            acked = seq_diff(ack, self.snd_una)
            data = acked
            if self.fin_seq is not None and seq_gt(ack, self.fin_seq):
                data -= 1  # the FIN occupies a sequence number but no host byte
            if data > 0:
                self.consume_n += data
                self._mask |= A_CONSUME
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
                        self._send_fin(now)
                    else:
                        self._mask |= A_REWIND
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
                self._close()


def segment_bytes(seg: Segment) -> bytes:
    """A Segment as TCP header, options and payload (checksum left 0), as parsed again."""
    opts = seg.options()
    off = (TCP_HEADER_LEN + len(opts)) // 4 << 4
    return (_HDR.pack(seg.src_port, seg.dst_port, seg.seq, seg.ack, off, seg.flags, seg.window,
                      0, 0) + opts + bytes(seg.payload))


def _default_core():
    from voidbox.net.tcpcore import TcpCore as impl  # noqa: PLC0415  (tcpcore imports us)
    return impl


class TcpFlow:
    """A TcpCore (either twin) behind the list-returning interface: each call returns the
    actions `(Act, value)` to carry out, segments as Segment objects; guest data is handed
    to a `write` callable, acknowledged as far as it accepted. The tests play guests and
    NATs with it; the relay drives TcpCore directly.

    Attributes not defined here are the core's (state, snd_nxt, rcv_wnd, deadline, ...).
    """

    __slots__ = ("core",)

    def __init__(self, core):
        object.__setattr__(self, "core", core)

    def __getattr__(self, name):
        return getattr(self.core, name)

    def __setattr__(self, name, value):
        setattr(self.core, name, value)

    @classmethod
    def accept(cls, syn: Segment, iss: int, now: float, *, impl=None, **kw) -> TcpFlow:
        """A flow for a guest SYN (see TcpCore.open_passive)."""
        core = (impl or _default_core())(syn.dst_port, syn.src_port, iss, **kw)
        if core.open_passive(segment_bytes(syn), now) & A_MALFORMED:
            raise SegmentError("the SYN does not parse")
        return cls(core)

    @classmethod
    def connect(cls, port: int, guest_port: int, iss: int, now: float, *, impl=None,
                **kw) -> tuple[TcpFlow, Actions]:
        """A flow we open towards the guest: SYN-SENT and the SYN to send."""
        flow = cls((impl or _default_core())(port, guest_port, iss, **kw))
        return flow, flow._actions(flow.core.open_active(now))

    def _actions(self, mask: int, payload=None) -> Actions:
        core = self.core
        out: Actions = []
        if mask & A_CONSUME:
            out.append((Act.CONSUME, core.consume_n))
        for seq, ack, flags, window, mss, wscale in core.out_segments():
            out.append((Act.SEND, Segment(core.port, core.guest_port, seq, ack, flags, window,
                                          b"", mss, wscale)))
        if payload is not None:
            pay = memoryview(payload)
            for seq, ack, flags, window, start, length in core.data_segments():
                out.append((Act.SEND, Segment(core.port, core.guest_port, seq, ack, flags,
                                              window, pay[start:start + length])))
        if mask & A_REWIND:
            out.append((Act.REWIND, None))
        if mask & A_SHUT_WR:
            out.append((Act.SHUT_WR, None))
        if mask & A_ABORT:
            out.append((Act.ABORT, None))
        elif mask & A_CLOSE:
            out.append((Act.CLOSE, None))
        return out

    def guest_segment(self, seg: Segment, now: float, write: Writer | None) -> Actions:
        core = self.core
        raw = segment_bytes(seg)
        mask = core.guest_segment(raw, now)
        if mask & A_DELIVER:
            off = core.deliver_off
            n = write(memoryview(raw)[off:off + core.deliver_len])
            mask = (mask & ~A_DELIVER) | core.delivered(n, now)
        return self._actions(mask)

    def send_data(self, payload, now: float) -> Actions:
        n = len(payload)
        return self._actions(self.core.send_data(n, now), payload)

    def on_timer(self, now: float) -> Actions:
        return self._actions(self.core.on_timer(now))

    def host_connected(self, now: float) -> Actions:
        return self._actions(self.core.host_connected(now))

    def host_refused(self) -> Actions:
        return self._actions(self.core.host_refused())

    def host_eof(self, now: float) -> Actions:
        return self._actions(self.core.host_eof(now))

    def host_reset(self) -> Actions:
        return self._actions(self.core.host_reset())

    def window_update(self, now: float) -> Actions:
        return self._actions(self.core.window_update(now))

    def ack_segment(self) -> Segment:
        """A pure ACK for everything received so far, with the current window."""
        core = self.core
        return Segment(core.port, core.guest_port, core.snd_nxt, core.rcv_nxt, ACK,
                       core.window_field())

    def _reset_segment(self) -> Segment:
        core = self.core
        return Segment(core.port, core.guest_port, core.snd_nxt, core.rcv_nxt, RST | ACK, 0)


def flow_key(src_ip, dst_ip, tcp) -> int:
    """The flow table's key for a guest segment: its addresses (4 or 16 bytes each, opaque)
    and ports as one int. The segment must hold at least its two ports."""
    return int.from_bytes(bytes(src_ip) + bytes(dst_ip) + bytes(tcp[:4]), "big")
