"""`--net vhost-user:SOCKET`: voidbox's KVM VMM as a vhost-user frontend.

The tiny virtio-net guest (tests/guests/virtio_net.c) runs under /dev/kvm; its card's data
path is served by `voidbox net serve --vhost-user SOCKET` in a process of its own, which
gets the guest's memory, the ring addresses and the queues' ioeventfds as kicks. The guest
gets its DHCP OFFER and ARP reply from that process's NAT. When the backend goes away, the
card's link goes down with one line and the VM keeps running; with --net-reconnect a server
started again on the socket brings it back (the virtio_net_relink guest sees both). passt's
--vhost-user mode serves the same guest (its lenient variant) as a third-party backend.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.kvm.test_virtio_net_guest import (  # noqa: F401
    GUEST_MAC,
    GUEST_TIMEOUT,
    guest_interrupts,
    hex_ip,
    kernel,
)
from voidbox import Vm, VmConfig
from voidbox.errors import UsageError, VoidboxError
from voidbox.net.config import GATEWAY_IP, GATEWAY_MAC, GUEST_IP
from voidbox.vm import StopReason

pytestmark = pytest.mark.kvm


@pytest.fixture
def serve(tmp_path):
    """`voidbox net serve --vhost-user SOCK` in its own process; -> (socket path, process)."""
    sock = tmp_path / "net.sock"
    err = open(tmp_path / "serve.err", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "voidbox", "net", "serve", "--vhost-user",
                             str(sock)], stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert proc.poll() is None, (tmp_path / "serve.err").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield sock, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    err.close()


def test_the_guest_is_served_by_a_backend_in_another_process(kernel, serve, tmp_path):  # noqa: F811
    sock, _proc = serve
    vm = Vm(VmConfig(kernel=kernel, mem="64M", net=[f"vhost-user:{sock}"], mac=GUEST_MAC,
                     timeout=GUEST_TIMEOUT))
    try:
        vm.start()
        reason = vm.wait()
    finally:
        vm.close()
    log = vm.serial_log.getvalue().decode(errors="replace")
    why = f"{vm.stop_message()}\n{log}\n--- serve ---\n{(tmp_path / 'serve.err').read_text()}"
    assert reason is StopReason.POWEROFF, why
    assert "FAIL" not in log and "virtio-net done" in log, why
    lines = log.splitlines()
    assert f"mac={GUEST_MAC}" in lines, why
    assert any(line.startswith(f"dhcp offer yiaddr={hex_ip(GUEST_IP)} ") for line in lines), why
    assert any(line.startswith(f"arp reply ip={hex_ip(GATEWAY_IP)} mac={GATEWAY_MAC} ")
               for line in lines), why
    (card,) = vm.network_counters()
    assert card["backend"] == "VhostUserNic" and card["activations"] == 1, card
    # The backend signalled its used buffers on the card's irqfd itself: the VMM relayed
    # none, the guest took them (its own count) and found them in its rings.
    assert card["interrupts"] == 0 and card["link_down"] == 0, card
    # The guest's kicks (the receiveq's, and one per frame sent) went from KVM's ioeventfd
    # straight to the backend: not one QueueNotify write reached the VMM.
    (transport,) = [t for t in vm.virtio_transports if t.device is vm.nics[0]]
    assert transport.trapped_notifies == 0, transport.trapped_notifies
    assert guest_interrupts(log) >= 1, why  # two irqfd signals may reach the guest as one


def test_a_backend_that_goes_away_takes_the_link_down_not_the_vm(kernel, tmp_path, capfd):  # noqa: F811
    """A frontend-side stand-in backend: it answers the handshake, then closes. The card
    reports link down in one line; the VM itself runs on until its timeout."""
    from tests.unit.test_vhost_user_backend import Rig
    from voidbox.ring import Virtqueue

    sock = tmp_path / "gone.sock"
    rig = Rig(sock, Virtqueue)
    vm = Vm(VmConfig(kernel=kernel, mem="64M", net=[f"vhost-user:{sock}"], mac=GUEST_MAC,
                     timeout=5))
    try:
        import threading

        stop = threading.Event()

        def pump():
            while not stop.is_set():
                rig.loop.run_once(0.01)

        pumper = threading.Thread(target=pump, daemon=True)
        pumper.start()
        vm.start()  # the handshake (features, owner) is done by now
        stop.set()
        pumper.join(5)
        rig.close()  # the backend goes away
        reason = vm.wait()
    finally:
        vm.close()
    assert reason is StopReason.TIMEOUT  # the VM ran on
    (card,) = vm.network_counters()
    assert card["link_down"] == 1, card
    lines = [line for line in capfd.readouterr().err.splitlines() if "link is down" in line]
    assert len(lines) == 1 and str(sock) in lines[0], lines


def test_a_socket_that_is_not_there_is_a_usage_error(kernel, tmp_path):  # noqa: F811
    with pytest.raises(UsageError, match="No such file"):
        VmConfig(kernel=kernel, net=[f"vhost-user:{tmp_path / 'nope.sock'}"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a unix socket"):
        VmConfig(kernel=kernel, net=[f"vhost-user:{tmp_path / 'file'}"])
    # A socket nobody accepts on: one error, when the VM is built.
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead))
    s.close()
    before = len(os.listdir("/proc/self/fd"))
    vm = Vm(VmConfig(kernel=kernel, mem="64M", net=[f"vhost-user:{dead}"], timeout=5))
    with pytest.raises(VoidboxError, match="cannot connect"):
        vm.start()
    # The failed start closed what it had opened (KVM, guest memory, eventfds, the socket).
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.fixture(scope="module")
def guest_variant(tmp_path_factory):
    from tests.guests.build import build_guest

    out = tmp_path_factory.mktemp("guest-variants")
    return lambda name: str(build_guest(name, out))


def test_against_passts_vhost_user_backend(guest_variant, tmp_path):
    """A third-party backend: Debian 13's passt --vhost-user (fetched without touching the
    system, as bench/vhost_user_peers.py does), serving the tiny guest's card through
    voidbox's frontend: passt's DHCP OFFER and ARP reply reach the guest's RX buffers.
    passt offers no GUEST_CSUM yet marks its frames DATA_VALID (virtio 1.2 §5.1.6.4.1 says
    flags must then be zero): the strict guest stops at that, so this is the lenient
    variant, which takes the mark and counts it."""
    from bench.vhost_user_peers import trixie_passt

    prefix, _version = trixie_passt()
    work = tmp_path / "passt"
    work.mkdir()
    work.chmod(0o1777)  # passt drops to nobody before it binds its socket
    sock = work / "passt.sock"
    log = open(tmp_path / "passt.log", "wb")
    passt = subprocess.Popen([*prefix, "-f", "-4", "-a", "10.0.2.15", "-n", "24", "-g",
                              "10.0.2.2", "--no-dhcp-dns", "-s", str(sock), "--vhost-user"],
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert passt.poll() is None, (tmp_path / "passt.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        vm = Vm(VmConfig(kernel=guest_variant("virtio_net_lenient"), mem="64M",
                         net=[f"vhost-user:{sock}"], mac=GUEST_MAC, timeout=GUEST_TIMEOUT))
        try:
            vm.start()
            reason = vm.wait()
        finally:
            vm.close()
    finally:
        passt.terminate()
        passt.wait(10)
        log.close()
    serial = vm.serial_log.getvalue().decode(errors="replace")
    passt_log = (tmp_path / "passt.log").read_text(errors="replace")
    why = f"{serial}\n--- passt ---\n{passt_log}"
    assert reason is StopReason.POWEROFF and "virtio-net done" in serial, why
    assert "DHCP: offer to discover" in passt_log and f"from {GUEST_MAC}" in passt_log, why
    lines = serial.splitlines()
    # passt's offer has no GUEST_CSUM: the driver takes VERSION_1 and MAC.
    assert any(line.startswith("features=") and line.endswith(" driver=0000000100000020")
               for line in lines), why
    assert any(line.startswith(f"dhcp offer yiaddr={hex_ip(GUEST_IP)} type=02 ")
               for line in lines), why
    # passt answers for the gateway with a MAC of its own.
    assert any(line.startswith(f"arp reply ip={hex_ip(GATEWAY_IP)} mac=") for line in lines), why
    assert "rx data_valid unasked=02" in lines, why  # passt's two frames, as above
    (card,) = vm.network_counters()
    assert card["interrupts"] == 0 and card["link_down"] == 0, card  # passt's calls: the irqfd
    assert guest_interrupts(log=serial) >= 1, why


def test_a_killed_backend_restarted_on_its_socket_brings_the_link_back(guest_variant, tmp_path,
                                                                        capfd):
    """`--net-reconnect` against `voidbox net serve` processes: the guest gets its replies,
    the server is killed (SIGKILL, every process of it), the guest sees its link go down
    while the VM runs on, a new server starts on the same socket, and the guest sees the
    link come back and gets the gateway's ARP reply again on the same rings."""
    sock = tmp_path / "net.sock"

    def start_server(name):
        err = open(tmp_path / f"{name}.err", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "voidbox", "net", "serve", "--vhost-user",
                                 str(sock)], stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                start_new_session=True)
        err.close()
        return proc

    def wait_for(predicate, what, timeout=GUEST_TIMEOUT):
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"no {what}:\n{serial()}"
            time.sleep(0.02)

    def listening():
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(sock))
            return True
        except OSError:
            return False
        finally:
            probe.close()

    first = start_server("first")
    second = None
    wait_for(lambda: sock.exists(), "socket from the first server", 30)
    vm = Vm(VmConfig(kernel=guest_variant("virtio_net_relink"), mem="64M",
                     net=[f"vhost-user:{sock}"], net_reconnect=True, mac=GUEST_MAC,
                     timeout=GUEST_TIMEOUT))

    def serial():
        return vm.serial_log.getvalue().decode(errors="replace")

    try:
        vm.start()
        wait_for(lambda: "relink waiting" in serial(), "first ARP reply")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
        wait_for(lambda: "link down" in serial(), "link down")
        assert sock.exists()  # a killed server leaves its socket behind: the next replaces it
        second = start_server("second")
        wait_for(listening, "second server", 30)
        reason = vm.wait()
    finally:
        vm.close()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(10)
    log = serial()
    why = f"{vm.stop_message()}\n{log}\n--- second ---\n{(tmp_path / 'second.err').read_text()}"
    assert reason is StopReason.POWEROFF and "FAIL" not in log and "virtio-net done" in log, why
    lines = log.splitlines()
    order = [next(i for i, line in enumerate(lines) if line.startswith(prefix))
             for prefix in ("arp reply ip=", "relink waiting", "link down", "link up",
                            f"arp again ip={hex_ip(GATEWAY_IP)} mac={GATEWAY_MAC} ")]
    assert order == sorted(order), why
    (card,) = vm.network_counters()
    assert card["link_down"] == 1 and card["reconnects"] == 1, card
    err = capfd.readouterr().err.splitlines()
    assert len([line for line in err if "link is down" in line]) == 1, err
    assert len([line for line in err if "link is up" in line]) == 1, err
