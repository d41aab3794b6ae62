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
- IPv6 (config.ipv6; voidbox.net.ipv6 parses, voidbox.net.ndp answers Neighbour and
  Router Discovery, voidbox.net.dhcpv6 stateless DHCPv6): the guest configures itself by
  SLAAC, so its address is any of the /64 but the NAT's own (fd00::2, fd00::3) and the
  subnet-router anycast fd00:: (RFC 4291 §2.6.1). A link-local source is the guest's
  too, for the NAT's own addresses only (they are on the link: flows to fd00::2 and
  fd00::3 are relayed for it; anything beyond gets ICMPv6 "beyond scope"); the
  unspecified source only for NDP. Multicast the NAT has no part in (MLD reports, mDNS)
  is counted and dropped.
- If voidbox.net.tcp_nat is missing, TCP segments are dropped and counted.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from voidbox.errors import VoidboxError
from voidbox.eventloop import EventLoop
from voidbox.net import fastpath, limits
from voidbox.net.arp import ArpResponder
from voidbox.net.config import NatConfig, parse_mac
from voidbox.net.dhcp import DHCP_CLIENT_PORT, DHCP_SERVER_PORT, DhcpServer
from voidbox.net.dhcpv6 import DHCPV6_CLIENT_PORT, DHCPV6_SERVER_PORT, Dhcp6Server
from voidbox.net.dns import DnsRelay
from voidbox.net.fastpath import guest_ipv4_split, guest_ipv6_split
from voidbox.net.icmp import IcmpNat
from voidbox.net.ipv6 import (
    ALL_DHCP_SERVERS,
    IPPROTO_ICMPV6,
    IPV6_MAX_PAYLOAD,
    UNSPECIFIED,
    build_ipv6_fragments,
    build_udp6,
    fragment_key,
    ip6_to_bytes,
    is_link_local,
    is_multicast,
    parse_icmpv6,
    parse_ipv6,
    parse_udp6,
    rebuild_reassembled,
)
from voidbox.net.ndp import ND_ROUTER_SOLICIT, NDP_TYPES, RA_INTERVAL, NdpResponder
from voidbox.net.packets import (
    ETH_BROADCAST,
    ETH_HLEN,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    ICMP_PORT_UNREACH,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    UDP_HLEN,
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
from voidbox.net.udpfast import guest_udp_split

from .._lazylog import get_logger

log = get_logger(__name__)

DNS_PORT = 53
IPV6_VERSION_NIBBLE = 6  # the version field, the high 4 bits of an IP packet's first byte
INADDR_ANY = b"\x00" * 4
# Ethernet multicast: the group bit is the low bit of the first octet (IEEE 802.3 §3.2.3).
ETH_GROUP_BIT = 0x01
# mallopt(3) for every NAT process. Setting either turns glibc's sliding mmap threshold
# off, so the mmap threshold goes where that would slide to at most (32 MiB on 64-bit):
# a 1.25 MiB virtio-blk read or a 4 MiB peek keeps coming from the heap, not from an
# mmap faulted in page by page each time.
KEEP_FREED_HEAP = 64 << 20  # bytes freed at the heap's top that malloc keeps
HEAP_MMAP_THRESHOLD = 32 << 20  # blocks below this come from the heap
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
        # Guest data batched for one sendmsg per flow and turn (up to TX_BATCH_MAX 64 KiB
        # frames) is freed at the turn's end; keep that memory instead of faulting it back
        # in every turn (guest -> host bulk through a VM's card ran at half speed).
        fastpath.keep_freed_heap(KEEP_FREED_HEAP, HEAP_MMAP_THRESHOLD)
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
        # Replies are built in the relay's buffer and framed in place (send_ip_buf).
        self.udp = UdpNat(loop, config, self.policy, self.send_ip, self.counters,
                          send_ip_buf=self.send_ip_buf)
        self.icmp = IcmpNat(loop, config, self.policy, self.send_ip, self.counters)
        self.reassembler = Reassembler()
        self.closed = False
        self._ra_timer = None
        self._frag6_ident = 0
        self.ndp = self.dhcp6 = None
        if config.ipv6:
            self.ndp = NdpResponder(config, self.counters)
            self.dhcp6 = Dhcp6Server(config, self.counters)
            self.reassembler6 = Reassembler()
            self.gateway_ip6 = ip6_to_bytes(config.gateway_ip6)
            self.dns_ip6 = ip6_to_bytes(config.dns_ip6)
            self.router_ll6 = ip6_to_bytes(config.router_ll6)
            self.subnet_anycast6 = ip6_to_bytes(config.prefix6)
            self.prefix6_64 = self.subnet_anycast6[:8]  # the guest's /64, compared per frame
            self.local6 = self.ndp.own
        self.tcp = self._make_tcp()
        # --max-flows bounds the flows of every relay together (each holds a host fd, and
        # the sandbox's fd limit is sized by it): one protocol must not take them all.
        tables = [self.udp.flows, self.icmp.flows, self.dns.pending]
        if self.tcp is not None:
            tables.append(self.tcp.flows)

        def open_flows() -> int:
            return sum(map(len, tables))

        for relay in (self.udp, self.icmp, self.dns, self.tcp):
            if relay is not None:
                relay.open_flows = open_flows
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
        """Send an IPv4 or IPv6 packet (its version nibble says which) to the guest, framed
        to its learned MAC."""
        self._count("frames_to_guest")
        ethertype = ETH_P_IPV6 if packet[0] >> 4 == IPV6_VERSION_NIBBLE else ETH_P_IP
        self.send_frame(build_ethernet(self.guest_mac, self.gateway_mac, ethertype, packet))

    def send_ip_buf(self, buf: bytearray, n: int) -> None:
        """Send the IPv4 or IPv6 packet buf[ETH_HLEN:ETH_HLEN + n] to the guest; the
        Ethernet header is written into buf[:ETH_HLEN], so the frame is never copied to be
        framed."""
        self._count("frames_to_guest")
        buf[:ETH_HLEN] = self._guest_eth_header(buf[ETH_HLEN] >> 4 == IPV6_VERSION_NIBBLE)
        frame = memoryview(buf)[:ETH_HLEN + n]
        self.send_frame(frame if self.borrow else bytes(frame))

    def send_ip6(self, src: bytes, dst: bytes, proto: int, payload: bytes) -> None:
        """Send an IPv6 packet to the guest, in fragments if it exceeds the MTU (RFC 8200
        §4.5: the NAT is the source of what it builds, so it may fragment)."""
        self._frag6_ident = (self._frag6_ident + 1) & 0xFFFFFFFF
        for pkt in build_ipv6_fragments(src, dst, proto, payload, self.config.mtu,
                                        self._frag6_ident):
            self.send_ip(pkt)

    def _dns_reply(self, guest_port: int, payload: bytes, guest_ip: bytes | None = None) -> None:
        """A DNS answer to the guest; guest_ip is the IPv6 address that asked fd00::3 (None:
        the query came over IPv4)."""
        if guest_ip is not None:
            udp = build_udp6(self.dns_ip6, guest_ip, DNS_PORT, guest_port, payload)
            self.send_ip6(self.dns_ip6, guest_ip, IPPROTO_UDP, udp)
            return
        udp = build_udp(self.dns_ip, self.guest_ip, DNS_PORT, guest_port, payload)
        self.send_ip(build_ipv4(self.dns_ip, self.guest_ip, IPPROTO_UDP, udp))

    def link_up(self) -> None:
        """The guest's link is up (net run: the TAP is open): send an unsolicited router
        advertisement now and every RA_INTERVAL (RFC 4861 §6.2.4), so a guest that
        configured itself keeps its default route and its DNS server.

        A VM's card does not call this (a frame before the driver is up is dropped, and a
        guest that never speaks IPv6 wants no multicast): there the guest's first router
        solicitation, answered at once, starts the periodic advertisements."""
        if self.ndp is None or self.closed:
            return
        self._count("frames_to_guest")
        self.send_frame(self.ndp.periodic_advertisement())
        self._arm_ra()

    def _arm_ra(self) -> None:
        if self._ra_timer is not None:
            self._ra_timer.cancel()
        self._ra_timer = self.loop.call_at(self.loop.time() + RA_INTERVAL, self.link_up)

    # ------------------------------------------------------------ from the guest

    def attach_stream_port(self, port, blocked: Callable[[], None]) -> None:
        """Let the TCP NAT write host data straight to port (a FramePort on the same fd as
        send_frame); blocked() must arrange for tcp.port_writable() once it drains."""
        if self.tcp is not None:
            self.tcp.set_stream_port(port, self._guest_eth_header, blocked)

    def attach_datagram_port(self, port) -> None:
        """Let the UDP NAT relay host datagrams straight to port (a FramePort on the same
        fd as send_frame, uncaptured: FramePort.send_udp4); a port without send_udp4 (a
        VM's RX ring) leaves the relay on send_ip_buf."""
        if hasattr(port, "send_udp4"):
            self.udp.set_frame_port(port, self._guest_eth_header)

    def _guest_eth_header(self, ipv6: bool = False) -> bytes:
        return _ETH_HDR.pack(self.guest_mac, self.gateway_mac, ETH_P_IPV6 if ipv6 else ETH_P_IP)

    def guest_frame(self, frame: bytes | memoryview, csum_verified: bool = False) -> None:
        """One Ethernet frame from the guest. Malformed frames are counted and dropped.

        csum_verified: the frontend says the TCP/UDP checksum is valid or was offloaded
        (virtio_net_hdr NEEDS_CSUM or DATA_VALID), so it is not checked here.
        """
        # Most frames are the guest's TCP segments and UDP datagrams: one compiled check
        # (guest_ipv4_split, guest_ipv6_split) vouches for the Ethernet and IP headers the
        # full path below would parse, and the payload goes straight to the relay. The
        # full path is the specification: it takes everything else (DNS, DHCP, ICMP, NDP,
        # fragments, extension headers, ARP), and counts what is wrong.
        split = guest_ipv4_split(frame, self.gateway_mac, self.guest_mac, self.guest_ip)
        if split is not None:
            proto, dst, start, end = split
            if proto == IPPROTO_TCP and self.tcp is not None:
                counters = self.counters
                counters["frames_from_guest"] = counters.get("frames_from_guest", 0) + 1
                counters["tcp_in"] = counters.get("tcp_in", 0) + 1
                try:
                    self.tcp.guest_segment(self.guest_ip, dst, memoryview(frame)[start:end],
                                           csum_verified)
                except PacketError as e:
                    self._count(str(e))
                return
            if proto == IPPROTO_UDP and dst != self.dns_ip:
                # One compiled call checks the UDP header as parse_udp does; None is a DHCP
                # client's datagram, which the full path takes.
                try:
                    udp = guest_udp_split(frame, start, end, self.guest_ip, dst,
                                          not csum_verified)
                except PacketError as e:
                    self._count("frames_from_guest")
                    self._count(str(e))
                    return
                if udp is not None:
                    counters = self.counters
                    counters["frames_from_guest"] = counters.get("frames_from_guest", 0) + 1
                    counters["udp_in"] = counters.get("udp_in", 0) + 1
                    sport, dport, data_end = udp
                    view = memoryview(frame)
                    try:
                        self.udp.guest_datagram(dst, sport, dport, view[start + UDP_HLEN:data_end],
                                                view[ETH_HLEN:end])
                    except PacketError as e:
                        self._count(str(e))
                    return
        elif self.ndp is not None:
            split = guest_ipv6_split(frame, self.gateway_mac, self.guest_mac, self.prefix6_64)
            if split is not None and self._ipv6_fast(frame, split, csum_verified):
                return
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
            elif eth.ethertype == ETH_P_IPV6 and self.ndp is not None:
                self._ipv6(eth.src, payload, csum_verified)
            else:
                self._count("eth_unsupported_type")
        except PacketError as e:
            self._count(str(e))

    def _ipv6_fast(self, frame, split, csum_verified: bool) -> bool:
        """The fast path's IPv6 half (see guest_frame): the guest's TCP, and its UDP to
        anyone but the NAT's own services, from one of its own addresses. False: the
        full path decides (nothing was counted)."""
        proto, src, dst, start, end = split
        if src in self.local6 or src == self.subnet_anycast6:
            return False  # not the guest's: the full path counts the spoofing
        if proto == IPPROTO_TCP:
            if self.tcp is None:
                return False
            self._count("frames_from_guest")
            self._count("ip6_in")
            self._count("tcp6_in")
            try:
                self.tcp.guest_segment(src, dst, memoryview(frame)[start:end], csum_verified)
            except PacketError as e:
                self._count(str(e))
            return True
        if dst == self.dns_ip6 or dst == self.router_ll6:
            return False  # DNS and DHCPv6
        self._count("frames_from_guest")
        self._count("ip6_in")
        try:
            packet = memoryview(frame)[ETH_HLEN:end]
            hdr, data = parse_udp6(src, dst, packet[start - ETH_HLEN:],
                                   verify=not csum_verified)
            self._count("udp6_in")
            self.udp.guest_datagram(dst, hdr[0], hdr[1], data, packet, guest_src=src)
        except PacketError as e:
            self._count(str(e))
        return True

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

    def _ipv6(self, eth_src: bytes, packet: memoryview, csum_verified: bool) -> None:
        ip, payload = parse_ipv6(packet)
        self._count("ip6_in")
        if ip.is_fragment:
            self._count("ip6_fragments_in")
            whole = self.reassembler6.push_piece(fragment_key(ip), ip.frag_offset, ip.frag_more,
                                                 payload, self.loop.time(), IPV6_MAX_PAYLOAD)
            self.counters["ip6_reassembly_dropped"] = self.reassembler6.dropped
            if whole is None:
                return
            self._count("ip6_reassembled")
            csum_verified = False  # the whole datagram's checksum was never vouched for
            packet = memoryview(rebuild_reassembled(ip, whole))
            ip, payload = parse_ipv6(packet)
            if ip.is_fragment:
                self._count("ip6_nested_fragment")
                return
        src, dst = ip.src, ip.dst
        # The guest's own addresses: its /64 but the NAT's own and the anycast address.
        guest_src = (src[:8] == self.prefix6_64 and src not in self.local6
                     and src != self.subnet_anycast6)
        if not guest_src and not (src == UNSPECIFIED or is_link_local(src)):
            self._count("ip6_spoofed_source")
            return
        if ip.proto == IPPROTO_ICMPV6:
            hdr, body = parse_icmpv6(src, dst, payload)
            self._count("icmp6_in")
            if hdr.type in NDP_TYPES:
                frames, learned = self.ndp.handle(eth_src, ip, hdr, body)
                if learned is not None:
                    self.guest_mac = learned
                for frame in frames:
                    self._count("frames_to_guest")
                    self.send_frame(frame)
                if hdr.type == ND_ROUTER_SOLICIT and frames and self._ra_timer is None:
                    self._arm_ra()  # this guest speaks IPv6: keep its router alive
                return
            if dst in self.local6 and src != UNSPECIFIED:
                self.guest_mac = eth_src
                self.icmp.local_echo6(src, dst, hdr, body)
                return
        elif (ip.proto == IPPROTO_UDP and dst in (ALL_DHCP_SERVERS, self.router_ll6)
              and src != UNSPECIFIED):
            hdr, data = parse_udp6(src, dst, payload, verify=not csum_verified)
            if hdr[1] == DHCPV6_SERVER_PORT and hdr[0] == DHCPV6_CLIENT_PORT:
                self._dhcp6(eth_src, src, data)
                return
        if is_multicast(dst):
            self._count("ip6_multicast_ignored")  # MLD reports, mDNS, ...: not for a NAT
            return
        packet = packet[:40 + ip.payload_length]
        if not guest_src:
            if src == UNSPECIFIED:
                self._count("ip6_spoofed_source")
                return
            # A link-local source (RFC 6724 rule 2: a guest whose global address is still
            # tentative, during DAD, picks it even for fd00::2) reaches the NAT's own
            # addresses, which are on the link; nothing beyond it (RFC 4007 §9: such a
            # packet is never forwarded). Beyond: ICMPv6 "beyond scope of source address"
            # (RFC 4443 §3.1), so the guest's connect fails now instead of timing out.
            if dst not in self.local6:
                self._count("ip6_link_local_beyond_scope")
                self.icmp.beyond_scope6(src, dst, packet)
                return
        self.guest_mac = eth_src
        if ip.proto == IPPROTO_TCP:
            if self.tcp is None:
                self._count("tcp_dropped_no_stack")
                return
            self._count("tcp6_in")
            self.tcp.guest_segment(src, dst, payload, csum_verified)
        elif ip.proto == IPPROTO_UDP:
            hdr, data = parse_udp6(src, dst, payload, verify=not csum_verified)
            self._count("udp6_in")
            if dst == self.dns_ip6:
                if hdr[1] == DNS_PORT:
                    self.dns.guest_query(hdr[0], data, guest_ip=src)
                else:
                    self._count("udp_dns_address_other_port")
                    self.udp.unreachable6(src, dst, packet)
            else:
                self.udp.guest_datagram(dst, hdr[0], hdr[1], data, packet, guest_src=src)
        elif ip.proto == IPPROTO_ICMPV6:
            self.icmp.guest_icmp6(src, dst, hdr, body, packet)
        else:
            self._count("ip6_unsupported_proto")

    def _dhcp6(self, eth_src: bytes, src: bytes, data: memoryview) -> None:
        self._count("dhcp6_in")
        reply = self.dhcp6.handle(data)
        if reply is None:
            return
        self.guest_mac = bytes(eth_src)
        # RFC 8415 §18.3.10: the Reply goes to the client's link-local address, port 546.
        udp = build_udp6(self.router_ll6, src, DHCPV6_SERVER_PORT, DHCPV6_CLIENT_PORT, reply)
        self.send_ip6(self.router_ll6, src, IPPROTO_UDP, udp)

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
        if self.ndp is not None:
            self.reassembler6 = Reassembler()

    def close(self) -> None:
        """Close every flow (TCP is reset both ways) and listener; safe to call again."""
        if self.closed:
            return
        self.closed = True
        if self._ra_timer is not None:
            self._ra_timer.cancel()
            self._ra_timer = None
        if self.tcp is not None:
            self.tcp.close()
        self.udp.close()
        self.icmp.close()
        self.dns.close()
