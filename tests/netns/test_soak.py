"""Soak: rounds of short TCP connections and a UDP flood through `voidbox net run`; after
every round the NAT's fds, flows and memory must come back to where the first round left
them (issue 8, defect 9: closed flows were kept until a full garbage collection).

The NAT is a process of its own, sandboxed (`voidbox-nat`, a descendant of this one), so a
watcher thread here reads its numbers from outside: VmRSS from /proc/PID/status and its
open fds from /proc/PID/fd. Every flow holds one host socket, so the fds above the NAT's
idle count are its flows. The client in the namespace and the watcher take turns through
files in a scratch directory: the client writes done.N after round N and waits for go.N,
which the watcher writes once it has measured. Memory must come back by reference
counting: the NAT collects rarely (net/run.py's _quiet_gc).

Servers listen on the host's 127.0.0.1 only (10.0.2.2 from the namespace), in their own
process. Bounds: every wait is bounded (SETTLE_MAX, ROUND_WAIT); none is asserted as a
timing.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tests.netns.test_net_run import run
from voidbox.net.config import NatConfig

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PY = sys.executable
GATEWAY = "10.0.2.2"  # the host's 127.0.0.1 as seen from the namespace
ROUNDS = 8
CONNS = 2500  # TCP connections per round: connect, 32-byte echo, close
UDP_SOCKETS = 8  # namespace sockets of the UDP flood; each is a flow per sink port
UDP_PORTS = 32  # host sink ports
UDP_PER_FLOW = 8  # datagrams per (socket, port): 2,048 datagrams, 256 flows per round
UDP_IDLE = 1.0  # NatConfig.udp_idle_timeout: UDP flows of a round expire before measuring
# After a round (and up to SETTLE_MAX for TIME-WAIT and the UDP idle timeout to pass) the
# NAT may keep this many flows ...
FLOWS_BOUND = 4
# ... and fds and RSS may exceed the first round's by this much. Without the fix the RSS
# grew by about 4 MiB per round of 2,500 connections, so 8 rounds end ~28 MiB above.
FDS_SLACK = 2
RSS_SLACK_KIB = 8 * 1024
SETTLE_MAX = 15.0  # seconds the watcher waits for flows to drain after a round
ROUND_WAIT = 120  # seconds the client waits for the watcher's go-ahead

SERVER = textwrap.dedent('''\
    """Host side: a TCP echo server and UDP_PORTS UDP sinks on 127.0.0.1, one selector."""
    import json, selectors, socket, sys
    nudp = int(sys.argv[1])
    sel = selectors.DefaultSelector()
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(512)
    ls.setblocking(False)
    sel.register(ls, selectors.EVENT_READ, "listen")
    udp = []
    for _ in range(nudp):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("127.0.0.1", 0))
        u.setblocking(False)
        sel.register(u, selectors.EVENT_READ, "udp")
        udp.append(u.getsockname()[1])
    print(json.dumps({"tcp": ls.getsockname()[1], "udp": udp}), flush=True)
    got = 0
    while True:
        for key, _ in sel.select():
            s = key.fileobj
            if key.data == "listen":
                try:
                    c, _ = s.accept()
                except BlockingIOError:
                    continue
                c.setblocking(False)
                sel.register(c, selectors.EVENT_READ, "conn")
            elif key.data == "udp":
                try:
                    while True:
                        s.recv(2048)
                        got += 1
                except BlockingIOError:
                    pass
            else:
                try:
                    data = s.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if data:
                    s.sendall(data)  # 32 bytes: the socket buffer takes them
                else:
                    sel.unregister(s)
                    s.close()
    ''')

CLIENT = textwrap.dedent('''\
    """Namespace side: ROUNDS rounds of CONNS echo connections plus a UDP flood."""
    import json, os, socket, sys, time
    host, tcp_port, udp_ports, rounds, conns, nsock, per, wait, outdir = sys.argv[1:]
    tcp_port, rounds, conns, nsock, per, wait = map(int, (tcp_port, rounds, conns, nsock,
                                                          per, wait))
    udp_ports = [int(p) for p in udp_ports.split(",")]
    failures, ok, sent = [], 0, 0
    for r in range(rounds):
        for i in range(conns):
            msg = b"%031d\\n" % i
            try:
                with socket.create_connection((host, tcp_port), timeout=10) as s:
                    s.sendall(msg)
                    got = b""
                    while len(got) < len(msg):
                        k = s.recv(64)
                        if not k:
                            break
                        got += k
                if got == msg:
                    ok += 1
                else:
                    failures.append([r, i, got.decode(errors="replace")])
            except OSError as e:
                failures.append([r, i, repr(e)])
            if len(failures) > 20:
                break
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(nsock)]
        for s in socks:
            for p in udp_ports:
                for k in range(per):
                    try:
                        s.sendto(b"flood %d" % k, (host, p))
                        sent += 1
                    except OSError:
                        pass  # a full TAP queue: the flood is best effort
        for s in socks:
            s.close()
        open(os.path.join(outdir, "done.%d" % r), "w").close()
        go = os.path.join(outdir, "go.%d" % r)
        deadline = time.monotonic() + wait
        while not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.01)
        if len(failures) > 20 or not os.path.exists(go):
            break
    with open(os.path.join(outdir, "client.json"), "w") as f:
        json.dump({"ok": ok, "failures": failures, "udp_sent": sent}, f)
    ''')


def nat_pid() -> int | None:
    """The sandboxed NAT of this process's `net run`: the descendant named voidbox-nat."""
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/comm") as f:
                if f.read().strip() != "voidbox-nat":
                    continue
            pid = int(name)
            for _ in range(4):  # the NAT's waiter, then the NAT child, then us
                with open(f"/proc/{pid}/stat") as f:
                    pid = int(f.read().rsplit(")", 1)[1].split()[1])
                if pid == me:
                    return int(name)
        except (OSError, ValueError):
            continue
    return None


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Watcher(threading.Thread):
    """After each round: wait for the flows to drain, measure, let the client go on."""

    def __init__(self, outdir: str):
        super().__init__(daemon=True)
        self.outdir = outdir
        self.rows: list[dict] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            pid = idle = None
            for r in range(ROUNDS):
                done = os.path.join(self.outdir, f"done.{r}")
                deadline = time.monotonic() + ROUND_WAIT + SETTLE_MAX
                while not os.path.exists(done):
                    if time.monotonic() > deadline:
                        return
                    if pid is None:
                        pid = nat_pid()
                    if pid is not None and r == 0:
                        # Its fds before the first flows (the least seen while they open).
                        count = fd_count(pid)
                        idle = count if idle is None else min(idle, count)
                    time.sleep(0.02)
                assert pid is not None and idle is not None, "the NAT process was not found"
                settle = time.monotonic() + SETTLE_MAX
                while fd_count(pid) > idle and time.monotonic() < settle:
                    time.sleep(0.05)
                fds = fd_count(pid)
                self.rows.append({"round": r + 1, "rss_kib": rss_kib(pid), "fds": fds,
                                  "flows": fds - idle})
                open(os.path.join(self.outdir, f"go.{r}"), "w").close()
        except BaseException as e:  # surfaced by the test
            self.error = e
            for r in range(ROUNDS):  # never leave the client waiting
                open(os.path.join(self.outdir, f"go.{r}"), "w").close()


@pytest.fixture
def host_server(tmp_path):
    path = tmp_path / "soakserver.py"
    path.write_text(SERVER)
    proc = subprocess.Popen([PY, str(path), str(UDP_PORTS)], stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith("{"):
            pytest.fail(f"the host server did not start: {line!r}")
        yield json.loads(line)
    finally:
        proc.kill()
        proc.communicate()


def test_soak_fds_flows_and_memory_return_after_each_round(tmp_path, host_server):
    client = tmp_path / "soakclient.py"
    client.write_text(CLIENT)
    outdir = tmp_path / "rounds"
    outdir.mkdir()
    watcher = Watcher(str(outdir))
    watcher.start()
    argv = [PY, str(client), GATEWAY, str(host_server["tcp"]),
            ",".join(map(str, host_server["udp"])), str(ROUNDS), str(CONNS),
            str(UDP_SOCKETS), str(UDP_PER_FLOW), str(ROUND_WAIT), str(outdir)]
    t0 = time.monotonic()
    # This process's own fd count is no measure here: the watcher reads /proc meanwhile
    # (the NAT's fds are what the rows check).
    rc, counters = run(argv, NatConfig(udp_idle_timeout=UDP_IDLE), check_fds=False)
    seconds = time.monotonic() - t0
    watcher.join(SETTLE_MAX)
    assert watcher.error is None, watcher.error
    assert rc == 0
    got = json.loads((outdir / "client.json").read_text())
    rows = watcher.rows
    print(f"\nsoak: {ROUNDS} rounds of {CONNS} TCP connections and "
          f"{UDP_SOCKETS * UDP_PORTS * UDP_PER_FLOW} UDP datagrams "
          f"({UDP_SOCKETS * UDP_PORTS} flows) in {seconds:.1f} s")
    print("round  NAT RSS MiB  NAT fds  flows")
    for row in rows:
        print(f"{row['round']:5d}  {row['rss_kib'] / 1024:11.1f}  {row['fds']:7d}  "
              f"{row['flows']:5d}")
    assert got["failures"] == []
    assert got["ok"] == ROUNDS * CONNS
    assert counters.get("udp_flows_expired", 0) > 0  # the flood did open UDP flows
    assert len(rows) == ROUNDS
    first = rows[0]
    for row in rows:
        assert row["flows"] <= FLOWS_BOUND, row
        assert row["fds"] <= first["fds"] + FDS_SLACK, row
        assert row["rss_kib"] <= first["rss_kib"] + RSS_SLACK_KIB, (row, first)
