"""The user-mode NAT engine: guest Ethernet frames in, guest Ethernet frames out.

The engine is the guest-side switchboard: it validates each frame's Ethernet and IPv4
headers, answers ARP and DHCP itself, and hands ICMP, UDP, DNS and TCP to their relays.
Everything the relays produce for the guest goes back through send_ip, which wraps the
IPv4 packet in Ethernet to the guest's learned MAC. Backends (TAP, virtio-net) see only
frames: Engine(config, loop, send_frame).guest_frame(frame).

Decisions a reader should know:
- IPv4 fragments from the guest are reassembled (bounded, overlaps discard the
  datagram; see packets.Reassembler): a UDP datagram larger than the MTU is legitimate.
- Frames whose IPv4 source is not the guest's address are dropped (anti-spoofing),
  except DHCP from 0.0.0.0.
- If voidbox.net.tcp_nat is missing, TCP segments are dropped and counted.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from voidbox.errors import VoidboxError
from voidbox.eventloop import EventLoop
from voidbox.net import limits
from voidbox.net.arp import ArpResponder
from voidbox.net.config import NatConfig, parse_mac
from voidbox.net.dhcp import DHCP_CLIENT_PORT, DHCP_SERVER_PORT, DhcpServer
from voidbox.net.dns import DnsRelay
from voidbox.net.icmp import IcmpNat
from voidbox.net.packets import (
    ETH_BROADCAST,
    ETH_HLEN,
    ETH_P_ARP,
    ETH_P_IP,
    ICMP_PORT_UNREACH,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    PacketError,
    Reassembler,
    build_ethernet,
    build_ipv4,
    build_udp,
    ip_to_bytes,
    parse_arp,
    parse_ethernet,
    parse_ipv4,
    parse_udp,
)
from voidbox.net.policy import Policy
from voidbox.net.udp import UdpNat

from .._lazylog import get_logger

log = get_logger(__name__)

DNS_PORT = 53
INADDR_ANY = b"\x00" * 4
# Ethernet multicast: the group bit is the low bit of the first octet (IEEE 802.3 §3.2.3).
ETH_GROUP_BIT = 0x01
_ETH_HDR = struct.Struct("!6s6sH")  # IEEE 802.3 §3.1.1: destination, source, EtherType


class Engine:
    def __init__(self, config: NatConfig, loop: EventLoop, send_frame: Callable[[bytes], None],
                 policy: Policy | None = None, borrow: bool = False):
        """borrow=True promises that send_frame is done with its argument when it returns
        (it writes or copies it): relays may then hand it a view of a reused buffer."""
        self.config = config
        # Every flow holds a host fd, whoever runs the NAT (net run, a VM's card, net
        # serve): raise the fd limit and cap the flows by it, so new flows are refused
        # before socket(2) could fail with EMFILE.
        limits.cap_flows(config, NatConfig.max_flows)
        self.loop = loop
        self.send_frame = send_frame
        self.borrow = borrow
        self.policy = policy if policy is not None else Policy()
        self.counters: dict[str, int] = {}
        self.gateway_mac = parse_mac(config.gateway_mac)
        self.guest_mac = parse_mac(config.guest_mac)
        self.guest_ip = ip_to_bytes(config.guest_ip)
        self.gateway_ip = ip_to_bytes(config.gateway_ip)
        self.dns_ip = ip_to_bytes(config.dns_ip)
        self.arp = ArpResponder(config)
        self.dhcp = DhcpServer(config)
        self.dns = DnsRelay(loop, config, self._dns_reply, self.counters)
        self.udp = UdpNat(loop, config, self.policy, self.send_ip, self.counters)
        self.icmp = IcmpNat(loop, config, self.policy, self.send_ip, self.counters)
        self.reassembler = Reassembler()
        self.closed = False
        self.tcp = self._make_tcp()
        for fwd in config.forwards:
            self.add_forward(fwd.proto, fwd.host_addr, fwd.host_port, fwd.guest_port)

    def _make_tcp(self):
        try:
            from voidbox.net.tcp_nat import TcpNat
        except ImportError as e:
            if e.name != "voidbox.net.tcp_nat":
                raise
            log.debug("no TCP NAT (voidbox.net.tcp_nat missing): TCP is dropped")
            return None
        return TcpNat(self.loop, self.send_ip, self.policy, self.config,
                      send_ip_buf=self.send_ip_buf)

    def prepare_sandbox(self) -> None:
        """Do now what the relays would do at first use and a sandboxed NAT
        (voidbox.sandbox) can no longer do: read resolv.conf for the DNS upstreams, and
        open the ICMP echo path (a raw socket needs CAP_NET_RAW)."""
        self.config.upstreams()
        self.icmp.prepare()

    def add_forward(self, proto: str, host_addr: str, host_port: int, guest_port: int) -> None:
        if proto == "udp":
            self.udp.add_forward(host_addr, host_port, guest_port)
        elif self.tcp is None:
            raise VoidboxError("TCP port forwards need the TCP NAT, which is not available")
        else:
            self.tcp.add_forward(host_addr, host_port, guest_port)

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def flow_count(self) -> int:
        n = self.udp.flow_count() + self.icmp.flow_count() + len(self.dns.pending)
        if self.tcp is not None:
            n += self.tcp.flow_count()
        return n

    def active_tcp_flows(self) -> int:
        return self.tcp.active_flow_count() if self.tcp is not None else 0

    # ------------------------------------------------------------ to the guest

    def send_ip(self, packet: bytes) -> None:
        """Send an IPv4 packet to the guest, framed to its learned MAC."""
        self._count("frames_to_guest")
        self.send_frame(build_ethernet(self.guest_mac, self.gateway_mac, ETH_P_IP, packet))

    def send_ip_buf(self, buf: bytearray, n: int) -> None:
        """Send the IPv4 packet buf[ETH_HLEN:ETH_HLEN + n] to the guest; the Ethernet header
        is written into buf[:ETH_HLEN], so the frame is never copied to be framed."""
        self._count("frames_to_guest")
        buf[:ETH_HLEN] = self._guest_eth_header()
        frame = memoryview(buf)[:ETH_HLEN + n]
        self.send_frame(frame if self.borrow else bytes(frame))

    def _dns_reply(self, guest_port: int, payload: bytes) -> None:
        udp = build_udp(self.dns_ip, self.guest_ip, DNS_PORT, guest_port, payload)
        self.send_ip(build_ipv4(self.dns_ip, self.guest_ip, IPPROTO_UDP, udp))

    # ------------------------------------------------------------ from the guest

    def attach_stream_port(self, port, blocked: Callable[[], None]) -> None:
        """Let the TCP NAT write host data straight to port (a FramePort on the same fd as
        send_frame); blocked() must arrange for tcp.port_writable() once it drains."""
        if self.tcp is not None:
            self.tcp.set_stream_port(port, self._guest_eth_header, blocked)

    def _guest_eth_header(self) -> bytes:
        return _ETH_HDR.pack(self.guest_mac, self.gateway_mac, ETH_P_IP)

    def guest_frame(self, frame: bytes | memoryview, csum_verified: bool = False) -> None:
        """One Ethernet frame from the guest. Malformed frames are counted and dropped.

        csum_verified: the frontend says the TCP/UDP checksum is valid or was offloaded
        (virtio_net_hdr NEEDS_CSUM or DATA_VALID), so it is not checked here.
        """
        self._count("frames_from_guest")
        try:
            eth, payload = parse_ethernet(frame)
            if eth.dst != self.gateway_mac and not eth.dst[0] & ETH_GROUP_BIT:
                self._count("eth_not_for_us")
                return
            if eth.ethertype == ETH_P_ARP:
                self._arp(payload)
            elif eth.ethertype == ETH_P_IP:
                self._ipv4(eth.src, payload, csum_verified)
            else:
                self._count("eth_unsupported_type")
        except PacketError as e:
            self._count(str(e))

    def _arp(self, payload: memoryview) -> None:
        reply, learned = self.arp.handle(parse_arp(payload))
        self._count("arp_in")
        if learned is not None and learned != self.guest_mac:
            self.guest_mac = learned
        if reply is not None:
            self._count("arp_replies")
            self.send_frame(reply)

    def _ipv4(self, eth_src: bytes, packet: memoryview, csum_verified: bool) -> None:
        ip, payload = parse_ipv4(packet)
        if ip.is_fragment:
            self._count("ip_fragments_in")
            whole = self.reassembler.push(ip, payload, self.loop.time())
            self.counters["ip_reassembly_dropped"] = self.reassembler.dropped
            if whole is None:
                return
            self._count("ip_reassembled")
            csum_verified = False  # the whole datagram's checksum was never vouched for
            packet = memoryview(build_ipv4(ip.src, ip.dst, ip.proto, whole, ident=ip.ident,
                                           ttl=ip.ttl, tos=ip.tos, df=False))
            ip, payload = parse_ipv4(packet)
        if ip.src != self.guest_ip:
            if ip.proto == IPPROTO_UDP and ip.src == INADDR_ANY:
                self._dhcp(eth_src, ip, payload)
                return
            self._count("ip_spoofed_source")
            return
        self.guest_mac = eth_src
        packet = packet[: ip.total_length]
        if ip.proto == IPPROTO_TCP:
            if self.tcp is None:
                self._count("tcp_dropped_no_stack")
                return
            self._count("tcp_in")
            self.tcp.guest_segment(ip.src, ip.dst, payload, csum_verified)
        elif ip.proto == IPPROTO_UDP:
            hdr, data = parse_udp(ip.src, ip.dst, payload, verify=not csum_verified)
            self._count("udp_in")
            if hdr.dport == DHCP_SERVER_PORT and hdr.sport == DHCP_CLIENT_PORT:
                self._dhcp(eth_src, ip, payload)
            elif ip.dst == self.dns_ip:
                if hdr.dport == DNS_PORT:
                    self.dns.guest_query(hdr.sport, data)
                else:
                    # The DNS address serves DNS only (not a relay to the upstream).
                    self._count("udp_dns_address_other_port")
                    self.udp.unreachable(ip.dst, ICMP_PORT_UNREACH, packet)
            else:
                self.udp.guest_datagram(ip.dst, hdr.sport, hdr.dport, data, packet)
        elif ip.proto == IPPROTO_ICMP:
            self._count("icmp_in")
            self.icmp.guest_icmp(ip.src, ip.dst, payload, packet)
        else:
            self._count("ip_unsupported_proto")

    def _dhcp(self, eth_src: bytes, ip, segment: memoryview) -> None:
        hdr, data = parse_udp(ip.src, ip.dst, segment)
        if hdr.dport != DHCP_SERVER_PORT:
            self._count("ip_spoofed_source")
            return
        self._count("dhcp_in")
        reply = self.dhcp.handle(data)
        if reply is None:
            return
        udp = build_udp(self.gateway_ip, reply.dst_ip, DHCP_SERVER_PORT, DHCP_CLIENT_PORT, reply.payload)
        pkt = build_ipv4(self.gateway_ip, reply.dst_ip, IPPROTO_UDP, udp)
        dst_mac = reply.dst_mac if reply.dst_mac == ETH_BROADCAST else eth_src
        # The client the lease is for is the guest: frames the NAT starts (a port forward's
        # SYN) go to its MAC even before it sent an IPv4 packet of its own.
        self.guest_mac = bytes(eth_src)
        self._count("dhcp_replies")
        self.send_frame(build_ethernet(dst_mac, self.gateway_mac, ETH_P_IP, pkt))

    def drop_flows(self) -> None:
        """The guest behind this engine is gone (a vhost-user frontend disconnected): close
        every flow, resetting TCP towards the host, but keep the port-forward listeners
        for the next guest."""
        if self.tcp is not None:
            self.tcp.drop_flows()
        self.udp.drop_flows()
        self.icmp.drop_flows()
        self.dns.drop_pending()
        self.reassembler = Reassembler()

    def close(self) -> None:
        """Close every flow (TCP is reset both ways) and listener; safe to call again."""
        if self.closed:
            return
        self.closed = True
        if self.tcp is not None:
            self.tcp.close()
        self.udp.close()
        self.icmp.close()
        self.dns.close()
