"""Frame dispatch in the engine (voidbox/net/engine.py): what is dropped, and why."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.netframes import (
    DNS6,
    GATEWAY,
    GATEWAY6,
    GATEWAY_HW,
    GUEST_HW,
    GUEST_LL6,
    ROUTER_LL6,
    Harness,
    frame_of,
    guest_echo6_frame,
    guest_echo_frame,
    guest_ip6_frame,
    guest_ip_frame,
    guest_udp6_frame,
    guest_udp_frame,
)
from voidbox.net.packets import IPPROTO_TCP, IPPROTO_UDP, build_ethernet, checksum

ETH_P_LOCAL_EXPERIMENTAL = 0x88B5  # IEEE 802 local experimental EtherType: no one's


@pytest.fixture
def h():
    harness = Harness()
    yield harness
    harness.close()


def test_frames_for_other_macs_are_ignored(h):
    frame = bytearray(guest_echo_frame(GATEWAY, 1, 1))
    frame[0:6] = bytes.fromhex("020000000001")
    h.send(bytes(frame))
    assert h.out == [] and h.engine.counters["eth_not_for_us"] == 1


def test_spoofed_sources_are_dropped(h):
    h.send(guest_ip_frame(GATEWAY, 1, b"\x08\x00\xf7\xff\x00\x00\x00\x00", src=bytes([10, 0, 2, 16])))
    assert h.out == [] and h.engine.counters["ip_spoofed_source"] == 1


def test_bad_ip_checksum_and_unknown_protocols_are_counted(h):
    frame = bytearray(guest_echo_frame(GATEWAY, 1, 1))
    frame[14 + 8] ^= 0x10  # TTL changes, the header checksum no longer holds
    h.send(bytes(frame))
    h.send(guest_ip_frame(GATEWAY, 47, b"gre"))
    h.send(build_ethernet(GATEWAY_HW, GUEST_HW, ETH_P_LOCAL_EXPERIMENTAL, b"\x00" * 40))
    h.send(b"\x00" * 10)
    c = h.engine.counters
    assert (c["ip_checksum"], c["ip_unsupported_proto"], c["eth_unsupported_type"], c["eth_short"]) == (1, 1, 1, 1)
    assert h.out == []


def test_fragmented_echo_is_reassembled_and_overlaps_are_dropped(h):
    whole = guest_echo_frame(GATEWAY, 3, 4, b"p" * 64)[14:]
    payload = whole[20:]

    def frag(off, data, more, ident=5):
        hdr = bytearray(whole[:20])
        struct.pack_into("!HHH", hdr, 2, 20 + len(data), ident, (0x2000 if more else 0) | off // 8)
        hdr[10:12] = b"\x00\x00"
        struct.pack_into("!H", hdr, 10, checksum(bytes(hdr)))
        return frame_of(bytes(hdr) + data)

    h.send(frag(0, payload[:40], True))
    assert h.out == []
    h.send(frag(40, payload[40:], False))
    [(_ip, hdr, data)] = h.icmp_replies()
    assert (hdr.type, data) == (0, b"p" * 64)
    h.send(frag(0, payload[:40], True, ident=6))
    h.send(frag(32, payload[32:], False, ident=6))
    assert h.out == [] and h.engine.counters["ip_reassembly_dropped"] == 1


def test_tcp_without_a_stack_is_counted():
    h = Harness()
    if h.engine.tcp is not None:
        h.engine.tcp.close()
    h.engine.tcp = None  # as when voidbox.net.tcp_nat is missing
    h.send(guest_ip_frame(GATEWAY, 6, b"\x00" * 20))
    assert h.out == [] and h.engine.counters["tcp_dropped_no_stack"] == 1
    h.close()


@pytest.mark.parametrize("borrow", [False, True])
def test_tcp_frames_are_framed_in_place(borrow):
    """TCP builds its frames in one reused buffer (Engine.send_ip_buf): with borrow=False
    the engine hands out copies; with borrow=True, views its caller must use at once."""
    from voidbox.net.fastpath import tcp_checksum
    from voidbox.net.packets import IPPROTO_TCP, parse_ethernet, parse_ipv4
    from voidbox.net.tcp import ACK, RST, Segment, parse_segment
    from voidbox.net.tcp_nat import TcpNat  # noqa: F401  (the engine's TCP must exist)

    h = Harness()
    got: list[bytes] = []
    h.engine.send_frame = (lambda f: got.append(bytes(f))) if borrow else got.append
    h.engine.borrow = borrow
    try:
        for port in (7, 9):
            seg = Segment(40000 + port, port, 1000, 5000 + port, ACK, 1000)
            buf = bytearray(20)
            struct.pack_into("!HHIIBBHHH", buf, 0, seg.src_port, seg.dst_port, seg.seq,
                             seg.ack, 5 << 4, seg.flags, seg.window, 0, 0)
            struct.pack_into("!H", buf, 16, tcp_checksum(bytes([10, 0, 2, 15]), GATEWAY,
                                                         bytes(buf)))
            h.send(guest_ip_frame(GATEWAY, IPPROTO_TCP, bytes(buf)))
        assert len(got) == 2  # a RST for each unknown flow, each frame its own bytes
        for port, frame in zip((7, 9), got, strict=True):
            assert isinstance(frame, bytes)
            eth, payload = parse_ethernet(frame)
            assert eth.dst == GUEST_HW and eth.src == GATEWAY_HW
            ip, tcp = parse_ipv4(payload)
            assert ip.src == GATEWAY and tcp_checksum(ip.src, ip.dst, tcp) == 0
            rst = parse_segment(tcp)
            assert rst.flags == RST and rst.seq == 5000 + port and rst.src_port == port
    finally:
        h.close()


@pytest.mark.parametrize("verified", [False, True])
def test_offloaded_checksums_are_taken_when_the_frontend_vouches(verified):
    """A TAP with virtio_net_hdr hands over NEEDS_CSUM frames whose TCP and UDP checksum
    fields hold only the pseudo-header sum: with csum_verified they are accepted, without
    it they are bad checksums and dropped."""
    from voidbox.net.packets import IPPROTO_TCP

    h = Harness()
    try:
        tcp = bytearray(20)
        struct.pack_into("!HHIIBBHHH", tcp, 0, 40000, 7, 1000, 0, 5 << 4, 0x10, 1000,
                         0x1234, 0)  # an ACK for no flow, checksum field not the checksum
        h.engine.guest_frame(guest_ip_frame(GATEWAY, IPPROTO_TCP, bytes(tcp)), verified)
        # To a port of the DNS address that is not 53: counted, answered port unreachable.
        udp = bytearray(guest_udp_frame(bytes([10, 0, 2, 3]), 5353, 9, b"\x00" * 12))
        udp[14 + 20 + 6:14 + 20 + 8] = b"\x12\x34"
        h.engine.guest_frame(bytes(udp), verified)
        c = {**h.engine.counters, **h.engine.tcp.counters}
        if verified:
            assert c.get("tcp_bad_checksum", 0) == 0 and c.get("udp_checksum", 0) == 0
            assert c["tcp_rst_unknown_flow"] == 1  # it reached the TCP NAT
            assert c["udp_in"] == 1 and c["udp_dns_address_other_port"] == 1
        else:
            assert c["tcp_bad_checksum"] == 1 and c["udp_checksum"] == 1
            assert h.out == []
    finally:
        h.close()


def test_reassembled_datagrams_are_verified_even_if_the_last_fragment_was_vouched_for():
    """csum_verified describes one frame: a datagram rebuilt from fragments is checked."""
    from voidbox.net.packets import IPPROTO_UDP, build_ipv4_fragments, build_udp

    h = Harness()
    try:
        dns = bytes([10, 0, 2, 3])
        udp = bytearray(build_udp(bytes([10, 0, 2, 15]), dns, 5353, 9, b"x" * 64))
        udp[6:8] = b"\x12\x34"  # broken checksum
        first, last = build_ipv4_fragments(bytes([10, 0, 2, 15]), dns, IPPROTO_UDP,
                                           bytes(udp), 60, ident=7)
        h.engine.guest_frame(frame_of(first), True)
        h.engine.guest_frame(frame_of(last), True)
        assert h.engine.counters.get("ip_reassembled") == 1
        assert h.engine.counters.get("udp_checksum") == 1
    finally:
        h.close()


# ---------------------------------------------------------------- the fast path

def _relay_calls(engine) -> list:
    """Make the engine's relays record what it hands them instead of acting on it."""
    calls: list = []

    def recorder(name):
        def record(*args, **kw):
            calls.append((name, *(bytes(a) if isinstance(a, (memoryview, bytearray)) else a
                                  for a in args), *sorted(kw.items())))
        return record

    engine.tcp.close()
    engine.tcp = RecordingTcp(recorder("tcp"))
    engine.udp.guest_datagram = recorder("udp")
    engine.udp.unreachable = recorder("udp_unreachable")
    engine.dns.guest_query = recorder("dns")
    engine.icmp.guest_icmp = recorder("icmp")
    engine.icmp.local_echo6 = recorder("icmp6_local")
    engine.icmp.guest_icmp6 = recorder("icmp6")
    engine.icmp.beyond_scope6 = recorder("icmp6_beyond_scope")
    engine.udp.unreachable6 = recorder("udp6_unreachable")
    engine._dhcp = lambda eth_src, ip, payload: calls.append(("dhcp", eth_src, ip, bytes(payload)))
    engine._dhcp6 = lambda eth_src, src, data: calls.append(("dhcp6", eth_src, src, bytes(data)))
    return calls


class RecordingTcp:
    """A TCP NAT that records what the engine hands it."""

    def __init__(self, record):
        self.guest_segment = record

    def close(self):
        pass

    def flow_count(self):
        return 0

    active_flow_count = flow_count


def _tcp_frame(ihl_words: int = 5) -> bytes:
    return _ipv4_frame(IPPROTO_TCP, b"\x00" * 20 + b"data", ihl_words)


def _udp_frame(dst: bytes, sport: int, dport: int) -> bytes:
    from voidbox.net.packets import build_udp
    return _ipv4_frame(IPPROTO_UDP, build_udp(bytes([10, 0, 2, 15]), dst, sport, dport, b"query"),
                       dst=dst)


def _ipv4_frame(proto: int, payload: bytes, ihl_words: int = 5, dst: bytes = GATEWAY) -> bytes:
    """A guest frame to the gateway's MAC, with ihl_words - 5 words of IP options (NOPs)."""
    ihl = 4 * ihl_words
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl_words, 0, ihl + len(payload), 1,
                                   0, 64, proto, 0, bytes([10, 0, 2, 15]), dst))
    header += b"\x01" * (ihl - 20)
    struct.pack_into("!H", header, 10, checksum(bytes(header)))
    return build_ethernet(GATEWAY_HW, GUEST_HW, 0x0800, bytes(header) + payload)


FRAMES = {
    "tcp": lambda: _tcp_frame(),
    "tcp_ip_options": lambda: _tcp_frame(7),
    "udp": lambda: _udp_frame(GATEWAY, 40000, 7),
    "udp_dns": lambda: _udp_frame(bytes([10, 0, 2, 3]), 40000, 53),
    "udp_dhcp_ports": lambda: _udp_frame(GATEWAY, 68, 67),
    "icmp": lambda: guest_echo_frame(GATEWAY, 1, 1),
    "tcp6": lambda: guest_ip6_frame(GATEWAY6, IPPROTO_TCP, b"\x00" * 20 + b"data"),
    "tcp6_from_the_gateway_address": lambda: guest_ip6_frame(
        GATEWAY6, IPPROTO_TCP, b"\x00" * 20 + b"data", src=GATEWAY6),
    "udp6": lambda: guest_udp6_frame(GATEWAY6, 40000, 7, b"query"),
    "udp6_dns": lambda: guest_udp6_frame(DNS6, 40000, 53, b"query"),
    "udp6_link_local": lambda: guest_udp6_frame(GATEWAY6, 40000, 7, b"query", src=GUEST_LL6),
    "udp6_dhcp_to_the_router": lambda: guest_udp6_frame(ROUTER_LL6, 546, 547, b"query"),
    "udp6_mdns": lambda: guest_udp6_frame(MDNS6, 5353, 5353, b"query"),
    "echo6": lambda: guest_echo6_frame(GATEWAY6, 1, 1),
}
MDNS6 = bytes.fromhex("ff0200000000000000000000000000fb")  # multicast: nobody's flow
NOT_RELAYED = ("tcp6_from_the_gateway_address", "udp6_mdns")


def _dispatch(frame: bytes, fast: bool, verified: bool) -> tuple[list, dict]:
    """What one frame does to an engine whose relays record: (their calls, the counters)."""
    from voidbox.net import engine as engine_module
    with pytest.MonkeyPatch.context() as patch:
        if not fast:
            patch.setattr(engine_module, "guest_ipv4_split", lambda *_args: None)
            patch.setattr(engine_module, "guest_ipv6_split", lambda *_args: None)
        h = Harness()
        try:
            calls = _relay_calls(h.engine)
            h.engine.guest_frame(frame, verified)
            return calls, dict(h.engine.counters)
        finally:
            h.close()


@pytest.mark.parametrize("kind", sorted(FRAMES))
@pytest.mark.parametrize("verified", [False, True])
def test_the_fast_path_hands_the_relays_what_the_full_path_would(kind, verified):
    frame = FRAMES[kind]()
    fast = _dispatch(frame, True, verified)
    assert fast == _dispatch(frame, False, verified)
    # Each reached its relay, but a segment from the NAT's own address and multicast.
    assert len(fast[0]) == (0 if kind in NOT_RELAYED else 1), fast


def test_the_fast_path_takes_the_guests_tcp_and_udp(monkeypatch):
    """No Python-level parse of the Ethernet or IPv4 header for plain TCP and UDP."""
    from voidbox.net import engine as engine_module

    def never(*_args):
        raise AssertionError("the full path parsed a frame the fast path takes")

    monkeypatch.setattr(engine_module, "parse_ethernet", never)
    calls, counters = _dispatch(_tcp_frame(), True, False)
    assert [c[0] for c in calls] == ["tcp"] and counters["tcp_in"] == 1
    calls, counters = _dispatch(FRAMES["udp"](), True, False)
    assert calls == [("udp", GATEWAY, 40000, 7, b"query", bytes(FRAMES["udp"]()[14:]))]
    assert counters == {"frames_from_guest": 1, "udp_in": 1}
    calls, counters = _dispatch(FRAMES["tcp6"](), True, False)
    assert [c[0] for c in calls] == ["tcp"] and counters["tcp6_in"] == 1


HEADERS_END = 14 + 40 + 20  # Ethernet, IPv6 (longer than IPv4 with the options used here), TCP
IP_FLAGS_AT = 14 + 6  # the IPv4 flags and the fragment offset's high bits


def _mutated(base: bytes, edits: list[tuple[int, int]], cut: int, fix_checksum: bool) -> bytes:
    """base with bytes replaced and its end cut; fix_checksum: an IPv4 header's checksum
    made right again, so the edits reach the checks behind it (IPv6 has none)."""
    frame = bytearray(base)
    for index, value in edits:
        frame[index % len(frame)] = value
    ihl = (frame[14] & 0x0F) * 4
    if fix_checksum and frame[12:14] == b"\x08\x00" and 20 <= ihl <= len(frame) - 14:
        frame[24:26] = b"\0\0"
        struct.pack_into("!H", frame, 24, checksum(bytes(frame[14:14 + ihl])))
    return bytes(frame[:max(0, len(frame) - cut)])


@settings(max_examples=1000, deadline=None)
@given(kind=st.sampled_from(sorted(FRAMES)),
       edits=st.lists(st.tuples(st.sampled_from(range(HEADERS_END)), st.integers(0, 255)),
                      max_size=3),
       flags=st.sampled_from([None, 0x20, 0x40, 0x60, 0x00, 0x01, 0x80]),
       cut=st.one_of(st.just(0), st.integers(0, 30)), fix=st.booleans(), verified=st.booleans())
def test_the_fast_path_and_the_full_path_agree_on_hostile_frames(kind, edits, flags, cut, fix,
                                                                 verified):
    """Bytes changed anywhere in the headers, frames cut short: the engine with its fast
    path hands its relays exactly what the full path alone would, and counts the same."""
    if flags is not None:  # MF, DF, the reserved bit, an offset: few values tell them apart
        edits = [*edits, (IP_FLAGS_AT, flags)]
    frame = _mutated(FRAMES[kind](), edits, cut, fix)
    assert _dispatch(frame, True, verified) == _dispatch(frame, False, verified)


def test_every_nat_keeps_its_freed_heap(monkeypatch):
    """Whoever runs the NAT (net run, a VM's card, net serve) builds an Engine: it tells the
    allocator to keep what a turn's batches free (see keep_freed_heap's test)."""
    from voidbox.net import engine, fastpath

    calls = []
    monkeypatch.setattr(fastpath, "keep_freed_heap", lambda *args: calls.append(args) or True)
    h = Harness()
    assert calls == [(engine.KEEP_FREED_HEAP, engine.HEAP_MMAP_THRESHOLD)]
    h.close()
