"""Configuration of the user-mode NAT, shared by the packet layer and the TCP relay.

The guest network layout follows DESIGN.md ("Guest network layout"): the guest is
10.0.2.15/24, the gateway 10.0.2.2 stands for the host's loopback and 10.0.2.3 is the
DNS relay. Over IPv6 (unless ipv6=False) the guest's link is fd00::/64, as libslirp's:
the gateway fd00::2 stands for the host's ::1, fd00::3 is the DNS relay, the router's
link-local address (the source of its advertisements, RFC 4861 §4.2) is fe80::2, and the
guest configures itself by SLAAC (RFC 4862) from the prefix, so any address of the /64
but the NAT's own may be the guest's (`net run` gives the namespace fd00::100).
"""

from __future__ import annotations

import ipaddress
import socket

from .._records import dataclass, field

GUEST_IP = "10.0.2.15"
GATEWAY_IP = "10.0.2.2"
DNS_IP = "10.0.2.3"
GUEST_MAC = "52:54:00:12:34:56"
GATEWAY_MAC = "52:55:0a:00:02:02"
HOST_LOOPBACK = "127.0.0.1"
PREFIX6 = "fd00::"
PREFIX6_LEN = 64  # RFC 4862 §5.5.3: SLAAC needs a /64 on Ethernet (RFC 2464 §4)
GATEWAY_IP6 = "fd00::2"
DNS_IP6 = "fd00::3"
ROUTER_LL6 = "fe80::2"
GUEST_IP6 = "fd00::100"  # `net run`'s static address; a VM picks its own by SLAAC
HOST_LOOPBACK6 = "::1"
DNS_PORT = 53
DEFAULT_MTU = 1500
# RFC 791 §3.1 minimum datagram every host must accept, and the 16-bit total length.
MIN_MTU = 576
MAX_MTU = 65520  # a TAP device takes at most 65521; 65520 keeps frames 4-byte aligned


@dataclass(frozen=True)
class Forward:
    """A port forward: connections or datagrams to host_addr:host_port reach guest_port."""

    proto: str  # "tcp" or "udp"
    host_addr: str
    host_port: int
    guest_port: int


@dataclass
class NatConfig:
    """Addresses and limits of one NAT instance (one guest)."""

    guest_ip: str = GUEST_IP
    gateway_ip: str = GATEWAY_IP
    dns_ip: str = DNS_IP
    netmask_bits: int = 24
    guest_mac: str = GUEST_MAC
    gateway_mac: str = GATEWAY_MAC
    mtu: int = DEFAULT_MTU
    # (ip, port) pairs; empty means "the host's /etc/resolv.conf nameservers".
    dns_upstreams: list[tuple[str, int]] = field(default_factory=list)
    max_flows: int = 65536
    max_conn_rate: float | None = None
    forwards: list[Forward] = field(default_factory=list)
    udp_idle_timeout: float = 60.0
    icmp_idle_timeout: float = 10.0
    dns_timeout: float = 5.0
    # TCP flow lifetime limits (voidbox.net.tcp.TcpFlow; None = no limit): keepalive probes
    # after tcp_idle_timeout without a segment from the guest, tcp_keepalive_interval apart,
    # reset after tcp_keepalive_probes unanswered (Linux's keepalive defaults); half-open
    # flows reset after tcp_handshake_timeout, unacknowledged FINs after tcp_fin_timeout.
    tcp_idle_timeout: float | None = 7200.0
    tcp_keepalive_interval: float = 75.0
    tcp_keepalive_probes: int = 9
    tcp_handshake_timeout: float | None = 60.0
    tcp_fin_timeout: float | None = 60.0
    hostname: str | None = None
    lease_time: int = 86400
    # IPv6 on the guest's link (--ipv6/--no-ipv6): NDP, router advertisements, DHCPv6
    # (stateless), ICMPv6, UDP and TCP over IPv6. Off: every IPv6 frame is dropped.
    ipv6: bool = True
    prefix6: str = PREFIX6
    guest_ip6: str = GUEST_IP6  # `net run`'s static address (a VM's comes from SLAAC)
    gateway_ip6: str = GATEWAY_IP6
    dns_ip6: str = DNS_IP6
    router_ll6: str = ROUTER_LL6

    def translate(self, dst_ip: str) -> str:
        """The host address a guest destination maps to: the gateway means host loopback
        (fd00::2 the host's ::1), anything else is itself. The DNS address is not
        translated here: it serves DNS on port 53 only (host_endpoint)."""
        if dst_ip == self.gateway_ip:
            return HOST_LOOPBACK
        if dst_ip == self.gateway_ip6:
            return HOST_LOOPBACK6
        return dst_ip

    def host_endpoint(self, dst_ip: str, dst_port: int) -> tuple[str, int] | None:
        """The host endpoint a guest TCP or UDP flow to dst_ip:dst_port goes to, or None
        when there is nothing there.

        The guest's own subnet holds only the gateway (the host's loopback, every port)
        and the DNS relay, which serves port 53, relayed to the first upstream resolver,
        and nothing else: 10.0.2.3:80 is not the upstream's port 80. Every address
        outside the subnet is itself.
        """
        if ":" in dst_ip:
            return self._host_endpoint6(dst_ip, dst_port)
        if dst_ip == self.gateway_ip:
            return HOST_LOOPBACK, dst_port
        if dst_ip == self.dns_ip:
            ups = self.upstreams() if dst_port == DNS_PORT else None
            return ups[0] if ups else None
        if self.in_subnet(dst_ip):
            return None
        return dst_ip, dst_port

    def _host_endpoint6(self, dst_ip: str, dst_port: int) -> tuple[str, int] | None:
        """host_endpoint for an IPv6 destination (its canonical text, as ip6_to_str gives):
        the same rules on the guest's /64, and link-local destinations (fe80::/10) are
        never relayed: they name this link only (RFC 4291 §2.5.6)."""
        if dst_ip == self.gateway_ip6:
            return HOST_LOOPBACK6, dst_port
        if dst_ip == self.dns_ip6:
            ups = self.upstreams() if dst_port == DNS_PORT else None
            return ups[0] if ups else None
        raw = socket.inet_pton(socket.AF_INET6, dst_ip)
        if self.in_subnet6(raw) or (raw[0] == 0xFE and raw[1] & 0xC0 == 0x80):
            return None
        if raw == bytes(16):
            return None  # :: names no host (RFC 4291 §2.5.2); a connect() to it is loopback
        return dst_ip, dst_port

    def in_subnet6(self, raw: bytes) -> bool:
        """Whether the 16-byte address is in the guest's /64 (asked per new flow: the
        prefix's bytes are parsed once)."""
        prefix = self.__dict__.get("_prefix6_64")
        if prefix is None or self.__dict__.get("_prefix6_text") != self.prefix6:
            prefix = self._prefix6_64 = socket.inet_pton(socket.AF_INET6, self.prefix6)[:8]
            self._prefix6_text = self.prefix6
        return raw[:8] == prefix

    def in_subnet(self, ip: str | bytes) -> bool:
        """Whether ip (dotted or 4 bytes) is in the guest's subnet: integer arithmetic, as
        every new flow asks and ipaddress objects are slow to make."""
        raw = ip if isinstance(ip, bytes) else socket.inet_aton(ip)
        mask = (0xFFFFFFFF << (32 - self.netmask_bits)) & 0xFFFFFFFF
        guest = int.from_bytes(socket.inet_aton(self.guest_ip), "big")
        return int.from_bytes(raw, "big") & mask == guest & mask

    def upstreams(self) -> list[tuple[str, int]]:
        """The DNS upstreams: the explicit list, else the host's resolv.conf nameservers."""
        if self.dns_upstreams:
            return list(self.dns_upstreams)
        if not hasattr(self, "_resolv_cache"):
            self._resolv_cache = read_resolv_conf()
        return self._resolv_cache

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"{self.guest_ip}/{self.netmask_bits}", strict=False)


def read_resolv_conf(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """Nameservers from resolv.conf(5), in order, IPv4 and IPv6 (the relay's host socket
    takes the upstream's family); a scoped link-local one (fe80::1%eth0) is skipped."""
    servers: list[tuple[str, int]] = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    try:
                        ipaddress.ip_address(parts[1])
                    except ValueError:
                        continue
                    if "%" in parts[1]:
                        continue  # a zone index names a host interface, not ours to use
                    servers.append((parts[1], DNS_PORT))
    except OSError:
        pass
    return servers


def parse_mac(mac: str) -> bytes:
    """'52:54:00:12:34:56' -> 6 bytes."""
    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"bad MAC address {mac!r}")
    return raw
