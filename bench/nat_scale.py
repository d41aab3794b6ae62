"""The NAT at scale: its memory per flow and its CPU while 10,000 connections sit idle.

    sudo .venv/bin/python bench/nat_scale.py [--connections 10000] [--idle 10]

`voidbox net run` (the NAT is that process) runs tests/netns/scale_tool.py's client in the
namespace: it opens N TCP connections to a server on the host's 127.0.0.1 (10.0.2.2 from
the namespace), each exchanging a byte, holds them all open, then closes them. Through
files in a scratch directory the client waits while this script reads the NAT process:

- before any connection: VmRSS, the baseline;
- with all N open: VmRSS and VmHWM (peak), its open fds, and its CPU time (utime + stime,
  /proc/PID/stat) over --idle seconds of nobody sending anything.

Reported: RSS per flow ((VmRSS open - baseline) / N, and the same for the peak), the fds
per flow, and the idle CPU as a percentage of one core (should be about 0: idle flows
cost no CPU). Needs root (network namespaces), like tests/netns.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from proctree import descendant_named  # noqa: E402

TOOL = os.path.join(ROOT, "tests", "netns", "scale_tool.py")
GATEWAY = "10.0.2.2"
WAIT = 600  # seconds any step may take: a bound on failure
CLK_TCK = os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (proc(5) 14, 15)


VOIDBOX_NAT_COMM = "voidbox-nat"  # voidbox.net.run.NAT_NAME: the sandboxed NAT's comm


def voidbox_nat_pid(supervisor: int) -> int:
    """The process that runs voidbox's NAT: `voidbox net run` (the supervisor) forks it,
    and the sandbox forks it once more (its comm is voidbox-nat); the supervisor itself
    relays and waits. The supervisor's pid where no such descendant is found."""
    return descendant_named(supervisor, VOIDBOX_NAT_COMM)


def wait_for(path: str, proc: subprocess.Popen) -> dict:
    deadline = time.monotonic() + WAIT
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise SystemExit(f"voidbox net run exited early ({proc.returncode}): "
                             f"{proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {path}")
        time.sleep(0.05)
    with open(path) as f:
        return json.load(f)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measured")
    args = parser.parse_args()
    n = args.connections
    work = tempfile.mkdtemp(prefix="voidbox-nat-scale-")
    env = dict(os.environ, SCALE_TIMEOUT=str(WAIT))
    server = subprocess.Popen([sys.executable, TOOL, "serve", str(n)], stdout=subprocess.PIPE,
                              text=True, env=env)
    ready, _, _ = select.select([server.stdout], [], [], 60)
    port = int(server.stdout.readline()) if ready else None
    if port is None:
        server.kill()
        raise SystemExit("the host server did not start")
    out = os.path.join(work, "client.json")
    command = (f"SCALE_TIMEOUT={WAIT} {sys.executable} {TOOL} client {GATEWAY} {port} {n} "
               f"{out} {work} && busybox ping -c1 -W5 {GATEWAY} >/dev/null")
    nat = subprocess.Popen([sys.executable, "-m", "voidbox", "net", "run", "--host-loopback", "--stats", "--",
                            "sh", "-c", command], stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        wait_for(os.path.join(work, "ready"), nat)
        time.sleep(0.5)  # the NAT settles after the namespace's own start-up traffic
        nat_pid = voidbox_nat_pid(nat.pid)
        base_rss = status_kib(nat_pid, "VmRSS")
        base_fds = len(os.listdir(f"/proc/{nat_pid}/fd"))
        cpu_begin = cpu_seconds(nat_pid)
        open(os.path.join(work, "begin"), "w").close()
        opened = wait_for(os.path.join(work, "open"), nat)
        time.sleep(1.0)  # the last ACKs, and the loop goes quiet
        rss, hwm = status_kib(nat_pid, "VmRSS"), status_kib(nat_pid, "VmHWM")
        fds = len(os.listdir(f"/proc/{nat_pid}/fd"))
        cpu0, t0 = cpu_seconds(nat_pid), time.monotonic()
        time.sleep(args.idle)
        cpu1 = cpu_seconds(nat_pid)
        idle_cpu = (cpu1 - cpu0) / (time.monotonic() - t0)
        open(os.path.join(work, "go"), "w").close()
        stderr = nat.stderr.read()
        _, status, usage = os.wait4(nat.pid, 0)  # the NAT's whole CPU time, its exit included
        nat.returncode = os.waitstatus_to_exitcode(status)
        cpu_end = usage.ru_utime + usage.ru_stime
        done = json.loads(open(out).read())
        summary = json.loads(server.communicate(timeout=WAIT)[0].splitlines()[-1])
    finally:
        for proc in (nat, server):
            if proc.poll() is None:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    stats = [ln for ln in stderr.splitlines() if ln.startswith("voidbox: net run: ")]
    fields = dict(item.split("=", 1) for item in stats[0].split(": ", 2)[2].split()) if stats else {}
    print(f"connections {n}: opened {opened['open']} (failed {opened['failed']}) in "
          f"{opened['open_seconds']:.1f} s, closed cleanly {done['eof']} in "
          f"{done['close_seconds']:.1f} s, server saw "
          f"{summary['accepted']} accepted / {summary['closed']} closed, "
          f"NAT exit status {nat.returncode}, tcp_flows_opened {fields.get('tcp_flows_opened')}")
    print(f"NAT RSS: baseline {base_rss / 1024:.1f} MiB, with {n} flows {rss / 1024:.1f} MiB, "
          f"peak {hwm / 1024:.1f} MiB")
    print(f"NAT RSS per flow: {(rss - base_rss) * 1024 / n:.0f} bytes "
          f"(peak: {(hwm - base_rss) * 1024 / n:.0f} bytes)")
    print(f"NAT fds: {base_fds} -> {fds} ({(fds - base_fds) / n:.2f} per flow)")
    print(f"NAT CPU per connection: opening {(cpu0 - cpu_begin) / n * 1e6:.0f} us, "
          f"closing {(cpu_end - cpu1) / n * 1e6:.0f} us (the NAT's exit included)")
    print(f"NAT CPU while {n} connections sat idle for {args.idle:.0f} s: "
          f"{idle_cpu * 100:.2f}% of one core")
    return 0 if nat.returncode == 0 and done["eof"] == n else 1


if __name__ == "__main__":
    sys.exit(main())
