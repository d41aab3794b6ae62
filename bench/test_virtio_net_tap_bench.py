"""virtio-net on a TAP: `.venv/bin/pytest bench/test_virtio_net_tap_bench.py --benchmark-only -q`
(root: the TAP lives in a network namespace the bench makes and removes).

The card and the driver mock are test_virtio_net_bench's Rig; the backend is a TapBackend.
Each path is measured two ways in the same run:

- `direct`: what a VM's card does: TX chains go to the TAP as one writev from guest
  memory, RX frames are read straight into the guest's buffers (VirtioNet.rx_from_fd);
- `copy`: the NIC reads each TX frame out of guest memory and hands the bytes over;
  RX frames are read by FramePort's batches and copied into the buffers by receive()
  (what a card with a capture still does).

TX: QUEUE frames offered, one kick; the namespace's stack drops them (the TAP has no
address). RX: QUEUE frames sent into the TAP from the namespace (untimed), then the
timed part offers QUEUE buffers and drains the TAP into them. Nothing asserts a timing.
"""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from bench.test_virtio_net_bench import QUEUE_SIZE, Rig, memory, report  # noqa: F401
from tests.twins import load_ring
from tests.unit.test_tap_backend import inside, ns  # noqa: F401 (ns: the fixture)
from voidbox.eventloop import EventLoop
from voidbox.net.backend import TapBackend
from voidbox.virtio.mmio import VIRTIO_MMIO_QUEUE_NOTIFY
from voidbox.virtio.net import RX_FD_BLOCKED, RX_FD_DRAINED, RX_QUEUE, VIRTIO_NET_HDR_LEN

TAP = "vbbench0"
ROUNDS = 60  # of QUEUE frames each: a round is about a millisecond
SIZES = ["64B", "1500B"]
TX_SIZES = ["64B", "1500B", "64KiB"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace")


@pytest.fixture
def tap(ns):  # noqa: F811 (ns: the imported fixture)
    """(loop, backend, AF_PACKET socket on the TAP's namespace side)."""
    loop = EventLoop()
    with inside(ns):
        backend = TapBackend(loop, TAP)
        subprocess.run(["ip", "link", "set", TAP, "up", "txqueuelen", "4096"], check=True)
        raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
        raw.bind((TAP, 0))
    yield loop, backend, raw
    raw.close()
    backend.close()
    loop.close()


@pytest.mark.parametrize("size", TX_SIZES)
@pytest.mark.parametrize("twin", ["cython", "pure"])
@pytest.mark.parametrize("mode", ["direct", "copy"])
def test_tap_tx(benchmark, record, memory, tap, mode, twin, size):  # noqa: F811
    _loop, backend, _raw = tap
    rig = Rig(load_ring(twin), memory, backend, size, 9)
    if mode == "copy":
        rig.device._tx_direct = None  # the NIC's copying path: guest_frame(bytes)
    try:
        benchmark.pedantic(rig.transmit, rounds=ROUNDS, warmup_rounds=2)
        counters = rig.device.counters
        assert counters["tx_frames"] == (ROUNDS + 2) * QUEUE_SIZE, dict(counters)
        assert counters["tx_direct_frames"] == (counters["tx_frames"] if mode == "direct" else 0)
        assert backend.counters["tap_tx_frames"] == counters["tx_frames"], backend.counters
    finally:
        rig.device.close()
    report(benchmark, record, f"TAP TX {mode:<6} {twin:<6} {size}", len(rig.frame))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("twin", ["cython", "pure"])
@pytest.mark.parametrize("mode", ["direct", "copy"])
def test_tap_rx(benchmark, record, memory, tap, mode, twin, size):  # noqa: F811
    loop, backend, raw = tap
    rig = Rig(load_ring(twin), memory, backend, size, 9)
    # The TAP's MTU: a read takes buffers for the largest such frame (12 + 14 + 4 + MTU,
    # as Linux sizes its mergeable buffers), which the Rig's 1536-byte buffers hold.
    rig.device.mtu = 1500
    if mode == "direct":
        backend.attach(rig.device.receive, rig.device.rx_room, None, card=rig.device)
    frame = rig.frame

    def fill():
        for _ in range(QUEUE_SIZE):
            raw.send(frame)
        return (), {}

    def drain():
        rig.rx_idx += QUEUE_SIZE
        rig.rx.set_avail_idx(rig.rx_idx)
        rig.transport.write(VIRTIO_MMIO_QUEUE_NOTIFY, 4, RX_QUEUE)
        before = rig.device.counters["rx_frames"]
        while rig.device.counters["rx_frames"] - before < QUEUE_SIZE:
            if mode == "direct":
                _placed, status = rig.device.rx_from_fd(backend.fd, QUEUE_SIZE)
                assert status not in (RX_FD_BLOCKED,) and status >= RX_FD_DRAINED, status
            else:
                backend._on_readable(0)

    try:
        benchmark.pedantic(drain, setup=fill, rounds=ROUNDS, warmup_rounds=2)
        counters = rig.device.counters
        assert counters["rx_frames"] == (ROUNDS + 2) * QUEUE_SIZE, dict(counters)
        assert counters["rx_direct_frames"] == (counters["rx_frames"] if mode == "direct" else 0)
        got = memory.read(rig.rx.read_desc(0)[0], VIRTIO_NET_HDR_LEN + len(frame))
        assert got[VIRTIO_NET_HDR_LEN:] == frame
    finally:
        rig.device.close()
    report(benchmark, record, f"TAP RX {mode:<6} {twin:<6} {size}", len(frame))
