"""`--net vhost-user:SOCKET`: the VM's network card served by a backend in another process
(`voidbox net serve`, passt --vhost-user, any vhost-user-net backend).

The VMM keeps what the guest sees of the card (the virtio-mmio registers, the MAC, MTU and
link status in its config space, which features it offers) and hands the backend the
data path: the guest's memory (SET_MEM_TABLE: the memfd, region by region), each ring's
addresses, and each queue's kick eventfd, the KVM ioeventfd itself, so a guest's kick
wakes the backend without passing through the VMM.

Decisions a reader should know:
- Interrupts: in a KVM VM the backend's call eventfd is the card's irqfd itself
  (use_irqfd), so used buffers interrupt the guest without waking the VMM either.
  virtio-mmio's driver reads InterruptStatus before it looks at its rings, and the VMM
  cannot know when the backend signalled, so the transport reports the used-buffer bit as
  always pending once the driver is up; Linux's vm_interrupt then runs each queue's
  handler, which finds no work on a spurious one. (Without an irqfd, e.g. in unit tests,
  the calls are eventfds the VMM watches and relays through the transport.)
- The control messages run on the thread that drives the transport (a vCPU's MMIO exit at
  DRIVER_OK and reset), blocking, each reply awaited within REPLY_TIMEOUT.
- If the backend goes away (its socket hangs up), the card's link goes down (the STATUS
  field, with a configuration interrupt), one line says so, and the VM keeps running.
  With reconnect (--net-reconnect) the card retries the socket every RECONNECT_INTERVAL
  and, once a backend answers, hands it the rings and brings the link back up.
- The backend is another process, maybe another user's program: every reply is checked
  (its request, its size), and a broken one is an error on this card, never the VMM's.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import sys
import threading

from .._records import replace
from ..errors import VoidboxError
from ..virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING,
    VirtioDevice,
)
from ..virtio.net_defs import (
    DEFAULT_MTU,
    QUEUE_SIZE,
    VIRTIO_ID_NET,
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
    VIRTIO_NET_S_LINK_UP,
)

# The message codec (protocol.py, ~3 ms of imports) and ctypes are imported where a message
# is built: a card's backend process answers well after the VM runs, so a boot that is
# over before its card is used never needs them.

REPLY_TIMEOUT = 10.0
RECONNECT_INTERVAL = 0.5  # seconds between attempts with --net-reconnect
PROTOCOL_FEATURES_BIT = 1 << 30  # protocol.VHOST_USER_F_PROTOCOL_FEATURES
# What the backend may offer the guest through us: the data path's features. MAC, MTU and
# STATUS are the card's config space, which the VMM owns.
BACKEND_FEATURES = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_EVENT_IDX)
                    | (1 << VIRTIO_F_INDIRECT_DESC) | (1 << VIRTIO_NET_F_MRG_RXBUF)
                    | (1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_HOST_TSO4)
                    | (1 << VIRTIO_NET_F_HOST_TSO6) | (1 << VIRTIO_NET_F_GUEST_CSUM)
                    | (1 << VIRTIO_NET_F_GUEST_TSO4) | (1 << VIRTIO_NET_F_GUEST_TSO6))
CONFIG_FEATURES = (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_MTU) | (1 << VIRTIO_NET_F_STATUS)


class BackendGone(VoidboxError):
    """The backend closed its socket, or answered out of turn."""


class VhostUserConnection:
    """The frontend's side of one vhost-user socket: requests out, replies checked."""

    def __init__(self, path: str, sock: socket.socket | None = None):
        """Connect to `path`, or talk over `sock`, already connected (a socketpair's end)."""
        self.path = path
        self.reply_ack = False
        if sock is not None:
            self.sock = sock
            sock.settimeout(REPLY_TIMEOUT)
            return
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(REPLY_TIMEOUT)
        try:
            self.sock.connect(path)
        except OSError as error:
            self.sock.close()
            raise VoidboxError(f"vhost-user:{path}: cannot connect: {error.strerror or error}") from None

    def send(self, msg) -> None:
        """A request (a protocol.Message) without a reply of its own (acknowledged when
        REPLY_ACK is on)."""
        from . import protocol as p

        if self.reply_ack:
            msg = replace(msg, need_reply=True)
        data, fds = p.encode_request(msg)
        try:
            socket.send_fds(self.sock, [data], list(fds))
        except OSError as error:
            raise BackendGone(f"{msg.name}: {error}") from None
        if self.reply_ack:
            (status,) = struct.unpack("<Q", self._reply(msg.request, 8))
            if status:
                raise BackendGone(f"the backend refused {msg.name} ({status})")

    def call(self, msg, size: int) -> bytes:
        """A request (a protocol.Message) whose reply carries `size` bytes of payload."""
        from . import protocol as p

        data, fds = p.encode_request(msg)
        try:
            socket.send_fds(self.sock, [data], list(fds))
        except OSError as error:
            raise BackendGone(f"{msg.name}: {error}") from None
        return self._reply(msg.request, size)

    def _reply(self, request: int, size: int) -> bytes:
        from . import protocol as p

        header = self._recv(p.VHOST_USER_HDR_SIZE)
        got, flags, length = p.HEADER.unpack(header)
        if got != request or not flags & p.VHOST_USER_REPLY_MASK or length != size:
            raise BackendGone(f"a malformed reply to {p.REQUEST_NAMES.get(request, request)}")
        return self._recv(size)

    def _recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            try:
                chunk = self.sock.recv(n - len(data))
            except OSError as error:
                raise BackendGone(f"no reply: {error}") from None
            if not chunk:
                raise BackendGone("the backend closed the connection")
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


class VhostUserNic(VirtioDevice):
    """A virtio-net card whose data path a vhost-user backend serves (see the module doc).

    kicks: each queue's kick eventfd (the VMM's ioeventfd); loop: the network loop, which
    watches the call eventfds and the socket's hang-up (built before the loop runs).
    """

    device_id = VIRTIO_ID_NET
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, path: str, mac: bytes, kicks: list[int], loop, name: str = "net0",
                 mtu: int = DEFAULT_MTU, reconnect: bool = False, process=None, on_error=None):
        """process: a voidbox.vhost_user.child.BackendProcess, the card's own backend on
        the other end of a socketpair (path is then only a name; no reconnect). It is
        still starting: the handshake runs on a thread of its own, the driver's first look
        at the card waits for it, and on_error(VoidboxError) hears if it fails."""
        super().__init__()
        self.path = path
        self.process = process
        # How errors name the backend.
        self.label = (f"vhost-user:{path}" if process is None
                      else f"{name}: the network backend (pid {process.pid})")
        self.mac = bytes(mac)
        self.mtu = mtu
        self.name = name
        self.kicks = list(kicks)
        self.loop = loop
        self.reconnect = reconnect
        self.link_up = True
        self.active = False
        self.counters = {"activations": 0, "resets": 0, "interrupts": 0, "link_down": 0,
                         "reconnects": 0}
        self.pcap = None  # captures are the backend's (net serve --pcap)
        self.backend = self  # network_counters() names the card's backend by its type
        self.calls: list[int] = []
        self._last_refusal: str | None = None  # what the last reconnect attempt said
        # The transport's thread (activate, reset) and the network loop's (hang-up,
        # reconnect) both talk to the backend: one at a time.
        self._lock = threading.RLock()
        self.irqfd: int | None = None  # the VM's, when the backend signals it directly
        self._connected: threading.Event | None = None  # set once a child backend answered
        self._start_error: VoidboxError | None = None
        self._starter: threading.Thread | None = None
        if process is not None:
            self.reconnect = False
            self.conn = VhostUserConnection(path, process.frontend_socket)
            self.backend_features = 0
        else:
            self.conn = VhostUserConnection(path)
            try:
                self.backend_features = self._handshake(self.conn)
            except BaseException:
                self.conn.close()
                raise
        for _queue in self.queue_max_sizes:
            call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.calls.append(call)
            loop.watch(call, select.EPOLLIN, lambda _ev, fd=call: self._called(fd))
        if process is None:
            self._watch_socket()
        else:
            # The VM boots while the backend starts (a Python interpreter and the NAT's
            # imports): start-up costs the VMM only the spawn.
            self._connected = threading.Event()
            self._starter = threading.Thread(target=self._start_child, args=(on_error,),
                                             name=f"{name}-backend", daemon=True)
            self._starter.start()

    def _start_child(self, on_error) -> None:
        try:
            self.process.wait_ready()
            features = self._handshake(self.conn)
        except VoidboxError as error:
            self._start_error = error
            self._connected.set()
            if on_error is not None:
                on_error(error)
            return
        self.backend_features = features
        self._connected.set()
        # From here its hang-up means it ended (a start-up failure is on_error's line).
        self.loop.call_soon_threadsafe(self._watch_socket)

    def wait_backend(self, timeout: float | None = None) -> bool:
        """Whether the card's backend answered (at once for a socket's backend; a child
        backend may still be starting): waits up to `timeout` seconds."""
        if self._connected is not None and not self._connected.wait(timeout):
            return False
        return self._start_error is None

    def _wait_started(self) -> bool:
        """Whether the card has a backend: a child backend is waited for (the driver's
        first look at the card, on a vCPU thread). False if it failed: the VM is stopping."""
        if self._connected is not None and not self._connected.wait(REPLY_TIMEOUT + 30):
            self._start_error = VoidboxError(f"{self.name}: the network backend did not answer")
        return self._start_error is None

    def _handshake(self, conn: VhostUserConnection) -> int:
        """Features, protocol features and ownership; -> the backend's features."""
        from . import protocol as p

        try:
            (features,) = struct.unpack("<Q", conn.call(p.GetFeatures(), 8))
            if not features & (1 << VIRTIO_F_VERSION_1):
                raise VoidboxError(f"{self.label}: the backend does not offer VIRTIO_F_VERSION_1")
            if features & PROTOCOL_FEATURES_BIT:
                (offered,) = struct.unpack("<Q", conn.call(p.GetProtocolFeatures(), 8))
                wanted = 1 << p.VHOST_USER_PROTOCOL_F_REPLY_ACK
                conn.send(p.SetProtocolFeatures(features=offered & wanted))
                conn.reply_ack = bool(offered & wanted)
            conn.send(p.SetOwner())
        except BackendGone as error:
            raise VoidboxError(f"{self.label}: {error}") from None
        return features

    def _watch_socket(self) -> None:
        self._watching_socket = True
        self.loop.watch(self.conn.sock.fileno(), select.EPOLLRDHUP | select.EPOLLHUP, self._hung_up)

    # ---- what the driver sees --------------------------------------------------------------

    @property
    def features(self) -> int:
        self._wait_started()
        return (self.backend_features & BACKEND_FEATURES) | CONFIG_FEATURES

    def config_bytes(self) -> bytes:
        status = VIRTIO_NET_S_LINK_UP if self.link_up else 0
        return self.mac + struct.pack("<HHH", status, 1, self.mtu)

    # ---- the data path, handed over --------------------------------------------------------

    def activate(self, memory, queues, interrupt) -> None:
        with self._lock:
            super().activate(memory, queues, interrupt)
            self.counters["activations"] += 1
            if not self.link_up or not self._wait_started():
                return  # the backend is gone: the guest sees the link down, nothing moves
            try:
                self._hand_over(memory, queues, [0] * len(queues))
                self.active = True
            except BackendGone as error:
                self._link_down(str(error))

    def _hand_over(self, memory, queues, bases) -> None:
        """The data path to the backend: features, memory table, each ring from `bases`."""
        import ctypes

        from . import protocol as p

        conn = self.conn
        acked = self.acked_features & BACKEND_FEATURES
        if self.backend_features & PROTOCOL_FEATURES_BIT:
            acked |= PROTOCOL_FEATURES_BIT
        conn.send(p.SetFeatures(features=acked))
        base = ctypes.addressof(ctypes.c_char.from_buffer(memory.mmap))
        regions = tuple(p.MemoryRegion(guest_phys_addr=r.gpa, memory_size=r.size,
                                       userspace_addr=base + r.offset, mmap_offset=r.offset)
                        for r in memory.regions)
        conn.send(p.SetMemTable(regions=regions, fds=(memory.fd,) * len(regions)))

        def user(gpa: int) -> int:
            return base + memory.translate(gpa)

        for index, ring in enumerate(queues):
            if ring is None:
                continue  # a queue the driver never made ready: the backend keeps it stopped
            conn.send(p.SetVringNum(index=index, num=ring.size))
            conn.send(p.SetVringAddr(index=index, flags=0, desc_user_addr=user(ring.desc_addr),
                                     used_user_addr=user(ring.used_addr),
                                     avail_user_addr=user(ring.avail_addr), log_guest_addr=0))
            conn.send(p.SetVringBase(index=index, num=bases[index]))
            conn.send(p.SetVringCall(index=index, fds=(self._call_fd(index),)))
            conn.send(p.SetVringKick(index=index, fds=(self.kicks[index],)))
            if self.backend_features & PROTOCOL_FEATURES_BIT:
                conn.send(p.SetVringEnable(index=index, enable=True))

    def use_irqfd(self, irqfd: int) -> None:
        """Hand the backend the VM's irqfd as every queue's call, so a used buffer
        interrupts the guest without waking the VMM (the transport then reports the
        used-buffer bit as always pending). Before the driver activates the card."""
        self.irqfd = irqfd
        for fd in self.calls:
            self.loop.unwatch(fd)
            os.close(fd)
        self.calls = []

    def _call_fd(self, index: int) -> int:
        return self.irqfd if self.irqfd is not None else self.calls[index]

    def queue_notify(self, index: int) -> None:
        """A kick that was trapped instead of signalled: pass it on to the backend."""
        if 0 <= index < len(self.kicks):
            os.eventfd_write(self.kicks[index], 1)

    def _called(self, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        if self.interrupt is not None:
            self.counters["interrupts"] += 1
            self.interrupt(VIRTIO_MMIO_INT_VRING)

    def reset(self) -> None:
        """The driver reset the card: the backend stops its rings (GET_VRING_BASE)."""
        with self._lock:
            self._reset()

    def _reset(self) -> None:
        if self.active:
            from . import protocol as p

            self.active = False
            try:
                for index in range(len(self.queue_max_sizes)):
                    self.conn.call(p.GetVringBase(index=index, num=0), p.VRING_STATE.size)
            except BackendGone as error:
                self._link_down(str(error))
        self.counters["resets"] += 1
        super().reset()

    # ---- the backend going away ------------------------------------------------------------

    def _hung_up(self, _events: int = 0) -> None:
        if self._watching_socket:  # level-triggered: once is enough
            self._watching_socket = False
            self.loop.unwatch(self.conn.sock.fileno())
        if self.process is not None:
            self._link_down(self.process.describe_end())
        else:
            self._link_down("the backend closed the connection")

    def _link_down(self, why: str) -> None:
        if not self.link_up:
            return
        self.link_up = False
        self.active = False
        self.counters["link_down"] += 1
        self._last_refusal = None
        self._say(f"{why}; the guest's link is down")
        if self.interrupt is not None:
            self.interrupt(VIRTIO_MMIO_INT_CONFIG)
        if self.reconnect:
            # From the transport's thread too (a refused activation): via the loop.
            self.loop.call_soon_threadsafe(
                lambda: self.loop.call_later(RECONNECT_INTERVAL, self._try_reconnect))

    def _try_reconnect(self) -> None:
        """--net-reconnect: a backend on the same socket again takes the rings where the
        guest's used rings stand (what the old one had taken but not used is offered
        again: RX buffers come back empty, a TX frame may go out twice, as after a NIC
        reset) and the link comes up."""
        if self.link_up or self.conn is None:
            return
        try:
            conn = VhostUserConnection(self.path)
        except VoidboxError:
            self.loop.call_later(RECONNECT_INTERVAL, self._try_reconnect)
            return
        with self._lock:
            try:
                features = self._handshake(conn)
                acked = self.acked_features & BACKEND_FEATURES
                if acked & ~features:
                    raise VoidboxError(f"the new backend lacks features the guest uses ({acked & ~features:#x})")
                old, self.conn = self.conn, conn
                old.close()
                self.backend_features = features
                if self.interrupt is not None and self.memory is not None and self.queues:
                    bases = [0 if ring is None else
                             int.from_bytes(self.memory.read(ring.used_addr + 2, 2), "little")
                             for ring in self.queues]
                    self._hand_over(self.memory, self.queues, bases)
                    self.active = True
            except (VoidboxError, BackendGone) as error:
                if conn is not self.conn:
                    conn.close()
                # Once per outage: a backend that keeps refusing (or one that lacks what
                # the guest uses) is retried quietly, not logged twice a second.
                if self._last_refusal is None:
                    self._last_refusal = str(error)
                    self._say(str(error))
                self.loop.call_later(RECONNECT_INTERVAL, self._try_reconnect)
                return
            self._watch_socket()
            self.link_up = True
            self.counters["reconnects"] += 1
        self._say("is back; the guest's link is up", sep=" ")
        if self.interrupt is not None:
            self.interrupt(VIRTIO_MMIO_INT_CONFIG)

    def _say(self, text: str, sep: str = ": ") -> None:
        """One line on stderr about this card's backend."""
        if self.process is not None:  # the text names the process
            sys.stderr.write(f"voidbox: {self.name}: {text}\n")
        else:
            sys.stderr.write(f"voidbox: {self.name}: vhost-user backend {self.path}{sep}{text}\n")
        sys.stderr.flush()

    def card_counters(self) -> tuple[str, dict]:
        """--stats: the backend's counters (from its process, once it ended) and the card's."""
        if self.process is None:
            return type(self).__name__, dict(self.counters)
        backend, counters = self.process.card_counters()
        counters.update({f"frontend_{k}": v for k, v in self.counters.items()})
        return backend, counters

    def close(self) -> None:
        """After the network loop stopped: nothing watches these fds any more. A child
        backend sees its frontend go and ends; its counters are collected here."""
        if self._starter is not None and self._starter.is_alive():
            self.process.kill()  # still starting: nobody will use it
            self._starter.join()
        self.conn.close()
        for fd in self.calls:
            os.close(fd)
        self.calls = []
        if self.process is not None:
            self.process.finish()
