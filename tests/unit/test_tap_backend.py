"""TapBackend (`--net tap:NAME`) behind VirtioNet, driven by the driver mock, against a TAP
in a network namespace the test makes.

The backend opens its TAP while this thread is inside the namespace (setns), so the
interface lives there; the namespace side is an AF_PACKET socket bound to it and a UDP
socket on its address, both made inside too. The test thread then returns to its own
namespace and drives the NIC and the network loop by hand.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import struct
import subprocess
import time

import pytest

from tests.unit.netframes import guest_udp_frame
from tests.unit.test_virtio_net import ALL, GUEST_OFFLOADS, QSIZE, Recorder, udp_frame
from tests.unit.test_virtio_net import Nic as _Nic
from voidbox.errors import VoidboxError
from voidbox.eventloop import EventLoop
from voidbox.net.backend import SlirpBackend, TapBackend, open_backend
from voidbox.net.config import GATEWAY_MAC, NatConfig
from voidbox.net.netns import CLONE_NEWNET
from voidbox.net.packets import ETH_P_IP, build_ethernet, checksum, ip_to_bytes
from voidbox.virtio.net import (
    RX_BACKLOG_FRAMES,
    VIRTIO_NET_HDR,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
)

TAP = "vbtap0"
NS_ADDR = "10.9.0.1"  # the namespace's side of the TAP
GUEST_ADDR = "10.9.0.2"
ETH_P_ALL = 0x0003
ETH_P_TEST = 0x88B5  # IEEE 802 local experimental: no stack answers it
GUEST_MAC = bytes.fromhex("020000abcdef")  # test_virtio_net's MAC
# Loop iterations while waiting for frames: a failure bound, not a timing.
MAX_PUMP = 200

_libc = ctypes.CDLL(None, use_errno=True)


def Nic(impl, memory, direct=False, features=ALL, **kw):  # noqa: N802 (test_virtio_net's class)
    """test_virtio_net's NIC on the TAP backend. direct: the backend reads frames straight
    into its RX buffers (as a VM's card without a capture), else it hands over copies."""
    nic = _Nic(impl, memory, features=features, **kw)
    assert nic.device.queues, "the driver mock did not get the NIC live"
    if direct:
        nic.backend.attach(nic.device.receive, nic.device.rx_room, None, card=nic.device)
    return nic


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


@pytest.fixture
def ns():
    """A fresh named network namespace without IPv6 (no router solicitations to filter)."""
    name = f"vbtap{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw",
                        "net.ipv6.conf.all.disable_ipv6=1",
                        "net.ipv6.conf.default.disable_ipv6=1"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


@contextlib.contextmanager
def inside(name: str):
    """Run the block with this thread in namespace `name`; fds made there stay there."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        yield
    finally:
        _setns(home)
        os.close(home)
        os.close(target)


class Wire:
    """The TAP's namespace side: an AF_PACKET socket on it, and a UDP socket at NS_ADDR."""

    def __init__(self, ns: str):
        subprocess.run(["ip", "-n", ns, "link", "set", TAP, "address", GATEWAY_MAC, "up"],
                       check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{NS_ADDR}/24", "dev", TAP],
                       check=True)
        with inside(ns):
            self.raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            self.raw.bind((TAP, 0))
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind((NS_ADDR, 0))
        self.raw.settimeout(5)
        self.udp.settimeout(5)

    def frames_to(self, count: int, start: int = 0) -> list[bytes]:
        """count test frames for the guest, numbered from start, sent out of the TAP."""
        frames = [build_ethernet(GUEST_MAC, bytes.fromhex(GATEWAY_MAC.replace(":", "")),
                                 ETH_P_TEST, struct.pack("!I", i) + b"x" * 60)
                  for i in range(start, start + count)]
        for frame in frames:
            self.raw.send(frame)
        return frames

    def close(self):
        self.raw.close()
        self.udp.close()


@pytest.fixture
def tap(ns):
    """(loop, backend, wire): a TapBackend on TAP in ns, not yet attached to a NIC."""
    loop = EventLoop(debug=True)
    with inside(ns):
        backend = TapBackend(loop, TAP)
    wire = Wire(ns)
    yield loop, backend, wire
    wire.close()
    backend.close()
    loop.close()


def to_namespace(length=100, sport=5555, dport=7):
    frame = guest_udp_frame(ip_to_bytes(NS_ADDR), sport, dport, b"g" * length,
                            src=ip_to_bytes(GUEST_ADDR))
    return frame


@pytest.mark.netns
def test_frames_cross_both_ways(impl, memory, tap):
    loop, backend, wire = tap
    nic = Nic(impl, memory, backend=backend, rx_buffers=QSIZE)
    assert backend.watching
    # Guest -> TAP: the frame appears as sent on the namespace's side, and the namespace's
    # stack takes the UDP datagram in it.
    port = wire.udp.getsockname()[1]
    frame = to_namespace(dport=port)
    nic.send(frame)
    seen = wire.raw.recv(65536)
    assert seen == frame
    assert wire.udp.recvfrom(100) == (b"g" * 100, (GUEST_ADDR, 5555))
    # TAP -> guest: what the namespace sends out of the TAP lands in an RX buffer.
    sent = wire.frames_to(3)
    got = pump(loop, nic, len(sent))
    assert got == sent
    assert backend.counters["tap_tx_frames"] == 1 and backend.counters["tap_rx_frames"] == 3
    assert nic.counters["tx_direct_frames"] == 1


@pytest.mark.netns
def test_frames_are_read_straight_into_rx_buffers(impl, memory, tap):
    """The card's buffers take each frame in one read(2): the kernel's virtio_net_hdr stays
    in front (num_buffers set), one buffer each, and nothing is held in between."""
    loop, backend, wire = tap
    nic = Nic(impl, memory, direct=True, backend=backend, rx_buffers=QSIZE)
    sent = wire.frames_to(5)
    got = pump(loop, nic, len(sent))
    assert got == sent, (dict(nic.counters), backend.counters)
    assert nic.counters["rx_direct_frames"] == 5 and backend.counters["tap_rx_frames"] == 5
    assert backend.port.rx_frames == 0  # FramePort's copying batches were not used


@pytest.mark.netns
def test_a_partial_checksum_is_finished_by_the_kernel(impl, memory, tap):
    """NEEDS_CSUM goes on to the TAP: the datagram carries only the pseudo-header sum, so
    the namespace's stack takes it only because the header says the sum is partial."""
    loop, backend, wire = tap
    nic = Nic(impl, memory, backend=backend)
    port = wire.udp.getsockname()[1]
    frame = bytearray(to_namespace(dport=port))
    l4 = 14 + 20
    src, dst = ip_to_bytes(GUEST_ADDR), ip_to_bytes(NS_ADDR)
    udp_len = len(frame) - l4
    pseudo = sum(struct.unpack("!4H", src + dst)) + 17 + udp_len
    pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
    struct.pack_into("!H", frame, l4 + 6, pseudo)  # partial: not inverted
    header = VIRTIO_NET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, l4, 6, 0)
    nic.send(bytes(frame), header=header)
    assert wire.udp.recvfrom(100) == (b"g" * 100, (GUEST_ADDR, 5555))
    # The chain went to the TAP from guest memory, its header as the guest wrote it.
    assert nic.counters["tx_csum_offloaded"] == 1 and nic.counters["tx_direct_frames"] == 1


def pump_all(loop, nic, want) -> list:
    """Run the loop until want(received so far) holds; -> [(header fields, frame)]."""
    got = []
    for _ in range(MAX_PUMP):
        got += nic.received()
        if want(got):
            break
        loop.run_once(0.02)
    return got


@pytest.mark.netns
@pytest.mark.parametrize("acked", [False, True], ids=["complete", "guest-csum"])
def test_the_taps_offloads_follow_what_the_driver_acked(impl, memory, tap, ns, acked):
    """A datagram the namespace's own stack sends to the guest leaves it with its checksum
    unfinished (CHECKSUM_PARTIAL): with GUEST_CSUM acked the TAP hands it over as such
    (NEEDS_CSUM, the guest finishes it); without, the kernel finishes it first."""
    loop, backend, wire = tap
    subprocess.run(["ip", "-n", ns, "neigh", "replace", GUEST_ADDR, "lladdr",
                    GUEST_MAC.hex(":"), "dev", TAP], check=True)
    features = ALL | (GUEST_OFFLOADS if acked else 0)
    nic = Nic(impl, memory, direct=True, features=features, backend=backend, rx_buffers=QSIZE)
    wire.udp.sendto(b"d" * 300, (GUEST_ADDR, 9))
    got = pump_all(loop, nic, lambda g: any(f[12:14] == b"\x08\x00" for _h, f in g))
    assert any(f[12:14] == b"\x08\x00" for _h, f in got), (dict(nic.counters), backend.counters)
    hdr, frame = next((h, f) for h, f in got if f[12:14] == b"\x08\x00")
    assert frame[14 + 28:] == b"d" * 300
    assert bool(hdr[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM) == acked, hdr
    if not acked:
        src, dst = ip_to_bytes(NS_ADDR), ip_to_bytes(GUEST_ADDR)
        udp = frame[34:]
        pseudo = src + dst + struct.pack("!BBH", 0, 17, len(udp))
        assert checksum(pseudo + udp) == 0  # complete: it checks out as it is
    assert nic.counters["rx_direct_frames"] >= 1
    assert nic.counters["rx_csum_offloaded"] == (1 if acked else 0)


@pytest.mark.netns
def test_no_buffers_stops_reading_and_nothing_is_lost_when_they_come(impl, memory, tap):
    """Read straight into buffers, a guest with none posted leaves the frames in the
    kernel's queue (no backlog here, nothing dropped), and its RX kick resumes reading."""
    loop, backend, wire = tap
    nic = Nic(impl, memory, direct=True, backend=backend, rx_buffers=0)
    sent = wire.frames_to(40)
    for _ in range(MAX_PUMP):
        if not backend.watching:
            break
        loop.run_once(0.02)
    assert not backend.watching and backend.counters["tap_rx_paused"] >= 1
    wakeups = backend.counters["tap_wakeups"]
    for _ in range(5):
        loop.run_once(0.02)
    assert backend.counters["tap_wakeups"] == wakeups  # no CPU while the guest posts none
    got = []
    for _ in range(MAX_PUMP):
        nic.post(len(nic.rx.free))
        got += [data for _hdr, data in nic.received()]
        loop.run_once(0.01)
        if len(got) >= len(sent):
            break
    assert got == sent
    assert nic.counters["rx_drop_backlog_full"] == 0 and nic.counters["rx_direct_frames"] == 40


@pytest.mark.netns
def test_a_frame_longer_than_the_buffer_is_dropped_and_the_next_one_arrives(impl, memory, tap):
    """Without MRG_RXBUF a frame must fit one buffer: a hostile (or small) buffer gets a
    truncated read, which is dropped and counted; the buffer goes back unused."""
    from tests.unit.test_virtio_net import VIRTIO_NET_F_MRG_RXBUF

    loop, backend, wire = tap
    nic = Nic(impl, memory, direct=True, features=ALL & ~(1 << VIRTIO_NET_F_MRG_RXBUF),
              backend=backend, rx_buffers=0)
    nic.post(1, 40)  # room for the header and 28 bytes of frame
    big = wire.frames_to(1)
    for _ in range(MAX_PUMP):
        if nic.counters["rx_drop_truncated"]:
            break
        loop.run_once(0.02)
    assert nic.counters["rx_drop_truncated"] == 1, (dict(nic.counters), backend.counters)
    # The small buffer went back to the driver unused, not to the next read.
    assert [length for _head, length in nic.rx.collect()] == [0]
    nic.post(4)
    after = wire.frames_to(1, start=1)
    got = pump(loop, nic, 1)
    assert got == after and got != big


def pump(loop, nic, count: int) -> list[bytes]:
    """Run the loop until the guest has count test frames; return them in order."""
    got = []
    for _ in range(MAX_PUMP):
        got += [data for _hdr, data in nic.received()
                if data[12:14] == struct.pack("!H", ETH_P_TEST)]
        if len(got) >= count:
            break
        loop.run_once(0.02)
    return got


@pytest.mark.netns
def test_no_rx_buffers_stops_reading_the_tap_and_posting_resumes(impl, memory, tap):
    loop, backend, wire = tap
    nic = Nic(impl, memory, backend=backend, rx_buffers=0)
    total = RX_BACKLOG_FRAMES + 20
    sent = wire.frames_to(total)
    for _ in range(MAX_PUMP):
        if not backend.watching:
            break
        loop.run_once(0.02)
    # The NIC's backlog filled; the next frame was refused (and dropped), so the TAP fd
    # left the loop with the rest of its batch held in order by the backend.
    assert not backend.watching and backend.fd not in loop._watchers
    assert nic.counters["rx_drop_backlog_full"] == 1
    assert backend.counters["tap_rx_refused"] == 1
    wakeups = backend.counters["tap_wakeups"]
    for _ in range(5):
        loop.run_once(0.02)  # nothing watched: the frames wait in the kernel
    assert backend.counters["tap_wakeups"] == wakeups
    # Buffers posted (the RX kick): the backlog goes in, then the held frames, then the
    # TAP is read again.
    got = []
    for _ in range(MAX_PUMP):
        nic.post(QSIZE)
        got += [data for _hdr, data in nic.received()]
        loop.run_once(0.01)
        if len(got) >= total - 1:
            break
    refused = sent[RX_BACKLOG_FRAMES]
    assert got == [f for f in sent if f != refused]
    assert backend.watching


@pytest.mark.netns
def test_an_interface_deleted_under_the_backend_leaves_the_loop(impl, memory, tap, ns):
    loop, backend, wire = tap
    nic = Nic(impl, memory, backend=backend)
    subprocess.run(["ip", "-n", ns, "link", "del", TAP], check=True)
    for _ in range(MAX_PUMP):
        if backend.gone:
            break
        loop.run_once(0.02)
    assert backend.gone and backend.fd not in loop._watchers
    nic.send(to_namespace())  # dropped and counted, nothing raised
    assert backend.counters["tap_tx_dropped_gone"] == 1


@pytest.mark.netns
def test_a_tap_held_by_another_process_falls_back_or_fails(tap, ns, capsys):
    loop, _held, _wire = tap
    with inside(ns):
        backend = open_backend("tap", TAP, "slirp", loop, NatConfig())
        with pytest.raises(VoidboxError) as failure:
            open_backend("tap", TAP, "fail", loop, NatConfig())
    assert isinstance(backend, SlirpBackend)
    line = f"tap:{TAP} unusable (cannot create TAP '{TAP}': Device or resource busy)"
    assert capsys.readouterr().err == \
        f"voidbox: {line}: the guest's card uses the user-mode NAT\n"
    assert str(failure.value) == f"{line}: --net-fallback is fail"


@pytest.mark.netns
def test_guest_frames_go_out_in_order_without_the_loop(impl, memory, tap):
    """TX is a writev per frame on the vCPU's kick: nothing waits for the loop."""
    _loop, backend, wire = tap
    nic = Nic(impl, memory, backend=backend)
    frames = [to_namespace(length=50 + i) for i in range(5)]
    for frame in frames:
        nic.send(frame)
    deadline = time.monotonic() + 5
    seen = []
    while len(seen) < len(frames) and time.monotonic() < deadline:
        data = wire.raw.recv(65536)
        if data[12:14] == struct.pack("!H", ETH_P_IP):
            seen.append(data)
    assert seen == frames


class Pausing(Recorder):
    """A backend that counts the NIC's rx_ready() calls."""

    def __init__(self):
        super().__init__()
        self.ready = 0

    def rx_ready(self):
        self.ready += 1


def test_the_nic_signals_rx_ready_once_its_backlog_is_placed(impl, memory):
    nic = Nic(impl, memory, backend=Pausing(), rx_buffers=0)
    ready = nic.backend.ready  # going live counts as one
    frames = [udp_frame(100 + i) for i in range(QSIZE + 2)]
    for frame in frames:
        assert nic.backend.deliver(frame)  # backlogged
    nic.post(QSIZE)  # room for all but two: the backend must still wait
    assert nic.backend.ready == ready
    got = [data for _hdr, data in nic.received()]
    nic.post(QSIZE)
    assert nic.backend.ready == ready + 1
    assert got + [data for _hdr, data in nic.received()] == frames


@pytest.mark.netns
def test_with_a_capture_the_frame_sent_is_the_frame_captured(impl, memory, tap, tmp_path):
    """With a capture the NIC reads each TX frame once and sends that copy: a second read
    of guest memory could capture other bytes than the TAP got."""
    from voidbox.net.pcap import PcapWriter

    loop, backend, wire = tap
    nic = Nic(impl, memory, direct=True, backend=backend)
    capture = tmp_path / "tx.pcap"
    nic.device.pcap = PcapWriter(str(capture))
    frame = to_namespace(dport=wire.udp.getsockname()[1])
    nic.send(frame)
    assert wire.raw.recv(65536) == frame
    nic.device.pcap.close()
    raw = capture.read_bytes()
    assert raw.endswith(frame) and len(raw) == 24 + 16 + len(frame)  # one record: that frame
    assert nic.counters["tx_captured_copies"] == 1 and nic.counters["tx_direct_frames"] == 0
    assert backend.counters["tap_tx_frames"] == 1


@pytest.mark.netns
def test_hostile_tx_headers_never_reach_the_tap(impl, memory, tap):
    """A TX chain goes to the TAP from guest memory only after its header passed the NIC's
    checks: GSO that was not negotiated, a checksum field outside the frame, DATA_VALID
    (RX-only) are dropped and counted, and the TAP sees nothing of them."""
    from tests.unit.test_virtio_net import VIRTIO_NET_F_HOST_TSO4

    loop, backend, wire = tap
    nic = Nic(impl, memory, direct=True, features=ALL & ~(1 << VIRTIO_NET_F_HOST_TSO4),
              backend=backend)
    frame = to_namespace(length=1000)
    nic.send(frame, header=VIRTIO_NET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 1, 54, 500, 34, 16, 0))
    nic.send(frame, header=VIRTIO_NET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 2000, 6, 0))
    nic.send(frame, header=VIRTIO_NET_HDR.pack(2, 0, 0, 0, 0, 0, 0))
    c = nic.counters
    assert (c["tx_drop_gso_not_negotiated"], c["tx_drop_bad_csum"], c["tx_drop_bad_flags"]) == (1, 1, 1)
    assert backend.counters.get("tap_tx_frames", 0) == 0 and c["tx_direct_frames"] == 0
    wire.raw.settimeout(0.2)
    with pytest.raises(TimeoutError):
        wire.raw.recv(65536)
