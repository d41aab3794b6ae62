"""The virtio-net card's stream port (voidbox/virtio/_netrx_py.py and voidbox/_netrx.pyx):
host TCP data peeked from a real socket into RX chains the driver mock posted.

Both stream twins run over both ring twins (the compiled stream hands chains of the pure
ring to the pure path). Every frame is checked as the guest would: a clean virtio_net_hdr,
Ethernet, IPv4 and TCP headers with valid checksums, consecutive sequence numbers, PSH on
the last segment of a burst, and the payload bytes in order.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios

import pytest

from tests.twins import load_compiled
from tests.unit.test_virtio_net import Nic
from voidbox.net.fastpath import inet_checksum, tcp_checksum
from voidbox.net.tcp import ACK, PSH, parse_segment
from voidbox.virtio import _netrx_py
from voidbox.virtio.net import RX_QUEUE, VIRTIO_NET_HDR, VIRTIO_NET_HDR_LEN

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


def burst(stream, sock, budget=1 << 20, mss=MSS):
    return stream.send_tcp_stream(sock.fileno(), ETH, SRC, DST, 80, 40000, SEQ, ACK_NO, 500,
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


def check(frames_out, payload):
    """Every frame valid as the guest sees it, the payload in order; -> the segments."""
    seq, got, segs = SEQ, b"", []
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


def test_chains_too_small_go_back_unused_and_no_chain_blocks(impl, memory, stream_cls, pair):
    near, far = pair
    nic = Nic(impl, memory, rx_buffers=0)
    small = nic.post(2, HEADROOM)  # room for the headers and not one byte more
    far.sendall(b"q" * 100)
    stream = stream_cls(nic.device)
    assert burst(stream, near) == (0, 0, 0, _netrx_py.STREAM_BLOCKED)
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
