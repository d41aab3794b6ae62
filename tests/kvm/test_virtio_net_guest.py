"""virtio-net end to end under the real /dev/kvm: tests/guests/virtio_net.c as the driver,
voidbox's user-mode NAT as the network.

The guest finds the NIC at layout.VIRTIO_MMIO_BASE (no disk image, so it is slot 0),
negotiates VERSION_1 and MAC only, sets up receiveq and transmitq, sends a DHCP DISCOVER
and an ARP request for the gateway, and waits in HLT for the NAT's OFFER and ARP reply in
its RX buffers. Kicks must reach the device through the KVM ioeventfd (never the trapped
QueueNotify register) and used buffers must be announced through the irqfd on GSI 5. The
serial log and the counters are attached to every failure.
"""

import pytest

from tests.guests.build import build_guest, disassemble
from voidbox import Vm, VmConfig
from voidbox.net.config import GATEWAY_IP, GATEWAY_MAC, GUEST_IP
from voidbox.virtio.device import VIRTIO_F_VERSION_1
from voidbox.virtio.net import VIRTIO_ID_NET, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF
from voidbox.vm import StopReason

pytestmark = pytest.mark.kvm

GUEST_TIMEOUT = 60  # seconds; a bound for a hung guest, not a measurement
GUEST_MAC = "02:76:6f:69:64:01"  # locally administered, and not the NAT's default guest MAC
DHCPOFFER = 2  # RFC 2132 §9.6
FRAMES_SENT = 2  # the DISCOVER and the ARP request: one kick each


def hex_ip(dotted):
    return "".join(f"{int(part):02x}" for part in dotted.split("."))


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    return str(build_guest("virtio_net", tmp_path_factory.mktemp("guests")))


@pytest.fixture(scope="module", params=["process", "none"])
def booted(kernel, request):
    """The NAT in a child `voidbox net serve` over vhost-user (the default), and inside
    the VMM (--net-isolation none)."""
    vm = Vm(VmConfig(kernel=kernel, mem="64M", net=["slirp"], mac=GUEST_MAC,
                     timeout=GUEST_TIMEOUT, net_isolation=request.param))
    try:
        vm.start()
        reason = vm.wait()
    finally:
        vm.close()
    return vm, reason, vm.serial_log.getvalue().decode(errors="replace")


def nic_transport(vm):
    (transport,) = [t for t in vm.virtio_transports if t.device.device_id == VIRTIO_ID_NET]
    return transport


def guest_interrupts(log: str) -> int:
    """The used-buffer interrupts the guest counted ('rx frames=.. interrupts=NN vring=..')."""
    import re

    match = re.search(r"^rx frames=\w+ tx used=\w+ interrupts=(\w+) vring=\w+$", log, re.M)
    return int(match.group(1), 16) if match else -1


def report(vm, log):
    """The serial log and every counter, for an assertion message."""
    transport = nic_transport(vm)
    return (f"{vm.stop_message()}\n--- serial ---\n{log}\n--- transport ---\n"
            f"notifies={transport.notifies} trapped={transport.trapped_notifies} "
            f"interrupts={transport.interrupts_signalled} "
            f"queue_errors={transport.queue_errors}\n"
            f"--- card (device and NAT) ---\n{vm.network_counters()}")


def test_guest_gets_a_dhcp_offer_and_the_gateway_mac(booted):
    vm, reason, log = booted
    why = report(vm, log)
    assert reason is StopReason.POWEROFF, why
    assert "FAIL" not in log, why
    lines = log.splitlines()
    features = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC)
    for line in [
        "virtio-net magic=74726976 version=00000002 device=00000001",
        f"mac={GUEST_MAC}",
        "queue 0 max=0100 size=0008",
        "queue 1 max=0100 size=0008",
        "virtio-net done",
    ]:
        assert line in lines, why
    assert any(line.startswith("features=") and line.endswith(f" driver={features:016x}")
               for line in lines), why
    assert any(line.startswith(f"dhcp offer yiaddr={hex_ip(GUEST_IP)} type={DHCPOFFER:02x} ")
               for line in lines), why
    assert any(line.startswith(f"arp reply ip={hex_ip(GATEWAY_IP)} mac={GATEWAY_MAC} ")
               for line in lines), why
    # The device offered mergeable buffers, and saw the driver decline them.
    transport = nic_transport(vm)
    assert transport.device.features & (1 << VIRTIO_NET_F_MRG_RXBUF), why
    assert transport.device.acked_features == features, why


def test_kicks_come_through_the_ioeventfd_and_interrupts_through_the_irqfd(booted):
    vm, reason, log = booted
    why = report(vm, log)
    assert reason is StopReason.POWEROFF, why
    transport = nic_transport(vm)
    assert transport.trapped_notifies == 0, why
    if vm.config.net_isolation == "none":
        # Every kick (the RX one after DRIVER_OK, then one per frame sent) came through
        # the KVM ioeventfd, served on the network thread ...
        assert transport.notifies >= FRAMES_SENT, why
        # The used buffers were announced through the irqfd: at least the OFFER and the
        # ARP reply (TX completions may share an interrupt with them).
        assert transport.interrupts_signalled >= 2, why
    else:
        # ... or, with the backend in its own process, the ioeventfd is that process's
        # kick and the irqfd its call: the VMM woke for no frame either way, while the
        # backend's device served every frame and the guest took its interrupts.
        assert transport.notifies == 0, why
        assert transport.device.counters["interrupts"] == 0, why  # none relayed
        assert transport.interrupts_signalled == 0, why
        assert vm.network_counters()[0]["tx_frames"] == FRAMES_SENT, why
        # The OFFER and the ARP reply came by interrupt: two signals of the irqfd may reach
        # the guest as one.
        assert guest_interrupts(log) >= 1, why
    assert transport.queue_errors == 0, why


def test_device_and_nat_counters_show_the_exchange(booted):
    vm, _reason, log = booted
    why = report(vm, log)
    (counters,) = vm.network_counters()  # the device's and the NAT's, wherever they ran
    assert counters["backend"] == "SlirpBackend", why
    assert counters["tx_frames"] == FRAMES_SENT, why
    assert counters["rx_frames"] >= 2, why
    assert not [name for name in counters if name.startswith(("tx_drop", "rx_drop"))], why
    assert counters.get("rx_buffer_too_small", 0) == 0, why
    assert counters.get("dhcp_replies") == 1, why
    assert counters.get("arp_replies") == 1, why


def test_the_guest_uses_no_sse(kernel):
    text = disassemble(kernel)
    assert "<guest_main>" in text
    assert not [line for line in text.splitlines() if "%xmm" in line or "%ymm" in line]


def test_pcap_of_the_vms_card_shows_the_dhcp_exchange(kernel, tmp_path):
    """`boot --pcap FILE`: every frame the guest's card carries, both ways, in a file
    tcpdump reads (issue 9: the DISCOVER and the NAT's OFFER, the ARP request and reply)."""
    import subprocess

    from voidbox.net.pcap import PcapSpec

    capture = tmp_path / "vm.pcap"
    vm = Vm(VmConfig(kernel=kernel, mem="64M", net=["slirp"], mac=GUEST_MAC,
                     timeout=GUEST_TIMEOUT, pcap=PcapSpec(str(capture), 1 << 20)))
    try:
        vm.start()
        reason = vm.wait()
    finally:
        vm.close()
    log = vm.serial_log.getvalue().decode(errors="replace")
    assert reason is StopReason.POWEROFF, report(vm, log)
    shown = subprocess.run(["tcpdump", "-nn", "-v", "-r", str(capture)], capture_output=True,
                           text=True, timeout=30, check=True).stdout
    assert "DHCP-Message (53), length 1: Discover" in shown, shown
    assert "DHCP-Message (53), length 1: Offer" in shown, shown
    assert f"Request who-has {GATEWAY_IP} tell {GUEST_IP}" in shown, shown
    assert f"Reply {GATEWAY_IP} is-at {GATEWAY_MAC}" in shown, shown
    assert oct(capture.stat().st_mode & 0o777) == "0o600"


def test_boot_stats_prints_each_cards_counters(kernel):
    """`voidbox boot --stats`: one line per card at exit, with the device's and the NAT's
    counters; Vm.network_counters() gives the same from Python."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "voidbox", "boot", "--accel", "kvm", "--kernel", kernel, "--mem", "64M",
         "--mac", GUEST_MAC, "--timeout", str(GUEST_TIMEOUT), "--stats"],
        capture_output=True, text=True, timeout=GUEST_TIMEOUT + 30, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("voidbox: net0 ")]
    fields = dict(item.split("=") for item in line.split("): ", 1)[1].split())
    assert line.startswith("voidbox: net0 (SlirpBackend): "), line
    assert fields["tx_frames"] == str(FRAMES_SENT) and int(fields["rx_frames"]) >= 2, line
    assert fields["dhcp_replies"] == "1" and fields["arp_replies"] == "1", line
