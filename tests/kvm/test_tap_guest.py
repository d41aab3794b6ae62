"""`--net tap:NAME` under /dev/kvm: the virtio_net guest's card on a TAP in a namespace the
test makes, with the user-mode NAT playing the far end of the wire.

The test makes a persistent TAP in the namespace and the VM opens it from inside. There an AF_PACKET
socket on the TAP hands each frame the guest sends to a NAT Engine, and writes the
Engine's replies back onto the TAP: the guest's DHCP DISCOVER and ARP request cross the TAP
one way, the OFFER and the ARP reply the other, and the guest powers off when it has both.
"""

from __future__ import annotations

import socket
import threading

import pytest

from tests.guests.build import build_guest
from tests.unit.test_tap_backend import inside, ns  # noqa: F401 (the ns fixture)
from voidbox import Vm, VmConfig
from voidbox.eventloop import LoopThread
from voidbox.net.config import NatConfig
from voidbox.net.engine import Engine
from voidbox.vm import StopReason

pytestmark = [pytest.mark.kvm, pytest.mark.netns]

TAP = "vbguest0"
GUEST_TIMEOUT = 60  # seconds; a bound for a hung guest, not a measurement
GUEST_MAC = "02:76:6f:69:64:01"
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4  # linux/if_packet.h: a frame this host sent (the NAT's own replies)


class FarEnd:
    """The namespace's side of the TAP: frames from the guest go to a NAT Engine, its
    replies go back onto the TAP."""

    def __init__(self, ns_name: str):
        with inside(ns_name):
            self.raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            self.raw.bind((TAP, 0))
        self.raw.settimeout(0.2)
        self.seen: list[bytes] = []
        self.thread = LoopThread("far-end")
        self.engine = Engine(NatConfig(), self.thread.loop, self.raw.send)
        self.stopping = False
        self.reader = threading.Thread(target=self._read, daemon=True)

    def start(self):
        self.thread.start()
        self.reader.start()

    def _read(self):
        while not self.stopping:
            try:
                frame, addr = self.raw.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:  # ENETDOWN: the VM closed and its TAP went with it
                return
            if addr[2] == PACKET_OUTGOING:
                continue
            self.seen.append(frame)
            self.thread.loop.call_soon_threadsafe(lambda f=frame: self.engine.guest_frame(f))

    def close(self):
        self.stopping = True
        self.reader.join()
        self.thread.stop()
        self.engine.close()
        self.thread.close()
        self.raw.close()


@pytest.mark.parametrize("isolation", ["process", "none"])
def test_the_guest_talks_through_a_tap(tmp_path, ns, isolation):  # noqa: F811 (the fixture)
    """The VMM opens the TAP either way; with isolation it hands the fd to the card's
    backend process."""
    import subprocess

    kernel = str(build_guest("virtio_net", tmp_path))
    vm = Vm(VmConfig(kernel=kernel, mem="64M", net=[f"tap:{TAP}"], net_fallback="fail",
                     mac=GUEST_MAC, timeout=GUEST_TIMEOUT, net_isolation=isolation))
    far = None
    try:
        # The TAP exists, is up and has the far end listening before the VM opens it: the
        # guest sends its DISCOVER once, at once, and a frame written to a TAP nobody
        # reads yet (or that is still down) is lost.
        subprocess.run(["ip", "-n", ns, "tuntap", "add", "dev", TAP, "mode", "tap"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", TAP, "up"], check=True)
        far = FarEnd(ns)
        far.start()
        with inside(ns):
            vm.start()  # opens the namespace's persistent TAP
        reason = vm.wait()
    finally:
        vm.close()
        if far is not None:
            far.close()
    log = vm.serial_log.getvalue().decode(errors="replace")
    (counters,) = vm.network_counters()  # the device's and the TAP's, wherever they ran
    why = f"{vm.stop_message()}\n--- serial ---\n{log}\n--- card ---\n{counters}"
    assert reason is StopReason.POWEROFF, why
    assert "FAIL" not in log and "virtio-net done" in log, why
    assert "dhcp offer yiaddr=0a00020f" in log, why
    assert any(f[6:12] == bytes.fromhex(GUEST_MAC.replace(":", "")) for f in far.seen), why
    assert counters["backend"] == "TapBackend", why
    assert counters["tap_tx_frames"] >= 2 and counters["tap_rx_frames"] >= 2, why
