"""Bulk TCP through the VM's ring path beside `voidbox net run` and a plain copy.

    .venv/bin/pytest bench/test_virtio_net_bulk.py --benchmark-only -q -p no:cacheprovider -s
    .venv/bin/python bench/test_virtio_net_bulk.py --profile down 16 gso  # cProfile, top entries

All in one run, SIZE bytes each way (64 MiB), the median of ROUNDS transfers:
- ring: the rig of tests/unit/test_virtio_net_tcp.py. A host server process on 127.0.0.1,
  SlirpBackend (the NAT) behind VirtioNet on its MMIO transport, the driver mock playing
  the guest's rings (in C: bench/_guest_driver.pyx) and a scripted guest TCP endpoint
  (voidbox's sans-I/O TcpFlow) as the guest's stack, all on one thread. Down: host socket
  -> guest into RX_BUF_LEN-byte mergeable RX buffers (64, as the unit test posts, and 256,
  a full ring), either as MTU 1500 frames with whole checksums ("mss": the guest acks no
  guest offloads) or, with GUEST_CSUM and GUEST_TSO4 acked as a Linux guest does ("gso"),
  as 64 KiB GSO frames with NEEDS_CSUM over many buffers, and once more with a 4 MiB guest
  window as a Linux guest advertises ("win4M"); up: guest -> host socket, 64 KiB TSO frames
  with NEEDS_CSUM. The guest's own work (parsing frames and both checksums, its TCP,
  building frames) runs on the same thread; it is timed apart, and "VMM MiB/s" is the rate
  with it taken out (the driver's ring work stays in). Both ring twins.
- net run: `voidbox net run -- PYTHON -c CLIENT get|put PORT SIZE`: the client in the
  namespace connects to 10.0.2.2:PORT (the same host server process) and reads SIZE bytes,
  or sends them, shuts down and waits for the server's close. Its own clock, from connect
  to the last byte, is the figure (the namespace's set-up and teardown are left out); the
  wall time of the whole command is shown beside it. Default MTU 1500, offload on (the
  TAP's TSO), as `net run` runs by default. Needs root.
- memcpy: one copy of the same SIZE bytes (`bytes(bytearray)`, `numpy.copyto`).

The file is named test_* for pytest-benchmark, but CI's `pytest -q` never collects bench/.
Nothing here asserts a timing; each transfer asserts its SHA-256 (ring) or byte count.
"""

from __future__ import annotations

import cProfile
import functools
import hashlib
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

from conftest import build_bench_module  # noqa: E402

from tests.twins import load_ring  # noqa: E402
from tests.unit.test_virtio_net_tcp import (  # noqa: E402
    FEATURES,
    GSO_FEATURES,
    CompiledDriverRig,
    TcpState,
    payload,
)
from voidbox.layout import MiB  # noqa: E402
from voidbox.memory import GuestMemory  # noqa: E402

SIZE = 64 * MiB
ROUNDS = 3
NET_RUN_TIMEOUT = 300  # seconds: a bound on failure only
VOIDBOX = str(ROOT / ".venv" / "bin" / "voidbox")

CLIENT = """
import socket, sys, time
mode, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
buf = bytearray(1 << 20)
s = socket.create_connection(("10.0.2.2", port), timeout=60)
t0 = time.monotonic()
done = 0
if mode == "get":
    while done < n:
        k = s.recv_into(buf)
        if not k:
            break
        done += k
else:
    mv = memoryview(buf)
    while done < n:
        done += s.send(mv[:min(len(buf), n - done)])
    s.shutdown(socket.SHUT_WR)
    s.recv(1)  # the server closes once it has read everything
print(done, time.monotonic() - t0)
"""


SERVER = """
import hashlib, socket, sys
mode, seed_size = sys.argv[1], int(sys.argv[2])
sys.path.insert(0, sys.argv[3])
from tests.unit.test_virtio_net_tcp import payload
data = payload(seed_size) if mode == "send" else b""
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(1)
ls.settimeout(300)
print(ls.getsockname()[1], flush=True)
conn, _ = ls.accept()
conn.settimeout(300)
if mode == "send":
    conn.sendall(data)
    total, sha = len(data), hashlib.sha256(data).hexdigest()
else:
    h, total, buf = hashlib.sha256(), 0, bytearray(1 << 20)
    mv = memoryview(buf)
    while k := conn.recv_into(buf):
        h.update(mv[:k])
        total += k
    sha = h.hexdigest()
conn.close()
print(total, sha, flush=True)
"""


class ProcessServer:
    """HostServer's contract in a process of its own, so it never waits for the rig's GIL
    (a server thread in this process would: sendall takes the GIL between sends)."""

    def __init__(self, mode: str, size: int):
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, mode, str(size), str(ROOT)],
                                     stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline())

    def join(self) -> tuple[int, str]:
        out, _ = self.proc.communicate(timeout=NET_RUN_TIMEOUT)
        assert self.proc.returncode == 0
        total, sha = out.split()
        return int(total), sha


@functools.cache
def guest_driver():
    """bench/_guest_driver.pyx, compiled once per process."""
    return build_bench_module("_guest_driver")


class TimedRig(CompiledDriverRig):
    """The rig with its guest driver's ring work in C (bench/_guest_driver.pyx: in Python
    it costs a dozen calls per 2 KiB RX buffer, more than the VMM's whole path host ->
    guest, and a real guest's driver runs on its own vCPU), and the guest's own work (frame
    parsing and checksums, its TCP receive, building its frames) timed apart."""

    guest_s = 0.0

    def __init__(self, *args, **kwargs):
        super().__init__(guest_driver(), *args, **kwargs)

    def _to_guest(self, frame, now, header=(0,) * 7):
        t = time.perf_counter()
        super()._to_guest(frame, now, header)
        self.guest_s += time.perf_counter() - t

    def _frame_of(self, seg):
        t = time.perf_counter()
        out = super()._frame_of(seg)
        self.guest_s += time.perf_counter() - t
        return out


OFFLOADS = {"mss": FEATURES, "gso": GSO_FEATURES}


def ring_transfer(impl, memory, direction: str, data: bytes, rx_buffers: int = 64,
                  offload: str = "mss", window: int | None = None):
    """One transfer of data through the ring; (seconds, guest seconds). `window`: the
    guest's receive window instead of the unit test's (what its buffers hold)."""
    size = len(data)
    rig = TimedRig(impl, memory, rx_buffers=rx_buffers, features=OFFLOADS[offload])
    try:
        rig.arp()
        if direction == "down":
            server = ProcessServer("send", size)
            ep = rig.connect(server.port, eof=False)
            if window:
                ep.window = window
            t0 = time.perf_counter()
            rig.run(lambda: ep.received == size)
            elapsed = time.perf_counter() - t0
            rig.run(lambda: ep.flow.fin_received)
            ep.eof = True
            got = (ep.received, ep.hash.hexdigest())
        else:
            server = ProcessServer("recv", size)
            ep = rig.connect(server.port, data, eof=True)
            rig.run(lambda: ep.flow.state is not TcpState.SYN_SENT)
            ep.flow.snd_mss = 44 * 1460  # TSO
            t0 = time.perf_counter()
            rig.run(lambda: ep.flow.fin_received)  # the server read to EOF and closed
            elapsed = time.perf_counter() - t0
            got = None
        rig.run(lambda: ep.flow.state in (TcpState.TIME_WAIT, TcpState.CLOSED))
        result = server.join()
        assert result == (size, hashlib.sha256(data).hexdigest())
        if got is not None:
            assert got == result
        rig.assert_counters_consistent()
        return elapsed, rig.guest_s
    finally:
        rig.close()


def net_run_transfer(direction: str, data: bytes):
    """One `voidbox net run` transfer; (client seconds, wall seconds of the command)."""
    size = len(data)
    server = ProcessServer("send" if direction == "down" else "recv", size)
    t0 = time.perf_counter()
    out = subprocess.run([VOIDBOX, "net", "run", "--host-loopback", "--", sys.executable, "-c", CLIENT,
                          "get" if direction == "down" else "put", str(server.port),
                          str(size)], capture_output=True, text=True, timeout=NET_RUN_TIMEOUT)
    wall = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr
    done, seconds = out.stdout.split()
    assert int(done) == size
    assert server.join()[0] == size
    return float(seconds), wall


@pytest.fixture(scope="module")
def memory():
    with GuestMemory(64 * MiB) as mem:
        yield mem


@pytest.fixture(scope="module")
def data():
    return payload(SIZE)


def mib_s(seconds: float) -> float:
    return SIZE / MiB / seconds


LINUX_WINDOW = 4 * MiB  # about what a Linux guest's receive autotuning reaches on a fast path


@pytest.mark.parametrize("twin", ["cython", "pure"])
@pytest.mark.parametrize(("direction", "rx_buffers", "offload", "window"),
                         [("down", 64, "mss", None), ("down", 64, "gso", None),
                          ("down", 256, "mss", None), ("down", 256, "gso", None),
                          ("down", 256, "gso", LINUX_WINDOW), ("up", 64, "mss", None)])
def test_ring(benchmark, record, memory, data, direction, twin, rx_buffers, offload, window):
    impl = load_ring(twin)
    runs = []
    benchmark.pedantic(lambda: runs.append(ring_transfer(impl, memory, direction, data,
                                                         rx_buffers, offload, window)),
                       rounds=ROUNDS, iterations=1)
    seconds = statistics.median(s for s, _g in runs)
    vmm = statistics.median(s - g for s, g in runs)
    win = f" win{window // MiB}M" if window else ""
    name = f"ring {direction:<4} {twin:<6} rx{rx_buffers:<3} {offload}{win}"
    record(f"{name} MiB/s", mib_s(seconds), "MiB/s")
    record(f"{name} VMM MiB/s (guest's work out)", mib_s(vmm), "MiB/s")
    benchmark.extra_info.update(mib_s=round(mib_s(seconds), 1), vmm_mib_s=round(mib_s(vmm), 1))


@pytest.mark.parametrize("direction", ["down", "up"])
def test_net_run(benchmark, record, data, direction):
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("voidbox net run needs root and ip(8)")
    runs = []
    benchmark.pedantic(lambda: runs.append(net_run_transfer(direction, data)),
                       rounds=ROUNDS, iterations=1)
    seconds = statistics.median(s for s, _w in runs)
    wall = statistics.median(w for _s, w in runs)
    record(f"net run {direction:<4} MiB/s (client's clock)", mib_s(seconds), "MiB/s")
    record(f"net run {direction:<4} MiB/s (whole command)", mib_s(wall), "MiB/s")
    benchmark.extra_info.update(mib_s=round(mib_s(seconds), 1), wall_mib_s=round(mib_s(wall), 1))


@pytest.mark.parametrize("how", ["bytes", "numpy"])
def test_memcpy(benchmark, record, data, how):
    if how == "bytes":
        src = bytearray(data)

        def copy():
            bytes(src)
    else:
        src, dst = np.frombuffer(data, np.uint8), np.empty(SIZE, np.uint8)

        def copy():
            np.copyto(dst, src)
    benchmark.pedantic(copy, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    record(f"memcpy {how}", mib_s(benchmark.stats.stats.median), "MiB/s")


def profile(direction: str, mib: int, top: int = 25, offload: str = "mss") -> None:
    """cProfile one transfer of `mib` MiB on the compiled twin; the top entries by own time."""
    blob = payload(mib * MiB)
    with GuestMemory(64 * MiB) as mem:
        impl = load_ring("cython")
        guest_driver()  # built before the profile starts
        prof = cProfile.Profile()
        prof.enable()
        seconds, guest = ring_transfer(impl, mem, direction, blob, offload=offload)
        prof.disable()
    print(f"{direction} {mib} MiB: {seconds:.2f} s under cProfile (guest's work {guest:.2f} s)")
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--profile":
        profile(sys.argv[2] if len(sys.argv) > 2 else "down",
                int(sys.argv[3]) if len(sys.argv) > 3 else 16,
                offload=sys.argv[4] if len(sys.argv) > 4 else "mss")
    else:
        sys.exit(f"usage: {sys.argv[0]} --profile [down|up] [MiB] [mss|gso]")
