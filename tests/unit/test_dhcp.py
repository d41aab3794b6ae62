"""The DHCP server (voidbox/net/dhcp.py): the exchange busybox udhcpc performs."""

import struct

import pytest

from tests.unit.netframes import GATEWAY_HW, GUEST_HW, Harness
from voidbox.net.config import NatConfig
from voidbox.net.dhcp import (
    BOOTP_BROADCAST,
    DHCP_MAGIC,
    DHCPACK,
    DHCPDISCOVER,
    DHCPINFORM,
    DHCPNAK,
    DHCPOFFER,
    DHCPRELEASE,
    DHCPREQUEST,
    DhcpServer,
    parse_options,
)
from voidbox.net.packets import (
    ETH_BROADCAST,
    ETH_P_IP,
    IPPROTO_UDP,
    PacketError,
    build_ethernet,
    build_ipv4,
    build_udp,
    parse_ethernet,
    parse_ipv4,
    parse_udp,
)

XID = 0x1234ABCD
ZERO = b"\x00" * 4
GUEST = bytes([10, 0, 2, 15])
SERVER = bytes([10, 0, 2, 2])


def message(kind: int, *, ciaddr=ZERO, flags=0, options=b"", chaddr=GUEST_HW) -> bytes:
    fixed = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, XID, 0, flags, ciaddr, ZERO, ZERO,
                        ZERO, chaddr.ljust(16, b"\x00"), b"", b"")
    return fixed + DHCP_MAGIC + bytes((53, 1, kind)) + options + b"\xff"


def reply_fields(reply):
    opts = parse_options(reply.payload[240:])
    op, xid, yiaddr, siaddr = reply.payload[0], struct.unpack_from("!I", reply.payload, 4)[0], \
        reply.payload[16:20], reply.payload[20:24]
    return op, xid, yiaddr, siaddr, opts


def test_discover_gets_an_offer_with_every_option():
    server = DhcpServer(NatConfig(mtu=1400, hostname="box"))
    reply = server.handle(message(DHCPDISCOVER))
    op, xid, yiaddr, siaddr, opts = reply_fields(reply)
    assert (op, xid, yiaddr, siaddr) == (2, XID, GUEST, SERVER)
    assert opts == {
        53: bytes([DHCPOFFER]), 54: SERVER, 1: bytes([255, 255, 255, 0]), 28: bytes([10, 0, 2, 255]),
        3: SERVER, 6: bytes([10, 0, 2, 3]), 26: struct.pack("!H", 1400), 51: struct.pack("!I", 86400),
        12: b"box",
    }
    # No broadcast flag and no ciaddr: unicast to the offered address and chaddr (RFC 2131 §4.1).
    assert (reply.dst_ip, reply.dst_mac) == (GUEST, GUEST_HW)


def test_broadcast_flag_gets_a_broadcast_reply():
    reply = DhcpServer(NatConfig()).handle(message(DHCPDISCOVER, flags=BOOTP_BROADCAST))
    assert (reply.dst_ip, reply.dst_mac) == (b"\xff" * 4, ETH_BROADCAST)


def test_request_for_the_guest_address_is_acked():
    server = DhcpServer(NatConfig())
    reply = server.handle(message(DHCPREQUEST, options=bytes((50, 4)) + GUEST + bytes((54, 4)) + SERVER))
    assert reply_fields(reply)[4][53] == bytes([DHCPACK])
    assert server.leased_to == GUEST_HW
    # Renewal: ciaddr set, no option 50; the reply is unicast to ciaddr.
    reply = server.handle(message(DHCPREQUEST, ciaddr=GUEST))
    assert reply_fields(reply)[4][53] == bytes([DHCPACK]) and reply.dst_ip == GUEST


def test_request_for_another_address_is_naked():
    reply = DhcpServer(NatConfig()).handle(message(DHCPREQUEST, options=bytes((50, 4, 10, 0, 2, 99))))
    _op, _xid, yiaddr, _siaddr, opts = reply_fields(reply)
    assert opts[53] == bytes([DHCPNAK]) and yiaddr == ZERO and 1 not in opts
    assert reply.dst_mac == ETH_BROADCAST


def test_request_to_another_server_is_ignored():
    opts = bytes((50, 4)) + GUEST + bytes((54, 4, 10, 0, 2, 1))
    assert DhcpServer(NatConfig()).handle(message(DHCPREQUEST, options=opts)) is None


def test_release_ends_the_lease_and_inform_gets_options_only():
    server = DhcpServer(NatConfig())
    server.handle(message(DHCPREQUEST, options=bytes((50, 4)) + GUEST))
    assert server.handle(message(DHCPRELEASE, ciaddr=GUEST, options=bytes((54, 4)) + SERVER)) is None
    assert server.leased_to is None
    reply = server.handle(message(DHCPINFORM, ciaddr=GUEST))
    _op, _xid, yiaddr, _siaddr, opts = reply_fields(reply)
    assert yiaddr == ZERO and opts[53] == bytes([DHCPACK]) and 51 not in opts and opts[3] == SERVER


@pytest.mark.parametrize("payload, reason", [
    (b"\x01" * 100, "dhcp_short"),
    (message(DHCPDISCOVER)[:236] + b"\x00\x00\x00\x00", "dhcp_no_magic"),
    (message(DHCPDISCOVER)[:-1][:-3] + bytes((53, 5)), "dhcp_option_truncated"),
    (b"\x02" + message(DHCPDISCOVER)[1:], "dhcp_unsupported"),
    (message(DHCPDISCOVER)[:240] + b"\xff", "dhcp_no_type"),
    (message(99), "dhcp_bad_type"),
])
def test_malformed_messages_raise(payload, reason):
    with pytest.raises(PacketError, match=reason):
        DhcpServer(NatConfig()).handle(payload)


def test_option_walk_is_bounded():
    assert parse_options(b"\x00" * 1000) == {}
    with pytest.raises(PacketError):
        parse_options(b"\x0c")
    # RFC 3396 concatenation of split options.
    assert parse_options(b"\x0c\x01a\x0c\x01b\xff") == {12: b"ab"}


def test_engine_answers_discover_from_0_0_0_0_with_a_frame():
    h = Harness()
    try:
        bcast = b"\xff" * 4
        udp = build_udp(ZERO, bcast, 68, 67, message(DHCPDISCOVER, flags=BOOTP_BROADCAST))
        h.send(build_ethernet(ETH_BROADCAST, GUEST_HW, ETH_P_IP, build_ipv4(ZERO, bcast, IPPROTO_UDP, udp)))
        assert len(h.out) == 1
        eth, payload = parse_ethernet(h.out[0])
        assert (eth.dst, eth.src) == (ETH_BROADCAST, GATEWAY_HW)
        ip, seg = parse_ipv4(payload)
        assert (ip.src, ip.dst) == (SERVER, bcast)
        hdr, data = parse_udp(ip.src, ip.dst, seg)
        assert (hdr.sport, hdr.dport) == (67, 68)
        assert parse_options(bytes(data)[240:])[53] == bytes([DHCPOFFER])
        assert h.engine.counters["dhcp_replies"] == 1
        # Anything else from 0.0.0.0 is spoofed.
        udp = build_udp(ZERO, bcast, 68, 99, b"x")
        h.send(build_ethernet(ETH_BROADCAST, GUEST_HW, ETH_P_IP, build_ipv4(ZERO, bcast, IPPROTO_UDP, udp)))
        assert len(h.out) == 1 and h.engine.counters["ip_spoofed_source"] == 1
    finally:
        h.close()


def test_the_engine_learns_the_guest_mac_from_its_dhcp_exchange():
    """A card whose MAC the NAT was not told (a vhost-user frontend picks its own): frames
    the NAT starts itself, such as a port forward's SYN, must reach the guest before it
    sends IPv4 of its own, so the MAC the lease went to is the guest's."""
    other_hw = bytes.fromhex("02aabbccddee")
    h = Harness()
    try:
        assert h.engine.guest_mac != other_hw
        bcast = b"\xff" * 4
        udp = build_udp(ZERO, bcast, 68, 67, message(DHCPDISCOVER, chaddr=other_hw))
        h.send(build_ethernet(ETH_BROADCAST, other_hw, ETH_P_IP, build_ipv4(ZERO, bcast, IPPROTO_UDP, udp)))
        assert h.engine.counters["dhcp_replies"] == 1
        assert h.engine.guest_mac == other_hw
    finally:
        h.close()
