"""Host TCP data into a virtio-net card's RX buffers: the pure-Python twin of voidbox/_netrx.pyx.

`RingStream(card)` is the card's stream port for the NAT's TCP relay: it has the
`send_tcp_stream` of voidbox/_slirp.pyx's FramePort, so TcpNat drives a VM's card exactly
as it drives `net run`'s TAP, IPv4 and IPv6 flows alike (the addresses' length says
which). One burst peeks the host socket (at its SO_PEEK_OFF) into RX chains, writes the
virtio_net_hdr, Ethernet, IP (IPv4, or IPv6 without extension headers) and TCP headers in
front of each frame's payload, and publishes them with one used-index update. The compiled twin peeks
straight into guest memory (recvmsg over the chains' iovecs: no copy on the way); this
twin peeks into a buffer and copies, with the same results.

Frames, as the driver acked (card.rx_offloads()):
- Without GUEST_TSO4 (GUEST_TSO6 for an IPv6 flow) a frame carries one segment of at most
  the guest's MSS; with it (and an MSS of at least GSO_MIN_MSS) up to 64 KiB of whole MSS
  segments, as one GSO_TCPV4 (GSO_TCPV6) frame (gso_size the MSS, hdr_len the 54 (74)
  header bytes) whenever it holds more than one, as a TAP's TSO segment from FramePort
  would be. An IPv6 frame carries at most as many bytes as an IPv4 one (its payload 20
  bytes less), so every frame stays within MAX_FRAME.
- With MRG_RXBUF a frame spreads over as many chains as it needs (num_buffers says how
  many: the headers and the first payload bytes in the first chain, payload only in the
  rest); without it a frame is one chain.
- With GUEST_CSUM the TCP checksum is left to the guest: NEEDS_CSUM at the TCP header,
  the field holding the pseudo-header sum (§5.1.6.4.1). That saves the most work: the
  payload came from a local socket, so nothing can have damaged it, yet a full checksum
  (or DATA_VALID, which needs a right checksum in case the guest forwards the packet)
  means summing every payload byte here once more, and a Linux guest takes a NEEDS_CSUM
  frame (CHECKSUM_PARTIAL) as verified and does not sum it either; one that forwards it
  finishes the checksum on the way out. Without GUEST_CSUM the checksum is whole and the
  header's flags 0.

Sizes: the bytes the socket holds beyond the peek offset (SIOCINQ minus SO_PEEK_OFF) decide
how many chains are taken, so none is taken for nothing (with GSO the first chain's size
tells how many more a burst needs). Chains held by the card (popped by its copy path, not
yet used) go first. A chain too small for the headers and one byte goes back to the driver
unused, as the copy path does; with MRG_RXBUF, continuation buffers are held to the same
size (a Linux guest posts 1.5 KiB or more).

Blocked (STREAM_BLOCKED) while the card has no live driver, frames waiting in its backlog
(a stream must not overtake them) or no RX buffer: the card's rx_ready() resumes the flows.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import struct
import termios

from voidbox.net import _slirp_py as slirp
from voidbox.net.packets import pseudo_header_sum

from ..ring import REQUIRE_WRITABLE, QueueError
from .net import (
    VIRTIO_NET_HDR,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_LEN,
)

STREAM_MORE = slirp.STREAM_MORE
STREAM_DRAINED = slirp.STREAM_DRAINED
STREAM_EOF = slirp.STREAM_EOF
STREAM_BLOCKED = slirp.STREAM_BLOCKED
SO_PEEK_OFF = getattr(socket, "SO_PEEK_OFF", 42)
ETH_HLEN = 14
IPV4_TCP_HLEN = 40
IPV6_TCP_HLEN = 60
# In front of every frame's payload: virtio_net_hdr, Ethernet, IPv4 and TCP headers.
FRAME_HEADROOM = VIRTIO_NET_HDR_LEN + ETH_HLEN + IPV4_TCP_HLEN
PACKET_HEADERS = ETH_HLEN + IPV4_TCP_HLEN  # hdr_len of a GSO frame
CSUM_START = ETH_HLEN + 20  # the TCP header
# The same for an IPv6 flow: a 40-byte IP header.
FRAME_HEADROOM6 = VIRTIO_NET_HDR_LEN + ETH_HLEN + IPV6_TCP_HLEN
PACKET_HEADERS6 = ETH_HLEN + IPV6_TCP_HLEN
CSUM_START6 = ETH_HLEN + 40
TCP_CSUM_OFFSET = 16
TCP_ACK = 0x10
TCP_PSH = 0x08
MAX_CHAINS = 256  # chains one burst fills at most (a queue's worth)
# The most TCP payload one IPv4 packet (one GSO frame) carries: 16-bit total length.
MAX_GSO_PAYLOAD = 65535 - IPV4_TCP_HLEN
# An IPv6 GSO frame no longer than the largest IPv4 one (as FramePort's MAX_SEG_PAYLOAD6).
MAX_GSO_PAYLOAD6 = MAX_GSO_PAYLOAD - (IPV6_TCP_HLEN - IPV4_TCP_HLEN)
# Below this MSS no GSO frames (RFC 9293 §3.7.1 default MSS, as FramePort's TSO_MIN_MSS):
# a guest announcing a tiny MSS must not make one frame thousands of segments.
GSO_MIN_MSS = 536
_INT = struct.Struct("i")


def frame_payload_cap(mss: int, gso: bool, v6: bool = False) -> int:
    """The most payload one frame carries: whole MSS segments up to 64 KiB with GSO."""
    if gso and mss >= GSO_MIN_MSS:
        return ((MAX_GSO_PAYLOAD6 if v6 else MAX_GSO_PAYLOAD) // mss) * mss
    return mss


def frame_layout(v6: bool) -> tuple[int, int, int]:
    """(headroom in a frame's first chain, hdr_len, csum_start) of an IPv4 or IPv6 flow."""
    if v6:
        return FRAME_HEADROOM6, PACKET_HEADERS6, CSUM_START6
    return FRAME_HEADROOM, PACKET_HEADERS, CSUM_START


def stream_header(n: int, mss: int, csum: bool, gso: bool, num_buffers: int,
                  v6: bool = False) -> bytes:
    """The virtio_net_hdr of a stream frame with n payload bytes (§5.1.6.4.1)."""
    if not csum:
        return VIRTIO_NET_HDR.pack(0, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0, 0, num_buffers)
    gso_type = VIRTIO_NET_HDR_GSO_NONE
    if gso and n > mss:
        gso_type = VIRTIO_NET_HDR_GSO_TCPV6 if v6 else VIRTIO_NET_HDR_GSO_TCPV4
    _headroom, hdr_len, csum_start = frame_layout(v6)
    return VIRTIO_NET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, hdr_len,
                               mss if gso_type else 0, csum_start, TCP_CSUM_OFFSET,
                               num_buffers)


def unread_beyond_peek(sockfd: int) -> int:
    """Bytes in the socket's receive queue past its peek offset (SIOCINQ - SO_PEEK_OFF)."""
    inq = _INT.unpack(fcntl.ioctl(sockfd, termios.FIONREAD, b"\0" * _INT.size))[0]
    sock = socket.socket(fileno=sockfd)
    try:
        off = sock.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)
    finally:
        sock.detach()  # the fd belongs to the relay
    return max(0, inq - max(off, 0))


class RingStream:
    """A virtio-net card's stream port (see the module docstring)."""

    streams_ipv6 = True  # TcpNat sends IPv6 flows through it too

    def __init__(self, card):
        self.card = card

    @property
    def paused(self) -> bool:
        card = self.card
        return card.interrupt is None or bool(card._rx_backlog)

    def send_tcp_stream(self, sockfd, eth_header, src_ip, dst_ip, src_port, dst_port, seq,
                        ack, window, mss, budget, ip_id):
        """-> (bytes sent, bytes peeked, frames, status), as FramePort.send_tcp_stream."""
        v6 = len(src_ip) == 16 and len(dst_ip) == 16
        if len(eth_header) != ETH_HLEN or not (v6 or (len(src_ip) == 4 and len(dst_ip) == 4)):
            raise ValueError("Ethernet header is 14 bytes, IPv4 addresses 4, IPv6 ones 16")
        if not 0 < mss <= (MAX_GSO_PAYLOAD6 if v6 else MAX_GSO_PAYLOAD):
            raise ValueError("mss out of range")
        headroom, packet_headers, csum_start = frame_layout(v6)
        card = self.card
        with card._lock:
            queue = card._queue(0)
            if queue is None or self.paused:
                return 0, 0, 0, STREAM_BLOCKED
            unread = unread_beyond_peek(sockfd)
            want = min(budget, unread)
            if want <= 0:
                return 0, 0, 0, self._empty_status(sockfd)
            offloads = card.rx_offloads()
            merge, csum = offloads.merge, offloads.csum
            gso = offloads.tso6 if v6 else offloads.tso4
            chains, caps, firsts = self._take_planned(queue, want, mss,
                                                      frame_payload_cap(mss, gso, v6), merge,
                                                      headroom)
            if not chains:
                card.counters["rx_starved"] += 1
                return 0, 0, 0, STREAM_BLOCKED
            total = sum(caps)
            buf = bytearray(total)
            sock = socket.socket(fileno=sockfd)
            try:
                got = sock.recv_into(buf, total, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                got = -1
            except OSError as error:
                sock.detach()
                self._give_back(chains)
                return 0, 0, 0, -(error.errno or 5)
            sock.detach()
            if got <= 0:
                self._give_back(chains)
                return 0, 0, 0, STREAM_EOF if got == 0 else STREAM_DRAINED
            used, done, stats = [], 0, [0, 0, 0]  # frames spread, GSO, NEEDS_CSUM
            frames = 0
            i = 0
            while i < len(chains) and done < got:
                j = i + 1
                while j < len(chains) and not firsts[j]:
                    j += 1
                amounts, rest = [], got - done  # payload per chain: the peek may end early
                for cap in caps[i:j]:
                    if rest == 0:
                        break
                    amounts.append(min(cap, rest))
                    rest -= amounts[-1]
                n = sum(amounts)
                flags = TCP_ACK | (TCP_PSH if done + n >= got else 0)
                frame = bytearray(packet_headers + n)
                frame[:ETH_HLEN] = eth_header
                build = slirp.build_ipv6_tcp if v6 else slirp.build_ipv4_tcp
                build(memoryview(frame)[ETH_HLEN:], src_ip, dst_ip, (ip_id + frames) & 0xFFFF,
                      src_port, dst_port, (seq + done) & 0xFFFFFFFF, ack & 0xFFFFFFFF, flags,
                      window, b"", buf[done:done + n])
                if csum:
                    # The IPv6 pseudo-header (RFC 8200 §8.1) sums as IPv4's below 64 KiB.
                    struct.pack_into("!H", frame, csum_start + TCP_CSUM_OFFSET,
                                     pseudo_header_sum(bytes(src_ip), bytes(dst_ip), 6, 20 + n))
                data = stream_header(n, mss, csum, gso, len(amounts), v6) + frame
                pos = 0
                for k, amount in enumerate(amounts):
                    chain = chains[i + k]
                    size = amount + (headroom if k == 0 else 0)
                    chain.write(data[pos:pos + size], 0)
                    used.append((chain.head, size))
                    pos += size
                if card.pcap is not None:
                    card.pcap.write(frame)
                stats[0] += len(amounts) > 1
                stats[1] += data[1] != VIRTIO_NET_HDR_GSO_NONE
                stats[2] += csum
                done += n
                frames += 1
                i += len(amounts)
                if i < j:
                    break  # the peek ended inside this frame's chains
            self._give_back(chains[i:])
            queue.push_many(used)
            self._count(frames, got, *stats, v6=v6)
            if queue.needs_notification():
                card.interrupt(1, 0)  # the used-buffer kind, for receiveq1
            # Drained once the socket gave all it held: the caller need not ask again.
            return got, got, frames, STREAM_DRAINED if got >= unread else STREAM_MORE

    def _take_planned(self, queue, want: int, mss: int, frame_cap: int, merge: bool,
                      headroom: int = FRAME_HEADROOM):
        """RX chains for up to want payload bytes, and their plan: (chains, caps, firsts),
        caps[i] the payload bytes chain i is to hold, firsts[i] whether it starts a frame
        (and so holds the headroom bytes of headers). A frame holds at most frame_cap
        bytes; with merge it takes further chains until it does."""
        chains, caps, firsts = [], [], []
        left = want
        room = 0  # payload the current frame may still take in further chains
        # Every chain holds at most an MSS without GSO, so that many is never too many;
        # with GSO the first chain's size tells how many the rest needs.
        count = -(-want // mss) if frame_cap == mss else 1
        while left > 0 and len(chains) < MAX_CHAINS:
            more = self._take(queue, max(1, min(count, MAX_CHAINS - len(chains))), headroom)
            if not more:
                break
            for index, chain in enumerate(more):
                if left <= 0:
                    self._give_back(more[index:])
                    break
                if merge and room > 0:
                    take = min(chain.writable, room)
                    firsts.append(False)
                else:
                    room = min(frame_cap, left)
                    take = min(chain.writable - headroom, room)
                    firsts.append(True)
                chains.append(chain)
                caps.append(take)
                room -= take
                left -= take
            # The rest, in chains the size of the last one.
            typical = chains[-1].writable
            if merge:
                count = -(-(left + -(-left // frame_cap) * headroom) // typical)
            else:
                count = -(-left // min(typical - headroom, frame_cap))
        return chains, caps, firsts

    def _take(self, queue, n: int, headroom: int = FRAME_HEADROOM) -> list:
        """n RX chains big enough for headers and a byte: the card's held ones first.

        At most a ring's worth of too-small buffers go back per call (as in
        VirtioNet._take_buffers): a driver re-posting each at once would keep it looping."""
        card = self.card
        held = card._rx_held
        out = []
        refused = 0
        while len(out) < n:
            if refused >= queue.size:
                card.counters["rx_too_small_burst"] += 1
                queue.enable_notifications()
                break
            if not held:
                try:
                    more = queue.pop(n - len(out), REQUIRE_WRITABLE)
                    if not more and queue.enable_notifications():
                        continue  # buffers arrived while we looked
                except QueueError:
                    # A corrupt RX ring is not the relay's error (as in VirtioNet.receive):
                    # the stream goes on with what it has, or blocks, and the driver's next
                    # RX kick meets the ring and gets DEVICE_NEEDS_RESET.
                    card.counters["rx_queue_errors"] += 1
                    card.rx_ring_error = True
                    break
                if not more:
                    break
                held.extend(more)
            chain = held.popleft()
            if chain.writable <= headroom:
                queue.push(chain.head, 0)  # too small for a segment: back, unused
                card.counters["rx_buffer_too_small"] += 1
                refused += 1
                continue
            out.append(chain)
        if refused and queue.needs_notification():
            card.interrupt(1, 0)  # the buffers went back unused: the driver refills
        return out

    def _give_back(self, chains) -> None:
        """Chains not filled go back to the front of the card's held ones, in order."""
        self.card._rx_held.extendleft(reversed(chains))

    def _empty_status(self, sockfd: int) -> int:
        """No budget or nothing past the peek offset: EOF if the host closed and every byte
        was peeked, else more to come (or drained).

        No recv(MSG_PEEK) here: with SO_PEEK_OFF set, a peek that finds a byte (one that
        arrived after SIOCINQ was read, or any when the budget was 0) moves the kernel's
        offset past it while the relay's count stays: the guest would never get that byte
        and the stream would stall. POLLRDHUP is set once the host's FIN is queued, after
        all its data, so the bytes past the offset are counted again after it is seen."""
        poller = select.poll()
        poller.register(sockfd, select.POLLRDHUP)
        hup = bool(poller.poll(0))
        if unread_beyond_peek(sockfd) > 0:
            return STREAM_MORE
        return STREAM_EOF if hup else STREAM_DRAINED

    def _count(self, frames: int, payload: int, merged: int, gso: int, csum: int,
               v6: bool = False) -> None:
        counters = self.card.counters
        counters["rx_frames"] += frames
        counters["rx_bytes"] += frames * (PACKET_HEADERS6 if v6 else PACKET_HEADERS) + payload
        counters["rx_stream_frames"] += frames
        counters["rx_stream_bytes"] += payload
        if merged:
            counters["rx_merged_frames"] += merged
        if gso:
            counters["rx_gso_frames"] += gso
            if v6:
                counters["rx_gso6_frames"] += gso
        if csum:
            counters["rx_csum_offloaded"] += csum


# ---- a TAP's frames straight into RX chains, and TX chains straight to a TAP ---------------

# The most one read(2) of a TAP returns: the 12-byte header and a 64 KiB GSO frame, with
# room to spare (a frame this long would come back truncated and be dropped).
TAP_READ_MAX = 128 * 1024


def readv_into_chains(fd: int, chains) -> tuple[int, int, int, list | None]:
    """Read one frame (one read(2) of a TAP) into the chains' writable bytes, in order;
    -> (the frame's length or -errno (-EAGAIN: nothing queued), the virtio_net_hdr's flags
    and gso_type as the kernel wrote them, and the used entries [(head, bytes)] of the
    chains it filled, or None if it did not fit: the kernel truncated it). num_buffers
    (the header's bytes 10-11, which the kernel leaves) is set to the number of entries.

    The compiled twin reads straight into guest memory (readv over the chains' segments);
    this one goes through a buffer."""
    # One byte more than the chains hold: a frame that does not fit shows as longer
    # (the TAP returns what it copied, so a truncated read would look like a full one).
    # No more than any TAP frame, whatever the chains claim: the driver sizes them, and
    # descriptors that alias one region can claim far more than the guest has.
    room = min(sum(chain.writable for chain in chains), TAP_READ_MAX)
    buf = bytearray(room + 1)
    try:
        got = os.readv(fd, [buf])
    except OSError as error:
        return -(error.errno or errno.EIO), 0, 0, None
    if got > room:
        return got, 0, 0, None
    used, pos = [], 0
    for chain in chains:
        if pos >= got:
            break
        take = min(chain.writable, got - pos)
        used.append((chain.head, take))
        pos += take
    if got >= 12:
        struct.pack_into("<H", buf, 10, len(used))
    view, pos = memoryview(buf), 0
    for chain, (_head, take) in zip(chains, used, strict=False):
        chain.write(view[pos:pos + take], 0)
        pos += take
    return got, (buf[0] if got > 0 else 0), (buf[1] if got > 1 else 0), used


def writev_from_chain(fd: int, header, chain, offset: int) -> int:
    """Write `header` and the chain's readable bytes from `offset` as one frame (one
    writev(2) to a TAP); -> bytes written, or -errno. The compiled twin's iovecs point
    into guest memory; this one reads the chain first."""
    try:
        return os.writev(fd, [header, chain.read(offset)])
    except OSError as error:
        return -(error.errno or errno.EIO)
