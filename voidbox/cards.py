"""The device cores a VmConfig asks for, built the same way for either VMM.

vm.py puts them on virtio-mmio windows of its own KVM VM; qemu.py serves them to QEMU over
vhost-user. Either way a disk is a VirtioBlk on a raw image and a network card is a
VirtioNet on the backend its `--net` entry names (the NAT, a TAP, or the NAT again when
the TAP cannot be used and --net-fallback allows it).
"""

from __future__ import annotations

import copy
from collections.abc import Callable


def open_disk(spec):
    """(VirtioBlk, BlockBackend) for a DiskSpec; the image is locked until the backend closes."""
    from .virtio.blk import BlockBackend, VirtioBlk

    backend = BlockBackend(spec.path, readonly=spec.readonly)
    return VirtioBlk(backend), backend


def open_nic(spec, config, loop, schedule: Callable[[Callable[[], None]], None]):
    """A VirtioNet for a NicSpec, its backend attached and running on `loop`.

    schedule(callback) runs a callback on the loop's thread: call_soon_threadsafe where a
    vCPU thread may call into the card (KVM), call_soon where everything already runs on
    the loop (vhost-user). The first card captures to config.pcap, if given.
    """
    from .net.backend import open_backend
    from .net.config import NatConfig
    from .virtio.net import VirtioNet

    # Each card's NAT is its own: forwards, flow limits and DHCP leases are per card.
    nat = copy.deepcopy(config.nat) if config.nat is not None else NatConfig()
    # The NAT addresses the card's MAC from the start (it also learns it from the guest).
    nat.guest_mac = ":".join(f"{b:02x}" for b in spec.mac)
    backend = open_backend(spec.backend, spec.tap, config.net_fallback, loop, nat, config.policy,
                           tap_fd=getattr(spec, "tap_fd", None))
    capture = None
    if spec.index == 0 and config.pcap is not None:
        from .net.pcap import PcapWriter

        capture = PcapWriter(config.pcap.path, config.pcap.max_bytes)
    device = VirtioNet(backend, spec.mac, nat.mtu, schedule=schedule, pcap=capture)
    # Before the loop runs (forward listeners join it). Host TCP data goes straight into
    # RX buffers unless a capture must see every frame.
    # A TAP reads its frames straight into the card's RX buffers, unless the capture
    # must see them.
    direct = {"card": device} if capture is None and getattr(backend, "reads_into_card", False) else {}
    backend.attach(device.receive, device.rx_room,
                   device.stream_port() if capture is None else None, **direct)
    return device


def card_counters(nics) -> list[dict]:
    """Per network card, in --net order: its name, backend, and the device's counters
    (frames, bytes, drops by reason, offload use, RX starvation) with the backend's."""
    out = []
    for i, nic in enumerate(nics):
        if hasattr(nic, "card_counters"):  # a card whose backend is another process
            backend, counters = nic.card_counters()
            out.append({"card": f"net{i}", "backend": backend, **counters})
            continue
        counters = dict(nic.counters)
        counters.update(getattr(nic.backend, "counters", {}) or {})
        if nic.pcap is not None:
            counters.update(nic.pcap.counters)
        out.append({"card": f"net{i}", "backend": type(nic.backend).__name__, **counters})
    return out
