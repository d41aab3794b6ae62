"""The default guest (Debian's kernel, its virtio drivers and TCP stack) on voidbox's own
devices with `--accel qemu`: QEMU's TCG runs the CPU, voidbox serves the root disk
(vhost-user-blk) and the network card (vhost-user-net, the user-mode NAT) from the test's
process, through voidbox.new_vm as a Python user would.

Each test boots a fresh copy of the root image and drives the guest's shell through the
serial console (GuestShell). Servers the guest talks to listen on 127.0.0.1 only, DNS
included (--dns-upstream points at a test server). A failure shows the serial log's tail.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import re
import socket
import socketserver
import struct
import threading
import time

import pytest

from tests.default_guest import require_default_guest
from voidbox import new_vm
from voidbox.config import VmConfig
from voidbox.image import scratch_copy
from voidbox.net.policy import Policy
from voidbox.vm import StopReason

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

BOOT_TIMEOUT = 120
PROMPT = b"voidbox:~# "
BULK_MIB = 100


@pytest.fixture(scope="module")
def guest():
    return require_default_guest(build=True)


class GuestShell:
    """The guest's root shell on its serial console."""

    def __init__(self, vm):
        self.vm = vm
        self.count = 0

    def wait_prompt(self) -> None:
        assert self.vm.serial_log.wait_for(PROMPT, BOOT_TIMEOUT), self.tail()

    def run(self, command: str, timeout: float = 120) -> tuple[int, str]:
        """Run one shell command line; -> (its exit status, what it printed)."""
        self.count += 1
        # The marker is built by the shell, so the console's echo of the line cannot match.
        tag = f"vbx{self.count}"
        start = len(self.vm.serial_log.getvalue())
        self.vm.serial.enqueue_input(f"{command}; echo @@{tag}' '$?@@\n".encode())
        pattern = re.compile(rf"@@{tag} (\d+)@@".encode())
        deadline = time.monotonic() + timeout
        while True:
            log = self.vm.serial_log.getvalue()[start:]
            match = pattern.search(log)
            if match:
                out = log[:match.start()].decode(errors="replace")
                # Drop the echoed command line.
                out = out.split("\n", 1)[1] if "\n" in out else ""
                return int(match.group(1)), out
            assert time.monotonic() < deadline, f"`{command}` did not finish:\n{self.tail()}"
            assert self.vm.stop_reason is None, f"the VM stopped: {self.vm.stop_message()}\n{self.tail()}"
            self.vm.serial_log.wait_for(b"@@" + tag.encode(), 0.5)

    def tail(self) -> str:
        return self.vm.serial_log.getvalue()[-6000:].decode(errors="replace")


@pytest.fixture
def boot(guest, tmp_path):
    """boot(**VmConfig fields) -> (vm, shell) on a fresh copy of the root image, at the prompt."""
    vms = []

    def start(image=None, **fields):
        if image is None:
            image = scratch_copy(guest.rootfs, tmp_path / f"root{len(vms)}.ext4")
        # The tests' servers listen on the host's loopback (10.0.2.2): open it, as
        # --host-loopback does; the default keeps the host closed.
        fields.setdefault("policy", Policy(host_loopback=True))
        config = VmConfig(kernel=str(guest.vmlinux), initrd=str(guest.initrd), image=str(image),
                          accel="qemu", timeout=600, **fields)
        vm = new_vm(config)
        vms.append(vm)
        vm.start()
        shell = GuestShell(vm)
        shell.wait_prompt()
        return vm, shell

    yield start
    for vm in vms:
        vm.close()



def hashing_sink(host: str):
    """A listener on host that takes one connection on a thread, hashing what it reads:
    -> (listener, thread, its sha256, {"bytes": total} once the peer closes)."""
    sink = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    received = hashlib.sha256()
    got = {}

    def drain():
        conn, _ = sink.accept()
        with conn:
            total = 0
            while chunk := conn.recv(1 << 20):
                received.update(chunk)
                total += len(chunk)
        got["bytes"] = total

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    return sink, drainer, received, got


def serve_http(directory) -> http.server.ThreadingHTTPServer:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Quiet, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_dhcp_lease_ping_and_poweroff(boot):
    vm, shell = boot()
    status, out = shell.run("ip -4 addr show eth0")
    assert status == 0 and "inet 10.0.2.15/24" in out, out
    status, out = shell.run("ping -c 2 -W 5 10.0.2.2")
    assert status == 0 and "2 packets received" in out, out
    # The card's backend is a process of its own (--net-isolation process, the default),
    # asked for its counters while it runs.
    assert vm.network_counters()[0].get("negotiated_mrg_rxbuf") == 1
    vm.serial.enqueue_input(b"poweroff -f\n")
    assert vm.wait(60) is StopReason.POWEROFF, shell.tail()
    assert vm.stop_reason.exit_status == 0


def test_http_get_from_the_host(boot, tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    (www / "hello.txt").write_bytes(b"hello from the host\n")
    server = serve_http(www)
    try:
        _vm, shell = boot()
        port = server.server_address[1]
        status, out = shell.run(f"wget -q -O - http://10.0.2.2:{port}/hello.txt")
    finally:
        server.shutdown()
        server.server_close()
    assert status == 0 and "hello from the host" in out, out


class TinyDns(socketserver.BaseRequestHandler):
    """Answers every A query with 192.0.2.7 (TEST-NET-1), on 127.0.0.1 only."""

    def handle(self):
        data, sock = self.request
        ident, _flags, qdcount = struct.unpack("!HHH", data[:6])
        end = 12
        while data[end]:
            end += data[end] + 1
        question = data[12:end + 5]
        answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton("192.0.2.7")
        sock.sendto(struct.pack("!HHHHHH", ident, 0x8180, qdcount, 1, 0, 0) + question + answer,
                    self.client_address)


def test_dns_lookup_through_an_upstream_on_loopback(boot):
    from voidbox.net.options import config_from_options

    server = socketserver.ThreadingUDPServer(("127.0.0.1", 0), TinyDns)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        nat, policy = config_from_options(None, (), (), (), (f"127.0.0.1:{server.server_address[1]}",),
                                          None, None)  # DNS relays whatever the policy
        _vm, shell = boot(nat=nat, policy=policy)
        status, out = shell.run("nslookup sandbox.test 10.0.2.3")
    finally:
        server.shutdown()
        server.server_close()
    assert status == 0 and "192.0.2.7" in out, out


def test_bulk_tcp_both_ways_with_offloads(boot, tmp_path):
    """100 MiB host -> guest (HTTP) and guest -> host (nc), each with a matching SHA-256;
    the guest negotiated mergeable RX buffers and the checksum/TSO offloads, and used them."""
    www = tmp_path / "www"
    www.mkdir()
    blob = os.urandom(BULK_MIB << 20)
    (www / "blob").write_bytes(blob)
    server = serve_http(www)
    sink, drainer, received, got = hashing_sink("127.0.0.1")
    try:
        vm, shell = boot(mem="768M")
        status, out = shell.run(f"wget -q -O - http://10.0.2.2:{server.server_address[1]}/blob"
                                " | sha256sum", timeout=600)
        assert status == 0 and hashlib.sha256(blob).hexdigest() in out, out
        status, out = shell.run(f"dd if=/dev/urandom of=/dev/shm/up bs=1M count={BULK_MIB} 2>/dev/null"
                                " && sha256sum /dev/shm/up", timeout=600)
        digests = re.findall(r"\b[0-9a-f]{64}\b", out)
        assert status == 0 and digests, out
        digest = digests[-1]
        status, out = shell.run(f"nc 10.0.2.2 {sink.getsockname()[1]} < /dev/shm/up", timeout=600)
        drainer.join(120)
        assert got.get("bytes") == BULK_MIB << 20, (got, out)
        assert received.hexdigest() == digest
        counters = vm.network_counters()[0]
        for feature in ("mrg_rxbuf", "csum", "host_tso4", "guest_csum", "guest_tso4"):
            assert counters.get(f"negotiated_{feature}") == 1, (feature, counters)
        # Used, both ways: TSO segments and partial checksums from the guest, GSO frames
        # spread over mergeable buffers to it.
        assert counters.get("tx_tso_frames", 0) > 0, counters
        assert counters.get("tx_csum_offloaded", 0) > 0, counters
        assert counters.get("rx_gso_frames", 0) > 0, counters
        assert counters.get("rx_merged_frames", 0) > 0, counters
    finally:
        server.shutdown()
        server.server_close()
        sink.close()


def test_port_forward_to_a_server_in_the_guest(boot):
    from voidbox.net.options import config_from_options

    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    nat, policy = config_from_options(None, (f"tcp:127.0.0.1:{port}:8080",), (), (), (), None, None)
    _vm, shell = boot(nat=nat, policy=policy)
    shell.vm.serial.enqueue_input(b"echo served-by-the-guest | nc -l -p 8080 &\n")
    deadline = time.monotonic() + 60
    reply = b""
    while time.monotonic() < deadline and b"served-by-the-guest" not in reply:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                reply = b""
                while chunk := conn.recv(4096):
                    reply += chunk
        except OSError:
            pass
        if b"served-by-the-guest" not in reply:
            time.sleep(0.5)
    assert b"served-by-the-guest" in reply, shell.tail()


def test_a_synced_file_survives_a_reboot_of_the_same_image(boot, tmp_path, guest):
    image = scratch_copy(guest.rootfs, tmp_path / "persistent.ext4")
    vm, shell = boot(image=image)
    status, out = shell.run("echo kept-across-reboots > /root/note && sync")
    assert status == 0, out
    vm.serial.enqueue_input(b"reboot -f\n")
    assert vm.wait(60) is StopReason.RESET, shell.tail()
    assert vm.stop_reason.exit_status == 4
    vm.close()
    _vm2, shell2 = boot(image=image)
    status, out = shell2.run("cat /root/note")
    assert status == 0 and "kept-across-reboots" in out, out


def voidbox_boot(*args, timeout: float = BOOT_TIMEOUT):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "voidbox", "boot", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_the_readme_main_job_with_capture_and_stats(guest, tmp_path):
    """`voidbox boot` with no IMAGE and no --kernel: the default guest on a fresh copy of its
    root disk, through whatever auto picks here; --pcap and --stats as with kvm."""
    import subprocess

    from voidbox.host import choose_accel

    pcap = tmp_path / "guest.pcap"
    result = voidbox_boot("--append", "voidbox.poweroff=1", "--timeout", "120",
                          "--pcap", str(pcap), "--stats")
    why = result.stderr + result.stdout[-4000:]
    assert result.returncode == 0, why
    picked = choose_accel("auto")
    assert f"voidbox: accel {picked.name}: {picked.reason}\n" in result.stderr, why
    assert "voidbox-guest: eth0 10.0.2.15/24" in result.stdout, why
    stats = [line for line in result.stderr.splitlines() if line.startswith("voidbox: net0 (SlirpBackend):")]
    assert len(stats) == 1 and "negotiated_mrg_rxbuf=1" in stats[0] and "dhcp_replies=2" in stats[0], why
    dump = subprocess.run(["tcpdump", "-nr", str(pcap)], capture_output=True, text=True, timeout=30)
    assert "BOOTP/DHCP, Request" in dump.stdout and "BOOTP/DHCP, Reply" in dump.stdout, dump


def test_timeout_and_bad_input_statuses_match_kvm(guest, tmp_path):
    result = voidbox_boot("--accel", "qemu", "--timeout", "2")
    assert result.returncode == 3, result.stderr
    assert result.stderr.splitlines()[-1] == "voidbox: timeout after 2 s", result.stderr
    not_a_kernel = tmp_path / "kernel"
    not_a_kernel.write_bytes(b"\x7fELX" + bytes(4096))
    result = voidbox_boot("--accel", "qemu", "--kernel", str(not_a_kernel), "--timeout", "30")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "is not a bzImage or x86-64 ELF kernel" in result.stderr


def test_the_console_on_a_terminal_under_qemu(guest):
    """Keystrokes reach the guest's shell, Ctrl-C interrupts the guest's command (not
    voidbox), and Ctrl-A x stops the VM with status 0, as under kvm."""
    from tests.kvm.test_interactive_console import Terminal

    term = Terminal(None, ["--accel", "qemu", "--timeout", "300"])
    assert term.expect(PROMPT, BOOT_TIMEOUT), term.seen[-3000:]
    term.type(b"echo $((6 * 7))z\r")
    assert term.expect(b"42z"), term.seen[-3000:]
    term.type(b"sleep 120; echo slept-$((2 + 3))\r")
    time.sleep(1)
    term.type(b"\x03")  # Ctrl-C: the guest's terminal driver interrupts sleep
    term.type(b"echo after-$((1 + 1))\r")
    assert term.expect(b"after-2", 60), term.seen[-3000:]
    assert b"slept-5" not in term.seen
    term.type(b"\x01x")
    status, stderr = term.finish()
    assert status == 0, stderr
    assert stderr.splitlines()[-1] == "voidbox: stopped from the console (Ctrl-A x)", stderr


@pytest.mark.netns
def test_a_tap_card_carries_bulk_tcp_without_copies(guest, tmp_path):
    """--net tap:NAME under qemu, in a namespace the test makes: the guest's frames go to
    the TAP as one writev from guest memory and come back by one readv into its buffers,
    with the kernel's TSO and checksum offloads passed both ways as the driver acked them.
    32 MiB each way between the guest and a server on the TAP's namespace side."""
    from tests.unit.test_tap_backend import inside
    from voidbox.qemu import QemuVm

    name = f"vbq{os.getpid()}"
    subprocess_run(["ip", "netns", "add", name])
    vm = None
    try:
        image = scratch_copy(guest.rootfs, tmp_path / "root.ext4")
        config = VmConfig(kernel=str(guest.vmlinux), initrd=str(guest.initrd), image=str(image),
                          accel="qemu", timeout=600, net=["tap:vbqtap0"], net_fallback="fail")
        with inside(name):  # the TAP (and QEMU) are made in the namespace
            vm = QemuVm(config)
            vm.start()
        subprocess_run(["ip", "-n", name, "addr", "add", "10.77.0.1/24", "dev", "vbqtap0"])
        subprocess_run(["ip", "-n", name, "link", "set", "vbqtap0", "up"])
        shell = GuestShell(vm)
        shell.wait_prompt()  # after the init's DHCP gave up: nobody serves DHCP on a TAP
        status, out = shell.run("ip addr add 10.77.0.2/24 dev eth0 && ip link set eth0 up")
        assert status == 0, out
        size = 32 << 20
        blob = os.urandom(size)
        with inside(name):
            down = socket.create_server(("10.77.0.1", 0))
            up = socket.create_server(("10.77.0.1", 0))
        received = hashlib.sha256()

        def serve_down():
            conn, _ = down.accept()
            with conn:
                conn.sendall(blob)

        def drain_up():
            conn, _ = up.accept()
            with conn:
                while chunk := conn.recv(1 << 20):
                    received.update(chunk)

        threads = [threading.Thread(target=f, daemon=True) for f in (serve_down, drain_up)]
        for thread in threads:
            thread.start()
        status, out = shell.run(f"nc 10.77.0.1 {down.getsockname()[1]} | sha256sum", timeout=300)
        assert status == 0 and hashlib.sha256(blob).hexdigest() in out, out
        status, out = shell.run(f"dd if=/dev/urandom of=/dev/shm/up bs=1M count=32 2>/dev/null"
                                f" && sha256sum /dev/shm/up && nc 10.77.0.1 {up.getsockname()[1]}"
                                " < /dev/shm/up", timeout=300)
        threads[1].join(60)
        assert status == 0 and received.hexdigest() in out, out
        counters = vm.network_counters()[0]
        assert counters["backend"] == "TapBackend", counters
        assert counters["negotiated_guest_tso4"] == 1 and counters["negotiated_host_tso4"] == 1
        # Both ways without a copy of ours, and the offloads used both ways.
        assert counters["tx_direct_frames"] == counters["tx_frames"] > 0, counters
        assert counters["rx_direct_frames"] == counters["rx_frames"] > 0, counters
        assert counters["tx_tso_frames"] > 0 and counters["rx_gso_frames"] > 0, counters
        down.close()
        up.close()
    finally:
        if vm is not None:
            vm.close()
        subprocess_run(["ip", "netns", "del", name])


def subprocess_run(argv) -> None:
    import subprocess

    subprocess.run(argv, check=True)


def test_a_card_on_a_backend_the_user_runs(guest, tmp_path):
    """--net vhost-user:SOCKET under qemu: QEMU connects to the user's `voidbox net serve`
    itself; the guest gets its lease from that process's NAT."""
    import subprocess
    import sys

    sock = tmp_path / "net.sock"
    err = open(tmp_path / "serve.err", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "voidbox", "net", "serve", "--vhost-user",
                             str(sock)], stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        result = voidbox_boot("--accel", "qemu", "--net", f"vhost-user:{sock}",
                              "--append", "voidbox.poweroff=1", "--timeout", "120")
    finally:
        proc.terminate()
        proc.wait(10)
        err.close()
    why = result.stderr + result.stdout[-3000:] + (tmp_path / "serve.err").read_text()
    assert result.returncode == 0, why
    assert "voidbox-guest: eth0 10.0.2.15/24" in result.stdout, why


def test_the_host_and_link_local_are_closed_to_the_guest_by_default(boot):
    """Issue 12's defaults through a real guest: the host's loopback (10.0.2.2) and own
    addresses, and link-local, refused for TCP, UDP and ICMP without --host-loopback.
    The link-local target is an address put on the host's lo for the test, so nothing
    could leave the machine even if a default regressed."""
    import subprocess

    from tests.netns.test_safe_defaults import LINK_LOCAL, Services, host_address

    services = Services()
    subprocess.run(["ip", "addr", "add", f"{LINK_LOCAL}/32", "dev", "lo"], check=True)
    try:
        vm, shell = boot(policy=Policy())
        tcp, udp = services.tcp.getsockname()[1], services.udp.getsockname()[1]
        for target in ("10.0.2.2", host_address(), LINK_LOCAL):
            status, out = shell.run(f"nc -w 3 {target} {tcp} </dev/null")
            assert status != 0 and "refused" in out, (target, out)
            # busybox's UDP client with a port of our choosing: a TFTP read request.
            status, out = shell.run(f"timeout 3 tftp -g -r x -l /tmp/x {target} {udp}")
            assert status != 0, (target, out)
            if target != "10.0.2.2":  # the gateway answers pings itself
                status, out = shell.run(f"ping -c 1 -W 2 {target}")
                assert status != 0, (target, out)
        assert services.accepted == 0 and services.datagrams == 0
        counters = vm.network_counters()[0]  # asked of the card's backend process
        assert counters.get("tcp_denied", 0) >= 3 and counters.get("udp_denied", 0) >= 3, counters
        assert counters.get("icmp_denied", 0) >= 2, counters
    finally:
        subprocess.run(["ip", "addr", "del", f"{LINK_LOCAL}/32", "dev", "lo"], check=False)
        services.close()
