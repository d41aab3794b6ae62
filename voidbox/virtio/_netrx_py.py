"""Host TCP data into a virtio-net card's RX buffers: the pure-Python twin of voidbox/_netrx.pyx.

`RingStream(card)` is the card's stream port for the NAT's TCP relay: it has the
`send_tcp_stream` of voidbox/_slirp.pyx's FramePort, so TcpNat drives a VM's card exactly
as it drives `net run`'s TAP. One burst peeks the host socket (at its SO_PEEK_OFF) into
RX chains, one MSS-sized TCP segment per chain, writes the virtio_net_hdr, Ethernet, IPv4
and TCP headers in front of each, and publishes them with one used-index update. The
compiled twin peeks straight into guest memory (recvmsg over the chains' iovecs: no copy
on the way); this twin peeks into a buffer and copies, with the same results.

Sizes: the bytes the socket holds beyond the peek offset (SIOCINQ minus SO_PEEK_OFF) decide
how many chains are taken, so none is taken for nothing. Chains held by the card (popped
by its copy path, not yet used) go first. A chain too small for the headers and one byte
goes back to the driver unused, as the copy path does.

Blocked (STREAM_BLOCKED) while the card has no live driver, frames waiting in its backlog
(a stream must not overtake them) or no RX buffer: the card's rx_ready() resumes the flows.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios

from voidbox.net import _slirp_py as slirp

from ..ring import REQUIRE_WRITABLE
from .net import VIRTIO_NET_HDR, VIRTIO_NET_HDR_LEN

STREAM_MORE = slirp.STREAM_MORE
STREAM_DRAINED = slirp.STREAM_DRAINED
STREAM_EOF = slirp.STREAM_EOF
STREAM_BLOCKED = slirp.STREAM_BLOCKED
SO_PEEK_OFF = getattr(socket, "SO_PEEK_OFF", 42)
ETH_HLEN = 14
IPV4_TCP_HLEN = 40
# In front of every segment's payload: virtio_net_hdr, Ethernet, IPv4 and TCP headers.
FRAME_HEADROOM = VIRTIO_NET_HDR_LEN + ETH_HLEN + IPV4_TCP_HLEN
TCP_ACK = 0x10
TCP_PSH = 0x08
MAX_CHAINS = 256  # chains one burst fills at most (a queue's worth)
_INT = struct.Struct("i")


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

    def __init__(self, card):
        self.card = card

    @property
    def paused(self) -> bool:
        card = self.card
        return card.interrupt is None or bool(card._rx_backlog)

    def send_tcp_stream(self, sockfd, eth_header, src_ip, dst_ip, src_port, dst_port, seq,
                        ack, window, mss, budget, ip_id):
        """-> (bytes sent, bytes peeked, frames, status), as FramePort.send_tcp_stream."""
        card = self.card
        with card._lock:
            queue = card._queue(0)
            if queue is None or self.paused:
                return 0, 0, 0, STREAM_BLOCKED
            unread = unread_beyond_peek(sockfd)
            want = min(budget, unread)
            if want <= 0:
                return 0, 0, 0, self._empty_status(sockfd)
            chains = self._take(queue, min(MAX_CHAINS, (want + mss - 1) // mss))
            if not chains:
                card.counters["rx_starved"] += 1
                return 0, 0, 0, STREAM_BLOCKED
            caps = [min(mss, chain.writable - FRAME_HEADROOM) for chain in chains]
            total = min(want, sum(caps))
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
            used, done = [], 0
            for chain, cap in zip(chains, caps, strict=True):
                if done >= got:
                    self._give_back([chain])
                    continue
                n = min(cap, got - done)
                flags = TCP_ACK | (TCP_PSH if done + n >= got else 0)
                frame = bytearray(FRAME_HEADROOM - VIRTIO_NET_HDR_LEN + n)
                frame[:ETH_HLEN] = eth_header
                slirp.build_ipv4_tcp(memoryview(frame)[ETH_HLEN:], src_ip, dst_ip,
                                     (ip_id + len(used)) & 0xFFFF, src_port, dst_port,
                                     (seq + done) & 0xFFFFFFFF, ack & 0xFFFFFFFF, flags,
                                     window, b"", buf[done:done + n])
                chain.write(VIRTIO_NET_HDR.pack(0, 0, 0, 0, 0, 0, 1), 0)
                chain.write(frame, VIRTIO_NET_HDR_LEN)
                used.append((chain.head, VIRTIO_NET_HDR_LEN + len(frame)))
                if card.pcap is not None:
                    card.pcap.write(frame)
                done += n
            queue.push_many(used)
            self._count(len(used), got)
            if queue.needs_notification():
                card.interrupt(1)
            # Drained once the socket gave all it held: the caller need not ask again.
            return got, got, len(used), STREAM_DRAINED if got >= unread else STREAM_MORE

    def _take(self, queue, n: int) -> list:
        """n RX chains big enough for headers and a byte: the card's held ones first."""
        card = self.card
        held = card._rx_held
        out = []
        while len(out) < n:
            if not held:
                more = queue.pop(n - len(out), REQUIRE_WRITABLE)
                if not more:
                    if queue.enable_notifications():
                        continue  # buffers arrived while we looked
                    break
                held.extend(more)
            chain = held.popleft()
            if chain.writable <= FRAME_HEADROOM:
                queue.push(chain.head, 0)  # too small for a segment: back, unused
                card.counters["rx_buffer_too_small"] += 1
                continue
            out.append(chain)
        return out

    def _give_back(self, chains) -> None:
        """Chains not filled go back to the front of the card's held ones, in order."""
        self.card._rx_held.extendleft(reversed(chains))

    def _empty_status(self, sockfd: int) -> int:
        """Nothing past the peek offset: EOF if the host closed, else drained."""
        sock = socket.socket(fileno=sockfd)
        try:
            return STREAM_EOF if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"" \
                else STREAM_MORE
        except BlockingIOError:
            return STREAM_DRAINED
        except OSError as error:
            return -(error.errno or 5)
        finally:
            sock.detach()

    def _count(self, frames: int, payload: int) -> None:
        counters = self.card.counters
        counters["rx_frames"] += frames
        counters["rx_bytes"] += frames * (FRAME_HEADROOM - VIRTIO_NET_HDR_LEN) + payload
        counters["rx_stream_frames"] += frames
        counters["rx_stream_bytes"] += payload
