"""UDP NAT: guest datagrams relayed through per-flow connected host sockets.

A flow is (guest port, destination address, destination port). Its host socket is
connected to the translated destination, so only that peer's datagrams come back, and
IP_RECVERR (ip(7)) brings ICMP errors from the host, which are reflected to the guest
as ICMP errors quoting the guest's own datagram. Idle flows are closed after
config.udp_idle_timeout. Port forwards bind a host socket and present each remote peer
to the guest as a flow from the gateway (loopback peers) or the peer's own address.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
from collections.abc import Callable

from voidbox.errors import VoidboxError
from voidbox.net.config import NatConfig
from voidbox.net.loop import EventLoop, Timer
from voidbox.net.packets import (
    ICMP_DEST_UNREACH,
    ICMP_HOST_UNREACH,
    ICMP_PKT_FILTERED,
    IPPROTO_ICMP,
    IPPROTO_UDP,
    build_icmp,
    build_ipv4,
    build_ipv4_fragments,
    build_udp,
    icmp_error_quote,
    ip_to_bytes,
    ip_to_str,
)
from voidbox.net.policy import Policy

# linux/errqueue.h: struct sock_extended_err and its origins
SO_EE_ORIGIN_ICMP = 2
_SOCK_EXTENDED_ERR = struct.Struct("=IBBBBII")
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
UDP_MAX_DATAGRAM = 65535
# Datagrams relayed per socket wakeup: bounded so one busy flow cannot starve the others.
UDP_BATCH = 64
ROUTABLE_MEMO_MAX = 4096  # destinations whose routability is remembered; cleared when full
ERRQUEUE_CMSG_SPACE = socket.CMSG_SPACE(_SOCK_EXTENDED_ERR.size + 16)


def is_unicast_destination(ip: bytes) -> bool:
    addr = ipaddress.IPv4Address(ip)
    return not (addr.is_multicast or addr.is_unspecified or ip == b"\xff\xff\xff\xff")


def parse_recverr(ancdata) -> tuple[int, int, bytes | None] | None:
    """(ICMP type, code, offender address) from an IP_RECVERR control message, if from ICMP."""
    for level, ctype, data in ancdata:
        if level == socket.IPPROTO_IP and ctype == IP_RECVERR and len(data) >= _SOCK_EXTENDED_ERR.size:
            _errno, origin, etype, code, _pad, _info, _data = _SOCK_EXTENDED_ERR.unpack_from(data)
            if origin != SO_EE_ORIGIN_ICMP:
                return None
            offender = None
            off = _SOCK_EXTENDED_ERR.size
            # SO_EE_OFFENDER: a sockaddr_in right after the struct (family, port, addr).
            if len(data) >= off + 8 and struct.unpack_from("=H", data, off)[0] == socket.AF_INET:
                offender = bytes(data[off + 4 : off + 8])
            return etype, code, offender
    return None


class _Flow:
    __slots__ = ("key", "sock", "guest_dst", "host_dst", "last_active", "timer", "quote", "peer",
                 "listener")

    def __init__(self, key, sock, guest_dst: bytes, host_dst: bytes):
        self.key = key  # (guest port, guest-visible remote address, remote port)
        self.sock = sock
        self.guest_dst = guest_dst
        self.host_dst = host_dst
        self.last_active = 0.0
        self.timer: Timer | None = None
        self.quote = b""  # the guest's last datagram, as an ICMP error would quote it
        self.peer: tuple[str, int] | None = None  # forwarded flows: the remote peer
        self.listener: socket.socket | None = None


class UdpNat:
    def __init__(self, loop: EventLoop, config: NatConfig, policy: Policy,
                 send_ip: Callable[[bytes], None], counters: dict[str, int] | None = None):
        self.loop = loop
        self.config = config
        self.policy = policy
        self.send_ip = send_ip
        self.counters = counters if counters is not None else {}
        self.guest_ip = ip_to_bytes(config.guest_ip)
        self.gateway_ip = ip_to_bytes(config.gateway_ip)
        self.dns_ip = ip_to_bytes(config.dns_ip)
        self.network = config.network
        self._routable_memo: dict[bytes, bool] = {}  # per destination: ipaddress is slow
        self.flows: dict[tuple[int, bytes, int], _Flow] = {}
        self.listeners: dict[int, socket.socket] = {}
        self._ident = 0

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def flow_count(self) -> int:
        return len(self.flows)

    # ------------------------------------------------------------ guest -> host

    def guest_datagram(self, dst_ip: bytes, sport: int, dport: int, payload: memoryview,
                       ip_packet: memoryview) -> None:
        """A validated UDP datagram from the guest (not DHCP, not DNS to the relay)."""
        key = (sport, dst_ip, dport)
        flow = self.flows.get(key)
        if flow is None:
            flow = self._open_flow(key, ip_packet)
            if flow is None:
                return
        flow.last_active = self.loop.time()
        flow.quote = icmp_error_quote(ip_packet)
        try:
            if flow.listener is not None:
                flow.listener.sendto(payload, flow.peer)
            else:
                flow.sock.send(payload)
        except BlockingIOError:
            self._count("udp_tx_dropped")  # UDP may drop; the socket buffer is full
            return
        except OSError:
            # An earlier ICMP error surfacing; IP_RECVERR delivers the details separately.
            self._count("udp_tx_error")
            return
        self._count("udp_tx")

    def _open_flow(self, key, ip_packet: memoryview) -> _Flow | None:
        sport, dst_ip, dport = key
        if not self._routable(dst_ip):
            # Broadcasts, multicast and other hosts of the guest's own subnet go nowhere.
            self._count("udp_dropped_local")
            return None
        if len(self.flows) >= self.config.max_flows:
            self._count("udp_dropped_flow_limit")
            return None
        host_ip = self.config.translate(ip_to_str(dst_ip))
        if not self.policy.allows("udp", host_ip, dport):
            self._count("udp_denied")
            self.send_ip(self._icmp_error(ICMP_DEST_UNREACH, ICMP_PKT_FILTERED, dst_ip,
                                          icmp_error_quote(ip_packet)))
            return None
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
            sock.connect((host_ip, dport))
        except OSError:
            sock.close()
            self._count("udp_connect_error")
            self.send_ip(self._icmp_error(ICMP_DEST_UNREACH, ICMP_HOST_UNREACH, dst_ip, icmp_error_quote(ip_packet)))
            return None
        flow = _Flow(key, sock, dst_ip, ip_to_bytes(host_ip))
        self._install(flow)
        self._count("udp_flows_opened")
        return flow

    def _routable(self, dst_ip: bytes) -> bool:
        ok = self._routable_memo.get(dst_ip)
        if ok is None:
            addr = ipaddress.IPv4Address(dst_ip)
            ok = is_unicast_destination(dst_ip) and (
                addr not in self.network or dst_ip == self.gateway_ip)
            if len(self._routable_memo) >= ROUTABLE_MEMO_MAX:
                self._routable_memo.clear()
            self._routable_memo[dst_ip] = ok
        return ok

    def _install(self, flow: _Flow) -> None:
        self.flows[flow.key] = flow
        flow.last_active = self.loop.time()
        if flow.listener is None:
            self.loop.watch(flow.sock.fileno(), select.EPOLLIN,
                            lambda ev, f=flow: self._flow_event(f, ev))
        self._arm(flow)

    def _arm(self, flow: _Flow) -> None:
        flow.timer = self.loop.call_at(flow.last_active + self.config.udp_idle_timeout,
                                       lambda f=flow: self._idle_check(f))

    def _idle_check(self, flow: _Flow) -> None:
        flow.timer = None
        # Re-arming once per timeout, rather than per datagram, keeps the timer heap small.
        if self.loop.time() - flow.last_active >= self.config.udp_idle_timeout:
            self._close_flow(flow)
            self._count("udp_flows_expired")
        else:
            self._arm(flow)

    def _close_flow(self, flow: _Flow) -> None:
        if self.flows.get(flow.key) is flow:
            del self.flows[flow.key]
        if flow.timer is not None:
            flow.timer.cancel()
            flow.timer = None
        if flow.listener is None and flow.sock is not None:
            self.loop.unwatch(flow.sock.fileno())
            flow.sock.close()
        flow.sock = None

    # ------------------------------------------------------------ host -> guest

    def _flow_event(self, flow: _Flow, events: int) -> None:
        if flow.sock is None:
            return
        if events & select.EPOLLERR:
            self._drain_errors(flow)
        if events & select.EPOLLIN:
            for _ in range(UDP_BATCH):
                try:
                    data = flow.sock.recv(UDP_MAX_DATAGRAM)
                except BlockingIOError:
                    break
                except OSError:
                    # The pending error was already reported through the error queue.
                    continue
                flow.last_active = self.loop.time()
                self._to_guest(flow.guest_dst, flow.key[2], flow.key[0], data)

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
                _data, anc, _flags, _addr = flow.sock.recvmsg(UDP_MAX_DATAGRAM, ERRQUEUE_CMSG_SPACE,
                                                              socket.MSG_ERRQUEUE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            err = parse_recverr(anc)
            if err is None or not flow.quote:
                continue
            etype, code, offender = err
            # The guest must see the error come from the address it sent to.
            src = flow.guest_dst if offender in (None, flow.host_dst) else offender
            self.send_ip(self._icmp_error(etype, code, src, flow.quote))
            self._count("udp_icmp_reflected")

    def _icmp_error(self, etype: int, code: int, src: bytes, quote: bytes) -> bytes:
        return build_ipv4(src, self.guest_ip, IPPROTO_ICMP, build_icmp(etype, code, 0, quote))

    # ------------------------------------------------------------ port forwards

    def add_forward(self, host_addr: str, host_port: int, guest_port: int) -> None:
        """Datagrams to host_addr:host_port reach guest_port."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
                data, peer = sock.recvfrom(UDP_MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError:
                continue
            peer_ip = ip_to_bytes(peer[0])
            visible = self.gateway_ip if ipaddress.IPv4Address(peer_ip).is_loopback else peer_ip
            key = (guest_port, visible, peer[1])
            flow = self.flows.get(key)
            if flow is None:
                if len(self.flows) >= self.config.max_flows:
                    self._count("udp_dropped_flow_limit")
                    continue
                flow = _Flow(key, sock, visible, peer_ip)
                flow.listener = sock
                flow.peer = peer
                self._install(flow)
                self._count("udp_forward_flows_opened")
            flow.last_active = self.loop.time()
            self._to_guest(visible, peer[1], guest_port, data)

    def close(self) -> None:
        for flow in list(self.flows.values()):
            self._close_flow(flow)
        for fd, sock in list(self.listeners.items()):
            self.loop.unwatch(fd)
            sock.close()
        self.listeners.clear()
