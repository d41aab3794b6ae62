"""Helpers for NAT tests: guest-side frame builders and an engine harness.

The harness drives the real Engine and EventLoop (loopback sockets only, no root): frames
the engine sends to the guest are collected in .out, parsed on demand.
"""

from __future__ import annotations

import errno

from voidbox.eventloop import EventLoop
from voidbox.net.config import GATEWAY_MAC, GUEST_MAC, NatConfig, parse_mac
from voidbox.net.engine import Engine
from voidbox.net.ipv6 import (
    ICMPV6_ECHO_REQUEST,
    IPPROTO_ICMPV6,
    build_icmpv6,
    build_ipv6,
    build_udp6,
    ip6_to_bytes,
    parse_icmpv6,
    parse_ipv6,
)
from voidbox.net.packets import (
    ETH_P_IP,
    ETH_P_IPV6,
    IPPROTO_ICMP,
    IPPROTO_UDP,
    build_ethernet,
    build_icmp,
    build_ipv4,
    build_udp,
    ip_to_bytes,
    parse_ethernet,
    parse_icmp,
    parse_ipv4,
    parse_udp,
)
from voidbox.net.policy import Policy

GUEST = ip_to_bytes("10.0.2.15")
GATEWAY = ip_to_bytes("10.0.2.2")
DNS = ip_to_bytes("10.0.2.3")
GUEST_HW = parse_mac(GUEST_MAC)
GATEWAY_HW = parse_mac(GATEWAY_MAC)
# Bound on loop iterations while waiting for an event: a failure bound, not a timing.
MAX_PUMP = 400
PUMP_SLICE = 0.05


def frame_of(ip_packet: bytes) -> bytes:
    """An IPv4 packet framed as the guest sends it to the gateway."""
    return build_ethernet(GATEWAY_HW, GUEST_HW, ETH_P_IP, ip_packet)


def guest_ip_frame(dst: bytes, proto: int, payload: bytes, src: bytes = GUEST, **kw) -> bytes:
    return build_ethernet(GATEWAY_HW, GUEST_HW, ETH_P_IP, build_ipv4(src, dst, proto, payload, **kw))


def guest_udp_frame(dst: bytes, sport: int, dport: int, data: bytes, src: bytes = GUEST) -> bytes:
    return guest_ip_frame(dst, IPPROTO_UDP, build_udp(src, dst, sport, dport, data), src=src)


def guest_echo_frame(dst: bytes, ident: int, seq: int, data: bytes = b"ping") -> bytes:
    return guest_ip_frame(dst, IPPROTO_ICMP, build_icmp(8, 0, (ident << 16) | seq, data))


class RefusingLoop:
    """An event loop whose watch() fails as the kernel's epoll_ctl does when the user's
    max_user_watches is spent; everything else is the wrapped loop's."""

    def __init__(self, loop):
        self._loop = loop
        self.refused = 0

    def __getattr__(self, name):
        return getattr(self._loop, name)

    def watch(self, fd, events, callback, defer=False):
        self.refused += 1
        raise OSError(errno.ENOSPC, "No space left on device")


class Harness:
    def __init__(self, config: NatConfig | None = None, policy: Policy | None = None):
        self.config = config or NatConfig()
        self.loop = EventLoop(debug=True)
        self.out: list[bytes] = []
        # Unit tests talk to servers on the host's loopback through 10.0.2.2: open it
        # (the NAT's own default is closed; tests of the default pass a Policy()).
        if policy is None:
            policy = Policy(host_loopback=True)
        self.engine = Engine(self.config, self.loop, self.out.append, policy)

    def send(self, frame: bytes) -> None:
        self.engine.guest_frame(frame)

    def pump(self, until) -> None:
        """Run the loop until until() is true (bounded)."""
        for _ in range(MAX_PUMP):
            if until():
                return
            self.loop.run_once(PUMP_SLICE)
        raise AssertionError("condition not reached")

    def ip_packets(self):
        """(IPv4 header, payload) of every frame sent to the guest, consumed."""
        frames, self.out[:] = list(self.out), []
        result = []
        for frame in frames:
            eth, payload = parse_ethernet(frame)
            assert eth.ethertype == ETH_P_IP
            assert eth.src == GATEWAY_HW
            result.append(parse_ipv4(payload))
        return result

    def udp_replies(self):
        out = []
        for ip, payload in self.ip_packets():
            assert ip.proto == IPPROTO_UDP
            hdr, data = parse_udp(ip.src, ip.dst, payload)
            out.append((ip, hdr, bytes(data)))
        return out

    def icmp_replies(self):
        out = []
        for ip, payload in self.ip_packets():
            assert ip.proto == IPPROTO_ICMP
            hdr, data = parse_icmp(payload)
            out.append((ip, hdr, bytes(data)))
        return out

    def close(self) -> None:
        self.engine.close()
        assert self.engine.flow_count() == 0
        assert self.loop.watched_count() == 0
        self.loop.close()


class PortHarness(Harness):
    """Harness wired as `voidbox net run` wires the NAT without --pcap: the engine's frames
    go through a TapIO (write backlog, EPOLLOUT flush) on one end of a datagram socketpair
    standing in for the TAP, and the UDP NAT relays replies through its FramePort itself
    (Engine.attach_datagram_port). impl picks the FramePort twin. `out` gets what the
    other end reads; sndbuf, if given, shrinks our end's send buffer."""

    def __init__(self, config: NatConfig | None = None, policy: Policy | None = None,
                 impl=None, sndbuf: int | None = None):
        import socket

        from voidbox.net import fastpath
        from voidbox.net.tap import TapIO

        super().__init__(config, policy)
        self.ours, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.ours.setblocking(False)
        self.peer.setblocking(False)
        if sndbuf is not None:
            self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.tap = TapIO(self.loop, self.ours.fileno(), self.config.mtu, self.engine.guest_frame)
        self.tap.port = (impl or fastpath).FramePort(self.ours.fileno(), 0,
                                                     self.config.mtu + 14, 8)
        self.port = self.tap.port
        self.engine.send_frame = self.tap.write
        self.engine.attach_datagram_port(self.port)

    def _collect(self) -> None:
        while True:
            try:
                self.out.append(self.peer.recv(1 << 17))
            except BlockingIOError:
                return

    def pump(self, until) -> None:
        for _ in range(MAX_PUMP):
            self._collect()
            if until():
                return
            self.loop.run_once(PUMP_SLICE)
        raise AssertionError("condition not reached")

    def close(self) -> None:
        self.tap.close()
        super().close()
        self.ours.close()
        self.peer.close()


# ---------------------------------------------------------------- IPv6 (RFC 8200)

GUEST6 = ip6_to_bytes("fd00::100")
GUEST_LL6 = ip6_to_bytes("fe80::5054:ff:fe12:3456")
GATEWAY6 = ip6_to_bytes("fd00::2")
DNS6 = ip6_to_bytes("fd00::3")
ROUTER_LL6 = ip6_to_bytes("fe80::2")


def guest_ip6_frame(dst: bytes, proto: int, payload: bytes, src: bytes = GUEST6,
                    hop_limit: int = 64, dst_mac: bytes = GATEWAY_HW) -> bytes:
    return build_ethernet(dst_mac, GUEST_HW, ETH_P_IPV6,
                          build_ipv6(src, dst, proto, payload, hop_limit=hop_limit))


def guest_icmp6_frame(dst: bytes, typ: int, code: int, rest: int, body: bytes,
                      src: bytes = GUEST6, hop_limit: int = 64,
                      dst_mac: bytes = GATEWAY_HW) -> bytes:
    return guest_ip6_frame(dst, IPPROTO_ICMPV6, build_icmpv6(src, dst, typ, code, rest, body),
                           src=src, hop_limit=hop_limit, dst_mac=dst_mac)


def guest_echo6_frame(dst: bytes, ident: int, seq: int, data: bytes = b"ping",
                      src: bytes = GUEST6) -> bytes:
    return guest_icmp6_frame(dst, ICMPV6_ECHO_REQUEST, 0, (ident << 16) | seq, data, src=src)


def guest_udp6_frame(dst: bytes, sport: int, dport: int, data: bytes, src: bytes = GUEST6) -> bytes:
    return guest_ip6_frame(dst, IPPROTO_UDP, build_udp6(src, dst, sport, dport, data), src=src)


def ip6_packets(frames: list[bytes]):
    """(Ethernet header, IPv6 header, payload) of each frame, all of which must be IPv6."""
    out = []
    for frame in frames:
        eth, payload = parse_ethernet(frame)
        assert eth.ethertype == ETH_P_IPV6
        assert eth.src == GATEWAY_HW
        ip, data = parse_ipv6(payload)
        out.append((eth, ip, data))
    return out


def icmp6_messages(frames: list[bytes]):
    """(Ethernet header, IPv6 header, ICMPv6 header, body) of each frame."""
    out = []
    for eth, ip, data in ip6_packets(frames):
        assert ip.proto == IPPROTO_ICMPV6
        hdr, body = parse_icmpv6(ip.src, ip.dst, data)
        out.append((eth, ip, hdr, bytes(body)))
    return out
