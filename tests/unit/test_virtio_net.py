"""virtio-net (virtio 1.2 §5.1) driven through the MMIO register file by the driver mock.

Every test runs against both ring twins (the `impl` fixture). The backend is a recorder:
it keeps what the guest sent and lets the test deliver frames to the guest, as the NAT
does from its thread.
"""

from __future__ import annotations

import socket
import struct

import pytest

from tests.unit.netframes import GATEWAY, GUEST, guest_udp_frame
from tests.unit.test_virtio_mmio import Guest, Signals
from tests.virtio_driver import DATA_ADDR, Driver
from voidbox.net.fastpath import build_ipv4_tcp, inet_checksum, tcp_checksum
from voidbox.net.packets import pseudo_header_sum
from voidbox.net.tcp import parse_segment
from voidbox.virtio.device import (
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
)
from voidbox.virtio.mmio import VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_STATUS, VirtioMmioTransport
from voidbox.virtio.net import (
    MAX_FRAME,
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
    VIRTIO_NET_HDR_LEN,
    VirtioNet,
)

MAC = bytes.fromhex("020000abcdef")
QSIZE = 16
RX_BUF = 1526  # what Linux posts without MRG_RXBUF or GUEST_TSO (§5.1.6.3.1)
BASE = 1 << VIRTIO_F_VERSION_1
ALL = (BASE | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS | 1 << VIRTIO_NET_F_MTU
       | 1 << VIRTIO_NET_F_MRG_RXBUF | 1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_HOST_TSO4
       | 1 << VIRTIO_F_EVENT_IDX | 1 << VIRTIO_F_INDIRECT_DESC)
GUEST_OFFLOADS = 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4


class Recorder:
    """A backend that keeps the guest's frames; deliver() plays the NAT's side."""

    accepts_partial_checksums = True
    accepts_tso4 = True
    accepts_tso6 = True
    produces_guest_offloads = True  # the test builds every frame it delivers

    def __init__(self):
        self.sent: list[tuple[bytes, bool]] = []
        self.deliver = None

    def attach(self, deliver):
        self.deliver = deliver

    def guest_frame(self, frame, csum_verified=False):
        self.sent.append((bytes(frame), csum_verified))


class Plain(Recorder):
    accepts_partial_checksums = False
    accepts_tso4 = False
    accepts_tso6 = False
    produces_guest_offloads = False


class Nic:
    """A VirtioNet on a transport, negotiated and live; rx and tx are driver mocks."""

    def __init__(self, impl, memory, features=ALL, backend=None, rx_buffers=4, rx_len=RX_BUF):
        self.backend = backend or Recorder()
        self.device = VirtioNet(self.backend, MAC)
        self.backend.attach(self.device.receive)
        self.signals = Signals()
        self.transport = VirtioMmioTransport(self.device, memory, self.signals,
                                             ring_factory=impl.Virtqueue)
        self.signals.transport = self.transport
        self.guest = Guest(self.transport)
        self.memory = memory
        self.status = self.guest.negotiate(features)
        self.rx = Driver(memory, size=QSIZE)
        self.tx = Driver(memory, size=QSIZE, desc_addr=0x50_0000, avail_addr=0x60_0000,
                         used_addr=0x70_0000)
        self.tx._data_next = DATA_ADDR + (16 << 20)  # the two mocks' buffers never overlap
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK:
            assert self.guest.setup_driver_queue(RX_QUEUE, self.rx) == 1
            assert self.guest.setup_driver_queue(TX_QUEUE, self.tx) == 1
            self.post(rx_buffers, rx_len, kick=False)
            assert self.guest.driver_ok() & VIRTIO_CONFIG_S_DRIVER_OK

    @property
    def counters(self):
        return self.device.counters

    def post(self, count, length=RX_BUF, kick=True):
        heads = [self.rx.add_buffers(writable=[length]) for _ in range(count)]
        if kick:
            self.transport.handle_notify(RX_QUEUE)
        return heads

    def send(self, frame, header=None, chain=None, indirect=False):
        """One frame as the driver sends it: header + frame, in one or more buffers."""
        header = header if header is not None else VIRTIO_NET_HDR.pack(0, 0, 0, 0, 0, 0, 0)
        data = header + frame
        pieces = chain or [len(data)]
        bufs, pos = [], 0
        for n in pieces:
            bufs.append((self.tx.alloc(n, data[pos:pos + n]), n, False))
            pos += n
        if indirect:
            self.tx.add_indirect(bufs)
        else:
            self.tx.add_chain(bufs)
        self.transport.handle_notify(TX_QUEUE)
        return self.tx.collect(recycle=True)

    def received(self):
        """(header fields, frame) for each frame the device put in RX buffers."""
        out = []
        used = self.rx.collect()
        i = 0
        while i < len(used):
            head, length = used[i]
            addr = self.rx.read_desc(head)[0]
            raw = self.memory.read(addr, length)
            hdr = VIRTIO_NET_HDR.unpack_from(raw)
            data = raw[VIRTIO_NET_HDR_LEN:]
            for head2, length2 in used[i + 1:i + hdr[6]]:
                data += self.memory.read(self.rx.read_desc(head2)[0], length2)
            i += max(hdr[6], 1)
            out.append((hdr, data))
        for head, _length in used:
            self.rx.recycle(head)
        return out


def udp_frame(n=100):
    return guest_udp_frame(GATEWAY, 5555, 7, bytes(range(256)) * (n // 256) + b"u" * (n % 256))


# ---- identity and negotiation -------------------------------------------------------------

def test_offers_what_the_backend_honours(impl, memory):
    tso6 = 1 << VIRTIO_NET_F_HOST_TSO6 | 1 << VIRTIO_NET_F_GUEST_TSO6
    assert Nic(impl, memory).device.features == ALL | GUEST_OFFLOADS | tso6
    plain = Nic(impl, memory, backend=Plain()).device.features
    assert plain == ALL & ~(1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_HOST_TSO4)
    # A backend that does not build its frames gets no guest offloads offered.
    assert not plain & (GUEST_OFFLOADS | tso6)


def test_config_space_has_mac_link_up_one_pair_and_mtu(impl, memory):
    t = Nic(impl, memory).transport
    assert bytes(t.read(VIRTIO_MMIO_CONFIG + i, 1) for i in range(6)) == MAC
    assert t.read(VIRTIO_MMIO_CONFIG + 6, 2) == 1  # VIRTIO_NET_S_LINK_UP
    assert t.read(VIRTIO_MMIO_CONFIG + 8, 2) == 1
    assert t.read(VIRTIO_MMIO_CONFIG + 10, 2) == 1500


def test_a_subset_is_acked_and_a_driver_without_version_1_is_refused(impl, memory):
    nic = Nic(impl, memory, features=BASE | 1 << VIRTIO_NET_F_MAC)
    assert nic.device.acked_features == BASE | 1 << VIRTIO_NET_F_MAC
    legacy = Nic(impl, memory, features=1 << VIRTIO_NET_F_MAC)
    assert not legacy.status & VIRTIO_CONFIG_S_FEATURES_OK


# ---- guest -> backend ----------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["single", "chained", "indirect", "header apart"])
def test_tx_frames_reach_the_backend(impl, memory, layout):
    nic = Nic(impl, memory)
    frame = udp_frame(300)
    total = VIRTIO_NET_HDR_LEN + len(frame)
    chain = {"single": None, "chained": [5, 100, total - 105], "indirect": [50, total - 50],
             "header apart": [VIRTIO_NET_HDR_LEN, len(frame)]}[layout]
    used = nic.send(frame, chain=chain, indirect=layout == "indirect")
    assert nic.backend.sent == [(frame, False)]
    assert [length for _head, length in used] == [0]
    assert nic.signals.seen  # the used buffer was signalled
    assert nic.counters["tx_frames"] == 1 and nic.counters["tx_bytes"] == len(frame)


def test_partial_checksum_at_the_packets_own_header_is_vouched_for(impl, memory):
    nic = Nic(impl, memory)
    frame = bytearray(udp_frame(64))
    frame[14 + 20 + 6:14 + 20 + 8] = b"\x12\x34"  # the pseudo-header sum, not a checksum
    header = VIRTIO_NET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 6, 0)
    nic.send(bytes(frame), header)
    assert nic.backend.sent == [(bytes(frame), True)]


def test_partial_checksum_elsewhere_is_finished_by_the_device(impl, memory):
    nic = Nic(impl, memory)
    frame = bytearray(udp_frame(64))
    # A checksum over the UDP payload only, at its first two bytes (as a tunnel would).
    start, offset = 14 + 28, 0
    frame[start:start + 2] = b"\x00\x00"
    expected = inet_checksum(bytes(frame[start:])) or 0xFFFF
    header = VIRTIO_NET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, start, offset, 0)
    nic.send(bytes(frame), header)
    ((sent, verified),) = nic.backend.sent
    assert struct.unpack_from("!H", sent, start)[0] == expected and not verified


def test_offloads_are_honoured_only_as_negotiated(impl, memory):
    nic = Nic(impl, memory, features=BASE)  # no CSUM, no HOST_TSO4
    frame = udp_frame(200)
    nic.send(frame, VIRTIO_NET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 6, 0))
    nic.send(frame, VIRTIO_NET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM,
                                        VIRTIO_NET_HDR_GSO_TCPV4, 54, 100, 34, 16, 0))
    assert nic.backend.sent == []
    assert nic.counters["tx_drop_csum_not_negotiated"] == 1
    assert nic.counters["tx_drop_gso_not_negotiated"] == 1
    nic.send(frame)  # the queue still serves
    assert nic.backend.sent == [(frame, False)]


def test_a_tso_segment_is_one_frame(impl, memory):
    nic = Nic(impl, memory)
    big = tcp_frame(b"t" * 60000)
    header = VIRTIO_NET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4,
                                 54, 1448, 34, 16, 0)
    nic.send(big, header, chain=[4096] * 14 + [VIRTIO_NET_HDR_LEN + len(big) - 4096 * 14])
    assert nic.backend.sent == [(big, True)] and nic.counters["tx_tso_frames"] == 1


HOSTILE_HEADERS = {
    "gso_size 0": VIRTIO_NET_HDR.pack(1, VIRTIO_NET_HDR_GSO_TCPV4, 54, 0, 34, 16, 0),
    "gso_size past the frame": VIRTIO_NET_HDR.pack(1, VIRTIO_NET_HDR_GSO_TCPV4, 54, 9000, 34, 16, 0),
    "hdr_len past the frame": VIRTIO_NET_HDR.pack(1, VIRTIO_NET_HDR_GSO_TCPV4, 9000, 100, 34, 16, 0),
    "gso without NEEDS_CSUM": VIRTIO_NET_HDR.pack(0, VIRTIO_NET_HDR_GSO_TCPV4, 54, 100, 34, 16, 0),
    "csum_start past the frame": VIRTIO_NET_HDR.pack(1, 0, 0, 0, 5000, 6, 0),
    "csum field past the frame": VIRTIO_NET_HDR.pack(1, 0, 0, 0, 34, 0xFFFF, 0),
    "ECN not negotiated": VIRTIO_NET_HDR.pack(1, VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN,
                                              54, 100, 34, 16, 0),
    "UDP GSO type": VIRTIO_NET_HDR.pack(1, 5, 54, 100, 34, 6, 0),
    "DATA_VALID on TX": VIRTIO_NET_HDR.pack(VIRTIO_NET_HDR_F_DATA_VALID, 0, 0, 0, 0, 0, 0),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_HEADERS))
def test_hostile_headers_are_dropped_and_the_queue_keeps_serving(impl, memory, name):
    nic = Nic(impl, memory)
    frame = udp_frame(500)
    used = nic.send(frame, HOSTILE_HEADERS[name])
    assert len(used) == 1 and nic.backend.sent == []
    assert sum(v for k, v in nic.counters.items() if k.startswith("tx_drop_")) == 1
    nic.send(frame)
    assert nic.backend.sent == [(frame, False)]


@pytest.mark.parametrize("case", ["short header", "runt", "oversize", "zero-length buffers",
                                  "outside RAM", "in the MMIO gap", "loop"])
def test_hostile_chains_are_retired_and_the_queue_keeps_serving(impl, memory, case):
    nic = Nic(impl, memory)
    tx = nic.tx
    if case == "short header":
        tx.add_buffers(readable=[b"\x00" * 11])
    elif case == "runt":
        tx.add_buffers(readable=[b"\x00" * (VIRTIO_NET_HDR_LEN + 13)])
    elif case == "oversize":
        n = VIRTIO_NET_HDR_LEN + MAX_FRAME + 1
        tx.add_chain([(tx.alloc(n), n, False)])
    elif case == "zero-length buffers":
        tx.add_chain([(tx.alloc(16), 0, False)] * 3)
    elif case == "outside RAM":
        tx.add_chain([(memory.size + (1 << 30), 100, False)])
    elif case == "in the MMIO gap":
        tx.add_chain([(0xD000_0000, 100, False)])
    else:
        head = tx.free.pop(0)
        gpa = tx.alloc(64, bytes(64))
        tx.write_desc(head, gpa, 64, 1, head)  # NEXT pointing at itself
        tx.offer(head)
    nic.transport.handle_notify(TX_QUEUE)
    assert len(tx.collect()) == 1  # retired, not replayed on the next kick
    assert nic.backend.sent == []
    frame = udp_frame(100)
    nic.send(frame)
    assert nic.backend.sent == [(frame, False)]


# ---- backend -> guest ----------------------------------------------------------------------

def test_rx_frame_lands_behind_a_clean_header(impl, memory):
    nic = Nic(impl, memory)
    frame = udp_frame(200)
    assert nic.backend.deliver(frame)
    ((hdr, data),) = nic.received()
    assert hdr == (0, 0, 0, 0, 0, 0, 1) and data == frame
    assert nic.signals.seen


def test_rx_spreads_over_mergeable_buffers_with_num_buffers(impl, memory):
    nic = Nic(impl, memory, rx_buffers=0)
    nic.post(8, 1000)
    frame = udp_frame(2500)  # 2542 + 12 header bytes: three 1000-byte buffers
    nic.backend.deliver(frame)
    ((hdr, data),) = nic.received()
    assert hdr[6] == 3 and data == frame
    assert nic.counters["rx_merged_frames"] == 1


def test_without_mrg_rxbuf_a_frame_needs_one_buffer_that_fits(impl, memory):
    nic = Nic(impl, memory, features=BASE, rx_buffers=0)
    small, big = nic.post(1, 200), nic.post(1, RX_BUF)
    frame = udp_frame(500)
    nic.backend.deliver(frame)
    used = nic.rx.collect()
    assert used[0] == (small[0], 0)  # too small: returned unused
    assert used[1][0] == big[0]
    assert nic.counters["rx_buffer_too_small"] == 1


class RecyclingGuest:
    """A ring factory whose RX ring plays a second vCPU: every buffer the device returns
    is posted again at once, as a hostile driver can (bounded, so a loop fails the test
    instead of hanging it)."""

    def __init__(self, impl, nic_drivers):
        outer = self

        class Ring(impl.Virtqueue):
            def push(self, head, written):
                super().push(head, written)
                driver = nic_drivers().get(self.avail_addr)
                if driver is not None:
                    outer.reposts += 1
                    assert outer.reposts < 100_000, "the device kept taking the same buffers"
                    driver.offer(head)

        self.Virtqueue = Ring
        self.reposts = 0


@pytest.mark.parametrize("features", [BASE, ALL], ids=["one_buffer", "mrg_rxbuf"])
def test_buffers_too_small_reposted_at_once_cannot_keep_the_device_looping(impl, memory,
                                                                             features):
    """Too-small buffers go back unused, at most a ring's worth per frame: a driver that
    re-posts each as soon as it is used gets its frame backlogged, as if it had none."""
    drivers = {}
    guest = RecyclingGuest(impl, lambda: drivers)
    nic = Nic(guest, memory, features=features, rx_buffers=0)
    drivers[nic.rx.avail_addr] = nic.rx
    nic.post(1, 200 if features == BASE else 8)  # short of a frame; short of the header
    assert nic.backend.deliver(udp_frame(500))  # held in the backlog, not lost
    assert nic.counters["rx_too_small_burst"] == 1
    assert QSIZE <= nic.counters["rx_buffer_too_small"] <= 2 * QSIZE + 1
    assert guest.reposts == nic.counters["rx_buffer_too_small"]
    del drivers[nic.rx.avail_addr]  # the driver behaves from now on
    nic.rx.collect()
    good = nic.post(1)[0]
    used = dict(nic.rx.collect())  # the last small one comes back unused first
    assert set(used) <= {good} | set(range(QSIZE)) and used[good] > 12
    frame = udp_frame(500)
    assert nic.memory.read(nic.rx.read_desc(good)[0] + 12, len(frame)) == frame


@pytest.mark.parametrize("features", [BASE, BASE | 1 << VIRTIO_F_EVENT_IDX],
                         ids=["plain", "event_idx"])
def test_buffers_returned_unused_are_signalled_even_with_no_frame_placed(impl, memory,
                                                                          features):
    """A driver in interrupt mode learns its buffers came back only from the interrupt:
    without it, it never refills, never kicks, and the frame waiting here waits for good."""
    nic = Nic(impl, memory, features=features, rx_buffers=0)
    nic.post(QSIZE, 200)  # every one too small for the frame
    nic.signals.seen.clear()
    assert nic.backend.deliver(udp_frame(500))  # backlogged
    assert nic.counters["rx_buffer_too_small"] == QSIZE
    assert nic.signals.seen  # the used-buffer interrupt went out
    assert len(nic.rx.collect(recycle=True)) == QSIZE
    nic.post(1)  # the driver refills and kicks: the frame arrives
    ((_hdr, data),) = nic.received()
    assert data == udp_frame(500)


def test_no_rx_buffers_backlog_then_resume_in_order_and_bounded(impl, memory):
    nic = Nic(impl, memory, rx_buffers=0)
    frames = [udp_frame(100 + i) for i in range(RX_BACKLOG_FRAMES + 10)]
    results = [nic.backend.deliver(f) for f in frames]
    assert results.count(False) == 10 and nic.counters["rx_drop_backlog_full"] == 10
    assert nic.counters["rx_starved"] >= 1
    got = []
    for _ in range(RX_BACKLOG_FRAMES // QSIZE):
        nic.post(QSIZE)
        got += [data for _hdr, data in nic.received()]
    assert got == [f for f, ok in zip(frames, results, strict=True) if ok]
    assert not nic.device._rx_backlog


def test_backlog_flushes_on_the_rx_kick(impl, memory):
    nic = Nic(impl, memory, rx_buffers=0)
    frames = [udp_frame(100 + i) for i in range(3)]
    for f in frames:
        nic.backend.deliver(f)
    assert nic.received() == []
    nic.post(4)
    assert [data for _hdr, data in nic.received()] == frames


def test_reset_in_the_middle_of_traffic(impl, memory):
    nic = Nic(impl, memory, rx_buffers=0)
    nic.backend.deliver(udp_frame(100))
    nic.send(udp_frame(50))
    nic.guest.w(VIRTIO_MMIO_STATUS, 0)
    assert nic.device.queues == () and not nic.device._rx_backlog
    assert not nic.backend.deliver(udp_frame(100))  # no driver: dropped, nothing touched
    assert nic.counters["rx_drop_no_driver"] == 1
    status = nic.guest.negotiate(ALL)
    assert status & VIRTIO_CONFIG_S_FEATURES_OK
    nic.rx = Driver(memory, size=QSIZE, desc_addr=0x80_0000, avail_addr=0x90_0000,
                    used_addr=0xA0_0000)
    nic.rx._data_next = DATA_ADDR + (32 << 20)
    nic.guest.setup_driver_queue(RX_QUEUE, nic.rx)
    nic.guest.setup_driver_queue(TX_QUEUE, nic.tx)
    nic.post(2, kick=False)
    nic.guest.driver_ok()
    frame = udp_frame(77)
    assert nic.backend.deliver(frame)
    assert [data for _hdr, data in nic.received()] == [frame]


def test_frames_of_bad_length_are_never_placed(impl, memory):
    nic = Nic(impl, memory)
    assert not nic.backend.deliver(b"x" * 13)
    assert not nic.backend.deliver(b"x" * (MAX_FRAME + 1))
    assert nic.counters["rx_drop_bad_length"] == 2 and nic.received() == []


# ---- offloads towards the guest: only what the driver acked -------------------------------

TCP_ACK, TCP_PSH, TCP_FIN = 0x10, 0x08, 0x01


def tcp_frame(payload: bytes, seq: int = 0xFFFF_F000, flags: int = TCP_ACK | TCP_PSH | TCP_FIN,
              ip_id: int = 0xFFF0) -> bytes:
    """A host -> guest TCP frame as the NAT builds it (checksums right), any length."""
    out = bytearray(20 + 20 + len(payload))
    n = build_ipv4_tcp(out, GATEWAY, GUEST, ip_id, 80, 40000, seq, 5, flags, 1000, b"",
                       payload)
    return b"\x02\x00\x00\xab\xcd\xef" + b"\x52\x55\x0a\x00\x02\x02\x08\x00" + bytes(out[:n])


def check_tcp_frame(frame: bytes, header, *, partial: bool = False):
    """The segment of a received TCP frame, its checksums checked as the guest would:
    with NEEDS_CSUM the field must hold the pseudo-header sum and the frame's sum from
    csum_start, stored there, must make it whole."""
    ip = frame[14:34]
    assert inet_checksum(ip) == 0 and struct.unpack_from("!H", ip, 2)[0] == len(frame) - 14
    if partial:
        assert header[4:6] == (34, 16)
        field = struct.unpack_from("!H", frame, 50)[0]
        assert field == pseudo_header_sum(ip[12:16], ip[16:20], 6, len(frame) - 34)
        whole = bytearray(frame)
        struct.pack_into("!H", whole, 50, inet_checksum(frame[34:]))
        frame = bytes(whole)
    assert tcp_checksum(frame[26:30], frame[30:34], frame[34:]) == 0
    return parse_segment(memoryview(frame)[34:])


ACK_SETS = {
    "no guest offloads": ALL,
    "GUEST_CSUM": ALL | 1 << VIRTIO_NET_F_GUEST_CSUM,
    "GUEST_CSUM and GUEST_TSO4": ALL | GUEST_OFFLOADS,
    # §5.1.3.1 forbids this: the device then sends as if neither were acked.
    "GUEST_TSO4 alone": ALL | 1 << VIRTIO_NET_F_GUEST_TSO4,
}


@pytest.mark.parametrize("acked", sorted(ACK_SETS))
def test_rx_headers_carry_only_what_the_driver_acked(impl, memory, acked):
    features = ACK_SETS[acked]
    nic = Nic(impl, memory, features=features, rx_buffers=0)
    assert nic.device.acked_features == features
    csum = acked.startswith("GUEST_CSUM")
    gso = acked == "GUEST_CSUM and GUEST_TSO4"
    assert nic.device.rx_offloads() == (True, csum, gso, False)  # no GUEST_TSO6 acked
    assert nic.counters["negotiated_guest_csum"] == (acked != "no guest offloads"
                                                     and acked != "GUEST_TSO4 alone")
    assert nic.counters["negotiated_guest_tso4"] == ("TSO4" in acked)
    assert nic.counters["negotiated_mrg_rxbuf"] == 1
    nic.post(QSIZE)
    udp, arp = udp_frame(300), b"\xff" * 6 + MAC + b"\x08\x06" + bytes(28)
    data = bytes(range(256)) * 39 + b"end"  # 9987 bytes: 7 segments of 1460 and a tail
    big = tcp_frame(data)
    for frame in (udp, arp, big):
        assert nic.backend.deliver(frame)
    out = nic.received()
    (udp_hdr, udp_got), (arp_hdr, arp_got) = out[:2]
    assert (udp_got, arp_got) == (udp, arp)
    valid = VIRTIO_NET_HDR_F_DATA_VALID if csum else 0
    assert udp_hdr[:6] == (valid, 0, 0, 0, 0, 0)  # a checksum the backend built
    assert arp_hdr[:6] == (0, 0, 0, 0, 0, 0)  # nothing to vouch for
    if gso:
        ((hdr, frame),) = out[2:]
        assert hdr[:6] == (VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1460, 34, 16)
        assert hdr[6] == 7  # 9987 + 54 + 12 bytes over 1526-byte mergeable buffers
        seg = check_tcp_frame(frame, hdr, partial=True)
        assert bytes(seg.payload) == data and seg.flags == TCP_ACK | TCP_PSH | TCP_FIN
        assert nic.counters["rx_gso_frames"] == 1 and nic.counters["rx_csum_offloaded"] == 1
        assert nic.counters["rx_gso_segmented"] == 0
    else:
        # Cut into MTU-sized segments here, each a complete frame in one buffer.
        segs = [(hdr, check_tcp_frame(frame, hdr)) for hdr, frame in out[2:]]
        assert [len(s.payload) for _h, s in segs] == [1460] * 6 + [len(data) - 6 * 1460]
        assert all(h == (valid, 0, 0, 0, 0, 0, 1) for h, _s in segs)
        assert b"".join(bytes(s.payload) for _h, s in segs) == data
        assert [s.seq for _h, s in segs] == [(0xFFFF_F000 + i * 1460) & 0xFFFFFFFF
                                             for i in range(7)]
        assert [s.flags for _h, s in segs] == [TCP_ACK] * 6 + [TCP_ACK | TCP_PSH | TCP_FIN]
        assert nic.counters["rx_gso_segmented"] == 1 and nic.counters["rx_gso_frames"] == 0
        assert nic.counters["rx_csum_offloaded"] == 0
    assert nic.counters["rx_csum_valid"] == (1 + 7 * (not gso) if csum else 0)


def test_segments_cut_for_the_guest_keep_ip_ids_and_fit_the_mtu(impl, memory):
    nic = Nic(impl, memory, rx_buffers=QSIZE)  # no GUEST_TSO4, no MRG_RXBUF needed
    nic.backend.deliver(tcp_frame(b"z" * 3000, flags=TCP_ACK | TCP_PSH))
    out = nic.received()
    assert [len(frame) for _h, frame in out] == [1514, 1514, 14 + 40 + 80]
    assert [struct.unpack_from("!H", frame, 18)[0] for _h, frame in out] == [0xFFF0, 0xFFF1,
                                                                              0xFFF2]


def test_a_gso_frame_waiting_in_the_backlog_is_not_placed_after_the_ack_changes(impl, memory):
    nic = Nic(impl, memory, features=ALL | GUEST_OFFLOADS, rx_buffers=0)
    assert nic.backend.deliver(tcp_frame(b"g" * 5000))  # backlogged with a GSO header
    nic.device.acked_features = ALL  # a vhost-user front-end's SET_FEATURES, say
    nic.post(QSIZE)
    assert nic.received() == []
    assert nic.counters["rx_drop_offload_not_negotiated"] == 1
    frame = udp_frame(100)
    assert nic.backend.deliver(frame)
    assert nic.received() == [((0, 0, 0, 0, 0, 0, 1), frame)]


def test_a_gso_frame_larger_than_the_posted_buffers_is_dropped_not_stuck(impl, memory):
    nic = Nic(impl, memory, features=ALL | GUEST_OFFLOADS, rx_buffers=0)
    nic.post(QSIZE - 1, 64)  # a hostile driver: tiny buffers, the ring not yet full
    assert nic.backend.deliver(tcp_frame(b"h" * 60000))
    assert nic.counters["rx_backlogged"] == 1  # it may yet fit: it waits
    nic.post(1, RX_BUF)  # the ring is full and holds 2.5 KiB: it never will
    assert nic.counters["rx_drop_larger_than_ring"] == 1 and not nic.device._rx_backlog
    frame = udp_frame(100)
    assert nic.backend.deliver(frame)
    assert frame in [data for _h, data in nic.received()]


def test_a_tap_frame_marked_data_valid_reaches_a_guest_without_guest_csum_unmarked(impl,
                                                                                   memory):
    """The TAP marks a frame whose checksum the kernel verified DATA_VALID whatever its
    offloads (a frame forwarded from a NIC): a driver that did not ack GUEST_CSUM gets the
    complete frame with its flags cleared (§5.1.6.3), not a drop. NEEDS_CSUM, whose
    checksum is unfinished, is still dropped for it."""
    nic = Nic(impl, memory, rx_buffers=QSIZE)  # MRG_RXBUF, no GUEST_CSUM
    ours, tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        frame = udp_frame(200)
        tap.send(VIRTIO_NET_HDR.pack(VIRTIO_NET_HDR_F_DATA_VALID, 0, 0, 0, 0, 0, 0) + frame)
        tap.send(VIRTIO_NET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 6, 0) + frame)
        ours.setblocking(False)
        assert nic.device.rx_from_fd(ours.fileno(), 8)[0] == 1
        assert nic.received() == [((0, 0, 0, 0, 0, 0, 1), frame)]
        assert nic.counters["rx_data_valid_cleared"] == 1
        assert nic.counters["rx_drop_offload_not_negotiated"] == 1
    finally:
        ours.close()
        tap.close()
