"""The KVM VMM's vhost-user frontend (voidbox.vhost_user.frontend.VhostUserNic) against an
in-process backend on a real socket: voidbox's own VhostUserServer over the NAT, pumped on
a thread of its own, as `voidbox net serve` would run it in another process.

The guest side is the driver mock writing real rings into a memfd GuestMemory; kicks are
eventfds, as the VMM's ioeventfds are. The backend goes away and comes back: with
reconnect, the card hands the new one the rings where the used rings stand and the link
comes back up; without, it stays down.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from types import SimpleNamespace

import pytest

from tests.unit.test_vhost_user_backend import MAC, Rig, arp_request
from tests.virtio_driver import Driver
from voidbox.eventloop import LoopThread
from voidbox.memory import GuestMemory
from voidbox.net.packets import ARPOP_REPLY, ETH_P_ARP, parse_arp
from voidbox.ring import Virtqueue
from voidbox.vhost_user.frontend import VhostUserNic
from voidbox.virtio.device import VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_CONFIG
from voidbox.virtio.net import VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_HDR_LEN, VIRTIO_NET_S_LINK_UP

QSIZE = 64
WAIT = 10.0  # seconds: a bound for a failure, not a measurement


class Backend:
    """An in-process vhost-user server (voidbox's, on the NAT) pumped on its own thread."""

    def __init__(self, path):
        self.rig = Rig(path, Virtqueue)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self):
        while not self._stop.is_set():
            self.rig.loop.run_once(0.01)

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.rig.close()


class Guest:
    """The driver's side: rings in guest memory, and what the card's interrupt said."""

    def __init__(self, memory):
        self.memory = memory
        self.rx = Driver(memory, size=QSIZE)
        self.tx = Driver(memory, size=QSIZE, desc_addr=0x50_0000, avail_addr=0x60_0000,
                         used_addr=0x70_0000)
        self.tx._data_next += 8 << 20
        self.interrupts = []

    def queues(self):
        return tuple(SimpleNamespace(size=d.size, desc_addr=d.desc_addr, avail_addr=d.avail_addr,
                                     used_addr=d.used_addr) for d in (self.rx, self.tx))

    def interrupt(self, kind):
        self.interrupts.append(kind)


def arp_through(nic, guest, kicks) -> bool:
    """The guest ARPs for the gateway; True once the NAT's reply is in an RX buffer."""
    guest.tx.add_buffers(readable=[bytes(VIRTIO_NET_HDR_LEN) + arp_request()])
    os.eventfd_write(kicks[1], 1)
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        for head, length in guest.rx.collect():
            frame = guest.memory.read(guest.rx.read_desc(head)[0], length)[VIRTIO_NET_HDR_LEN:]
            if int.from_bytes(frame[12:14], "big") == ETH_P_ARP and \
                    parse_arp(frame[14:]).op == ARPOP_REPLY:
                return True
        time.sleep(0.01)
    return False


def wait_until(predicate) -> bool:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@contextlib.contextmanager
def card_on_a_backend(tmp_path, reconnect: bool):
    """A VhostUserNic on its loop thread, an in-process backend serving it and the guest's
    rings in memory; everything closed after (the backend the test left in rig.backend)."""
    rig = SimpleNamespace(path=tmp_path / "net.sock")
    rig.backend = Backend(rig.path)
    loop = LoopThread("net")
    rig.memory = GuestMemory(32 << 20)
    rig.kicks = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
    rig.nic = VhostUserNic(str(rig.path), MAC, rig.kicks, loop.loop, reconnect=reconnect)
    loop.start()
    rig.guest = Guest(rig.memory)
    try:
        yield rig
    finally:
        loop.stop()
        rig.nic.close()
        loop.close()
        rig.backend.close()
        for fd in rig.kicks:
            os.close(fd)
        rig.memory.close()


@pytest.mark.parametrize("reconnect", [True, False], ids=["reconnect", "no-reconnect"])
def test_a_backend_that_goes_and_comes_back(tmp_path, capfd, reconnect):
    with card_on_a_backend(tmp_path, reconnect) as rig:
        nic, guest, kicks = rig.nic, rig.guest, rig.kicks
        nic.acked_features = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MRG_RXBUF)
        for _ in range(8):
            guest.rx.add_buffers(writable=[2048])
        nic.activate(rig.memory, guest.queues(), guest.interrupt)
        assert arp_through(nic, guest, kicks)

        rig.backend.close()  # the backend process dies
        # The link goes down, then the configuration interrupt tells the driver.
        assert wait_until(lambda: VIRTIO_MMIO_INT_CONFIG in guest.interrupts)
        assert not nic.link_up
        status = int.from_bytes(nic.config_bytes()[6:8], "little")
        assert status & VIRTIO_NET_S_LINK_UP == 0

        rig.backend = Backend(rig.path)  # a new one on the same socket
        if reconnect:
            assert wait_until(lambda: guest.interrupts.count(VIRTIO_MMIO_INT_CONFIG) == 2), \
                capfd.readouterr().err
            assert nic.link_up and nic.counters["reconnects"] == 1
            for _ in range(8):
                guest.rx.add_buffers(writable=[2048])
            assert arp_through(nic, guest, kicks)  # the data path is back
        else:
            time.sleep(1.5)  # three reconnect intervals: nothing happens
            assert not nic.link_up and nic.counters["reconnects"] == 0
        err = capfd.readouterr().err.splitlines()
        assert len([line for line in err if "the guest's link is down" in line]) == 1, err
        assert len([line for line in err if "the guest's link is up" in line]) == int(reconnect), err


def test_a_backend_that_keeps_refusing_is_retried_quietly(tmp_path, capfd):
    """--net-reconnect against something on the socket that hangs up on every handshake:
    the card keeps trying (the link stays down) and says why once, not twice a second."""
    import socket

    path = tmp_path / "net.sock"
    backend = Backend(path)
    loop = LoopThread("net")
    kicks = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
    nic = VhostUserNic(str(path), MAC, kicks, loop.loop, reconnect=True)
    loop.start()
    rude = socket.socket(socket.AF_UNIX)
    try:
        backend.close()
        assert wait_until(lambda: not nic.link_up)
        rude.bind(str(path))
        rude.listen(16)
        rude.settimeout(0.1)
        attempts = 0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # accept and hang up, at every attempt
            try:
                conn, _ = rude.accept()
            except TimeoutError:
                continue
            conn.close()
            attempts += 1
        assert attempts >= 3 and not nic.link_up
        err = capfd.readouterr().err.splitlines()
        refusals = [line for line in err if "vhost-user backend" in line and "link is" not in line]
        assert len(refusals) == 1, err
    finally:
        loop.stop()
        nic.close()
        loop.close()
        rude.close()
        for fd in kicks:
            os.close(fd)


def test_the_frontend_s_numbers_are_the_codec_s():
    # The frontend keeps the codec out of its imports; the bit it copies must not drift.
    from voidbox.vhost_user import frontend, protocol

    assert frontend.PROTOCOL_FEATURES_BIT == 1 << protocol.VHOST_USER_F_PROTOCOL_FEATURES


def test_building_the_frontend_imports_neither_the_data_path_nor_the_codec():
    # Start-up: a boot that ends before its card's backend answers never needs them.
    import subprocess
    import sys

    code = ("import sys\nimport voidbox.vm, voidbox.vhost_user.frontend\n"
            "print(sorted(m for m in ('voidbox.virtio.net', 'voidbox.vhost_user.protocol', 'ctypes')"
            " if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_driver_ok_with_a_queue_never_made_ready_is_not_an_error(tmp_path, capfd):
    """The guest may set DRIVER_OK without readying every queue (the transport then hands
    the card None for it): that card does not run, a backend that comes back takes the
    rings there are, and the VM goes on."""
    with card_on_a_backend(tmp_path, reconnect=True) as rig:
        nic, guest = rig.nic, rig.guest
        nic.acked_features = 1 << VIRTIO_F_VERSION_1
        nic.activate(rig.memory, (None, guest.queues()[1]), guest.interrupt)
        assert nic.link_up
        rig.backend.close()
        assert wait_until(lambda: not nic.link_up)
        rig.backend = Backend(rig.path)
        assert wait_until(lambda: nic.link_up), capfd.readouterr().err
        assert nic.counters["reconnects"] == 1
        nic.reset()
        nic.activate(rig.memory, guest.queues(), guest.interrupt)  # a proper start after a reset
        for _ in range(8):
            guest.rx.add_buffers(writable=[2048])
        assert arp_through(nic, guest, rig.kicks)
