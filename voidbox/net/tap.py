"""TAP devices (Documentation/networking/tuntap.rst): open, and batch frame I/O.

A TAP fd carries one Ethernet frame per read() or write(). TapIO drains the fd until
EAGAIN (bounded per wakeup, so the loop stays fair) and queues writes the kernel refuses
with EAGAIN, up to a bound, watching EPOLLOUT only while that queue is non-empty.
"""

from __future__ import annotations

import collections
import fcntl
import os
import select
import struct
from collections.abc import Callable

from voidbox.errors import VoidboxError
from voidbox.net.loop import EventLoop
from voidbox.net.packets import ETH_HLEN

TUN_PATH = "/dev/net/tun"
# linux/if_tun.h
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
IFREQ_SIZE = 40  # struct ifreq on x86_64
VLAN_HLEN = 4
# Frames read per wakeup and queued for writing: bounds for fairness and memory.
TAP_READ_BATCH = 64
TAP_WRITE_BACKLOG = 1024


def open_tap(name: str = "tap0", vnet_hdr: bool = False) -> tuple[int, str]:
    """Create (or attach to) TAP interface name in the caller's network namespace.

    The namespace is the one current when /dev/net/tun is opened. Returns (fd, ifname);
    the fd is non-blocking and close-on-exec.
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
    return fd, res[:IFNAMSIZ].rstrip(b"\x00").decode()


class TapIO:
    """Reads frames from a TAP fd into on_frame and writes frames to it."""

    def __init__(self, loop: EventLoop, fd: int, mtu: int, on_frame: Callable[[bytes], None]):
        self.loop = loop
        self.fd = fd
        self.on_frame = on_frame
        # One frame per read: the TAP truncates anything longer, and the IPv4 length check
        # then drops it.
        self.read_size = mtu + ETH_HLEN + 2 * VLAN_HLEN
        self.backlog: collections.deque[bytes] = collections.deque()
        self.counters = {"tap_rx": 0, "tap_tx": 0, "tap_tx_dropped": 0, "tap_wakeups": 0}
        self._events = select.EPOLLIN
        loop.watch(fd, self._events, self._on_event)

    def _on_event(self, events: int) -> None:
        if events & select.EPOLLOUT:
            self._flush()
        if events & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
            self.counters["tap_wakeups"] += 1
            for _ in range(TAP_READ_BATCH):
                try:
                    frame = os.read(self.fd, self.read_size)
                except BlockingIOError:
                    break
                except OSError:
                    # EIO before the interface is up, or the namespace is gone.
                    break
                if not frame:
                    break
                self.counters["tap_rx"] += 1
                self.on_frame(frame)

    def write(self, frame: bytes | memoryview) -> None:
        """Write one frame now, or queue a copy of it: the caller may reuse its buffer."""
        if self.backlog:
            self._enqueue(bytes(frame))
            return
        try:
            os.write(self.fd, frame)
            self.counters["tap_tx"] += 1
        except BlockingIOError:
            self._enqueue(bytes(frame))
        except OSError:
            self.counters["tap_tx_dropped"] += 1

    def _enqueue(self, frame: bytes) -> None:
        if len(self.backlog) >= TAP_WRITE_BACKLOG:
            self.counters["tap_tx_dropped"] += 1
            return
        self.backlog.append(frame)
        self._set_events(select.EPOLLIN | select.EPOLLOUT)

    def _flush(self) -> None:
        while self.backlog:
            try:
                os.write(self.fd, self.backlog[0])
            except BlockingIOError:
                return
            except OSError:
                self.counters["tap_tx_dropped"] += 1
            else:
                self.counters["tap_tx"] += 1
            self.backlog.popleft()
        self._set_events(select.EPOLLIN)

    def _set_events(self, events: int) -> None:
        if events != self._events:
            self._events = events
            self.loop.watch(self.fd, events, self._on_event)

    def close(self) -> None:
        self.loop.unwatch(self.fd)
        self.backlog.clear()
