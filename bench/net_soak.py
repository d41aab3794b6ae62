"""Soak `voidbox net run` from outside: the NAT process's RSS and fds after each round of
short TCP connections plus a UDP flood, for one or more source trees in the same run.

    .venv/bin/python bench/net_soak.py                      # this tree
    .venv/bin/python bench/net_soak.py --tree /tmp/old .    # an older checkout, then this

Each tree runs as `python -m voidbox net run -- python client.py` with PYTHONPATH
set to it (its compiled extensions must be built in place). The client, inside the
namespace, runs ROUNDS rounds of CONNS connections (connect, 32-byte echo, close) to a
host echo server at 10.0.2.2 and UDP_DATAGRAMS datagrams to UDP_PORTS sink ports, writes
done.N and waits for go.N; meanwhile this script reads /proc/PID/status (VmRSS) and
/proc/PID/fd of the voidbox process. Needs root (network namespaces); traffic stays on
this machine's loopback. Numbers only compare within one run.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

ROUNDS = 8
CONNS = 2500
UDP_PORTS = 32
UDP_DATAGRAMS = 2048
SETTLE = 3.0  # seconds after each round before measuring (TIME-WAIT reaping)
ROUND_WAIT = 300

SERVER = textwrap.dedent('''\
    import selectors, socket, sys
    sel = selectors.DefaultSelector()
    tcp = socket.socket(); tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("127.0.0.1", 0)); tcp.listen(1024); tcp.setblocking(False)
    sel.register(tcp, selectors.EVENT_READ, "accept")
    ports = [tcp.getsockname()[1]]
    for _ in range(int(sys.argv[1])):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 0))
        u.setblocking(False); sel.register(u, selectors.EVENT_READ, "udp")
        ports.append(u.getsockname()[1])
    print(" ".join(map(str, ports)), flush=True)
    while True:
        for key, _ in sel.select():
            if key.data == "accept":
                try:
                    c, _ = key.fileobj.accept()
                except BlockingIOError:
                    continue
                c.setblocking(False); sel.register(c, selectors.EVENT_READ, "conn")
            elif key.data == "udp":
                try:
                    key.fileobj.recv(2048)
                except BlockingIOError:
                    pass
            else:
                try:
                    data = key.fileobj.recv(4096)
                except (BlockingIOError, ConnectionResetError):
                    data = b""
                if data:
                    key.fileobj.send(data)
                else:
                    sel.unregister(key.fileobj); key.fileobj.close()
''')

CLIENT = textwrap.dedent('''\
    import os, socket, sys, time
    work, tcp_port, udp_ports = sys.argv[1], int(sys.argv[2]), list(map(int, sys.argv[3:]))
    for rnd in range({rounds}):
        for _ in range({conns}):
            s = socket.create_connection(("10.0.2.2", tcp_port), timeout=10)
            s.sendall(b"x" * 32)
            got = b""
            while len(got) < 32:
                got += s.recv(64)
            s.close()
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i in range({udp}):
            u.sendto(b"u" * 64, ("10.0.2.2", udp_ports[i % len(udp_ports)]))
        u.close()
        open(os.path.join(work, "done.%d" % rnd), "w").close()
        go = os.path.join(work, "go.%d" % rnd)
        deadline = time.monotonic() + {wait}
        while not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.05)
''')


def rss_kib(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def soak(tree: str, python: str) -> list[tuple[int, int]]:
    work = pathlib.Path(tempfile.mkdtemp(prefix="voidbox-soak-"))
    os.chmod(work, 0o777)
    server = subprocess.Popen([python, "-c", SERVER, str(UDP_PORTS)], stdout=subprocess.PIPE,
                              text=True)
    ports = server.stdout.readline().split()
    (work / "client.py").write_text(CLIENT.format(rounds=ROUNDS, conns=CONNS,
                                                  udp=UDP_DATAGRAMS, wait=ROUND_WAIT))
    env = dict(os.environ, PYTHONPATH=tree)
    nat = subprocess.Popen([python, "-m", "voidbox", "net", "run", "--host-loopback", "--", python,
                            str(work / "client.py"), str(work), *ports], env=env, cwd=tree)
    rows = []
    try:
        for rnd in range(ROUNDS):
            deadline = time.monotonic() + ROUND_WAIT
            while not (work / f"done.{rnd}").exists():
                if nat.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{tree}: the run ended before round {rnd}")
                time.sleep(0.05)
            time.sleep(SETTLE)
            rows.append((rss_kib(nat.pid), len(os.listdir(f"/proc/{nat.pid}/fd"))))
            (work / f"go.{rnd}").touch()
        nat.wait(60)
    finally:
        nat.kill()
        server.kill()
        nat.wait()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", help="a source tree (repeatable)")
    parser.add_argument("trees", nargs="*")
    args = parser.parse_args()
    trees = (args.tree or []) + args.trees or [str(pathlib.Path(__file__).resolve().parents[1])]
    python = sys.executable
    print(f"# {ROUNDS} rounds of {CONNS} TCP connections + {UDP_DATAGRAMS} UDP datagrams to "
          f"{UDP_PORTS} ports; load {os.getloadavg()[0]:.2f}; {sys.version.split()[0]}")
    results = {tree: soak(os.path.abspath(tree), python) for tree in trees}
    print("round | " + " | ".join(f"{t}: RSS MiB / fds" for t in trees))
    for rnd in range(ROUNDS):
        cells = [f"{results[t][rnd][0] / 1024:.1f} / {results[t][rnd][1]}" for t in trees]
        print(f"{rnd + 1} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
