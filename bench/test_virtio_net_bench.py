"""virtio-net device core throughput: `.venv/bin/pytest bench/test_virtio_net_bench.py --benchmark-only -q`.

VirtioNet sits on its MMIO transport; the guest is the driver mock (tests/virtio_driver.py).
The rings are filled once; each round the "driver" only moves avail->idx on by the queue
size, re-offering the chains just retired, so the time is the device's:

- TX (guest -> backend): QUEUE chains of header + frame, one QueueNotify; the device pops,
  checks each header, reads each frame and hands it to the backend;
- RX (backend -> guest): one RX kick re-offering QUEUE buffers, then QUEUE frames given to
  `device.receive()` as a backend does; the device pops, writes header + frame, pushes.

Backends: `null` counts frames; `slirp` is the real NAT (voidbox.net.backend.SlirpBackend):
each TX frame is a UDP datagram to 10.0.2.2 (the host's loopback) at a port nobody reads,
so the engine parses it, finds its flow and does one sendto() (the kernel then drops it
at the full receive buffer). Frames: 64 B, 1514 B (a 1500-byte IP packet) and 65549 B
(a 65535-byte IP packet), on both ring twins. A plain copy of the same bytes per round
(bytes(bytearray), numpy) is the ceiling. Nothing here asserts a timing.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest

from tests.twins import load_ring
from tests.unit.netframes import GATEWAY, guest_udp_frame
from tests.unit.test_virtio_mmio import Guest, Signals
from tests.virtio_driver import Driver
from voidbox.eventloop import EventLoop
from voidbox.layout import MiB
from voidbox.memory import GuestMemory
from voidbox.net.backend import NullBackend, SlirpBackend
from voidbox.net.config import NatConfig
from voidbox.net.policy import Policy
from voidbox.virtio.device import (
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
)
from voidbox.virtio.mmio import VIRTIO_MMIO_QUEUE_NOTIFY, VirtioMmioTransport
from voidbox.virtio.net import (
    QUEUE_SIZE,
    RX_QUEUE,
    TX_QUEUE,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_HDR,
    VIRTIO_NET_HDR_LEN,
    VirtioNet,
)

MEM = 64 * MiB  # QUEUE x 64 KiB buffers per queue, twice
MAC = bytes.fromhex("02000000be0c")
FEATURES = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_EVENT_IDX) | (1 << VIRTIO_F_INDIRECT_DESC)
            | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_MRG_RXBUF) | (1 << VIRTIO_NET_F_CSUM)
            | (1 << VIRTIO_NET_F_HOST_TSO4))
# name -> UDP payload bytes: frames of 64, 1514 and 65549 bytes (14 + 20 + 8 + payload)
SIZES = {"64B": 22, "1500B": 1472, "64KiB": 65535 - 28}
RX_DATA, TX_DATA = 0x100_0000, 0x200_0000  # RX and TX buffers: 16 MiB each (QUEUE x 64 KiB)


def frame_of(size: str, port: int) -> bytes:
    return guest_udp_frame(GATEWAY, 40000, port, b"\xa7" * SIZES[size])


class Rig:
    """VirtioNet on a transport, live, both queues filled once by the driver mock."""

    def __init__(self, impl, memory, backend, size, port):
        self.frame = frame_of(size, port)
        self.backend = backend
        self.device = VirtioNet(backend, MAC, mtu=65520)
        backend.attach(self.device.receive, self.device.rx_room)
        signals = Signals()
        self.transport = VirtioMmioTransport(self.device, memory, signals,
                                             ring_factory=impl.Virtqueue)
        signals.transport = self.transport
        guest = Guest(self.transport)
        guest.negotiate(FEATURES)
        self.rx = Driver(memory, size=QUEUE_SIZE)
        self.tx = Driver(memory, size=QUEUE_SIZE, desc_addr=0x50_0000, avail_addr=0x60_0000,
                         used_addr=0x70_0000)
        assert guest.setup_driver_queue(RX_QUEUE, self.rx) == 1
        assert guest.setup_driver_queue(TX_QUEUE, self.tx) == 1
        assert guest.driver_ok() & VIRTIO_CONFIG_S_DRIVER_OK
        packet = VIRTIO_NET_HDR.pack(0, 0, 0, 0, 0, 0, 0) + self.frame
        stride = (max(len(packet), 1526) + 15) & ~15
        self.tx._data_next = TX_DATA
        for i in range(QUEUE_SIZE):
            memory.write(TX_DATA + stride * i, packet)
            self.tx.add_chain([(TX_DATA + stride * i, len(packet), False)], publish=False)
            self.rx.add_chain([(RX_DATA + stride * i, stride, True)], publish=False)
        self.tx_idx = self.rx_idx = 0

    def transmit(self):
        """One TX round: QUEUE frames offered, one kick."""
        self.tx_idx += QUEUE_SIZE
        self.tx.set_avail_idx(self.tx_idx)
        self.transport.write(VIRTIO_MMIO_QUEUE_NOTIFY, 4, TX_QUEUE)

    def receive(self):
        """One RX round: QUEUE buffers offered (one kick), QUEUE frames delivered."""
        self.rx_idx += QUEUE_SIZE
        self.rx.set_avail_idx(self.rx_idx)
        self.transport.write(VIRTIO_MMIO_QUEUE_NOTIFY, 4, RX_QUEUE)
        deliver, frame = self.device.receive, self.frame
        for _ in range(QUEUE_SIZE):
            deliver(frame)


@pytest.fixture(scope="module")
def memory():
    with GuestMemory(MEM) as mem:
        yield mem


@pytest.fixture(scope="module")
def sink():
    """A UDP port on the host's loopback that nobody reads: where slirp's TX goes."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        yield sock.getsockname()[1]


def report(benchmark, record, name, frame_bytes):
    """Frames/s and Mbit/s from the median round (QUEUE frames a round), in the summary
    bench/conftest.py prints and in the benchmark's extra_info."""
    fps = QUEUE_SIZE / benchmark.stats.stats.median
    mbit = fps * frame_bytes * 8e-6
    record(f"{name} frames/s", fps, "frames/s")
    record(f"{name} Mbit/s", mbit, "Mbit/s")
    benchmark.extra_info.update(frames_per_s=round(fps), gbit_per_s=round(mbit / 1000, 3))


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("twin", ["cython", "pure"])
@pytest.mark.parametrize("backend_name", ["null", "slirp"])
def test_tx(benchmark, record, memory, sink, backend_name, twin, size):
    loop = None
    if backend_name == "null":
        backend = NullBackend()
    else:
        loop = EventLoop()
        backend = SlirpBackend(loop, NatConfig(mtu=65520), Policy(host_loopback=True))
    rig = Rig(load_ring(twin), memory, backend, size, sink)
    try:
        benchmark.pedantic(rig.transmit, rounds=15, warmup_rounds=2)
        frames = rig.device.counters["tx_frames"]
        assert frames == 17 * QUEUE_SIZE  # every frame reached the backend
        if backend_name == "null":
            assert backend.frames == frames
        else:
            counters = backend.counters
            benchmark.extra_info["udp_tx"] = counters.get("udp_tx", 0)
            assert counters.get("udp_tx", 0) + counters.get("udp_tx_error", 0) == frames, counters
    finally:
        rig.device.close()
        if loop is not None:
            loop.close()
    report(benchmark, record, f"TX {backend_name:<5} {twin:<6} {size}", len(rig.frame))


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("twin", ["cython", "pure"])
def test_rx(benchmark, record, memory, twin, size):
    rig = Rig(load_ring(twin), memory, NullBackend(), size, 9)
    benchmark.pedantic(rig.receive, rounds=15, warmup_rounds=2)
    assert rig.device.counters["rx_frames"] == 17 * QUEUE_SIZE
    assert not rig.device._rx_backlog
    got = memory.read(rig.rx.read_desc(0)[0], VIRTIO_NET_HDR_LEN + len(rig.frame))
    assert got[VIRTIO_NET_HDR_LEN:] == rig.frame
    report(benchmark, record, f"RX null  {twin:<6} {size}", len(rig.frame))


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("how", ["bytes", "numpy"])
def test_memcpy(benchmark, record, how, size):
    """The ceiling: QUEUE copies of the same frame, as one round moves."""
    n = len(frame_of(size, 9))
    if how == "bytes":
        src = bytearray(b"\xa7" * n)

        def copy():
            for _ in range(QUEUE_SIZE):
                bytes(src)
    else:
        src, dst = np.full(n, 0xA7, np.uint8), np.empty(n, np.uint8)

        def copy():
            for _ in range(QUEUE_SIZE):
                np.copyto(dst, src)
    benchmark.pedantic(copy, rounds=15, warmup_rounds=2)
    report(benchmark, record, f"memcpy {how:<11} {size}", n)

