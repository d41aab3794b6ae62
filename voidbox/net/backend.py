"""Network backends behind one frame contract: what a NIC (virtio-net today, a vhost-user
device later) hands its guest's frames to, and takes frames for the guest from.

A backend never sees virtio. The NIC calls `attach(deliver)` once, then
`guest_frame(frame, csum_verified)` for each frame the guest sends (csum_verified: the
guest offloaded the TCP/UDP checksum at the packet's own header, so it is not checked).
The backend calls `deliver(frame)` on its I/O thread for each frame for the guest; deliver
copies it (or queues a copy) before it returns, so the backend may reuse its buffer.
`accepts_partial_checksums` and `accepts_tso4` say which guest offloads it takes.
"""

from __future__ import annotations

from collections.abc import Callable

from voidbox.net.config import NatConfig
from voidbox.net.loop import EventLoop
from voidbox.net.policy import Policy


class SlirpBackend:
    """The user-mode NAT (voidbox.net.engine) as a NIC's backend, on `loop`'s thread."""

    # The engine relays payloads and never forwards packets: a partial checksum at the
    # packet's own header needs no check, and a 64 KiB TSO segment is one host send.
    accepts_partial_checksums = True
    accepts_tso4 = True

    def __init__(self, loop: EventLoop, config: NatConfig, policy: Policy | None = None):
        self.loop = loop
        self.config = config
        self.policy = policy
        self.engine = None

    def attach(self, deliver: Callable[[bytes | memoryview], object]) -> None:
        from voidbox.net.engine import Engine

        # borrow=True: deliver copies the frame into guest memory or its backlog at once.
        self.engine = Engine(self.config, self.loop, deliver, self.policy, borrow=True)

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

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


class NullBackend:
    """`--net none` with a NIC anyway (tests): frames from the guest are counted, dropped."""

    accepts_partial_checksums = True
    accepts_tso4 = True

    def __init__(self):
        self.frames = 0

    def attach(self, deliver) -> None:
        self.deliver = deliver

    def guest_frame(self, frame, csum_verified: bool = False) -> None:
        self.frames += 1

    def close(self) -> None:
        pass
