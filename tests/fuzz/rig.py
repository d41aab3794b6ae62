"""The fuzzer's harness: the test's own loopback endpoints, a policy that lets the NAT
reach only them, and one engine generation (real EventLoop, real Engine, real sockets).

Bounds the fuzzer asserts (all stated here):
- flows: at most FLOW_BOUND = 3 * MAX_FLOWS + MAX_PENDING_QUERIES (TCP, UDP and ICMP
  flows are each capped at NatConfig.max_flows; DNS queries in flight at the relay's cap);
- fds: at most the generation's starting count + FLOW_BOUND + FD_SLACK (the UDP spare
  sockets, the raw ICMP socket, the loop's epoll and eventfd, the test's own accepted
  connections, capped at MAX_HELD_CONNS);
- after engine.close() and loop.close(): no flow, no watched fd, and exactly the fds the
  generation started with;
- every frame the engine sends to the guest is well formed (IPv4 header checksum and
  lengths, TCP/UDP/ICMP checksums) and fits the MTU (ICMP echo replies excepted, a known
  finding: they are never fragmented; test_echo_replies_fit_the_mtu).
"""

from __future__ import annotations

import random
import socket
import struct

from tests.fuzz.frames import PORT_TCP, PORT_UDP, rewrite, tcp_frame
from voidbox.eventloop import EventLoop
from voidbox.net.config import NatConfig
from voidbox.net.dns import MAX_PENDING_QUERIES
from voidbox.net.engine import Engine
from voidbox.net.fastpath import tcp_checksum
from voidbox.net.packets import (
    ETH_P_ARP,
    ETH_P_IP,
    IP_MF,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    parse_arp,
    parse_ethernet,
    parse_icmp,
    parse_ipv4,
    parse_udp,
)
from voidbox.net.policy import Policy
from voidbox.net.tcp import ACK, FIN, RST, SYN

MAX_FLOWS = 64
FLOW_BOUND = 3 * MAX_FLOWS + MAX_PENDING_QUERIES
MAX_HELD_CONNS = 64
FD_SLACK = MAX_HELD_CONNS + 32
LOOPBACK = "127.0.0.1"


def _bound_pair() -> tuple[socket.socket, socket.socket, int]:
    """A TCP listener and a UDP socket on the same 127.0.0.1 port, so that the port is the
    test's for both protocols."""
    for _ in range(50):
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        tcp.bind((LOOPBACK, 0))
        port = tcp.getsockname()[1]
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        try:
            udp.bind((LOOPBACK, port))
        except OSError:
            tcp.close()
            udp.close()
            continue
        tcp.listen(128)
        return tcp, udp, port
    raise RuntimeError("no loopback port free for both TCP and UDP")


class Endpoints:
    """What the NAT may reach: a TCP service and a UDP echo on one port, a DNS upstream
    (UDP, with a TCP listener on the same port for DNS over TCP) on another. Serviced
    without threads, between batches, with their own random stream."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.tcp, self.udp, self.service_port = _bound_pair()
        self.dns_tcp, self.dns, self.dns_port = _bound_pair()
        self.conns: list[socket.socket] = []

    @property
    def ports(self) -> frozenset[int]:
        return frozenset((self.service_port, self.dns_port))

    @property
    def placeholders(self) -> dict[int, int]:
        return {PORT_TCP: self.service_port, PORT_UDP: self.service_port}

    def fds(self) -> set[int]:
        return {s.fileno() for s in (self.tcp, self.udp, self.dns_tcp, self.dns, *self.conns)}

    def service(self) -> None:
        rng = self.rng
        for listener, keep in ((self.tcp, True), (self.dns_tcp, False)):
            for _ in range(32):
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    break
                if not keep:
                    conn.close()
                    continue
                conn.setblocking(False)
                self.conns.append(conn)
        while len(self.conns) > MAX_HELD_CONNS:
            self.conns.pop(0).close()
        for conn in list(self.conns):
            try:
                data = conn.recv(65536)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            roll = rng.random()
            try:
                if data == b"" or roll < 0.03:
                    self._drop(conn)
                elif roll < 0.05:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self._drop(conn)  # a RST towards the NAT
                elif roll < 0.08:
                    conn.shutdown(socket.SHUT_WR)
                elif data and roll < 0.6:
                    conn.send(data)
                elif roll < 0.7:
                    conn.send(b"h" * rng.choice((1, 100, 1460, 4096, 65536)))
            except OSError:
                pass
        for sock, dns in ((self.udp, False), (self.dns, True)):
            for _ in range(64):
                try:
                    data, peer = sock.recvfrom(65536)
                except BlockingIOError:
                    break
                roll = rng.random()
                if roll < 0.2:
                    continue
                if dns and len(data) >= 12:
                    flags = struct.unpack_from("!H", data, 2)[0] | 0x8000
                    reply = data[:2] + struct.pack("!H", flags) + data[4:]
                    if roll < 0.3:
                        reply += b"\xc0\x0c" * rng.randrange(1, 1200)  # larger than a frame
                    elif roll < 0.35:
                        reply = rng.randbytes(rng.randrange(40))
                else:
                    reply = data if roll < 0.8 else rng.randbytes(rng.choice((0, 1, 1472, 9000)))
                try:
                    sock.sendto(reply, peer)
                except OSError:
                    pass

    def _drop(self, conn: socket.socket) -> None:
        self.conns.remove(conn)
        conn.close()

    def close_conns(self) -> None:
        for conn in self.conns:
            conn.close()
        self.conns.clear()

    def close(self) -> None:
        self.close_conns()
        for s in (self.tcp, self.udp, self.dns_tcp, self.dns):
            s.close()


def _complement(ports) -> str:
    """'1-P1-1,P1+1-P2-1,...' : every port but these, as a policy port list."""
    ranges, lo = [], 1
    for p in sorted(ports):
        if p > lo:
            ranges.append(f"{lo}-{p - 1}")
        lo = p + 1
    if lo <= 65535:
        ranges.append(f"{lo}-65535")
    return ",".join(ranges)


def fuzz_policy(ports) -> Policy:
    """127.0.0.1 on the test's own ports (and ICMP echo to 127.0.0.1), nothing else.

    Narrower than "allow 127.0.0.0/8, deny 0.0.0.0/0": other people's services listen on
    this machine's loopback too, and a fuzzer must not feed them. The port-less /32 allow
    is what lets ICMP (no port) through; the /32 deny naming every other port beats it for
    TCP and UDP (a rule naming ports is more specific).
    """
    return Policy(allow=[f"{LOOPBACK}/32"], deny=["0.0.0.0/0", f"{LOOPBACK}/32:{_complement(ports)}"])


def fuzz_config(endpoints: Endpoints) -> NatConfig:
    return NatConfig(dns_upstreams=[(LOOPBACK, endpoints.dns_port)], max_flows=MAX_FLOWS,
                     udp_idle_timeout=2.0, icmp_idle_timeout=1.0, dns_timeout=1.0)


class BadOutput(AssertionError):
    """The engine sent the guest a malformed frame."""


def check_output(frame, mtu: int = 1500) -> tuple | None:
    """Assert a frame to the guest is well formed; return (guest port, remote ip, remote
    port, next seq, ack or None) for a TCP segment: the ACK number the guest's next segment
    should carry, and the sequence number the NAT expects from it."""
    try:
        eth, payload = parse_ethernet(frame)
        if eth.ethertype == ETH_P_ARP:
            parse_arp(payload)
            return None
        if eth.ethertype != ETH_P_IP:
            raise BadOutput(f"ethertype {eth.ethertype:#x}")
        ip, l4 = parse_ipv4(payload)
        if ip.total_length != len(payload):
            raise BadOutput("IPv4 total length is not the frame's")
        if len(payload) > mtu:
            # Once found here: echo replies to pings larger than the MTU went unfragmented.
            raise BadOutput(f"a {len(frame)}-byte frame, larger than the MTU ({mtu}) allows")
        if ip.flags_frag & (IP_MF | 0x1FFF):
            return None
        if ip.proto == IPPROTO_TCP:
            if tcp_checksum(ip.src, ip.dst, l4) != 0:
                raise BadOutput("TCP checksum")
            sport, dport, seq, ack = struct.unpack_from("!HHII", l4)
            flags = l4[13]
            data = len(l4) - (l4[12] >> 4) * 4
            nxt = seq + data + bool(flags & SYN) + bool(flags & FIN)
            return dport, bytes(ip.src), sport, nxt & 0xFFFFFFFF, ack if flags & ACK else None
        if ip.proto == IPPROTO_UDP:
            parse_udp(ip.src, ip.dst, l4)
        elif ip.proto == IPPROTO_ICMP:
            parse_icmp(l4)
        else:
            raise BadOutput(f"IP protocol {ip.proto}")
    except BadOutput:
        raise
    except Exception as e:
        raise BadOutput(f"frame to the guest does not parse ({e!r}): {bytes(frame).hex()}") from e
    return None


class Rig:
    """One engine generation."""

    def __init__(self, endpoints: Endpoints, policy: Policy, config: NatConfig | None = None,
                 borrow: bool = False):
        """borrow: the engine may hand send_frame views of reused buffers (as TapIO
        allows); they are copied at once, as the promise requires."""
        self.endpoints = endpoints
        self.out: list = []
        self.loop = EventLoop(debug=True)
        send = (lambda f: self.out.append(bytes(f))) if borrow else self.out.append
        self.engine = Engine(config or fuzz_config(endpoints), self.loop, send, policy,
                             borrow=borrow)
        self.acks: dict[tuple, int] = {}
        self.frames_out = 0
        self.mtu = self.engine.config.mtu

    def ack_for(self, key):
        seen = self.acks.get(key)
        return seen[0] if seen is not None else None

    def resets(self, n: int) -> list[bytes]:
        """RSTs, as the guest would send them, for up to n TCP flows the NAT has answered
        (sequence number: the NAT's last ACK). TCP flows do not time out (issue 8 defect
        9), so without these the flow limit soon refuses every SYN."""
        out = []
        for key in list(self.acks)[:n]:
            (gport, remote, rport), (_nxt, ack) = key, self.acks.pop(key)
            if ack is not None:
                out.append(tcp_frame(rport, ack, 0, RST, dst=remote, sport=gport))
        return out

    def fit(self, frame: bytes, verified: bool, sport: int | None = None) -> bytes:
        return rewrite(frame, verified, ports=self.endpoints.placeholders, sport=sport,
                       ack_for=self.ack_for)

    def send(self, frame: bytes, verified: bool = False) -> list:
        self.engine.guest_frame(frame, verified)
        return self.drain()

    def drain(self) -> list:
        frames, self.out[:] = list(self.out), []
        self.frames_out += len(frames)
        for f in frames:
            tcp = check_output(f, self.mtu)
            if tcp is not None:
                old = self.acks.get(tcp[:3])
                self.acks[tcp[:3]] = (tcp[3], tcp[4] if tcp[4] is not None or old is None else old[1])
        if len(self.acks) > 4096:
            self.acks.clear()
        return frames

    def turn(self) -> list:
        """One loop turn, the endpoints' answers, then what the engine sent the guest."""
        self.loop.run_once(0)
        self.endpoints.service()
        return self.drain()

    def close(self) -> None:
        self.engine.close()
        self.drain()
        flows, watched = self.engine.flow_count(), self.loop.watched_count()
        self.loop.close()
        assert flows == 0, f"{flows} flows left after engine.close()"
        assert watched == 0, f"{watched} fds still watched after engine.close()"
