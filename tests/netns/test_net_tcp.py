"""TCP through `voidbox net run` between two real Linux stacks: the namespace's and the host's.

Both ends are one small tool (TOOL below, written to a scratch directory): on the host a
server on 127.0.0.1 run as its own process (so it does not share the NAT's interpreter),
in the namespace a client run with this interpreter (or the system's, for uid nobody). Bulk
data is deterministic pseudo-random bytes and both ends hash what they sent or received;
the client writes its findings as JSON, the server prints one JSON line per connection.

Every client command ends with a ping of the gateway: frames from the namespace reach the
NAT in order, so its reply means the NAT has seen every earlier segment (the last ACKs and
FINs). The NAT's shutdown resets flows still open when the command exits; CountingEngine
notes them (and merges the TCP relay's counters into the stats), so assert_clean can tell
that every connection finished on its own. Bounds:
the client and server die by SIGALRM after TIMEOUT seconds, socket operations time out after
IO_TIMEOUT; none of these is asserted as a timing. Rates are printed (pytest -s shows them).
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import textwrap

import pytest

from tests.netns.test_net_run import WAIT, _drop_to_nobody_and_run, run, unused_loopback_port
from voidbox.net import run as net_run
from voidbox.net.config import NatConfig
from voidbox.net.engine import Engine
from voidbox.net.run import config_from_options

pytestmark = pytest.mark.netns

PY = sys.executable
SYSTEM_PY = "/usr/bin/python3"  # uid nobody cannot enter /root, where this venv lives
GATEWAY = "10.0.2.2"  # the host's 127.0.0.1 as seen from the namespace
KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
JUMBO_MTU = 65520  # config.MAX_MTU: a TAP refuses more than 65521
DEFAULT_MTU = 1500
TIMEOUT = 300  # seconds one client or server may live: a bound on failure only
SERVER_EXIT_WAIT = 60
ENV = f"TCP_TEST_TIMEOUT={TIMEOUT}"
BARRIER = f"busybox ping -c1 -W{WAIT} {GATEWAY} >/dev/null"
SHORT_CONNECTIONS = 1000
REFUSED_ATTEMPTS = 20

TOOL = textwrap.dedent('''\
    """Both ends of the TCP tests. Host: serve NCONN. Namespace: ROLE HOST PORT ARG OUT [DONE]."""
    import hashlib, json, os, random, signal, socket, sys, time

    SEED = 20261130
    CHUNK = 1 << 20
    STAMP = 8  # each chunk starts with its index, so no two chunks are alike
    TIMEOUT = int(os.environ["TCP_TEST_TIMEOUT"])
    IO_TIMEOUT = 60
    MAX_LINE = 256
    DONE_POLLS, DONE_POLL_S = 600, 0.1  # waiting for the server's done file: 60 s at most
    BIND = os.environ.get("TCP_TEST_BIND", "127.0.0.1")  # ::1 for the IPv6 tests

    signal.alarm(TIMEOUT)  # whatever happens, this process ends


    def chunks(n):
        block = random.Random(SEED).randbytes(CHUNK)
        i = 0
        while n > 0:
            piece = i.to_bytes(STAMP, "big") + block[STAMP:]
            if n < CHUNK:
                piece = piece[:n]
            yield piece
            n -= len(piece)
            i += 1


    def send_stream(sock, n):
        h = hashlib.sha256()
        for piece in chunks(n):
            h.update(piece)
            sock.sendall(piece)
        return h.hexdigest()


    def recv_stream(sock, keep=False):
        buf = bytearray(CHUNK)
        mv = memoryview(buf)
        h = hashlib.sha256()
        total = 0
        kept = bytearray()
        while True:
            k = sock.recv_into(buf)
            if not k:
                return total, h.hexdigest(), bytes(kept)
            h.update(mv[:k])
            total += k
            if keep:
                kept += mv[:k]


    def read_line(sock):
        line = b""
        while not line.endswith(b"\\n") and len(line) < MAX_LINE:
            c = sock.recv(1)
            if not c:
                break
            line += c
        return line


    def serve(nconn):
        ls = socket.socket(socket.AF_INET6 if ":" in BIND else socket.AF_INET)
        ls.bind((BIND, 0))
        ls.listen(128)
        ls.settimeout(IO_TIMEOUT)
        print(ls.getsockname()[1], flush=True)
        for _ in range(nconn):
            c, _peer = ls.accept()
            c.settimeout(IO_TIMEOUT)
            line = read_line(c)
            mode, _, arg = line.decode().strip().partition(" ")
            res = {"mode": mode}
            if mode == "send":  # stream ARG bytes, then close first
                res["sha"] = send_stream(c, int(arg))
            elif mode == "recv":  # read to EOF, then reply on the half-closed connection
                res["bytes"], res["sha"], _ = recv_stream(c)
                c.sendall(("%d %s\\n" % (res["bytes"], res["sha"])).encode())
            elif mode == "echoall":  # read to EOF, then send it all back
                res["bytes"], res["sha"], data = recv_stream(c, keep=True)
                c.sendall(data)
            elif mode == "shutfirst":  # close our side first, then read the client's data
                c.sendall(b"greeting\\n")
                c.shutdown(socket.SHUT_WR)
                res["bytes"], res["sha"], _ = recv_stream(c)
                with open(arg + ".tmp", "w") as f:
                    json.dump(res, f)
                os.rename(arg + ".tmp", arg)
            elif mode == "echo":  # echo the line, then wait for the client's FIN
                c.sendall(line)
                res["eof"] = c.recv(1) == b""
            c.close()
            print(json.dumps(res), flush=True)


    def client(role, host, port, arg, out, done=None):
        res = {"role": role}
        addr = (host, int(port))
        t0 = time.monotonic()
        if role == "get":
            with socket.create_connection(addr, timeout=IO_TIMEOUT) as s:
                s.sendall(b"send %d\\n" % int(arg))
                res["bytes"], res["sha"], _ = recv_stream(s)
        elif role == "put":
            with socket.create_connection(addr, timeout=IO_TIMEOUT) as s:
                s.sendall(b"recv\\n")
                res["sha"] = send_stream(s, int(arg))
                s.shutdown(socket.SHUT_WR)
                res["reply"] = recv_stream(s, keep=True)[2].decode()
        elif role == "echoall":
            with socket.create_connection(addr, timeout=IO_TIMEOUT) as s:
                s.sendall(b"echoall\\n")
                res["sha"] = send_stream(s, int(arg))
                s.shutdown(socket.SHUT_WR)
                res["back_bytes"], res["back_sha"], _ = recv_stream(s)
        elif role == "shutfirst":
            with socket.create_connection(addr, timeout=IO_TIMEOUT) as s:
                s.sendall(b"shutfirst %s\\n" % done.encode())
                res["greeting"] = recv_stream(s, keep=True)[2].decode()
                res["sha"] = send_stream(s, int(arg))
                s.shutdown(socket.SHUT_WR)
                # Keep the connection until the server has everything: exiting would end
                # the namespace and the NAT with it.
                for _ in range(DONE_POLLS):
                    if os.path.exists(done):
                        break
                    time.sleep(DONE_POLL_S)
                res["server_done"] = os.path.exists(done)
        elif role == "echo":
            ok, failures = 0, []
            for i in range(int(arg)):
                msg = b"echo %d\\n" % i
                try:
                    with socket.create_connection(addr, timeout=IO_TIMEOUT) as s:
                        s.sendall(msg)
                        got = b""
                        while len(got) < len(msg):
                            k = s.recv(len(msg) - len(got))
                            if not k:
                                break
                            got += k
                        s.shutdown(socket.SHUT_WR)
                        eof = s.recv(1) == b""
                    if got == msg and eof:
                        ok += 1
                    else:
                        failures.append([i, got.decode(errors="replace"), eof])
                except OSError as e:
                    failures.append([i, repr(e)])
                if len(failures) > 10:
                    break
            res["ok"], res["failures"] = ok, failures
        elif role == "refused":
            outcomes = []
            for _ in range(int(arg)):
                t = time.monotonic()
                try:
                    socket.create_connection(addr, timeout=IO_TIMEOUT).close()
                    outcome = "connected"
                except ConnectionRefusedError:
                    outcome = "refused"
                except OSError as e:
                    outcome = repr(e)
                outcomes.append([outcome, time.monotonic() - t])
            res["outcomes"] = outcomes
        res["seconds"] = time.monotonic() - t0
        with open(out, "w") as f:
            json.dump(res, f)


    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        client(*sys.argv[1:])
    ''')


class CountingEngine(Engine):
    """The engine with the TCP relay's counters (kept apart in TcpNat.counters) merged into
    its own on close, where run_in_netns's stats pick them up, the NAT's shutdown included."""

    def close(self) -> None:
        # Flows the shutdown is about to reset, for assert_clean's message (not a counter).
        left = [f for f in self.tcp.flow_stats() if f["state"] != "TIME-WAIT"] if self.tcp else []
        super().close()
        self.counters["tcp_left_at_exit"] = left  # type: ignore[assignment]
        if self.tcp is not None:
            for name, n in self.tcp.counters.items():
                self.counters[name] = self.counters.get(name, 0) + n


@pytest.fixture(autouse=True)
def tcp_counters(monkeypatch):
    # A forked child (the unprivileged run) inherits the patch.
    monkeypatch.setattr(net_run, "Engine", CountingEngine)


class HostServer:
    """The tool's server on the host's 127.0.0.1 (or bind, e.g. ::1), in its own process."""

    def __init__(self, tool: str, nconn: int, bind: str = "127.0.0.1"):
        env = dict(os.environ, TCP_TEST_TIMEOUT=str(TIMEOUT), TCP_TEST_BIND=bind)
        self.proc = subprocess.Popen([PY, tool, "serve", str(nconn)], stdout=subprocess.PIPE,
                                     text=True, env=env)
        ready, _, _ = select.select([self.proc.stdout], [], [], SERVER_EXIT_WAIT)
        line = self.proc.stdout.readline() if ready else ""
        if not line.strip().isdigit():
            self.close()
            pytest.fail(f"the host server did not start: {line!r}")
        self.port = int(line)

    def results(self) -> list[dict]:
        """Wait for the server to finish; its per-connection results."""
        out, _ = self.proc.communicate(timeout=SERVER_EXIT_WAIT)
        assert self.proc.returncode == 0, out
        return [json.loads(line) for line in out.splitlines()]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def tool(tmp_path):
    path = tmp_path / "tcptool.py"
    path.write_text(TOOL)
    return str(path)


@pytest.fixture
def server(tool):
    """A factory: server(nconn) starts a host server for nconn sequential connections (on
    bind, 127.0.0.1 unless given)."""
    started = []

    def start(nconn: int, bind: str = "127.0.0.1") -> HostServer:
        s = HostServer(tool, nconn, bind)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def run_client(tool: str, args: list, config: NatConfig, python: str = PY,
               offload: bool = True):
    """Run the tool's client in the namespace, then the barrier ping; (rc, counters)."""
    cmd = " ".join([ENV, python, tool, *map(str, args)]) + " && " + BARRIER
    return run(["sh", "-c", cmd], config, offload=offload)


def gbit_s(nbytes: int, seconds: float) -> float:
    return nbytes * 8 / seconds / 1e9


def assert_clean(counters: dict, flows: int) -> None:
    """flows connections were made and each ended by itself before the command exited.

    The only RSTs allowed answer segments for flows already gone: after a (spurious)
    retransmission the namespace's duplicate ACKs can arrive once the flow has closed, and
    a closed TCB answers them with RST (RFC 9293 §3.10.7.1), as Linux does.
    """
    tcp = {k: v for k, v in counters.items() if k.startswith("tcp")}
    assert counters.get("tcp_flows_opened") == flows, tcp
    assert counters["tcp_left_at_exit"] == [], f"flows reset at shutdown: {tcp}"
    assert counters.get("tcp_rst_sent", 0) == counters.get("tcp_rst_unknown_flow", 0), \
        f"a live flow was reset: {tcp}"


# ---------------------------------------------------------------------- bulk transfers

# offload: the TAP with virtio_net_hdr, checksum offload and TSO (the default), or plain
# MTU-sized frames with full checksums both ways (--no-offload).
BULK = [
    pytest.param(JUMBO_MTU, GIB, True, id="mtu65520-1GiB"),
    pytest.param(DEFAULT_MTU, GIB, True, id="mtu1500-1GiB"),
    pytest.param(JUMBO_MTU, 256 * MIB, False, id="mtu65520-256MiB-no-offload"),
    pytest.param(DEFAULT_MTU, 64 * MIB, False, id="mtu1500-64MiB-no-offload"),
]


def assert_offload_used(counters: dict, offload: bool, direction: str, mtu: int) -> None:
    """With offload, host data went out through the Cython stream sender and, at MTU 1500,
    the namespace's TCP handed over super-frames larger than its MTU (TSO)."""
    if not offload:
        assert counters["tap_stream_frames"] == 0 and counters["tap_rx_oversize"] == 0
    elif direction == "down":
        assert counters["tap_stream_frames"] > 0
    elif mtu == DEFAULT_MTU:
        assert counters["tap_rx_oversize"] > 0


@pytest.mark.slow
@pytest.mark.parametrize(("mtu", "size", "offload"), BULK)
def test_bulk_host_to_namespace(tmp_path, tool, server, mtu, size, offload):
    srv = server(1)
    out = tmp_path / "out.json"
    config, _ = config_from_options(mtu=mtu)
    rc, counters = run_client(tool, ["get", GATEWAY, srv.port, size, out], config,
                              offload=offload)
    assert rc == 0
    [sent] = srv.results()
    got = json.loads(out.read_text())
    assert got["bytes"] == size
    assert got["sha"] == sent["sha"]
    assert_clean(counters, 1)
    assert_offload_used(counters, offload, "down", mtu)
    print(f"\nhost->namespace MTU {mtu} offload {offload}: {size // MIB} MiB in "
          f"{got['seconds']:.2f} s, "
          f"{gbit_s(size, got['seconds']):.2f} Gbit/s, "
          f"NAT retransmits {counters.get('tcp_retransmits_total', 0)}")


@pytest.mark.slow
@pytest.mark.parametrize(("mtu", "size", "offload"), BULK)
def test_bulk_namespace_to_host(tmp_path, tool, server, mtu, size, offload):
    srv = server(1)
    out = tmp_path / "out.json"
    config, _ = config_from_options(mtu=mtu)
    rc, counters = run_client(tool, ["put", GATEWAY, srv.port, size, out], config,
                              offload=offload)
    assert rc == 0
    [received] = srv.results()
    sent = json.loads(out.read_text())
    assert received["bytes"] == size
    assert received["sha"] == sent["sha"]
    assert sent["reply"] == f"{size} {sent['sha']}\n"  # after our FIN, the reply still came
    assert_clean(counters, 1)
    assert_offload_used(counters, offload, "up", mtu)
    print(f"\nnamespace->host MTU {mtu} offload {offload}: {size // MIB} MiB in "
          f"{sent['seconds']:.2f} s, "
          f"{gbit_s(size, sent['seconds']):.2f} Gbit/s, "
          f"NAT retransmits {counters.get('tcp_retransmits_total', 0)}")


# ---------------------------------------------------------------------- many connections

@pytest.mark.slow
def test_thousand_sequential_short_connections(tmp_path, tool, server):
    srv = server(SHORT_CONNECTIONS)
    out = tmp_path / "out.json"
    rc, counters = run_client(tool, ["echo", GATEWAY, srv.port, SHORT_CONNECTIONS, out],
                              NatConfig())
    assert rc == 0
    got = json.loads(out.read_text())
    assert got["failures"] == []
    assert got["ok"] == SHORT_CONNECTIONS
    results = srv.results()
    assert len(results) == SHORT_CONNECTIONS
    assert all(r["eof"] for r in results)  # every client FIN reached the server
    assert_clean(counters, SHORT_CONNECTIONS)
    print(f"\n{SHORT_CONNECTIONS} connections in {got['seconds']:.2f} s, "
          f"{got['seconds'] / SHORT_CONNECTIONS * 1e3:.2f} ms each")


# ---------------------------------------------------------------------- half-close

HALF_CLOSE_BYTES = 4 * MIB


def test_namespace_half_closes_and_still_receives(tmp_path, tool, server):
    srv = server(1)
    out = tmp_path / "out.json"
    rc, counters = run_client(tool, ["echoall", GATEWAY, srv.port, HALF_CLOSE_BYTES, out],
                              NatConfig())
    assert rc == 0
    [received] = srv.results()
    got = json.loads(out.read_text())
    # The server read to EOF (our FIN) before it sent a byte back.
    assert received["bytes"] == HALF_CLOSE_BYTES
    assert received["sha"] == got["sha"]
    assert got["back_bytes"] == HALF_CLOSE_BYTES
    assert got["back_sha"] == got["sha"]
    assert_clean(counters, 1)


def test_host_half_closes_and_still_receives(tmp_path, tool, server):
    srv = server(1)
    out = tmp_path / "out.json"
    done = tmp_path / "done.json"
    rc, counters = run_client(
        tool, ["shutfirst", GATEWAY, srv.port, HALF_CLOSE_BYTES, out, done], NatConfig())
    assert rc == 0
    [received] = srv.results()
    got = json.loads(out.read_text())
    assert got["greeting"] == "greeting\n"  # read to EOF: the host's FIN came through
    assert got["server_done"]
    assert received["bytes"] == HALF_CLOSE_BYTES
    assert received["sha"] == got["sha"]
    assert_clean(counters, 1)


# ---------------------------------------------------------------------- refused

def test_closed_host_port_is_refused_at_once(tmp_path, tool):
    closed_port = unused_loopback_port(socket.SOCK_STREAM)
    out = tmp_path / "out.json"
    rc, counters = run_client(tool, ["refused", GATEWAY, closed_port, REFUSED_ATTEMPTS, out],
                              NatConfig())
    assert rc == 0
    outcomes = json.loads(out.read_text())["outcomes"]
    # Refused, not timed out: a lost or late RST would show as TimeoutError (IO_TIMEOUT).
    assert [o for o, _ in outcomes] == ["refused"] * REFUSED_ATTEMPTS
    assert counters["tcp_rst_sent"] == REFUSED_ATTEMPTS  # one each, none at shutdown
    assert counters["tcp_left_at_exit"] == []
    print(f"\nrefused in at most {max(t for _, t in outcomes) * 1e3:.1f} ms")


# ---------------------------------------------------------------------- unprivileged

UNPRIVILEGED_BYTES = 16 * MIB


def test_unprivileged_transfer(tmp_path, workdir, server):
    if not os.access(SYSTEM_PY, os.X_OK):
        pytest.skip(f"needs {SYSTEM_PY} for the unprivileged client")
    tool = workdir / "tcptool.py"
    tool.write_text(TOOL)
    srv = server(2)
    get, put = workdir / "get.json", workdir / "put.json"
    cmd = (f"{ENV} {SYSTEM_PY} {tool} get {GATEWAY} {srv.port} {UNPRIVILEGED_BYTES} {get} && "
           f"{ENV} {SYSTEM_PY} {tool} put {GATEWAY} {srv.port} {UNPRIVILEGED_BYTES} {put} && "
           f"{BARRIER} && test $(id -u) = 0")
    assert _drop_to_nobody_and_run(tmp_path, workdir, cmd, NatConfig()) == 0
    sent, received = srv.results()
    down, up = json.loads(get.read_text()), json.loads(put.read_text())
    assert down["bytes"] == UNPRIVILEGED_BYTES
    assert down["sha"] == sent["sha"]
    assert received["bytes"] == UNPRIVILEGED_BYTES
    assert received["sha"] == up["sha"]
    counters = json.loads((workdir / "counters.json").read_text())
    assert_clean(counters, 2)
    print(f"\nunprivileged: down {gbit_s(UNPRIVILEGED_BYTES, down['seconds']):.2f} Gbit/s, "
          f"up {gbit_s(UNPRIVILEGED_BYTES, up['seconds']):.2f} Gbit/s")
