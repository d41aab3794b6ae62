"""virtio-net behind the virtio-mmio transport under a hostile driver (hypothesis).

Each example plays the guest only through the register file (virtio 1.2 §4.2.2) and
guest memory, on both ring twins. It negotiates an arbitrary feature set (sometimes one
the device did not offer, sometimes without VERSION_1), sets up receiveq1 and transmitq1
(sometimes badly), then runs a random sequence of:

- RX chains of writable buffers (inside RAM, outside it, in the MMIO gap, zero-length,
  shorter than the 12-byte header, up to 64 KiB and beyond), direct or indirect, sometimes
  with a readable descriptor in front;
- TX chains of header + frame split over descriptors: valid headers, checksum and GSO
  requests pointing anywhere, arbitrary header bytes, runts, 64 KiB+ frames;
- raw descriptors (loops, NEXT past the queue size, INDIRECT with NEXT...), raw available
  ring slots and indexes, avail flags;
- QueueNotify writes for either queue (and for queues that do not exist);
- frames the backend delivers to the guest (any length, the backlog filling up), among
  them IPv4 and IPv6 TCP frames longer than the MTU (a GSO frame for a guest that acked
  GUEST_TSO4 / GUEST_TSO6, cut into segments for one that did not);
- bursts of host TCP data through the card's stream port, IPv4 and IPv6 flows (a loopback
  socket's bytes, any MSS and budget: GSO frames over whatever RX chains the driver posted);
- register writes (status bits on and off, features, queue registers, interrupt ack);
- resets followed by a new, possibly hostile, negotiation and queue setup.

Checked after every step: no exception escapes (a corrupt ring is the transport's
DEVICE_NEEDS_RESET, never an exception), the backend only ever sees frames of
ETH_HLEN..MAX_FRAME bytes, every used entry names a chain the device holds and claims at
most its writable bytes (§2.7.8.2), and the RX backlog stays within RX_BACKLOG_FRAMES, and no RX header carries an offload the
driver did not ack.
At the end: every byte of guest memory outside the used rings and the writable buffers
of chains the device popped keeps the value the driver last wrote there (memory starts
filled with a canary), and after a reset and a clean setup a well-formed frame goes
through both ways.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from tests.unit.netframes import GATEWAY, GUEST, guest_udp_frame
from tests.unit.test_virtio_mmio import Guest, Signals
from tests.virtio_driver import Driver
from voidbox.layout import MIN_MEM, MMIO_GAP_START, KiB
from voidbox.memory import GuestMemory
from voidbox.net.fastpath import build_ipv4_tcp, build_ipv6_tcp
from voidbox.net.ipv6 import ip6_to_bytes
from voidbox.ring import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    avail_ring_size,
    used_ring_size,
)
from voidbox.virtio.device import (
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
)
from voidbox.virtio.mmio import (
    VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    VIRTIO_MMIO_INTERRUPT_ACK,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_STATUS,
    VirtioMmioTransport,
)
from voidbox.virtio.net import (
    ETH_HLEN,
    MAX_FRAME,
    QUEUE_SIZE,
    RX_BACKLOG_FRAMES,
    RX_QUEUE,
    TX_QUEUE,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_HDR,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_LEN,
    VirtioNet,
)

MEM = MIN_MEM  # compared byte for byte after each example: the smallest RAM allowed
CANARY = 0x5A
MAC = bytes.fromhex("020000fa2201")
# Where the hostile driver puts its rings (per queue), tables and buffers.
RINGS = {RX_QUEUE: (0x1_0000, 0x2_0000, 0x3_0000), TX_QUEUE: (0x4_0000, 0x5_0000, 0x6_0000)}
TABLES = 0x8_0000  # indirect tables, 0x1000 apart
TABLE_BYTES = 0x1000
DATA = 0x10_0000  # buffers, bump-allocated
DATA_END = MEM - 2 * 64 * KiB - 0x1000  # leave room for the clean setup at the end
# The clean setup after the hostile run: its own rings and buffers.
CLEAN_RINGS = {RX_QUEUE: (0xA_0000, 0xB_0000, 0xC_0000), TX_QUEUE: (0xD_0000, 0xE_0000, 0xF_0000)}
CLEAN_DATA = MEM - 2 * 64 * KiB
U16_MASK = 0xFFFF
U32 = 0xFFFFFFFF
U64_MAX = (1 << 64) - 1
OFFERED = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_EVENT_IDX) | (1 << VIRTIO_F_INDIRECT_DESC)
           | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_MTU) | (1 << VIRTIO_NET_F_STATUS)
           | (1 << VIRTIO_NET_F_MRG_RXBUF) | (1 << VIRTIO_NET_F_CSUM)
           | (1 << VIRTIO_NET_F_HOST_TSO4) | (1 << VIRTIO_NET_F_GUEST_CSUM)
           | (1 << VIRTIO_NET_F_GUEST_TSO4) | (1 << VIRTIO_NET_F_HOST_TSO6)
           | (1 << VIRTIO_NET_F_GUEST_TSO6))
OFFERED_BITS = [bit for bit in range(64) if OFFERED >> bit & 1]
UNOFFERED_BITS = [13, 22, 40]  # HOST_ECN, CTRL_MAC_ADDR, RING_PACKED...: never offered
FUZZ_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large, HealthCheck.large_base_example],
)


@pytest.fixture(scope="module")
def memory():
    with GuestMemory(MEM) as mem:
        yield mem


# -- the device's side, watched ----------------------------------------------------------


class Backend:
    """The NAT's place: checks every frame the device hands over, keeps them."""

    accepts_partial_checksums = True
    accepts_tso4 = True
    accepts_tso6 = True
    produces_guest_offloads = True

    def __init__(self):
        self.sent: list[bytes] = []

    def attach(self, deliver):
        self.deliver = deliver

    def guest_frame(self, frame, csum_verified=False):
        assert ETH_HLEN <= len(frame) <= MAX_FRAME, f"backend got a {len(frame)}-byte frame"
        self.sent.append(bytes(frame))


def spy_ring_factory(impl, log):
    """Rings that record what they hand the device and check what it gives back."""

    class SpyQueue(impl.Virtqueue):
        def activate(self, *args, **kwargs):
            super().activate(*args, **kwargs)
            log["used_rings"].append((self.used_addr, used_ring_size(self.size)))
            self.held = {}
            self.segments = {}  # head -> its writable (gpa, length) as last popped

        def pop(self, max_chains=None, require=0):
            chains = super().pop(max_chains, require)
            for chain in chains:
                # A hostile driver may offer a head the device still holds: both count,
                # and which buffer a used entry names is then ambiguous.
                if self.held.get(chain.head):
                    log["ambiguous"] = True
                self.held.setdefault(chain.head, []).append(chain.writable)
                self.segments[chain.head] = [(gpa, n) for gpa, n, w in chain.segments if w]
                log["writable"] += [(gpa, n) for gpa, n, w in chain.segments if w and n]
            log["popped"] += len(chains)
            return chains

        def push_many(self, completions):
            completions = list(completions)
            for head, written in completions:
                assert self.held.get(head), f"used entry for head {head}, which the device does not hold"
                fits = [w for w in self.held[head] if 0 <= written <= w]
                assert fits, f"head {head}: {written} bytes claimed of {self.held[head]}"
                self.held[head].remove(fits[0])
                if written >= 12:  # the first 12 bytes written: a header if one starts here
                    first = b"".join(self.memory.read(gpa, min(n, 12))
                                     for gpa, n in self.segments[head][:12])[:12]
                else:
                    first = None
                log["completions"].append((self, written, first))
            log["used"] += len(completions)
            return super().push_many(completions)

        def push(self, head, written):
            return self.push_many([(head, written)])

    return SpyQueue


class ShadowMemory:
    """Guest memory as the driver wrote it: Driver mocks write through this."""

    def __init__(self, memory):
        self.memory = memory
        self.size = memory.size
        self.before = memory.numpy().copy()

    def write(self, gpa, data):
        self.memory.write(gpa, data)
        self.before[gpa:gpa + len(data)] = np.frombuffer(bytes(data), np.uint8)

    def read(self, gpa, length):
        return self.memory.read(gpa, length)


# -- strategies ---------------------------------------------------------------------------


def mostly(valid, hostile, weight=3):
    return st.sampled_from([True] * weight + [False]).flatmap(lambda ok: valid if ok else hostile)


hostile_addresses = st.one_of(
    st.sampled_from([0, MEM - 1, MEM - 16, MEM, MEM + 4096, MMIO_GAP_START, 0xD000_0000,
                     0xFEE0_0000, 1 << 32, U64_MAX - 15, U64_MAX, RINGS[RX_QUEUE][2],
                     RINGS[TX_QUEUE][0], TABLES]),
    st.integers(0, MEM),
    st.integers(0, U64_MAX),
)
rx_lengths = mostly(st.sampled_from([1526, 2048, 4096, 1526, 100, 12, 5, 0]),
                    st.one_of(st.sampled_from([0, 1, 11, 12, 13, 26, 64, 65562, 70000, U32]),
                              st.integers(0, 3000)))


def _feature_set(offered, unoffered, version_1):
    bits = sum(1 << b for b in set(offered) | set(unoffered))
    version = 1 << VIRTIO_F_VERSION_1
    return bits | version if version_1 else bits & ~version


features = st.builds(
    _feature_set,
    st.lists(st.sampled_from(OFFERED_BITS), unique=True),
    mostly(st.just([]), st.lists(st.sampled_from(UNOFFERED_BITS), max_size=2), weight=8),
    mostly(st.just(True), st.just(False), weight=10),
)
good_sizes = st.sampled_from([16, 8, 4, 16, 2, 1])
queue_sizes = mostly(good_sizes, st.sampled_from([0, 3, QUEUE_SIZE, QUEUE_SIZE * 2, U32]), weight=9)


@st.composite
def setup(draw):
    """A negotiation and the two queues' registers: (features, [(size, desc, avail, used)])."""
    queues = []
    for q in (RX_QUEUE, TX_QUEUE):
        size = draw(queue_sizes)
        desc, avail, used = RINGS[q]
        if draw(mostly(st.just(False), st.just(True), weight=12)):
            part = draw(st.integers(0, 2))
            addr = draw(st.one_of(hostile_addresses, st.integers(1, 15)).map(
                lambda o, base=RINGS[q][part]: base + o if o < 16 else o))
            desc, avail, used = [addr if i == part else a for i, a in enumerate((desc, avail, used))]
        queues.append((size, desc, avail, used, draw(mostly(st.just(True), st.just(False), weight=15))))
    return draw(features), queues


@st.composite
def rx_chain(draw):
    segs = [(draw(mostly(st.none(), hostile_addresses, weight=12)), draw(rx_lengths), True)
            for _ in range(draw(st.integers(1, 3)))]
    if draw(mostly(st.just(False), st.just(True), weight=15)):
        segs.insert(0, (None, b"\x11" * 16, False))  # a device-readable buffer on the RX queue
    return ("rx", segs, draw(mostly(st.just(False), st.just(True))), draw(st.booleans()))


header_fields = st.integers(0, U16_MASK)


@st.composite
def tx_header(draw):
    kind = draw(st.sampled_from(["plain"] * 4 + ["csum", "csum anywhere", "gso", "random", "short"]))
    if kind == "plain":
        return VIRTIO_NET_HDR.pack(0, 0, 0, 0, 0, 0, 0)
    if kind == "csum":
        return VIRTIO_NET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 6, 0)
    if kind == "csum anywhere":
        return VIRTIO_NET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0,
                                   draw(st.one_of(st.integers(0, 200), header_fields)),
                                   draw(st.one_of(st.integers(0, 40), header_fields)), 0)
    if kind == "gso":
        return VIRTIO_NET_HDR.pack(
            draw(st.sampled_from([VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 3])),
            draw(st.sampled_from([VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV4
                                  | VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_TCPV6,
                                  VIRTIO_NET_HDR_GSO_TCPV6 | VIRTIO_NET_HDR_GSO_ECN, 3, 5,
                                  0xFF])),
            draw(st.one_of(st.integers(0, 100), header_fields)),
            draw(st.one_of(st.sampled_from([0, 1, 1428, 1448]), header_fields)),
            draw(st.sampled_from([34, 54, 0, 0xFFFF])), draw(st.sampled_from([16, 6, 0xFFFF])),
            draw(header_fields))
    if kind == "random":
        return draw(st.binary(min_size=VIRTIO_NET_HDR_LEN, max_size=VIRTIO_NET_HDR_LEN))
    return draw(st.binary(max_size=VIRTIO_NET_HDR_LEN - 1))


BIGGEST_UDP = guest_udp_frame(GATEWAY, 5555, 7, b"q" * (65535 - 28))  # a 64 KiB IPv4 packet
STREAM_ETH = MAC + bytes.fromhex("525500000202") + b"\x08\x00"
STREAM_ETH6 = MAC + bytes.fromhex("525500000202") + b"\x86\xdd"
GUEST6, GATEWAY6 = ip6_to_bytes("fd00::100"), ip6_to_bytes("fd00::2")


def host_tcp_frame(n: int, v6: bool = False) -> bytes:
    """A host -> guest TCP frame with n payload bytes, as the NAT would build it."""
    if v6:
        out = bytearray(60 + n)
        build_ipv6_tcp(out, GATEWAY6, GUEST6, 0, 80, 40000, 1000, 1, 0x18, 500, b"", b"t" * n)
        return STREAM_ETH6 + bytes(out)
    out = bytearray(40 + n)
    build_ipv4_tcp(out, GATEWAY, GUEST, 1, 80, 40000, 1000, 1, 0x18, 500, b"", b"t" * n)
    return STREAM_ETH + bytes(out)


def guest_tcp6_frame(n: int) -> bytes:
    """A guest -> host IPv6 TCP frame with n payload bytes (a TSO segment when n is big)."""
    out = bytearray(60 + n)
    build_ipv6_tcp(out, GUEST6, GATEWAY6, 0, 40000, 80, 1, 1000, 0x18, 500, b"", b"g" * n)
    return MAC[::-1] + MAC + b"\x86\xdd" + bytes(out)
tx_frames = st.one_of(
    st.integers(0, 1500).map(lambda n: guest_udp_frame(GATEWAY, 5555, 7, b"p" * n)),
    st.binary(max_size=80),
    st.sampled_from([BIGGEST_UDP[:13], BIGGEST_UDP[:14], BIGGEST_UDP[:15], BIGGEST_UDP,
                     BIGGEST_UDP.ljust(MAX_FRAME, b"v"), BIGGEST_UDP.ljust(MAX_FRAME + 1, b"v")]),
    st.sampled_from([0, 1, 1440, 60000, 65475]).map(guest_tcp6_frame),
    st.sampled_from([54, 60, 74, 80]).map(lambda n: guest_tcp6_frame(3000)[:n]),
)


@st.composite
def tx_chain(draw):
    data = draw(tx_header()) + draw(tx_frames)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
    pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)], strict=True)]
    segs = [(draw(mostly(st.none(), hostile_addresses, weight=15)), piece, False) for piece in pieces]
    if draw(mostly(st.just(False), st.just(True), weight=15)):
        segs.append((None, b"\0" * 16, True))  # a device-writable buffer on the TX queue
    return ("tx", segs, draw(mostly(st.just(False), st.just(True))), draw(mostly(st.just(True), st.just(False))))


raw_descriptor = st.tuples(
    mostly(st.integers(DATA, DATA + 64 * KiB), hostile_addresses),
    mostly(st.integers(0, 2048), st.sampled_from([0, 12, 16, 32, U32])),
    st.one_of(st.integers(0, 7), st.integers(0, U16_MASK)),
    st.one_of(st.integers(0, 17), st.integers(0, U16_MASK)),
)
queue_index = mostly(st.sampled_from([RX_QUEUE, TX_QUEUE]), st.sampled_from([2, 3, U32]), weight=12)
REGISTERS = [VIRTIO_MMIO_STATUS, VIRTIO_MMIO_QUEUE_SEL, VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_READY,
             VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_USED_LOW,
             VIRTIO_MMIO_DRIVER_FEATURES, VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INTERRUPT_ACK]
register_values = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 7, 0xB, 0xF, 0x4F, 0x8F, 8, 16, U32]),
                            st.integers(0, U32))

STEPS = {
    "rx": rx_chain(),
    "tx": tx_chain(),
    "kick": st.tuples(st.just("kick"), queue_index),
    "deliver": st.tuples(st.just("deliver"), mostly(st.integers(14, 1600), st.sampled_from(
        [0, 13, MAX_FRAME, MAX_FRAME + 1, 9000, 65000])), mostly(st.integers(1, 3),
                                                                 st.integers(1, 300))),
    "deliver_tcp": st.tuples(st.just("deliver_tcp"), mostly(
        st.sampled_from([1440, 1441, 1460, 1461, 4000, 65475]), st.integers(0, 65475)),
        st.integers(1, 3), st.booleans()),
    "stream": st.tuples(st.just("stream"), st.integers(0, 300_000),
                        mostly(st.sampled_from([1460, 536, 1440]),
                               st.sampled_from([1, 48, 535, 9000, 65475])),
                        mostly(st.just(1 << 20), st.integers(0, 200_000)), st.booleans()),
    "desc": st.tuples(st.just("desc"), st.sampled_from([RX_QUEUE, TX_QUEUE]),
                      st.one_of(st.none(), st.integers(0, 3)), st.integers(0, 17), raw_descriptor),
    "avail_idx": st.tuples(st.just("avail_idx"), st.sampled_from([RX_QUEUE, TX_QUEUE]),
                           st.one_of(st.sampled_from(["+0", "+1", "+size", "+size+1", "-1"]),
                                     st.integers(0, U16_MASK))),
    "avail_slot": st.tuples(st.just("avail_slot"), st.sampled_from([RX_QUEUE, TX_QUEUE]),
                            st.integers(0, 17), mostly(st.integers(0, 16), st.integers(0, U16_MASK))),
    "avail_flags": st.tuples(st.just("avail_flags"), st.sampled_from([RX_QUEUE, TX_QUEUE]),
                             st.integers(0, 3), st.integers(0, U16_MASK)),
    "reg": st.tuples(st.just("reg"), st.one_of(st.sampled_from(REGISTERS), st.integers(0, 0x110)),
                     register_values),
    "reset": st.tuples(st.just("reset"), setup()),
}
# How often each kind of step comes up: mostly traffic, so that chains get far enough.
STEP_WEIGHTS = {"rx": 4, "tx": 5, "kick": 6, "deliver": 3, "deliver_tcp": 1, "stream": 2,
                "desc": 1, "avail_idx": 1, "avail_slot": 1, "avail_flags": 1, "reg": 1,
                "reset": 1}
step = st.sampled_from([kind for kind, n in STEP_WEIGHTS.items() for _ in range(n)]).flatmap(
    STEPS.__getitem__)


# -- one example ----------------------------------------------------------------------------


class Play:
    """The hostile driver's state for one example."""

    def __init__(self, impl, memory):
        memory.numpy().fill(CANARY)
        self.memory = memory
        self.shadow = ShadowMemory(memory)
        self.log = {"used_rings": [], "writable": [], "popped": 0, "used": 0,
                    "completions": [], "ambiguous": False, "headers_checked": 0}
        self.continuations = 0  # RX buffers still to come for the frame being checked
        self.backend = Backend()
        self.device = VirtioNet(self.backend, MAC)
        self.backend.attach(self.device.receive)
        self.signals = Signals()
        self.transport = VirtioMmioTransport(self.device, memory, self.signals,
                                             ring_factory=spy_ring_factory(impl, self.log))
        self.signals.transport = self.transport
        self.guest = Guest(self.transport)
        self.drivers: dict[int, Driver] = {}
        self.data_next = DATA
        self.tables = 0
        self.delivered = 0
        self.sockets = None  # (near, far): a loopback TCP connection for the stream port

    def stream(self, nbytes, mss, budget, v6=False):
        """A burst of host TCP data through the stream port, then what it sent consumed
        (as the guest's ACK would), so SO_PEEK_OFF is back at 0."""
        if self.sockets is None:
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            far = socket.create_connection(listener.getsockname())
            near, _ = listener.accept()
            listener.close()
            near.setsockopt(socket.SOL_SOCKET, 42, 0)  # SO_PEEK_OFF
            near.setblocking(False)
            far.setblocking(False)
            self.sockets = (near, far)
            self.port = self.device.stream_port()
        near, far = self.sockets
        try:
            far.send(b"s" * nbytes)
        except BlockingIOError:
            pass
        eth, src, dst = (STREAM_ETH6, GATEWAY6, GUEST6) if v6 else (STREAM_ETH, GATEWAY, GUEST)
        sent, peeked, frames, _status = self.port.send_tcp_stream(
            near.fileno(), eth, src, dst, 80, 40000, 1, 1, 500, mss, budget, 1)
        assert 0 <= sent == peeked <= budget and 0 <= frames <= 256
        if sent:
            assert len(near.recv(sent)) == sent

    def close(self):
        if self.sockets is not None:
            for sock in self.sockets:
                sock.close()

    def alloc(self, length, fill=None):
        length = min(length, 70000)
        if self.data_next + length > DATA_END:
            self.data_next = DATA
        gpa = self.data_next
        self.data_next += (max(length, 1) + 15) & ~15
        if fill is not None:
            self.shadow.write(gpa, fill)
        return gpa

    def setup(self, feature_bits, queues):
        status = self.guest.negotiate(feature_bits)
        features_ok = bool(status & VIRTIO_CONFIG_S_FEATURES_OK)
        assert features_ok == (feature_bits & ~OFFERED == 0 and feature_bits >> VIRTIO_F_VERSION_1 & 1)
        self.drivers = {}
        for q, (size, desc, avail, used, ready) in zip((RX_QUEUE, TX_QUEUE), queues, strict=True):
            drv = Driver(self.shadow, size=max(size & 0xFFFF, 1), desc_addr=desc, avail_addr=avail,
                         used_addr=used, event_idx=bool(feature_bits >> VIRTIO_F_EVENT_IDX & 1))
            if (desc, avail, used) == RINGS[q] and 0 < size <= QUEUE_SIZE:
                self.shadow.write(avail, bytes(avail_ring_size(size)))
                self.shadow.write(used, bytes(used_ring_size(size)))
                self.drivers[q] = drv
            self.guest.setup_queue(q, size, desc, avail, used, ready=ready)
        return self.guest.driver_ok()

    def chain(self, q, segs, indirect):
        drv = self.drivers.get(q)
        if drv is None:
            return
        placed = []
        for addr, what, writable in segs:
            if writable:
                length = what if isinstance(what, int) else len(what)
                if addr is None:
                    addr = self.alloc(length)
            else:
                length = len(what)
                if addr is None:
                    addr = self.alloc(length, what)
            placed.append((addr, length, writable))
        entries = []
        for i, (addr, length, writable) in enumerate(placed):
            last = i == len(placed) - 1
            flags = (0 if last else VIRTQ_DESC_F_NEXT) | (VIRTQ_DESC_F_WRITE if writable else 0)
            entries.append((addr, length, flags, i + 1))
        if not drv.free:
            drv.free = list(range(drv.size))
        if indirect:
            table = TABLES + TABLE_BYTES * (self.tables % 4)
            self.tables += 1
            for i, entry in enumerate(entries):
                drv.write_desc(i, *entry, table=table)
            head = drv.free.pop(0)
            drv.write_desc(head, table, 16 * len(entries), VIRTQ_DESC_F_INDIRECT)
        else:
            if len(drv.free) < len(entries):
                drv.free = list(range(drv.size))
                if len(drv.free) < len(entries):
                    return
            indexes = [drv.free.pop(0) for _ in entries]
            for i, (addr, length, flags, _next) in enumerate(entries):
                drv.write_desc(indexes[i], addr, length, flags,
                               indexes[i + 1] if i + 1 < len(indexes) else 0)
            head = indexes[0]
        drv.offer(head)

    def run(self, op):
        kind = op[0]
        if kind in ("rx", "tx"):
            q = RX_QUEUE if kind == "rx" else TX_QUEUE
            self.chain(q, op[1], op[2])
            if op[3]:  # and kick
                self.guest.w(VIRTIO_MMIO_QUEUE_NOTIFY, q)
        elif kind == "kick":
            self.guest.w(VIRTIO_MMIO_QUEUE_NOTIFY, op[1])
        elif kind == "deliver":
            _, length, count = op
            frame = BIGGEST_UDP[:length].ljust(length, b"\xee")
            for _ in range(count):
                self.device.receive(frame)
            self.delivered += count
        elif kind == "deliver_tcp":
            _, n, count, v6 = op
            for _ in range(count):
                self.device.receive(host_tcp_frame(n, v6))
            self.delivered += count
        elif kind == "stream":
            self.stream(*op[1:])
        elif kind == "desc":
            _, q, table, index, (addr, length, flags, nxt) = op
            drv = self.drivers.get(q)
            if drv is not None and (table is not None or index < drv.size):
                drv.write_desc(index, addr, length, flags, nxt,
                               table=None if table is None else TABLES + TABLE_BYTES * table)
        elif kind == "avail_idx":
            _, q, value = op
            drv = self.drivers.get(q)
            if drv is not None:
                if isinstance(value, str):
                    value = drv.avail_idx + {"+0": 0, "+1": 1, "+size": drv.size,
                                             "+size+1": drv.size + 1, "-1": -1}[value]
                drv.set_avail_idx(value)
        elif kind == "avail_slot":
            _, q, slot, head = op
            drv = self.drivers.get(q)
            if drv is not None:
                drv.set_avail_slot(slot % drv.size, head)
        elif kind == "avail_flags":
            _, q, flags, used_event = op
            drv = self.drivers.get(q)
            if drv is not None:
                drv.set_avail_flags(flags)
                drv.set_used_event(used_event)
        elif kind == "reg":
            self.guest.w(op[1], op[2])
        elif kind == "reset":
            self.check_step()  # the headers against the acks they were written under
            self.continuations = 0
            self.log["ambiguous"] = False  # new rings, nothing held
            self.guest.w(VIRTIO_MMIO_STATUS, 0)
            assert self.device.queues == () and not self.device._rx_backlog
            self.setup(*op[1])
        else:  # pragma: no cover
            raise AssertionError(op)

    def check_step(self):
        assert len(self.device._rx_backlog) <= RX_BACKLOG_FRAMES
        # Every RX header says only what the driver acked: walk the used buffers in order
        # (a frame's header in its first, num_buffers of them; 0 bytes: returned unused).
        rx = self.device._queue(RX_QUEUE)
        offloads = self.device.rx_offloads()
        csum = offloads.csum
        if self.log["ambiguous"]:
            self.log["completions"].clear()  # a re-offered held head: not readable back
            return
        for queue, written, first in self.log["completions"]:
            if queue is not rx or written == 0:
                continue
            if self.continuations:
                self.continuations -= 1
                continue
            assert first is not None, f"a frame's first buffer with {written} bytes"
            flags, gso_type, _hl, _gs, _cs, _co, nbuf = VIRTIO_NET_HDR.unpack(first)
            assert flags == 0 or (csum and flags in (1, 2)), first
            assert gso_type == 0 or (offloads.tso4 and gso_type == VIRTIO_NET_HDR_GSO_TCPV4) \
                or (offloads.tso6 and gso_type == VIRTIO_NET_HDR_GSO_TCPV6), first
            assert nbuf >= 1
            self.continuations = nbuf - 1
            self.log["headers_checked"] += 1
        self.log["completions"].clear()

    def check_memory(self):
        """Only the used rings and writable buffers of popped chains may have changed."""
        changed = self.memory.numpy() != self.shadow.before
        for gpa, length in self.log["used_rings"] + self.log["writable"]:
            assert 0 <= gpa and gpa + length <= MEM, f"{gpa:#x}+{length:#x} outside RAM"
            changed[gpa:gpa + length] = False
        assert not changed.any(), f"guest memory written outside: {np.flatnonzero(changed)[:4]}"

    def clean_round_trip(self):
        """Reset, negotiate everything, set up fresh rings: one frame each way goes through."""
        self.guest.w(VIRTIO_MMIO_STATUS, 0)
        assert self.guest.negotiate(OFFERED) & VIRTIO_CONFIG_S_FEATURES_OK
        drivers = {}
        data = CLEAN_DATA
        for q, (desc, avail, used) in CLEAN_RINGS.items():
            drv = drivers[q] = Driver(self.memory, size=16, desc_addr=desc, avail_addr=avail,
                                      used_addr=used)
            drv._data_next = data
            data += 64 * KiB
            self.memory.write(avail, bytes(avail_ring_size(16)))
            self.memory.write(used, bytes(used_ring_size(16)))
            assert self.guest.setup_driver_queue(q, drv) == 1
        rx, tx = drivers[RX_QUEUE], drivers[TX_QUEUE]
        rx.add_buffers(writable=[1526])
        assert self.guest.driver_ok() & VIRTIO_CONFIG_S_DRIVER_OK
        frame = guest_udp_frame(GATEWAY, 4444, 7, b"after the storm")
        tx.add_buffers(readable=[VIRTIO_NET_HDR.pack(0, 0, 0, 0, 0, 0, 0) + frame])
        self.guest.w(VIRTIO_MMIO_QUEUE_NOTIFY, TX_QUEUE)
        assert self.backend.sent[-1:] == [frame]
        assert [n for _head, n in tx.collect()] == [0]
        reply = guest_udp_frame(GATEWAY, 7, 4444, b"calm again")
        assert self.device.receive(reply)
        ((head, length),) = rx.collect()
        raw = self.memory.read(rx.read_desc(head)[0], length)
        # GUEST_CSUM is among OFFERED: a frame the backend built goes as DATA_VALID.
        assert raw == VIRTIO_NET_HDR.pack(VIRTIO_NET_HDR_F_DATA_VALID, 0, 0, 0, 0, 0, 1) + reply


def play(impl, memory, start, steps):
    p = Play(impl, memory)
    p.setup(*start)
    try:
        for op in steps:
            p.run(op)
            p.check_step()
    finally:
        p.close()
    p.check_memory()
    popped = p.log["popped"]
    event(f"chains popped: {'0' if not popped else '1-3' if popped < 4 else '4+'}")
    event(f"backend frames: {min(len(p.backend.sent), 2)}+")
    event(f"needs reset: {bool(p.transport.status & VIRTIO_CONFIG_S_NEEDS_RESET)}")
    event(f"live at the end: {p.transport._live()}")
    event(f"steps: {len(steps) // 10 * 10}+")
    checked = p.log["headers_checked"]
    event(f"RX headers checked: {'0' if not checked else '1-3' if checked < 4 else '4+'}")
    counters = p.device.counters
    event(f"stream frames: {min(counters['rx_stream_frames'], 1)}+, "
          f"GSO frames: {min(counters['rx_gso_frames'], 1)}+")
    p.clean_round_trip()
    return p


@FUZZ_SETTINGS
@given(start=setup(), steps=st.lists(step, min_size=6, max_size=30))
def test_hostile_driver(impl, memory, start, steps):
    play(impl, memory, start, steps)


# -- regressions the fuzz found -------------------------------------------------------------


def live_nic(impl, memory, features=OFFERED):
    """A Play negotiated with `features`, both queues at the standard rings, live."""
    p = Play(impl, memory)
    queues = [(16, *RINGS[q], True) for q in (RX_QUEUE, TX_QUEUE)]
    assert p.setup(features, queues) & VIRTIO_CONFIG_S_DRIVER_OK
    return p


def test_a_corrupt_rx_ring_never_raises_into_the_backend(impl, memory):
    """Found by the fuzz: avail->idx moved by more than the queue size made receive()
    raise QueueError into the backend (the NAT's loop), frame after frame, and the RX
    kick never reported it. Now the frame waits in the backlog and the next RX kick meets
    the ring, so the transport sets DEVICE_NEEDS_RESET."""
    p = live_nic(impl, memory)
    rx = p.drivers[RX_QUEUE]
    rx.set_avail_idx(rx.avail_idx + rx.size + 2)
    frame = BIGGEST_UDP[:60]
    assert p.device.receive(frame)
    assert p.device.counters["rx_queue_errors"] == 1 and len(p.device._rx_backlog) == 1
    p.guest.kick(RX_QUEUE)
    assert p.transport.status & VIRTIO_CONFIG_S_NEEDS_RESET
    p.check_memory()
    p.clean_round_trip()


@pytest.mark.parametrize("first", [0, 5, VIRTIO_NET_HDR_LEN - 1])
def test_a_mergeable_rx_buffer_shorter_than_the_header_is_returned_unused(impl, memory, first):
    """With MRG_RXBUF, a first RX buffer of fewer than 12 writable bytes made _place write
    the header into it: ValueError out of receive() (into the backend) or out of the RX
    kick, and the buffers taken were never returned. §5.1.6.3.1 asks every mergeable
    buffer to hold the header: such a buffer is returned unused and counted, and the
    frame goes into the next one."""
    p = live_nic(impl, memory)
    short = ("rx", [(None, first, True)], False, True)
    good = ("rx", [(None, 1526, True)], False, True)
    p.run(short)
    p.run(good)
    frame = BIGGEST_UDP[:200]
    assert p.device.receive(frame)
    used = p.drivers[RX_QUEUE].collect()
    assert [n for _head, n in used] == [0, VIRTIO_NET_HDR_LEN + len(frame)]
    assert p.device.counters["rx_buffer_too_small"] == 1
    # The same from the backlog, placed by the RX kick.
    p.device.receive(frame)
    p.run(short)
    p.run(good)
    assert [n for _head, n in p.drivers[RX_QUEUE].collect()] == [0, VIRTIO_NET_HDR_LEN + len(frame)]
    p.check_memory()
    p.clean_round_trip()


def test_a_corrupt_rx_ring_never_raises_into_the_stream_relay(impl, memory):
    """Found by the fuzz once the stream port was in it: avail->idx moved by more than the
    queue size made send_tcp_stream raise QueueError into the NAT's TCP relay. Now the
    burst blocks (the flow waits for rx_ready) and the next RX kick meets the ring, so the
    transport sets DEVICE_NEEDS_RESET."""
    p = live_nic(impl, memory)
    rx = p.drivers[RX_QUEUE]
    rx.set_avail_idx(rx.avail_idx + rx.size + 2)
    try:
        p.stream(100, 1460, 1 << 20)  # asserts the burst's results are sane
        assert p.device.counters["rx_queue_errors"] == 1
        assert p.device.counters["rx_stream_frames"] == 0
    finally:
        p.close()
    p.guest.kick(RX_QUEUE)
    assert p.transport.status & VIRTIO_CONFIG_S_NEEDS_RESET
    p.check_memory()
    p.clean_round_trip()
