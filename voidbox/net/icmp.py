"""ICMP echo for the guest (RFC 792), and ICMPv6 echo (RFC 4443 §4) the same way.

Echo requests to the gateway and DNS addresses are answered here. Others, when the
policy allows them, go out through an unprivileged ping socket (SOCK_DGRAM/IPPROTO_ICMP,
allowed by net.ipv4.ping_group_range), else a raw socket (CAP_NET_RAW), else the guest
gets ICMP host unreachable and the user one warning. Errors from the host come back
through IP_RECVERR (ping sockets) or the raw socket and are reflected to the guest.

ICMPv6 takes the same path with the IPv6 sockets (SOCK_DGRAM/IPPROTO_ICMPV6 ping sockets,
which the same ping_group_range allows, then SOCK_RAW/IPPROTO_ICMPV6; the two families
are probed apart). An IPv6 flow also remembers which of the guest's addresses asked: a
SLAAC guest has several.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
from collections.abc import Callable

from voidbox.eventloop import EventLoop, Timer
from voidbox.net.config import NatConfig
from voidbox.net.ipv6 import (
    ICMPV6_ADDR_UNREACH,
    ICMPV6_ADM_PROHIBITED,
    ICMPV6_BEYOND_SCOPE,
    ICMPV6_DEST_UNREACH,
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    ICMPV6_HLEN,
    ICMPV6_PACKET_TOO_BIG,
    ICMPV6_TIME_EXCEEDED,
    IPPROTO_ICMPV6,
    IPV6_HLEN,
    build_icmpv6,
    build_ipv6_fragments,
    icmpv6_error_quote,
    ip6_to_bytes,
    ip6_to_str,
    is_multicast,
)
from voidbox.net.limits import Exhaustion
from voidbox.net.packets import (
    ICMP_DEST_UNREACH,
    ICMP_ECHO,
    ICMP_ECHOREPLY,
    ICMP_HLEN,
    ICMP_HOST_UNREACH,
    ICMP_PKT_FILTERED,
    ICMP_TIME_EXCEEDED,
    IPPROTO_ICMP,
    IPV4_HLEN,
    PacketError,
    build_icmp,
    build_ipv4,
    build_ipv4_fragments,
    icmp_error_quote,
    ip_to_bytes,
    ip_to_str,
    parse_icmp,
    parse_ipv4,
)
from voidbox.net.policy import Policy
from voidbox.net.udp import (
    IP_RECVERR,
    IPV6_RECVERR,
    is_unicast_destination,
    parse_recverr,
)

from .._lazylog import get_logger

log = get_logger(__name__)

ICMP_MAX_MESSAGE = 65535
ICMP_BATCH = 64
ID_SPACE = 0x10000
ERRQUEUE_CMSG_SPACE = socket.CMSG_SPACE(16 + 16)
ERRQUEUE_CMSG_SPACE6 = socket.CMSG_SPACE(16 + 28)  # sock_extended_err + sockaddr_in6
# Destinations whose reachability and host address are remembered; cleared when full.
DEST_MEMO_MAX = 4096


class _Family:
    """What an echo flow's host side needs of its address family."""

    def __init__(self, name: str, label: str, family: int, proto: int,
                 recverr: tuple[int, int], to_str: Callable[[bytes], str], unreachable: str):
        self.name = name  # "icmp" or "icmp6": counter names
        self.label = label  # "ICMP" or "ICMPv6": log lines
        self.family = family
        self.proto = proto
        self.recverr = recverr  # (level, option) of IP(V6)_RECVERR
        self.to_str = to_str
        self.unreachable = unreachable  # what the guest gets when echo is unavailable


_V4 = _Family("icmp", "ICMP", socket.AF_INET, socket.IPPROTO_ICMP, (socket.IPPROTO_IP, IP_RECVERR),
              ip_to_str, "host unreachable")
_V6 = _Family("icmp6", "ICMPv6", socket.AF_INET6, socket.IPPROTO_ICMPV6,
              (socket.IPPROTO_IPV6, IPV6_RECVERR), ip6_to_str, "address unreachable")


def echo_reply(guest_ip: bytes, responder_ip: bytes, ident: int, seq: int,
               data: bytes | memoryview) -> bytes:
    """An IPv4 echo reply from responder_ip to the guest, echoing ident, seq and data."""
    return build_ipv4(responder_ip, guest_ip, IPPROTO_ICMP,
                      build_icmp(ICMP_ECHOREPLY, 0, (ident << 16) | seq, data))


_ECHO6 = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence (RFC 4443 §4.1)


class _Flow:
    __slots__ = ("key", "sock", "guest_dst", "host_dst", "guest_id", "host_id", "last_active",
                 "timer", "quote", "guest_src")

    def __init__(self, key, guest_dst: bytes, host_dst: bytes, guest_id: int,
                 guest_src: bytes = b""):
        self.guest_src = guest_src  # IPv6: the guest address that sent the echo
        self.key = key
        self.sock: socket.socket | None = None
        self.guest_dst = guest_dst
        self.host_dst = host_dst
        self.guest_id = guest_id
        self.host_id = guest_id
        self.last_active = 0.0
        self.timer: Timer | None = None
        self.quote = b""


class IcmpNat:
    def __init__(self, loop: EventLoop, config: NatConfig, policy: Policy,
                 send_ip: Callable[[bytes], None], counters: dict[str, int] | None = None):
        self.loop = loop
        self.config = config
        self.policy = policy
        self.send_ip = send_ip
        self.counters = counters if counters is not None else {}
        self.exhaustion = Exhaustion(self.counters)
        self._frag_ident = 0
        self.guest_ip = ip_to_bytes(config.guest_ip)
        self.local = {ip_to_bytes(config.gateway_ip), ip_to_bytes(config.dns_ip)}
        self.network = config.network
        self._dest_memo: dict[bytes, str | None] = {}
        self.flows: dict[tuple[bytes, int], _Flow] = {}
        # Flows open against --max-flows: this table's, or (Engine) every relay's together.
        self.open_flows: Callable[[], int] = self.flow_count
        self.raw_ids: dict[int, _Flow] = {}
        self.mode: str | None = None  # "ping", "raw" or "none", probed on first use
        self.raw: socket.socket | None = None
        self.mode6: str | None = None  # the same, for ICMPv6
        self.raw6: socket.socket | None = None
        self._frag_ident6 = 0
        self._next_id = 1
        self._warned: set[str] = set()  # the families whose unavailable echo was logged

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def flow_count(self) -> int:
        return len(self.flows)

    def guest_icmp(self, src_ip: bytes, dst_ip: bytes, message: memoryview, ip_packet: memoryview) -> None:
        try:
            hdr, data = parse_icmp(message)
        except PacketError as e:
            self._count(str(e))
            return
        if hdr.type != ICMP_ECHO or hdr.code != 0:
            self._count("icmp_ignored_type")
            return
        ident, seq = hdr.rest >> 16, hdr.rest & 0xFFFF
        if dst_ip in self.local:
            self._count("icmp_echo_local")
            self._echo_reply(dst_ip, ident, seq, data)
            return
        quote = icmp_error_quote(ip_packet)
        try:
            host_ip = self._dest_memo[dst_ip]
        except KeyError:
            host_ip = self._destination(dst_ip)
        if host_ip is None:
            self._unreachable(dst_ip, ICMP_HOST_UNREACH, quote)
            return
        if not self.policy.allows("icmp", host_ip, None, guest_dst=ip_to_str(dst_ip)):
            self._count("icmp_denied")
            self._unreachable(dst_ip, ICMP_PKT_FILTERED, quote)
            return
        key = (dst_ip, ident)
        flow = self.flows.get(key)
        if flow is None:
            flow = self._open(key, dst_ip, ip_to_bytes(host_ip), ident, quote)
            if flow is None:
                return
        flow.last_active = self.loop.time()
        flow.quote = quote
        # Ping sockets take the ICMP header with the kernel filling in the id and
        # checksum; the raw socket needs our own id and a correct checksum.
        msg = build_icmp(ICMP_ECHO, 0, (flow.host_id << 16) | seq, data)
        try:
            if self.mode == "ping":
                flow.sock.send(msg)
            else:
                self.raw.sendto(msg, (ip_to_str(flow.host_dst), 0))
        except BlockingIOError:
            self._count("icmp_tx_dropped")
            return
        except OSError:
            self._count("icmp_tx_error")
            return
        self._count("icmp_echo_tx")

    def _destination(self, dst_ip: bytes) -> str | None:
        """The host address an echo to dst_ip goes to, or None if it is unreachable (the
        guest's own subnet, broadcast, multicast); remembered per destination, as ipaddress
        is too slow to ask per echo request."""
        host_ip = None
        if ipaddress.IPv4Address(dst_ip) not in self.network and is_unicast_destination(dst_ip):
            host_ip = self.config.translate(ip_to_str(dst_ip))
        if len(self._dest_memo) >= DEST_MEMO_MAX:
            self._dest_memo.clear()
        self._dest_memo[dst_ip] = host_ip
        return host_ip

    def _echo_reply(self, src: bytes, ident: int, seq: int, data: bytes | memoryview) -> None:
        """An echo reply from src, in fragments if it is larger than the MTU (the guest
        may ping with more than an MTU of data, reassembled on our side)."""
        if IPV4_HLEN + ICMP_HLEN + len(data) <= self.config.mtu:
            self.send_ip(echo_reply(self.guest_ip, src, ident, seq, data))
            return
        self._frag_ident = (self._frag_ident + 1) & 0xFFFF
        message = build_icmp(ICMP_ECHOREPLY, 0, (ident << 16) | seq, data)
        for packet in build_ipv4_fragments(src, self.guest_ip, IPPROTO_ICMP, message,
                                           self.config.mtu, ident=self._frag_ident):
            self.send_ip(packet)

    def _unreachable(self, src: bytes, code: int, quote: bytes) -> None:
        self._count("icmp_unreachable_sent")
        self.send_ip(build_ipv4(src, self.guest_ip, IPPROTO_ICMP,
                                build_icmp(ICMP_DEST_UNREACH, code, 0, quote)))

    def prepare(self) -> None:
        """Choose the echo path (ping socket, raw socket or none) now rather than at the
        first echo to an outside host: a sandboxed NAT (voidbox.sandbox) no longer has
        CAP_NET_RAW by then. As root this opens the raw fallback at start."""
        if self.mode is None:
            self._probe()
        if self.mode6 is None and self.config.ipv6:
            self._probe6()

    def _probe(self) -> None:
        self.mode, self.raw = self._probe_family(_V4, self._raw_event)

    def _probe_family(self, fam: _Family, raw_event) -> tuple[str, socket.socket | None]:
        """("ping", None) with unprivileged ping sockets (net.ipv4.ping_group_range),
        ("raw", the socket, watched) with CAP_NET_RAW, else ("none", None)."""
        try:
            socket.socket(fam.family, socket.SOCK_DGRAM, fam.proto).close()
            return "ping", None
        except OSError:
            pass
        try:
            raw = socket.socket(fam.family, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                                | socket.SOCK_CLOEXEC, fam.proto)
        except OSError:
            return "none", None
        self.loop.watch(raw.fileno(), select.EPOLLIN, raw_event)
        return "raw", raw

    def _open(self, key, guest_dst: bytes, host_dst: bytes, ident: int, quote: bytes) -> _Flow | None:
        if self.mode is None:
            self._probe()
        return self._open_flow(_V4, self.mode, _Flow(key, guest_dst, host_dst, ident),
                               lambda: self._unreachable(guest_dst, ICMP_HOST_UNREACH, quote))

    def _open_flow(self, fam: _Family, mode: str, flow: _Flow,
                   refuse: Callable[[], None]) -> _Flow | None:
        """Give `flow` its host side (a connected ping socket, or an id on the raw socket)
        and start tracking it; None, with refuse() answering the guest where it should
        hear, when that cannot be done."""
        if mode == "none":
            if fam.name not in self._warned:
                self._warned.add(fam.name)
                log.warning("%s echo to outside hosts is unavailable: no ping socket "
                            "(net.ipv4.ping_group_range) and no CAP_NET_RAW; guests get %s",
                            fam.label, fam.unreachable)
            refuse()
            return None
        if self.open_flows() >= self.config.max_flows:
            self._count("icmp_dropped_flow_limit")
            return None
        if mode == "ping":
            try:
                sock = socket.socket(fam.family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                                     | socket.SOCK_CLOEXEC, fam.proto)
            except OSError as e:  # EMFILE and the like: answer now, never raise
                self.exhaustion.refused(f"{fam.label} echo flow", e)
                refuse()
                return None
            try:
                sock.setsockopt(*fam.recverr, 1)
                sock.connect((fam.to_str(flow.host_dst), 0))
            except OSError:
                sock.close()
                refuse()
                return None
            try:
                self.loop.watch(sock.fileno(), select.EPOLLIN,
                                lambda ev, f=flow: self._ping_event(f, ev))
            except OSError as e:
                # ENOMEM, max_user_watches spent: a socket nothing polls would never answer.
                sock.close()
                self.exhaustion.refused(f"{fam.label} echo flow", e, watch=True)
                refuse()
                return None
            flow.sock = sock
        else:
            host_id = self._alloc_id()
            if host_id is None:
                self._count("icmp_dropped_flow_limit")
                return None
            flow.host_id = host_id
            self.raw_ids[host_id] = flow
        self.flows[flow.key] = flow
        flow.last_active = self.loop.time()
        self._arm(flow)
        self._count(f"{fam.name}_flows_opened")
        return flow

    def _alloc_id(self) -> int | None:
        for _ in range(ID_SPACE):
            candidate = self._next_id
            self._next_id = (self._next_id + 1) % ID_SPACE
            if candidate not in self.raw_ids:
                return candidate
        return None

    def _arm(self, flow: _Flow) -> None:
        flow.timer = self.loop.call_at(flow.last_active + self.config.icmp_idle_timeout,
                                       lambda f=flow: self._idle(f))

    def _idle(self, flow: _Flow) -> None:
        flow.timer = None
        if self.loop.time() - flow.last_active >= self.config.icmp_idle_timeout:
            self._close_flow(flow)
        else:
            self._arm(flow)

    def _close_flow(self, flow: _Flow) -> None:
        self.flows.pop(flow.key, None)
        if self.raw_ids.get(flow.host_id) is flow:
            del self.raw_ids[flow.host_id]
        if flow.timer is not None:
            flow.timer.cancel()
            flow.timer = None
        if flow.sock is not None:
            self.loop.unwatch(flow.sock.fileno())
            flow.sock.close()
            flow.sock = None

    def _reply_to_guest(self, flow: _Flow, seq: int, data: bytes | memoryview) -> None:
        flow.last_active = self.loop.time()
        self._count("icmp_echo_rx")
        self._echo_reply(flow.guest_dst, flow.guest_id, seq, data)

    def _reflect_error(self, flow: _Flow, etype: int, code: int, _info: int,
                       offender: bytes | None) -> None:
        if not flow.quote:
            return
        src = flow.guest_dst if offender in (None, flow.host_dst) else offender
        self._count("icmp_error_reflected")
        self.send_ip(build_ipv4(src, self.guest_ip, IPPROTO_ICMP, build_icmp(etype, code, 0, flow.quote)))

    def _ping_event(self, flow: _Flow, events: int) -> None:
        """A ping socket's events, either family (an IPv6 flow has its guest's source):
        errors from its queue reflected to the guest, echo replies relayed. Ping sockets
        deliver the ICMP message without the IP header; the kernel already checked it and
        matched the id."""
        if flow.sock is None:
            return
        v6 = bool(flow.guest_src)
        if events & select.EPOLLERR:
            space = ERRQUEUE_CMSG_SPACE6 if v6 else ERRQUEUE_CMSG_SPACE
            for _ in range(ICMP_BATCH):
                try:
                    _d, anc, _f, _a = flow.sock.recvmsg(ICMP_MAX_MESSAGE, space, socket.MSG_ERRQUEUE)
                except OSError:
                    break
                err = parse_recverr(anc, v6)
                if err is not None:
                    (self._reflect_error6 if v6 else self._reflect_error)(flow, *err)
        hlen, reply_type = (ICMPV6_HLEN, ICMPV6_ECHO_REPLY) if v6 else (ICMP_HLEN, ICMP_ECHOREPLY)
        reply = self._reply_to_guest6 if v6 else self._reply_to_guest
        for _ in range(ICMP_BATCH):
            try:
                msg = flow.sock.recv(ICMP_MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                continue
            if len(msg) < hlen or msg[0] != reply_type:
                continue
            reply(flow, struct.unpack_from("!H", msg, 6)[0], memoryview(msg)[hlen:])

    def _raw_event(self, events: int) -> None:
        for _ in range(ICMP_BATCH):
            try:
                pkt, _addr = self.raw.recvfrom(ICMP_MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                continue
            try:
                ip, payload = parse_ipv4(pkt)
                hdr, data = parse_icmp(payload)
            except PacketError:
                continue
            if hdr.type == ICMP_ECHOREPLY:
                flow = self.raw_ids.get(hdr.rest >> 16)
                if flow is not None and flow.host_dst == ip.src:
                    self._reply_to_guest(flow, hdr.rest & 0xFFFF, data)
            elif hdr.type in (ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED):
                # The quoted packet is our echo request: match it by destination and id.
                if len(data) < IPV4_HLEN + ICMP_HLEN:
                    continue
                ihl = (data[0] & 0x0F) * 4
                if len(data) < ihl + ICMP_HLEN or data[9] != IPPROTO_ICMP:
                    continue
                inner_dst = bytes(data[16:20])
                inner_id = struct.unpack_from("!H", data, ihl + 4)[0]
                flow = self.raw_ids.get(inner_id)
                if flow is not None and flow.host_dst == inner_dst:
                    self._reflect_error(flow, hdr.type, hdr.code, 0, ip.src)

    # ------------------------------------------------------------ ICMPv6 (RFC 4443)

    def send_ip6(self, src: bytes, dst: bytes, message: bytes) -> None:
        """An ICMPv6 message to the guest, in fragments past the MTU (RFC 8200 §4.5)."""
        self._frag_ident6 = (self._frag_ident6 + 1) & 0xFFFFFFFF
        for pkt in build_ipv6_fragments(src, dst, IPPROTO_ICMPV6, message, self.config.mtu,
                                        self._frag_ident6):
            self.send_ip(pkt)

    def local_echo6(self, guest: bytes, local: bytes, hdr, data: memoryview) -> None:
        """An ICMPv6 message to one of the NAT's own addresses: echo is answered."""
        if hdr.type != ICMPV6_ECHO_REQUEST or hdr.code != 0:
            self._count("icmp6_ignored_type")
            return
        self._count("icmp6_echo_local")
        self.send_ip6(local, guest, build_icmpv6(local, guest, ICMPV6_ECHO_REPLY, 0, hdr.rest, data))

    def _unreachable6(self, src: bytes, guest: bytes, code: int, packet: bytes | memoryview) -> None:
        self._count("icmp6_unreachable_sent")
        self.send_ip6(src, guest, build_icmpv6(src, guest, ICMPV6_DEST_UNREACH, code, 0,
                                               icmpv6_error_quote(packet)))

    def beyond_scope6(self, guest: bytes, dst: bytes, packet: bytes | memoryview) -> None:
        """A guest packet from its link-local address to dst, off the link: destination
        unreachable, beyond scope of source address (RFC 4443 §3.1 code 2), from the
        router's link-local address (the source of what the guest sent is link-local)."""
        self._count("icmp6_unreachable_sent")
        src = ip6_to_bytes(self.config.router_ll6)
        self.send_ip6(src, guest, build_icmpv6(src, guest, ICMPV6_DEST_UNREACH,
                                               ICMPV6_BEYOND_SCOPE, 0,
                                               icmpv6_error_quote(packet)))

    def _destination6(self, dst: bytes) -> str | None:
        """The host address an ICMPv6 echo to dst goes to: None for the guest's own /64
        (but the gateway), link-local and multicast destinations."""
        try:
            return self._dest_memo[dst]
        except KeyError:
            pass
        host_ip = None
        if not is_multicast(dst):
            text = ip6_to_str(dst)
            if self.config.host_endpoint(text, 0) is not None or text == self.config.gateway_ip6:
                host_ip = self.config.translate(text)
        if len(self._dest_memo) >= DEST_MEMO_MAX:
            self._dest_memo.clear()
        self._dest_memo[dst] = host_ip
        return host_ip

    def guest_icmp6(self, src: bytes, dst: bytes, hdr, data: memoryview,
                    ip_packet: memoryview) -> None:
        """A validated ICMPv6 message from the guest address src to an outside dst."""
        if hdr.type != ICMPV6_ECHO_REQUEST or hdr.code != 0:
            self._count("icmp6_ignored_type")
            return
        ident, seq = hdr.rest >> 16, hdr.rest & 0xFFFF
        host_ip = self._destination6(dst)
        if host_ip is None:
            self._unreachable6(dst, src, ICMPV6_ADDR_UNREACH, ip_packet)
            return
        if not self.policy.allows("icmp", host_ip, None, guest_dst=ip6_to_str(dst)):
            self._count("icmp_denied")
            self._unreachable6(dst, src, ICMPV6_ADM_PROHIBITED, ip_packet)
            return
        # Each of the guest's addresses echoes on a flow of its own, whose replies go
        # back to it (as UDP's flows).
        key = (dst, ident, src)
        flow = self.flows.get(key)
        if flow is None:
            flow = self._open6(key, dst, ip6_to_bytes(host_ip), ident, src, ip_packet)
            if flow is None:
                return
        flow.last_active = self.loop.time()
        flow.quote = icmpv6_error_quote(ip_packet)
        # Both kinds of socket compute the ICMPv6 checksum themselves (RFC 3542 §3.1 for
        # raw ones); a ping socket also puts in its own identifier.
        msg = _ECHO6.pack(ICMPV6_ECHO_REQUEST, 0, 0, flow.host_id, seq) + bytes(data)
        try:
            if flow.sock is not None:
                flow.sock.send(msg)
            else:
                self.raw6.sendto(msg, (ip6_to_str(flow.host_dst), 0))
        except BlockingIOError:
            self._count("icmp_tx_dropped")
            return
        except OSError:
            self._count("icmp_tx_error")
            return
        self._count("icmp6_echo_tx")

    def _probe6(self) -> None:
        self.mode6, self.raw6 = self._probe_family(_V6, self._raw_event6)

    def _open6(self, key, guest_dst: bytes, host_dst: bytes, ident: int, guest_src: bytes,
               packet: memoryview) -> _Flow | None:
        if self.mode6 is None:
            self._probe6()
        return self._open_flow(
            _V6, self.mode6, _Flow(key, guest_dst, host_dst, ident, guest_src),
            lambda: self._unreachable6(guest_dst, guest_src, ICMPV6_ADDR_UNREACH, packet))

    def _reply_to_guest6(self, flow: _Flow, seq: int, data: bytes | memoryview) -> None:
        flow.last_active = self.loop.time()
        self._count("icmp6_echo_rx")
        src = flow.guest_dst
        self.send_ip6(src, flow.guest_src, build_icmpv6(src, flow.guest_src, ICMPV6_ECHO_REPLY, 0,
                                                        (flow.guest_id << 16) | seq, data))

    def _reflect_error6(self, flow: _Flow, etype: int, code: int, info: int,
                        offender: bytes | None) -> None:
        if not flow.quote:
            return
        src = flow.guest_dst if offender in (None, flow.host_dst) else offender
        rest = info if etype == ICMPV6_PACKET_TOO_BIG else 0
        self._count("icmp6_error_reflected")
        self.send_ip6(src, flow.guest_src, build_icmpv6(src, flow.guest_src, etype, code, rest,
                                                        flow.quote))

    def _raw_event6(self, events: int) -> None:
        # An ICMPv6 raw socket delivers the message without the IPv6 header (RFC 3542 §3),
        # its checksum already verified by the kernel; the peer is the address.
        for _ in range(ICMP_BATCH):
            try:
                msg, addr = self.raw6.recvfrom(ICMP_MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                continue
            if len(msg) < ICMPV6_HLEN:
                continue
            peer = ip6_to_bytes(addr[0].partition("%")[0])
            typ, code, _c, hi, lo = _ECHO6.unpack_from(msg)
            if typ == ICMPV6_ECHO_REPLY:
                flow = self.raw_ids.get(hi)
                if flow is not None and flow.guest_src and flow.host_dst == peer:
                    self._reply_to_guest6(flow, lo, memoryview(msg)[ICMPV6_HLEN:])
            elif typ in (ICMPV6_DEST_UNREACH, ICMPV6_PACKET_TOO_BIG, ICMPV6_TIME_EXCEEDED):
                # The quote is our echo request: IPv6 header, then the ICMPv6 echo header.
                inner = ICMPV6_HLEN
                if len(msg) < inner + IPV6_HLEN + ICMPV6_HLEN or msg[inner + 6] != IPPROTO_ICMPV6:
                    continue
                inner_dst = bytes(msg[inner + 24:inner + 40])
                inner_id = struct.unpack_from("!H", msg, inner + IPV6_HLEN + 4)[0]
                flow = self.raw_ids.get(inner_id)
                if flow is not None and flow.guest_src and flow.host_dst == inner_dst:
                    info = (hi << 16) | lo
                    self._reflect_error6(flow, typ, code, info, peer)

    def drop_flows(self) -> None:
        for flow in list(self.flows.values()):
            self._close_flow(flow)

    def close(self) -> None:
        self.drop_flows()
        if self.raw is not None:
            self.loop.unwatch(self.raw.fileno())
            self.raw.close()
            self.raw = None
        if self.raw6 is not None:
            self.loop.unwatch(self.raw6.fileno())
            self.raw6.close()
            self.raw6 = None
