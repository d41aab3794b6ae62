"""Bulk TCP through the VM's network card: a host server on 127.0.0.1, the user-mode NAT
(SlirpBackend) behind a VirtioNet on its MMIO transport, and a scripted guest TCP endpoint.

The guest is tests/unit/test_tcp.py's `Endpoint` (voidbox's own sans-I/O TcpFlow) whose
segments are framed in Ethernet/IPv4 by the packet builders and carried by the driver
mock (tests/virtio_driver.py) through the rings, as a guest's virtio-net driver would:
- TX: each frame in one chain behind its 12-byte virtio_net_hdr: zeroed for control
  segments (full checksum), NEEDS_CSUM with only the pseudo-header sum in the field for
  data, and a TSO segment (GSO_TCPV4, 44 x 1460 bytes) per frame guest -> host;
- RX: MRG_RXBUF on, RX_BUFFERS buffers of RX_BUF_LEN bytes kept posted; every used buffer
  is read back out of the used ring, its frame parsed (both checksums checked) and fed to
  the endpoint, and the buffer reposted at once. With GSO_FEATURES the guest also acks
  GUEST_CSUM and GUEST_TSO4, as a Linux guest does: a frame may then be a 64 KiB GSO_TCPV4
  one over many buffers (num_buffers), checked as Linux's virtio_net_hdr_to_skb would
  (gso_size the MSS, hdr_len, csum_start/offset at the TCP checksum holding the
  pseudo-header sum), its checksum finished and checked, and its payload taken whole (the
  endpoint ACKs the range, as a guest's GRO would). Without the acks any flag or GSO type
  in a header fails the test.
The guest first asks for the gateway's MAC by ARP and frames everything to it.

Everything runs on the test's thread: the rig pumps a real EventLoop with run_once, and
the only other thread is the host server (a plain blocking socket). Asserted: the SHA-256
of what arrived against what was sent, both directions, on both ring twins; the device's
and the NAT's counters agree with what the guest saw (no drops, no retransmits, offloads
used as sent); and the number of loop iterations per MiB is bounded (the run never spins).

The guest advertises GUEST_WINDOW: what its posted buffers plus the device's backlog can
hold, so no frame is ever dropped on the way in (see BulkRig). One test gives it a 1 MiB
window instead, as a Linux guest would: the NAT's TCP then stops at the card's room
(rx_room) and resumes on rx_ready, so still nothing is dropped.
"""

from __future__ import annotations

import hashlib
import random
import socket
import struct
import threading
import time

import pytest

from tests.unit.test_tcp import Endpoint
from tests.unit.test_virtio_mmio import Guest
from tests.virtio_driver import Driver
from voidbox.eventloop import EventLoop
from voidbox.layout import MiB
from voidbox.net import fastpath
from voidbox.net.backend import SlirpBackend
from voidbox.net.config import NatConfig
from voidbox.net.packets import (
    ARPOP_REPLY,
    ARPOP_REQUEST,
    ETH_BROADCAST,
    ETH_P_ARP,
    ETH_P_IP,
    IPPROTO_TCP,
    build_arp,
    ip_to_bytes,
    parse_arp,
    pseudo_header_sum,
)
from voidbox.net.policy import Policy
from voidbox.net.tcp import SYN, Act, TcpFlow, TcpState, parse_segment
from voidbox.virtio.device import VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_F_VERSION_1
from voidbox.virtio.mmio import VIRTIO_MMIO_QUEUE_NOTIFY, VirtioMmioTransport
from voidbox.virtio.net import (
    RX_BACKLOG_FRAMES,
    RX_QUEUE,
    TX_QUEUE,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_HDR,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_LEN,
    VirtioNet,
)

NIC_MAC = bytes.fromhex("020000b01c00")
GUEST_IP = ip_to_bytes("10.0.2.15")
GATEWAY_IP = ip_to_bytes("10.0.2.2")  # the host's 127.0.0.1
FEATURES = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_MTU)
            | (1 << VIRTIO_NET_F_STATUS) | (1 << VIRTIO_NET_F_MRG_RXBUF)
            | (1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_HOST_TSO4))
# What a Linux guest acks when offered: the host -> guest offloads too.
GSO_FEATURES = FEATURES | (1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_GUEST_TSO4)
MSS = 1460  # MTU 1500, the NAT's default
TSO_PAYLOAD = 44 * MSS  # what Linux puts in one 64 KiB TSO segment at this MSS
RX_BUFFERS = 64
RX_BUF_LEN = 2048  # one 1514-byte frame and its header fit one buffer
TX_QSIZE = 256
TX_SLOT = (VIRTIO_NET_HDR_LEN + 14 + 60 + 60 + TSO_PAYLOAD + 15) & ~15
RX_DATA = 0x100_0000
TX_DATA = 0x200_0000  # TX_QSIZE slots of TX_SLOT bytes: below 64 MiB
# The guest's receive window: within what RX_BUFFERS buffers plus the device's backlog hold
# (in frames of MSS bytes), so the NAT never sends more than the card can take in.
GUEST_WINDOW = 256 * 1024
assert GUEST_WINDOW // MSS < RX_BUFFERS + RX_BACKLOG_FRAMES
CHUNK = 1 * MiB
SEED = 20260909
IDLE_WAIT = 0.05  # seconds one loop iteration may block in epoll when nothing is due
# Bounds on failure only (none is a timing assertion): wall time for one transfer, and
# loop iterations per MiB moved (a spinning loop would run millions).
DEADLINE_S = 240
MAX_ITERATIONS_PER_MIB = 64
# 64 MiB each way on both twins: here the whole file takes about 6 s.
SIZES = {"cython": 64 * MiB, "pure": 64 * MiB}
_ETH = struct.Struct("!6s6sH")
_CSUM_FIELD = 14 + 20 + 16  # the TCP checksum field of an untunnelled IPv4 frame


def payload(n: int) -> bytes:
    """n deterministic pseudo-random bytes: a random MiB, each copy stamped with its index."""
    block = random.Random(SEED).randbytes(CHUNK)
    pieces = []
    for i in range((n + CHUNK - 1) // CHUNK):
        pieces.append(i.to_bytes(8, "big") + block[8:])
    return b"".join(pieces)[:n]


class HostServer:
    """One connection on 127.0.0.1 (or ::1), on a thread: sends `data` then closes, or reads
    to EOF (hashing) then closes. .result is (bytes, sha256 hex) of what it sent or received."""

    def __init__(self, mode: str, data: bytes = b"", host: str = "127.0.0.1"):
        self.listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.listener.bind((host, 0))
        self.listener.listen(1)
        self.listener.settimeout(DEADLINE_S)
        self.port = self.listener.getsockname()[1]
        self.mode, self.data = mode, data
        self.result: tuple[int, str] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="host-server", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(DEADLINE_S)
                if self.mode == "send":
                    conn.sendall(self.data)
                    self.result = (len(self.data), hashlib.sha256(self.data).hexdigest())
                else:
                    h, total, buf = hashlib.sha256(), 0, bytearray(CHUNK)
                    mv = memoryview(buf)
                    while k := conn.recv_into(buf):
                        h.update(mv[:k])
                        total += k
                    self.result = (total, h.hexdigest())
        except BaseException as e:  # reported by the test's thread
            self.error = e
        finally:
            self.listener.close()

    def join(self) -> tuple[int, str]:
        self.thread.join(DEADLINE_S)
        if self.error is not None:
            raise self.error
        assert self.result is not None, "the host server did not finish"
        return self.result


class GuestEndpoint(Endpoint):
    """test_tcp.Endpoint as the guest: segments stay Segments (framed by the rig), received
    data is hashed rather than kept, and the window is GUEST_WINDOW."""

    def __init__(self, flow: TcpFlow, data: bytes, eof: bool):
        super().__init__(flow, data, eof=eof)
        self.hash = hashlib.sha256()
        self.received = 0

    def write(self, data) -> int:
        self.writes += 1
        self.hash.update(data)
        self.received += len(data)
        return len(data)

    def handle(self, actions) -> None:
        for kind, value in actions:
            if kind is Act.SEND:
                self.outbox.append(value)
            else:
                super().handle([(kind, value)])

    window = GUEST_WINDOW

    def set_window(self) -> None:
        self.flow.rcv_wnd = self.window


class Interrupts:
    """The transport's interrupt line: counted, never looked at (the rig polls the rings)."""

    def __init__(self):
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


class BulkRig:
    """VirtioNet + SlirpBackend on a real EventLoop, the driver mock as the guest's driver,
    and one GuestEndpoint. Everything is driven by step() on the caller's thread."""

    def __init__(self, impl, memory, config: NatConfig | None = None,
                 rx_buffers: int = RX_BUFFERS, features: int = FEATURES):
        self.memory = memory
        self.rx_buffers = rx_buffers
        self.offloads = features & (1 << VIRTIO_NET_F_GUEST_CSUM) != 0
        self.loop = EventLoop(debug=True)
        self.backend = SlirpBackend(self.loop, config or NatConfig(), Policy(host_loopback=True))
        self.device = VirtioNet(self.backend, NIC_MAC, schedule=self.loop.call_soon)
        self.backend.attach(self.device.receive, self.device.rx_room,
                            self.device.stream_port())  # as vm.py does
        self.interrupts = Interrupts()
        self.transport = VirtioMmioTransport(self.device, memory, self.interrupts,
                                             ring_factory=impl.Virtqueue)
        guest = Guest(self.transport)
        guest.negotiate(features)
        assert self.device.acked_features == features
        self.rx = Driver(memory, size=rx_buffers)
        self.tx = Driver(memory, size=TX_QSIZE, desc_addr=0x50_0000, avail_addr=0x60_0000,
                         used_addr=0x70_0000)
        assert guest.setup_driver_queue(RX_QUEUE, self.rx) == 1
        assert guest.setup_driver_queue(TX_QUEUE, self.tx) == 1
        for _ in range(rx_buffers):
            self._post_rx()
        assert guest.driver_ok() & VIRTIO_CONFIG_S_DRIVER_OK
        self.gateway_mac: bytes | None = None
        self.endpoint: GuestEndpoint | None = None
        self._frame = bytearray(14 + 65536)
        self._ip = memoryview(self._frame)[14:]
        self._ip_id = 0
        # What the guest saw and sent, for the counters' cross-check.
        self.stats = dict(rx_frames=0, rx_bytes=0, rx_merged=0, rx_gso=0, rx_csum_partial=0,
                          rx_csum_valid=0, tx_frames=0, tx_bytes=0, tx_csum=0, tx_tso=0,
                          iterations=0)

    # ---- the driver's side of the rings --------------------------------------------------

    def _post_rx(self) -> None:
        head = self.rx.free[0]  # one descriptor per buffer: its address follows its index
        self.rx.add_chain([(RX_DATA + head * RX_BUF_LEN, RX_BUF_LEN, True)])

    def _kick(self, queue: int) -> None:
        self.transport.write(VIRTIO_MMIO_QUEUE_NOTIFY, 4, queue)

    def transmit(self, frames) -> None:
        """[(virtio_net_hdr, frame)] into TX chains, one kick per ring's worth."""
        for i in range(0, len(frames), TX_QSIZE):
            batch = frames[i:i + TX_QSIZE]
            self._offer_tx(batch)
            self.stats["tx_frames"] += len(batch)
            self.stats["tx_bytes"] += sum(len(frame) for _header, frame in batch)
            self._kick(TX_QUEUE)
            self._retire_tx(len(batch))

    def _offer_tx(self, batch) -> None:
        """Each (header, frame) in one readable chain, offered. CompiledDriverRig replaces
        this and _retire_tx with the compiled driver."""
        tx, memory = self.tx, self.memory
        for header, frame in batch:
            head = tx.free[0]
            addr = TX_DATA + head * TX_SLOT
            memory.write(addr, header)
            memory.write(addr + VIRTIO_NET_HDR_LEN, frame)
            tx.add_chain([(addr, VIRTIO_NET_HDR_LEN + len(frame), False)])

    def _retire_tx(self, offered: int) -> None:
        used = self.tx.collect(recycle=True)
        assert len(used) == offered, "the device left TX chains"

    def _take_rx(self) -> list[tuple[bytes, bytes]]:
        """(virtio_net_hdr, frame) bytes for each frame the device put in RX buffers since
        the last call, its buffers joined by num_buffers; every buffer is reposted at once
        (the caller kicks). CompiledDriverRig replaces this with the compiled driver."""
        used = self.rx.collect()
        frames = []
        read = self.memory.read
        i = 0
        while i < len(used):
            head, length = used[i]
            raw = read(RX_DATA + head * RX_BUF_LEN, length)
            nbuf = VIRTIO_NET_HDR.unpack_from(raw)[6]
            assert 1 <= nbuf <= len(used) - i, "num_buffers past the used buffers"
            frame = raw[VIRTIO_NET_HDR_LEN:] + b"".join(
                read(RX_DATA + head2 * RX_BUF_LEN, length2) for head2, length2 in used[i + 1:i + nbuf])
            frames.append((raw[:VIRTIO_NET_HDR_LEN], frame))
            i += nbuf
        for head, _length in used:
            self.rx.recycle(head)
            self._post_rx()
        return frames

    def receive(self) -> list[tuple[tuple, bytes]]:
        """(header fields, frame) for each frame the device put in RX buffers since the last
        call; the buffers are reposted (one RX kick), so the device's backlog moves in at
        once."""
        frames = []
        for raw_header, frame in self._take_rx():
            header = VIRTIO_NET_HDR.unpack(raw_header)
            flags, gso, nbuf = header[0], header[1], header[6]
            if not self.offloads:
                assert (flags, gso) == (0, 0), "an offload the guest did not ack"
            if nbuf > 1:
                self.stats["rx_merged"] += 1
            frames.append((header, frame))
            self.stats["rx_frames"] += 1
            self.stats["rx_bytes"] += len(frame)
        if frames:
            self._kick(RX_QUEUE)
        return frames

    # ---- the guest's stack -----------------------------------------------------------

    def arp(self) -> None:
        """Ask for the gateway's MAC, as the guest's stack does before its first packet."""
        request = build_arp(ARPOP_REQUEST, NIC_MAC, GUEST_IP, bytes(6), GATEWAY_IP)
        self.transmit([(bytes(VIRTIO_NET_HDR_LEN),
                        _ETH.pack(ETH_BROADCAST, NIC_MAC, ETH_P_ARP) + request)])
        for _ in range(10):
            for _header, frame in self.receive():
                dst, src, ethertype = _ETH.unpack_from(frame)
                assert dst == NIC_MAC and ethertype == ETH_P_ARP
                arp = parse_arp(memoryview(frame)[14:])
                assert arp.op == ARPOP_REPLY and arp.spa == GATEWAY_IP and arp.sha == src
                self.gateway_mac = src
                return
            self.loop.run_once(0)
        raise AssertionError("no ARP reply from the gateway")

    def connect(self, port: int, data: bytes = b"", eof: bool = True) -> GuestEndpoint:
        flow, acts = TcpFlow.connect(40000, port, random.Random(port).getrandbits(32),
                                     time.monotonic(), mss=MSS, wscale=7)
        self.endpoint = GuestEndpoint(flow, data, eof)
        self.endpoint.handle(acts)
        return self.endpoint

    def _frame_of(self, seg) -> tuple[bytes, bytes]:
        """(virtio_net_hdr, Ethernet frame) for one guest segment."""
        self._ip_id = (self._ip_id + 1) & 0xFFFF
        n = fastpath.build_ipv4_tcp(self._ip, GUEST_IP, GATEWAY_IP, self._ip_id,
                                    seg.src_port, seg.dst_port, seg.seq, seg.ack, seg.flags,
                                    seg.window, seg.options() if seg.flags & SYN else b"",
                                    seg.payload)
        self._frame[:14] = _ETH.pack(self.gateway_mac, NIC_MAC, ETH_P_IP)
        size = len(seg.payload)
        if not size:
            return bytes(VIRTIO_NET_HDR_LEN), bytes(self._frame[:14 + n])
        # Checksum offload as a Linux guest does it: only the pseudo-header sum in the field.
        partial = pseudo_header_sum(GUEST_IP, GATEWAY_IP, IPPROTO_TCP, n - 20)
        struct.pack_into("!H", self._frame, _CSUM_FIELD, partial)
        self.stats["tx_csum"] += 1
        if size > MSS:
            self.stats["tx_tso"] += 1
            header = VIRTIO_NET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4,
                                         14 + 40, MSS, 34, 16, 0)
        else:
            header = VIRTIO_NET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 16, 0)
        return header, bytes(self._frame[:14 + n])

    def _to_guest(self, frame: bytes, now: float, header: tuple = (0,) * 7) -> None:
        dst, src, ethertype = _ETH.unpack_from(frame)
        assert (dst, src, ethertype) == (NIC_MAC, self.gateway_mac, ETH_P_IP)
        pkt = memoryview(frame)[14:]
        assert fastpath.inet_checksum(pkt[:20]) == 0 and pkt[9] == IPPROTO_TCP
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, _nbuf = header
        if gso_type:
            # As virtio_net_hdr_to_skb: a TCPv4 GSO frame needs NEEDS_CSUM, gso_size the
            # MSS and more than one segment's payload; hdr_len covers the headers.
            assert gso_type == VIRTIO_NET_HDR_GSO_TCPV4 and flags & VIRTIO_NET_HDR_F_NEEDS_CSUM
            assert gso_size == MSS and hdr_len == 14 + 40 and len(pkt) - 40 > MSS
            self.stats["rx_gso"] += 1
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            assert (csum_start, csum_offset) == (34, 16)
            assert struct.unpack_from("!H", pkt, 36)[0] == pseudo_header_sum(
                bytes(pkt[12:16]), bytes(pkt[16:20]), IPPROTO_TCP, len(pkt) - 20)
            # Finish it as the guest's stack (or its NIC, forwarding) would.
            whole = bytearray(pkt)
            struct.pack_into("!H", whole, 36, fastpath.inet_checksum(pkt[20:]))
            pkt = memoryview(bytes(whole))
            self.stats["rx_csum_partial"] += 1
        elif flags:
            assert flags == VIRTIO_NET_HDR_F_DATA_VALID and not gso_type
            self.stats["rx_csum_valid"] += 1  # checked anyway: the test trusts no one
        assert fastpath.tcp_checksum(pkt[12:16], pkt[16:20], pkt[20:]) == 0
        self.endpoint.receive(parse_segment(pkt[20:]), now)

    def step(self, until=None) -> None:
        """One turn: the guest handles what arrived, sends what it has, then the loop runs
        once (blocking up to IDLE_WAIT when nothing is due), unless until() already holds:
        a transfer's clock must not take in a wait that comes after its end."""
        ep = self.endpoint
        now = time.monotonic()
        for header, frame in self.receive():
            self._to_guest(frame, now, header)
        if ep.flow.deadline is not None and ep.flow.deadline <= now:
            ep.handle(ep.flow.on_timer(now))
        ep.pump(now)
        if ep.outbox:
            # One ACK per batch of received segments, as the guest's GRO and delayed ACKs
            # would: a pure ACK followed by another segment says nothing the later one
            # does not (no loss here, so no duplicate ACKs to keep).
            out, ep.outbox = ep.outbox, []
            keep = [seg for i, seg in enumerate(out)
                    if seg.payload or seg.flags & ~0x10 or i == len(out) - 1]
            self.transmit([self._frame_of(seg) for seg in keep])
        self.stats["iterations"] += 1
        if until is not None and until():
            return
        self.loop.run_once(IDLE_WAIT)

    def run(self, until) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not until():
            assert time.monotonic() < deadline, f"stuck: {self.describe()}"
            self.step(until)

    def describe(self) -> str:
        flow = self.endpoint.flow
        return (f"guest {flow.state} received {self.endpoint.received} sent "
                f"{self.endpoint.consumed} device {dict(self.device.counters)} "
                f"nat {self.backend.counters}")

    def close(self) -> None:
        self.device.close()
        self.loop.close()

    # ---- checks ------------------------------------------------------------------------

    def assert_counters_consistent(self) -> None:
        dev, seen = self.device.counters, self.stats
        drops = {k: v for k, v in dev.items() if "drop" in k or k in (
            "rx_queue_errors", "rx_buffer_too_small", "rx_drop_larger_than_ring")}
        assert drops == {}, drops
        assert dev["rx_frames"] == seen["rx_frames"] and dev["rx_bytes"] == seen["rx_bytes"]
        assert dev["rx_merged_frames"] == seen["rx_merged"]
        assert dev["rx_gso_frames"] == seen["rx_gso"]
        assert dev["rx_csum_offloaded"] == seen["rx_csum_partial"]
        assert dev["rx_csum_valid"] == seen["rx_csum_valid"]
        if not self.offloads:
            assert seen["rx_merged"] == 0  # every frame fits one 2 KiB buffer
        assert dev["tx_frames"] == seen["tx_frames"] and dev["tx_bytes"] == seen["tx_bytes"]
        assert dev["tx_csum_offloaded"] == seen["tx_csum"]
        assert dev["tx_tso_frames"] == seen["tx_tso"]
        assert dev["tx_csum_finished"] == 0  # every partial checksum was at the TCP header
        nat = self.backend.counters
        assert nat.get("tcp_bad_checksum", 0) == 0 and nat.get("tcp_retransmits", 0) == 0, nat
        assert nat.get("tcp_rst_sent", 0) == 0, nat


@pytest.fixture
def rig(impl, memory, request):
    """The rig, its guest acking FEATURES or (indirect parametrization) another set."""
    rig = BulkRig(impl, memory, features=getattr(request, "param", FEATURES))
    rig.arp()
    yield rig
    rig.close()


def size_for(impl) -> int:
    return SIZES["pure" if impl.__name__.endswith("_py") else "cython"]


OFFLOAD_SETS = pytest.mark.parametrize("rig", [FEATURES, GSO_FEATURES], ids=["mss", "gso"],
                                       indirect=True)


@OFFLOAD_SETS
def test_host_to_guest_bulk(impl, rig):
    size = size_for(impl)
    data = payload(size)
    server = HostServer("send", data)
    ep = rig.connect(server.port, eof=False)
    # The host closes once it has sent everything; the guest then closes its side too.
    rig.run(lambda: ep.flow.fin_received)
    ep.eof = True
    rig.run(lambda: ep.flow.state in (TcpState.TIME_WAIT, TcpState.CLOSED))
    sent_bytes, sent_sha = server.join()
    assert (ep.received, ep.hash.hexdigest()) == (sent_bytes, sent_sha) == \
        (size, hashlib.sha256(data).hexdigest())
    rig.assert_counters_consistent()
    nat = rig.backend.counters
    assert nat["tcp_bytes_to_guest"] == size
    # Every frame carried its 54 header bytes (one MSS segment each, or a GSO frame).
    assert rig.device.counters["rx_bytes"] >= size + rig.device.counters["rx_stream_frames"] * 54
    # The data took the card's stream port (socket -> RX buffers), not the segment builder.
    assert rig.device.counters["rx_stream_bytes"] == size, dict(rig.device.counters)
    assert nat.get("tcp_stream_frames", 0) == rig.device.counters["rx_stream_frames"]
    assert rig.stats["iterations"] <= MAX_ITERATIONS_PER_MIB * max(1, size // MiB), rig.stats
    dev = rig.device.counters
    if rig.offloads:
        # Negotiated and used: nearly all the data came in GSO frames of many segments,
        # spread over mergeable buffers, none of them checksummed by the host.
        assert (dev["negotiated_guest_csum"], dev["negotiated_guest_tso4"],
                dev["negotiated_mrg_rxbuf"]) == (1, 1, 1)
        assert dev["rx_gso_frames"] >= size // TSO_PAYLOAD, dict(dev)
        assert dev["rx_stream_frames"] <= size // (16 * MSS), dict(dev)
        # Nearly all spread over several buffers: a short GSO frame (the tail of a burst
        # the socket had only part of) may fit one.
        assert dev["rx_merged_frames"] >= 0.9 * dev["rx_gso_frames"], dict(dev)
        assert dev["rx_csum_offloaded"] >= dev["rx_stream_frames"]
    else:
        assert (dev["negotiated_guest_csum"], dev["negotiated_guest_tso4"]) == (0, 0)
        assert dev["rx_gso_frames"] == dev["rx_csum_offloaded"] == 0
        assert dev["rx_stream_frames"] >= size // MSS  # one segment per frame


def test_guest_to_host_bulk(impl, rig):
    size = size_for(impl)
    data = payload(size)
    server = HostServer("recv")
    ep = rig.connect(server.port, data, eof=True)
    rig.run(lambda: ep.flow.state is not TcpState.SYN_SENT)
    ep.flow.snd_mss = TSO_PAYLOAD  # the guest's TSO: one 64 KiB segment per frame
    # The guest sends everything and its FIN; the host reads to EOF and closes.
    rig.run(lambda: ep.flow.fin_received and ep.consumed == size)
    rig.run(lambda: ep.flow.state in (TcpState.TIME_WAIT, TcpState.CLOSED))
    got_bytes, got_sha = server.join()
    assert (got_bytes, got_sha) == (size, hashlib.sha256(data).hexdigest())
    rig.assert_counters_consistent()
    nat = rig.backend.counters
    assert nat["tcp_bytes_to_host"] == size
    assert rig.stats["tx_tso"] >= size // TSO_PAYLOAD - 1  # nearly every frame a TSO one
    assert rig.device.counters["tx_bytes"] >= size
    assert rig.stats["iterations"] <= MAX_ITERATIONS_PER_MIB * max(1, size // MiB), rig.stats


def download_with_window(rig, data: bytes, window: int) -> None:
    """A host server sends `data` to the guest, which advertises `window`; both sides
    close; the guest received every byte in order (SHA-256)."""
    server = HostServer("send", data)
    ep = rig.connect(server.port, eof=False)
    ep.window = window
    rig.run(lambda: ep.flow.fin_received)
    ep.eof = True
    rig.run(lambda: ep.flow.state in (TcpState.TIME_WAIT, TcpState.CLOSED))
    assert server.join() == (ep.received, ep.hash.hexdigest()) == \
        (len(data), hashlib.sha256(data).hexdigest())


@OFFLOAD_SETS
def test_host_to_guest_with_a_window_beyond_the_cards_room(impl, rig):
    """A guest window (1 MiB, as a Linux guest advertises) larger than its posted buffers
    plus the device's backlog: the NAT's TCP stops at the card's room (rx_room) and
    resumes on rx_ready, so no frame is dropped and nothing needs retransmitting."""
    download_with_window(rig, payload(8 * MiB), 1 << 20)
    dev, nat = rig.device.counters, rig.backend.counters
    drops = {k: v for k, v in dev.items() if "drop" in k}
    assert drops == {}, drops
    # It did wait for the card: the stream port blocked (or the copy path found no room).
    assert nat.get("tcp_port_blocked", 0) + nat.get("tcp_guest_rx_full", 0) > 0, nat
    assert nat.get("tcp_retransmits", 0) == 0, nat
    assert dev["rx_frames"] == rig.stats["rx_frames"]
    assert dev["rx_bytes"] == rig.stats["rx_bytes"]


# -- the benchmark's compiled driver (bench/_guest_driver.pyx) --------------------------------


@pytest.fixture(scope="module")
def guest_driver(tmp_path_factory):
    from tests import bench_scripts

    bench = bench_scripts.load("conftest.py", "bench_conftest")
    return bench.build_bench_module("_guest_driver", tmp_path_factory.mktemp("guest_driver"))


class CompiledDriverRig(BulkRig):
    """BulkRig whose guest driver does its ring work in C (bench/_guest_driver.pyx): RX
    buffers taken and given back, TX frames offered and retired. The benchmark's rig."""

    def __init__(self, driver, *args, **kwargs):
        self.driver = driver
        super().__init__(*args, **kwargs)

    def _take_rx(self):
        rx, memory = self.rx, self.memory
        frames, rx.last_used, rx.avail_idx = self.driver.rx_collect(
            memory.numpy(), memory.translate(rx.used_addr), memory.translate(rx.avail_addr),
            memory.translate(RX_DATA), RX_BUF_LEN, rx.size, rx.last_used, rx.avail_idx)
        return frames

    def _offer_tx(self, batch) -> None:
        tx, memory = self.tx, self.memory
        tx.avail_idx = self.driver.tx_offer(
            memory.numpy(), memory.translate(tx.desc_addr), memory.translate(tx.avail_addr),
            memory.translate(TX_DATA), TX_DATA, TX_SLOT, tx.size, tx.avail_idx, batch)

    def _retire_tx(self, offered: int) -> None:
        tx = self.tx
        tx.last_used = self.driver.tx_retire(self.memory.numpy(), self.memory.translate(tx.used_addr),
                                             tx.size, tx.last_used, offered)


@pytest.mark.slow
@pytest.mark.parametrize("features", [FEATURES, GSO_FEATURES], ids=["mss", "gso"])
def test_the_benchmarks_compiled_driver_moves_what_the_python_one_does(impl, guest_driver,
                                                                       memory, features):
    """The benchmark's figures rest on this driver: with it the guest still receives every
    byte in order and sends every byte (SHA-256 both ways), and what it counts (frames,
    bytes, merged, GSO, checksum states, TSO) matches the device's counters."""
    size = 4 * MiB
    data = payload(size)
    rig = CompiledDriverRig(guest_driver, impl, memory, features=features, rx_buffers=256)
    try:
        rig.arp()
        download_with_window(rig, data, 1 << 20)
        if features == GSO_FEATURES:
            assert rig.stats["rx_gso"] > 0 and rig.stats["rx_merged"] > 0, rig.stats
        server = HostServer("recv")
        ep = rig.connect(server.port, data, eof=True)
        rig.run(lambda: ep.flow.state is not TcpState.SYN_SENT)
        ep.flow.snd_mss = TSO_PAYLOAD
        rig.run(lambda: ep.flow.fin_received and ep.consumed == size)
        rig.run(lambda: ep.flow.state in (TcpState.TIME_WAIT, TcpState.CLOSED))
        assert server.join() == (size, hashlib.sha256(data).hexdigest())
        assert rig.stats["tx_tso"] >= size // TSO_PAYLOAD - 1
        rig.assert_counters_consistent()
        # A used entry the device never wrote is refused, not read past the buffers.
        rx = rig.rx
        slot = rx.used_addr + 4 + 8 * (rx.last_used % rx.size)
        memory.write(slot, struct.pack("<II", rx.size, 64))  # an id outside the ring
        memory.write(rx.used_addr + 2, struct.pack("<H", (rx.last_used + 1) & 0xFFFF))
        with pytest.raises(ValueError, match="outside the RX buffers"):
            rig._take_rx()
        # A TX chain the device left is noticed.
        with pytest.raises(ValueError, match="used 0 of 1 chains"):
            rig._retire_tx(1)
        # Rings and buffers are checked against the memory before anything is read.
        mem = memory.numpy()
        with pytest.raises(ValueError, match="outside the memory"):
            guest_driver.rx_collect(mem, len(mem) - 8, 0, 0, RX_BUF_LEN, 256, 0, 0)
        with pytest.raises(ValueError, match="outside the memory"):
            guest_driver.rx_collect(mem, 0, 0, len(mem) - RX_BUF_LEN, RX_BUF_LEN, 256, 0, 0)
        with pytest.raises(ValueError, match="outside the memory"):
            guest_driver.tx_retire(mem, -4, 256, 0, 0)
    finally:
        rig.close()
