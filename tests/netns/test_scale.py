"""The NAT at scale, through `voidbox net run` (issue 11, "What it must show"):

- 10,000 TCP connections open at once from the namespace to a server on the host's
  127.0.0.1 (10.0.2.2 from the namespace), each exchanging a byte, all succeed; every
  flow and fd of the NAT is released afterwards;
- with --max-flows 100 the 101st connection is refused at once, with a RST (the client
  sees ECONNREFUSED on its first SYN, not after a retransmission or a timeout), and
  --stats counts it.

Both ends are tests/netns/scale_tool.py: the server in its own process on the host, the
client in the namespace. Bounds (SCALE_TIMEOUT, the tool's IO_TIMEOUT) are bounds on
failure; the one timing asserted is the refusal's, against TCP's initial retransmission
timeout of 1 s (RFC 6298 §2.1): a refusal faster than that answered the first SYN.
bench/nat_scale.py measures the NAT's memory per flow and its idle CPU in the same setup.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys

import pytest

from tests.netns.test_net_run import WAIT, run
from tests.netns.test_net_tcp import CountingEngine, assert_clean
from voidbox.net import run as net_run
from voidbox.net.config import NatConfig

pytestmark = pytest.mark.netns

PY = sys.executable
TOOL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scale_tool.py")
GATEWAY = "10.0.2.2"
CONNECTIONS = 10_000
FLOW_LIMIT = 100
SCALE_TIMEOUT = 600  # seconds any of the tool's processes may live: a bound on failure
SERVER_START_WAIT = 60
BARRIER = f"busybox ping -c1 -W{WAIT} {GATEWAY} >/dev/null"
INITIAL_RTO = 1.0  # seconds (RFC 6298 §2.1): when an unanswered SYN is sent again


@pytest.fixture(autouse=True)
def tcp_counters(monkeypatch):
    monkeypatch.setattr(net_run, "Engine", CountingEngine)


class Server:
    """scale_tool.py serve N on the host's 127.0.0.1, in its own process."""

    def __init__(self, n: int):
        env = dict(os.environ, SCALE_TIMEOUT=str(SCALE_TIMEOUT))
        self.proc = subprocess.Popen([PY, TOOL, "serve", str(n)], stdout=subprocess.PIPE,
                                     text=True, env=env)
        ready, _, _ = select.select([self.proc.stdout], [], [], SERVER_START_WAIT)
        line = self.proc.stdout.readline() if ready else ""
        if not line.strip().isdigit():
            self.close()
            pytest.fail(f"the host server did not start: {line!r}")
        self.port = int(line)

    def summary(self) -> dict:
        out, _ = self.proc.communicate(timeout=SERVER_START_WAIT)
        assert self.proc.returncode == 0, out
        return json.loads(out.splitlines()[-1])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def server():
    started = []

    def start(n: int) -> Server:
        started.append(Server(n))
        return started[-1]

    yield start
    for s in started:
        s.close()


def client_command(*args) -> list[str]:
    return ["sh", "-c", f"SCALE_TIMEOUT={SCALE_TIMEOUT} {PY} {TOOL} "
            + " ".join(map(str, args)) + f" && {BARRIER}"]


@pytest.mark.slow
def test_ten_thousand_concurrent_connections_each_exchange_a_byte(tmp_path, server):
    srv = server(CONNECTIONS)
    out = tmp_path / "client.json"
    # run() checks that every flow, watch and fd of the NAT is gone afterwards.
    rc, counters = run(client_command("client", GATEWAY, srv.port, CONNECTIONS, out),
                       NatConfig())
    assert rc == 0
    got = json.loads(out.read_text())
    assert (got["open"], got["failed"], got["eof"]) == (CONNECTIONS, 0, CONNECTIONS), got
    assert srv.summary() == {"accepted": CONNECTIONS, "echoed": CONNECTIONS,
                             "closed": CONNECTIONS}
    assert_clean(counters, CONNECTIONS)
    print(f"\n{CONNECTIONS} connections open in {got['open_seconds']:.1f} s, "
          f"all closed {got['seconds']:.1f} s after the first")


def test_the_connection_past_max_flows_is_reset_at_once_and_counted(tmp_path, server):
    srv = server(FLOW_LIMIT)
    out = tmp_path / "limit.json"
    result = subprocess.run(
        [PY, "-m", "voidbox", "net", "run", "--host-loopback", "--max-flows", str(FLOW_LIMIT), "--stats", "--",
         *client_command("limit", GATEWAY, srv.port, FLOW_LIMIT, out)],
        capture_output=True, text=True, timeout=SCALE_TIMEOUT)
    assert result.returncode == 0, result.stderr
    got = json.loads(out.read_text())
    assert (got["open"], got["failures"], got["eof"]) == (FLOW_LIMIT, [], FLOW_LIMIT), got
    assert got["extra"] == "refused", got  # ECONNREFUSED: a RST, not silence
    assert got["extra_seconds"] < INITIAL_RTO, got  # the first SYN was answered
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("voidbox: net run: ")]
    fields = dict(item.split("=", 1) for item in line[len("voidbox: net run: "):].split())
    assert fields["tcp_flow_limit"] == "1", line
    assert fields["tcp_flows_opened"] == str(FLOW_LIMIT), line
    assert srv.summary()["closed"] == FLOW_LIMIT
    print(f"\nconnection {FLOW_LIMIT + 1} refused in {got['extra_seconds'] * 1e3:.2f} ms")
