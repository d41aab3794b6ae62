"""Namespace-side client for bench/net_compare.py (stdlib only; runs under any python3).

The runner starts this same program inside each NAT's network namespace (voidbox,
slirp4netns, pasta) and drives it over stdin/stdout, one JSON object per line. Lines
this program writes for the runner start with PREFIX so other output is ignored.

    client -> runner  @@{"ready": true, "iface": ..., "mtu": ...}  once GATEWAY is routable
    runner -> client  {"op": "iperf", "port": P, "seconds": 5, "reverse": false, "timeout": 30}
                      {"op": "connect" | "rr" | "udp", "port": P, "n": N, "warmup": W, "budget": S}
                      {"op": "quit"}
    client -> runner  @@{"op": ..., "ok": true, ...}  after each op

Every sample waits for its echo before the next starts (a round trip that does not wait
is not a latency), and every loop is bounded by a count and by op["budget"] seconds.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

PREFIX = "@@"
# Every NAT under test maps 10.0.2.2 to the host's 127.0.0.1, and fd00::2 to its ::1
# (net_compare.py --family 6 sets VBBENCH_GATEWAY).
GATEWAY = os.environ.get("VBBENCH_GATEWAY", "10.0.2.2")
FAMILY = socket.AF_INET6 if ":" in GATEWAY else socket.AF_INET
DISCARD_PORT = 9  # RFC 863; only used to ask the routing table, nothing is sent
READY_TIMEOUT = 15.0
READY_POLL = 0.01
SIOCGIFMTU = 0x8921  # linux/sockios.h
IFNAMSIZ = 16
IO_TIMEOUT = 2.0  # one sample that takes longer than this counts as a failure
CONNECT_PAYLOAD = b"bench-01"  # "a few bytes"
RR_PAYLOAD = b"x"
UDP_PAYLOAD = b"\x12\x34\x01\x00" + bytes(28)  # the size of a small DNS query
MAX_ERRORS = 20  # stop a latency op after this many failed samples
IPERF_INTERVAL = 0.5  # seconds per iperf3 report interval
STALL_FRACTION = 0.01  # an interval moving under 1% of the mean interval counts as stalled


def emit(obj: dict) -> None:
    sys.stdout.write(PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def default_iface() -> str | None:
    """The default route's interface from /proc/net/route, or /proc/net/ipv6_route over
    IPv6 (per network namespace)."""
    if FAMILY == socket.AF_INET6:
        with open("/proc/net/ipv6_route") as f:
            for line in f:
                fields = line.split()
                # ::/0: destination all zeros, prefix length 00; the device is last.
                if len(fields) == 10 and fields[0] == "0" * 32 and fields[1] == "00":
                    return fields[9]
        return None
    with open("/proc/net/route") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if len(fields) > 1 and fields[1] == "00000000":
                return fields[0]
    return None


def iface_mtu(name: str) -> int:
    """SIOCGIFMTU (netdevice(7)) on a socket, so the namespace's own view is read."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack(f"{IFNAMSIZ}si", name.encode(), 0)
        return struct.unpack(f"{IFNAMSIZ}si", fcntl.ioctl(s.fileno(), SIOCGIFMTU, req))[1]


def wait_ready() -> dict:
    """Poll until a route to GATEWAY exists (the NAT configured the interface)."""
    start = time.monotonic()
    while True:
        with socket.socket(FAMILY, socket.SOCK_DGRAM) as s:
            try:
                s.connect((GATEWAY, DISCARD_PORT))
                break
            except OSError as e:
                if e.errno not in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL):
                    raise
        if time.monotonic() - start > READY_TIMEOUT:
            return {"ready": False, "error": f"no route to {GATEWAY} after {READY_TIMEOUT} s"}
        time.sleep(READY_POLL)
    iface = default_iface()
    return {"ready": True, "iface": iface, "mtu": iface_mtu(iface) if iface else None,
            "wait_s": round(time.monotonic() - start, 3)}


def recv_echo(sock: socket.socket, sent: bytes) -> None:
    """Read len(sent) bytes and check they are the echo of sent."""
    got = b""
    while len(got) < len(sent):
        chunk = sock.recv(len(sent) - len(got))
        if not chunk:
            raise ConnectionError("EOF before the echo")
        got += chunk
    if got != sent:
        raise ConnectionError(f"wrong echo {got!r}")


def percentiles(samples_ns: list[int]) -> dict:
    if not samples_ns:
        return {}
    s = sorted(samples_ns)

    def pick(q: float) -> float:
        return s[min(len(s) - 1, int(q * len(s)))] / 1000.0  # nearest rank, in µs

    return {"p50_us": pick(0.50), "p99_us": pick(0.99), "max_us": s[-1] / 1000.0}


def latency_op(op: dict, sample) -> dict:
    """Run sample() warmup + n times (bounded by op['budget'] s); each returns its ns."""
    n, warmup, budget = int(op["n"]), int(op.get("warmup", 0)), float(op["budget"])
    samples: list[int] = []
    errors: list[str] = []
    deadline = time.monotonic() + budget
    start = None
    for i in range(warmup + n):
        if time.monotonic() > deadline or len(errors) >= MAX_ERRORS:
            break
        if i == warmup:
            start = time.perf_counter()
        try:
            ns = sample()
        except OSError as e:
            errors.append(f"{type(e).__name__}: {e}")
            continue
        if i >= warmup:
            samples.append(ns)
    return latency_result(samples, errors, n,
                          time.perf_counter() - start if start is not None else 0.0)


def latency_result(samples: list[int], errors: list[str], asked: int, elapsed: float) -> dict:
    out = {"ok": len(samples) > 0 and not errors, "n": len(samples), "asked": asked,
           "errors": len(errors), "first_error": errors[0] if errors else None,
           "elapsed_s": round(elapsed, 3),
           "per_s": round(len(samples) / elapsed, 1) if elapsed > 0 else None}
    out.update(percentiles(samples))
    return out


def connect_sample(port: int):
    """-> sample(): one new TCP connection, a few bytes echoed, closed; its ns."""
    addr = (GATEWAY, port)

    def sample() -> int:
        t0 = time.perf_counter_ns()
        with socket.create_connection(addr, timeout=IO_TIMEOUT) as s:
            s.sendall(CONNECT_PAYLOAD)
            recv_echo(s, CONNECT_PAYLOAD)
        return time.perf_counter_ns() - t0

    return sample


def op_connect(op: dict) -> dict:
    """New TCP connection per sample: connect, send a few bytes, wait for the echo, close."""
    return latency_op(op, connect_sample(int(op["port"])))


def op_connect_parallel(op: dict) -> dict:
    """op['parallel'] clients at once, each a thread doing op_connect's samples, op['n'] in
    all after op['warmup'] sequential ones: connections per second with concurrency."""
    clients, n, budget = int(op["parallel"]), int(op["n"]), float(op["budget"])
    sample = connect_sample(int(op["port"]))
    latency_op({**op, "n": 0}, sample)  # the warm-up, sequential
    samples: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + budget
    start_line = threading.Barrier(clients + 1)

    def client(count: int) -> None:
        mine = []
        start_line.wait()
        for _ in range(count):
            if time.monotonic() > deadline or len(errors) >= MAX_ERRORS:
                break
            try:
                mine.append(sample())
            except OSError as e:
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
        with lock:
            samples.extend(mine)

    threads = [threading.Thread(target=client, args=(n // clients + (i < n % clients),))
               for i in range(clients)]
    for t in threads:
        t.start()
    start_line.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return latency_result(samples, errors, n, time.perf_counter() - start)


def op_rr(op: dict) -> dict:
    """1-byte request, 1-byte echo, on one persistent connection with TCP_NODELAY."""
    with socket.create_connection((GATEWAY, int(op["port"])), timeout=IO_TIMEOUT) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def sample() -> int:
            t0 = time.perf_counter_ns()
            s.sendall(RR_PAYLOAD)
            recv_echo(s, RR_PAYLOAD)
            return time.perf_counter_ns() - t0

        return latency_op(op, sample)


def op_udp(op: dict) -> dict:
    """DNS-style: a new UDP socket (new source port, new NAT flow) per query."""
    addr = (GATEWAY, int(op["port"]))

    def sample() -> int:
        t0 = time.perf_counter_ns()
        with socket.socket(FAMILY, socket.SOCK_DGRAM) as s:
            s.settimeout(IO_TIMEOUT)
            s.sendto(UDP_PAYLOAD, addr)
            data = s.recv(len(UDP_PAYLOAD) + 1)
        if data != UDP_PAYLOAD:
            raise OSError("wrong echo")
        return time.perf_counter_ns() - t0

    return latency_op(op, sample)


def op_iperf(op: dict) -> dict:
    """iperf3 client to GATEWAY; JSON (-J) parsed; killed and reported 'stalled' on timeout."""
    argv = ["iperf3", "-c", GATEWAY, "-p", str(int(op["port"])), "-t", str(int(op["seconds"])),
            "-J", "--connect-timeout", "5000", "-i", str(IPERF_INTERVAL)]
    if op.get("reverse"):
        argv.append("-R")
    timeout = float(op["timeout"])
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"stalled: iperf3 gave no result within {timeout:.0f} s"}
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        return {"ok": False, "error": f"iperf3 rc={proc.returncode}: {proc.stderr.strip()[:200]}"}
    if "error" in report:
        return {"ok": False, "error": f"iperf3: {report['error'][:200]}"}
    end = report.get("end", {})
    received, sent = end.get("sum_received", {}), end.get("sum_sent", {})
    return {"ok": True, "bytes": received.get("bytes", 0),
            "bits_per_second": received.get("bits_per_second", 0.0),
            "seconds": received.get("seconds"), "retransmits": sent.get("retransmits"),
            "stalled_s": stalled_seconds(report.get("intervals", []))}


def stalled_seconds(intervals: list) -> float:
    """Seconds of the run in intervals that moved almost nothing (this side's view)."""
    sums = [iv.get("sum", {}) for iv in intervals]
    if not sums:
        return 0.0
    mean = sum(s.get("bytes", 0) for s in sums) / len(sums)
    return round(sum(s.get("seconds", 0.0) for s in sums
                     if s.get("bytes", 0) <= STALL_FRACTION * mean), 2)


OPS = {"iperf": op_iperf, "connect": op_connect, "connect_parallel": op_connect_parallel,
       "rr": op_rr, "udp": op_udp}


def main() -> int:
    emit(wait_ready())
    for line in sys.stdin:
        op = json.loads(line)
        if op["op"] == "quit":
            break
        try:
            result = OPS[op["op"]](op)
        except Exception as e:  # one failed op is reported, the session goes on
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
        result["op"] = op["op"]
        emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
