"""UDP NAT: guest datagrams relayed through per-flow connected host sockets.

A flow is (guest port, destination address, destination port). Its host socket is
connected to the translated destination, so only that peer's datagrams come back, and
IP_RECVERR (ip(7)) brings ICMP errors from the host, which are reflected to the guest
as ICMP errors quoting the guest's own datagram. Idle flows are closed after
config.udp_idle_timeout. Port forwards bind a host socket and present each remote peer
to the guest as a flow from the gateway (loopback peers) or the peer's own address.

IPv6 flows are the same flows with 16-byte addresses: an AF_INET6 host socket with
IPV6_RECVERR, fd00::2 translated to the host's ::1, ICMPv6 errors reflected, and the
guest's source address kept per flow (a SLAAC guest has several). A forward listening on
an IPv6 host address reaches the guest over IPv4, from the gateway, as any forward does.
"""

from __future__ import annotations

import heapq
import ipaddress
import select
import socket
import struct
from collections.abc import Callable

from voidbox.errors import VoidboxError
from voidbox.eventloop import EventLoop, Timer
from voidbox.net.config import NatConfig
from voidbox.net.fastpath import UDP_BLOCKED, UDP_BUDGET, UDP_OVERSIZE, UDP_PAUSED, inet_checksum
from voidbox.net.ipv6 import (
    ICMPV6_ADDR_UNREACH,
    ICMPV6_ADM_PROHIBITED,
    ICMPV6_DEST_UNREACH,
    ICMPV6_PACKET_TOO_BIG,
    ICMPV6_PORT_UNREACH,
    IPPROTO_ICMPV6,
    build_icmpv6,
    build_ipv6_fragments,
    build_udp6,
    icmpv6_error_quote,
    ip6_to_bytes,
    ip6_to_str,
    is_link_local,
    is_multicast,
)
from voidbox.net.limits import Exhaustion
from voidbox.net.packets import (
    DEFAULT_TTL,
    ETH_HLEN,
    ICMP_DEST_UNREACH,
    ICMP_HOST_UNREACH,
    ICMP_PKT_FILTERED,
    IPPROTO_ICMP,
    IPPROTO_UDP,
    IPV4_HLEN,
    UDP_HLEN,
    build_icmp,
    build_ipv4,
    build_ipv4_fragments,
    build_udp,
    icmp_error_quote,
    ip_to_bytes,
    ip_to_str,
)
from voidbox.net.policy import Policy
from voidbox.net.udpfast import build_ipv4_udp

# linux/errqueue.h: struct sock_extended_err and its origins
SO_EE_ORIGIN_ICMP = 2
_SOCK_EXTENDED_ERR = struct.Struct("=IBBBBII")
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
UDP_MAX_DATAGRAM = 65535
# Datagrams relayed per socket wakeup: bounded so one busy flow cannot starve the others.
UDP_BATCH = 64
# A flow's first wakeup reads one datagram: a DNS-style flow gets one reply, and a second
# recv would only fail with EAGAIN (a syscall and an exception). Each wakeup that uses its
# whole batch doubles it, up to UDP_BATCH, so a busy flow is still drained in batches
# (epoll is level-triggered: what is left is reported again on the next iteration).
UDP_FIRST_BATCH = 1
# Unconnected sockets kept ready for new flows (see UdpNat._refill).
UDP_SPARE_SOCKETS = 4
# IPv4 + UDP headers in front of a reply's payload (RFC 791 §3.1, RFC 768).
IPV4_UDP_HLEN = IPV4_HLEN + UDP_HLEN
_UDP = struct.Struct("!HHHH")
_CSUM = struct.Struct("!H")
UNSPECIFIED6 = bytes(16)
IPV6_HLEN = 40  # RFC 8200 §3
IPV6_UDP_HLEN = IPV6_HLEN + UDP_HLEN
IPV6_VTF = 6 << 28  # version 6, traffic class and flow label zero
UDP_CSUM_FIELD = 6  # RFC 768: the checksum's offset in the UDP header
_PSEUDO6 = struct.Struct("!16s16sI3xB")  # RFC 8200 §8.1
_IPV6_HDR = struct.Struct("!IHBB16s16s")
UDP_CSUM_NONE = 0xFFFF  # RFC 768: a computed zero is sent as all ones
LOOPBACK_NET = 127  # first octet of 127.0.0.0/8, loopback (RFC 1122 §3.2.1.3 (g))
ROUTABLE_MEMO_MAX = 4096  # destinations whose routability is remembered; cleared when full
ERRQUEUE_CMSG_SPACE = socket.CMSG_SPACE(_SOCK_EXTENDED_ERR.size + 16)
ERRQUEUE_CMSG_SPACE6 = socket.CMSG_SPACE(_SOCK_EXTENDED_ERR.size + 28)  # + sockaddr_in6
_UNREACHABLE = ("unreachable", b"")  # _destination's verdict for the subnet's other hosts


def is_unicast_destination(ip: bytes) -> bool:
    addr = ipaddress.IPv4Address(ip)
    return not (addr.is_multicast or addr.is_unspecified or ip == b"\xff\xff\xff\xff")


IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)  # ipv6(7)
SO_EE_ORIGIN_ICMP6 = 3


def parse_recverr(ancdata, v6: bool = False) -> tuple[int, int, int, bytes | None] | None:
    """(ICMP type, code, info, offender address) from an IP_RECVERR (v6: IPV6_RECVERR)
    control message, if ICMP (ICMPv6) sent it; info is a Packet Too Big's MTU (RFC 4443
    §3.2). The offender is SO_EE_OFFENDER, the sockaddr right after the struct."""
    level, ctype = (socket.IPPROTO_IPV6, IPV6_RECVERR) if v6 else (socket.IPPROTO_IP, IP_RECVERR)
    origin_wanted = SO_EE_ORIGIN_ICMP6 if v6 else SO_EE_ORIGIN_ICMP
    # sockaddr_in6: family, port, flowinfo, address; sockaddr_in: family, port, address.
    family, addr_at, addr_len = ((socket.AF_INET6, 8, 16) if v6 else (socket.AF_INET, 4, 4))
    for msg_level, msg_type, data in ancdata:
        if msg_level == level and msg_type == ctype and len(data) >= _SOCK_EXTENDED_ERR.size:
            _errno, origin, etype, code, _pad, info, _data = _SOCK_EXTENDED_ERR.unpack_from(data)
            if origin != origin_wanted:
                return None
            offender = None
            off = _SOCK_EXTENDED_ERR.size
            if (len(data) >= off + addr_at + addr_len
                    and struct.unpack_from("=H", data, off)[0] == family):
                offender = bytes(data[off + addr_at:off + addr_at + addr_len])
            return etype, code, info, offender
    return None


class _Flow:
    """One UDP flow; calling it with epoll events handles its socket (EventLoop.watch).

    Being its own callback (no closure per flow) keeps the objects the cyclic garbage
    collector must visit to the flow and its socket: with thousands of idle flows alive
    (udp_idle_timeout), each extra tracked object per flow costs in every collection.
    """

    __slots__ = ("nat", "key", "sock", "fd", "guest_dst", "host_dst", "last_active", "quote",
                 "peer", "listener", "batch", "guest_src")

    def __init__(self, nat: UdpNat, key, sock, guest_dst: bytes, host_dst: bytes, now: float):
        self.nat = nat
        # (guest port, guest-visible remote address, remote port), and for IPv6 the
        # guest's source address.
        self.key = key
        self.sock = sock
        self.fd = sock.fileno()
        self.guest_dst = guest_dst
        self.host_dst = host_dst
        self.last_active = now
        self.quote = b""  # the guest's last datagram, as an ICMP error would quote it
        self.peer: tuple[str, int] | None = None  # forwarded flows: the remote peer
        self.listener: socket.socket | None = None
        self.batch = UDP_FIRST_BATCH  # datagrams to read on the next wakeup
        self.guest_src: bytes | None = None  # IPv6 flows: the guest address that sent

    def __call__(self, events: int) -> None:
        """The socket's events: ICMP errors to reflect, datagrams to relay to the guest."""
        sock = self.sock
        if sock is None:
            return
        nat = self.nat
        if events & select.EPOLLERR:
            nat._drain_errors(self)
        if events & select.EPOLLIN:
            batch = self.batch
            v6 = self.guest_src is not None
            if nat.port is not None and not v6:
                # The frame port relays the batch in one compiled call: received into the
                # reply buffer, framed there and written, no Python per datagram.
                got, status = nat._relay(self, batch)
                if got:
                    self.last_active = nat.loop.time()
                if status == UDP_BUDGET and batch < UDP_BATCH:
                    self.batch = batch * 2  # every receive was used: a busy flow
                if status != UDP_PAUSED:
                    return
                # The port has frames queued: the loop below queues these behind them.
            got = 0
            target = memoryview(nat._rx6)[ETH_HLEN + IPV6_UDP_HLEN:] if v6 else nat._rx_payload
            for _ in range(batch):
                try:
                    # Straight into the reply buffer, behind the space for its headers.
                    n = sock.recv_into(target)
                except BlockingIOError:
                    break
                except OSError:
                    # The pending error was already reported through the error queue.
                    continue
                got += 1
                if v6:
                    nat._reply6(self, n)
                    continue
                key = self.key
                nat._reply(self.guest_dst, key[2], key[0], n)
            else:
                if batch < UDP_BATCH:
                    self.batch = batch * 2  # the whole batch was used: a busy flow
            if got:
                self.last_active = nat.loop.time()


class UdpNat:
    def __init__(self, loop: EventLoop, config: NatConfig, policy: Policy,
                 send_ip: Callable[[bytes], None], counters: dict[str, int] | None = None,
                 send_ip_buf: Callable[[bytearray, int], None] | None = None):
        """send_ip_buf(buf, n), if given, sends the IPv4 packet buf[ETH_HLEN:ETH_HLEN + n]
        and may write the Ethernet header into buf[:ETH_HLEN] (Engine.send_ip_buf): replies
        then reach it without being copied into a new bytes object first."""
        self.loop = loop
        self.config = config
        self.policy = policy
        self.send_ip = send_ip
        self.send_ip_buf = send_ip_buf
        self.counters = counters if counters is not None else {}
        self.exhaustion = Exhaustion(self.counters)
        self.guest_ip = ip_to_bytes(config.guest_ip)
        self.gateway_ip = ip_to_bytes(config.gateway_ip)
        self.dns_ip = ip_to_bytes(config.dns_ip)
        self.network = config.network
        self.idle_timeout = config.udp_idle_timeout
        # Per guest destination: (host address, its 4 bytes, the guest's address as text,
        # which the policy asks for), or None where datagrams go nowhere; ipaddress and
        # the translation are too slow to redo per new flow.
        self._dest_memo: dict[bytes, tuple[str, bytes, str] | None] = {}
        self.flows: dict[tuple[int, bytes, int], _Flow] = {}
        # Flows open against --max-flows: this table's, or (Engine) every relay's together.
        self.open_flows: Callable[[], int] = self.flow_count
        self.listeners: dict[int, socket.socket] = {}
        self._ident = 0
        self._closed = False
        # Fresh sockets made ahead of need (as passt pre-opens its TCP socket pool), so a
        # new flow's first datagram pays only connect(2): socket(2) + setsockopt(2) for
        # the next flows run after the current loop turn, while the host answers.
        self._spare: list[socket.socket] = []
        self._spare6: list[socket.socket] = []  # the same for IPv6, once it is in use
        self._v6_used = False
        self._refill_pending = False
        # Idle expiry: one heap of (deadline, flow key) and one loop timer for its head,
        # instead of a loop timer (and a closure) per flow. Entries whose flow is gone
        # are dropped when they come up. Keys, not flows: a tuple of a float and a key
        # holds no container the garbage collector must keep visiting.
        self._expiry: list[tuple[float, tuple[int, bytes, int]]] = []
        self._sweep_timer: Timer | None = None
        # A reply is built in place: headers, then the payload received right behind them.
        # ETH_HLEN of headroom lets a send_ip_buf callback frame it without a copy.
        self._rx = bytearray(ETH_HLEN + IPV4_UDP_HLEN + UDP_MAX_DATAGRAM)
        self._rx_view = memoryview(self._rx)
        self._rx_payload = self._rx_view[ETH_HLEN + IPV4_UDP_HLEN:]
        self._rx_packet = self._rx_view[ETH_HLEN:]
        # An IPv6 reply's buffer, made at the first IPv6 flow: its headers are 48 bytes,
        # and the 40-byte pseudo-header (RFC 8200 §8.1) is written where the IPv6 header
        # goes, then overwritten by it, so one pass sums pseudo-header and datagram.
        self._rx6: bytearray | None = None
        # The frame port IPv4 replies go through (set_frame_port), or None: Python's path.
        self.port = None
        self._eth_header: Callable[[], bytes] | None = None

    def set_frame_port(self, port, eth_header: Callable[[], bytes]) -> None:
        """Relay IPv4 replies with port.send_udp4 (a FramePort on the fd send_ip_buf
        writes, without capture): socket -> frame -> port in one compiled call per batch.
        eth_header() is the Ethernet header of a frame to the guest."""
        self.port = port
        self._eth_header = eth_header

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def flow_count(self) -> int:
        return len(self.flows)

    # ------------------------------------------------------------ guest -> host

    def guest_datagram(self, dst_ip: bytes, sport: int, dport: int, payload: memoryview,
                       ip_packet: memoryview, guest_src: bytes | None = None) -> None:
        """A validated UDP datagram from the guest (not DHCP, not DNS to the relay);
        guest_src is its IPv6 source (None: IPv4, from the guest's one address)."""
        # An IPv6 guest may send from several addresses (SLAAC, privacy, link-local): each
        # is a flow of its own, whose replies go back to it.
        key = (sport, dst_ip, dport) if guest_src is None else (sport, dst_ip, dport, guest_src)
        flow = self.flows.get(key)
        opened = flow is None
        if opened:
            if guest_src is not None:
                flow = self._open_flow6(key, guest_src, ip_packet)
            else:
                flow = self._open_flow(key, ip_packet)
            if flow is None:
                return
        else:
            flow.last_active = self.loop.time()
        try:
            if guest_src is not None:
                flow.quote = icmpv6_error_quote(ip_packet)
            else:
                # icmp_error_quote inlined: the IPv4 header (IHL, validated by the engine)
                # + 8 bytes.
                flow.quote = bytes(ip_packet[:(ip_packet[0] & 0x0F) * 4 + UDP_HLEN])
            counters = self.counters
            try:
                if flow.listener is not None:
                    flow.listener.sendto(payload, flow.peer)
                else:
                    flow.sock.send(payload)
            except BlockingIOError:
                # UDP may drop; the socket buffer is full
                counters["udp_tx_dropped"] = counters.get("udp_tx_dropped", 0) + 1
            except OSError:
                # An earlier ICMP error surfacing; IP_RECVERR delivers the details apart.
                counters["udp_tx_error"] = counters.get("udp_tx_error", 0) + 1
            else:
                counters["udp_tx"] = counters.get("udp_tx", 0) + 1
        finally:
            if opened:
                # Watched only now, after the datagram left: epoll is level-triggered, so
                # a reply that is already there is reported at once.
                self._install(flow)

    def _open_flow(self, key, ip_packet: memoryview) -> _Flow | None:
        sport, dst_ip, dport = key
        try:
            dest = self._dest_memo[dst_ip]
        except KeyError:
            dest = self._destination(dst_ip)
        if dest is None:
            # Broadcasts and multicast go nowhere, silently (RFC 1122 §3.2.2).
            self._count("udp_dropped_local")
            return None
        if dest is _UNREACHABLE:
            # Another host of the guest's own subnet: only the gateway and DNS live there.
            self._count("udp_unreachable")
            self.unreachable(dst_ip, ICMP_HOST_UNREACH, ip_packet)
            return None
        if self.open_flows() >= self.config.max_flows:
            self._count("udp_dropped_flow_limit")
            return None
        host_ip, host_ip_bytes, guest_dst = dest
        if not self.policy.allows("udp", host_ip, dport, guest_dst=guest_dst):
            self._count("udp_denied")
            self.send_ip(self._icmp_error(ICMP_DEST_UNREACH, ICMP_PKT_FILTERED, dst_ip,
                                          icmp_error_quote(ip_packet)))
            return None
        try:
            sock = self._spare.pop() if self._spare else self._new_socket()
        except OSError as e:
            # EMFILE, ENOBUFS: refuse at once rather than leave the guest waiting.
            self._count("udp_socket_error")
            self.exhaustion.refused("UDP flow", e)
            self.unreachable(dst_ip, ICMP_HOST_UNREACH, ip_packet)
            return None
        if len(self._spare) < UDP_SPARE_SOCKETS and not self._refill_pending:
            self._refill_pending = True
            self.loop.call_soon(self._refill)
        try:
            sock.connect((host_ip, dport))
        except OSError:
            sock.close()
            self._count("udp_connect_error")
            self.send_ip(self._icmp_error(ICMP_DEST_UNREACH, ICMP_HOST_UNREACH, dst_ip,
                                          icmp_error_quote(ip_packet)))
            return None
        flow = _Flow(self, key, sock, dst_ip, host_ip_bytes, self.loop.time())
        counters = self.counters
        counters["udp_flows_opened"] = counters.get("udp_flows_opened", 0) + 1
        return flow

    def _open_flow6(self, key, guest_src: bytes, ip_packet: memoryview) -> _Flow | None:
        """_open_flow for an IPv6 destination (RFC 8200): the same verdicts, in ICMPv6."""
        sport, dst_ip, dport, _src = key
        if is_multicast(dst_ip) or dst_ip == UNSPECIFIED6:
            # Nowhere to go, silently, as IPv4 broadcasts; :: would be the host's loopback
            # to a connect() (RFC 4291 §2.5.2: it names no host).
            self._count("udp_dropped_local")
            return None
        text = ip6_to_str(dst_ip)
        if text != self.config.gateway_ip6 and (self.config.in_subnet6(dst_ip)
                                                 or is_link_local(dst_ip)):
            # The guest's own link: only the gateway and the DNS relay live there.
            self._count("udp_unreachable")
            self.unreachable6(guest_src, dst_ip, ip_packet, ICMPV6_ADDR_UNREACH)
            return None
        if self.open_flows() >= self.config.max_flows:
            self._count("udp_dropped_flow_limit")
            return None
        host_ip = self.config.translate(text)
        if not self.policy.allows("udp", host_ip, dport, guest_dst=text):
            self._count("udp_denied")
            self.unreachable6(guest_src, dst_ip, ip_packet, ICMPV6_ADM_PROHIBITED)
            return None
        try:
            sock = self._spare6.pop() if self._spare6 else self._new_socket6()
        except OSError as e:
            self._count("udp_socket_error")
            self.exhaustion.refused("UDP flow", e)
            self.unreachable6(guest_src, dst_ip, ip_packet, ICMPV6_ADDR_UNREACH)
            return None
        if not self._v6_used:
            self._v6_used = True
            self._rx6 = bytearray(ETH_HLEN + IPV6_UDP_HLEN + UDP_MAX_DATAGRAM)
        if len(self._spare6) < UDP_SPARE_SOCKETS and not self._refill_pending:
            self._refill_pending = True
            self.loop.call_soon(self._refill)
        try:
            sock.connect((host_ip, dport))
        except OSError:
            sock.close()
            self._count("udp_connect_error")
            self.unreachable6(guest_src, dst_ip, ip_packet, ICMPV6_ADDR_UNREACH)
            return None
        flow = _Flow(self, key, sock, dst_ip, ip6_to_bytes(host_ip), self.loop.time())
        flow.guest_src = guest_src
        self._count("udp6_flows_opened")
        return flow

    def unreachable6(self, guest_src: bytes, dst_ip: bytes, ip_packet: memoryview,
                     code: int = ICMPV6_PORT_UNREACH) -> None:
        """Answer a guest IPv6 datagram with ICMPv6 destination unreachable (RFC 4443 §3.1)
        from dst_ip."""
        self._count("udp_icmp6_sent")
        self._send6(dst_ip, guest_src, IPPROTO_ICMPV6,
                    build_icmpv6(dst_ip, guest_src, ICMPV6_DEST_UNREACH, code, 0,
                                 icmpv6_error_quote(ip_packet)))

    def _send6(self, src: bytes, dst: bytes, proto: int, payload: bytes) -> None:
        self._ident = (self._ident + 1) & 0xFFFF
        for pkt in build_ipv6_fragments(src, dst, proto, payload, self.config.mtu,
                                        self._ident):
            self.send_ip(pkt)

    @staticmethod
    def _new_socket6() -> socket.socket:
        """_new_socket for IPv6 flows, with IPV6_RECVERR (ipv6(7))."""
        sock = socket.socket(socket.AF_INET6,
                             socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
        except OSError:
            sock.close()
            raise
        return sock

    @staticmethod
    def _new_socket() -> socket.socket:
        """An unconnected flow socket: non-blocking and close-on-exec from socket(2) itself
        (no fcntl calls), with IP_RECVERR for ICMP errors."""
        sock = socket.socket(socket.AF_INET,
                             socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        except OSError:
            sock.close()
            raise
        return sock

    def _refill(self) -> None:
        """Top up the spare sockets, after this loop turn's events (off the reply's path)."""
        self._refill_pending = False
        if self._closed:
            return
        try:
            while len(self._spare) < UDP_SPARE_SOCKETS:
                self._spare.append(self._new_socket())
            while self._v6_used and len(self._spare6) < UDP_SPARE_SOCKETS:
                self._spare6.append(self._new_socket6())
        except OSError:
            self._count("udp_spare_socket_error")  # EMFILE and the like: flows make their own

    def _destination(self, dst_ip: bytes):
        """The (host address, its bytes) for a guest destination; None if datagrams go
        nowhere (broadcast, multicast, the subnet's own network and broadcast addresses);
        _UNREACHABLE for the other addresses of the guest's subnet but the gateway."""
        addr = ipaddress.IPv4Address(dst_ip)
        if not is_unicast_destination(dst_ip) or addr in (self.network.network_address,
                                                          self.network.broadcast_address):
            dest = None
        elif addr in self.network and dst_ip != self.gateway_ip:
            dest = _UNREACHABLE
        else:
            guest_dst = ip_to_str(dst_ip)
            host_ip = self.config.translate(guest_dst)
            dest = (host_ip, ip_to_bytes(host_ip), guest_dst)
        if len(self._dest_memo) >= ROUTABLE_MEMO_MAX:
            self._dest_memo.clear()
        self._dest_memo[dst_ip] = dest
        return dest

    def _install(self, flow: _Flow) -> None:
        if flow.listener is None:
            try:
                self.loop.watch(flow.sock.fileno(), select.EPOLLIN, flow)
            except OSError as e:
                # The kernel would not watch it (ENOMEM, the user's max_user_watches
                # spent): a flow nothing polls or expires would keep its socket for good.
                # The datagram has left; its replies are lost, as UDP allows. (It counts
                # among the flows opened, and in udp_watch_failed.)
                flow.sock.close()
                self._count("udp_watch_failed")
                self.exhaustion.refused("UDP flow", e, watch=True)
                return
        self.flows[flow.key] = flow
        deadline = flow.last_active + self.idle_timeout
        timer = self._sweep_timer
        if timer is not None and timer.when <= deadline:
            # The usual case: the sweep already due first will look at this flow too.
            heapq.heappush(self._expiry, (deadline, flow.key))
        else:
            self._arm(flow, deadline)

    def _arm(self, flow: _Flow, deadline: float) -> None:
        heapq.heappush(self._expiry, (deadline, flow.key))
        timer = self._sweep_timer
        if timer is None or deadline < timer.when:
            if timer is not None:
                timer.cancel()
            self._sweep_timer = self.loop.call_at(deadline, self._sweep)

    def _sweep(self) -> None:
        """Close the flows idle for udp_idle_timeout; re-arm the others at last_active +
        timeout, so each flow is looked at about once per timeout, not per datagram."""
        self._sweep_timer = None
        now = self.loop.time()
        timeout = self.idle_timeout
        expiry = self._expiry
        rearm = []
        flows = self.flows
        while expiry and expiry[0][0] <= now:
            flow = flows.get(heapq.heappop(expiry)[1])
            if flow is None or flow.sock is None:
                continue  # closed already
            if now - flow.last_active >= timeout:
                self._close_flow(flow)
                self._count("udp_flows_expired")
            else:
                rearm.append(flow)
        for flow in rearm:
            heapq.heappush(expiry, (flow.last_active + timeout, flow.key))
        if expiry:
            self._sweep_timer = self.loop.call_at(expiry[0][0], self._sweep)

    def _close_flow(self, flow: _Flow) -> None:
        if self.flows.get(flow.key) is flow:
            del self.flows[flow.key]
        if flow.listener is None and flow.sock is not None:
            self.loop.unwatch(flow.sock.fileno())
            flow.sock.close()
        flow.sock = None

    # ------------------------------------------------------------ host -> guest

    def _relay(self, flow: _Flow, batch: int) -> tuple[int, int]:
        """FramePort.send_udp4 calls for an IPv4 flow's datagrams, up to `batch` of them;
        (datagrams sent to the guest, status of the last call). What the port could not
        take whole goes on Python's way from the reply buffer: a datagram too long for one
        frame as fragments (and the relay carries on), a frame the TAP refused (EAGAIN)
        into its backlog. Frames are counted as built, as Python's way counts them."""
        key = flow.key
        counters = self.counters
        got = 0
        left = batch
        while True:
            _written, ids, status, n = self.port.send_udp4(
                flow.fd, self._rx, self._eth_header(), flow.guest_dst, self.guest_ip,
                key[2], key[0], (self._ident + 1) & 0xFFFF, left, self.config.mtu)
            self._ident = (self._ident + ids) & 0xFFFF
            # A frame the port refused for good is lost on the wire, as TapIO.write loses
            # it: counted all the same. One refused with EAGAIN is counted by send_ip_buf.
            built = ids - 1 if status == UDP_BLOCKED else ids
            if built:
                counters["frames_to_guest"] = counters.get("frames_to_guest", 0) + built
                counters["udp_rx"] = counters.get("udp_rx", 0) + built
            got += built
            left -= built
            if status == UDP_BLOCKED:
                self.send_ip_buf(self._rx, IPV4_UDP_HLEN + n)  # to the TAP's backlog
                self._count("udp_rx")
                return got + 1, status
            if status != UDP_OVERSIZE:
                return got, status
            self._to_guest(flow.guest_dst, key[2], key[0], bytes(self._rx_payload[:n]))
            got += 1
            left -= 1
            if left <= 0:
                return got, UDP_BUDGET

    def _reply(self, src_ip: bytes, sport: int, dport: int, n: int) -> None:
        """Send the n payload bytes in self._rx_payload to the guest as one IPv4 + UDP
        packet (RFC 791 §3.1, RFC 768), or as fragments if that exceeds the MTU."""
        total = IPV4_UDP_HLEN + n
        if total > self.config.mtu:
            self._to_guest(src_ip, sport, dport, bytes(self._rx_payload[:n]))
            return
        buf = self._rx
        self._ident = ident = (self._ident + 1) & 0xFFFF
        # One compiled call writes both headers and both checksums (voidbox.net.udpfast).
        build_ipv4_udp(buf, ETH_HLEN, src_ip, self.guest_ip, ident, sport, dport, n)
        if self.send_ip_buf is not None:
            self.send_ip_buf(buf, total)
        else:
            self.send_ip(bytes(self._rx_packet[:total]))
        counters = self.counters
        counters["udp_rx"] = counters.get("udp_rx", 0) + 1

    def _reply6(self, flow: _Flow, n: int) -> None:
        """The n payload bytes in self._rx6 to the guest as one IPv6 + UDP packet (RFC 8200
        §3, §8.1), built in place, or as fragments past the MTU."""
        src, dst, sport, dport = flow.guest_dst, flow.guest_src, flow.key[2], flow.key[0]
        buf = self._rx6
        if IPV6_UDP_HLEN + n > self.config.mtu:
            payload = memoryview(buf)[ETH_HLEN + IPV6_UDP_HLEN:ETH_HLEN + IPV6_UDP_HLEN + n]
            self._send6(src, dst, IPPROTO_UDP, build_udp6(src, dst, sport, dport, payload))
            self._count("udp_rx")
            return
        ulen = UDP_HLEN + n
        _PSEUDO6.pack_into(buf, ETH_HLEN, src, dst, ulen, IPPROTO_UDP)
        _UDP.pack_into(buf, ETH_HLEN + IPV6_HLEN, sport, dport, ulen, 0)
        csum = inet_checksum(memoryview(buf)[ETH_HLEN:ETH_HLEN + IPV6_HLEN + ulen])
        _CSUM.pack_into(buf, ETH_HLEN + IPV6_HLEN + UDP_CSUM_FIELD, csum or UDP_CSUM_NONE)
        _IPV6_HDR.pack_into(buf, ETH_HLEN, IPV6_VTF, ulen, IPPROTO_UDP, DEFAULT_TTL, src, dst)
        total = IPV6_HLEN + ulen
        if self.send_ip_buf is not None:
            self.send_ip_buf(buf, total)
        else:
            self.send_ip(bytes(buf[ETH_HLEN:ETH_HLEN + total]))
        self._count("udp_rx")

    def _to_guest(self, src_ip: bytes, sport: int, dport: int, data: bytes) -> None:
        udp = build_udp(src_ip, self.guest_ip, sport, dport, data)
        self._ident = (self._ident + 1) & 0xFFFF
        for pkt in build_ipv4_fragments(src_ip, self.guest_ip, IPPROTO_UDP, udp, self.config.mtu,
                                        ident=self._ident):
            self.send_ip(pkt)
        self._count("udp_rx")

    def _drain_errors(self, flow: _Flow) -> None:
        for _ in range(UDP_BATCH):
            try:
                _data, anc, _flags, _addr = flow.sock.recvmsg(UDP_MAX_DATAGRAM, ERRQUEUE_CMSG_SPACE6,
                                                              socket.MSG_ERRQUEUE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if flow.guest_src is not None:
                err6 = parse_recverr(anc, v6=True)
                if err6 is None or not flow.quote:
                    continue
                etype, code, info, offender = err6
                src = flow.guest_dst if offender in (None, flow.host_dst) else offender
                rest = info if etype == ICMPV6_PACKET_TOO_BIG else 0
                self._send6(src, flow.guest_src, IPPROTO_ICMPV6,
                            build_icmpv6(src, flow.guest_src, etype, code, rest, flow.quote))
                self._count("udp_icmp6_reflected")
                continue
            err = parse_recverr(anc)
            if err is None or not flow.quote:
                continue
            etype, code, _info, offender = err
            # The guest must see the error come from the address it sent to.
            src = flow.guest_dst if offender in (None, flow.host_dst) else offender
            self.send_ip(self._icmp_error(etype, code, src, flow.quote))
            self._count("udp_icmp_reflected")

    def unreachable(self, dst_ip: bytes, code: int, ip_packet: memoryview) -> None:
        """Answer a guest datagram with ICMP destination unreachable (code) from dst_ip."""
        self.send_ip(self._icmp_error(ICMP_DEST_UNREACH, code, dst_ip,
                                      icmp_error_quote(ip_packet)))

    def _icmp_error(self, etype: int, code: int, src: bytes, quote: bytes) -> bytes:
        return build_ipv4(src, self.guest_ip, IPPROTO_ICMP, build_icmp(etype, code, 0, quote))

    # ------------------------------------------------------------ port forwards

    def add_forward(self, host_addr: str, host_port: int, guest_port: int) -> None:
        """Datagrams to host_addr:host_port reach guest_port."""
        family = socket.AF_INET6 if ":" in host_addr else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            # No SO_REUSEADDR (nor SO_REUSEPORT): on UDP it lets this bind share a port
            # that another user's service holds with SO_REUSEADDR, and take its datagrams.
            sock.bind((host_addr, host_port))
        except OSError as e:
            sock.close()
            raise VoidboxError(f"cannot forward udp {host_addr}:{host_port}: {e.strerror}") from None
        self.listeners[sock.fileno()] = sock
        self.loop.watch(sock.fileno(), select.EPOLLIN,
                        lambda ev, s=sock, gp=guest_port: self._listener_event(s, gp))

    def _listener_event(self, sock: socket.socket, guest_port: int) -> None:
        for _ in range(UDP_BATCH):
            try:
                n, peer = sock.recvfrom_into(self._rx_payload)
            except BlockingIOError:
                return
            except OSError:
                continue
            if ":" in peer[0]:
                # An IPv6 peer of a forward on an IPv6 host address: the guest side of a
                # forward is IPv4, so it is presented as the gateway.
                peer_ip = ip6_to_bytes(peer[0].partition("%")[0])
                visible = self.gateway_ip
            else:
                peer_ip = ip_to_bytes(peer[0])
                # 127.0.0.0/8 is loopback (RFC 1122 §3.2.1.3 (g)).
                visible = self.gateway_ip if peer_ip[0] == LOOPBACK_NET else peer_ip
            key = (guest_port, visible, peer[1])
            flow = self.flows.get(key)
            now = self.loop.time()
            if flow is None:
                if self.open_flows() >= self.config.max_flows:
                    self._count("udp_dropped_flow_limit")
                    continue
                flow = _Flow(self, key, sock, visible, peer_ip, now)
                flow.listener = sock
                flow.peer = peer
                self._install(flow)
                self._count("udp_forward_flows_opened")
            flow.last_active = now
            self._reply(visible, peer[1], guest_port, n)

    def drop_flows(self) -> None:
        """Close every flow; forward listeners stay (their flows just forget the peer)."""
        for flow in list(self.flows.values()):
            self._close_flow(flow)

    def close(self) -> None:
        self._closed = True
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        self._expiry.clear()
        for sock in self._spare + self._spare6:
            sock.close()
        self._spare.clear()
        self._spare6.clear()
        for flow in list(self.flows.values()):
            self._close_flow(flow)
        for fd, sock in list(self.listeners.items()):
            self.loop.unwatch(fd)
            sock.close()
        self.listeners.clear()
