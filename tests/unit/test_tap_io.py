"""TapIO: the TAP's frame I/O on the event loop, with a datagram socketpair as the TAP."""

import socket
import struct

import pytest

from voidbox.eventloop import EventLoop
from voidbox.net.fastpath import build_ipv4_tcp
from voidbox.net.tap import TapIO

ETH = bytes.fromhex("525400000002" "525400123456" "0800")
VNET = struct.Struct("<BBHHHH")


@pytest.fixture
def pair():
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    peer.setblocking(False)
    loop = EventLoop(debug=True)
    yield loop, ours, peer
    loop.close()
    ours.close()
    peer.close()


def test_frames_arrive_with_the_frontends_checksum_word(pair):
    loop, ours, peer = pair
    got = []
    tap = TapIO(loop, ours.fileno(), 1500, lambda f, ok: got.append((f, ok)), vnet_hdr=True)
    # A TSO super-frame, longer than the MTU allows, its TCP checksum left to us.
    pkt = bytearray(60100)
    n = build_ipv4_tcp(pkt, bytes([10, 0, 2, 15]), bytes([10, 0, 2, 2]), 1, 40000, 80, 1, 1,
                       0x10, 1000, b"", b"g" * 60000)
    big = ETH + bytes(pkt[:n])
    peer.send(VNET.pack(1, 1, 54, 1448, 34, 16) + big)
    peer.send(VNET.pack(0, 0, 0, 0, 0, 0) + ETH + b"small")
    loop.run_once(1.0)
    assert got == [(big, True), (ETH + b"small", False)]
    assert tap.counters["tap_rx"] == 2 and tap.counters["tap_rx_oversize"] == 1
    tap.close()


def test_refused_writes_queue_then_flush_and_report_writable(pair):
    loop, ours, peer = pair
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    tap = TapIO(loop, ours.fileno(), 1500, lambda f, ok: None, vnet_hdr=True)
    woke = []
    tap.on_writable = lambda: woke.append(True)
    frames = [ETH + bytes([i]) * 1000 for i in range(40)]
    for f in frames:
        tap.write(f)
    assert tap.backlog  # the pair filled up: the rest waits for EPOLLOUT
    received = []
    for _ in range(200):
        while True:
            try:
                received.append(peer.recv(4096))
            except BlockingIOError:
                break
        if len(received) == len(frames):
            break
        loop.run_once(0.05)
    assert [r[10:] for r in received] == frames  # in order, none lost
    assert all(r[:10] == b"\0" * 10 for r in received)
    assert not tap.backlog and woke
    assert tap.counters["tap_tx"] == len(frames)
    tap.close()


def test_stream_blocked_waits_for_epollout(pair):
    loop, ours, peer = pair
    tap = TapIO(loop, ours.fileno(), 1500, lambda f, ok: None, vnet_hdr=True)
    woke = []
    tap.on_writable = lambda: woke.append(True)
    tap.stream_blocked()
    loop.run_once(1.0)  # the pair is writable at once
    assert woke == [True]
    loop.run_once(0)
    assert woke == [True]  # EPOLLOUT interest was dropped again: no spinning
    tap.close()
