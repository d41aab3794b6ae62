"""virtio-net (virtio 1.2 §5.1): the guest's network card, whatever carries its queues.

The device core sees guest memory (through its queues), its two queues (receiveq1 = 0,
transmitq1 = 1), an interrupt callable and a backend. It never sees KVM, the MMIO
registers or vhost-user, so any transport can host it.

The backend contract (voidbox.net.backend): the device hands every frame the guest sends
to `backend.guest_frame(frame, csum_verified)`; the backend hands every frame for the
guest to `device.receive(frame)`, from its own I/O thread. `accepts_partial_checksums`,
`accepts_tso4` and `accepts_tso6` say which offloads it can honour; only those are
offered. `produces_guest_offloads` says every frame it hands over was built by it (so its
checksums can be vouched for) and its TCP relay can use the stream port's TSO frames: only
then are GUEST_CSUM, GUEST_TSO4 and GUEST_TSO6 offered. A backend that stops sending when receive()
refuses a frame is told by `backend.rx_ready()` (on the RX kick, once the backlog is
placed) that it may send again.

Decisions a reader should know:
- The header is always the 12-byte struct virtio_net_hdr (§5.1.6: VERSION_1 includes
  num_buffers). Every header a hostile driver writes is checked: a header shorter than 12
  bytes, a checksum request (NEEDS_CSUM) pointing outside the frame, a GSO type or flag
  that was not negotiated (GSO_TCPV4 needs HOST_TSO4, GSO_TCPV6 HOST_TSO6, ECN and UDP
  never), a gso_size of 0 or not below the frame's length, a frame shorter than an
  Ethernet header or longer than MAX_FRAME: each is dropped and counted, its chain
  retired, and the queue keeps serving. A GSO frame the backend takes as one TCP segment
  (not a TAP's: the kernel checks those) must also be what its type says, an IPv4 or
  IPv6 TCP packet whose headers and lengths fit the frame, with the checksum request at
  its TCP checksum (gso_layers_match).
- A partial checksum (NEEDS_CSUM) at the packet's own TCP/UDP header is taken as vouched
  for (the NAT relays payloads, it never forwards packets); one anywhere else is finished
  here, as the host stack's skb_checksum_help would.
- RX buffers are taken from the ring when a frame needs them and held by the device until
  used; with MRG_RXBUF a frame spreads over as many as it needs (num_buffers says how
  many), without it a frame must fit one buffer. A frame that cannot be placed waits in
  a bounded backlog until the driver posts buffers (its RX kick); beyond the bound frames
  are dropped and counted, as a NIC would drop them, so a guest that never posts buffers
  costs bounded memory.
- What the driver acked decides every header written towards it (`rx_offloads`): without
  GUEST_CSUM a frame is complete and its header's flags are 0; without GUEST_TSO4 (or
  with it but without GUEST_CSUM, which §5.1.3.1 forbids) no IPv4 frame is a GSO one,
  and without GUEST_TSO6 no IPv6 frame (a driver may ack one and not the other). With
  GUEST_CSUM, frames the backend built go with DATA_VALID (their checksum is already
  there: the guest skips its check and a guest that forwards them sends them intact);
  the stream port's frames go with NEEDS_CSUM (nobody ever sums the payload: see
  voidbox/virtio/_netrx_py.py). With GUEST_TSO4 (GUEST_TSO6) the stream port puts up to
  64 KiB of an IPv4 (IPv6) flow's TCP payload in one frame (GSO_TCPV4 / GSO_TCPV6,
  gso_size the guest's MSS), and a TCP frame of that family longer than the MTU handed
  to receive() goes as a GSO frame; to a guest without it such a frame is cut into
  MTU-sized segments here (segment_tcp).
- The counters say which offloads were negotiated (`negotiated_*`, set on activation)
  and used (rx_gso_frames, of them rx_gso6_frames IPv6 ones, rx_csum_offloaded,
  rx_csum_valid, rx_gso_segmented; tx_*, tx_tso6_frames among them).
"""

from __future__ import annotations

import collections
import errno
import struct
import threading
from collections.abc import Callable

from .._records import named_tuple
from ..net.packets import pseudo_header_sum
from ..ring import REQUIRE_READABLE, REQUIRE_WRITABLE, QueueError
from .device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_MMIO_INT_VRING,
    VirtioDevice,
)

# The device id, feature bits and config values live in net_defs, which the vhost-user
# frontend imports without this data path.
from .net_defs import (  # noqa: F401 (names this module's users import from it)
    DEFAULT_MTU,
    QUEUE_SIZE,
    VIRTIO_ID_NET,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
)

RX_QUEUE = 0  # receiveq1
TX_QUEUE = 1  # transmitq1

# struct virtio_net_hdr (§5.1.6)
VIRTIO_NET_HDR = struct.Struct("<BBHHHHH")  # flags, gso_type, hdr_len, gso_size,
#                                              csum_start, csum_offset, num_buffers
VIRTIO_NET_HDR_LEN = VIRTIO_NET_HDR.size  # 12
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80

ETH_HLEN = 14
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
IPV6_HLEN = 40
IPV6_NEXT_HEADER = 6  # RFC 8200 §3: the Next Header field's offset
IPPROTO_TCP = 6
IPPROTO_UDP = 17
TCP_CSUM_OFFSET = 16  # RFC 9293 §3.1
TCP_FIN, TCP_PSH, TCP_CWR = 0x01, 0x08, 0x80
UDP_CSUM_OFFSET = 6  # RFC 768
VLAN_HLEN = 4
# The largest frame either way: a 64 KiB IPv4 packet (a TSO segment) behind an Ethernet
# header and two VLAN tags (IPv6 TSO frames, ours and Linux's, stay within it too).
# Anything longer is dropped, never truncated.
MAX_FRAME = ETH_HLEN + 2 * VLAN_HLEN + 65535
# Frames waiting for RX buffers: a NIC's worth of queue. Past it, frames are dropped.
RX_BACKLOG_FRAMES = 256
# Chains one kick may serve before the rest is rescheduled: a guest cannot keep the
# network thread in one callback for ever by refilling as fast as we drain.
TX_BUDGET = 2 * QUEUE_SIZE
# rx_from_fd's status
RX_FD_DRAINED, RX_FD_MORE, RX_FD_BLOCKED = range(3)
TOO_BIG = object()  # _take_buffers: the frame can never fit the posted buffers
# The header fields of a complete frame (num_buffers aside): no flags, no GSO.
PLAIN = (0, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0, 0)
# Negotiated features as the counters show them (negotiated_<name>: 0 or 1).
NAMED_FEATURES = {
    "csum": VIRTIO_NET_F_CSUM, "host_tso4": VIRTIO_NET_F_HOST_TSO4,
    "host_tso6": VIRTIO_NET_F_HOST_TSO6,
    "guest_csum": VIRTIO_NET_F_GUEST_CSUM, "guest_tso4": VIRTIO_NET_F_GUEST_TSO4,
    "guest_tso6": VIRTIO_NET_F_GUEST_TSO6,
    "mrg_rxbuf": VIRTIO_NET_F_MRG_RXBUF, "event_idx": VIRTIO_F_EVENT_IDX,
    "indirect_desc": VIRTIO_F_INDIRECT_DESC,
}


def inet_checksum(data) -> int:
    """RFC 1071 one's complement sum of data, folded and inverted."""
    from ..net.fastpath import inet_checksum as fast

    return fast(data)


def l4_checksum_offset(frame) -> int | None:
    """Offset of the checksum field of an untunnelled IPv4 TCP or UDP frame (or an IPv6
    one whose TCP/UDP header follows the fixed header, RFC 8200 §3), else None."""
    if len(frame) >= ETH_HLEN + IPV6_HLEN and frame[12] << 8 | frame[13] == ETH_P_IPV6:
        if frame[ETH_HLEN] >> 4 != 6:
            return None
        nh = frame[ETH_HLEN + IPV6_NEXT_HEADER]
        if nh == IPPROTO_TCP:
            return ETH_HLEN + IPV6_HLEN + TCP_CSUM_OFFSET
        if nh == IPPROTO_UDP:
            return ETH_HLEN + IPV6_HLEN + UDP_CSUM_OFFSET
        return None
    if len(frame) < ETH_HLEN + 20 or frame[12] << 8 | frame[13] != ETH_P_IP:
        return None
    vihl = frame[ETH_HLEN]
    if vihl >> 4 != 4:
        return None
    l4 = ETH_HLEN + (vihl & 0x0F) * 4
    proto = frame[ETH_HLEN + 9]
    if proto == IPPROTO_TCP:
        return l4 + TCP_CSUM_OFFSET
    if proto == IPPROTO_UDP:
        return l4 + UDP_CSUM_OFFSET
    return None


@named_tuple
class SuperFrame:
    """The layout of a TCP frame longer than the MTU (a TSO segment), as cut by segment_tcp."""

    v6: bool
    iphl: int  # the IP header's length: IPv4's IHL, or IPv6's fixed 40 bytes
    thl: int  # the TCP header's length
    total: int  # the IP packet's length, its header included


def tcp_super_frame(frame, mtu: int) -> SuperFrame | None:
    """The layout of an untunnelled TCP frame whose IP packet is longer than mtu (a TSO
    segment): IPv4 unfragmented, or IPv6 with TCP right after the fixed header (RFC 8200
    §3). Else None (not TCP, a fragment, an extension header, lengths that disagree)."""
    if len(frame) < ETH_HLEN + 40:
        return None
    ethertype = frame[12] << 8 | frame[13]
    if ethertype == ETH_P_IPV6:
        if len(frame) < ETH_HLEN + IPV6_HLEN + 20 or frame[ETH_HLEN] >> 4 != 6 \
                or frame[ETH_HLEN + IPV6_NEXT_HEADER] != IPPROTO_TCP:
            return None
        v6, iphl = True, IPV6_HLEN
        # Payload length 0 is a jumbogram's (RFC 2675): never longer than mtu here.
        total = IPV6_HLEN + (frame[ETH_HLEN + 4] << 8 | frame[ETH_HLEN + 5])
    elif ethertype == ETH_P_IP:
        vihl = frame[ETH_HLEN]
        v6, iphl = False, (vihl & 0x0F) * 4
        if vihl >> 4 != 4 or iphl < 20 or frame[ETH_HLEN + 9] != IPPROTO_TCP:
            return None
        if (frame[ETH_HLEN + 6] & 0x3F) | frame[ETH_HLEN + 7]:
            return None  # a fragment (MF or an offset): not a segment of ours to cut
        total = frame[ETH_HLEN + 2] << 8 | frame[ETH_HLEN + 3]
    else:
        return None
    if total <= mtu or ETH_HLEN + total > len(frame) or ETH_HLEN + iphl + 20 > len(frame):
        return None
    thl = (frame[ETH_HLEN + iphl + 12] >> 4) * 4
    if thl < 20 or iphl + thl >= total or mtu - iphl - thl <= 0:
        return None
    return SuperFrame(v6, iphl, thl, total)


def segment_tcp(frame, layout: SuperFrame, mss: int) -> list[bytearray]:
    """Cut a TCP super-frame into frames of mss payload bytes each, as a NIC's TSO would:
    consecutive sequence numbers, FIN and PSH on the last only, CWR on the first only, the
    TCP checksum computed over each segment's pseudo-header (RFC 9293 §3.1, RFC 8200 §8.1).
    IPv4 segments get consecutive IP ids and their header checksum (RFC 791 §3.1); IPv6
    ones only their payload length (no id outside a Fragment header, no header checksum)."""
    from ..net.fastpath import tcp_checksum

    v6, iphl, thl, total = layout
    l4 = ETH_HLEN + iphl
    start, end = l4 + thl, ETH_HLEN + total
    if v6:
        src, dst = bytes(frame[ETH_HLEN + 8:ETH_HLEN + 24]), bytes(frame[ETH_HLEN + 24:ETH_HLEN + 40])
    else:
        src, dst = bytes(frame[ETH_HLEN + 12:ETH_HLEN + 16]), bytes(frame[ETH_HLEN + 16:ETH_HLEN + 20])
        ident = frame[ETH_HLEN + 4] << 8 | frame[ETH_HLEN + 5]
    seq = struct.unpack_from("!I", frame, l4 + 4)[0]
    flags = frame[l4 + 13]
    headers = bytes(frame[:start])
    out = []
    for i, off in enumerate(range(start, end, mss)):
        chunk = frame[off:min(off + mss, end)]
        seg = bytearray(headers)
        seg += chunk
        if v6:
            struct.pack_into("!H", seg, ETH_HLEN + 4, thl + len(chunk))
        else:
            struct.pack_into("!HH", seg, ETH_HLEN + 2, iphl + thl + len(chunk), (ident + i) & 0xFFFF)
            struct.pack_into("!H", seg, ETH_HLEN + 10, 0)
            struct.pack_into("!H", seg, ETH_HLEN + 10, inet_checksum(seg[ETH_HLEN:l4]))
        struct.pack_into("!I", seg, l4 + 4, (seq + off - start) & 0xFFFFFFFF)
        f = flags if off + mss >= end else flags & ~(TCP_FIN | TCP_PSH)
        seg[l4 + 13] = f if i == 0 else f & ~TCP_CWR
        struct.pack_into("!H", seg, l4 + TCP_CSUM_OFFSET, 0)
        struct.pack_into("!H", seg, l4 + TCP_CSUM_OFFSET, tcp_checksum(src, dst, seg[l4:]))
        out.append(seg)
    return out


def gso_layers_match(frame, gso_type: int, csum_start: int, csum_offset: int) -> bool:
    """Whether a guest's GSO frame is what its header says: an IPv4 (GSO_TCPV4) or IPv6
    (GSO_TCPV6, TCP right after the fixed header) TCP packet whose whole TCP header is in
    the frame, the IP lengths within it, and the checksum request at its TCP checksum.
    The backend then takes it as one TCP segment; anything else is a lie to drop."""
    length = len(frame)
    if length < ETH_HLEN + 20:
        return False
    ethertype = frame[12] << 8 | frame[13]
    if gso_type == VIRTIO_NET_HDR_GSO_TCPV6:
        if ethertype != ETH_P_IPV6 or length < ETH_HLEN + IPV6_HLEN \
                or frame[ETH_HLEN] >> 4 != 6 or frame[ETH_HLEN + IPV6_NEXT_HEADER] != IPPROTO_TCP:
            return False
        l4 = ETH_HLEN + IPV6_HLEN
        end = l4 + (frame[ETH_HLEN + 4] << 8 | frame[ETH_HLEN + 5])
    elif gso_type == VIRTIO_NET_HDR_GSO_TCPV4:
        vihl = frame[ETH_HLEN]
        if ethertype != ETH_P_IP or vihl >> 4 != 4 or vihl & 0x0F < 5 \
                or frame[ETH_HLEN + 9] != IPPROTO_TCP:
            return False
        l4 = ETH_HLEN + (vihl & 0x0F) * 4
        end = ETH_HLEN + (frame[ETH_HLEN + 2] << 8 | frame[ETH_HLEN + 3])
    else:
        return False
    if l4 + 20 > length or end > length:
        return False
    thl = (frame[l4 + 12] >> 4) * 4
    return thl >= 20 and l4 + thl <= end and (csum_start, csum_offset) == (l4, TCP_CSUM_OFFSET)


@named_tuple
class RxOffloads:
    """What a header towards the guest may say, from what the driver acked (rx_offloads)."""

    merge: bool  # a frame may spread over several buffers (MRG_RXBUF)
    csum: bool  # NEEDS_CSUM or DATA_VALID (GUEST_CSUM)
    tso4: bool  # a GSO_TCPV4 frame (GUEST_TSO4 with GUEST_CSUM)
    tso6: bool  # a GSO_TCPV6 frame (GUEST_TSO6 with GUEST_CSUM)

    def allows_gso(self, gso_type: int) -> bool:
        """Whether a header with this gso_type may go to the driver (GSO_NONE always)."""
        if gso_type == VIRTIO_NET_HDR_GSO_NONE:
            return True
        if gso_type == VIRTIO_NET_HDR_GSO_TCPV4:
            return self.tso4
        if gso_type == VIRTIO_NET_HDR_GSO_TCPV6:
            return self.tso6
        return False  # ECN, UDP: never negotiated

    @property
    def any_gso(self) -> bool:
        return self.tso4 or self.tso6


class VirtioNet(VirtioDevice):
    """The device core: see the module docstring.

    `schedule(callback)` runs callback later on the device's I/O thread (a TX kick that
    used its budget continues there); `counters` holds frames, bytes and drops by reason.
    """

    device_id = VIRTIO_ID_NET
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, backend, mac: bytes, mtu: int = DEFAULT_MTU,
                 schedule: Callable[[Callable[[], None]], None] | None = None, pcap=None):
        super().__init__()
        if len(mac) != 6:
            raise ValueError("a MAC address is 6 bytes")
        self.backend = backend
        self.mac = bytes(mac)
        self.mtu = mtu
        self.schedule = schedule or (lambda callback: callback())
        self.pcap = pcap  # a voidbox.net.pcap.PcapWriter: every frame both ways
        # RLock: a TX frame may be answered (ARP, DHCP) inside guest_frame, on this thread.
        self._lock = threading.RLock()
        self._rx_held: collections.deque = collections.deque()  # popped, unused RX chains
        self._rx_backlog: collections.deque = collections.deque()
        self._tx_rescheduled = False
        # The stream port met a corrupt RX ring (on the backend's thread): the next RX kick
        # meets it again, where the transport can answer with DEVICE_NEEDS_RESET.
        self.rx_ring_error = False
        self.counters: collections.Counter = collections.Counter()
        # A backend that writes TX chains itself (a TAP: backend.guest_chain), or None.
        self._tx_direct = getattr(backend, "guest_chain", None)

    # ---- what the driver sees ----------------------------------------------------------

    @property
    def features(self) -> int:
        bits = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_EVENT_IDX)
                | (1 << VIRTIO_F_INDIRECT_DESC) | (1 << VIRTIO_NET_F_MAC)
                | (1 << VIRTIO_NET_F_MTU) | (1 << VIRTIO_NET_F_STATUS)
                | (1 << VIRTIO_NET_F_MRG_RXBUF))
        # Only what the backend can take is offered; HOST_TSO4 and HOST_TSO6 require CSUM
        # (§5.1.3.1).
        if getattr(self.backend, "accepts_partial_checksums", False):
            bits |= 1 << VIRTIO_NET_F_CSUM
            if getattr(self.backend, "accepts_tso4", False):
                bits |= 1 << VIRTIO_NET_F_HOST_TSO4
            if getattr(self.backend, "accepts_tso6", False):
                bits |= 1 << VIRTIO_NET_F_HOST_TSO6
        # Offloads towards the guest only from a backend that builds every frame it sends
        # (its checksums are right) and relays TCP through the stream port (which writes
        # IPv4 and IPv6 GSO frames alike). GUEST_TSO4 and GUEST_TSO6 require GUEST_CSUM
        # (§5.1.3.1): all three or none.
        if getattr(self.backend, "produces_guest_offloads", False):
            bits |= ((1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_GUEST_TSO4)
                     | (1 << VIRTIO_NET_F_GUEST_TSO6))
        return bits

    def config_bytes(self) -> bytes:
        """struct virtio_net_config (§5.1.4): mac, status, max_virtqueue_pairs, mtu."""
        return self.mac + struct.pack("<HHH", VIRTIO_NET_S_LINK_UP, 1, self.mtu)

    def _acked(self, bit: int) -> bool:
        return bool(self.acked_features & (1 << bit))

    def rx_offloads(self) -> RxOffloads:
        """What a header towards the guest may say, from what the driver acked now.

        merge: a frame may spread over several buffers (MRG_RXBUF). csum: a header may
        carry NEEDS_CSUM or DATA_VALID (GUEST_CSUM). tso4 / tso6: a frame may be a
        GSO_TCPV4 / GSO_TCPV6 one (GUEST_TSO4 / GUEST_TSO6, each decided alone, and
        GUEST_CSUM with it: a driver that acked one without it broke §5.1.3.1, and a GSO
        header without NEEDS_CSUM would break §5.1.6.4.1, so it gets none).
        """
        acked = self.acked_features
        csum = bool(acked & (1 << VIRTIO_NET_F_GUEST_CSUM))
        return RxOffloads(bool(acked & (1 << VIRTIO_NET_F_MRG_RXBUF)), csum,
                          csum and bool(acked & (1 << VIRTIO_NET_F_GUEST_TSO4)),
                          csum and bool(acked & (1 << VIRTIO_NET_F_GUEST_TSO6)))

    @property
    def negotiated(self) -> dict[str, bool]:
        """The offload-related features the driver acked, by name (NAMED_FEATURES)."""
        return {name: self._acked(bit) for name, bit in NAMED_FEATURES.items()}

    # ---- lifecycle -----------------------------------------------------------------------

    def activate(self, memory, queues, interrupt) -> None:
        with self._lock:
            super().activate(memory, queues, interrupt)
            self.counters["activations"] += 1
            # What this activation negotiated, beside what it then used (rx_gso_frames...).
            for name, acked in self.negotiated.items():
                self.counters[f"negotiated_{name}"] = int(acked)
            offloads = self.rx_offloads()
            self._backend_offloads(offloads.csum, offloads.tso4, offloads.tso6)
        # Frames that waited for the driver, and buffers it posted before DRIVER_OK.
        self.schedule(self._refill)

    def reset(self) -> None:
        """§2.1.2: after reset the device touches no ring; held buffers and the backlog go."""
        with self._lock:
            self._rx_held.clear()
            self._rx_backlog.clear()
            self.rx_ring_error = False
            super().reset()
            self.counters["resets"] += 1
            self._backend_offloads(False, False, False)

    def _backend_offloads(self, csum: bool, tso4: bool, tso6: bool) -> None:
        """Tell a backend that makes frames with offloads (a TAP's TUNSETOFFLOAD) which ones
        the driver acked now."""
        set_offloads = getattr(self.backend, "set_guest_offloads", None)
        if set_offloads is not None:
            set_offloads(csum, tso4, tso6)

    def _queue(self, index: int):
        queues = self.queues
        return queues[index] if index < len(queues) else None

    def queue_notify(self, index: int) -> None:
        if index == TX_QUEUE:
            self._transmit()
        elif index == RX_QUEUE:
            self.counters["rx_kicks"] += 1
            queue = self._queue(RX_QUEUE)
            if self.rx_ring_error and queue is not None:
                self.rx_ring_error = False
                with self._lock:  # raises QueueError while the ring is still corrupt
                    self._rx_held.extend(queue.pop(1, REQUIRE_WRITABLE))
            self._refill()

    # ---- guest -> backend ----------------------------------------------------------------

    def _transmit(self) -> None:
        with self._lock:
            queue = self._queue(TX_QUEUE)
            if queue is None or self.interrupt is None:
                return
            budget = TX_BUDGET
            while budget > 0:
                chains = queue.pop(min(budget, queue.size), REQUIRE_READABLE)
                budget -= len(chains)
                for chain in chains:
                    self._send_chain(chain)
                if chains:
                    queue.push_many([(chain.head, 0) for chain in chains])
                # Also after a pop that only retired malformed chains.
                if queue.needs_notification():
                    self.interrupt(VIRTIO_MMIO_INT_VRING, TX_QUEUE)
                if not chains:
                    return
            # Budget used with chains left: carry on after the loop's other work.
            if not self._tx_rescheduled:
                self._tx_rescheduled = True
                self.counters["tx_rescheduled"] += 1
                self.schedule(self._continue_transmit)

    def _continue_transmit(self) -> None:
        self._tx_rescheduled = False
        self._transmit()

    def _send_chain(self, chain) -> None:
        counters = self.counters
        if chain.readable < VIRTIO_NET_HDR_LEN:
            counters["tx_drop_short_header"] += 1
            return
        length = chain.readable - VIRTIO_NET_HDR_LEN
        if length < ETH_HLEN:
            counters["tx_drop_runt"] += 1
            return
        if length > MAX_FRAME:
            # Checked before anything is read: a guest can describe far more than it has.
            counters["tx_drop_oversize"] += 1
            return
        # A backend that takes chains (a TAP) needs only the header read; the others get
        # header and frame in one gather (one call per frame matters on the NAT's path).
        direct = self._tx_direct
        data = chain.read(0, VIRTIO_NET_HDR_LEN if direct is not None else VIRTIO_NET_HDR_LEN + length)
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, _nb = \
            VIRTIO_NET_HDR.unpack_from(data)
        verified = False
        if flags & ~VIRTIO_NET_HDR_F_NEEDS_CSUM:
            counters["tx_drop_bad_flags"] += 1  # §5.1.6.2: DATA_VALID is for RX only
            return
        if gso_type != VIRTIO_NET_HDR_GSO_NONE:
            if not (gso_type == VIRTIO_NET_HDR_GSO_TCPV4 and self._acked(VIRTIO_NET_F_HOST_TSO4)
                    or gso_type == VIRTIO_NET_HDR_GSO_TCPV6
                    and self._acked(VIRTIO_NET_F_HOST_TSO6)):
                counters["tx_drop_gso_not_negotiated"] += 1
                return
            if not flags & VIRTIO_NET_HDR_F_NEEDS_CSUM or not 0 < gso_size < length \
                    or hdr_len > length:
                counters["tx_drop_bad_gso"] += 1
                return
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            if not self._acked(VIRTIO_NET_F_CSUM):
                counters["tx_drop_csum_not_negotiated"] += 1
                return
            field = csum_start + csum_offset
            if csum_start >= length or field + 2 > length:
                counters["tx_drop_bad_csum"] += 1
                return
        if direct is not None:
            # The header is checked and the kernel checks it again as it takes the frame
            # (virtio_net_hdr_to_skb): our copy of it goes to the TAP (the kernel reads 10
            # bytes and skips num_buffers), then the frame straight from guest memory.
            # With a capture, the frame is read once and that copy is both captured and
            # sent: two reads of guest memory could capture other bytes than the TAP got
            # (a guest rewriting its buffer meanwhile could hide a frame from the capture).
            if self.pcap is not None:
                frame = chain.read(VIRTIO_NET_HDR_LEN, length)
                self.pcap.write(frame)
                sent = self.backend.guest_copy(data, frame)
            else:
                sent = direct(data, chain, VIRTIO_NET_HDR_LEN)
            if sent:
                if gso_type != VIRTIO_NET_HDR_GSO_NONE:
                    self._count_tso(gso_type)
                counters["tx_frames"] += 1
                counters["tx_bytes"] += length
                counters["tx_direct_frames" if self.pcap is None else "tx_captured_copies"] += 1
                if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
                    counters["tx_csum_offloaded"] += 1
            return
        frame = memoryview(data)[VIRTIO_NET_HDR_LEN:]
        if gso_type != VIRTIO_NET_HDR_GSO_NONE:
            # The backend takes it as one TCP segment: it must be the one its header says.
            if not gso_layers_match(frame, gso_type, csum_start, csum_offset):
                counters["tx_drop_bad_gso"] += 1
                return
            self._count_tso(gso_type)
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            field = csum_start + csum_offset
            if field == l4_checksum_offset(frame):
                verified = True  # the packet's own TCP/UDP checksum: vouched for
            else:
                # Somewhere else (a tunnel's inner packet): finish it here (§5.1.6.2.1).
                buf = bytearray(frame)
                struct.pack_into("!H", buf, field, 0)
                partial = struct.unpack_from("!H", frame, field)[0]
                total = (~inet_checksum(buf[csum_start:]) & 0xFFFF) + partial
                total = (total & 0xFFFF) + (total >> 16)
                struct.pack_into("!H", buf, field, (~total & 0xFFFF) or 0xFFFF)
                frame = memoryview(buf)
                counters["tx_csum_finished"] += 1
            counters["tx_csum_offloaded"] += 1
        counters["tx_frames"] += 1
        counters["tx_bytes"] += length
        if self.pcap is not None:
            self.pcap.write(frame)
        self.backend.guest_frame(frame, verified)

    def _count_tso(self, gso_type: int) -> None:
        self.counters["tx_tso_frames"] += 1
        if gso_type == VIRTIO_NET_HDR_GSO_TCPV6:
            self.counters["tx_tso6_frames"] += 1

    # ---- backend -> guest ----------------------------------------------------------------

    def receive(self, frame) -> bool:
        """A frame for the guest (from the backend's thread). Copied into RX buffers now,
        or into the backlog; False if it was dropped (or, cut into segments, any was)."""
        counters = self.counters
        length = len(frame)
        if length < ETH_HLEN or length > MAX_FRAME:
            counters["rx_drop_bad_length"] += 1
            return False
        with self._lock:
            offloads = self.rx_offloads()
            csum = offloads.csum
            header = PLAIN
            if length - ETH_HLEN > self.mtu and (layout := tcp_super_frame(frame, self.mtu)):
                v6, iphl, thl, total = layout
                mss = self.mtu - iphl - thl  # segments that fill the guest's MTU
                if not (offloads.tso6 if v6 else offloads.tso4):
                    # A TSO segment the guest did not ask for: cut here, as its NIC would.
                    counters["rx_gso_segmented"] += 1
                    results = [self._receive_one(seg, self._rx_header(seg, csum))
                               for seg in segment_tcp(frame, layout, mss)]
                    return all(results)
                # §5.1.6.4.1: a GSO frame goes with NEEDS_CSUM, and the checksum field
                # holds the pseudo-header sum over the whole packet (as Linux's TSO does).
                # The IPv6 pseudo-header (RFC 8200 §8.1) sums as IPv4's for a length
                # below 64 KiB: the same words, in another order.
                l4 = ETH_HLEN + iphl
                frame = bytearray(frame[:ETH_HLEN + total])
                src, dst = (slice(ETH_HLEN + 8, ETH_HLEN + 24), slice(ETH_HLEN + 24, l4)) if v6 \
                    else (slice(ETH_HLEN + 12, ETH_HLEN + 16), slice(ETH_HLEN + 16, ETH_HLEN + 20))
                struct.pack_into("!H", frame, l4 + TCP_CSUM_OFFSET, pseudo_header_sum(
                    bytes(frame[src]), bytes(frame[dst]), IPPROTO_TCP, total - iphl))
                gso_type = VIRTIO_NET_HDR_GSO_TCPV6 if v6 else VIRTIO_NET_HDR_GSO_TCPV4
                header = (VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, l4 + thl, mss, l4,
                          TCP_CSUM_OFFSET)
            elif csum:
                header = self._rx_header(frame, csum)
            return self._receive_one(frame, header)

    def _rx_header(self, frame, csum: bool) -> tuple:
        """The header fields of a complete frame: DATA_VALID with GUEST_CSUM when the
        backend built it and it carries a TCP/UDP checksum (already right: the guest need
        not sum the frame again), else none."""
        if csum and getattr(self.backend, "produces_guest_offloads", False) \
                and l4_checksum_offset(frame) is not None:
            return (VIRTIO_NET_HDR_F_DATA_VALID,) + PLAIN[1:]
        return PLAIN

    def _receive_one(self, frame, header: tuple) -> bool:
        counters = self.counters
        try:
            placed = not self._rx_backlog and self._place(frame, header)
        except QueueError:
            # A corrupt RX ring is not the backend's error: the frame waits, and the
            # driver's next RX kick meets the ring again and gets DEVICE_NEEDS_RESET.
            counters["rx_queue_errors"] += 1
            placed = False
        if not placed:
            if self.interrupt is None and not self.queues:
                counters["rx_drop_no_driver"] += 1
                return False
            if len(self._rx_backlog) >= RX_BACKLOG_FRAMES:
                counters["rx_drop_backlog_full"] += 1
                return False
            self._rx_backlog.append((bytes(frame), header))
            counters["rx_backlogged"] += 1
        return True

    def stream_port(self):
        """The card's stream port for the NAT's TCP relay: host data straight into RX
        buffers (voidbox.virtio.rxstream.RingStream), with FramePort's send_tcp_stream."""
        from .rxstream import RingStream

        return RingStream(self)

    def held_chains(self, index: int) -> int:
        """Chains taken from queue `index` and not used yet: the last ones taken (buffers
        are used in the order they were taken). A transport that stops the ring reports
        its base without them, so the driver's buffers are not lost across a restart."""
        return len(self._rx_held) if index == RX_QUEUE else 0

    def rx_room(self) -> int:
        """Frames receive() takes now without dropping: the backlog's free room (frames
        beyond it wait for buffers only if there is room to wait in). 0 with no driver."""
        if self.interrupt is None:
            return 0
        return RX_BACKLOG_FRAMES - len(self._rx_backlog)

    def rx_from_fd(self, fd: int, budget: int) -> tuple[int, int]:
        """Read up to `budget` frames from a TAP (opened with a 12-byte virtio_net_hdr and
        the offloads the driver acked) straight into RX buffers: one read(2) per frame
        into the buffers' memory (rxstream.readv_into_chains), the kernel's header kept
        and num_buffers set. -> (frames placed, status): RX_FD_DRAINED (the TAP had no
        more), RX_FD_MORE (budget used), RX_FD_BLOCKED (no buffers, a backlog or no
        driver: read again after rx_ready) or -errno.

        With MRG_RXBUF a read gets buffers for the largest frame the guest takes (64 KiB
        with GUEST_TSO4 or GUEST_TSO6, else its MTU's) and the ones it did not fill stay held for the
        next; without, one buffer. A frame longer than that comes back truncated and is
        dropped, as a NIC drops what does not fit. A card
        with a capture takes frames through receive() instead (the capture sees them)."""
        from .rxstream import readv_into_chains

        counters = self.counters
        placed, status = 0, RX_FD_MORE
        with self._lock:
            queue = self._queue(RX_QUEUE)
            if queue is None or self.interrupt is None or self._rx_backlog:
                return 0, RX_FD_BLOCKED
            offloads = self.rx_offloads()
            merge, csum = offloads.merge, offloads.csum
            # The largest frame the guest takes: 64 KiB with GSO, else its MTU's with one
            # VLAN tag (what Linux sizes its mergeable buffers for: 12 + 14 + 4 + MTU).
            max_frame = MAX_FRAME if offloads.any_gso else ETH_HLEN + VLAN_HLEN + self.mtu
            reads = 0  # frames dropped count against the budget too
            try:
                while reads < budget:
                    reads += 1
                    chains = self._take_for_read(queue, merge, max_frame)
                    if chains is None:
                        status = RX_FD_BLOCKED
                        break
                    got, flags, gso_type, used = readv_into_chains(fd, chains)
                    if got < 0:
                        self._rx_held.extendleft(reversed(chains))
                        status = RX_FD_DRAINED if got == -errno.EAGAIN else got
                        break
                    if used is None:
                        # Longer than the buffers: dropped. Without MRG_RXBUF the buffer
                        # is one too small for this link's frames: it goes back to the
                        # driver unused (as _take_buffers returns one), not to the next read.
                        counters["rx_drop_truncated"] += 1
                        if merge:
                            self._rx_held.extendleft(reversed(chains))
                        else:
                            queue.push_many([(chain.head, 0) for chain in chains])
                            counters["rx_buffer_too_small"] += len(chains)
                        continue
                    if len(used) < len(chains):
                        self._rx_held.extendleft(reversed(chains[len(used):]))
                    if got < VIRTIO_NET_HDR_LEN + ETH_HLEN \
                            or (flags & ~VIRTIO_NET_HDR_F_DATA_VALID and not csum) \
                            or not offloads.allows_gso(gso_type):
                        # Made before TUNSETOFFLOAD followed a new ack, or a runt: the
                        # buffers go back unused, nothing the driver did not ack reaches it.
                        self._rx_held.extendleft(reversed(chains[:len(used)]))
                        counters["rx_drop_offload_not_negotiated" if got >= VIRTIO_NET_HDR_LEN
                                 + ETH_HLEN else "rx_drop_bad_length"] += 1
                        continue
                    if flags and not csum:
                        # DATA_VALID alone: the kernel checked a complete checksum (a frame
                        # forwarded from a NIC that verified it), whatever TUNSETOFFLOAD
                        # says. Without GUEST_CSUM the flags must be zero (§5.1.6.3): the
                        # frame is complete as it is, so the mark goes, not the frame.
                        chains[0].write(b"\x00", 0)
                        flags = 0
                        counters["rx_data_valid_cleared"] += 1
                    queue.push_many(used)
                    placed += 1
                    counters["rx_direct_frames"] += 1
                    self._count_rx(got - VIRTIO_NET_HDR_LEN, len(used), flags, gso_type)
            except QueueError:
                counters["rx_queue_errors"] += 1
                self.rx_ring_error = True
                status = RX_FD_BLOCKED
            # Also with nothing placed: buffers may have gone back unused (too small).
            if queue.needs_notification():
                self.interrupt(VIRTIO_MMIO_INT_VRING, RX_QUEUE)
        return placed, status

    def _count_rx(self, length: int, buffers: int, flags: int, gso_type: int) -> None:
        """One frame placed in `buffers` RX buffers, with the header's flags and GSO type."""
        counters = self.counters
        counters["rx_frames"] += 1
        counters["rx_bytes"] += length
        if buffers > 1:
            counters["rx_merged_frames"] += 1
        if gso_type:
            counters["rx_gso_frames"] += 1
            if gso_type == VIRTIO_NET_HDR_GSO_TCPV6:
                counters["rx_gso6_frames"] += 1
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            counters["rx_csum_offloaded"] += 1
        elif flags & VIRTIO_NET_HDR_F_DATA_VALID:
            counters["rx_csum_valid"] += 1

    def _take_for_read(self, queue, merge: bool, max_frame: int):
        """Held RX chains to read a frame into, or None (too few buffers posted): with
        MRG_RXBUF enough for the largest frame, else one buffer that holds any frame at all
        (a longer frame comes back truncated and is dropped)."""
        chains = self._take_buffers(queue, VIRTIO_NET_HDR_LEN + (max_frame if merge else ETH_HLEN))
        if chains is TOO_BIG:
            # The whole ring is smaller than the largest frame: read into all of it
            # (most frames are small; one that is not comes back truncated).
            held = self._rx_held
            chains = [held.popleft() for _ in range(len(held))]
        return chains

    def _refill(self) -> None:
        """The driver posted RX buffers (or the device just went live): place the backlog,
        and once it is placed tell the backend it may send again (it stops reading when
        receive() refuses a frame)."""
        with self._lock:
            backlog = self._rx_backlog
            while backlog and self._place(*backlog[0]):
                backlog.popleft()
            ready = not backlog and self.interrupt is not None
        # Outside the lock: the backend delivers what it held back, through receive().
        rx_ready = getattr(self.backend, "rx_ready", None)  # optional: never pausing
        if ready and rx_ready is not None:
            self.counters["rx_ready_signalled"] += 1
            rx_ready()

    def _take_buffers(self, queue, needed: int):
        """Held RX chains covering `needed` bytes (popping more as needed), or None.

        Buffers too small to use go back unused, at most a ring's worth per call: a driver
        that re-posts each one as soon as it is used would otherwise keep this loop (and
        the card's lock) forever. It then waits for its next RX kick, as if starved (the
        caller signals the buffers returned, so the driver refills and kicks)."""
        held = self._rx_held
        merge = self._acked(VIRTIO_NET_F_MRG_RXBUF)
        refused = 0  # counted once, on the way out: this runs for every frame placed
        try:
            while True:
                if refused >= queue.size:
                    self.counters["rx_too_small_burst"] += 1
                    queue.enable_notifications()
                    return None
                if merge:
                    while held and held[0].writable < VIRTIO_NET_HDR_LEN:
                        # With MRG_RXBUF every buffer holds at least the header (§5.1.6.3.1);
                        # one that cannot is returned unused, and counted.
                        queue.push(held.popleft().head, 0)
                        refused += 1
                    room = 0
                    for count, chain in enumerate(held, 1):
                        room += chain.writable
                        if room >= needed:
                            return [held.popleft() for _ in range(count)]
                    if len(held) >= queue.size:
                        return TOO_BIG  # the whole ring would not hold it: never wait for it
                else:
                    while held and held[0].writable < needed:
                        # Without MRG_RXBUF the driver posts buffers that fit a whole frame
                        # (§5.1.6.3.1); one that does not is returned unused, and counted.
                        chain = held.popleft()
                        queue.push(chain.head, 0)
                        refused += 1
                    if held:
                        return [held.popleft()]
                chains = queue.pop(None, REQUIRE_WRITABLE)
                if not chains:
                    if queue.enable_notifications():
                        continue  # buffers arrived while we looked: take them
                    self.counters["rx_starved"] += 1
                    return None
                held.extend(chains)
        finally:
            if refused:
                self.counters["rx_buffer_too_small"] += refused

    def _place(self, frame, header: tuple = PLAIN) -> bool:
        """Copy frame behind its header (fields but num_buffers) into RX buffers and publish
        them; False if the driver has not posted enough."""
        queue = self._queue(RX_QUEUE)
        if queue is None or self.interrupt is None:
            return False
        flags, gso_type = header[0], header[1]
        if flags or gso_type:
            # Decided at receive(); checked again against what is acked now, so no header
            # reaches a driver that did not ack it, whatever happened in between.
            offloads = self.rx_offloads()
            if not offloads.csum or not offloads.allows_gso(gso_type):
                self.counters["rx_drop_offload_not_negotiated"] += 1
                return True  # consumed: dropped
        length = len(frame)
        chains = self._take_buffers(queue, VIRTIO_NET_HDR_LEN + length)
        if chains is None or chains is TOO_BIG:
            # Buffers it refused went back unused: the driver must hear of them, or one in
            # interrupt mode never refills (and never kicks) for the frame waiting here.
            if queue.needs_notification():
                self.interrupt(VIRTIO_MMIO_INT_VRING, RX_QUEUE)
            if chains is None:
                return False
            self.counters["rx_drop_larger_than_ring"] += 1
            return True  # consumed: dropped
        view = memoryview(frame)
        first = chains[0]
        take = min(length, first.writable - VIRTIO_NET_HDR_LEN)
        first.write(VIRTIO_NET_HDR.pack(*header, len(chains)), 0)
        first.write(view[:take], VIRTIO_NET_HDR_LEN)
        used = [(first.head, VIRTIO_NET_HDR_LEN + take)]
        pos = take
        for chain in chains[1:]:
            take = min(length - pos, chain.writable)
            chain.write(view[pos:pos + take], 0)
            used.append((chain.head, take))
            pos += take
        queue.push_many(used)
        if self.pcap is not None:
            self.pcap.write(frame)
        self._count_rx(length, len(chains), flags, gso_type)
        if queue.needs_notification():
            self.interrupt(VIRTIO_MMIO_INT_VRING, RX_QUEUE)
        return True

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()
        if self.pcap is not None:
            self.pcap.close()
