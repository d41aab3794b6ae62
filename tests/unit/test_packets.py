"""Wire formats (voidbox/net/packets.py): golden bytes, hostile input, reassembly."""

import random
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voidbox.net.packets import (
    IP_MF,
    IPPROTO_UDP,
    PacketError,
    Reassembler,
    build_icmp,
    build_ipv4,
    build_ipv4_fragments,
    build_udp,
    checksum,
    parse_arp,
    parse_ethernet,
    parse_icmp,
    parse_ipv4,
    parse_udp,
)

SRC = bytes([192, 168, 0, 1])
DST = bytes([192, 168, 0, 199])


def reference_checksum(data: bytes) -> int:
    """RFC 1071 §4.1 word-by-word, the slow obvious way."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@given(st.binary(max_size=200))
def test_checksum_matches_reference(data):
    assert checksum(data) == reference_checksum(data)


def test_checksum_of_all_ones_words():
    # A folded sum of nonzero data is 0xFFFF, never 0: its checksum is 0.
    assert checksum(b"\xff\xff" * 4) == 0
    assert checksum(b"") == 0xFFFF


def test_ipv4_header_golden():
    # The widely used example header (total length 0x73, UDP, DF) has checksum 0xB861.
    pkt = build_ipv4(SRC, DST, IPPROTO_UDP, b"\x00" * (0x73 - 20))
    assert pkt[:20].hex() == "450000730000400040 11b861c0a80001c0a800c7".replace(" ", "")


def test_parse_ipv4_trims_ethernet_padding():
    pkt = build_ipv4(SRC, DST, IPPROTO_UDP, b"abc") + b"\x00" * 23
    ip, payload = parse_ipv4(pkt)
    assert ip.total_length == 23 and bytes(payload) == b"abc"
    assert not ip.is_fragment


def _corrupt(pkt: bytes, offset: int, value: int, fix_checksum: bool = True) -> bytes:
    b = bytearray(pkt)
    b[offset] = value
    if fix_checksum:
        b[10:12] = b"\x00\x00"
        struct.pack_into("!H", b, 10, checksum(bytes(b[: (b[0] & 0xF) * 4])))
    return bytes(b)


@pytest.mark.parametrize("mutate, reason", [
    (lambda p: p[:19], "ip_short"),
    (lambda p: _corrupt(p, 0, 0x65), "ip_version"),
    (lambda p: _corrupt(p, 0, 0x44), "ip_ihl"),
    (lambda p: _corrupt(p, 3, 0xFF), "ip_length"),   # total length beyond the buffer
    (lambda p: _corrupt(p, 3, 0x10), "ip_length"),   # total length below the header length
    (lambda p: _corrupt(p, 8, 1, fix_checksum=False), "ip_checksum"),
    (lambda p: _corrupt(p, 0, 0x4F), "ip_length"),   # IHL 60 > the 23-byte packet
])
def test_parse_ipv4_rejects(mutate, reason):
    pkt = build_ipv4(SRC, DST, IPPROTO_UDP, b"abc")
    with pytest.raises(PacketError, match=reason):
        parse_ipv4(mutate(pkt))


def test_udp_roundtrip_and_checksum():
    seg = build_udp(SRC, DST, 1234, 53, b"hello")
    hdr, data = parse_udp(SRC, DST, seg)
    assert (hdr.sport, hdr.dport, hdr.length, bytes(data)) == (1234, 53, 13, b"hello")
    with pytest.raises(PacketError, match="udp_checksum"):
        parse_udp(SRC, DST, seg[:-1] + b"X")
    # The checksum covers the pseudo-header: a different destination fails it.
    with pytest.raises(PacketError, match="udp_checksum"):
        parse_udp(SRC, bytes([192, 168, 0, 198]), seg)


def test_udp_zero_checksum_is_accepted_and_lengths_checked():
    seg = bytearray(build_udp(SRC, DST, 1, 2, b"xy"))
    seg[6:8] = b"\x00\x00"
    assert bytes(parse_udp(SRC, DST, bytes(seg))[1]) == b"xy"
    seg[4:6] = struct.pack("!H", 99)
    with pytest.raises(PacketError, match="udp_length"):
        parse_udp(SRC, DST, bytes(seg))
    with pytest.raises(PacketError, match="udp_short"):
        parse_udp(SRC, DST, b"1234567")


def test_udp_computed_zero_checksum_is_sent_as_ones():
    # Search a payload whose checksum computes to zero: RFC 768 sends it as 0xFFFF.
    for i in range(70000):
        seg = build_udp(SRC, DST, 1, 2, struct.pack("!I", i))
        if seg[6:8] == b"\xff\xff":
            parse_udp(SRC, DST, seg)
            return
    pytest.fail("no zero-checksum payload found")


def test_icmp_roundtrip():
    msg = build_icmp(8, 0, (0x1234 << 16) | 7, b"data")
    hdr, data = parse_icmp(msg)
    assert (hdr.type, hdr.code, hdr.rest >> 16, hdr.rest & 0xFFFF, bytes(data)) == (8, 0, 0x1234, 7, b"data")
    with pytest.raises(PacketError, match="icmp_checksum"):
        parse_icmp(msg[:-1] + b"X")


def test_ethernet_and_arp_short_inputs():
    with pytest.raises(PacketError, match="eth_short"):
        parse_ethernet(b"\x00" * 13)
    with pytest.raises(PacketError, match="arp_short"):
        parse_arp(b"\x00" * 27)
    with pytest.raises(PacketError, match="arp_unsupported"):
        parse_arp(b"\x00\x06" + b"\x00" * 26)


def test_fragments_and_reassembly_in_any_order():
    payload = bytes(random.Random(1).getrandbits(8) for _ in range(3000))
    frags = build_ipv4_fragments(SRC, DST, IPPROTO_UDP, payload, 1500, ident=77)
    assert len(frags) == 3
    parsed = [parse_ipv4(f) for f in frags]
    assert all(ip.total_length <= 1500 for ip, _ in parsed)
    assert [bool(ip.flags_frag & IP_MF) for ip, _ in parsed] == [True, True, False]
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        r = Reassembler()
        results = [r.push(*parsed[i], now=0.0) for i in order]
        assert results[:2] == [None, None] and results[2] == payload
        assert not r.pending


def test_small_packet_is_not_fragmented():
    assert len(build_ipv4_fragments(SRC, DST, IPPROTO_UDP, b"x" * 1480, 1500)) == 1


def _frag(offset: int, data: bytes, more: bool, ident: int = 1):
    hdr = bytearray(build_ipv4(SRC, DST, IPPROTO_UDP, data, ident=ident, df=False))
    struct.pack_into("!H", hdr, 6, (IP_MF if more else 0) | (offset // 8))
    hdr[10:12] = b"\x00\x00"
    struct.pack_into("!H", hdr, 10, checksum(bytes(hdr[:20])))
    return parse_ipv4(bytes(hdr))


def test_reassembly_rejects_overlaps():
    r = Reassembler()
    assert r.push(*_frag(0, b"A" * 16, True), now=0) is None
    assert r.push(*_frag(8, b"B" * 16, False), now=0) is None  # overlaps [8, 16)
    assert r.dropped == 1 and not r.pending
    # The datagram is gone: a late correct piece does not complete it.
    assert r.push(*_frag(16, b"C" * 8, False), now=0) is None


def test_reassembly_rejects_inconsistent_ends_and_odd_middles():
    r = Reassembler()
    r.push(*_frag(16, b"x" * 8, False), now=0)
    assert r.push(*_frag(32, b"x" * 8, False), now=0) is None
    assert r.dropped == 1
    assert r.push(*_frag(0, b"x" * 7, True, ident=2), now=0) is None  # not a multiple of 8
    assert r.dropped == 2
    assert r.push(*_frag(65528, b"x" * 16, False, ident=3), now=0) is None  # beyond 64 KiB
    assert r.dropped == 3


def test_reassembly_expires_and_is_bounded():
    r = Reassembler(timeout=30.0)
    r.push(*_frag(0, b"x" * 8, True), now=0.0)
    r.expire(now=30.0)
    assert not r.pending and r.dropped == 1
    for ident in range(200):
        r.push(*_frag(0, b"x" * 8, True, ident=ident), now=1.0)
    assert len(r.pending) == 64


def test_reassembly_zero_length_fragment_cannot_hide_an_overlap():
    """Issue 8 defect 10: E[0,32), an empty fragment at 0, X[0,32), X[32,64) final.
    The empty piece replaced E's entry, so X[0,32) no longer overlapped anything."""
    r = Reassembler()
    assert r.push(*_frag(0, b"E" * 32, True), now=0) is None
    assert r.push(*_frag(0, b"", True), now=0) is None
    assert r.push(*_frag(0, b"X" * 32, True), now=0) is None
    assert r.push(*_frag(32, b"X" * 32, False), now=0) is None
    assert r.dropped >= 1


def test_reassembly_zero_length_non_final_fragment_is_dropped():
    r = Reassembler()
    assert r.push(*_frag(8, b"", True), now=0) is None
    assert r.dropped == 1 and not r.pending


def test_reassembly_empty_final_fragment_inside_a_piece_is_an_overlap():
    r = Reassembler()
    assert r.push(*_frag(0, b"A" * 16, True), now=0) is None
    assert r.push(*_frag(8, b"", False), now=0) is None  # ends the datagram inside [0, 16)
    assert r.dropped == 1 and not r.pending


def test_reassembly_empty_final_fragment_at_the_end_completes():
    r = Reassembler()
    assert r.push(*_frag(0, b"A" * 16, True), now=0) is None
    assert r.push(*_frag(16, b"", False), now=0) == b"A" * 16
