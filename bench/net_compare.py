"""voidbox's user-mode NAT beside slirp4netns and pasta: one run, one machine, one table.

    sudo .venv/bin/python bench/net_compare.py [--seconds 5] [--mtu 1500 --mtu 65520]
        [--peer voidbox --peer slirp4netns --peer pasta] [--conns 1000] [--rrs 2000]
        [--udps 2000] [--ops throughput,connect,rr,udp] [--json out.json] [--max-minutes 10]
        [--family 4 | --family 6]

Needs root (network namespaces), iperf3, slirp4netns and pasta (passt). Everything stays on
this machine: the servers listen on the host's 127.0.0.1, the client runs inside each
NAT's namespace and reaches them through 10.0.2.2, which all three NATs map to the host's
loopback. Each NAT gets the same client program (bench/net/client.py), driven over its
stdin/stdout, so the peers measure the same thing:

1. iperf3 throughput namespace->host and host->namespace (-R), -t --seconds, JSON parsed
   (receiver's byte count and rate);
2. new TCP connection + a few bytes echoed + close, sequential: p50/p99 and connections/s;
   then the same from 4 client threads at once: connections/s;
3. 1-byte request/response on one persistent TCP connection: p50/p99;
4. a new UDP socket per query to a UDP echo server (DNS-style): p50/p99;
5. the NAT process's CPU seconds (utime+stime of /proc/PID/stat, all its threads) over each
   iperf3 run divided by the GB (10^9 bytes) received, and per connection in (2).

Each connection a NAT relays leaves its host socket in TIME-WAIT for 60 s, and connect()
slows as they pile up (here voidbox's NAT among 77k of them spent 293-330 µs of CPU per
connection against 255-258 µs among 5.5k-6k), so a session with connect ops first
waits (--settle-seconds, at most 65 s) until fewer than SETTLE_TIME_WAIT remain from the
sessions before it.

How each NAT is run (from their man pages; Debian 12 versions):
- voidbox: `voidbox net run --mtu N -- CLIENT`; the NAT is the `voidbox net run` process's
  sandboxed child (comm `voidbox-nat`), whose CPU is measured.
- slirp4netns: `ip netns add NS`, then `slirp4netns --configure --mtu=N --ready-fd=FD
  --netns-type=path /run/netns/NS tap0` (no --disable-host-loopback: 10.0.2.2 must reach
  the host's 127.0.0.1); the client runs under `nsenter --net=/run/netns/NS`.
- pasta: the same named namespace, `pasta -f --runas 0 --config-net -m N -a 10.0.2.15 -n 24
  -g 10.0.2.2 -t none -u none -T none -U none -P PIDFILE --netns NS`. -g makes the gateway
  10.0.2.2 (pasta maps TCP and untracked UDP to its gateway address to the host's loopback
  unless --no-map-gw); the four `none` turn off port forwarding, whose "auto" default
  would scan and forward our ports; --runas 0 because as root pasta otherwise switches to
  nobody and then cannot enter the root-owned namespace.

--family 6 measures the same over IPv6: the servers listen on the host's ::1 and the client
reaches them through fd00::2, which every NAT maps to ::1 (voidbox: its default; slirp4netns
with --enable-ipv6, which also configures the namespace by router advertisement; pasta with
-a fd00::100 -n 64 -g fd00::2 beside the IPv4 ones, its gateway mapped to the host's
loopback as for IPv4).

Every loop is bounded in count and time; a peer that fails or stalls in one mode gets
that written into its cell and the run goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import typing

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)  # proctree, however this file is loaded
from proctree import descendant_named  # noqa: E402

CLIENT = os.path.join(BENCH, "net", "client.py")
ECHO_SERVER = os.path.join(BENCH, "net", "echo_server.py")
VOIDBOX = os.path.join(ROOT, ".venv", "bin", "voidbox")
PREFIX = "@@"
PEERS = ("voidbox", "slirp4netns", "pasta")
class Layout(typing.NamedTuple):
    """One address family's view: the namespace's address, the gateway the client dials,
    and the host loopback address the servers listen on."""

    family: int
    guest: str
    gateway: str
    prefix_len: str
    loopback: str


LAYOUTS = {4: Layout(4, "10.0.2.15", "10.0.2.2", "24", "127.0.0.1"),
           6: Layout(6, "fd00::100", "fd00::2", "64", "::1")}
NET = LAYOUTS[4]  # main() sets the family's
SLIRP_TAP = "tap0"
GB = 1e9
READY_TIMEOUT = 15.0  # NAT set-up and the client's wait for its route
OP_MARGIN = 20.0  # seconds allowed beyond an op's own budget before the session is abandoned
LATENCY_BUDGET = 30.0  # seconds per latency op, whatever N is
WARMUP = 20
SETTLE_TIME_WAIT = 10000  # TIME-WAIT sockets a session with connect ops may start among
STOP_TIMEOUT = 5.0
TCP_LISTEN = "0A"  # include/net/tcp_states.h TCP_LISTEN, as /proc/net/tcp prints it
# --ops names -> the plan entries (table keys) each one runs; "throughput" is both iperf3 ways.
OPS = {"throughput": ("up", "down"), "connect": ("connect", "connect4"), "rr": ("rr",),
       "udp": ("udp",)}
PARALLEL_CLIENTS = 4


class SessionError(Exception):
    """The NAT or the client failed in a way that ends this peer's session."""


# ---------------------------------------------------------------- host facts

def cmd_output(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"n/a ({e})"
    return (proc.stdout or proc.stderr).strip()


def versions() -> dict:
    rev = cmd_output(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    dirty = cmd_output(["git", "-C", ROOT, "status", "--porcelain", "--", "voidbox"]).splitlines()
    if dirty:
        rev += f" + {len(dirty)} uncommitted file(s) under voidbox/"
    slirp = cmd_output(["slirp4netns", "--version"]).splitlines()
    pasta = cmd_output(["pasta", "--version"]).splitlines()[:1]
    passt_pkg = cmd_output(["dpkg-query", "-W", "-f", "${Version}", "passt"])
    return {
        "voidbox": rev,
        "slirp4netns": " / ".join(line for line in slirp
                                  if line.startswith(("slirp4netns", "libslirp"))),
        "pasta": f"`{pasta[0] if pasta else 'n/a'}` (Debian package passt {passt_pkg})",
        "iperf3": cmd_output(["iperf3", "--version"]).splitlines()[0],
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def cpu_busy_snapshot() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat, for the host load during a session."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def proc_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a whole process so far.

    The sum of the first field of /proc/PID/task/*/schedstat (ns on CPU, per thread) has
    nanosecond resolution, where utime+stime of /proc/PID/stat moves in 10 ms ticks, too
    coarse for the CPU per connection; a thread that ends between two readings would be
    missed, and none of the three NATs starts one per flow. Falls back to /proc/PID/stat
    (proc(5) fields 14 and 15) where schedstat is missing.
    """
    total_ns = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError), \
                    open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total_ns += int(f.read().split()[0])
        return total_ns / 1e9
    except (FileNotFoundError, ValueError):
        pass
    with open(f"/proc/{pid}/stat") as f:
        after_comm = f.read().rsplit(")", 1)[1].split()
    # after_comm[0] is field 3 (state), so field N is after_comm[N - 3].
    return (int(after_comm[14 - 3]) + int(after_comm[15 - 3])) / os.sysconf("SC_CLK_TCK")


VOIDBOX_NAT_COMM = "voidbox-nat"  # voidbox.net.run.NAT_NAME: the sandboxed NAT's comm


def voidbox_nat_pid(supervisor: int) -> int:
    """The process that runs voidbox's NAT: `voidbox net run` (the supervisor) forks it,
    and the sandbox forks it once more (its comm is voidbox-nat); the supervisor itself
    relays and waits. The supervisor's pid where no such descendant is found."""
    return descendant_named(supervisor, VOIDBOX_NAT_COMM)


def free_port() -> int:
    with socket.socket(socket.AF_INET6 if NET.family == 6 else socket.AF_INET) as s:
        s.bind((NET.loopback, 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with open("/proc/net/tcp6" if NET.family == 6 else "/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[3] == TCP_LISTEN and int(fields[1].split(":")[1], 16) == port:
                return True
    return False


def stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    """End a process this runner started (by its own Popen), escalating to SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_TIMEOUT)


@contextlib.contextmanager
def iperf_server():
    """A one-off `iperf3 -s -1` on the host's loopback and a fresh port, so a stalled test
    cannot leave a busy server behind for the next one."""
    port = free_port()
    proc = subprocess.Popen(["iperf3", "-s", "-1", "-B", NET.loopback, "-p", str(port)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + STOP_TIMEOUT
        while not listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SessionError("iperf3 server did not start")
            time.sleep(0.01)
        yield port
    finally:
        stop(proc)


# ---------------------------------------------------------------- talking to the client

class LineReader:
    """Lines from a pipe with a deadline (select + os.read, no hidden buffering)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buf = b""

    def readline(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    return None
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode(errors="replace")

    def message(self, timeout: float) -> dict | None:
        """The next PREFIX line as a dict; other output (logs) is skipped."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.readline(max(0.0, deadline - time.monotonic()))
            if line is None:
                return None
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])


# ---------------------------------------------------------------- one NAT, one MTU

class Session:
    """One NAT serving one namespace at one MTU, with the client running inside."""

    def __init__(self, peer: str, mtu: int, workdir: str):
        self.peer, self.mtu, self.workdir = peer, mtu, workdir
        self.nat: subprocess.Popen | None = None
        self.client: subprocess.Popen | None = None
        self.nat_pid = 0
        self.netns = None
        self.log_path = os.path.join(workdir, f"{peer}-{mtu}.log")
        self.log = open(self.log_path, "wb")
        self.reader: LineReader | None = None
        self.ready: dict = {}

    def client_argv(self) -> list[str]:
        return [sys.executable, CLIENT]

    def start(self) -> None:
        getattr(self, f"_start_{self.peer}")()
        self.reader = LineReader(self.client.stdout.fileno())
        msg = self.reader.message(READY_TIMEOUT + OP_MARGIN)
        if msg is None:
            raise SessionError(f"client never reported ready ({self.tail_log()})")
        if not msg.get("ready"):
            raise SessionError(msg.get("error", "client not ready"))
        self.ready = msg
        if self.peer == "voidbox":
            # The client runs: the NAT is serving, in a process of its own.
            self.nat_pid = voidbox_nat_pid(self.client.pid)

    def _popen_client(self, argv: list[str]) -> subprocess.Popen:
        # The client reads the gateway to dial from its environment (bench/net/client.py).
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=self.log, env=dict(os.environ, VBBENCH_GATEWAY=NET.gateway))

    def _start_voidbox(self) -> None:
        self.client = self._popen_client(
            [VOIDBOX, "net", "run", "--host-loopback", "--mtu", str(self.mtu), "--", *self.client_argv()])
        self.nat, self.nat_pid = self.client, self.client.pid

    def _add_netns(self) -> str:
        name = f"vbbench-{os.getpid()}-{self.peer}-{self.mtu}"
        subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
        self.netns = name
        return name

    def _start_client_in_netns(self) -> None:
        self.client = self._popen_client(
            ["nsenter", f"--net=/run/netns/{self.netns}", "--", *self.client_argv()])

    def _start_slirp4netns(self) -> None:
        name = self._add_netns()
        ready_r, ready_w = os.pipe()
        try:
            self.nat = subprocess.Popen(
                ["slirp4netns", "--configure", f"--mtu={self.mtu}", f"--ready-fd={ready_w}",
                 *(["--enable-ipv6"] if NET.family == 6 else []),
                 "--netns-type=path", f"/run/netns/{name}", SLIRP_TAP],
                pass_fds=(ready_w,), stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
            os.close(ready_w)
            ready_w = -1
            ready, _, _ = select.select([ready_r], [], [], READY_TIMEOUT)
            if not ready or os.read(ready_r, 1) != b"1":
                raise SessionError(f"slirp4netns not ready ({self.tail_log()})")
        finally:
            os.close(ready_r)
            if ready_w >= 0:
                os.close(ready_w)
        self.nat_pid = self.nat.pid
        self._start_client_in_netns()

    def _start_pasta(self) -> None:
        name = self._add_netns()
        pidfile = os.path.join(self.workdir, f"pasta-{self.mtu}.pid")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pidfile)  # an earlier round's: it would be read before pasta writes
        self.nat = subprocess.Popen(
            ["pasta", "-f", "--runas", "0", "--config-net", "-m", str(self.mtu),
             "-a", LAYOUTS[4].guest, "-n", LAYOUTS[4].prefix_len, "-g", LAYOUTS[4].gateway,
             # pasta's -n is IPv4's netmask; an IPv6 address takes the /64 of its -a.
             *(["-a", NET.guest, "-g", NET.gateway] if NET.family == 6 else []),
             "-t", "none", "-u", "none", "-T", "none", "-U", "none",
             "-P", pidfile, "--netns", name],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + READY_TIMEOUT
        while not (os.path.exists(pidfile) and os.path.getsize(pidfile)):
            if self.nat.poll() is not None or time.monotonic() > deadline:
                raise SessionError(f"pasta not ready ({self.tail_log()})")
            time.sleep(0.01)
        with open(pidfile) as f:
            self.nat_pid = int(f.read().split()[0])
        if self.nat_pid != self.nat.pid:  # -f: it must not have forked away
            raise SessionError(f"pasta wrote pid {self.nat_pid}, started {self.nat.pid}")
        self._start_client_in_netns()

    def tail_log(self) -> str:
        self.log.flush()
        with open(self.log_path, "rb") as f:
            text = f.read().decode(errors="replace")
        lines = [line for line in text.splitlines() if line and "syslog" not in line]
        return " | ".join(lines[-3:])[:300] or "no log output"

    def run_op(self, op: dict, budget: float) -> dict:
        """Send one op; the NAT's CPU seconds over it are added as nat_cpu_s."""
        if self.nat.poll() is not None:
            raise SessionError(f"NAT exited rc={self.nat.returncode} ({self.tail_log()})")
        cpu0 = proc_cpu_seconds(self.nat_pid)
        self.client.stdin.write((json.dumps(op) + "\n").encode())
        self.client.stdin.flush()
        result = self.reader.message(budget + OP_MARGIN)
        if result is None:
            raise SessionError(f"no answer to {op['op']} within {budget + OP_MARGIN:.0f} s")
        result["nat_cpu_s"] = proc_cpu_seconds(self.nat_pid) - cpu0
        return result

    def close(self) -> None:
        if self.client is not None and self.client.poll() is None:
            with contextlib.suppress(OSError):
                self.client.stdin.write(b'{"op": "quit"}\n')
                self.client.stdin.close()
            try:
                self.client.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                stop(self.client)
        if self.nat is not self.client:
            stop(self.nat)
        if self.netns:
            subprocess.run(["ip", "netns", "del", self.netns], timeout=10, check=False)
        self.log.close()


@contextlib.contextmanager
def perf_record(pid: int, path: str):
    """`perf record -g` of process pid while the block runs (--perf: where the NAT's CPU
    goes); read it with `perf report -i PATH --no-children`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    perf = subprocess.Popen(["perf", "record", "-q", "-g", "-F", "2000", "-p", str(pid), "-o", path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)  # perf attaches
    try:
        yield
    finally:
        perf.send_signal(signal.SIGINT)
        perf.wait(30)


def time_wait_sockets() -> int:
    """TCP sockets in TIME-WAIT in this network namespace (proc(5) /proc/net/sockstat)."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                words = line.split()
                return int(words[words.index("tw") + 1])
    return 0


def settle_time_wait(limit_s: float) -> tuple[int, float]:
    """Wait (at most limit_s) until the TIME-WAIT sockets earlier sessions left are under
    SETTLE_TIME_WAIT. Every connection a NAT relays leaves its host socket in TIME-WAIT for
    60 s, and connect()'s search for a free port slows as they pile up: without this, a
    session that follows another's thousands of connections measures the pile too.
    Returns (the count at the start, the seconds waited)."""
    start = time.monotonic()
    first = time_wait_sockets()
    count = first
    while count >= SETTLE_TIME_WAIT and time.monotonic() - start < limit_s:
        time.sleep(1.0)
        count = time_wait_sockets()
    return first, round(time.monotonic() - start, 1)


def run_session(peer: str, mtu: int, args, echo_ports: dict, workdir: str) -> dict:
    out: dict = {"peer": peer, "mtu": mtu}
    if args.settle_seconds > 0 and args.plan_keys & {"connect", "connect4"}:
        out["time_wait_before"], out["settle_s"] = settle_time_wait(args.settle_seconds)
    session = Session(peer, mtu, workdir)
    busy0 = cpu_busy_snapshot()
    try:
        session.start()
        out["ready"] = session.ready
        out["nat_exe"] = os.readlink(f"/proc/{session.nat_pid}/exe")
        latency = {"warmup": WARMUP, "budget": LATENCY_BUDGET}
        plan = [
            ("connect", {**latency, "op": "connect", "port": echo_ports["tcp"], "n": args.conns}),
            ("connect4", {**latency, "op": "connect_parallel", "port": echo_ports["tcp"],
                          "n": args.conns, "parallel": PARALLEL_CLIENTS}),
            ("rr", {**latency, "op": "rr", "port": echo_ports["tcp"], "n": args.rrs}),
            ("udp", {**latency, "op": "udp", "port": echo_ports["udp"], "n": args.udps}),
            ("up", {"op": "iperf", "reverse": False}),
            ("down", {"op": "iperf", "reverse": True}),
        ]
        for key, op in plan:
            if key not in args.plan_keys:
                continue
            if op["op"] == "iperf":
                budget = args.seconds + OP_MARGIN
                op.update(seconds=args.seconds, timeout=budget)
                with iperf_server() as port:
                    op["port"] = port
                    out[key] = session.run_op(op, budget)
            elif args.perf and peer == "voidbox":
                with perf_record(session.nat_pid, os.path.join(args.perf, f"{key}-{mtu}.data")):
                    out[key] = session.run_op(op, LATENCY_BUDGET)
            else:
                out[key] = session.run_op(op, LATENCY_BUDGET)
    except (SessionError, OSError, subprocess.SubprocessError, ValueError) as e:
        out["error"] = f"{type(e).__name__}: {e}"[:300]
    finally:
        session.close()
    busy1 = cpu_busy_snapshot()
    if busy1[1] > busy0[1]:
        out["host_busy_pct"] = 100.0 * (busy1[0] - busy0[0]) / (busy1[1] - busy0[1])
    return out


# ---------------------------------------------------------------- the table

def fmt_error(res: dict | None, session: dict) -> str:
    if res is None:  # the session ended before this op; its error is listed under the table
        return "n/a: session error" if session.get("error") else "n/a: not run"
    return res.get("error") or res.get("first_error") or "failed"


def cell_iperf(res, session, what: str) -> str:
    if not res or not res.get("ok"):
        return fmt_error(res, session)
    if what == "rate":
        notes = [f"{res['retransmits']} retr"] if res.get("retransmits") else []
        if res.get("stalled_s"):
            notes.append(f"{res['stalled_s']:g} s stalled")
        return f"{res['bits_per_second'] / 1e9:.2f}" + (f" ({', '.join(notes)})" if notes else "")
    if not res["bytes"]:
        return "n/a: 0 bytes"
    # The share of one core says whether the NAT was CPU-bound or waiting.
    core = iperf_core_pct(res)
    core = f" ({core:.0f}% core)" if core is not None else ""
    return f"{iperf_cpu_per_gb(res):.2f}{core}"


# Figures derived per session, read from a median session (--rounds) where it has them.
def iperf_cpu_per_gb(res: dict) -> float:
    return res.get("cpu_s_per_gb", res["nat_cpu_s"] / (res["bytes"] / GB))


def iperf_core_pct(res: dict) -> float | None:
    if "core_pct" in res:
        return res["core_pct"]
    return 100 * res["nat_cpu_s"] / res["seconds"] if res.get("seconds") else None


def cpu_us_per_op(res: dict) -> float:
    return res.get("cpu_us_per_op", res["nat_cpu_s"] / res["n"] * 1e6)


def cell_latency(res, session, what: str) -> str:
    if not res or not res.get("n"):
        return fmt_error(res, session)
    note = f" ({res['errors']} failed: {res['first_error']})" if res.get("errors") else ""
    if res["n"] < res["asked"]:
        note += f" (only {res['n']}/{res['asked']} in budget)"
    if what == "pct":
        return f"{res['p50_us']:.0f} / {res['p99_us']:.0f}{note}"
    if what == "rate":
        return f"{res['per_s']:.0f}"
    return f"{cpu_us_per_op(res):.0f}"


def median_session(rounds: list[dict]) -> dict:
    """One peer's sessions at one MTU from several rounds as one: each figure the median
    of the rounds that gave it (p50 and p99 each on its own, CPU per op or per GB taken per
    round), so a round disturbed by the rest of the machine does not decide the cell."""
    ok = [s for s in rounds if not s.get("error")]
    if not ok:
        return rounds[-1]
    out = dict(ok[-1])
    for key in ("up", "down"):
        good = [s[key] for s in ok if (s.get(key) or {}).get("ok") and s[key]["bytes"]]
        if good:
            out[key] = dict(good[-1],
                            bits_per_second=statistics.median(r["bits_per_second"] for r in good),
                            retransmits=int(statistics.median(r.get("retransmits") or 0
                                                              for r in good)),
                            stalled_s=statistics.median(r.get("stalled_s") or 0 for r in good),
                            cpu_s_per_gb=statistics.median(iperf_cpu_per_gb(r) for r in good))
            cores = [iperf_core_pct(r) for r in good if iperf_core_pct(r) is not None]
            if cores:
                out[key]["core_pct"] = statistics.median(cores)
    for key in ("connect", "connect4", "rr", "udp"):
        good = [s[key] for s in ok if (s.get(key) or {}).get("n")]
        if good:
            out[key] = dict(good[-1], **{f: statistics.median(r[f] for r in good)
                                         for f in ("p50_us", "p99_us", "per_s")},
                            cpu_us_per_op=statistics.median(cpu_us_per_op(r) for r in good))
    busy = [s["host_busy_pct"] for s in ok if "host_busy_pct" in s]
    if busy:
        out["host_busy_pct"] = statistics.median(busy)
    return out


ROWS = [
    ("MTU seen in the namespace (iface)", lambda s: (
        f"{s['ready']['mtu']} ({s['ready']['iface']})" if s.get("ready") else fmt_error(None, s))),
    ("NAT process measured", lambda s: (
        f"pid's exe {os.path.basename(s['nat_exe'])}" if s.get("nat_exe") else "n/a")),
    ("ns->host iperf3 Gbit/s", lambda s: cell_iperf(s.get("up"), s, "rate")),
    ("ns->host NAT CPU s/GB", lambda s: cell_iperf(s.get("up"), s, "cpu")),
    ("host->ns iperf3 -R Gbit/s", lambda s: cell_iperf(s.get("down"), s, "rate")),
    ("host->ns NAT CPU s/GB", lambda s: cell_iperf(s.get("down"), s, "cpu")),
    ("connect+echo+close p50 / p99 µs", lambda s: cell_latency(s.get("connect"), s, "pct")),
    ("connections/s (sequential)", lambda s: cell_latency(s.get("connect"), s, "rate")),
    (f"connections/s ({PARALLEL_CLIENTS} parallel clients)",
     lambda s: cell_latency(s.get("connect4"), s, "rate")),
    ("NAT CPU µs per connection", lambda s: cell_latency(s.get("connect"), s, "cpu")),
    ("1-byte RR, one conn, p50 / p99 µs", lambda s: cell_latency(s.get("rr"), s, "pct")),
    ("UDP new socket/query p50 / p99 µs", lambda s: cell_latency(s.get("udp"), s, "pct")),
    ("host CPU busy % during session", lambda s: (
        f"{s['host_busy_pct']:.0f}" if "host_busy_pct" in s else "n/a")),
]


def table(sessions: list[dict]) -> str:
    head = ["metric"] + [f"{s['peer']} @{s['mtu']}" for s in sessions]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, cell in ROWS:
        cells = [cell(s).replace("|", "/").replace("\n", " ") for s in sessions]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def settle_note(args) -> str:
    if args.settle_seconds <= 0:
        return "no wait for TIME-WAIT sockets between sessions; "
    return (f"each session with connect ops waited (at most {args.settle_seconds:g} s) for the "
            f"host's TIME-WAIT sockets to fall under {SETTLE_TIME_WAIT}; ")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", action="append", choices=PEERS, help="default: all three")
    parser.add_argument("--mtu", action="append", type=int, help="default: 1500 and 65520")
    parser.add_argument("--seconds", type=int, default=5, help="iperf3 -t")
    parser.add_argument("--conns", type=int, default=1000, help="sequential connections")
    parser.add_argument("--rrs", type=int, default=2000, help="1-byte round trips")
    parser.add_argument("--udps", type=int, default=2000, help="UDP queries")
    parser.add_argument("--ops", default=",".join(OPS),
                        help=f"comma list of the measurements to run, of {','.join(OPS)} "
                             "(default: all)")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--perf", metavar="DIR",
                        help="perf record voidbox's NAT during each latency op, into DIR/OP-MTU.data "
                             "(perf's sampling slows the NAT: a --perf run's figures are not a comparison)")
    parser.add_argument("--max-minutes", type=float, default=10.0,
                        help="skip the sessions that would start after this")
    parser.add_argument("--family", type=int, choices=(4, 6), default=4,
                        help="IPv4 (10.0.2.2 -> 127.0.0.1) or IPv6 (fd00::2 -> ::1)")
    parser.add_argument("--settle-seconds", type=float, default=65.0,
                        help="before a session with connect ops, wait at most this long for the "
                             f"host's TIME-WAIT sockets to fall under {SETTLE_TIME_WAIT} "
                             "(0: do not wait)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every session this many times, the peers in a rotated order "
                             "each round (no peer always first), and table the median of each "
                             "figure (each round's table is printed too)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    global NET
    NET = LAYOUTS[args.family]
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in OPS]
    if unknown or not ops:
        parser.error(f"--ops: unknown {','.join(unknown) or '(empty)'}; choose from {','.join(OPS)}")
    args.plan_keys = {key for o in ops for key in OPS[o]}
    peers, mtus = args.peer or list(PEERS), args.mtu or [1500, 65520]
    if os.geteuid() != 0:
        sys.exit("net_compare.py needs root (ip netns, nsenter)")
    tools = ("iperf3", "slirp4netns", "pasta", "nsenter", "ip")
    missing = [b for b in tools if not shutil.which(b)]
    if missing or not os.path.exists(VOIDBOX):
        sys.exit(f"missing: {' '.join(missing) or VOIDBOX}")
    started = time.monotonic()
    info = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "argv": " ".join([sys.executable, *sys.argv]), "versions": versions(),
            "cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "load_before": os.getloadavg()}
    rounds: list[list[dict]] = []
    with tempfile.TemporaryDirectory(prefix="voidbox-netbench-") as workdir:
        echo = subprocess.Popen([sys.executable, ECHO_SERVER, "--bind", NET.loopback],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            line = LineReader(echo.stdout.fileno()).readline(READY_TIMEOUT)
            if line is None:
                sys.exit("echo server did not start")
            echo_ports = json.loads(line)
            # MTU outermost and peers interleaved, so a drift in host load hits every peer;
            # each round starts with another peer (the first session after an idle spell
            # runs slower here).
            for round_no in range(args.rounds):
                by_key = {}
                order = peers[round_no % len(peers):] + peers[:round_no % len(peers)]
                for mtu in mtus:
                    for peer in order:
                        if time.monotonic() - started > args.max_minutes * 60 * args.rounds:
                            by_key[peer, mtu] = {"peer": peer, "mtu": mtu, "error": "time limit"}
                            continue
                        print(f"# {peer} @ MTU {mtu} (round {round_no + 1}/{args.rounds}) ...",
                              file=sys.stderr, flush=True)
                        by_key[peer, mtu] = run_session(peer, mtu, args, echo_ports, workdir)
                rounds.append([by_key[peer, mtu] for mtu in mtus for peer in peers])
        finally:
            echo.stdin.close()
            stop(echo)
    info["load_after"] = os.getloadavg()
    info["wall_s"] = round(time.monotonic() - started, 1)
    v = info["versions"]
    print(f"## User-mode NAT over IPv{NET.family}: voidbox vs slirp4netns vs pasta "
          f"({info['date']})\n")
    print(f"- command: `{info['argv']}`")
    print(f"- voidbox {v['voidbox']} (Python {v['python']}); {v['slirp4netns']}; "
          f"pasta --version: {v['pasta']}; {v['iperf3']}; kernel {v['kernel']}")
    print(f"- CPUs: {info['cpus']} (affinity {info['affinity']}); load average (1/5/15 min) "
          f"before {'/'.join(f'{x:.2f}' for x in info['load_before'])}, after "
          f"{'/'.join(f'{x:.2f}' for x in info['load_after'])}; other work shares this machine")
    print(f"- ops: {','.join(ops)}; iperf3 -t {args.seconds}, one stream, server on {NET.loopback}, client in the namespace "
          f"to {NET.gateway}; latency N: connect {args.conns}, RR {args.rrs}, UDP {args.udps} "
          f"(after {WARMUP} warm-up samples each); GB = 10^9 bytes received; "
          f"NAT CPU = user+system time of the NAT process, all threads (\"% core\": its "
          f"CPU time over the iperf3 run's length); retr = iperf3 sender's TCP retransmits; "
          f"s stalled = 0.5 s iperf3 intervals (client's view) moving <1% of the mean; "
          f"{settle_note(args)}wall {info['wall_s']} s\n")
    if args.rounds > 1:
        for round_no, round_sessions in enumerate(rounds, 1):
            print(f"Round {round_no}:\n\n{table(round_sessions)}\n")
        sessions = [median_session([r[i] for r in rounds]) for i in range(len(rounds[0]))]
        print(f"Median of {args.rounds} rounds:\n")
    else:
        sessions = rounds[0]
    print(table(sessions))
    errors = [f"- {s['peer']} @{s['mtu']}: {s['error']}" for r in rounds for s in r
              if s.get("error")]
    if errors:
        print("\nSession errors:\n" + "\n".join(errors))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "sessions": sessions, "rounds": rounds}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
