"""A sans-I/O DHCP server for the single guest (RFC 2131, options from RFC 2132).

The guest always gets config.guest_ip. DISCOVER is answered with OFFER, REQUEST for that
address with ACK (anything else with NAK), INFORM with an ACK carrying options only,
RELEASE and DECLINE with nothing. Options: subnet mask, router, DNS server, lease time,
server identifier, interface MTU and, if configured, the host name.
"""

from __future__ import annotations

import struct

from voidbox._records import named_tuple
from voidbox.net.config import NatConfig
from voidbox.net.packets import ETH_ALEN, ETH_BROADCAST, PacketError, ip_to_bytes

DHCP_SERVER_PORT = 67
DHCP_CLIENT_PORT = 68

# RFC 2131 §2: the fixed BOOTP header, then the magic cookie (RFC 2132 §2).
BOOTP_FIXED_LEN = 236
BOOTREQUEST = 1
BOOTREPLY = 2
HTYPE_ETHER = 1
BOOTP_BROADCAST = 0x8000
DHCP_MAGIC = b"\x63\x82\x53\x63"
CHADDR_OFFSET = 28
CHADDR_LEN = 16
_BOOTP = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")

# RFC 2132 option codes
DHO_PAD = 0
DHO_SUBNET_MASK = 1
DHO_ROUTERS = 3
DHO_DOMAIN_NAME_SERVERS = 6
DHO_HOST_NAME = 12
DHO_INTERFACE_MTU = 26
DHO_BROADCAST_ADDRESS = 28
DHO_DHCP_REQUESTED_ADDRESS = 50
DHO_DHCP_LEASE_TIME = 51
DHO_DHCP_MESSAGE_TYPE = 53
DHO_DHCP_SERVER_IDENTIFIER = 54
DHO_END = 255

# RFC 2132 §9.6 message types
DHCPDISCOVER = 1
DHCPOFFER = 2
DHCPREQUEST = 3
DHCPDECLINE = 4
DHCPACK = 5
DHCPNAK = 6
DHCPRELEASE = 7
DHCPINFORM = 8

# RFC 2131 §4.4.5: T1 and T2 default to 0.5 and 0.875 of the lease; clients compute them.
INADDR_ANY = b"\x00" * 4
INADDR_BROADCAST = b"\xff" * 4


@named_tuple
class DhcpReply:
    payload: bytes  # the UDP payload, from server port 67 to client port 68
    dst_ip: bytes
    dst_mac: bytes


@named_tuple
class DhcpRequest:
    op: int
    xid: int
    flags: int
    ciaddr: bytes
    giaddr: bytes
    chaddr: bytes  # the client's hardware address (hlen bytes)
    options: dict[int, bytes]


def parse_options(data: bytes | memoryview) -> dict[int, bytes]:
    """RFC 2132 §2 TLV options; a walk that runs off the end is malformed."""
    opts: dict[int, bytes] = {}
    i, n = 0, len(data)
    while i < n:
        code = data[i]
        if code == DHO_END:
            return opts
        if code == DHO_PAD:
            i += 1
            continue
        if i + 1 >= n:
            raise PacketError("dhcp_option_truncated")
        length = data[i + 1]
        if i + 2 + length > n:
            raise PacketError("dhcp_option_truncated")
        # RFC 3396: repeated options are concatenated.
        opts[code] = opts.get(code, b"") + bytes(data[i + 2 : i + 2 + length])
        i += 2 + length
    return opts


def parse_request(payload: bytes | memoryview) -> DhcpRequest:
    if len(payload) < BOOTP_FIXED_LEN + len(DHCP_MAGIC):
        raise PacketError("dhcp_short")
    (op, htype, hlen, _hops, xid, _secs, flags, ciaddr, _yiaddr, _siaddr, giaddr, chaddr,
     _sname, _file) = _BOOTP.unpack_from(payload)
    if bytes(payload[BOOTP_FIXED_LEN : BOOTP_FIXED_LEN + 4]) != DHCP_MAGIC:
        raise PacketError("dhcp_no_magic")
    if op != BOOTREQUEST or htype != HTYPE_ETHER or hlen != ETH_ALEN:
        raise PacketError("dhcp_unsupported")
    opts = parse_options(memoryview(payload)[BOOTP_FIXED_LEN + 4 :])
    return DhcpRequest(op, xid, flags, ciaddr, giaddr, chaddr[:hlen], opts)


def _opt(code: int, value: bytes) -> bytes:
    return bytes((code, len(value))) + value


class DhcpServer:
    """Answers the guest's DHCP messages; the I/O side wraps replies in UDP/IP/Ethernet."""

    def __init__(self, config: NatConfig):
        self.config = config
        self.server_ip = ip_to_bytes(config.gateway_ip)
        self.guest_ip = ip_to_bytes(config.guest_ip)
        bits = config.netmask_bits
        mask = (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF
        self.netmask = mask.to_bytes(4, "big")
        self.broadcast = (int.from_bytes(self.guest_ip, "big") | (~mask & 0xFFFFFFFF)).to_bytes(4, "big")
        self.leased_to: bytes | None = None  # chaddr of the current lease

    def handle(self, payload: bytes | memoryview) -> DhcpReply | None:
        """The reply to one client message, or None. Raises PacketError if malformed."""
        req = parse_request(payload)
        mtype = req.options.get(DHO_DHCP_MESSAGE_TYPE, b"")
        if len(mtype) != 1:
            raise PacketError("dhcp_no_type")
        kind = mtype[0]
        server_id = req.options.get(DHO_DHCP_SERVER_IDENTIFIER)
        if kind == DHCPDISCOVER:
            return self._reply(req, DHCPOFFER)
        if kind == DHCPREQUEST:
            if server_id is not None and server_id != self.server_ip:
                return None  # RFC 2131 §4.3.2: the client chose another server
            wanted = req.options.get(DHO_DHCP_REQUESTED_ADDRESS) or req.ciaddr
            if wanted != self.guest_ip:
                return self._reply(req, DHCPNAK)
            self.leased_to = req.chaddr
            return self._reply(req, DHCPACK)
        if kind == DHCPINFORM:
            return self._reply(req, DHCPACK, inform=True)
        if kind in (DHCPRELEASE, DHCPDECLINE):
            if server_id in (None, self.server_ip) and self.leased_to == req.chaddr:
                self.leased_to = None
            return None
        raise PacketError("dhcp_bad_type")

    def _reply(self, req: DhcpRequest, kind: int, inform: bool = False) -> DhcpReply:
        cfg = self.config
        yiaddr = INADDR_ANY if kind == DHCPNAK or inform else self.guest_ip
        header = _BOOTP.pack(
            BOOTREPLY, HTYPE_ETHER, ETH_ALEN, 0, req.xid, 0, req.flags,
            req.ciaddr if inform else INADDR_ANY, yiaddr, self.server_ip, req.giaddr,
            req.chaddr.ljust(CHADDR_LEN, b"\x00"), b"", b"",
        )
        opts = [_opt(DHO_DHCP_MESSAGE_TYPE, bytes((kind,))),
                _opt(DHO_DHCP_SERVER_IDENTIFIER, self.server_ip)]
        if kind != DHCPNAK:
            opts += [
                _opt(DHO_SUBNET_MASK, self.netmask),
                _opt(DHO_BROADCAST_ADDRESS, self.broadcast),
                _opt(DHO_ROUTERS, self.server_ip),
                _opt(DHO_DOMAIN_NAME_SERVERS, ip_to_bytes(cfg.dns_ip)),
                _opt(DHO_INTERFACE_MTU, struct.pack("!H", cfg.mtu)),
            ]
            if not inform:
                opts.append(_opt(DHO_DHCP_LEASE_TIME, struct.pack("!I", cfg.lease_time)))
            if cfg.hostname:
                opts.append(_opt(DHO_HOST_NAME, cfg.hostname.encode()[:255]))
        body = header + DHCP_MAGIC + b"".join(opts) + bytes((DHO_END,))
        # RFC 2131 §4.1: unicast to ciaddr when the client has one; broadcast when it asked
        # (or for a NAK); otherwise unicast to the offered address and chaddr.
        if kind == DHCPNAK or req.flags & BOOTP_BROADCAST:
            return DhcpReply(body, INADDR_BROADCAST, ETH_BROADCAST)
        if req.ciaddr != INADDR_ANY:
            return DhcpReply(body, req.ciaddr, req.chaddr)
        return DhcpReply(body, yiaddr, req.chaddr)
