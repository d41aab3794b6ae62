"""What a guest can reach by default, through `voidbox net run` and Linux's own stack in the
namespace (issue 12's safe defaults): for TCP, UDP and ICMP, the host's loopback (through the
gateway 10.0.2.2) and the host's own addresses are closed unless --host-loopback opens
them; link-local 169.254.0.0/16 (cloud metadata) stays closed even then; and --forward
listens on 127.0.0.1 (seen with ss).

No traffic may leave this machine even if a default regressed: the link-local destination
is an address this test puts on the host's loopback device for its duration, and the
host's own address is one this machine has.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.netns.test_net_run import run
from voidbox.net.config import NatConfig
from voidbox.net.policy import Policy, host_addresses

pytestmark = pytest.mark.netns

PY = sys.executable
WAIT = 3  # seconds a probe waits for an answer; a failure bound, not a timing
LINK_LOCAL = "169.254.77.1"  # on the host's lo while the test runs: never off this machine

PROBE = r"""
import json, socket, subprocess, sys
target, tcp_port, udp_port, wait = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
out = {}
try:
    socket.create_connection((target, tcp_port), timeout=wait).close()
    out["tcp"] = "connected"
except OSError as e:
    out["tcp"] = type(e).__name__
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(wait)
try:
    u.sendto(b"hi", (target, udp_port))
    out["udp"] = "answered" if u.recv(64) == b"hi" else "garbled"
except OSError as e:
    out["udp"] = type(e).__name__
p = subprocess.run(["busybox", "ping", "-c", "1", "-W", str(int(wait)), target],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
out["icmp"] = "answered" if p.returncode == 0 else "no answer"
print(json.dumps(out))
"""


class Services:
    """A TCP and a UDP service on every host address (0.0.0.0), in threads."""

    def __init__(self):
        self.tcp = socket.socket()
        self.tcp.bind(("0.0.0.0", 0))
        self.tcp.listen(8)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("0.0.0.0", 0))
        self.accepted = 0
        self.datagrams = 0
        self.stopping = False
        for target in (self._accept, self._echo):
            threading.Thread(target=target, daemon=True).start()

    def _accept(self):
        while not self.stopping:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def _echo(self):
        while not self.stopping:
            try:
                data, peer = self.udp.recvfrom(64)
                self.datagrams += 1
                self.udp.sendto(data, peer)
            except OSError:
                return

    def close(self):
        self.stopping = True
        self.tcp.close()
        self.udp.close()


@pytest.fixture(scope="module")
def services():
    s = Services()
    yield s
    s.close()


@pytest.fixture(scope="module")
def link_local():
    subprocess.run(["ip", "addr", "add", f"{LINK_LOCAL}/32", "dev", "lo"], check=True)
    yield LINK_LOCAL
    subprocess.run(["ip", "addr", "del", f"{LINK_LOCAL}/32", "dev", "lo"], check=False)


def probe(tmp_path, services, target: str, policy: Policy) -> tuple[dict, dict]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    out = tmp_path / "probe.json"
    argv = ["sh", "-c", f"{PY} {script} {target} {services.tcp.getsockname()[1]} "
                        f"{services.udp.getsockname()[1]} {WAIT} > {out}"]
    rc, counters = run(argv, NatConfig(), policy=policy)
    assert rc == 0
    return json.loads(out.read_text()), counters


def host_address() -> str:
    addrs = [a for a in host_addresses() if a != LINK_LOCAL]
    if not addrs:
        pytest.skip("this host has no address but its loopback")
    return addrs[0]


def test_the_hosts_loopback_is_closed_by_default_for_tcp_udp_and_icmp(tmp_path, services):
    # The gateway stands for the host's 127.0.0.1: the services listen there too.
    got, counters = probe(tmp_path, services, "10.0.2.2", Policy())
    assert got["tcp"] == "ConnectionRefusedError" and got["udp"] == "TimeoutError", got
    assert counters["tcp_denied"] >= 1 and counters["udp_denied"] >= 1, counters
    got, counters = probe(tmp_path, services, "10.0.2.2", Policy(host_loopback=True))
    assert got["tcp"] == "connected" and got["udp"] == "answered", got
    assert "tcp_denied" not in counters and "udp_denied" not in counters, counters
    # The gateway answers pings itself (as libslirp's does): no host service behind it.
    assert got["icmp"] == "answered"


def test_the_hosts_own_addresses_are_closed_by_default_for_tcp_udp_and_icmp(tmp_path, services):
    address = host_address()
    got, counters = probe(tmp_path, services, address, Policy())
    assert got == {"tcp": "ConnectionRefusedError", "udp": "TimeoutError", "icmp": "no answer"}, got
    assert {counters.get(k, 0) >= 1 for k in ("tcp_denied", "udp_denied", "icmp_denied")} == {True}, counters
    got, counters = probe(tmp_path, services, address, Policy(host_loopback=True))
    assert got == {"tcp": "connected", "udp": "answered", "icmp": "answered"}, got


def test_link_local_stays_closed_even_with_host_loopback(tmp_path, services, link_local):
    for policy in (Policy(), Policy(host_loopback=True)):
        got, counters = probe(tmp_path, services, link_local, policy)
        assert got == {"tcp": "ConnectionRefusedError", "udp": "TimeoutError", "icmp": "no answer"}, got
        assert {counters.get(k, 0) >= 1 for k in ("tcp_denied", "udp_denied", "icmp_denied")} == {True}, \
            counters


def listeners(port: int, proto: str) -> list[str]:
    flag = "-ltnH" if proto == "tcp" else "-lunH"
    lines = subprocess.run(["ss", flag, "sport", "=", f":{port}"], capture_output=True,
                           text=True, check=True).stdout.splitlines()
    return [line.split()[3] for line in lines]


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_forwards_listen_on_127_0_0_1_unless_given_an_address():
    tcp, udp = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)
    proc = subprocess.Popen([PY, "-m", "voidbox", "net", "run", "--forward", f"tcp:{tcp}:8080",
                             "--forward", f"udp:{udp}:8081", "--", "sleep", "30"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (listeners(tcp, "tcp") and listeners(udp, "udp")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the forwards never listened"
            time.sleep(0.1)
        assert listeners(tcp, "tcp") == [f"127.0.0.1:{tcp}"]
        assert listeners(udp, "udp") == [f"127.0.0.1:{udp}"]
    finally:
        proc.terminate()
        proc.wait(30)
        proc.stderr.close()
