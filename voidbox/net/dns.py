"""DNS relay: the guest's queries to 10.0.2.3:53 go to the host's resolvers.

Each query gets its own connected, non-blocking UDP socket (a fresh source port, and
only the upstream can answer it), so nothing here ever blocks the loop. A query that
gets no answer within config.dns_timeout is retried on the next upstream, then dropped
(the guest's resolver retries). Answers that would not fit in one guest frame are cut to
header and question with TC set (RFC 1035 §4.2.1, RFC 7766 §5), so the guest retries
over TCP; TCP to 10.0.2.3:53 is relayed by the TCP NAT to the upstream given by
NatConfig.host_endpoint.

The relay is the NAT's own service, like DHCP: the egress policy does not apply to the
configured upstreams (a --deny 127.0.0.0/8 must not break a resolver on 127.0.0.53).
"""

from __future__ import annotations

import select
import socket
import struct
from collections.abc import Callable

from voidbox.eventloop import EventLoop, Timer
from voidbox.net.config import NatConfig
from voidbox.net.limits import Exhaustion
from voidbox.net.packets import IPV4_HLEN, UDP_HLEN, PacketError

DNS_HEADER_LEN = 12
DNS_FLAG_QR = 0x8000
DNS_FLAG_TC = 0x0200
DNS_FLAG_RD = 0x0100
DNS_RCODE_SERVFAIL = 2
DNS_OPCODE_MASK = 0x7800
DNS_MAX_MESSAGE = 65535
# RFC 1035 §3.1: a name is at most 255 octets; labels at most 63.
DNS_MAX_NAME = 255
DNS_LABEL_MAX = 63
QTYPE_QCLASS_LEN = 4
# Bound on queries in flight (each holds one socket).
MAX_PENDING_QUERIES = 256
IPV6_EXTRA = 20  # an IPv6 header (40 bytes) less an IPv4 one (20)
_HEADER = struct.Struct("!HHHHHH")


def question_end(msg: bytes | memoryview) -> int:
    """Offset just past the first question (name, QTYPE, QCLASS); raises if malformed.

    Only uncompressed names are accepted in a question (RFC 1035 §4.1.2 questions carry
    full names; a pointer there would be unusual).
    """
    i = DNS_HEADER_LEN
    n = len(msg)
    walked = 0
    while True:
        if i >= n:
            raise PacketError("dns_question_truncated")
        length = msg[i]
        if length == 0:
            i += 1
            break
        if length > DNS_LABEL_MAX:
            raise PacketError("dns_bad_label")
        walked += length + 1
        if walked > DNS_MAX_NAME:
            raise PacketError("dns_name_too_long")
        i += 1 + length
    i += QTYPE_QCLASS_LEN
    if i > n:
        raise PacketError("dns_question_truncated")
    return i


def truncate_response(msg: bytes | memoryview) -> bytes:
    """The response reduced to header and question with TC set (RFC 2181 §9)."""
    if len(msg) < DNS_HEADER_LEN:
        raise PacketError("dns_short")
    ident, flags, qdcount, _an, _ns, _ar = _HEADER.unpack_from(msg)
    try:
        end = question_end(msg) if qdcount >= 1 else DNS_HEADER_LEN
        qd = 1 if qdcount >= 1 else 0
    except PacketError:
        end, qd = DNS_HEADER_LEN, 0
    return _HEADER.pack(ident, flags | DNS_FLAG_TC, qd, 0, 0, 0) + bytes(msg[DNS_HEADER_LEN:end])


def servfail_response(query: bytes | memoryview) -> bytes:
    """A SERVFAIL answer to query: its header with QR and RCODE 2 (RFC 1035 §4.1.1), its
    question, no records. Raises PacketError if the query's question is malformed."""
    end = question_end(query)
    ident, flags, _qd, _an, _ns, _ar = _HEADER.unpack_from(query)
    flags = (flags & (DNS_OPCODE_MASK | DNS_FLAG_RD)) | DNS_FLAG_QR | DNS_RCODE_SERVFAIL
    return _HEADER.pack(ident, flags, 1, 0, 0, 0) + bytes(query[DNS_HEADER_LEN:end])


def query_id(msg: bytes | memoryview) -> int:
    if len(msg) < DNS_HEADER_LEN:
        raise PacketError("dns_short")
    return _HEADER.unpack_from(msg)[0]


class _Query:
    __slots__ = ("sport", "ident", "payload", "upstream_index", "sock", "timer", "guest_ip")

    def __init__(self, sport: int, ident: int, payload: bytes, guest_ip: bytes | None = None):
        self.guest_ip = guest_ip  # the guest's IPv6 address that asked fd00::3; None: IPv4
        self.sport = sport
        self.ident = ident
        self.payload = payload
        self.upstream_index = 0
        self.sock: socket.socket | None = None
        self.timer: Timer | None = None


class DnsRelay:
    """Relays guest DNS queries over UDP; send_reply(guest_port, payload) answers the guest."""

    def __init__(self, loop: EventLoop, config: NatConfig, send_reply: Callable[[int, bytes], None],
                 counters: dict[str, int] | None = None):
        self.loop = loop
        self.config = config
        self.send_reply = send_reply
        self.counters = counters if counters is not None else {}
        self.exhaustion = Exhaustion(self.counters)
        self.pending: dict[int, _Query] = {}  # by socket fd
        # Sockets open against --max-flows (each pending query holds one): this relay's,
        # or (Engine) every relay's flows together.
        self.open_flows: Callable[[], int] = lambda: len(self.pending)
        # Largest UDP payload that fits in one guest frame without fragmentation.
        self.max_reply = config.mtu - IPV4_HLEN - UDP_HLEN

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def guest_query(self, sport: int, payload: bytes | memoryview,
                    guest_ip: bytes | None = None) -> None:
        """A UDP datagram from guest port sport to the DNS address, port 53 (from the
        guest's IPv6 address guest_ip to fd00::3, if given)."""
        try:
            ident = query_id(payload)
        except PacketError:
            self._count("dns_malformed")
            return
        if not self.config.upstreams():
            self._count("dns_no_upstream")
            return
        if len(self.pending) >= MAX_PENDING_QUERIES:
            self._count("dns_dropped_busy")
            return
        if self.open_flows() >= self.config.max_flows:
            self._count("dns_dropped_flow_limit")
            return
        query = _Query(sport, ident, bytes(payload), guest_ip)
        self._count("dns_queries")
        self._send(query)

    def _send(self, query: _Query) -> None:
        upstreams = self.config.upstreams()
        while query.upstream_index < len(upstreams):
            addr = upstreams[query.upstream_index]
            try:
                family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            except OSError as e:
                # Out of fds: every upstream would fail alike. Answer SERVFAIL now, so the
                # guest's resolver moves on instead of waiting out its timeout.
                self.exhaustion.refused("DNS query", e)
                self._servfail(query)
                return
            try:
                # connect() on UDP only sets the peer address: it never blocks.
                sock.connect(addr)
                sock.send(query.payload)
            except OSError:
                sock.close()
                self._count("dns_upstream_error")
                query.upstream_index += 1
                continue
            fd = sock.fileno()
            try:
                self.loop.watch(fd, select.EPOLLIN, lambda ev, q=query: self._readable(q))
            except OSError as e:
                # The kernel would not watch it (ENOMEM, max_user_watches spent): no
                # upstream would fare better, so SERVFAIL now, as when out of fds.
                sock.close()
                self.exhaustion.refused("DNS query", e, watch=True)
                self._servfail(query)
                return
            query.sock = sock
            self.pending[fd] = query
            query.timer = self.loop.call_at(self.loop.time() + self.config.dns_timeout,
                                            lambda q=query: self._timeout(q))
            return
        self._count("dns_failed")

    def _servfail(self, query: _Query) -> None:
        try:
            reply = servfail_response(query.payload)
        except PacketError:
            return
        self._count("dns_servfail")
        self._answer(query, reply)

    def _release(self, query: _Query) -> None:
        if query.timer is not None:
            query.timer.cancel()
            query.timer = None
        if query.sock is not None:
            fd = query.sock.fileno()
            self.loop.unwatch(fd)
            self.pending.pop(fd, None)
            query.sock.close()
            query.sock = None

    def _timeout(self, query: _Query) -> None:
        query.timer = None
        self._release(query)
        self._count("dns_timeouts")
        query.upstream_index += 1
        self._send(query)

    def _readable(self, query: _Query) -> None:
        sock = query.sock
        if sock is None:
            return
        try:
            reply = sock.recv(DNS_MAX_MESSAGE)
        except BlockingIOError:
            return
        except OSError:
            # ICMP port unreachable from the upstream: try the next one now.
            self._count("dns_upstream_error")
            self._release(query)
            query.upstream_index += 1
            self._send(query)
            return
        try:
            if query_id(reply) != query.ident or not _HEADER.unpack_from(reply)[1] & DNS_FLAG_QR:
                self._count("dns_mismatched_reply")
                return
            # IPv6's header is 20 bytes longer than IPv4's (RFC 8200 §3).
            limit = self.max_reply - (IPV6_EXTRA if query.guest_ip is not None else 0)
            if len(reply) > limit:
                reply = truncate_response(reply)
                self._count("dns_truncated")
        except PacketError:
            self._count("dns_malformed_reply")
            return
        self._release(query)
        self._count("dns_replies")
        self._answer(query, reply)

    def _answer(self, query: _Query, reply: bytes) -> None:
        if query.guest_ip is None:
            self.send_reply(query.sport, reply)
        else:
            self.send_reply(query.sport, reply, query.guest_ip)

    def drop_pending(self) -> None:
        for query in list(self.pending.values()):
            self._release(query)

    def close(self) -> None:
        self.drop_pending()

