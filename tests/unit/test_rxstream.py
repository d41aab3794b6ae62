"""The virtio-net card's stream port (voidbox/virtio/_netrx_py.py and voidbox/_netrx.pyx):
host TCP data peeked from a real socket into RX chains the driver mock posted.

Both stream twins run over both ring twins (the compiled stream hands chains of the pure
ring to the pure path). Every frame is checked as the guest would: a clean virtio_net_hdr,
Ethernet, IPv4 and TCP headers with valid checksums, consecutive sequence numbers, PSH on
the last segment of a burst, and the payload bytes in order. With the guest offloads
acked the header must say what the frame is (NEEDS_CSUM with the pseudo-header sum in the
field, GSO_TCPV4 with the guest's MSS, num_buffers over mergeable buffers), and without
them it must say nothing.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios

import pytest

from tests.twins import load_compiled
from tests.unit.test_virtio_net import ALL, GUEST_OFFLOADS, QSIZE, Nic, RecyclingGuest
from tests.virtio_driver import DATA_ADDR, Driver
from voidbox.net.fastpath import inet_checksum, tcp_checksum
from voidbox.net.packets import pseudo_header_sum
from voidbox.net.tcp import ACK, PSH, parse_segment
from voidbox.virtio import _netrx_py
from voidbox.virtio.mmio import VIRTIO_MMIO_STATUS
from voidbox.virtio.net import (
    RX_QUEUE,
    TX_QUEUE,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_HDR,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_LEN,
)

SO_PEEK_OFF = getattr(socket, "SO_PEEK_OFF", 42)
ETH = bytes.fromhex("020000abcdef" "52550a000202" "0800")
SRC, DST = bytes([10, 0, 2, 2]), bytes([10, 0, 2, 15])
MSS = 1460
SEQ, ACK_NO = 0xFFFF_FF00, 777  # the stream's sequence numbers wrap within the burst
HEADROOM = _netrx_py.FRAME_HEADROOM


@pytest.fixture(params=["pure", "compiled"])
def stream_cls(request):
    """RingStream: the pure twin, then the compiled one (a missing build fails)."""
    if request.param == "pure":
        return _netrx_py.RingStream
    return load_compiled("voidbox._netrx").RingStream


@pytest.fixture
def pair():
    """(host socket the NAT peeks, the far end that writes) on loopback."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    far = socket.create_connection(listener.getsockname())
    near, _ = listener.accept()
    listener.close()
    near.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    near.setblocking(False)
    yield near, far
    near.close()
    far.close()


def burst(stream, sock, budget=1 << 20, mss=MSS, seq=SEQ):
    return stream.send_tcp_stream(sock.fileno(), ETH, SRC, DST, 80, 40000, seq, ACK_NO, 500,
                                  mss, budget, 9)


def frames(nic):
    """The frames in RX buffers since the last call: [(header fields, Ethernet frame)]."""
    out = []
    for head, length in nic.rx.collect():
        data = b""
        idx, left = head, length
        while left > 0:  # the chain's descriptors in order (direct chains only)
            addr, n, flags, nxt = nic.rx.read_desc(idx)
            data += nic.memory.read(addr, min(n, left))
            left -= min(n, left)
            idx = nxt
        out.append((VIRTIO_NET_HDR.unpack_from(data), data[VIRTIO_NET_HDR_LEN:]))
        nic.rx.recycle(head)
    return out


def check(frames_out, payload, seq=SEQ):
    """Every frame valid as the guest sees it, the payload in order; -> the segments."""
    got, segs = b"", []
    for hdr, frame in frames_out:
        assert hdr == (0, 0, 0, 0, 0, 0, 1)
        assert frame[:14] == ETH
        ip = frame[14:34]
        assert inet_checksum(ip) == 0 and struct.unpack_from("!H", ip, 2)[0] == len(frame) - 14
        assert tcp_checksum(SRC, DST, frame[34:]) == 0
        seg = parse_segment(memoryview(frame)[34:])
        assert seg.seq == seq and seg.ack == ACK_NO and seg.flags & ACK
        seq = (seq + len(seg.payload)) & 0xFFFFFFFF
        got += seg.payload
        segs.append(seg)
    assert got == payload
    assert segs[-1].flags & PSH and not any(s.flags & PSH for s in segs[:-1])
    return segs


def test_a_burst_fills_one_chain_per_segment(impl, memory, stream_cls, pair):
    near, far = pair
    nic = Nic(impl, memory, rx_buffers=16, rx_len=2048)
    payload = bytes(range(256)) * 40 + b"xyz"  # 10243 bytes: 7 full segments and a tail
    far.sendall(payload)
    stream = stream_cls(nic.device)
    sent, peeked, count, status = burst(stream, near)
    assert (sent, peeked, count) == (len(payload), len(payload), 8)
    assert status == _netrx_py.STREAM_DRAINED  # the socket had less than the budget
    segs = check(frames(nic), payload)
    assert [len(s.payload) for s in segs] == [MSS] * 7 + [len(payload) - 7 * MSS]
    assert nic.counters["rx_stream_bytes"] == len(payload)
    assert nic.signals.seen  # the used buffers were signalled


def test_the_budget_and_the_peek_offset_are_honoured(impl, memory, stream_cls, pair):
    near, far = pair
    nic = Nic(impl, memory, rx_buffers=16, rx_len=2048)
    payload = bytes(range(200)) * 30
    far.sendall(payload)
    stream = stream_cls(nic.device)
    assert burst(stream, near, budget=2000)[:3] == (2000, 2000, 2)
    near.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 2000)  # as TcpNat moves it
    sent, _, _, status = burst(stream, near)
    assert sent == len(payload) - 2000 and status == _netrx_py.STREAM_DRAINED
    out = frames(nic)
    assert b"".join(parse_segment(memoryview(f)[34:]).payload for _, f in out) == payload
    # Peeked, never consumed: the bytes stay queued until the guest acknowledges them.
    inq = struct.unpack("i", fcntl.ioctl(near.fileno(), termios.FIONREAD, b"\0" * 4))[0]
    assert inq == len(payload)


def test_headers_and_payload_scatter_over_odd_sized_descriptors(impl, memory, stream_cls, pair):
    near, far = pair
    nic = Nic(impl, memory, rx_buffers=0)
    for _ in range(4):  # 7 + 51 + 3 + 1999 bytes: headers and payload cross every boundary
        nic.rx.add_buffers(writable=[7, 51, 3, 1999])
    nic.transport.handle_notify(RX_QUEUE)
    payload = bytes((i * 7) & 0xFF for i in range(3001))
    far.sendall(payload)
    sent, _, count, _ = burst(stream_cls(nic.device), near)
    assert (sent, count) == (3001, 3)
    check(frames(nic), payload)


def test_small_chains_reposted_at_once_cannot_keep_the_stream_looping(impl, memory,
                                                                      stream_cls, pair):
    """A driver that re-posts each too-small chain as soon as it is used: at most a ring's
    worth go back per take of chains, and the burst blocks as if starved."""
    near, far = pair
    drivers = {}
    guest = RecyclingGuest(impl, lambda: drivers)
    nic = Nic(guest, memory, rx_buffers=0)
    drivers[nic.rx.avail_addr] = nic.rx
    nic.post(1, HEADROOM)  # room for the headers and not one byte more
    far.sendall(b"q" * 100)
    assert burst(stream_cls(nic.device), near)[:3] == (0, 0, 0)
    assert nic.counters["rx_too_small_burst"] == 1
    assert QSIZE <= nic.counters["rx_buffer_too_small"] == guest.reposts <= 2 * QSIZE + 1


def test_chains_too_small_go_back_unused_and_no_chain_blocks(impl, memory, stream_cls, pair):
    near, far = pair
    nic = Nic(impl, memory, rx_buffers=0)
    small = nic.post(2, HEADROOM)  # room for the headers and not one byte more
    far.sendall(b"q" * 100)
    stream = stream_cls(nic.device)
    nic.signals.seen.clear()
    assert burst(stream, near) == (0, 0, 0, _netrx_py.STREAM_BLOCKED)
    assert nic.signals.seen  # told: a driver in interrupt mode refills only then
    assert nic.rx.collect() == [(head, 0) for head in small]
    assert nic.counters["rx_buffer_too_small"] == 2 and nic.counters["rx_starved"] == 1
    nic.post(1, 2048)
    assert burst(stream, near)[:3] == (100, 100, 1)


def test_eof_drained_and_a_card_with_a_backlog(impl, memory, stream_cls, pair):
    near, far = pair
    nic = Nic(impl, memory, rx_buffers=4, rx_len=2048)
    stream = stream_cls(nic.device)
    assert burst(stream, near)[3] == _netrx_py.STREAM_DRAINED
    nic.device._rx_backlog.append(b"\x00" * 60)  # a frame waiting: streams must not pass it
    far.sendall(b"data")
    assert burst(stream, near) == (0, 0, 0, _netrx_py.STREAM_BLOCKED)
    nic.device._rx_backlog.clear()
    assert burst(stream, near)[:3] == (4, 4, 1)
    far.close()
    near.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 4)
    assert burst(stream, near)[3] == _netrx_py.STREAM_EOF
    # Only the chain the data needed was taken: the other three are still the driver's.
    queue = nic.device._queue(RX_QUEUE)
    assert len(nic.device._rx_held) == 0 and nic.rx.avail_idx - queue.last_avail_idx == 3


def peek_offset(sock) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)


def test_a_burst_with_no_budget_never_moves_the_peek_offset(impl, memory, stream_cls, pair):
    """With SO_PEEK_OFF set, any recv(MSG_PEEK) that finds a byte moves the kernel's offset
    past it. A status probe that peeked (budget 0, or a byte that arrived after SIOCINQ)
    lost that byte for the guest: the relay's count never moved, the next segment carried
    the byte after it, and the stream stalled (found by bench/vhost_user_peers.py)."""
    near, far = pair
    nic = Nic(impl, memory, rx_buffers=4, rx_len=2048)
    stream = stream_cls(nic.device)
    far.sendall(b"abcdefgh")
    assert burst(stream, near, budget=0) == (0, 0, 0, _netrx_py.STREAM_MORE)
    assert peek_offset(near) == 0
    assert burst(stream, near)[:3] == (8, 8, 1)
    out = frames(nic)
    assert parse_segment(memoryview(out[0][1])[34:]).payload == b"abcdefgh"
    # The host closes with everything peeked: EOF; with bytes left past the offset: more.
    near.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 8)
    far.sendall(b"ij")
    far.close()
    assert burst(stream, near, budget=0)[3] == _netrx_py.STREAM_MORE
    assert peek_offset(near) == 8
    assert burst(stream, near)[:3] == (2, 2, 1)
    near.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 10)
    assert burst(stream, near)[3] == _netrx_py.STREAM_EOF


# ---- offloads: GSO frames over mergeable buffers, NEEDS_CSUM, only as acked ---------------

GSO_ALL = ALL | GUEST_OFFLOADS
GSO_CAP = 44 * MSS  # whole segments in one 64 KiB IPv4 packet


def merged_frames(nic, buffer_len=None):
    """[(header fields, Ethernet frame, buffers)]: each frame joined from its num_buffers
    used buffers (one descriptor each), as a Linux guest's receive_mergeable does."""
    out = []
    used = nic.rx.collect()
    i = 0
    while i < len(used):
        head, length = used[i]
        raw = nic.memory.read(nic.rx.read_desc(head)[0], length)
        hdr = VIRTIO_NET_HDR.unpack_from(raw)
        assert hdr[6] >= 1 and i + hdr[6] <= len(used), "num_buffers past the used buffers"
        data = raw[VIRTIO_NET_HDR_LEN:]
        for head2, length2 in used[i + 1:i + hdr[6]]:
            data += nic.memory.read(nic.rx.read_desc(head2)[0], length2)
        out.append((hdr, data, hdr[6]))
        i += hdr[6]
    for head, _length in used:
        nic.rx.recycle(head)
    return out


def check_offloaded(frames_out, payload, seq=SEQ, mss=MSS, gso=True):
    """As check(), for frames with NEEDS_CSUM: the field holds the pseudo-header sum and
    the checksum the guest finishes from csum_start makes the segment whole; a frame
    longer than one MSS is a GSO_TCPV4 frame with gso_size mss and hdr_len 54."""
    got, segs = b"", []
    for hdr, frame, _nbuf in frames_out:
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, _n = hdr
        n = len(frame) - 54
        assert (flags, hdr_len, csum_start, csum_offset) == (VIRTIO_NET_HDR_F_NEEDS_CSUM, 54,
                                                             34, 16)
        if gso and n > mss:
            assert (gso_type, gso_size) == (VIRTIO_NET_HDR_GSO_TCPV4, mss)
        else:
            assert (gso_type, gso_size) == (0, 0)
        ip = frame[14:34]
        assert inet_checksum(ip) == 0 and struct.unpack_from("!H", ip, 2)[0] == len(frame) - 14
        assert struct.unpack_from("!H", frame, 50)[0] == pseudo_header_sum(SRC, DST, 6, 20 + n)
        whole = bytearray(frame)
        struct.pack_into("!H", whole, 50, inet_checksum(frame[34:]))
        assert tcp_checksum(SRC, DST, bytes(whole[34:])) == 0
        seg = parse_segment(memoryview(frame)[34:])
        assert seg.seq == seq and seg.ack == ACK_NO and seg.flags & ACK
        seq = (seq + n) & 0xFFFFFFFF
        got += seg.payload
        segs.append(seg)
    assert got == payload
    assert segs[-1].flags & PSH and not any(s.flags & PSH for s in segs[:-1])
    return segs


def test_gso_frames_spread_over_mergeable_buffers_with_num_buffers(impl, memory, stream_cls,
                                                                  pair):
    near, far = pair
    nic = Nic(impl, memory, features=GSO_ALL, rx_buffers=QSIZE, rx_len=4096)
    payload = bytes((i * 13) & 0xFF for i in range(100_000))
    far.sendall(payload)
    stream = stream_cls(nic.device)
    # 16 buffers of 4 KiB: one GSO frame of 44 segments, over all 16 (4030 + 14 x 4096
    # bytes of payload fall short of 64240).
    sent, peeked, count, status = burst(stream, near)
    assert (sent, peeked, count, status) == (GSO_CAP, GSO_CAP, 1, _netrx_py.STREAM_MORE)
    first = merged_frames(nic)
    assert [nbuf for _h, _f, nbuf in first] == [16]
    near.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, GSO_CAP)  # as TcpNat moves it
    nic.post(QSIZE, 4096)
    rest = len(payload) - GSO_CAP
    assert burst(stream, near, seq=(SEQ + GSO_CAP) & 0xFFFFFFFF)[:3] == (rest, rest, 1)
    second = merged_frames(nic)
    check_offloaded(first, payload[:GSO_CAP])  # PSH ends each burst
    check_offloaded(second, payload[GSO_CAP:], seq=(SEQ + GSO_CAP) & 0xFFFFFFFF)
    assert [nbuf for _h, _f, nbuf in second] == [9]  # 35760 + 66 bytes in 4 KiB buffers
    c = nic.counters
    assert (c["rx_gso_frames"], c["rx_merged_frames"], c["rx_csum_offloaded"]) == (2, 2, 2)
    assert c["rx_stream_bytes"] == len(payload) and c["rx_stream_frames"] == 2
    # Only the buffers the data needed were used: the other seven are the driver's still.
    queue = nic.device._queue(RX_QUEUE)
    assert len(nic.device._rx_held) + nic.rx.avail_idx - queue.last_avail_idx == 7


ACK_SETS = {
    "none": ALL,
    "GUEST_CSUM": ALL | 1 << VIRTIO_NET_F_GUEST_CSUM,
    "GUEST_TSO4 alone": ALL | 1 << VIRTIO_NET_F_GUEST_TSO4,  # breaks §5.1.3.1: not used
}


@pytest.mark.parametrize("acked", sorted(ACK_SETS))
def test_without_guest_tso4_frames_stay_mss_sized(impl, memory, stream_cls, pair, acked):
    near, far = pair
    nic = Nic(impl, memory, features=ACK_SETS[acked], rx_buffers=QSIZE, rx_len=4096)
    payload = bytes(range(256)) * 40 + b"xyz"
    far.sendall(payload)
    assert burst(stream_cls(nic.device), near)[:3] == (len(payload), len(payload), 8)
    out = merged_frames(nic)
    assert [len(f) - 54 for _h, f, _n in out] == [MSS] * 7 + [len(payload) - 7 * MSS]
    if acked == "GUEST_CSUM":
        check_offloaded(out, payload)  # NEEDS_CSUM, never a GSO type
        assert nic.counters["rx_csum_offloaded"] == 8
    else:
        check([(h, f) for h, f, _n in out], payload)  # flags 0, the checksum whole
        assert nic.counters["rx_csum_offloaded"] == 0
    assert nic.counters["rx_gso_frames"] == 0 and nic.counters["rx_merged_frames"] == 0


def test_a_tiny_mss_gets_no_gso_frames(impl, memory, stream_cls, pair):
    near, far = pair
    nic = Nic(impl, memory, features=GSO_ALL, rx_buffers=QSIZE, rx_len=4096)
    far.sendall(b"m" * 2000)
    assert burst(stream_cls(nic.device), near, mss=500)[:3] == (2000, 2000, 4)
    check_offloaded(merged_frames(nic), b"m" * 2000, mss=500, gso=False)
    assert nic.counters["rx_gso_frames"] == 0


def test_gso_without_mrg_rxbuf_fills_one_big_chain_per_frame(impl, memory, stream_cls, pair):
    """Big-packet buffers (no MRG_RXBUF, as Linux posts them with GUEST_TSO4): a frame is
    one chain of many descriptors, num_buffers 1."""
    near, far = pair
    nic = Nic(impl, memory, features=GSO_ALL & ~(1 << VIRTIO_NET_F_MRG_RXBUF), rx_buffers=0)
    for _ in range(3):
        nic.rx.add_buffers(writable=[VIRTIO_NET_HDR_LEN] + [17000] * 4)
    nic.transport.handle_notify(RX_QUEUE)
    payload = bytes((i * 31) & 0xFF for i in range(100_000))
    far.sendall(payload)
    assert burst(stream_cls(nic.device), near)[:3] == (len(payload), len(payload), 2)
    out = frames(nic)  # one chain each, read in descriptor order
    check_offloaded([(h, f, 1) for h, f in out], payload)
    assert [h[6] for h, _f in out] == [1, 1]
    assert [len(f) - 54 for _h, f in out] == [GSO_CAP, len(payload) - GSO_CAP]
    assert nic.counters["rx_merged_frames"] == 0 and nic.counters["rx_gso_frames"] == 2


def test_hostile_rx_buffers_under_gso_are_returned_or_retired_never_written(
        impl, memory, stream_cls, pair):
    near, far = pair
    nic = Nic(impl, memory, features=GSO_ALL, rx_buffers=0)
    rx = nic.rx
    small = rx.add_buffers(writable=[HEADROOM])  # room for the headers, not one byte more
    empty = rx.add_chain([(rx.alloc(16), 0, True)])  # zero-length
    outside = rx.add_chain([(memory.size + (1 << 30), 4096, True)])  # outside RAM
    good = [rx.add_buffers(writable=[4096]) for _ in range(3)]
    nic.transport.handle_notify(RX_QUEUE)
    payload = b"p" * 10_000
    far.sendall(payload)
    sent, _, count, _ = burst(stream_cls(nic.device), near)
    assert (sent, count) == (len(payload), 1)
    used = rx.collect()
    returned = {head: length for head, length in used if head in (small, empty, outside)}
    assert returned == {small: 0, empty: 0, outside: 0}  # back unused (or retired)
    frame_entries = [(head, length) for head, length in used if head in good]
    assert [head for head, _ in frame_entries] == good
    assert nic.counters["rx_buffer_too_small"] >= 1
    hdr = VIRTIO_NET_HDR.unpack_from(memory.read(rx.read_desc(good[0])[0], 12))
    assert hdr[:2] == (VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4) and hdr[6] == 3


def test_a_reset_in_the_middle_drops_the_offloads_with_the_ack(impl, memory, stream_cls, pair):
    near, far = pair
    nic = Nic(impl, memory, features=GSO_ALL, rx_buffers=QSIZE, rx_len=4096)
    payload = bytes((i * 7) & 0xFF for i in range(80_000))
    far.sendall(payload)
    stream = stream_cls(nic.device)
    assert burst(stream, near, budget=30_000)[:3] == (30_000, 30_000, 1)
    assert merged_frames(nic)[0][0][1] == VIRTIO_NET_HDR_GSO_TCPV4
    nic.guest.w(VIRTIO_MMIO_STATUS, 0)  # the driver resets mid-stream
    near.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 30_000)
    assert burst(stream, near) == (0, 0, 0, _netrx_py.STREAM_BLOCKED)
    assert nic.device.negotiated["guest_tso4"] is False
    # A driver that now acks no guest offloads: new rings, MSS frames, whole checksums.
    assert nic.guest.negotiate(ALL)
    nic.rx = Driver(memory, size=QSIZE, desc_addr=0x80_0000, avail_addr=0x90_0000,
                    used_addr=0xA0_0000)
    nic.rx._data_next = DATA_ADDR + (32 << 20)
    nic.guest.setup_driver_queue(RX_QUEUE, nic.rx)
    nic.guest.setup_driver_queue(TX_QUEUE, nic.tx)
    nic.post(QSIZE, 2048, kick=False)
    nic.guest.driver_ok()
    assert nic.counters["negotiated_guest_tso4"] == 0
    sent = burst(stream, near, seq=(SEQ + 30_000) & 0xFFFFFFFF)[0]
    assert sent == QSIZE * MSS  # one MSS frame per buffer
    check([(h, f) for h, f, _n in merged_frames(nic)], payload[30_000:30_000 + sent],
          seq=(SEQ + 30_000) & 0xFFFFFFFF)
    assert nic.counters["rx_gso_frames"] == 1  # the one before the reset


class ClaimingChain:
    """An RX chain whose descriptors alias one region, claiming far more than RAM."""

    head = 3

    def __init__(self, writable):
        self.writable = writable
        self.written = b""

    def write(self, data, offset):
        self.written = bytes(data)


def test_a_tap_read_into_chains_that_claim_exabytes_allocates_one_frame():
    """The pure twin reads through a buffer: it is sized by what a TAP can return, never
    by what the driver's descriptors claim."""
    r, w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        frame = bytes(12) + ETH + b"x" * 100
        w.send(frame)
        chain = ClaimingChain(1 << 60)  # no host can allocate it, whatever its overcommit
        got, flags, gso, used = _netrx_py.readv_into_chains(r.fileno(), [chain])
        assert (got, used) == (len(frame), [(3, len(frame))])
        assert chain.written[12:] == frame[12:]
    finally:
        r.close()
        w.close()
