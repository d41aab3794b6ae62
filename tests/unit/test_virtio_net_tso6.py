"""IPv6 TCP segmentation offload on the virtio-net card (virtio 1.2 §5.1.3, §5.1.6.2,
§5.1.6.4): HOST_TSO6 (a guest's GSO_TCPV6 frames to the backend) and GUEST_TSO6 (GSO_TCPV6
frames to the guest, from receive() and from the stream port), each decided apart from
its IPv4 twin.

Every test runs on both ring twins (the `impl` fixture); the stream tests on both stream
twins too (test_rxstream's `stream_cls`), and the bulk test through the card's own stream
port (compiled unless VOIDBOX_PURE=1). Checksums are checked with this file's own RFC 1071
sum, never the one under test.
"""

from __future__ import annotations

import hashlib
import random
import struct
import time

import pytest

from tests.unit import test_rxstream
from tests.unit.test_rxstream import frames as chain_frames
from tests.unit.test_rxstream import merged_frames
from tests.unit.test_virtio_net import (
    ALL,
    GUEST_OFFLOADS,
    MAC,
    QSIZE,
    RX_BUF,
    Nic,
    Recorder,
    tcp_frame,
)
from tests.unit.test_virtio_net_tcp import (
    FEATURES,
    NIC_MAC,
    TX_SLOT,
    BulkRig,
    GuestEndpoint,
    HostServer,
    payload,
)
from voidbox.layout import MiB
from voidbox.net.fastpath import build_ipv6_tcp
from voidbox.net.ipv6 import ip6_to_bytes
from voidbox.net.packets import ETH_P_IPV6, IPPROTO_TCP
from voidbox.net.tcp import ACK, FIN, PSH, SYN, TcpFlow, TcpState, parse_segment
from voidbox.virtio import _netrx_py
from voidbox.virtio.net import (
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_HDR,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_LEN,
    segment_tcp,
    tcp_super_frame,
)

GUEST6 = ip6_to_bytes("fd00::100")
GATEWAY6 = ip6_to_bytes("fd00::2")  # the host's ::1 through the NAT
HOST_TO_GUEST_ETH6 = MAC + bytes.fromhex("525500000202") + b"\x86\xdd"
GUEST_TO_HOST_ETH6 = bytes.fromhex("525500000202") + MAC + b"\x86\xdd"
HOST_TSO6 = 1 << VIRTIO_NET_F_HOST_TSO6
GUEST_TSO6 = 1 << VIRTIO_NET_F_GUEST_TSO6
TSO6_ALL = ALL | HOST_TSO6 | GUEST_OFFLOADS | GUEST_TSO6  # what a Linux guest acks
MSS6 = 1500 - 60  # the card's MTU less IPv6 and TCP headers
L4 = 14 + 40  # csum_start of an IPv6 TCP frame
TCP_CWR = 0x80
# test_rxstream's fixtures: a loopback socket pair to peek, and both stream twins.
pair = test_rxstream.pair
stream_cls = test_rxstream.stream_cls


# ---- the test's own checksums (RFC 1071, RFC 8200 §8.1) -------------------------------------

def ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def pseudo6(src: bytes, dst: bytes, length: int) -> int:
    return ones_sum(src + dst + struct.pack("!I3xB", length, IPPROTO_TCP))


def tcp6_valid(packet: bytes) -> bool:
    """The TCP checksum of an IPv6 packet (TCP right after the fixed header) is right."""
    tcp = packet[40:]
    total = pseudo6(packet[8:24], packet[24:40], len(tcp)) + ones_sum(tcp)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def finish_partial(frame: bytes) -> bytes:
    """What the guest does with NEEDS_CSUM at (54, 16): sum from csum_start, the field
    (holding the pseudo-header sum) included, and store the complement there."""
    whole = bytearray(frame)
    struct.pack_into("!H", whole, L4 + 16, ~ones_sum(bytes(frame[L4:])) & 0xFFFF)
    return bytes(whole)


def tcp6_frame(data: bytes, src=GATEWAY6, dst=GUEST6, eth=HOST_TO_GUEST_ETH6, seq=0xFFFF_F000,
               flags=ACK | PSH | FIN) -> bytes:
    """An Ethernet + IPv6 + TCP frame with a whole, right checksum (as the NAT builds it)."""
    out = bytearray(60 + len(data))
    n = build_ipv6_tcp(out, src, dst, 0, 80, 40000, seq, 5, flags, 1000, b"", data)
    return eth + bytes(out[:n])


def guest_tso6_frame(data: bytes) -> bytes:
    """A guest's GSO_TCPV6 frame as Linux writes it: the pseudo-header sum in the field."""
    frame = bytearray(tcp6_frame(data, GUEST6, GATEWAY6, GUEST_TO_HOST_ETH6, seq=1,
                                 flags=ACK | PSH))
    struct.pack_into("!H", frame, L4 + 16, pseudo6(GUEST6, GATEWAY6, 20 + len(data)))
    return bytes(frame)


def tso6_header(gso_size=1428, hdr_len=74, csum_start=L4, csum_offset=16,
                gso_type=VIRTIO_NET_HDR_GSO_TCPV6, flags=VIRTIO_NET_HDR_F_NEEDS_CSUM) -> bytes:
    return VIRTIO_NET_HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, 0)


class Tso4Only(Recorder):
    accepts_tso6 = False


class Tso6WithoutCsum(Recorder):
    accepts_partial_checksums = False  # HOST_TSO6 requires CSUM (§5.1.3.1)


# ---- what is offered, acked and used ------------------------------------------------------

def test_tso6_is_offered_beside_tso4_and_never_without_its_checksum(impl, memory):
    guest_bits = 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4 | GUEST_TSO6
    features = Nic(impl, memory).device.features
    assert features & (HOST_TSO6 | guest_bits) == HOST_TSO6 | guest_bits
    assert features & (1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_HOST_TSO4)
    tso4_only = Nic(impl, memory, backend=Tso4Only()).device.features
    assert tso4_only & (1 << VIRTIO_NET_F_HOST_TSO4) and not tso4_only & HOST_TSO6
    without_csum = Nic(impl, memory, backend=Tso6WithoutCsum()).device.features
    assert not without_csum & (1 << VIRTIO_NET_F_CSUM | HOST_TSO6 | 1 << VIRTIO_NET_F_HOST_TSO4)


ACKS = {
    # name: (acked beyond ALL, rx_offloads().tso4, .tso6)
    "TSO4 and TSO6": (GUEST_OFFLOADS | GUEST_TSO6, True, True),
    "TSO4 only": (GUEST_OFFLOADS, True, False),
    "TSO6 only": (1 << VIRTIO_NET_F_GUEST_CSUM | GUEST_TSO6, False, True),
    # §5.1.3.1 forbids a TSO without GUEST_CSUM: the device sends no GSO frame at all.
    "TSO6 without GUEST_CSUM": (GUEST_TSO6 | 1 << VIRTIO_NET_F_GUEST_TSO4, False, False),
}


@pytest.mark.parametrize("acked", sorted(ACKS))
def test_v4_and_v6_gso_are_decided_apart(impl, memory, acked):
    extra, tso4, tso6 = ACKS[acked]
    nic = Nic(impl, memory, features=ALL | HOST_TSO6 | extra, rx_buffers=QSIZE)
    offloads = nic.device.rx_offloads()
    assert (offloads.tso4, offloads.tso6) == (tso4, tso6)
    assert nic.counters["negotiated_guest_tso6"] == bool(extra & GUEST_TSO6)
    assert nic.counters["negotiated_host_tso6"] == 1
    assert nic.counters["negotiated_guest_csum"] == bool(extra & 1 << VIRTIO_NET_F_GUEST_CSUM)
    data6 = bytes(range(256)) * 20  # 5120 bytes: 4 segments of 1440 at MTU 1500
    data4 = bytes(range(255, -1, -1)) * 20
    assert nic.backend.deliver(tcp6_frame(data6))
    assert nic.backend.deliver(tcp_frame(data4))
    out = nic.received()
    v6 = [(h, f) for h, f in out if f[12:14] == b"\x86\xdd"]
    v4 = [(h, f) for h, f in out if f[12:14] == b"\x08\x00"]
    assert len(v6) == (1 if tso6 else 4) and len(v4) == (1 if tso4 else 4)
    if tso6:
        ((hdr, frame),) = v6
        assert hdr[1] == VIRTIO_NET_HDR_GSO_TCPV6
    else:
        assert all(h[1] == 0 and len(f) <= 1514 for h, f in v6)
    if tso4:
        assert v4[0][0][1] == VIRTIO_NET_HDR_GSO_TCPV4
    else:
        assert all(h[1] == 0 and len(f) <= 1514 for h, f in v4)
    assert nic.counters["rx_gso6_frames"] == int(tso6)
    assert nic.counters["rx_gso_frames"] == int(tso6) + int(tso4)
    assert nic.counters["rx_gso_segmented"] == int(not tso6) + int(not tso4)


# ---- guest -> backend: HOST_TSO6 ----------------------------------------------------------

def test_a_guest_tso6_frame_reaches_the_backend_as_one_segment(impl, memory):
    nic = Nic(impl, memory, features=TSO6_ALL)
    data = random.Random(6).randbytes(60000)
    big = guest_tso6_frame(data)
    total = VIRTIO_NET_HDR_LEN + len(big)
    nic.send(big, tso6_header(), chain=[4096] * 14 + [total - 4096 * 14])
    ((sent, verified),) = nic.backend.sent
    # Untouched, and vouched for: its checksum is the guest's to offload, at its own header.
    assert sent == big and verified
    assert parse_segment(memoryview(sent)[L4:]).payload == data
    assert (nic.counters["tx_tso_frames"], nic.counters["tx_tso6_frames"]) == (1, 1)
    assert nic.counters["tx_csum_offloaded"] == 1


def v4_frame_with_v6_gso() -> bytes:
    return tcp_frame(b"4" * 3000)


HOSTILE6 = {
    "gso_size 0": (tso6_header(gso_size=0), None),
    "gso_size the frame's length": (tso6_header(gso_size=14 + 60 + 3000), None),
    "gso_size past the frame": (tso6_header(gso_size=60000), None),
    "hdr_len past the frame": (tso6_header(hdr_len=9000), None),
    "without NEEDS_CSUM": (tso6_header(flags=0), None),
    "ECN not negotiated": (tso6_header(gso_type=VIRTIO_NET_HDR_GSO_TCPV6 | VIRTIO_NET_HDR_GSO_ECN),
                           None),
    "the frame is IPv4": (tso6_header(csum_start=34), v4_frame_with_v6_gso),
    "the frame is IPv6 UDP": (tso6_header(), lambda: udp6_frame(3000)),
    "TCP header truncated": (tso6_header(gso_size=4, hdr_len=0),
                             lambda: guest_tso6_frame(b"x" * 3000)[:L4 + 18]),
    "payload length past the frame": (tso6_header(),
                                      lambda: guest_tso6_frame(b"x" * 3000)[:L4 + 1000]),
    "a jumbogram's payload length 0": (tso6_header(), lambda: patch(guest_tso6_frame(b"j" * 3000), 18, b"\0\0")),
    "an extension header first": (tso6_header(), lambda: patch(guest_tso6_frame(b"e" * 3000), 20, b"\0")),
    "csum_start not the TCP header": (tso6_header(csum_start=34), None),
    "csum_offset not TCP's": (tso6_header(csum_offset=6), None),
    "TCP data offset below 5": (tso6_header(),
                                lambda: patch(guest_tso6_frame(b"d" * 3000), L4 + 12, b"\x40")),
}


def patch(frame: bytes, at: int, data: bytes) -> bytes:
    return frame[:at] + data + frame[at + len(data):]


def udp6_frame(n: int) -> bytes:
    frame = bytearray(guest_tso6_frame(b"u" * n))
    frame[20] = 17  # next header UDP: not the TCP segment the header claims
    return bytes(frame)


@pytest.mark.parametrize("name", sorted(HOSTILE6))
def test_hostile_tso6_headers_are_dropped_and_the_queue_keeps_serving(impl, memory, name):
    nic = Nic(impl, memory, features=TSO6_ALL)
    header, make = HOSTILE6[name]
    frame = make() if make else guest_tso6_frame(b"h" * 3000)
    used = nic.send(frame, header)
    assert len(used) == 1 and nic.backend.sent == []
    drops = {k: v for k, v in nic.counters.items() if k.startswith("tx_drop_")}
    assert sum(drops.values()) == 1, drops
    assert nic.counters["tx_tso6_frames"] == 0
    good = guest_tso6_frame(b"g" * 3000)
    nic.send(good, tso6_header())
    assert nic.backend.sent == [(good, True)] and nic.counters["tx_tso6_frames"] == 1


@pytest.mark.parametrize("features", ["TSO4 acked, not TSO6", "nothing acked"])
def test_a_tso6_frame_the_driver_did_not_ack_is_dropped(impl, memory, features):
    acked = ALL if features == "TSO4 acked, not TSO6" else ALL & ~(1 << VIRTIO_NET_F_HOST_TSO4)
    nic = Nic(impl, memory, features=acked)
    nic.send(guest_tso6_frame(b"n" * 3000), tso6_header())
    assert nic.backend.sent == [] and nic.counters["tx_drop_gso_not_negotiated"] == 1
    # A GSO_TCPV4 header on an IPv6 frame is no way round it either.
    nic2 = Nic(impl, memory, features=TSO6_ALL)
    nic2.send(guest_tso6_frame(b"n" * 3000), tso6_header(gso_type=VIRTIO_NET_HDR_GSO_TCPV4))
    assert nic2.backend.sent == [] and nic2.counters["tx_drop_bad_gso"] == 1


# ---- backend -> guest: GUEST_TSO6 from receive() ------------------------------------------

def test_a_v6_super_frame_goes_as_one_gso_tcpv6_frame(impl, memory):
    nic = Nic(impl, memory, features=TSO6_ALL, rx_buffers=QSIZE)
    data = bytes(range(256)) * 39 + b"end"  # 9987 bytes: 6 segments of 1440 and a tail
    assert nic.backend.deliver(tcp6_frame(data) + b"\0" * 6)  # Ethernet padding: cut off
    ((hdr, frame),) = nic.received()
    assert hdr[:6] == (VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV6, 74, MSS6, L4, 16)
    assert len(frame) == 14 + 60 + len(data)
    assert struct.unpack_from("!H", frame, L4 + 16)[0] == pseudo6(GATEWAY6, GUEST6, 20 + len(data))
    assert tcp6_valid(finish_partial(frame)[14:])
    seg = parse_segment(memoryview(frame)[L4:])
    assert seg.payload == data and seg.flags == ACK | PSH | FIN
    assert nic.counters["rx_gso6_frames"] == 1 and nic.counters["rx_csum_offloaded"] == 1


@pytest.mark.parametrize("acked", ["GUEST_CSUM and TSO4", "no guest offloads"])
def test_a_v6_super_frame_is_cut_for_a_guest_without_tso6(impl, memory, acked):
    features = ALL | GUEST_OFFLOADS if acked == "GUEST_CSUM and TSO4" else ALL
    nic = Nic(impl, memory, features=features, rx_buffers=QSIZE)
    data = random.Random(9).randbytes(9987)
    assert nic.backend.deliver(tcp6_frame(data, flags=ACK | PSH | FIN | TCP_CWR))
    out = nic.received()
    valid = VIRTIO_NET_HDR_F_DATA_VALID if acked == "GUEST_CSUM and TSO4" else 0
    assert [h for h, _f in out] == [(valid, 0, 0, 0, 0, 0, 1)] * 7
    assert all(len(f) <= 1514 for _h, f in out)
    segs = []
    for _h, frame in out:
        packet = frame[14:]
        assert struct.unpack_from("!H", packet, 4)[0] == len(packet) - 40  # payload length
        assert tcp6_valid(packet)
        segs.append(parse_segment(memoryview(packet)[40:]))
    assert [len(s.payload) for s in segs] == [MSS6] * 6 + [len(data) - 6 * MSS6]
    assert b"".join(s.payload for s in segs) == data
    assert [s.seq for s in segs] == [(0xFFFF_F000 + i * MSS6) & 0xFFFFFFFF for i in range(7)]
    assert [s.flags for s in segs] == ([ACK | TCP_CWR] + [ACK] * 5 + [ACK | PSH | FIN])
    assert nic.counters["rx_gso_segmented"] == 1 and nic.counters["rx_gso_frames"] == 0


def test_the_v6_segmenter_on_its_own():
    data = random.Random(3).randbytes(4000)
    frame = tcp6_frame(data, seq=0xFFFF_FF00, flags=ACK | PSH)
    layout = tcp_super_frame(frame, 1500)
    assert layout == (True, 40, 20, 40 + 20 + 4000)
    segs = segment_tcp(frame, layout, 1000)
    assert [len(s) for s in segs] == [14 + 60 + 1000] * 4
    for i, seg in enumerate(segs):
        assert bytes(seg[:14]) == frame[:14] and bytes(seg[14 + 8:14 + 40]) == frame[14 + 8:14 + 40]
        assert struct.unpack_from("!H", seg, 18)[0] == 1020
        assert tcp6_valid(bytes(seg[14:]))
        s = parse_segment(memoryview(bytes(seg))[L4:])
        assert s.seq == (0xFFFF_FF00 + 1000 * i) & 0xFFFFFFFF and s.ack == 5
        assert s.payload == data[1000 * i:1000 * (i + 1)]
        assert s.flags == (ACK | PSH if i == 3 else ACK)
    # Not super-frames: within the MTU, an extension header, a length past the frame.
    assert tcp_super_frame(tcp6_frame(b"s" * 1400), 1500) is None
    assert tcp_super_frame(patch(frame, 20, b"\0"), 1500) is None
    assert tcp_super_frame(frame[:-1], 1500) is None


def test_a_v6_gso_frame_waiting_is_dropped_once_the_ack_changes(impl, memory):
    nic = Nic(impl, memory, features=TSO6_ALL, rx_buffers=0)
    assert nic.backend.deliver(tcp6_frame(b"w" * 5000))  # backlogged, GSO_TCPV6 header
    nic.device.acked_features = ALL | GUEST_OFFLOADS  # TSO4 still, TSO6 no longer
    nic.post(QSIZE)
    assert nic.received() == []
    assert nic.counters["rx_drop_offload_not_negotiated"] == 1


def test_a_backend_making_offloaded_frames_is_told_tso6_only_as_far_as_acked(impl, memory):
    class Tap(Recorder):
        def __init__(self):
            super().__init__()
            self.calls = []

        def set_guest_offloads(self, csum, tso4, tso6):
            self.calls.append((csum, tso4, tso6))

    def told(features):
        nic = Nic(impl, memory, features=features, backend=Tap())
        return nic.backend.calls[-1]  # on activation, after the reset of negotiation

    assert told(TSO6_ALL) == (True, True, True)
    assert told(ALL | GUEST_OFFLOADS) == (True, True, False)
    assert told(ALL | 1 << VIRTIO_NET_F_GUEST_CSUM | GUEST_TSO6) == (True, False, True)
    assert told(ALL | GUEST_TSO6) == (False, False, False)  # no GUEST_CSUM: none


# ---- backend -> guest: the stream port's IPv6 frames ----------------------------------------

def burst6(stream, sock, budget=1 << 20, mss=MSS6, seq=0xFFFF_FF00):
    return stream.send_tcp_stream(sock.fileno(), HOST_TO_GUEST_ETH6, GATEWAY6, GUEST6, 80,
                                  40000, seq, 777, 500, mss, budget, 9)


def check_stream6(frames_out, data, mss=MSS6, gso=True, partial=True, seq=0xFFFF_FF00):
    """Each IPv6 frame as the guest sees it: its header, lengths and (finished) checksum
    right, sequence numbers consecutive, PSH on the last only; -> the frames' payload sizes."""
    got, sizes = b"", []
    for i, (hdr, frame, _nbuf) in enumerate(frames_out):
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, _n = hdr
        assert frame[:14] == HOST_TO_GUEST_ETH6
        packet = frame[14:]
        n = len(packet) - 60
        assert packet[0] >> 4 == 6 and packet[6] == IPPROTO_TCP
        assert struct.unpack_from("!H", packet, 4)[0] == 20 + n
        assert (packet[8:24], packet[24:40]) == (GATEWAY6, GUEST6)
        if partial:
            assert (flags, hdr_len, csum_start, csum_offset) == (VIRTIO_NET_HDR_F_NEEDS_CSUM,
                                                                 74, L4, 16)
            assert struct.unpack_from("!H", packet, 56)[0] == pseudo6(GATEWAY6, GUEST6, 20 + n)
            if gso and n > mss:
                assert (gso_type, gso_size) == (VIRTIO_NET_HDR_GSO_TCPV6, mss)
            else:
                assert (gso_type, gso_size) == (0, 0)
            packet = finish_partial(frame)[14:]
        else:
            assert hdr[:6] == (0, 0, 0, 0, 0, 0) and n <= mss
        assert tcp6_valid(packet)
        seg = parse_segment(memoryview(packet)[40:])
        assert seg.seq == seq and seg.ack == 777 and seg.flags == ACK | (
            PSH if i == len(frames_out) - 1 else 0)
        seq = (seq + n) & 0xFFFFFFFF
        got += seg.payload
        sizes.append(n)
    assert got == data
    return sizes


def test_v6_stream_frames_with_guest_tso6_are_gso_tcpv6(impl, memory, stream_cls, pair):
    near, far = pair
    nic = Nic(impl, memory, features=TSO6_ALL, rx_buffers=QSIZE, rx_len=8192)
    data = random.Random(1).randbytes(100_000)
    far.sendall(data)
    cap = (_netrx_py.MAX_GSO_PAYLOAD6 // MSS6) * MSS6  # 45 segments
    assert 14 + 60 + cap <= 14 + 20 + 65535  # no longer than the largest IPv4 frame
    # 16 buffers of 8 KiB: a frame of 45 segments over 8 of them, the rest in one more.
    assert burst6(stream_cls(nic.device), near)[:3] == (len(data), len(data), 2)
    out = merged_frames(nic)
    assert check_stream6(out, data) == [cap, len(data) - cap]
    assert [n for _h, _f, n in out] == [8, 5]
    c = nic.counters
    assert (c["rx_gso_frames"], c["rx_gso6_frames"], c["rx_csum_offloaded"]) == (2, 2, 2)
    assert c["rx_bytes"] == len(data) + 2 * 74 and c["rx_stream_bytes"] == len(data)


STREAM_ACKS = {
    "TSO4 only": (ALL | GUEST_OFFLOADS, True),  # NEEDS_CSUM, but no IPv6 GSO
    "GUEST_CSUM alone": (ALL | 1 << VIRTIO_NET_F_GUEST_CSUM, True),
    "none": (ALL, False),
    "TSO6 without GUEST_CSUM": (ALL | GUEST_TSO6, False),  # §5.1.3.1: no offload used
}


@pytest.mark.parametrize("acked", sorted(STREAM_ACKS))
def test_v6_stream_frames_without_guest_tso6_stay_mss_sized(
        impl, memory, stream_cls, pair, acked):
    near, far = pair
    features, partial = STREAM_ACKS[acked]
    nic = Nic(impl, memory, features=features, rx_buffers=QSIZE, rx_len=RX_BUF)
    data = random.Random(2).randbytes(10243)
    far.sendall(data)
    assert burst6(stream_cls(nic.device), near)[:3] == (len(data), len(data), 8)
    out = merged_frames(nic)
    sizes = check_stream6(out, data, gso=False, partial=partial)
    assert sizes == [MSS6] * 7 + [len(data) - 7 * MSS6]
    assert all(len(f) <= 1514 for _h, f, _n in out)
    assert nic.counters["rx_gso_frames"] == 0 and nic.counters["rx_merged_frames"] == 0


def test_v6_stream_frames_without_mrg_rxbuf_fill_one_big_chain(
        impl, memory, stream_cls, pair):
    near, far = pair
    nic = Nic(impl, memory, features=TSO6_ALL & ~(1 << VIRTIO_NET_F_MRG_RXBUF), rx_buffers=0)
    for _ in range(2):
        nic.rx.add_buffers(writable=[VIRTIO_NET_HDR_LEN] + [17000] * 4)
    nic.transport.handle_notify(0)
    data = random.Random(4).randbytes(30_000)
    far.sendall(data)
    assert burst6(stream_cls(nic.device), near)[:3] == (len(data), len(data), 1)
    out = chain_frames(nic)  # one chain of five descriptors, read in order
    assert [h[6] for h, _f in out] == [1]
    assert check_stream6([(h, f, 1) for h, f in out], data) == [len(data)]


def test_a_v6_stream_never_overflows_a_chain_too_small_for_its_headers(
        impl, memory, stream_cls, pair):
    """A chain with room for IPv4's headers and a byte, not for IPv6's: returned unused."""
    near, far = pair
    nic = Nic(impl, memory, features=TSO6_ALL, rx_buffers=0)
    small = nic.rx.add_buffers(writable=[_netrx_py.FRAME_HEADROOM6])
    good = nic.rx.add_buffers(writable=[4096])
    nic.transport.handle_notify(0)
    far.sendall(b"q" * 1000)
    assert burst6(stream_cls(nic.device), near)[:3] == (1000, 1000, 1)
    used = dict(nic.rx.collect())
    assert used[small] == 0 and used[good] == 74 + 12 + 1000
    assert nic.counters["rx_buffer_too_small"] == 1


# ---- the NAT behind the card, over IPv6, both ways ----------------------------------------

# The guest's TSO segments: 44 MSS, what fits the rig's TX slots (sized for IPv4's 44 x 1460).
TSO6_PAYLOAD = 44 * MSS6
assert VIRTIO_NET_HDR_LEN + 14 + 60 + TSO6_PAYLOAD <= TX_SLOT
TSO6_FEATURES = FEATURES | HOST_TSO6 | GUEST_OFFLOADS | GUEST_TSO6
BULK6 = 8 * MiB


class BulkRig6(BulkRig):
    """test_virtio_net_tcp's BulkRig with the guest at fd00::100 talking to fd00::2 (the
    host's ::1): IPv6 frames both ways, GSO_TCPV6 when acked."""

    def connect(self, port: int, data: bytes = b"", eof: bool = True) -> GuestEndpoint:
        flow, acts = TcpFlow.connect(40000, port, random.Random(port).getrandbits(32),
                                     time.monotonic(), mss=MSS6, wscale=7)
        self.endpoint = GuestEndpoint(flow, data, eof)
        self.endpoint.handle(acts)
        return self.endpoint

    def _frame_of(self, seg) -> tuple[bytes, bytes]:
        out = bytearray(60 + 40 + len(seg.payload))
        n = build_ipv6_tcp(out, GUEST6, GATEWAY6, 0, seg.src_port, seg.dst_port, seg.seq,
                           seg.ack, seg.flags, seg.window,
                           seg.options() if seg.flags & SYN else b"", seg.payload)
        frame = bytearray(self.gateway_mac + NIC_MAC + b"\x86\xdd") + out[:n]
        size = len(seg.payload)
        if not size:
            return bytes(VIRTIO_NET_HDR_LEN), bytes(frame)
        # Checksum offload as a Linux guest does it: only the pseudo-header sum in the field.
        struct.pack_into("!H", frame, L4 + 16, pseudo6(GUEST6, GATEWAY6, n - 40))
        self.stats["tx_csum"] += 1
        if size > MSS6:
            self.stats["tx_tso"] += 1
            return tso6_header(gso_size=MSS6), bytes(frame)
        return VIRTIO_NET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, L4, 16, 0), bytes(frame)

    def _to_guest(self, frame: bytes, now: float, header: tuple = (0,) * 7) -> None:
        assert frame[:12] == NIC_MAC + self.gateway_mac
        assert struct.unpack_from("!H", frame, 12)[0] == ETH_P_IPV6
        packet = frame[14:]
        assert packet[6] == IPPROTO_TCP and struct.unpack_from("!H", packet, 4)[0] == len(packet) - 40
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, _nbuf = header
        if gso_type:
            # As virtio_net_hdr_to_skb: GSO_TCPV6 with NEEDS_CSUM, gso_size the MSS, more
            # than one segment's payload, hdr_len over the headers.
            assert gso_type == VIRTIO_NET_HDR_GSO_TCPV6 and flags & VIRTIO_NET_HDR_F_NEEDS_CSUM
            assert gso_size == MSS6 and hdr_len == 74 and len(packet) - 60 > MSS6
            self.stats["rx_gso"] += 1
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            assert (csum_start, csum_offset) == (L4, 16)
            assert struct.unpack_from("!H", packet, 56)[0] == pseudo6(packet[8:24], packet[24:40],
                                                                     len(packet) - 40)
            packet = finish_partial(frame)[14:]
            self.stats["rx_csum_partial"] += 1
        elif flags:
            assert flags == VIRTIO_NET_HDR_F_DATA_VALID and not gso_type
            self.stats["rx_csum_valid"] += 1
        assert tcp6_valid(packet)
        self.endpoint.receive(parse_segment(memoryview(packet)[40:]), now)


@pytest.fixture
def rig6(impl, memory):
    rig = BulkRig6(impl, memory, features=TSO6_FEATURES)
    rig.arp()  # the gateway's MAC, the same for both families
    yield rig
    rig.close()


def test_host_to_guest_bulk_over_ipv6_in_gso_tcpv6_frames(impl, rig6):
    down = payload(BULK6)
    server = HostServer("send", down, host="::1")
    ep = rig6.connect(server.port, eof=False)
    rig6.run(lambda: ep.flow.fin_received)
    ep.eof = True
    rig6.run(lambda: ep.flow.state in (TcpState.TIME_WAIT, TcpState.CLOSED))
    assert (ep.received, ep.hash.hexdigest()) == server.join() == \
        (BULK6, hashlib.sha256(down).hexdigest())
    rig6.assert_counters_consistent()
    dev, nat = rig6.device.counters, rig6.backend.counters
    assert (dev["negotiated_guest_tso6"], dev["negotiated_guest_csum"]) == (1, 1)
    assert nat["tcp6_flows_opened"] == 1 and nat["tcp_bytes_to_guest"] == BULK6
    # Through the card's stream port (socket -> RX buffers), in GSO_TCPV6 frames of many
    # segments each.
    assert dev["rx_stream_bytes"] == BULK6, dict(dev)
    stream_cap = (_netrx_py.MAX_GSO_PAYLOAD6 // MSS6) * MSS6  # one frame's most payload
    assert dev["rx_gso6_frames"] == dev["rx_gso_frames"] >= BULK6 // stream_cap, dict(dev)
    assert dev["rx_stream_frames"] <= BULK6 // (16 * MSS6), dict(dev)


def test_guest_to_host_bulk_over_ipv6_in_tso6_segments(impl, rig6):
    up = payload(BULK6)
    sink = HostServer("recv", host="::1")
    ep = rig6.connect(sink.port, up, eof=True)
    rig6.run(lambda: ep.flow.state is not TcpState.SYN_SENT)
    ep.flow.snd_mss = TSO6_PAYLOAD  # the guest's TSO: one 64 KiB segment per frame
    rig6.run(lambda: ep.flow.fin_received and ep.consumed == BULK6)
    rig6.run(lambda: ep.flow.state in (TcpState.TIME_WAIT, TcpState.CLOSED))
    assert sink.join() == (BULK6, hashlib.sha256(up).hexdigest())
    rig6.assert_counters_consistent()
    dev, nat = rig6.device.counters, rig6.backend.counters
    assert dev["negotiated_host_tso6"] == 1
    assert nat["tcp6_flows_opened"] == 1 and nat["tcp_bytes_to_host"] == BULK6
    # Nearly every frame one TSO6 segment, taken by the NAT as one host send.
    assert dev["tx_tso6_frames"] == dev["tx_tso_frames"] >= BULK6 // TSO6_PAYLOAD - 1
