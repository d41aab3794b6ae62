"""The user-mode NAT's TCP relay: guest TCP flows <-> non-blocking host sockets.

Each guest connection is a TcpCore (the sans-I/O state machine facing the guest: the
compiled voidbox._tcp or its pure twin in voidbox.net.tcp, as voidbox.net.tcpcore picks)
plus one host socket, driven by the network thread's EventLoop. Flows are found by
tcpcore.flow_key (the addresses, opaque 4 or 16 bytes, and the ports as one int); the
core's action bits say what to do and its emit() writes the segments it queued straight
into the packet buffer, so no Segment or list is made per guest segment. As in passt, the
host kernel socket is the buffer:

- Host-to-guest data is peeked at an offset (SO_PEEK_OFF, socket(7)) and consumed only when
  the guest acknowledges it (once per flow per loop turn, however many ACKs the turn
  brought); a retransmission peeks again from the acknowledged point.
  Kernels without SO_PEEK_OFF for TCP get a fallback that peeks from 0 and skips the bytes
  in flight (in-flight data is then capped by the peek buffer).
- Guest-to-host data is acknowledged only as far as send() accepted it; EAGAIN leaves the
  rest unacknowledged (the guest retransmits) and arms EPOLLOUT for a window update.
- The window advertised to the guest is the host socket's free send buffer
  (SO_SNDBUF vs SIOCOUTQ), re-read at most every WINDOW_CACHE_S.
- Connects are asynchronous (EINPROGRESS, then EPOLLOUT); the guest gets its SYN-ACK only
  once the host connect succeeded, a RST if it failed or if policy denies the destination.
- ACKs that only acknowledge new guest data are coalesced to one per flow per loop turn
  (call_soon: still this turn, never a timer); duplicate ACKs go out at once, since the
  guest's fast retransmit counts them.
- The ACK of the guest's FIN is the one ACK that waits longer: while the host's side is
  still open it is held for up to FIN_ACK_DELAY_S, so the host's own FIN (a server closes
  once it reads EOF) or its last data carries it, and a connection the guest closes first
  ends with three segments, not four (RFC 1122 §4.2.3.2 allows delaying an ACK).
- Consecutive in-order data segments of one flow in one TAP batch go to the host in one
  sendmsg(2) at the end of the loop turn (or at a PSH, which ends a guest write), before
  that turn's ACK. Whatever the kernel refuses is taken back (rcv_nxt rewinds) before any
  segment acknowledges it: any segment for the guest, any other guest segment and any
  host event or timer of the flow flush the batch first.
- A loopback connect() completes inside the call: the SYN-ACK then goes out at once.
- A flow that cannot make progress is not polled: EPOLLIN only while nothing is in flight
  and the guest's window is open (an ACK or window update pumps once the turn's frames
  are in), EPOLLOUT only while guest data is blocked on a full socket. The loop never
  spins on a flow.
- Flows do not live forever when the guest side is gone (its RST lost): the lifetime
  limits of TcpCore (keepalive probes after NatConfig.tcp_idle_timeout, 7200 s, without a
  guest segment, 9 probes 75 s apart; half-open and unacknowledged-FIN flows after 60 s)
  reset the host connection (SO_LINGER 0) and send the guest a RST.
- A flow is freed by reference counting as soon as it ends (see _Flow).
- IPv6 flows are the same flows with 16-byte addresses (flow_key, TcpCore and emit take
  either): an AF_INET6 host socket, fd00::2 translated to the host's ::1, an MSS 20
  bytes smaller for the longer header, IPv6 headers and pseudo-header checksums in the
  segments (the TAP's stream sender and a VM card's ring stream write them too; a port
  without IPv6 support leaves IPv6 flows on the Python path).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import weakref
from collections.abc import Callable
from functools import partial

from voidbox.errors import VoidboxError
from voidbox.eventloop import WATCH_FAILED
from voidbox.net.fastpath import (
    STREAM_BLOCKED,
    STREAM_DRAINED,
    STREAM_EOF,
    FramePort,
    build_ip_tcp,
    seq_add,
    seq_gt,
    tcp_checksum,
)
from voidbox.net.limits import EXHAUSTION_ERRNOS, Exhaustion
from voidbox.net.packets import ETH_HLEN
from voidbox.net.tcp import (
    A_ABORT,
    A_CLOSE,
    A_CONSUME,
    A_DELIVER,
    A_MALFORMED,
    A_REWIND,
    A_RST,
    A_SHUT_WR,
    ACK,
    FIN,
    IPV4_TCP_OVERHEAD,
    IPV6_TCP_OVERHEAD,
    PSH,
    RST,
    SYN,
    TCP_HEADER_LEN,
    Segment,
    SegmentError,
    TcpState,
    parse_segment,
    reset_for,
)
from voidbox.net.tcpcore import TcpCore, flow_key

from .._lazylog import get_logger

log = get_logger(__name__)

SO_PEEK_OFF = getattr(socket, "SO_PEEK_OFF", 42)  # socket(7); TCP support since Linux 6.9
SO_MEMINFO = getattr(socket, "SO_MEMINFO", 55)  # socket(7): u32 array, sock_diag(7) order
SK_MEMINFO_SNDBUF = 3
SK_MEMINFO_WMEM_QUEUED = 5
SK_MEMINFO_VARS = 9
_MEMINFO = struct.Struct(f"{SK_MEMINFO_VARS}I")
EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR

WSCALE = 7  # our window shift: 65535 << 7 is an 8 MiB window (RFC 7323 §2.3)
MAX_WINDOW = 0xFFFF << WSCALE
PEEK_BUF = 256 * 1024  # one peek; the fallback path also caps in-flight data at this
DISCARD_BUF = 256 * 1024  # recv(MSG_TRUNC) copies nothing, but Python wants a buffer this big
PUMP_CAP = 1024 * 1024  # bytes one flow may send per turn before yielding to other flows
WINDOW_CACHE_S = 0.005  # getsockopt(SO_MEMINFO) for the window at most this often per flow
# How long the ACK of the guest's FIN waits for the host's FIN to carry it: Linux's own
# minimum delayed ACK (TCP_DELACK_MIN), far below any retransmission timeout of the guest's
# FIN (RFC 6298: at least 1 s; Linux: 200 ms).
FIN_ACK_DELAY_S = 0.04
# A fixed host send buffer: autotuning only grows sk_sndbuf after writes hit the limit, which
# a relay that advertises only the free space never does. socket(7): the kernel doubles it
# and caps the request at net.core.wmem_max. The memory is used only while data is queued.
HOST_SNDBUF = 2 * 1024 * 1024
ACCEPT_BATCH = 64  # port-forward accepts per readiness event
ACCEPT_RETRY_S = 0.1  # a listener waits this long after accept() ran out of fds
EPHEMERAL_LO, EPHEMERAL_HI = 32768, 60999  # source ports of forwarded connections
PACKET_BUF = 65536
# Guest segments gathered into one sendmsg(2): a TAP read batch is 64 frames, and the
# iovec stays far below IOV_MAX (1024).
TX_BATCH_MAX = 64
TCP_FLAGS_OFFSET = 13  # RFC 9293 §3.1: the control bits' byte in the TCP header
_PORTS = struct.Struct("!HH")
ISS_POOL = 1024  # initial sequence numbers drawn from os.urandom at a time
_ISS_WORDS = struct.Struct(f"{ISS_POOL}I")


class _Flow:
    """One relayed connection: the guest-facing TcpCore and its host socket.

    A flow must be freed by reference counting the moment it ends: the network loop runs
    the cyclic garbage collector rarely (run.GC_THRESHOLDS), so anything in a cycle with a
    flow stays in memory until a full collection. Timer callbacks hold the flow only weakly
    (a cancelled timer stays in the loop's heap until the heap is rebuilt); the epoll
    watcher is removed with the socket. Nothing else outside TcpNat.flows refers to a flow
    beyond the current loop turn.
    """

    __slots__ = ("key", "core", "sock", "fd", "guest_ip", "remote_ip", "events", "connecting",
                 "timer", "timer_when", "peek_off", "host_eof", "win_base", "win_time",
                 "written", "want_out", "pump_scheduled", "bytes_up", "bytes_down",
                 "forwarded", "tx_bufs", "tx_len", "queued", "unconsumed", "ack_timer",
                 "__weakref__")

    def __init__(self, key: int, core: TcpCore, sock: socket.socket, guest_ip: bytes,
                 remote_ip: bytes):
        self.key = key
        self.core = core
        self.sock: socket.socket | None = sock
        self.fd = sock.fileno()
        self.guest_ip = guest_ip
        self.remote_ip = remote_ip
        self.events = 0
        self.connecting = False
        self.timer = None
        self.timer_when = 0.0
        self.peek_off = 0  # the kernel's SO_PEEK_OFF as we last left it
        self.host_eof = False
        self.win_base = 0
        self.win_time = -1e9
        self.written = 0
        self.want_out = False
        self.pump_scheduled = False
        self.bytes_up = 0  # guest -> host
        self.bytes_down = 0  # host -> guest
        self.forwarded = False
        self.tx_bufs: list = []  # in-order guest data accepted, sent at the end of the turn
        self.tx_len = 0
        self.queued = False  # in TcpNat._turn_queue
        self.unconsumed = 0  # acknowledged bytes still at the head of the host socket
        self.ack_timer = None  # the held ACK of the guest's FIN (see _hold_fin_ack)


_LIMITS = (("idle_timeout", "tcp_idle_timeout"), ("keepalive_interval", "tcp_keepalive_interval"),
           ("keepalive_probes", "tcp_keepalive_probes"),
           ("handshake_timeout", "tcp_handshake_timeout"), ("fin_timeout", "tcp_fin_timeout"))


def flow_limits(config) -> dict:
    """TcpCore's lifetime-limit keywords from NatConfig's tcp_* fields (those it has)."""
    return {kw: getattr(config, name) for kw, name in _LIMITS if hasattr(config, name)}


class TcpNat:
    """TCP for the user-mode NAT (see the module docstring).

    send_ip(packet) takes a whole IPv4 packet for the guest. Counters (all prefixed tcp_)
    are in `counters`; per-flow byte and retransmit counts come from flow_stats().
    """

    def __init__(self, loop, send_ip: Callable[[bytes], None], policy, config,
                 send_ip_buf: Callable[[bytearray, int], None] | None = None):
        """send_ip_buf(buf, n), if given, sends buf[ETH_HLEN:ETH_HLEN + n] and may fill
        buf[:ETH_HLEN] (Engine.send_ip_buf): segments are then built in place, uncopied."""
        self.loop = loop
        self.send_ip = send_ip
        self.send_ip_buf = send_ip_buf
        if send_ip_buf is not None:
            self._send_pkt = send_ip_buf
        else:
            self._send_pkt = lambda buf, n: send_ip(bytes(buf[ETH_HLEN:ETH_HLEN + n]))
        self.policy = policy
        self.config = config
        self.mss = config.mtu - IPV4_TCP_OVERHEAD  # RFC 9293 §3.7.1: MSS excludes both headers
        self.mss6 = config.mtu - IPV6_TCP_OVERHEAD  # RFC 8200 §3: a 40-byte header
        self.guest_ip = socket.inet_aton(config.guest_ip)
        self.gateway_ip = socket.inet_aton(config.gateway_ip)
        self.dns_ip = socket.inet_aton(config.dns_ip)
        self.dns_ip6 = socket.inet_pton(socket.AF_INET6, config.dns_ip6)
        self.flows: dict[int, _Flow] = {}  # by flow_key
        # Flows open against --max-flows: this table's, or (Engine) every relay's together.
        self.open_flows: Callable[[], int] = self.flow_count
        self.listeners: dict[int, tuple[socket.socket, int]] = {}
        self.counters: dict[str, int] = {}
        self.exhaustion = Exhaustion(self.counters)
        self._pkt = bytearray(ETH_HLEN + PACKET_BUF)  # room for the guest's Ethernet header
        self._pkt_ip = memoryview(self._pkt)[ETH_HLEN:]
        self._peek = bytearray(PEEK_BUF)
        self._peek_mv = memoryview(self._peek)
        self._discard = bytearray(DISCARD_BUF)
        self._ip_id = 0
        self._next_port = EPHEMERAL_LO
        self.peek_off_supported: bool | None = None
        self._fresh_free = 0  # a new socket's free send buffer (see _refresh_window)
        self._iss_pool: list[int] = []
        rate = config.max_conn_rate
        self._tokens = max(1.0, float(rate)) if rate is not None else 0.0  # bucket starts full
        self._token_time = loop.time()
        # TcpCore keywords: the lifetime limits from the config (a config without them,
        # as tests' stand-ins, means no limits); tests also shorten timers here.
        self.flow_kw = flow_limits(config)
        self._turn_queue: list[_Flow] = []  # flows with a coalesced ACK or batched data
        # set_stream_port: host data then goes socket -> frames -> TAP in one Cython call.
        self.stream_port = None
        self.stream_v6 = False  # whether the stream port writes IPv6 headers too
        self._eth_header: Callable[[bool], bytes] | None = None
        self._port_blocked: Callable[[], None] | None = None
        self._waiting_port: dict[int, _Flow] = {}  # flows stopped by a full port
        # guest_room() -> frames the guest side takes now without dropping (a NIC's RX
        # backlog room); None: unbounded. At 0 flows wait for port_writable().
        self.guest_room: Callable[[], int] | None = None

    def set_stream_port(self, port, eth_header: Callable[[bool], bytes],
                        blocked: Callable[[], None]) -> None:
        """Send host data straight to `port` (a FramePort) with port.send_tcp_stream.

        eth_header(ipv6) gives the Ethernet header of a frame to the guest (its MAC may
        change; the EtherType follows the family);
        blocked() asks to be told, through port_writable(), when the port takes frames again.
        Without SO_PEEK_OFF (old kernels) the Python path stays in use.
        """
        self.stream_port = port
        # FramePort, and a card's RingStream (streams_ipv6), write IPv6 frames too.
        self.stream_v6 = isinstance(port, FramePort) or getattr(port, "streams_ipv6", False)
        self._eth_header = eth_header
        self._port_blocked = blocked

    def port_writable(self) -> None:
        """The stream port drained: resume the flows it stopped."""
        waiting, self._waiting_port = self._waiting_port, {}
        for f in waiting.values():
            if self.flows.get(f.key) is f and not f.pump_scheduled:
                f.pump_scheduled = True
                self.loop.call_soon(lambda f=f: self._deferred_pump(f))

    # ---- bookkeeping --------------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def flow_count(self) -> int:
        return len(self.flows)

    def active_flow_count(self) -> int:
        """Flows that may still carry data (not in TIME-WAIT or closed)."""
        done = (TcpState.TIME_WAIT, TcpState.CLOSED)
        return sum(1 for f in self.flows.values() if f.core.state not in done)

    def flow_stats(self) -> list[dict]:
        """Per-flow counters: addresses, state, bytes each way, retransmissions."""
        return [{
            "guest": (_ntop(f.guest_ip), f.core.guest_port),
            "remote": (_ntop(f.remote_ip), f.core.port),
            "state": f.core.state.value,
            "bytes_up": f.bytes_up,
            "bytes_down": f.bytes_down,
            "retransmits": f.core.retransmits,
        } for f in self.flows.values()]

    # ---- guest side ---------------------------------------------------------------------

    def guest_segment(self, src_ip: bytes, dst_ip: bytes, tcp: memoryview,
                      csum_verified: bool = False) -> None:
        """A TCP segment from the guest (IPv4 header already validated by the engine).

        csum_verified: the frontend vouches for the checksum (virtio_net_hdr NEEDS_CSUM or
        DATA_VALID), so it is not checked; a partial checksum would not verify anyway.
        """
        if not csum_verified and tcp_checksum(src_ip, dst_ip, tcp) != 0:
            self._count("tcp_bad_checksum")
            return
        if len(tcp) < TCP_HEADER_LEN:
            self._count("tcp_malformed")
            return
        key = flow_key(src_ip, dst_ip, tcp)
        f = self.flows.get(key)
        now = self.loop.time()
        if f is not None and f.core.state is TcpState.TIME_WAIT:
            try:
                seg = parse_segment(tcp)
            except SegmentError:
                self._count("tcp_malformed")
                return
            if seg.flags & (SYN | ACK | RST) == SYN and seq_gt(seg.seq, f.core.rcv_nxt):
                # RFC 9293 §3.10.7.4 TIME-WAIT: a new SYN above the old sequence space
                # reopens.
                self._close(f, rst=False)
                f = None
        if f is None:
            try:
                seg = parse_segment(tcp)
            except SegmentError:
                self._count("tcp_malformed")
                return
            src_ip = bytes(src_ip)
            dst_ip = bytes(dst_ip)
            if seg.flags & (SYN | ACK | RST | FIN) == SYN:
                self._open(key, seg, tcp, src_ip, dst_ip, now)
            else:
                self._reset_unknown(seg, src_ip, dst_ip)
            return
        self._refresh_window(f, now)
        core = f.core
        # Only plain in-order data in ESTABLISHED may be batched: then the core's only
        # answer is a (coalesced) ACK, so nothing acknowledges the data before it is sent.
        batch = core.in_order(tcp) and not f.want_out and f.sock is not None
        if f.tx_bufs and not batch:
            self._flush_tx(f)
        mask = core.guest_segment(tcp, now)
        if mask & A_DELIVER:
            off = core.deliver_off
            n = self._deliver(f, tcp[off:off + core.deliver_len], batch)
            mask = (mask & ~A_DELIVER) | core.delivered(n, now)
        elif mask & A_MALFORMED:
            self._count("tcp_malformed")
            return
        if f.tx_bufs and tcp[TCP_FLAGS_OFFSET] & PSH:
            # PSH ends one write of the guest's application (RFC 9293 §3.9.1): a request
            # waits for its answer, so it goes now; bulk data waits for the turn's end.
            self._flush_tx(f)
        if core.rcv_wnd < 2 * self.mss and f.sock is not None and not core.fin_received:
            # We are (nearly) closing the guest's window: have EPOLLOUT tell us once the
            # host socket drains, for a window update (one-shot, re-armed by guest traffic).
            f.want_out = True
        self._apply(f, mask, now)
        if self.flows.get(key) is f and not f.events & EPOLLIN and not f.pump_scheduled:
            # An ACK or window update may let more host data go out; the socket is not
            # being polled while data is in flight, so pump from here: once, after the
            # rest of the TAP batch (a wakeup brings dozens of ACKs), with one peek.
            f.pump_scheduled = True
            self.loop.call_soon(lambda: self._deferred_pump(f))
        self._settle(f, now)

    def _reset_unknown(self, seg: Segment, guest_ip: bytes, remote_ip: bytes) -> None:
        rst = reset_for(seg)
        if rst is None:
            return
        self._count("tcp_rst_unknown_flow")
        self._send(remote_ip, guest_ip, rst)

    def _refuse(self, seg: Segment, guest_ip: bytes, remote_ip: bytes, counter: str) -> None:
        self._count(counter)
        self._send(remote_ip, guest_ip, reset_for(seg))

    def _rate_ok(self, now: float) -> bool:
        rate = self.config.max_conn_rate
        if rate is None:
            return True
        burst = max(1.0, float(rate))
        self._tokens = min(burst, self._tokens + (now - self._token_time) * rate)
        self._token_time = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _open(self, key: int, seg: Segment, tcp, guest_ip: bytes, remote_ip: bytes,
              now: float) -> None:
        dport = seg.dst_port
        if self.open_flows() >= self.config.max_flows:
            self._refuse(seg, guest_ip, remote_ip, "tcp_flow_limit")
            return
        if not self._rate_ok(now):
            self._refuse(seg, guest_ip, remote_ip, "tcp_rate_limited")
            return
        v6 = len(remote_ip) == 16
        visible = _ntop(remote_ip)
        endpoint = self.config.host_endpoint(visible, dport)
        if endpoint is None:
            # Another address of the guest's subnet, or the DNS address off port 53.
            self._refuse(seg, guest_ip, remote_ip, "tcp_unreachable")
            return
        host_ip, host_port = endpoint
        # DNS over TCP is the NAT's own service, as over UDP: the policy does not apply.
        if remote_ip not in (self.dns_ip, self.dns_ip6) and not self.policy.allows(
                "tcp", host_ip, host_port, guest_dst=visible):
            self._refuse(seg, guest_ip, remote_ip, "tcp_denied")
            return
        # The host socket's family is the host endpoint's: fd00::3:53 may be relayed to an
        # IPv4 upstream, and the guest's family stays what it sent.
        family = socket.AF_INET6 if ":" in host_ip else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                                 | socket.SOCK_CLOEXEC)
        except OSError as e:  # EMFILE and the like: refuse now, the guest is not left hanging
            self.exhaustion.refused("TCP connection", e)
            self._refuse(seg, guest_ip, remote_ip, "tcp_no_socket")
            return
        try:
            self._prepare(sock)
            err = sock.connect_ex((host_ip, host_port))
        except OSError as e:
            err = e.errno or errno.EINVAL
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._refuse(seg, guest_ip, remote_ip, "tcp_connect_failed")
            return
        if err and self._connect_done(sock):
            # A loopback connect finishes inside connect(): answer the SYN in this turn
            # instead of after an epoll register, a wait and a modify.
            err = 0
            self._count("tcp_connect_immediate")
        core = TcpCore(seg.dst_port, seg.src_port, self._iss(),
                       mss=self.mss6 if v6 else self.mss, wscale=WSCALE, **self.flow_kw)
        core.open_passive(tcp, now)
        if v6:
            self._count("tcp6_flows_opened")
        f = self._register(key, core, sock, guest_ip, remote_ip)
        self._count("tcp_flows_opened")
        if err == 0:
            self._connected(f, now)
        else:
            f.connecting = True
        self._settle(f, now)

    @staticmethod
    def _connect_done(sock: socket.socket) -> bool:
        """True once a non-blocking connect has completed (the socket is ESTABLISHED).

        getpeername(2) fails with ENOTCONN while the socket is still in SYN-SENT (or was
        refused: that error is left for EPOLLOUT and SO_ERROR to report).
        """
        try:
            sock.getpeername()
        except OSError:
            return False
        return True

    def _prepare(self, sock: socket.socket) -> None:
        # Segments from the guest are already sized by its own Nagle/cork logic.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, HOST_SNDBUF)
        if self.peek_off_supported is not False:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
                self.peek_off_supported = True
            except OSError:
                log.info("no SO_PEEK_OFF for TCP on this kernel: peeking from offset 0")
                self.peek_off_supported = False

    def _iss(self) -> int:
        # RFC 9293 §3.4.1 / RFC 6528: unpredictable initial sequence numbers, drawn from
        # the kernel's CSPRNG ISS_POOL at a time (one getrandom(2) per 1024 flows).
        pool = self._iss_pool
        if not pool:
            pool = self._iss_pool = list(_ISS_WORDS.unpack(os.urandom(_ISS_WORDS.size)))
        return pool.pop()

    def _register(self, key: int, core: TcpCore, sock: socket.socket, guest_ip: bytes,
                  remote_ip: bytes) -> _Flow:
        f = _Flow(key, core, sock, guest_ip, remote_ip)
        self.flows[key] = f
        return f

    # ---- host socket events -------------------------------------------------------------

    def _events(self, f: _Flow) -> Callable[[int], None]:
        def on_event(revents: int) -> None:
            self._on_event(f, revents)
        return on_event

    def _on_event(self, f: _Flow, revents: int) -> None:
        if f.sock is None or self.flows.get(f.key) is not f:
            return
        if f.tx_bufs:
            self._flush_tx(f)
        now = self.loop.time()
        if revents & WATCH_FAILED:
            # The loop could not register the socket (ENOMEM, or the user's
            # max_user_watches spent). The flow would never be polled again, so it ends
            # now (a RST each way; the loop's entry goes with the socket) rather than
            # leaving both sides hanging, and a connect is not taken for complete.
            self._count("tcp_watch_failed")
            self._apply(f, f.core.host_reset(), now)
            return
        if f.connecting:
            err = f.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._count("tcp_connect_failed")
                self._apply(f, f.core.host_refused(), now)
                return
            self._connected(f, now)
            self._settle(f, now)
            return
        if revents & EPOLLERR:
            err = f.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._count("tcp_host_reset")
                self._apply(f, f.core.host_reset(), now)
                return
        if revents & EPOLLOUT and f.want_out:
            f.want_out = False
            self._refresh_window(f, now, force=True)
            self._apply(f, f.core.window_update(now), now)
        if f.sock is not None and self.flows.get(f.key) is f:
            self._pump(f, now)
            self._settle(f, now)

    def _connected(self, f: _Flow, now: float) -> None:
        f.connecting = False
        self._refresh_window(f, now, force=True, fresh=True)
        self._apply(f, f.core.host_connected(now), now)

    def _deliver(self, f: _Flow, data: memoryview, batch: bool) -> int:
        """Hand in-order guest data to the host; returns the bytes taken (-1: the host
        connection is broken). batch: the segment may have its data batched."""
        sock = f.sock
        if sock is None:
            return -1
        n = len(data)
        core = f.core
        if batch and n <= core.rcv_wnd and len(f.tx_bufs) < TX_BATCH_MAX:
            # Accepted now, sent by _flush_tx before anything acknowledges it.
            if not f.tx_bufs and not f.queued:
                self._queue_turn(f)
            f.tx_bufs.append(data)
            f.tx_len += n
            f.written += n
            f.bytes_up += n
            core.rcv_wnd -= n
            return n
        if f.tx_bufs and not self._flush_tx(f):
            return 0  # the batch was cut short: this data lies beyond the gap
        try:
            n = sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            self._count("tcp_host_reset")
            return -1
        if n < len(data):
            # Full host socket: ACK only what went in, advertise a closed window and
            # wait for EPOLLOUT to reopen it.
            self._count("tcp_host_eagain")
            f.want_out = True
            core.rcv_wnd = 0
        f.written += n
        f.bytes_up += n
        self._count("tcp_bytes_to_host", n)
        return n

    def _refresh_window(self, f: _Flow, now: float, force: bool = False,
                        fresh: bool = False) -> None:
        """fresh: nothing was ever written to the socket (just connected), so its free
        send buffer is every new socket's (the fixed HOST_SNDBUF as the kernel granted
        it), read once per NAT instead of once per flow."""
        sock = f.sock
        if sock is None:
            f.core.rcv_wnd = 0
            return
        if force or now - f.win_time >= WINDOW_CACHE_S:
            if fresh and self._fresh_free:
                free = self._fresh_free
            else:
                try:
                    info = _MEMINFO.unpack(sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO,
                                                           _MEMINFO.size))
                    free = info[SK_MEMINFO_SNDBUF] - info[SK_MEMINFO_WMEM_QUEUED]
                except (OSError, struct.error):
                    free = 0
                if fresh:
                    self._fresh_free = free
            # The send queue is charged skb truesize, not payload (socket(7) doubles
            # SO_SNDBUF for the same reason): count half of the free space as payload.
            f.win_base = free // 2
            f.win_time = now
            f.written = f.tx_len  # batched data is not in the socket yet
        if f.want_out:
            f.core.rcv_wnd = 0  # blocked on a full socket until EPOLLOUT says otherwise
            return
        f.core.rcv_wnd = max(0, min(f.win_base - f.written, MAX_WINDOW))

    def _pump(self, f: _Flow, now: float) -> None:
        """Send host data the guest's window has room for (peek, never consume)."""
        core = f.core
        sock = f.sock
        if sock is None or f.connecting:
            return
        # After the host's EOF only retransmissions remain (send_budget stops at our FIN).
        fallback = not self.peek_off_supported
        sent = 0
        while sent < PUMP_CAP and self.flows.get(f.key) is f:
            budget = core.send_budget()
            if budget <= 0:
                return
            inflight = core.in_flight()
            try:
                if fallback:
                    budget = min(budget, PEEK_BUF - inflight)
                    if budget <= 0:
                        return
                    got = sock.recv_into(self._peek, inflight + budget, socket.MSG_PEEK)
                    if got == 0 and inflight == 0:
                        if not f.host_eof:
                            self._host_eof(f, now)
                        return
                    if got <= inflight:
                        return  # nothing new; EOF (if any) is seen once all is acked
                    data = self._peek_mv[inflight:got]
                else:
                    # Acknowledged bytes are dropped once per turn (_end_of_turn): until
                    # then they sit in front of what is in flight.
                    off = inflight + f.unconsumed
                    if f.peek_off != off:
                        sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, off)
                        f.peek_off = off
                    if (self.stream_port is not None and core.fin_seq is None
                            and (self.stream_v6 or len(f.remote_ip) == 4)):
                        n = self._stream(f, min(budget, PUMP_CAP - sent), now)
                        if n <= 0:
                            return
                        sent += n
                        continue
                    if self.guest_room is not None:
                        # The NIC's room for frames (its backlog, beyond the guest's posted
                        # buffers): past it frames would be dropped. Wait for rx_ready.
                        frames = self.guest_room()
                        if frames <= 0:
                            self._count("tcp_guest_rx_full")
                            self._waiting_port[f.key] = f
                            return
                        budget = min(budget, frames * self.mss)
                    want = min(budget, PEEK_BUF)
                    got = sock.recv_into(self._peek, want, socket.MSG_PEEK)
                    if got == 0:
                        if not f.host_eof:
                            self._host_eof(f, now)
                        return
                    f.peek_off += got
                    data = self._peek_mv[:got]
                    if got < want:
                        # The socket is drained: send this and stop, rather than pay for
                        # a peek that fails with EAGAIN. The guest's next ACK pumps again.
                        budget = 0
            except BlockingIOError:
                return
            except OSError:
                self._count("tcp_host_reset")
                self._apply(f, core.host_reset(), now)
                return
            n = len(data)
            if f.tx_bufs:
                self._flush_tx(f)  # these segments carry rcv_nxt: it must be final
            f.bytes_down += n
            self._count("tcp_bytes_to_guest", n)
            core.send_data(n, now)
            k = core.emit_data(self._pkt, ETH_HLEN, f.remote_ip, f.guest_ip, self._ip_id + 1,
                               data, self._send_pkt)
            self._ip_id = (self._ip_id + k) & 0xFFFF
            sent += n
            if budget == 0:
                return
        if self.flows.get(f.key) is f and core.send_budget() > 0 and not f.pump_scheduled:
            # Yield to other flows; carry on at the next loop turn.
            f.pump_scheduled = True
            self.loop.call_soon(lambda: self._deferred_pump(f))

    def _stream(self, f: _Flow, budget: int, now: float) -> int:
        """One FramePort.send_tcp_stream burst of host data to the guest (no FIN due).

        Returns the bytes sent, 0 if the caller should stop pumping, -1 if the flow ended.
        """
        if f.tx_bufs:
            self._flush_tx(f)  # the segments carry rcv_nxt: it must be final
        core = f.core
        ack = core.rcv_nxt
        sent, peeked, frames, status = self.stream_port.send_tcp_stream(
            f.fd, self._eth_header(True) if len(f.remote_ip) == 16 else self._eth_header(),
            f.remote_ip, f.guest_ip, core.port, core.guest_port,
            core.snd_nxt, ack, core.window_field(), core.snd_mss, budget,
            (self._ip_id + 1) & 0xFFFF)
        self._ip_id = (self._ip_id + frames) & 0xFFFF
        f.peek_off += peeked
        if peeked != sent:
            # The port refused frames: what was peeked for them is peeked again later.
            f.peek_off -= peeked - sent
            f.sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, f.peek_off)
        if sent:
            core.stream_sent(sent, now)
            if frames:
                core.last_ack = ack  # else the turn's coalesced ACK must still go out
            f.bytes_down += sent
            self._count("tcp_bytes_to_guest", sent)
            self._count("tcp_stream_frames", frames)
        if status < 0:
            self._count("tcp_host_reset")
            self._apply(f, core.host_reset(), now)
            return -1
        if status == STREAM_EOF:
            if not f.host_eof:
                self._host_eof(f, now)
            return 0
        if status == STREAM_BLOCKED:
            self._count("tcp_port_blocked")
            self._waiting_port[f.key] = f
            self._port_blocked()
            return 0
        if status == STREAM_DRAINED:
            return 0  # the guest's next ACK or the socket's EPOLLIN pumps again
        return sent

    def _deferred_pump(self, f: _Flow) -> None:
        f.pump_scheduled = False
        if self.flows.get(f.key) is f:
            if f.tx_bufs:
                self._flush_tx(f)
            now = self.loop.time()
            self._pump(f, now)
            self._settle(f, now)

    def _host_eof(self, f: _Flow, now: float) -> None:
        f.host_eof = True
        self._apply(f, f.core.host_eof(now), now)

    def _consume(self, f: _Flow, n: int) -> None:
        sock = f.sock
        if sock is None:
            return
        left = n
        while left > 0:
            try:
                got = sock.recv_into(self._discard, min(left, DISCARD_BUF), socket.MSG_TRUNC)
            except OSError:
                break
            if got <= 0:
                break
            left -= got
        # socket(7): a non-peeking read moves the peek offset back by what it removed.
        f.peek_off = max(0, f.peek_off - (n - left))

    # ---- actions, timers, interest ------------------------------------------------------

    def _apply(self, f: _Flow, mask: int, now: float) -> None:
        """Carry out the action bits a TcpCore entry point returned, and send the segments
        it queued."""
        core = f.core
        if mask & A_CONSUME:
            if self.peek_off_supported:
                # One recv(MSG_TRUNC) per flow per turn, not one per guest ACK.
                f.unconsumed += core.consume_n
                if not f.queued:
                    self._queue_turn(f)
            else:
                self._consume(f, core.consume_n)  # peeks start at 0: drop the bytes at once
        if mask & A_RST:
            self._count("tcp_rst_sent")
        if core.n_out:
            self._emit(f)
        if mask & A_REWIND:
            self._count("tcp_retransmits")
            if not f.pump_scheduled:
                f.pump_scheduled = True
                self.loop.call_soon(lambda: self._deferred_pump(f))
        if mask & A_SHUT_WR:
            if f.sock is not None:
                try:
                    f.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        if mask & A_ABORT:
            self._close(f, rst=True)
        elif mask & A_CLOSE:
            self._close(f, rst=False)

    def _emit(self, f: _Flow) -> None:
        """Send the segments the flow's core queued. A pure ACK for new guest data is held
        back by the core (ack_due): one per flow per loop turn is enough (the TAP hands
        over a batch of frames per wakeup); duplicate ACKs, probes and everything else go
        out at once."""
        core = f.core
        clamp = False
        if f.tx_bufs and core.holds_unacked_ack():
            # The segment may acknowledge the batched data: send that first, and never
            # acknowledge what the host refused.
            clamp = not self._flush_tx(f)
        k = core.emit(self._pkt, ETH_HLEN, f.remote_ip, f.guest_ip, self._ip_id + 1, clamp,
                      self._send_pkt)
        self._ip_id = (self._ip_id + k) & 0xFFFF
        if core.ack_due and not f.queued:
            self._queue_turn(f)

    def _queue_turn(self, f: _Flow) -> None:
        f.queued = True
        if not self._turn_queue:
            self.loop.call_soon(self._end_of_turn)
        self._turn_queue.append(f)

    def _end_of_turn(self) -> None:
        """Per flow: send batched guest data to the host, drop acknowledged host bytes, then
        one ACK to the guest (in that order)."""
        queue, self._turn_queue = self._turn_queue, []
        for f in queue:
            f.queued = False
            if f.tx_bufs:
                self._flush_tx(f)
            if f.unconsumed:
                n, f.unconsumed = f.unconsumed, 0
                self._consume(f, n)
            core = f.core
            if not core.ack_due:
                continue
            if self.flows.get(f.key) is not f:
                core.ack_due = False
                continue
            # fin_received first: a plain field, so every other flow's ACK (one per request
            # and response) pays no call here.
            if core.fin_received and self._hold_fin_ack(f):
                continue
            if core.flush_ack():  # not when a later segment already carried the ack
                self._emit(f)

    def _hold_fin_ack(self, f: _Flow) -> bool:
        """Whether the due ACK is the guest's FIN's, left for the host's FIN to carry: the
        guest has closed (CLOSE-WAIT) and the host not yet. A timer sends it after
        FIN_ACK_DELAY_S if nothing else has by then."""
        if f.core.state is not TcpState.CLOSE_WAIT or f.host_eof or f.sock is None:
            return False
        if f.ack_timer is None:
            f.ack_timer = self.loop.call_at(self.loop.time() + FIN_ACK_DELAY_S,
                                            partial(self._send_held_ack, weakref.ref(f)))
        return True

    def _send_held_ack(self, ref: weakref.ref) -> None:
        f = ref()
        if f is None:
            return
        f.ack_timer = None
        if self.flows.get(f.key) is f and f.core.flush_ack():
            self._count("tcp_fin_acks_alone")
            self._emit(f)

    def _flush_tx(self, f: _Flow) -> bool:
        """Send the flow's batched guest data in one sendmsg(2).

        Returns True if the host took all of it. Otherwise rcv_nxt goes back to the first
        refused byte (nothing has acknowledged it yet: see guest_segment), the window
        closes until EPOLLOUT, and the guest retransmits from there.
        """
        bufs, total = f.tx_bufs, f.tx_len
        f.tx_bufs = []
        f.tx_len = 0
        sock = f.sock
        broken = False
        n = 0
        if sock is not None:
            try:
                n = sock.sendmsg(bufs) if len(bufs) > 1 else sock.send(bufs[0])
            except BlockingIOError:
                pass
            except OSError:
                broken = True
            self._count("tcp_host_sends")
        self._count("tcp_bytes_to_host", n)
        if n >= total:
            return True
        left = total - n
        core = f.core
        core.rcv_nxt = seq_add(core.rcv_nxt, -left)
        core.guest_blocked = True
        core.rcv_wnd = 0
        f.written -= left
        f.bytes_up -= left
        if broken:
            # As a failed send() in the writer does: reset both sides. Deferred, since this
            # may run inside the flow's own segment processing.
            self._count("tcp_host_reset")
            self.loop.call_soon(lambda: self._host_broken(f))
            return False
        f.want_out = True
        self._count("tcp_host_eagain")
        if self.flows.get(f.key) is f:
            self._interest(f)
        return False

    def _host_broken(self, f: _Flow) -> None:
        if self.flows.get(f.key) is f:
            now = self.loop.time()
            self._apply(f, f.core.host_reset(), now)
            self._settle(f, now)

    def _send(self, src_ip: bytes, dst_ip: bytes, seg: Segment) -> None:
        self._ip_id = (self._ip_id + 1) & 0xFFFF
        opts = seg.options() if seg.flags & SYN else b""
        n = build_ip_tcp(self._pkt_ip, src_ip, dst_ip, self._ip_id, seg.src_port,
                           seg.dst_port, seg.seq, seg.ack, seg.flags, seg.window, opts,
                           seg.payload)
        if seg.flags & RST:
            self._count("tcp_rst_sent")
        if self.send_ip_buf is not None:
            self.send_ip_buf(self._pkt, n)
        else:
            self.send_ip(bytes(self._pkt_ip[:n]))

    def _settle(self, f: _Flow, now: float) -> None:
        """After any event: release a finished socket, re-arm the timer and epoll interest."""
        if self.flows.get(f.key) is not f:
            return
        core = f.core
        if core.state is TcpState.TIME_WAIT and f.sock is not None:
            # Both FINs are done; TIME-WAIT only needs the TCB to re-ACK a FIN.
            self._drop_socket(f, rst=False)
        self._schedule(f)
        self._interest(f)

    def _schedule(self, f: _Flow) -> None:
        d = f.core.deadline
        if d is None:
            if f.timer is not None:
                f.timer.cancel()
                f.timer = None
            return
        if f.timer is not None:
            if f.timer_when <= d:
                return  # fires early at worst; on_timer re-arms for the real deadline
            f.timer.cancel()
        f.timer_when = d
        # Weakly: a cancelled timer stays in the loop's heap, and must not keep the flow.
        f.timer = self.loop.call_at(d, partial(self._on_timer, weakref.ref(f)))

    def _on_timer(self, ref: weakref.ref) -> None:
        f = ref()
        if f is None:
            return
        f.timer = None
        if self.flows.get(f.key) is not f:
            return
        if f.tx_bufs:
            self._flush_tx(f)
        now = self.loop.time()
        core = f.core
        probes = core.ka_sent
        mask = core.on_timer(now)
        if core.n_out:
            self._count("tcp_timer_sends", core.n_out)
        if core.ka_sent > probes:
            self._count("tcp_keepalive_probes")
        if core.expired:
            self._count("tcp_flows_expired")
        self._apply(f, mask, now)
        self._settle(f, now)

    def _interest(self, f: _Flow) -> None:
        if f.sock is None:
            return
        core = f.core
        if f.connecting:
            want = EPOLLOUT
        else:
            want = 0
            # Not while the stream port is full: the host data is only peeked, so EPOLLIN
            # would fire every turn; port_writable() pumps the flow instead.
            if (not f.host_eof and core.fin_seq is None and core.in_flight() == 0
                    and core.send_budget() > 0 and f.key not in self._waiting_port):
                want |= EPOLLIN
            if f.want_out:
                want |= EPOLLOUT
        if want == f.events:
            return
        if want:
            # Deferred to the turn's end: a flow often wants EPOLLIN as an ACK empties its
            # flight and drops it again as the next peek refills it, in the same turn.
            self.loop.watch(f.fd, want, self._events(f), True)
        else:
            # Even an empty interest set reports EPOLLHUP; unregister instead.
            self.loop.unwatch(f.fd)
        f.events = want

    def _drop_socket(self, f: _Flow, rst: bool) -> None:
        sock = f.sock
        if sock is None:
            return
        if f.events:
            self.loop.unwatch(f.fd)
            f.events = 0
        if rst:
            try:
                # socket(7) SO_LINGER with a zero timeout: close() sends RST.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        sock.close()
        f.sock = None

    def _close(self, f: _Flow, rst: bool) -> None:
        if f.tx_bufs and not rst:
            self._flush_tx(f)
        f.tx_bufs = []
        f.tx_len = 0
        self._drop_socket(f, rst)
        if f.timer is not None:
            f.timer.cancel()
            f.timer = None
        if f.ack_timer is not None:
            f.ack_timer.cancel()
            f.ack_timer = None
        if self._waiting_port.get(f.key) is f:
            del self._waiting_port[f.key]
        if self.flows.get(f.key) is f:
            del self.flows[f.key]
            self._count("tcp_flows_closed")
            self._count("tcp_retransmits_total", f.core.retransmits)

    # ---- port forwards ------------------------------------------------------------------

    def add_forward(self, host_addr: str, host_port: int, guest_port: int) -> None:
        """Listen on host_addr:host_port; each accepted connection opens a flow to the guest's
        guest_port (we send the SYN from the gateway address)."""
        family = socket.AF_INET6 if ":" in host_addr else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                             | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host_addr, host_port))
            sock.listen(socket.SOMAXCONN)
        except OSError as e:
            sock.close()
            raise VoidboxError(f"cannot forward tcp {host_addr}:{host_port}: {e.strerror}") \
                from None
        fd = sock.fileno()
        self.listeners[fd] = (sock, guest_port)
        self.loop.watch(fd, EPOLLIN, lambda _ev: self._accept(fd))

    def listener_addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for s, _ in self.listeners.values()]

    def _forward_key(self, guest_port: int, port: int) -> int:
        """The flow key of a forwarded connection: the guest's segments come from its
        guest_port to our ephemeral port on the gateway address."""
        return flow_key(self.guest_ip, self.gateway_ip, _PORTS.pack(guest_port, port))

    def _ephemeral_port(self, guest_port: int) -> int | None:
        span = EPHEMERAL_HI - EPHEMERAL_LO + 1
        for _ in range(span):
            port = self._next_port
            self._next_port = EPHEMERAL_LO + (port - EPHEMERAL_LO + 1) % span
            if self._forward_key(guest_port, port) not in self.flows:
                return port
        return None

    def _accept(self, fd: int) -> None:
        entry = self.listeners.get(fd)
        if entry is None:
            return
        lsock, guest_port = entry
        now = self.loop.time()
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._count("tcp_accept_failed")
                if e.errno in EXHAUSTION_ERRNOS:
                    # The connection stays queued and the listener readable: stop
                    # watching it for a while, or the loop spins on accept().
                    self.exhaustion.refused("port-forward connection", e)
                    self.loop.unwatch(fd)
                    self.loop.call_at(self.loop.time() + ACCEPT_RETRY_S,
                                      lambda: self._rewatch(fd))
                return
            conn.setblocking(False)
            port = self._ephemeral_port(guest_port)
            if self.open_flows() >= self.config.max_flows or port is None:
                self._count("tcp_flow_limit")
                self._abort_socket(conn)
                continue
            if not self._rate_ok(now):
                self._count("tcp_rate_limited")
                self._abort_socket(conn)
                continue
            self._prepare(conn)
            key = self._forward_key(guest_port, port)
            core = TcpCore(port, guest_port, self._iss(), mss=self.mss, wscale=WSCALE,
                           **self.flow_kw)
            mask = core.open_active(now)
            f = self._register(key, core, conn, self.guest_ip, self.gateway_ip)
            f.forwarded = True
            self._count("tcp_flows_opened")
            self._count("tcp_forward_accepted")
            self._refresh_window(f, now, force=True)
            self._apply(f, mask, now)
            self._settle(f, now)

    def _rewatch(self, fd: int) -> None:
        if fd in self.listeners:
            self.loop.watch(fd, EPOLLIN, lambda _ev: self._accept(fd))

    @staticmethod
    def _abort_socket(sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        sock.close()

    # ---- shutdown -----------------------------------------------------------------------

    def drop_flows(self) -> None:
        """Reset every flow's host connection; the guest is gone, so it hears nothing."""
        for f in list(self.flows.values()):
            self._close(f, rst=True)
        self._waiting_port.clear()

    def close(self) -> None:
        """Reset every flow (host side and guest side) and close the listeners."""
        for f in list(self.flows.values()):
            if f.core.state not in (TcpState.TIME_WAIT, TcpState.CLOSED):
                self._apply(f, f.core.host_reset(), self.loop.time())
            self._close(f, rst=True)
        for fd, (sock, _port) in list(self.listeners.items()):
            self.loop.unwatch(fd)
            sock.close()
        self.listeners.clear()


def _ntop(ip: bytes) -> str:
    """An address of 4 or 16 bytes as text (the form NatConfig and the policy use)."""
    return socket.inet_ntop(socket.AF_INET6 if len(ip) == 16 else socket.AF_INET, ip)


__all__ = ["TcpNat"]
