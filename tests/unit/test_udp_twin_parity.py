"""Twin parity for the UDP relay's per-datagram work: voidbox._udp and its specification
voidbox.net._udp_py (see test_twin_parity.py for the approach), over random inputs.

- guest_udp_split: the same ports and payload end, the same None (DHCP client to server)
  and the same PacketError names as packets.parse_udp raises;
- build_ipv4_udp: the same bytes written (none past the packet), the same refusals, and a
  packet packets.parse_ipv4 / parse_udp accept with its checksums right.

Under VOIDBOX_PURE=1 there is no compiled side to compare, and every test skips saying so.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.twins import load_compiled
from voidbox.net import _udp_py
from voidbox.net.packets import PacketError, parse_ipv4, parse_udp

from .test_twin_parity import as_kind, kinds, outcome

GUEST_IP = bytes([10, 0, 2, 15])
GATEWAY_IP = bytes([10, 0, 2, 2])
ETH_IP_HLEN = 14 + 20


@pytest.fixture(scope="module")
def udp():
    """(pure, compiled) voidbox._udp twins."""
    return _udp_py, load_compiled("voidbox._udp")


def udp_datagram(sport: int, dport: int, payload: bytes, length_delta: int, csum: str) -> bytes:
    """A UDP datagram from the guest to the gateway: its checksum right, zero (none) or off."""
    length = max(0, 8 + len(payload) + length_delta) & 0xFFFF
    dgram = bytearray(struct.pack("!HHHH", sport, dport, length, 0) + payload)
    if csum != "none":
        pseudo = struct.pack("!4s4sBBH", GUEST_IP, GATEWAY_IP, 0, 17, len(dgram))
        value = _udp_py.inet_checksum(pseudo + bytes(dgram)) or 0xFFFF
        struct.pack_into("!H", dgram, 6, value ^ (1 if csum == "bad" else 0))
    return bytes(dgram)


ports = st.one_of(st.integers(0, 0xFFFF), st.sampled_from([53, 67, 68]))


@settings(max_examples=800, deadline=None)
@given(sport=ports, dport=ports, payload=st.binary(max_size=300),
       length_delta=st.integers(-10, 3), csum=st.sampled_from(["good", "none", "bad"]),
       verify=st.booleans(), cut=st.integers(0, 12), pad=st.integers(0, 8),
       edits=st.lists(st.tuples(st.integers(0, 60), st.integers(0, 255)), max_size=2),
       kind=kinds, offset=st.integers(0, 15))
def test_guest_udp_split_agrees(udp, sport, dport, payload, length_delta, csum, verify, cut,
                                pad, edits, kind, offset):
    """Ports, payload end, None for DHCP and the PacketError names: the same from both."""
    frame = bytearray(ETH_IP_HLEN) + udp_datagram(sport, dport, payload, length_delta, csum)
    for index, value in edits:
        at = ETH_IP_HLEN + index
        if at < len(frame):
            frame[at] = value
    end = max(ETH_IP_HLEN, len(frame) - cut)
    frame = bytes(frame[:end]) + b"\xee" * pad  # Ethernet padding past the IP packet
    results = [outcome(m.guest_udp_split, as_kind(frame, kind, offset), ETH_IP_HLEN, end,
                       GUEST_IP, GATEWAY_IP, verify) for m in udp]
    assert results[0] == results[1]


@pytest.mark.parametrize("csum", ["good", "none", "bad"])
@pytest.mark.parametrize("length_delta", [0, -1, -9, 1])
def test_guest_udp_split_says_what_parse_udp_says(udp, csum, length_delta):
    """The specification is packets.parse_udp: the same ports, payload and error names."""
    dgram = udp_datagram(5353, 8080, b"query", length_delta, csum)
    frame = bytes(ETH_IP_HLEN) + dgram
    try:
        hdr, data = parse_udp(GUEST_IP, GATEWAY_IP, dgram)
        want = ("ok", (hdr.sport, hdr.dport, ETH_IP_HLEN + 8 + len(data)))
    except PacketError as e:
        want = (PacketError, str(e))
    for m in udp:
        assert outcome(m.guest_udp_split, frame, ETH_IP_HLEN, len(frame), GUEST_IP, GATEWAY_IP,
                       True) == want


def test_a_dhcp_clients_datagram_is_left_to_the_full_path(udp):
    frame = bytes(ETH_IP_HLEN) + udp_datagram(68, 67, b"\x01" * 20, 0, "bad")
    for m in udp:
        assert m.guest_udp_split(frame, ETH_IP_HLEN, len(frame), GUEST_IP, GATEWAY_IP,
                                 True) is None
        # Short of a UDP header but with the ports there: the full path still counts it.
        assert m.guest_udp_split(frame, ETH_IP_HLEN, ETH_IP_HLEN + 4, GUEST_IP, GATEWAY_IP,
                                 True) is None


@pytest.mark.parametrize(("start", "end"), [(-1, 40), (40, 39), (34, 1000)])
def test_bounds_outside_the_frame_are_refused_alike(udp, start, end):
    frame = bytes(ETH_IP_HLEN) + udp_datagram(1, 2, b"x", 0, "good")
    results = [outcome(m.guest_udp_split, frame, start, end, GUEST_IP, GATEWAY_IP, True)
               for m in udp]
    assert results[0] == results[1] and results[0][0] is ValueError


addresses = st.one_of(st.binary(min_size=4, max_size=4), st.binary(max_size=6))
small_ints = st.one_of(st.integers(0, 0xFFFF), st.sampled_from([-1, 0x10000]))


@settings(max_examples=500, deadline=None)
@given(src=addresses, dst=addresses, ident=small_ints, sport=small_ints, dport=small_ints,
       payload=st.one_of(st.binary(max_size=1500),
                         st.sampled_from([65507, 65508]).map(lambda n: b"\x77" * n)),
       headroom=st.integers(-1, 16), slack=st.integers(-3, 8), kind=kinds,
       offset=st.integers(0, 7))
def test_build_ipv4_udp_agrees_byte_for_byte(udp, src, dst, ident, sport, dport, payload,
                                             headroom, slack, kind, offset):
    outs, results = [], []
    off = max(headroom, 0)
    size = max(0, off + 28 + len(payload) + slack)
    base = bytearray(b"\xa5" * size)
    base[off + 28:off + 28 + len(payload)] = payload[:max(0, size - off - 28)]
    for m in udp:
        out = bytearray(base)
        results.append(outcome(m.build_ipv4_udp, out, headroom,
                               as_kind(src, kind, offset), dst, ident, sport, dport,
                               len(payload)))
        outs.append(bytes(out))
    assert results[0] == results[1]
    assert outs[0] == outs[1]  # the same bytes written, and none past the packet
    if results[0][0] == "ok":
        n = results[0][1]
        ip, segment = parse_ipv4(memoryview(outs[0])[off:off + n])
        hdr, data = parse_udp(ip.src, ip.dst, segment)  # checksums verified
        assert (ip.ident, ip.ttl, ip.proto, ip.flags_frag) == (ident, 64, 17, 0x4000)
        assert (ip.src, ip.dst, hdr.sport, hdr.dport) == (src, dst, sport, dport)
        assert bytes(data) == payload
        assert outs[0][off + n:] == bytes(base[off + n:])


def test_a_read_only_buffer_is_refused_alike(udp):
    out = memoryview(bytearray(64)).toreadonly()
    results = [outcome(m.build_ipv4_udp, out, 0, GATEWAY_IP, GUEST_IP, 1, 2, 3, 0) for m in udp]
    assert results[0][0] is results[1][0] is BufferError
