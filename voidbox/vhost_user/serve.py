"""`voidbox net serve --vhost-user SOCKET`: the NAT's virtio-net card, served to a frontend.

The card is the VMM's VirtioNet on a SlirpBackend, on one EventLoop in this thread, behind
a VhostUserServer. SIGINT and SIGTERM stop it: the connection closes, the socket is
unlinked, and the exit status is 0.
"""

from __future__ import annotations

import signal

from ..eventloop import EventLoop
from .backend import VhostUserServer


def serve_net(path: str, config, policy=None, capture=None) -> int:
    from ..net.backend import SlirpBackend
    from ..net.config import parse_mac
    from ..virtio.net import VirtioNet

    loop = EventLoop()
    writer = None
    if capture is not None:
        from ..net.pcap import PcapWriter

        writer = PcapWriter(capture.path, capture.max_bytes)
    backend = SlirpBackend(loop, config, policy)
    device = VirtioNet(backend, parse_mac(config.guest_mac), config.mtu, schedule=loop.call_soon,
                       pcap=writer)
    backend.attach(device.receive, device.rx_room, device.stream_port() if writer is None else None)
    # A frontend that goes away takes its guest's flows with it (host sides reset).
    server = VhostUserServer(device, path, loop, on_disconnect=backend.drop_flows)
    previous = {sig: signal.signal(sig, lambda *_: loop.stop()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        loop.run()
    finally:
        server.close()
        device.close()
        loop.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
