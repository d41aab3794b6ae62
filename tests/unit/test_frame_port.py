"""FramePort: batched frame I/O with virtio_net_hdr framing and the TCP stream sender.

A datagram socketpair stands in for the TAP (it keeps frame boundaries, as a TAP does) and
a loopback TCP connection for the host socket, so no root is needed. Every test runs on
the compiled port and its pure twin; the two must write the same bytes.
"""

import errno
import fcntl
import importlib
import select
import socket
import struct
import termios
import time

import pytest

from tests.requires import missing
from tests.twins import pure_only
from voidbox.net import _slirp_py

_compiled = None if pure_only() else importlib.import_module("voidbox._slirp")

IMPLS = [
    pytest.param(_slirp_py, id="pure"),
    pytest.param(_compiled, id="cython",
                 marks=pytest.mark.skipif(_compiled is None, reason="VOIDBOX_PURE=1: pure twin only")),
]

ETH = bytes.fromhex("525400123456" "525400000002" "0800")
SRC = bytes([10, 0, 2, 2])
DST = bytes([10, 0, 2, 15])
VNET = struct.Struct("<BBHHHH")
SO_PEEK_OFF = getattr(socket, "SO_PEEK_OFF", 42)


@pytest.fixture
def tap_pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def tcp_pair():
    """(peeked: our side with SO_PEEK_OFF on, sender: the host application's side)."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    sender = socket.create_connection(lst.getsockname())
    peeked, _ = lst.accept()
    lst.close()
    peeked.setblocking(False)
    try:
        peeked.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    except OSError:
        missing("no SO_PEEK_OFF for TCP on this kernel")
    yield peeked, sender
    peeked.close()
    sender.close()


def recv_all(sock, n):
    out = []
    for _ in range(n):
        out.append(sock.recv(1 << 17))
    return out


def fill(sender, data, peeked):
    """Send data and wait (bounded) until all of it is queued at the peeked end."""
    sender.sendall(data)
    deadline = time.monotonic() + 10
    while available(peeked) < len(data) and time.monotonic() < deadline:
        select.select([peeked], [], [], 0.1)
    assert available(peeked) >= len(data)


def available(sock):
    """FIONREAD (tcp(7) SIOCINQ): bytes queued for reading."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def ipv4_udp_frame(payload: bytes) -> bytes:
    """An Ethernet frame with IPv4 + UDP whose UDP checksum field holds the pseudo-header
    sum, as a sender offloading the checksum (NEEDS_CSUM) leaves it."""
    udp_len = 8 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 1, 0x4000, 64, 17, 0, DST, SRC)
    ip = ip[:10] + struct.pack("!H", _slirp_py.inet_checksum(ip)) + ip[12:]
    pseudo = _slirp_py._fold(_slirp_py._sum16(DST + SRC + struct.pack("!BBH", 0, 17, udp_len)))
    return ETH + ip + struct.pack("!HHHH", 5000, 4789, udp_len, pseudo) + payload


@pytest.mark.parametrize("impl", IMPLS)
def test_read_batch_reports_offloaded_checksums(impl, tap_pair):
    ours, peer = tap_pair
    port = impl.FramePort(ours.fileno(), vnet_hdr_len=10, batch=8)
    own = ipv4_udp_frame(b"payload")
    frames = [own, ETH + b"b" * 60, ETH + b"c"]
    peer.send(VNET.pack(1, 0, 0, 0, 34, 6) + frames[0])    # NEEDS_CSUM at its own UDP
    peer.send(VNET.pack(2, 0, 0, 0, 0, 0) + frames[1])     # DATA_VALID
    peer.send(VNET.pack(0, 0, 0, 0, 0, 0) + frames[2])     # nothing offloaded
    peer.send(b"\0" * 12)                                  # shorter than hdr + Ethernet
    peer.send(VNET.pack(1, 0, 0, 0, 34, 60) + own)         # csum field beyond the frame
    got = port.read_batch()
    assert got == [(frames[0], True), (frames[1], True), (frames[2], False)]
    assert port.rx_dropped == 2 and port.rx_frames == 3
    assert port.read_batch() == []  # EAGAIN ends the batch quietly


@pytest.mark.parametrize("impl", IMPLS)
def test_read_batch_finishes_a_tunnelled_partial_checksum(impl, tap_pair):
    """NEEDS_CSUM pointing past the packet's own L4 header (an inner packet in a UDP
    tunnel): the relayed payload carries that checksum, so it is completed here."""
    ours, peer = tap_pair
    port = impl.FramePort(ours.fileno(), vnet_hdr_len=10)
    inner = ipv4_udp_frame(b"inner data")[14:]  # IPv4 + UDP, checksum unfinished
    outer = ipv4_udp_frame(b"\0" * 8 + inner)   # 8 bytes standing in for a VXLAN header
    inner_udp = 14 + 20 + 8 + 8 + 20
    peer.send(VNET.pack(1, 0, 0, 0, inner_udp, 6) + outer)
    [(frame, verified)] = port.read_batch()
    assert not verified  # the outer UDP checksum is still to be checked by the engine
    assert frame[:inner_udp + 6] == outer[:inner_udp + 6]
    assert frame[inner_udp + 8:] == outer[inner_udp + 8:]
    udp = frame[inner_udp:]
    inner_src, inner_dst = frame[inner_udp - 8:inner_udp - 4], frame[inner_udp - 4:inner_udp]
    pseudo = _slirp_py._sum16(inner_src + inner_dst + struct.pack("!BBH", 0, 17, len(udp)))
    assert ~_slirp_py._fold(_slirp_py._sum16(udp, pseudo)) & 0xFFFF == 0  # now valid


@pytest.mark.parametrize("impl", IMPLS)
def test_read_batch_is_bounded(impl, tap_pair):
    ours, peer = tap_pair
    port = impl.FramePort(ours.fileno(), batch=3)
    for i in range(5):
        peer.send(ETH + bytes([i]) * 20)
    assert [f[-1] for f, _ in port.read_batch()] == [0, 1, 2]
    assert [f[-1] for f, ok in port.read_batch()] == [3, 4]


@pytest.mark.parametrize("impl", IMPLS)
def test_read_each_hands_frames_over_in_order_and_an_exception_ends_the_batch(impl, tap_pair):
    ours, peer = tap_pair
    port = impl.FramePort(ours.fileno(), vnet_hdr_len=10, batch=8)
    frames = [ETH + b"a" * 10, ETH + b"b" * 200, ETH + b"c" * 10]
    peer.send(VNET.pack(2, 0, 0, 0, 0, 0) + frames[0])     # DATA_VALID
    peer.send(VNET.pack(0, 0, 0, 0, 0, 0) + frames[1])     # longer than `oversize`
    peer.send(b"\0" * 12)                                  # dropped: shorter than hdr + Ethernet
    peer.send(VNET.pack(0, 0, 0, 0, 0, 0) + frames[2])
    got = []
    assert port.read_each(lambda f, v: got.append((f, v)), 100) == 3
    assert got == [(frames[0], True), (frames[1], False), (frames[2], False)]
    assert (port.rx_frames, port.rx_dropped, port.rx_oversize) == (3, 1, 1)
    assert port.read_each(got.append, 100) == 0  # EAGAIN ends the batch quietly

    def refuse(frame, verified):
        raise RuntimeError("no")

    for f in frames:
        peer.send(VNET.pack(0, 0, 0, 0, 0, 0) + f)
    with pytest.raises(RuntimeError):
        port.read_each(refuse, 100)
    assert port.rx_frames == 4  # the frame handed over; the ones behind it are not read
    got.clear()
    assert port.read_each(lambda f, v: got.append(f), 100) == 2
    assert got == frames[1:]
    assert port.read_each(got.append, 100) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_read_each_hands_a_frame_over_before_it_reads_the_next(impl, tap_pair):
    """The answer to a lone request leaves before the read that finds the fd empty: each
    frame reaches on_frame while the frames behind it are still in the fd."""
    ours, peer = tap_pair
    port = impl.FramePort(ours.fileno(), vnet_hdr_len=10, batch=8)
    for tag in b"xyz":
        peer.send(VNET.pack(0, 0, 0, 0, 0, 0) + ETH + bytes([tag]) * 20)
    still_readable = []

    def take(frame, verified):
        still_readable.append((frame[-1], bool(select.select([ours], [], [], 0)[0])))

    assert port.read_each(take, 0) == 3
    assert still_readable == [(ord("x"), True), (ord("y"), True), (ord("z"), False)]
    assert port.read_errno == errno.EAGAIN


@pytest.mark.parametrize("impl", IMPLS)
def test_write_prefixes_an_empty_virtio_header(impl, tap_pair):
    ours, peer = tap_pair
    port = impl.FramePort(ours.fileno(), vnet_hdr_len=12)
    assert port.write(ETH + b"xyz") == 1
    assert peer.recv(100) == b"\0" * 12 + ETH + b"xyz"
    plain = impl.FramePort(ours.fileno())
    assert plain.write(memoryview(ETH + b"q")) == 1
    assert peer.recv(100) == ETH + b"q"


@pytest.mark.parametrize("impl", IMPLS)
def test_write_reports_eagain(impl):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    try:
        port = impl.FramePort(a.fileno())
        results = [port.write(ETH + b"x" * 1000) for _ in range(10000)]
        assert 0 in results and port.tx_eagain >= 1
        assert -1 not in results
    finally:
        a.close()
        b.close()


def parse_frame(frame):
    assert frame[:14] == ETH
    ip = frame[14:]
    total = struct.unpack_from("!H", ip, 2)[0]
    assert total == len(ip)
    tcp = ip[20:]
    sport, dport, seq, ack, off, flags, win = struct.unpack_from("!HHIIBBH", tcp)
    return sport, dport, seq, ack, flags, win, tcp[(off >> 4) * 4:], ip, tcp


@pytest.mark.parametrize("impl", IMPLS)
def test_stream_segments_at_mss_with_full_checksums(impl, tap_pair, tcp_pair):
    ours, peer = tap_pair
    peeked, sender = tcp_pair
    data = bytes(range(256)) * 40  # 10240 bytes
    fill(sender, data, peeked)
    port = impl.FramePort(ours.fileno())
    seq0 = 0xFFFFF000  # the stream wraps inside this burst
    sent, peekd, frames, status = port.send_tcp_stream(
        peeked.fileno(), ETH, SRC, DST, 80, 40000, seq0, 777, 5000, 1000, 4500, 10)
    assert (sent, peekd, frames, status) == (4500, 4500, 5, impl.STREAM_MORE)
    out = recv_all(peer, 5)
    payload = b""
    for i, frame in enumerate(out):
        sport, dport, seq, ack, flags, win, body, ip, tcp = parse_frame(frame)
        assert (sport, dport, ack, win) == (80, 40000, 777, 5000)
        assert seq == (seq0 + 1000 * i) & 0xFFFFFFFF
        assert flags == (0x18 if i == 4 else 0x10)  # PSH on the last only
        assert struct.unpack_from("!H", ip, 4)[0] == 10 + i
        assert _slirp_py.inet_checksum(ip[:20]) == 0
        assert _slirp_py.tcp_checksum(SRC, DST, tcp) == 0
        payload += body
    assert payload == data[:4500]
    # The peek offset moved: the next burst continues where this one stopped.
    sent, peekd, frames, status = port.send_tcp_stream(
        peeked.fileno(), ETH, SRC, DST, 80, 40000, seq0 + 4500, 777, 5000, 1000, 100000, 15)
    assert (sent, status) == (len(data) - 4500, impl.STREAM_DRAINED)
    rest = b"".join(parse_frame(f)[6] for f in recv_all(peer, frames))
    assert rest == data[4500:]
    # Nothing left: drained (EAGAIN), and EOF once the sender closes.
    assert port.send_tcp_stream(peeked.fileno(), ETH, SRC, DST, 80, 40000, 0, 0, 0, 1000,
                                1000, 0)[3] == impl.STREAM_DRAINED
    sender.shutdown(socket.SHUT_WR)
    # Consume what was peeked: EOF is only seen at the head of an empty queue.
    peeked.recv(len(data))
    peeked.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    select.select([peeked], [], [], 5)
    assert port.send_tcp_stream(peeked.fileno(), ETH, SRC, DST, 80, 40000, 0, 0, 0, 1000,
                                1000, 0) == (0, 0, 0, impl.STREAM_EOF)


@pytest.mark.parametrize("impl", IMPLS)
def test_stream_tso_writes_gso_superframes_with_partial_checksums(impl, tap_pair, tcp_pair):
    ours, peer = tap_pair
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    peeked, sender = tcp_pair
    data = bytes((i * 7) & 0xFF for i in range(100000))
    fill(sender, data, peeked)
    port = impl.FramePort(ours.fileno(), vnet_hdr_len=10, tso=True)
    mss = 1460
    sent, peekd, frames, status = port.send_tcp_stream(
        peeked.fileno(), ETH, SRC, DST, 80, 40000, 1, 2, 3, mss, 100000, 0)
    assert sent == 100000 and frames == 2
    superseg = (65495 // mss) * mss
    out = recv_all(peer, 2)
    body = b""
    for i, raw in enumerate(out):
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET.unpack_from(raw)
        frame = raw[10:]
        *_, payload, ip, tcp = parse_frame(frame)
        n = len(payload)
        assert n == (superseg if i == 0 else 100000 - superseg)
        assert (flags, csum_start, csum_offset) == (1, 34, 16)  # NEEDS_CSUM from TCP
        assert (gso_type, hdr_len, gso_size) == (1, 54, mss)    # TCPv4 GSO, mss segments
        assert _slirp_py.inet_checksum(ip[:20]) == 0
        # The field holds the pseudo-header sum: completing it gives a valid checksum.
        pseudo = _slirp_py._fold(_slirp_py._pseudo_sum(SRC, DST, len(tcp)))
        assert struct.unpack_from("!H", tcp, 16)[0] == pseudo
        zeroed = bytearray(tcp)
        zeroed[16:18] = b"\0\0"
        full = _slirp_py.tcp_checksum(SRC, DST, zeroed)
        zeroed[16:18] = struct.pack("!H", full)
        assert _slirp_py.tcp_checksum(SRC, DST, zeroed) == 0
        body += payload
    assert body == data


@pytest.mark.parametrize("impl", IMPLS)
def test_stream_short_tso_frame_has_no_gso(impl, tap_pair, tcp_pair):
    ours, peer = tap_pair
    peeked, sender = tcp_pair
    fill(sender, b"hello", peeked)
    port = impl.FramePort(ours.fileno(), vnet_hdr_len=10, tso=True)
    assert port.send_tcp_stream(peeked.fileno(), ETH, SRC, DST, 80, 40000, 1, 2, 3, 1460,
                                65536, 0) == (5, 5, 1, impl.STREAM_DRAINED)
    raw = peer.recv(1000)
    assert VNET.unpack_from(raw) == (1, 0, 0, 0, 34, 16)
    assert parse_frame(raw[10:])[6] == b"hello"


@pytest.mark.parametrize("impl", IMPLS)
def test_stream_rejects_bad_arguments(impl, tap_pair):
    ours, _ = tap_pair
    port = impl.FramePort(ours.fileno())
    with pytest.raises(ValueError):
        port.send_tcp_stream(0, ETH[:10], SRC, DST, 1, 2, 0, 0, 0, 1000, 10, 0)
    with pytest.raises(ValueError):
        port.send_tcp_stream(0, ETH, SRC, DST, 1, 2, 0, 0, 0, 0, 10, 0)
    with pytest.raises(ValueError):
        port.send_tcp_stream(0, ETH, SRC, DST, 70000, 2, 0, 0, 0, 1000, 10, 0)
    with pytest.raises(ValueError):
        impl.FramePort(ours.fileno(), vnet_hdr_len=4)
    with pytest.raises(ValueError):
        impl.FramePort(ours.fileno(), tso=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_stream_blocked_port_reports_what_went_out(impl, tcp_pair):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)  # a few frames fill it
    peeked, sender = tcp_pair
    try:
        fill(sender, b"z" * 60000, peeked)
        port = impl.FramePort(a.fileno())
        total = 0
        status = None
        for _ in range(200):
            sent, peekd, frames, status = port.send_tcp_stream(
                peeked.fileno(), ETH, SRC, DST, 1, 2, total, 0, 0, 1000, 60000 - total, 0)
            total += sent
            if status == impl.STREAM_BLOCKED:
                assert sent < peekd
                break
            peeked.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, total)
        assert status == impl.STREAM_BLOCKED
        assert port.tx_eagain >= 1
    finally:
        a.close()
        b.close()


# ---- send_udp4: the UDP NAT's replies, socket -> frame -> port ------------------------

UDP_HEADROOM = 42  # Ethernet, IPv4, UDP


def connected_udp_pair():
    """(flow: a non-blocking socket connected as the UDP NAT's flow's is; host: the server,
    connected back to it) on the loopback, where a send is queued at the other end before
    it returns."""
    host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    host.bind(("127.0.0.1", 0))
    flow = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flow.connect(host.getsockname())
    flow.setblocking(False)
    host.connect(flow.getsockname())
    return flow, host


@pytest.fixture
def udp_flow():
    flow, host = connected_udp_pair()
    yield flow, host
    flow.close()
    host.close()


def queue_datagrams(flow, host, payloads):
    for p in payloads:
        host.send(p)
    deadline = time.monotonic() + 10
    while len(payloads) and time.monotonic() < deadline:
        if select.select([flow], [], [], 0.1)[0]:
            break


def parse_udp_frame(frame):
    """(ip identification, source port, destination port, payload), each checksum and
    length checked."""
    assert frame[:14] == ETH
    ip = frame[14:]
    assert ip[0] == 0x45 and ip[9] == 17 and ip[8] == 64
    assert struct.unpack_from("!H", ip, 2)[0] == len(ip)
    assert struct.unpack_from("!H", ip, 6)[0] == 0x4000  # DF
    assert ip[12:16] == SRC and ip[16:20] == DST
    assert _slirp_py.inet_checksum(ip[:20]) == 0
    udp = ip[20:]
    sport, dport, length, csum = struct.unpack_from("!HHHH", udp)
    assert length == len(udp) and csum != 0
    pseudo = SRC + DST + struct.pack("!BBH", 0, 17, length)
    assert _slirp_py.inet_checksum(pseudo + udp) == 0
    return struct.unpack_from("!H", ip, 4)[0], sport, dport, udp[8:]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hl", [0, 10, 12])
def test_udp_replies_are_framed_in_the_buffer_and_written(impl, tap_pair, udp_flow, hl):
    ours, peer = tap_pair
    flow, host = udp_flow
    payloads = [b"", b"a", bytes(range(256)) * 5, b"\xff" * 1371]
    queue_datagrams(flow, host, payloads)
    port = impl.FramePort(ours.fileno(), vnet_hdr_len=hl)
    buf = bytearray(UDP_HEADROOM + 65535)
    # A budget beyond the datagrams: the socket runs dry first.
    got = port.send_udp4(flow.fileno(), buf, ETH, SRC, DST, 53, 40000, 0xFFFE, 8, 1500)
    assert got[:3] == (4, 4, impl.UDP_DRAINED)
    assert port.tx_frames == 4
    frames = recv_all(peer, 4)
    for i, (raw, payload) in enumerate(zip(frames, payloads, strict=True)):
        assert raw[:hl] == bytes(hl)  # an empty virtio_net_hdr: nothing offloaded
        ident, sport, dport, body = parse_udp_frame(raw[hl:])
        assert (ident, sport, dport, body) == ((0xFFFE + i) & 0xFFFF, 53, 40000, payload)
    assert port.send_udp4(flow.fileno(), buf, ETH, SRC, DST, 53, 40000, 0, 8, 1500) \
        == (0, 0, impl.UDP_DRAINED, 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_udp_relay_stops_at_its_budget(impl, tap_pair, udp_flow):
    ours, peer = tap_pair
    flow, host = udp_flow
    queue_datagrams(flow, host, [b"%d" % i for i in range(5)])
    port = impl.FramePort(ours.fileno())
    buf = bytearray(UDP_HEADROOM + 65535)
    assert port.send_udp4(flow.fileno(), buf, ETH, SRC, DST, 1, 2, 7, 3, 1500)[:3] \
        == (3, 3, impl.UDP_BUDGET)
    assert port.send_udp4(flow.fileno(), buf, ETH, SRC, DST, 1, 2, 10, 3, 1500)[:3] \
        == (2, 2, impl.UDP_DRAINED)
    assert [parse_udp_frame(f)[3] for f in recv_all(peer, 5)] == [b"0", b"1", b"2", b"3", b"4"]


@pytest.mark.parametrize("impl", IMPLS)
def test_udp_datagram_beyond_the_mtu_is_left_in_the_buffer(impl, tap_pair, udp_flow):
    """Fragmenting is the caller's: the payload waits at buf[42:], nothing is written."""
    ours, peer = tap_pair
    flow, host = udp_flow
    big = bytes(range(256)) * 8  # 2048 bytes: 28 + 2048 > 1500
    queue_datagrams(flow, host, [b"small", big])
    port = impl.FramePort(ours.fileno())
    buf = bytearray(UDP_HEADROOM + 65535)
    assert port.send_udp4(flow.fileno(), buf, ETH, SRC, DST, 1, 2, 0, 8, 1500) \
        == (1, 1, impl.UDP_OVERSIZE, len(big))
    assert bytes(buf[UDP_HEADROOM:UDP_HEADROOM + len(big)]) == big
    assert parse_udp_frame(peer.recv(4096))[3] == b"small"
    with pytest.raises(BlockingIOError):
        peer.recv(4096)


@pytest.mark.parametrize("impl", IMPLS)
def test_udp_relay_of_a_paused_port_receives_nothing(impl, tap_pair, udp_flow):
    ours, _peer = tap_pair
    flow, host = udp_flow
    queue_datagrams(flow, host, [b"wait"])
    port = impl.FramePort(ours.fileno())
    port.paused = True  # its owner has frames queued: these must not overtake them
    buf = bytearray(UDP_HEADROOM + 65535)
    assert port.send_udp4(flow.fileno(), buf, ETH, SRC, DST, 1, 2, 0, 8, 1500) \
        == (0, 0, impl.UDP_PAUSED, 0)
    assert flow.recv(100) == b"wait"


@pytest.mark.parametrize("impl", IMPLS)
def test_udp_frame_the_port_refuses_waits_in_the_buffer(impl, udp_flow):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # a few frames fill it
    flow, host = udp_flow
    try:
        payloads = [b"%04d" % i + b"p" * 996 for i in range(40)]
        queue_datagrams(flow, host, payloads)
        port = impl.FramePort(a.fileno())
        buf = bytearray(UDP_HEADROOM + 65535)
        written, ids, status, n = port.send_udp4(flow.fileno(), buf, ETH, SRC, DST, 1, 2, 0,
                                                 40, 1500)
        assert status == impl.UDP_BLOCKED and port.tx_eagain == 1
        assert ids == written + 1  # the refused frame has its identification
        ident, _s, _d, body = parse_udp_frame(bytes(buf[:UDP_HEADROOM + n]))
        assert (ident, body) == (written, payloads[written])
        got = [parse_udp_frame(b.recv(4096))[3] for _ in range(written)]
        assert got == payloads[:written]
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_udp_relay_skips_a_pending_socket_error(impl, tap_pair):
    """An ICMP port unreachable surfaces as one failed receive (ECONNREFUSED): it uses one
    receive of the budget and the relay goes on."""
    ours, peer = tap_pair
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    flow = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flow.connect(closed.getsockname())
    closed.close()  # nobody there now: the kernel answers port unreachable
    flow.setblocking(False)
    try:
        flow.send(b"anyone?")
        select.select([flow], [], [], 5)
        port = impl.FramePort(ours.fileno())
        buf = bytearray(UDP_HEADROOM + 65535)
        assert port.send_udp4(flow.fileno(), buf, ETH, SRC, DST, 1, 2, 0, 1, 1500) \
            == (0, 0, impl.UDP_BUDGET, 0)
        assert port.send_udp4(flow.fileno(), buf, ETH, SRC, DST, 1, 2, 0, 4, 1500) \
            == (0, 0, impl.UDP_DRAINED, 0)
    finally:
        flow.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_udp_relay_rejects_bad_arguments(impl, tap_pair, udp_flow):
    ours, _peer = tap_pair
    flow, _host = udp_flow
    port = impl.FramePort(ours.fileno())
    buf = bytearray(UDP_HEADROOM + 100)
    fd = flow.fileno()
    for args in [(fd, buf, ETH[:13], SRC, DST, 1, 2, 0, 1, 1500),
                 (fd, buf, ETH, SRC + b"\0", DST, 1, 2, 0, 1, 1500),
                 (fd, bytearray(41), ETH, SRC, DST, 1, 2, 0, 1, 1500),
                 (fd, buf, ETH, SRC, DST, 65536, 2, 0, 1, 1500),
                 (fd, buf, ETH, SRC, DST, 1, 2, 65536, 1, 1500)]:
        with pytest.raises(ValueError):
            port.send_udp4(*args)
