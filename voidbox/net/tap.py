"""TAP devices (Documentation/networking/tuntap.rst): open, offloads, and batch frame I/O.

A TAP fd carries one Ethernet frame per read() or write(). With IFF_VNET_HDR each frame is
preceded by a struct virtio_net_hdr (virtio 1.2 §5.1.6), and TUNSETOFFLOAD tells the
kernel which offloads we, the reader, handle: with TUN_F_CSUM the namespace skips TCP and
UDP checksums (we relay payloads, never forward packets, so we need none), and with
TUN_F_TSO4 it hands us TCP segments of up to 64 KiB whatever the MTU. In the other
direction we write GSO super-frames with partial checksums, which the namespace's stack
takes whole. That is one system call and one header parse per 64 KiB instead of per MTU.

TapIO drains the fd until EAGAIN (bounded per wakeup, so the loop stays fair) through a
FramePort (voidbox._slirp: the reads run without the GIL), and queues writes the kernel
refuses with EAGAIN, up to a bound, watching EPOLLOUT only while that queue is non-empty.
With a PcapWriter it captures every frame it reads and every frame the kernel takes from
it, as it crosses the fd: frames the TCP NAT writes itself (FramePort.send_tcp_stream)
never pass here, so whoever captures does not attach that stream port.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import os
import select
import struct
from collections.abc import Callable

from voidbox.errors import VoidboxError
from voidbox.eventloop import EventLoop
from voidbox.net.fastpath import FramePort
from voidbox.net.packets import ETH_HLEN
from voidbox.net.pcap import PcapWriter

TUN_PATH = "/dev/net/tun"
# linux/if_tun.h
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUNSETVNETHDRSZ = 0x400454D8  # _IOW('T', 216, int)
VIRTIO_NET_HDR_LEN = 10  # the TUN default (TUNSETVNETHDRSZ not needed)
IP_MAX_PACKET = 0xFFFF  # a GSO super-frame carries one IPv4 packet of at most this
IPV6_HLEN = 40  # ... or an IPv6 one, whose Payload Length leaves out its header (RFC 8200 §3)
IFNAMSIZ = 16
IFREQ_SIZE = 40  # struct ifreq on x86_64
VLAN_HLEN = 4
# Frames read per wakeup and queued for writing: bounds for fairness and memory.
TAP_READ_BATCH = 64
TAP_WRITE_BACKLOG = 1024


def open_tap(name: str = "tap0", vnet_hdr: bool = False, *,
             vnet_hdr_len: int = VIRTIO_NET_HDR_LEN,
             offloads: int = TUN_F_CSUM | TUN_F_TSO4) -> tuple[int, str]:
    """Create (or attach to) TAP interface name in the caller's network namespace.

    The namespace is the one current when /dev/net/tun is opened. With vnet_hdr, frames
    carry a virtio_net_hdr of vnet_hdr_len bytes (10, the TUN default, or 12: virtio 1.x
    with num_buffers) and `offloads` (TUN_F_*) says which the kernel may hand us: by
    default checksum and TCPv4 segmentation offloads are on, 0 asks for complete frames.
    Returns (fd, ifname); the fd is non-blocking and close-on-exec.
    """
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise VoidboxError(f"cannot open {TUN_PATH}: {e.strerror}") from None
    flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
    ifr = struct.pack(f"{IFNAMSIZ}sH", name.encode(), flags).ljust(IFREQ_SIZE, b"\x00")
    try:
        res = fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as e:
        os.close(fd)
        raise VoidboxError(f"cannot create TAP {name!r}: {e.strerror}") from None
    name = res[:IFNAMSIZ].rstrip(b"\x00").decode()
    if vnet_hdr:
        try:
            if vnet_hdr_len != VIRTIO_NET_HDR_LEN:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", vnet_hdr_len))
            fcntl.ioctl(fd, TUNSETOFFLOAD, offloads)
        except OSError as e:
            os.close(fd)
            raise VoidboxError(f"cannot set the virtio header or offloads on TAP {name!r}: "
                               f"{e.strerror}") from None
    return fd, name


# Read errors that end a batch but say nothing about the interface (EIO: not up yet).
_TRANSIENT_READ_ERRORS = (0, errno.EAGAIN, errno.EINTR, errno.EIO)


class TapIO:
    """Reads frames from a TAP fd into on_frame(frame, checksum_verified) and writes frames.

    vnet_hdr must match how the TAP was opened (open_tap); `port` is the FramePort, whose
    send_tcp_stream the TCP NAT may use to write straight to the TAP (uncaptured). pcap,
    if given, gets each frame read and each frame written, without its virtio_net_hdr;
    the caller owns it.
    """

    def __init__(self, loop: EventLoop, fd: int, mtu: int,
                 on_frame: Callable[[bytes, bool], None], vnet_hdr: bool = False,
                 pcap: PcapWriter | None = None):
        self.loop = loop
        self.fd = fd
        self.on_frame = on_frame
        self.pcap = pcap
        # One frame per read: the TAP truncates anything longer, and the IPv4 length check
        # then drops it. With TSO on, a frame is one IPv4 packet of up to 64 KiB.
        payload = IP_MAX_PACKET + IPV6_HLEN if vnet_hdr else mtu
        self.port = FramePort(fd, VIRTIO_NET_HDR_LEN if vnet_hdr else 0,
                              payload + ETH_HLEN + 2 * VLAN_HLEN, TAP_READ_BATCH, vnet_hdr)
        self.backlog: collections.deque[bytes] = collections.deque()
        self.wakeups = 0
        self.backlog_dropped = 0  # frames refused because the write backlog was full
        self.mtu_frame = mtu + ETH_HLEN
        self._events = select.EPOLLIN
        self.on_writable: Callable[[], None] | None = None  # set by the TCP NAT
        self.on_hangup: Callable[[], None] | None = None  # the TAP's interface went away
        self.gone = False
        loop.watch(fd, self._events, self._on_event)

    def _on_event(self, events: int) -> None:
        if events & select.EPOLLOUT:
            self._flush()
        if events & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
            self.wakeups += 1
            # EAGAIN, EOF and EIO (before the interface is up) all end the batch. Each
            # frame goes to on_frame from the port's own loop (frames longer than the
            # MTU's, GSO super-frames of TSO, counted there), or through the capture.
            if self.pcap is None:
                got = self.port.read_each(self.on_frame, self.mtu_frame)
            else:
                got = self._read_captured()
            if not got and events & (select.EPOLLERR | select.EPOLLHUP) \
                    and self.port.read_errno not in _TRANSIENT_READ_ERRORS:
                # The interface is gone (EBADFD: `ip link del`): epoll would report the
                # fd on every turn from now on, so stop watching it.
                self._hung_up()

    def _read_captured(self) -> int:
        """read_each's work with each frame also written to the capture."""
        port = self.port
        frames = port.read_batch()
        for frame, verified in frames:
            if len(frame) > self.mtu_frame:
                port.rx_oversize += 1
            self.pcap.write(frame)
            self.on_frame(frame, verified)
        return len(frames)

    def _hung_up(self) -> None:
        self.gone = True
        self.loop.unwatch(self.fd)
        self.backlog.clear()
        self.port.paused = True  # nothing more is written to a detached TAP
        if self.on_hangup is not None:
            self.on_hangup()

    def write(self, frame: bytes | memoryview) -> None:
        """Write one frame now, or queue a copy of it: the caller may reuse its buffer."""
        if self.gone:
            return
        if self.backlog:
            self._enqueue(bytes(frame))
            return
        written = self.port.write(frame)
        if written == 0:  # EAGAIN; errors are counted by the port
            self._enqueue(bytes(frame))
        elif written > 0 and self.pcap is not None:
            self.pcap.write(frame)

    @property
    def counters(self) -> dict[str, int]:
        """Frames read and written (streams included), dropped, and wake-ups."""
        port = self.port
        return {"tap_rx": port.rx_frames, "tap_tx": port.tx_frames,
                "tap_tx_dropped": port.tx_dropped + self.backlog_dropped,
                "tap_stream_frames": port.stream_frames, "tap_wakeups": self.wakeups,
                "tap_rx_oversize": port.rx_oversize, "tap_gone": int(self.gone)}

    def stream_blocked(self) -> None:
        """The TCP NAT's direct writes hit EAGAIN: wake for EPOLLOUT like a queued write."""
        self._set_events(select.EPOLLIN | select.EPOLLOUT)

    def _enqueue(self, frame: bytes) -> None:
        if len(self.backlog) >= TAP_WRITE_BACKLOG:
            self.backlog_dropped += 1
            return
        self.backlog.append(frame)
        self.port.paused = True  # TCP streams must not overtake the queued frames
        self._set_events(select.EPOLLIN | select.EPOLLOUT)

    def _flush(self) -> None:
        while self.backlog:
            frame = self.backlog[0]
            written = self.port.write(frame)
            if written == 0:
                return  # still full; a frame the port refused for good is counted there
            if written > 0 and self.pcap is not None:
                self.pcap.write(frame)
            self.backlog.popleft()
        self.port.paused = False
        self._set_events(select.EPOLLIN)
        if self.on_writable is not None:
            self.on_writable()

    def _set_events(self, events: int) -> None:
        if events != self._events and not self.gone:
            self._events = events
            self.loop.watch(self.fd, events, self._on_event)

    def close(self) -> None:
        self.loop.unwatch(self.fd)
        self.backlog.clear()
