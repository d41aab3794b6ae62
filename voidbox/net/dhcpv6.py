"""Stateless DHCPv6 (RFC 3736, now RFC 8415 §6.1), sans-I/O: DNS servers for a guest
that asks.

Addresses come from SLAAC (the router advertisements of voidbox.net.ndp, whose O flag
says "ask DHCPv6 for the rest"); this server only answers an Information-request with a
Reply naming the DNS relay (RFC 3646's DNS Recursive Name Server option). Stateful
messages (Solicit, Request, ...) are counted and left unanswered: a client that gets no
Advertise keeps its SLAAC address.
"""

from __future__ import annotations

import struct

from voidbox.net.config import NatConfig, parse_mac
from voidbox.net.ipv6 import ip6_to_bytes
from voidbox.net.packets import PacketError

DHCPV6_CLIENT_PORT = 546
DHCPV6_SERVER_PORT = 547
# RFC 8415 §7.3 message types
DHCPV6_INFORMATION_REQUEST = 11
DHCPV6_REPLY = 7
# RFC 8415 §21 option codes, RFC 3646 §3
OPTION_CLIENTID = 1
OPTION_SERVERID = 2
OPTION_DNS_SERVERS = 23
DUID_LL = 3  # RFC 8415 §11.4: DUID based on the link-layer address
HWTYPE_ETHERNET = 1
MAX_OPTIONS = 64  # a walk bound
DHCPV6_HLEN = 4  # msg-type + 3-octet transaction id
_OPT = struct.Struct("!HH")


def options(msg: memoryview) -> dict[int, bytes]:
    """Option code -> its first occurrence's data (RFC 8415 §21.1); raises if malformed."""
    out: dict[int, bytes] = {}
    i = DHCPV6_HLEN
    n = len(msg)
    count = 0
    while i < n:
        count += 1
        if count > MAX_OPTIONS or i + _OPT.size > n:
            raise PacketError("dhcp6_bad_option")
        code, length = _OPT.unpack_from(msg, i)
        i += _OPT.size
        if i + length > n:
            raise PacketError("dhcp6_bad_option")
        out.setdefault(code, bytes(msg[i:i + length]))
        i += length
    return out


class Dhcp6Server:
    def __init__(self, config: NatConfig, counters: dict[str, int]):
        self.counters = counters
        self.duid = struct.pack("!HH", DUID_LL, HWTYPE_ETHERNET) + parse_mac(config.gateway_mac)
        self.dns = ip6_to_bytes(config.dns_ip6)

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def handle(self, msg: memoryview) -> bytes | None:
        """One client message; the Reply's UDP payload, or None."""
        if len(msg) < DHCPV6_HLEN:
            raise PacketError("dhcp6_short")
        if msg[0] != DHCPV6_INFORMATION_REQUEST:
            self._count("dhcp6_stateful_ignored")
            return None
        opts = options(msg)
        if OPTION_SERVERID in opts and opts[OPTION_SERVERID] != self.duid:
            return None  # RFC 8415 §16.12: meant for another server
        reply = bytes([DHCPV6_REPLY]) + bytes(msg[1:DHCPV6_HLEN])
        reply += _OPT.pack(OPTION_SERVERID, len(self.duid)) + self.duid
        if OPTION_CLIENTID in opts:
            reply += _OPT.pack(OPTION_CLIENTID, len(opts[OPTION_CLIENTID])) + opts[OPTION_CLIENTID]
        reply += _OPT.pack(OPTION_DNS_SERVERS, len(self.dns)) + self.dns
        self._count("dhcp6_replies")
        return reply
