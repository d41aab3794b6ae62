"""A vhost-user backend server: one device core served to one frontend at a time.

The message flow is QEMU's docs/interop/vhost-user.rst: the frontend negotiates features
(GET/SET_FEATURES, GET/SET_PROTOCOL_FEATURES), sends the guest's memory table
(SET_MEM_TABLE, one fd per region), then sets each ring up (SET_VRING_NUM, ADDR, BASE,
CALL, KICK) and enables it (SET_VRING_ENABLE). GET_VRING_BASE stops a ring.

Decisions a reader should know:
- Everything runs on one EventLoop: the listening socket, the connection, every kick
  eventfd and the device core (its backend shares the loop).
- The device core is the one the VMM uses, unchanged: it is activated once every ring it
  has is started (kick received) and enabled, with Virtqueues over the mapped regions
  keyed by guest-physical address. Its interrupt signals the call eventfd of each ring
  whose used index moved (of every ring if none did). GET_VRING_BASE of any ring stops
  the device until that ring is set up again (the core has no per-ring stop; frontends
  stop every ring together: QEMU's vhost_dev_stop does); the other rings' indexes are
  kept for their own GET_VRING_BASE.
- GET_VRING_BASE answers the next available index the device has not consumed: RX
  buffers the card took but did not fill are given back. SET_VRING_BASE makes a ring
  resume there (Virtqueue.resume), so a frontend can stop, migrate or reconnect.
- SET_VRING_ADDR carries frontend user addresses: they are translated through the table
  to guest-physical addresses; one that maps into no region is refused.
- Kick, call and err fds must look like eventfds to fstat (files, pipes and sockets are
  refused; epoll, timerfd and the like share the eventfd's anonymous inode and fail
  their first read or write instead) and are made non-blocking: a call whose counter the
  frontend filled never blocks the loop.
- A ring the device finds broken (QueueError) stops alone: its kick is no longer served
  and its err eventfd is signalled, until the frontend stops it and sets it up again.
- Anything malformed or out of order raises ProtocolError: that connection closes with one
  log line and the server waits for the next frontend, with the device reset, rings
  stopped, mappings unmapped and every fd received closed.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import select
import socket
import stat
import struct
import termios
import time

from .._records import dataclass, field
from ..errors import VoidboxError
from ..ring import QueueError, Virtqueue, avail_ring_size, desc_table_size, used_ring_size
from ..virtio.device import VIRTIO_F_EVENT_IDX
from . import protocol as p
from .protocol import ProtocolError

log = logging.getLogger(__name__)

MESSAGES_PER_WAKEUP = 64  # then other fds get their turn
# The largest ring a frontend may set up. vhost-user has no message that tells the
# frontend a backend's limit, and QEMU's virtio-mmio offers its guest 1024 entries
# (VIRTQUEUE_MAX_SIZE), so the backend takes what QEMU can give, whatever the core's
# own MMIO limit (queue_max_sizes) is.
MAX_RING_SIZE = 1024
SEND_TIMEOUT = 5.0
OFFERED_PROTOCOL_FEATURES = (1 << p.VHOST_USER_PROTOCOL_F_REPLY_ACK) | (1 << p.VHOST_USER_PROTOCOL_F_CONFIG)
PROTOCOL_FEATURES_BIT = 1 << p.VHOST_USER_F_PROTOCOL_FEATURES
_FIONBIO_ON = struct.pack("i", 1)


def _eventfd_identity() -> tuple[int, int | None, int]:
    """What fstat shows of an eventfd: (st_dev, st_ino, st_mode). Every eventfd shares the
    kernel's one anonymous inode (with epoll, timerfd, signalfd... too); on a kernel that
    gave each its own, st_ino is None here and only the device and mode are compared.
    Read at import, before any sandbox: a sandboxed backend may not create an eventfd."""
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(2)]
    try:
        first, second = (os.fstat(fd) for fd in fds)
    finally:
        for fd in fds:
            os.close(fd)
    shared = (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)
    return first.st_dev, first.st_ino if shared else None, first.st_mode


_EVENTFD = _eventfd_identity()


def _looks_like_eventfd(st: os.stat_result) -> bool:
    dev, ino, mode = _EVENTFD
    return st.st_dev == dev and st.st_mode == mode and (ino is None or st.st_ino == ino)


@dataclass
class _Region:
    """One mapped region of the frontend's memory table."""

    gpa: int
    size: int
    uaddr: int
    area: mmap.mmap
    view: memoryview

    def close(self) -> bool:
        """Unmap; False if a view is still held elsewhere (the mapping then goes with it)."""
        self.view.release()
        try:
            self.area.close()
        except BufferError:
            return False
        return True


@dataclass
class _Vring:
    num: int | None = None
    addrs: tuple[int, int, int] | None = None  # desc, avail, used: guest-physical
    kick: int | None = None
    call: int | None = None
    err: int | None = None
    started: bool = False
    enabled: bool = False
    stopped_base: int = 0  # last available index when the device was last stopped
    signalled_used: int = 0
    fds: list[int] = field(default_factory=list)


# Handlers that take their message's fds (they close them, or hand them to a ring).
_OWNS_FDS = (p.SetVringKick, p.SetVringCall, p.SetVringErr, p.SetMemTable)


class _Session:
    """One frontend connection: its decoder, memory table and rings."""

    def __init__(self, server: VhostUserServer, conn: socket.socket):
        self.server = server
        self.conn = conn
        self.device = server.device
        self.nqueues = len(self.device.queue_max_sizes)
        self.decoder = p.Decoder(max_queues=self.nqueues)
        self.protocol_features = 0
        self.protocol_negotiated = False
        self.regions: list[_Region] = []
        self.vrings = [_Vring() for _ in range(self.nqueues)]
        self.queues: list | None = None  # the live Virtqueues while the device is active
        self.closed = False
        self._pending = bytearray()  # the message being read
        self._pending_fds: list[int] = []
        self._ending = False  # an end is scheduled (_end_soon)
        self._send_wait_left = SEND_TIMEOUT  # seconds the loop may still wait in send()

    # ---- I/O ---------------------------------------------------------------------------

    def readable(self, _events: int = 0) -> None:
        try:
            for _ in range(MESSAGES_PER_WAKEUP):
                if not self._read_message():
                    return
        except ProtocolError as error:
            self.server._end(self, f"protocol error: {error}")
        except OSError as error:
            self.server._end(self, f"connection error: {error}")
        except Exception as error:  # a bug, or the device refusing: never the process
            log.exception("vhost-user: unexpected error")
            self.server._end(self, f"internal error: {error!r}")

    def _read_message(self) -> bool:
        """Read towards the end of the current message (never past it); feed and handle it
        once whole. False when the socket has nothing more now (or the session ended).

        Linux glues the bytes of several sends into one stream read and stops at the first
        send that carried fds, handing those over with the whole read: a read that crossed
        a message boundary would attach the fds of a later message to an earlier one. Reads
        that stop at the message's end keep each message's fds with it."""
        if len(self._pending) < p.VHOST_USER_HDR_SIZE:
            want = p.VHOST_USER_HDR_SIZE - len(self._pending)
        else:
            _request, _flags, size = p.HEADER.unpack_from(self._pending)
            want = p.VHOST_USER_HDR_SIZE + min(size, p.MAX_PAYLOAD + 1) - len(self._pending)
            if size > p.MAX_PAYLOAD:
                want = 0  # the decoder refuses the header at once
        if want:
            try:
                data, fds, flags, _addr = socket.recv_fds(self.conn, want, p.MAX_FDS_PER_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return False
            self._pending_fds += fds
            # The decoder checks a message's fds only once it is whole: a frontend sending
            # one byte at a time, each with fds, would pile them up here without this.
            if len(self._pending_fds) > p.MAX_FDS_PER_MESSAGE:
                raise ProtocolError(f"{len(self._pending_fds)} fds received for one message, "
                                    f"more than {p.MAX_FDS_PER_MESSAGE}")
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError("file descriptors truncated (MSG_CTRUNC)")
            if not data:
                self.server._end(self, "frontend disconnected", error=False)
                return False
            self._pending += data
            if len(self._pending) < p.VHOST_USER_HDR_SIZE:
                return True
            _request, _flags, size = p.HEADER.unpack_from(self._pending)
            if len(self._pending) < p.VHOST_USER_HDR_SIZE + size and size <= p.MAX_PAYLOAD:
                return True
        data, fds = bytes(self._pending), self._pending_fds
        self._pending, self._pending_fds = bytearray(), []
        self.decoder.feed(data, fds)
        for message in self.decoder.messages():
            self.handle(message)
        return not self.closed

    def send(self, data: bytes) -> None:
        """Send a reply, waiting for the frontend to read at most SEND_TIMEOUT in all over
        the session: it then loses its connection. Not a limit per wait, nor per reply: a
        frontend that queues requests and reads a reply every few seconds would keep the
        loop thread here (64 replies a wakeup). One that reads each reply before its next
        request, as QEMU does, never fills the socket and never waits."""
        view = memoryview(data)
        poller = None
        while view:
            try:
                sent = self.conn.send(view)
            except BlockingIOError:
                if poller is None:
                    poller = select.poll()
                    poller.register(self.conn.fileno(), select.POLLOUT)
                started = time.monotonic()
                ready = poller.poll(max(self._send_wait_left, 0.0) * 1000)
                self._send_wait_left -= time.monotonic() - started
                if not ready:
                    raise OSError("the frontend does not read its replies") from None
                continue
            view = view[sent:]

    # ---- messages ------------------------------------------------------------------------

    def handle(self, msg: p.Message) -> None:
        handler = getattr(self, "_on_" + type(msg).__name__, None)
        try:
            if handler is None:
                raise ProtocolError(f"{msg.name} is not supported")
            replied = handler(msg)
        except BaseException:
            if not isinstance(msg, _OWNS_FDS):
                msg.close()
            raise
        if msg.need_reply and not replied and self.protocol_features & (1 << p.VHOST_USER_PROTOCOL_F_REPLY_ACK):
            self.send(p.encode_reply_ack(msg.request, 0))

    def _on_GetFeatures(self, msg) -> bool:
        self.send(p.encode_u64_reply(msg.request, self.device.features | PROTOCOL_FEATURES_BIT))
        return True

    def _on_SetFeatures(self, msg) -> bool:
        acked = msg.features & ~PROTOCOL_FEATURES_BIT
        if acked & ~self.device.features:
            raise ProtocolError(f"SET_FEATURES: {acked & ~self.device.features:#x} not offered")
        if msg.features & PROTOCOL_FEATURES_BIT:
            self.protocol_negotiated = True
        self.device.acked_features = acked
        return False

    def _on_GetProtocolFeatures(self, msg) -> bool:
        self.send(p.encode_u64_reply(msg.request, OFFERED_PROTOCOL_FEATURES))
        return True

    def _on_SetProtocolFeatures(self, msg) -> bool:
        if msg.features & ~OFFERED_PROTOCOL_FEATURES:
            raise ProtocolError(f"SET_PROTOCOL_FEATURES: {msg.features & ~OFFERED_PROTOCOL_FEATURES:#x} "
                                "not offered")
        self.protocol_features = msg.features
        self.protocol_negotiated = True
        return False

    def _on_SetOwner(self, msg) -> bool:
        return False

    def _on_ResetOwner(self, msg) -> bool:
        self.stop_device()
        for index in range(self.nqueues):
            self._clear_vring(index)
        self.device.acked_features = 0
        return False

    def _on_GetQueueNum(self, msg) -> bool:
        self.send(p.encode_u64_reply(msg.request, self.nqueues))
        return True

    def _on_GetConfig(self, msg) -> bool:
        config = self.device.config_bytes()
        if msg.offset + msg.size > len(config):
            self.send(p.encode_config_failure())
        else:
            self.send(p.encode_config_reply(msg.offset, msg.flags, config[msg.offset:msg.offset + msg.size]))
        return True

    def _on_SetConfig(self, msg) -> bool:
        # The device's config space is read-only for the driver: the write is refused.
        if msg.need_reply and self.protocol_features & (1 << p.VHOST_USER_PROTOCOL_F_REPLY_ACK):
            self.send(p.encode_reply_ack(msg.request, 1))
        return True

    def _on_SetMemTable(self, msg) -> bool:
        regions = []
        try:
            # Inside the try: the message's fds are closed however it is refused.
            if self.queues is not None:
                raise ProtocolError("SET_MEM_TABLE while the rings are running")
            for region, fd in zip(msg.regions, msg.fds, strict=True):
                regions.append(_map_region(region, fd))
        except ProtocolError:
            for region in regions:
                region.close()
            raise
        finally:
            msg.close()
        self.unmap()
        self.regions = regions
        # Ring addresses given against the old table no longer hold.
        for vring in self.vrings:
            vring.addrs = None
        return False

    def _vring(self, msg) -> _Vring:
        return self.vrings[msg.index]

    def _on_SetVringNum(self, msg) -> bool:
        limit = MAX_RING_SIZE
        if not 0 < msg.num <= limit or msg.num & (msg.num - 1):
            raise ProtocolError(f"SET_VRING_NUM: {msg.num} is not a power of two in 1..{limit}")
        self._vring(msg).num = msg.num
        return False

    def _on_SetVringAddr(self, msg) -> bool:
        vring = self._vring(msg)
        if not self.regions:
            raise ProtocolError("SET_VRING_ADDR before SET_MEM_TABLE")
        if vring.num is None:
            raise ProtocolError("SET_VRING_ADDR before SET_VRING_NUM")
        num = vring.num
        vring.addrs = (
            self._translate("descriptor table", msg.desc_user_addr, desc_table_size(num)),
            self._translate("available ring", msg.avail_user_addr, avail_ring_size(num)),
            self._translate("used ring", msg.used_user_addr, used_ring_size(num)),
        )
        return False

    def _translate(self, what: str, uaddr: int, length: int) -> int:
        for region in self.regions:
            rel = uaddr - region.uaddr
            if 0 <= rel and rel + length <= region.size:
                return region.gpa + rel
        raise ProtocolError(f"SET_VRING_ADDR: {what} at user address {uaddr:#x}+{length:#x} "
                            "maps into no memory region")

    def _on_SetVringBase(self, msg) -> bool:
        if not 0 <= msg.num <= 0xFFFF:
            raise ProtocolError(f"SET_VRING_BASE: base {msg.num} is not a 16-bit ring index")
        vring = self._vring(msg)
        if vring.started:
            raise ProtocolError("SET_VRING_BASE on a started ring")
        vring.stopped_base = msg.num  # the ring resumes there when it starts
        return False

    def _on_GetVringBase(self, msg) -> bool:
        vring = self._vring(msg)
        self.stop_device()
        base = vring.stopped_base
        self._clear_vring(msg.index)
        self.send(p.encode_vring_state_reply(msg.index, base))
        return True

    def _on_SetVringKick(self, msg) -> bool:
        vring = self._vring(msg)
        fd = self._take_eventfd(msg)
        self._replace_fd(vring, "kick", fd)
        if fd is not None:
            self.server.loop.watch(fd, select.EPOLLIN,
                                   lambda events, fd=fd, i=msg.index: self._kicked(events, fd, i))
        vring.started = True
        if not self.protocol_negotiated:
            vring.enabled = True
        self._maybe_activate()
        return False

    def _on_SetVringCall(self, msg) -> bool:
        self._replace_fd(self._vring(msg), "call", self._take_eventfd(msg))
        return False

    def _on_SetVringErr(self, msg) -> bool:
        self._replace_fd(self._vring(msg), "err", self._take_eventfd(msg))
        return False

    def _take_eventfd(self, msg) -> int | None:
        """The message's fd, made non-blocking; anything but an eventfd is refused (and
        closed). Not readlink of /proc/self/fd: the sandboxed backend has no /proc, and
        readlink is off its seccomp allow-list (the process would die of SIGSYS). fstat
        sees the anonymous inode eventfds share with epoll, timerfd and the like: one of
        those fails its first read or write, which ends the session (_kicked, _signal)."""
        fd = msg.fd
        if fd is None:
            return None
        try:
            st = os.fstat(fd)
            if not _looks_like_eventfd(st):
                raise ProtocolError(f"{msg.name}: the fd is not an eventfd")
            # FIONBIO rather than fcntl(F_SETFL): only the first is on the sandbox's
            # allow-list. The frontend shares this open file description and could clear
            # O_NONBLOCK again: a full counter would then block a call's write once more.
            fcntl.ioctl(fd, termios.FIONBIO, _FIONBIO_ON)
        except OSError as error:
            msg.close()
            raise ProtocolError(f"{msg.name}: {error}") from None
        except ProtocolError:
            msg.close()
            raise
        return fd

    def _on_SetVringEnable(self, msg) -> bool:
        vring = self._vring(msg)
        vring.enabled = msg.enable
        if msg.enable:
            self._maybe_activate()
        else:
            self.stop_device()
        return False

    # ---- rings and the device --------------------------------------------------------------

    def _replace_fd(self, vring: _Vring, name: str, fd: int | None) -> None:
        old = getattr(vring, name)
        if old is not None:
            if name == "kick":
                self.server.loop.unwatch(old)
            os.close(old)
        setattr(vring, name, fd)

    def _clear_vring(self, index: int) -> None:
        vring = self.vrings[index]
        for name in ("kick", "call", "err"):
            self._replace_fd(vring, name, None)
        self.vrings[index] = _Vring(num=vring.num, addrs=vring.addrs)

    def _kicked(self, events: int, fd: int, index: int) -> None:
        if self.closed:
            return
        # An eventfd never hangs up: a kick fd that does would be reported every turn.
        if events & (select.EPOLLHUP | select.EPOLLERR):
            self.server._end(self, f"kick eventfd of ring {index} hung up or failed")
            return
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        except OSError as error:
            self.server._end(self, f"kick eventfd of ring {index}: {error}")
            return
        if self.queues is not None:
            try:
                self.device.queue_notify(index)
            except QueueError as error:
                self._ring_failed(index, error)

    def _ring_failed(self, index: int, error: QueueError) -> None:
        """A ring the guest or the frontend broke: one line, its err eventfd signalled,
        and its kicks left unserved until the frontend stops it (GET_VRING_BASE) and sets
        it up again; a new SET_VRING_KICK alone only serves the broken ring once more (and
        logs once more). Served on, it would fail the same way at every kick."""
        vring = self.vrings[index]
        self.server.failed_rings += 1
        log.warning("vhost-user %s: ring %d stopped until it is set up again: %s",
                    self.server.path, index, error)
        if vring.kick is not None:
            self.server.loop.unwatch(vring.kick)
        if vring.err is not None:
            self._signal(vring.err, f"err eventfd of ring {index}")

    def _interrupt(self, _kind: int, queue: int | None = None) -> None:
        """The device's interrupt: each queue has its own call eventfd, so a device that
        says which queue's used ring asked (its EVENT_IDX check) signals that one only.
        Signalling another whose used index merely moved would undo the suppression its
        driver asked for, and wake the frontend and the guest for nothing."""
        queues = self.queues
        if queues is None:
            return
        if queue is not None and queue < len(queues):
            vring = self.vrings[queue]
            vring.signalled_used = queues[queue].used_idx
            if vring.call is not None:
                self._signal(vring.call, f"call eventfd of ring {queue}")
            return
        moved = [i for i, q in enumerate(queues) if q.used_idx != self.vrings[i].signalled_used]
        for i in moved or range(len(queues)):
            vring = self.vrings[i]
            vring.signalled_used = queues[i].used_idx
            if vring.call is not None:
                self._signal(vring.call, f"call eventfd of ring {i}")

    def _signal(self, fd: int, what: str) -> None:
        """Add 1 to a call (or err) eventfd, never blocking the loop."""
        try:
            os.eventfd_write(fd, 1)
        except BlockingIOError:
            # The counter is full, so not zero: the frontend sees this signal anyway.
            self.server.full_calls += 1
        except OSError as error:
            self._end_soon(f"{what}: {error}")

    def _end_soon(self, reason: str) -> None:
        """End the session on the loop's next turn: the device core, which calls
        _interrupt, must not be reset from inside its own call."""
        if self._ending or self.closed:
            return
        self._ending = True

        def end() -> None:
            if not self.closed:
                self.server._end(self, reason)

        self.server.loop.call_soon(end)

    def _maybe_activate(self) -> None:
        if self.queues is not None:
            return
        if not all(v.started and v.enabled for v in self.vrings):
            return
        for index, vring in enumerate(self.vrings):
            if vring.num is None or vring.addrs is None:
                raise ProtocolError(f"ring {index} started before SET_VRING_NUM and SET_VRING_ADDR")
        regions = [(r.gpa, r.size, r.view) for r in self.regions]
        event_idx = bool(self.device.acked_features & (1 << VIRTIO_F_EVENT_IDX))
        queues = []
        for index, vring in enumerate(self.vrings):
            try:
                ring = self.server.ring_factory(regions, MAX_RING_SIZE)
                desc, avail, used = vring.addrs
                ring.activate(vring.num, desc, avail, used, event_idx)
                # Continue where the frontend (or the previous session) left the ring.
                ring.resume(vring.stopped_base)
            except (QueueError, ValueError) as error:
                raise ProtocolError(f"ring {index}: {error}") from None
            queues.append(ring)
        self.queues = queues
        for vring in self.vrings:
            vring.signalled_used = 0
        self.device.activate(regions, tuple(queues), self._interrupt)
        self.server.activations += 1
        # Kicks that came before the last ring started.
        for index in range(self.nqueues):
            try:
                self.device.queue_notify(index)
            except QueueError as error:
                self._ring_failed(index, error)

    def stop_device(self) -> None:
        """Reset the device core and forget the live rings, keeping each one's index."""
        if self.queues is None:
            return
        acked = self.device.acked_features
        for index, (vring, queue) in enumerate(zip(self.vrings, self.queues, strict=True)):
            # Buffers the device took but did not use go back to the driver's side.
            held = getattr(self.device, "held_chains", lambda _index: 0)(index)
            vring.stopped_base = (queue.last_avail_idx - held) & 0xFFFF
        self.queues = None
        self.device.reset()
        self.device.acked_features = acked

    def unmap(self) -> None:
        for region in self.regions:
            if not region.close():
                self.server.lingering_mappings += 1
        self.regions = []

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.loop.unwatch(self.conn.fileno())
        self.stop_device()
        self.device.reset()
        for index in range(self.nqueues):
            self._clear_vring(index)
        self.decoder.close()
        p._close_all(self._pending_fds)
        self._pending_fds = []
        self.unmap()
        self.conn.close()


def _listening(path: str) -> bool:
    """Whether something accepts connections on the unix socket at path."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return False  # ECONNREFUSED: a stale socket file
    finally:
        probe.close()
    return True


def _map_region(region: p.MemoryRegion, fd: int) -> _Region:
    """mmap one region (MAP_SHARED) at its offset in `fd`; the fd stays the caller's."""
    try:
        st = os.fstat(fd)
    except OSError as error:
        raise ProtocolError(f"SET_MEM_TABLE: region fd: {error}") from None
    end = region.mmap_offset + region.memory_size
    # A mapping past the end of a file faults (SIGBUS) when touched: refuse it up front.
    if stat.S_ISREG(st.st_mode) and st.st_size < end:
        raise ProtocolError(f"SET_MEM_TABLE: region at {region.guest_phys_addr:#x} needs "
                            f"{end:#x} bytes of a {st.st_size:#x}-byte file")
    start = region.mmap_offset - region.mmap_offset % mmap.ALLOCATIONGRANULARITY
    delta = region.mmap_offset - start
    try:
        area = mmap.mmap(fd, delta + region.memory_size, mmap.MAP_SHARED,
                         mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
    except (OSError, ValueError, OverflowError) as error:
        raise ProtocolError(f"SET_MEM_TABLE: cannot map region at "
                            f"{region.guest_phys_addr:#x}: {error}") from None
    view = memoryview(area)[delta:delta + region.memory_size]
    return _Region(region.guest_phys_addr, region.memory_size, region.userspace_addr, area, view)


class VhostUserServer:
    """Serve `device` (a voidbox.virtio device core) on the unix socket `path`, on `loop`.

    start() binds and listens (mode 0600; an existing socket file is replaced, any other
    file refused); close() stops serving and unlinks the path. start_on(sock) serves an
    inherited socket instead (voidbox.vhost_user.child): a listening one, whose path its
    creator owns, or one already connected to its frontend (one end of a socketpair).
    """

    def __init__(self, device, path: str, loop, ring_factory=Virtqueue, on_disconnect=None):
        """on_disconnect(), if given, runs after each frontend's connection ends (the
        NAT then closes that guest's flows)."""
        self.device = device
        self.on_disconnect = on_disconnect
        self.path = os.fspath(path)
        self._owns_path = True
        self.loop = loop
        self.ring_factory = ring_factory
        self.listener: socket.socket | None = None
        self.session: _Session | None = None
        self.sessions = 0
        self.activations = 0
        self.refused = 0
        self.full_calls = 0  # call signals dropped: the frontend's counter was full
        self.failed_rings = 0  # rings stopped for a QueueError
        self.lingering_mappings = 0
        self.last_error: str | None = None

    def start(self) -> None:
        if not self.path:
            # bind("") would take an autobound abstract address nobody can name.
            raise VoidboxError("the vhost-user socket path is empty")
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        except OSError as error:
            raise VoidboxError(f"cannot use {self.path} as a socket path: "
                               f"{error.strerror or error}") from None
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise VoidboxError(f"{self.path} exists and is not a socket: not replacing it")
            # Only a stale socket of our own is replaced: never another user's, and never
            # one a server (another voidbox, or anything else) still listens on.
            if st.st_uid != os.geteuid():
                raise VoidboxError(f"{self.path} is another user's socket: not replacing it")
            if _listening(self.path):
                raise VoidboxError(f"{self.path} is in use by another server")
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.path)
        except OSError as error:
            # A missing directory, no write permission, a path over sun_path's 107 bytes:
            # the user's input, so one line, not a traceback.
            sock.close()
            raise VoidboxError(f"cannot listen on {self.path}: {error.strerror or error}") from None
        try:
            # Nobody can connect before listen(): the mode is set before that.
            os.chmod(self.path, 0o600)
            sock.listen(1)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.listener = sock
        self.loop.watch(sock.fileno(), select.EPOLLIN, self._accept)

    def start_on(self, sock: socket.socket) -> None:
        """Serve `sock`: a listening socket (its path is not ours to unlink) or a connected
        one, whose frontend is the only one this server will have."""
        sock.setblocking(False)
        self._owns_path = False
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            self.listener = sock
            self.loop.watch(sock.fileno(), select.EPOLLIN, self._accept)
        else:
            self._begin(sock)

    def _accept(self, _events: int = 0) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self.session is not None:
            self.refused += 1
            log.info("vhost-user %s: refused a second frontend", self.path)
            conn.close()
            return
        self._begin(conn)

    def _begin(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        self.session = _Session(self, conn)
        self.sessions += 1
        self.loop.watch(conn.fileno(), select.EPOLLIN, self.session.readable)

    def _end(self, session: _Session, reason: str, error: bool = True) -> None:
        if error:
            self.last_error = reason
            log.warning("vhost-user %s: closing the connection: %s", self.path, reason)
        else:
            log.info("vhost-user %s: %s", self.path, reason)
        session.close()
        if self.session is session:
            self.session = None
        if self.on_disconnect is not None:
            self.on_disconnect()

    def close(self) -> None:
        if self.session is not None:
            self._end(self.session, "server closing", error=False)
        if self.listener is not None:
            self.loop.unwatch(self.listener.fileno())
            self.listener.close()
            self.listener = None
            if self._owns_path:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
