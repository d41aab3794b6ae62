"""Network backends behind one frame contract: what a NIC (virtio-net today, a vhost-user
device later) hands its guest's frames to, and takes frames for the guest from.

A backend never sees virtio. The NIC calls `attach(deliver, room)` once, then
`guest_frame(frame, csum_verified)` for each frame the guest sends (csum_verified: the
guest offloaded the TCP/UDP checksum at the packet's own header, so it is not checked).
The backend calls `deliver(frame)` on its I/O thread for each frame for the guest; deliver
copies it (or queues a copy) before it returns, so the backend may reuse its buffer.
`accepts_partial_checksums`, `accepts_tso4` and `accepts_tso6` say which guest offloads it
takes; `produces_guest_offloads` that every frame it delivers was built by it (checksums
right) and its TCP may send the guest TSO frames, IPv4 and IPv6, so the NIC may offer
GUEST_CSUM, GUEST_TSO4 and GUEST_TSO6.

deliver returns False when the NIC dropped the frame: its guest has posted no room (its
backlog is full) or no driver is up. A backend that reads from an fd (TAP) then stops
reading, and the NIC calls `rx_ready()` on the same thread once it can take frames again
(the guest posted RX buffers and the backlog is placed, or the driver went live), so a
guest that never posts buffers costs no CPU. room(), if given, says how many frames the
NIC takes now without dropping: the NAT's TCP sends no more data than that and resumes
on rx_ready(). stream, if given, is the NIC's stream port (send_tcp_stream, as FramePort
has): the NAT's TCP then peeks host data straight into the guest's RX buffers.

`open_backend` picks the backend for one `--net` entry, and applies `--net-fallback` when
a TAP cannot be used.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import os
import select
import sys
from collections.abc import Callable

from voidbox.errors import VoidboxError
from voidbox.eventloop import EventLoop
from voidbox.net.config import NatConfig
from voidbox.net.fastpath import FramePort
from voidbox.net.policy import Policy
from voidbox.net.tap import (
    _TRANSIENT_READ_ERRORS,
    TAP_READ_BATCH,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUNSETOFFLOAD,
    open_tap,
)
from voidbox.virtio.net import (
    ETH_HLEN,
    MAX_FRAME,
    VIRTIO_NET_HDR,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_LEN,
    l4_checksum_offset,
)
from voidbox.virtio.rxstream import writev_from_chain


class SlirpBackend:
    """The user-mode NAT (voidbox.net.engine) as a NIC's backend, on `loop`'s thread."""

    # The engine relays payloads and never forwards packets: a partial checksum at the
    # packet's own header needs no check, and a 64 KiB TSO segment is one host send
    # (IPv4 or IPv6: the engine takes an IPv6 TCP segment of any payload length).
    accepts_partial_checksums = True
    accepts_tso4 = True
    accepts_tso6 = True
    # Every frame to the guest is one the engine built, and its TCP relay takes the NIC's
    # stream port: checksums the guest need not check, TSO frames the guest may ack.
    produces_guest_offloads = True

    def __init__(self, loop: EventLoop, config: NatConfig, policy: Policy | None = None):
        self.loop = loop
        self.config = config
        self.policy = policy
        self.engine = None

    def attach(self, deliver: Callable[[bytes | memoryview], object],
               room: Callable[[], int] | None = None, stream=None) -> None:
        from voidbox.net.engine import Engine

        # borrow=True: deliver copies the frame into guest memory or its backlog at once.
        self.engine = Engine(self.config, self.loop, deliver, self.policy, borrow=True)
        if room is not None and self.engine.tcp is not None:
            # TCP data stops at the NIC's room and resumes on rx_ready(): a guest window
            # larger than its RX buffers plus the backlog would otherwise mean drops.
            self.engine.tcp.guest_room = room
        if stream is not None:
            # Host data then goes socket -> RX buffers in one call per burst; a blocked
            # stream resumes on rx_ready() (port_writable), so blocked() has nothing to do.
            self.engine.attach_stream_port(stream, lambda: None)

    def guest_frame(self, frame, csum_verified: bool = False) -> None:
        self.engine.guest_frame(frame, csum_verified)

    @property
    def counters(self) -> dict[str, int]:
        if self.engine is None:
            return {}
        out = dict(self.engine.counters)
        if self.engine.tcp is not None:
            out.update(self.engine.tcp.counters)
        return out

    def drop_flows(self) -> None:
        """The guest went away (its vhost-user frontend disconnected): close its flows."""
        if self.engine is not None:
            self.engine.drop_flows()

    def rx_ready(self) -> None:
        """The NIC has room again: resume the TCP flows that stopped at guest_room()."""
        if self.engine is not None and self.engine.tcp is not None:
            self.engine.tcp.port_writable()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


class NullBackend:
    """`--net none` with a NIC anyway (tests): frames from the guest are counted, dropped."""

    accepts_partial_checksums = True
    accepts_tso4 = True
    accepts_tso6 = True
    produces_guest_offloads = True  # it sends nothing; a test's frames are built ones

    def __init__(self):
        self.frames = 0

    def attach(self, deliver, room=None, stream=None) -> None:
        self.deliver = deliver

    def guest_frame(self, frame, csum_verified: bool = False) -> None:
        self.frames += 1

    def rx_ready(self) -> None:
        pass

    def close(self) -> None:
        pass


class TapBackend:
    """A TAP device (`tap:NAME`) as a NIC's backend: the guest's frames on a host interface
    for bridging or routing, on `loop`'s thread.

    The TAP is opened by name: an existing persistent TAP the user owns (`ip tuntap add
    mode tap user USER`, no privilege needed at run time), or a new one (CAP_NET_ADMIN),
    which lives as long as the fd. Frames carry the 12-byte virtio_net_hdr both ways
    (IFF_VNET_HDR, TUNSETVNETHDRSZ 12).
    - Guest to TAP: the NIC checks each TX chain's header and hands the chain over
      (guest_chain): one writev whose iovecs point into guest memory, so the frame is
      copied once, by the kernel, which checks the header again. Checksum offload and TSO
      pass through as the guest asked. A frame the kernel refuses (EAGAIN, EIO while the
      interface is down, a header it rejects) is dropped and counted, as a wire would.
    - TAP to guest: TUNSETOFFLOAD follows what the driver acked (set_guest_offloads), so
      the kernel's header (partial checksum, GSO) is one the guest takes. Each frame is
      read straight into the guest's RX buffers (VirtioNet.rx_from_fd: readv over them,
      spread over mergeable buffers) while the fd is readable; with no buffers posted the
      fd is no longer watched until rx_ready(). A card with a capture is handed copies
      instead (FramePort batches, through deliver), so the capture sees every frame.
    - EBADFD on a read or write means the interface was deleted: the fd leaves the loop.
    """

    accepts_partial_checksums = True
    # The kernel takes a guest's TSO segment, IPv4 or IPv6, as one GSO skb
    # (virtio_net_hdr_to_skb checks the header, as it does for QEMU's and vhost-net's writes).
    accepts_tso4 = True
    accepts_tso6 = True
    # Frames towards the guest carry the header the kernel writes for exactly the offloads
    # TUNSETOFFLOAD allows, and that follows what the driver acked (set_guest_offloads).
    produces_guest_offloads = True
    reads_into_card = True  # attach(card=...) takes the NIC's RX buffers directly

    def __init__(self, loop: EventLoop, name: str, fd: int | None = None):
        """fd: the TAP already open (open_tap as below), e.g. by a more privileged parent
        (voidbox.vhost_user.child); the backend owns it from here."""
        self.loop = loop
        if fd is None:
            fd, name = open_tap(name, vnet_hdr=True, vnet_hdr_len=VIRTIO_NET_HDR_LEN, offloads=0)
        self.fd, self.name = fd, name
        # One frame per read, up to the largest the NIC takes: nothing is truncated.
        self.port = FramePort(self.fd, VIRTIO_NET_HDR_LEN, MAX_FRAME, TAP_READ_BATCH)
        self.deliver: Callable[[bytes], object] | None = None
        self.card = None  # the NIC whose RX buffers frames are read into (rx_from_fd)
        self.stats: collections.Counter = collections.Counter()
        self._pending: collections.deque[bytes] = collections.deque()
        self.watching = False
        self.gone = False

    def attach(self, deliver: Callable[[bytes], object],
               room: Callable[[], int] | None = None, stream=None, card=None) -> None:
        """room and stream are not needed: a refused frame stops reading the TAP until
        rx_ready(), and TAP frames are no TCP streams of ours. With `card` (a VirtioNet
        without a capture), frames are read straight into its RX buffers."""
        self.deliver = deliver
        self.card = card
        self._watch()

    def set_guest_offloads(self, csum: bool, tso4: bool, tso6: bool = False) -> None:
        """The driver acked GUEST_CSUM / GUEST_TSO4 / GUEST_TSO6 (or was reset): the kernel
        may hand us partial checksums and GSO frames exactly as far as the guest takes
        them (each TSO only with the checksum offload, as §5.1.3.1 has it)."""
        offloads = ((TUN_F_CSUM if csum else 0) | (TUN_F_TSO4 if csum and tso4 else 0)
                    | (TUN_F_TSO6 if csum and tso6 else 0))
        if self.fd < 0 or self.gone:
            return
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, offloads)
        except OSError:
            self.stats["tap_offload_errors"] += 1  # frames stay complete: always safe

    # ---- TAP -> guest ----------------------------------------------------------------

    def _watch(self) -> None:
        if not self.watching and not self.gone:
            self.watching = True
            self.loop.watch(self.fd, select.EPOLLIN, self._on_readable)

    def _unwatch(self) -> None:
        if self.watching:
            self.watching = False
            self.loop.unwatch(self.fd)

    def _on_readable(self, events: int) -> None:
        self.stats["tap_wakeups"] += 1
        if self.card is not None:
            self._read_into_card(events)
            return
        frames = self.port.read_batch()
        if not frames and events & (select.EPOLLERR | select.EPOLLHUP) \
                and self.port.read_errno not in _TRANSIENT_READ_ERRORS:
            self._hung_up()  # EBADFD: `ip link del`; epoll would report it on every turn
            return
        self._pending.extend(frame for frame, _verified in frames)
        self._deliver_pending()

    def _read_into_card(self, events: int) -> None:
        from voidbox.virtio.net import RX_FD_BLOCKED

        placed, status = self.card.rx_from_fd(self.fd, TAP_READ_BATCH)
        self.stats["tap_rx_frames"] += placed
        if status == RX_FD_BLOCKED:
            # No buffers in the guest: read no more until it posts some (rx_ready); the
            # kernel's queue holds or drops what comes meanwhile.
            self.stats["tap_rx_paused"] += 1
            self._unwatch()
        elif status < 0 and -status not in _TRANSIENT_READ_ERRORS:
            self.stats["tap_rx_errors"] += 1
            if -status == errno.EBADFD or events & (select.EPOLLERR | select.EPOLLHUP):
                self._hung_up()

    def _deliver_pending(self) -> None:
        pending = self._pending
        deliver = self.deliver
        while pending:
            if not deliver(pending.popleft()):
                # The NIC dropped it (and counted it): no room in the guest. Read no more
                # until it has some; the kernel's queue holds or drops what comes meanwhile.
                self.stats["tap_rx_refused"] += 1
                self.stats["tap_rx_paused"] += 1
                self._unwatch()
                return
        self._watch()

    def rx_ready(self) -> None:
        """The NIC can take frames again: hand it what waited, then read the TAP again."""
        if not self.watching and not self.gone and self.deliver is not None:
            self._deliver_pending()

    # ---- guest -> TAP ----------------------------------------------------------------

    def guest_chain(self, header: bytes, chain, offset: int) -> bool:
        """The NIC's TX chain as one frame: `header` (checked by the NIC) and the chain's
        bytes from `offset`, written from guest memory in one writev. False if dropped."""
        if self.gone:
            self.stats["tap_tx_dropped_gone"] += 1
            return False
        put = writev_from_chain(self.fd, header, chain, offset)
        if put < 0:
            if -put == errno.EBADFD:
                self._hung_up()
            self.stats["tap_tx_dropped"] += 1
            return False
        self.stats["tap_tx_frames"] += 1
        return True

    def guest_copy(self, header: bytes, frame) -> bool:
        """As guest_chain, from a copy of the frame the NIC read once (its capture path:
        what it captured is what goes out). False if dropped."""
        if self.gone:
            self.stats["tap_tx_dropped_gone"] += 1
            return False
        try:
            os.writev(self.fd, [header, frame])
        except OSError as error:
            if error.errno == errno.EBADFD:
                self._hung_up()
            self.stats["tap_tx_dropped"] += 1
            return False
        self.stats["tap_tx_frames"] += 1
        return True

    def guest_frame(self, frame, csum_verified: bool = False) -> None:
        """A frame as bytes (the NIC's copy path): guest_copy's writev, with a header of
        its own (a vouched-for partial checksum at the packet's own header, or none)."""
        header = _PLAIN_HEADER
        if csum_verified:
            field = l4_checksum_offset(frame)
            if field is not None:
                start = ETH_HLEN + (frame[ETH_HLEN] & 0x0F) * 4
                header = VIRTIO_NET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, start,
                                             field - start, 0)
                self.stats["tap_tx_csum_offloaded"] += 1
        self.guest_copy(header, frame)

    # ---- the rest --------------------------------------------------------------------

    def _hung_up(self) -> None:
        self.gone = True
        self._unwatch()
        self._pending.clear()

    @property
    def counters(self) -> dict[str, int]:
        out = dict(self.stats)
        # Frames read into the card directly, and frames FramePort read as copies.
        out.update(tap_rx_frames=self.stats["tap_rx_frames"] + self.port.rx_frames,
                   tap_rx_dropped=self.port.rx_dropped,
                   tap_gone=int(self.gone))
        return out

    def close(self) -> None:
        if self.fd >= 0:
            self._unwatch()
            self._pending.clear()
            os.close(self.fd)
            self.fd = -1


_PLAIN_HEADER = bytes(VIRTIO_NET_HDR_LEN)  # no offload; num_buffers is RX-only


def open_backend(kind: str, name: str | None, fallback: str, loop: EventLoop,
                 nat: NatConfig, policy: Policy | None = None, tap_fd: int | None = None):
    """The backend for one `--net` entry ("slirp" or "tap"). When the TAP cannot be used
    (no permission, no /dev/net/tun, the name held by another process), one line on
    stderr says why and the NAT serves the card; with fallback "fail" that line is the
    VoidboxError raised instead. tap_fd: the TAP, already open (by a privileged parent)."""
    if kind == "slirp":
        return SlirpBackend(loop, nat, policy)
    if kind != "tap":
        raise ValueError(f"no backend {kind!r}")
    try:
        return TapBackend(loop, name, tap_fd)
    except VoidboxError as error:
        reason = f"tap:{name} unusable ({error})"
    if fallback == "fail":
        raise VoidboxError(f"{reason}: --net-fallback is fail")
    sys.stderr.write(f"voidbox: {reason}: the guest's card uses the user-mode NAT\n")
    sys.stderr.flush()
    return SlirpBackend(loop, nat, policy)
