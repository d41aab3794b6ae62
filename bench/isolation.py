"""What `--net-isolation` costs on the data path: a card's NAT in the VMM's network thread
(`none`) beside the same NAT in a child process, sandboxed (`process`, the default), in one
run, through the VM's own plumbing without KVM.

    .venv/bin/python bench/isolation.py [--rrs 2000] [--seconds 2]

Each mode builds what vm.Vm builds for a slirp card: a VirtioMmioTransport over a memfd
GuestMemory, queue kicks as eventfds (the ioeventfds' stand-ins) and the interrupt as an
eventfd (the irqfd's). In-process, the kicks are watched by the VMM's network LoopThread,
which runs VirtioNet on the NAT and signals the interrupt through the transport; isolated,
VhostUserNic hands the kicks and the interrupt eventfd to the child `voidbox net serve
--vmm-fd`, which serves the rings from shared memory. The guest is the driver mock
(tests/virtio_driver.py) on this thread, blocking on the interrupt eventfd as a guest's
driver waits for its IRQ:

- rr: a 1-byte UDP datagram to 10.0.2.2:PORT, a host echo server on 127.0.0.1 answers,
  timed from the TX kick to the reply in an RX buffer; p50 and p99 of --rrs;
- tx: 1472-byte UDP datagrams guest -> a host sink, 64 per kick, for --seconds: frames/s
  and Gbit/s the sink received;
- rx: the host floods the flow's NAT socket with 1472-byte datagrams; frames/s and Gbit/s
  the guest collected in --seconds (the rest are dropped, by the NAT's socket buffer or
  the ring).

The mock guest is Python on this process's main thread: in-process, it shares the GIL
with the NAT's thread, which a real guest (a vCPU thread in KVM_RUN, without the GIL) does
not, so the in-process throughput rows are a lower bound. Numbers compare the two modes
within one run on this host only; nothing asserts a timing.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.unit.netframes import GATEWAY, GUEST_HW, guest_udp_frame  # noqa: E402
from tests.unit.test_virtio_mmio import Guest  # noqa: E402
from tests.virtio_driver import DATA_ADDR, Driver  # noqa: E402
from voidbox.config import NicSpec  # noqa: E402
from voidbox.eventloop import LoopThread  # noqa: E402
from voidbox.memory import GuestMemory  # noqa: E402
from voidbox.net.config import NatConfig  # noqa: E402
from voidbox.net.policy import Policy  # noqa: E402
from voidbox.virtio.device import VIRTIO_F_VERSION_1  # noqa: E402
from voidbox.virtio.mmio import VirtioMmioTransport  # noqa: E402
from voidbox.virtio.net import VIRTIO_NET_F_MAC, VIRTIO_NET_HDR_LEN  # noqa: E402

QSIZE = 256
RX_BUF = 2048
PAYLOAD = 1472
WAIT = 10.0  # a failure bound


class Card:
    """One slirp card as vm.Vm wires it, in the given isolation mode, driven by the mock."""

    def __init__(self, isolation: str):
        self.isolation = isolation
        self.memory = GuestMemory(64 << 20)
        self.irq = os.eventfd(0, os.EFD_CLOEXEC)  # blocking: the guest waits on it
        self.kicks = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
        self.thread = LoopThread("net")
        loop = self.thread.loop
        config = SimpleNamespace(nat=NatConfig(), policy=Policy(host_loopback=True), pcap=None,
                                 net_fallback="slirp", net_sandbox=True)
        spec = NicSpec("slirp", None, GUEST_HW, 0)
        signal = lambda: os.eventfd_write(self.irq, 1)  # noqa: E731
        if isolation == "none":
            from voidbox.cards import open_nic
            from voidbox.vm import _kicked

            self.device = open_nic(spec, config, loop, loop.call_soon_threadsafe)
            self.transport = VirtioMmioTransport(self.device, self.memory, signal)
            for index, kick in enumerate(self.kicks):
                loop.watch(kick, select.EPOLLIN,
                           lambda _ev, k=kick, q=index: _kicked(k, self.transport, q))
        else:
            from voidbox.vhost_user import child
            from voidbox.vhost_user.frontend import VhostUserNic

            process = child.spawn(spec, config)
            self.device = VhostUserNic(None, GUEST_HW, self.kicks, loop, process=process)
            self.transport = VirtioMmioTransport(self.device, self.memory, signal)
            self.device.use_irqfd(self.irq)
            self.transport.direct_vring_interrupts = True
        self.thread.start()
        guest = Guest(self.transport)
        guest.negotiate((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC))
        self.rx = Driver(self.memory, size=QSIZE)
        self.tx = Driver(self.memory, size=QSIZE, desc_addr=0x50_0000, avail_addr=0x60_0000,
                         used_addr=0x70_0000)
        self.tx._data_next = DATA_ADDR + (16 << 20)
        guest.setup_driver_queue(0, self.rx)
        guest.setup_driver_queue(1, self.tx)
        for _ in range(QSIZE):
            self.rx.add_buffers(writable=[RX_BUF])
        guest.driver_ok()
        os.eventfd_write(self.kicks[0], 1)
        # TX buffers, allocated once and re-offered: the frame is written in place.
        self.tx_slots = [self.tx.alloc(VIRTIO_NET_HDR_LEN + 14 + 20 + 8 + PAYLOAD)
                         for _ in range(QSIZE)]
        self.next_slot = 0

    def send(self, frames: list[bytes]) -> None:
        for frame in frames:
            addr = self.tx_slots[self.next_slot]
            self.next_slot = (self.next_slot + 1) % QSIZE
            data = bytes(VIRTIO_NET_HDR_LEN) + frame
            self.memory.write(addr, data)
            self.tx.add_chain([(addr, len(data), False)])
        os.eventfd_write(self.kicks[1], 1)

    def wait_interrupt(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.irq], [], [], timeout)
        if ready:
            os.eventfd_read(self.irq)
            self.transport.write(0x064, 4, self.transport.read(0x060, 4))  # ACK, as Linux does
        return bool(ready)

    def received(self) -> list[bytes]:
        """Frames in used RX buffers; the buffers go back to the device."""
        frames = []
        used = self.rx.collect()
        for head, length in used:
            addr = self.rx.read_desc(head)[0]
            frames.append(self.memory.read(addr + VIRTIO_NET_HDR_LEN, length - VIRTIO_NET_HDR_LEN))
            self.rx.offer(head)  # the same buffer, posted again
        if used:
            os.eventfd_write(self.kicks[0], 1)
        self.tx.collect(recycle=True)
        return frames

    def close(self) -> None:
        self.thread.stop()
        self.device.close()
        self.thread.close()
        self.memory.close()
        for fd in (self.irq, *self.kicks):
            os.close(fd)


def udp_server(handler) -> tuple[socket.socket, threading.Thread]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    thread = threading.Thread(target=handler, args=(sock,), daemon=True)
    thread.start()
    return sock, thread


def rr(card: Card, n: int) -> list[float]:
    def echo(sock):
        while True:
            try:
                data, peer = sock.recvfrom(2048)
            except OSError:
                return
            sock.sendto(data, peer)

    sock, _ = udp_server(echo)
    port = sock.getsockname()[1]
    frame = guest_udp_frame(GATEWAY, 40000, port, b"x")
    samples = []
    try:
        for i in range(n + 50):
            start = time.perf_counter()
            card.send([frame])
            got = False
            deadline = start + WAIT
            while not got:
                if not card.wait_interrupt(max(deadline - time.perf_counter(), 0)):
                    raise RuntimeError(f"{card.isolation}: no reply within {WAIT} s")
                got = any(len(f) >= 42 and f[23] == 17 for f in card.received())
            if i >= 50:  # warm-up: the flow, the ARP-less first reply, caches
                samples.append(time.perf_counter() - start)
    finally:
        sock.close()
    return samples


def tx(card: Card, seconds: float) -> tuple[float, float]:
    received = [0, 0]

    def sink(sock):
        while True:
            try:
                n = sock.recv(65536)
            except OSError:
                return
            received[0] += 1
            received[1] += len(n)

    sock, _ = udp_server(sink)
    frame = guest_udp_frame(GATEWAY, 40001, sock.getsockname()[1], b"t" * PAYLOAD)
    start = time.perf_counter()
    try:
        while time.perf_counter() - start < seconds:
            card.send([frame] * 64)
            while len(card.tx.collect(recycle=True)) == 0:  # TX used: room again
                card.wait_interrupt(0.01)
            card.received()
        time.sleep(0.2)  # what is in flight lands
        elapsed = time.perf_counter() - start
    finally:
        sock.close()
    return received[0] / elapsed, received[1] * 8 / elapsed / 1e9


def rx(card: Card, seconds: float) -> tuple[float, float]:
    peer = []
    stop = threading.Event()

    def flood(sock):
        try:
            _, addr = sock.recvfrom(2048)  # the NAT's socket for the guest's flow
        except OSError:
            return
        peer.append(addr)
        blob = b"r" * PAYLOAD
        while not stop.is_set():
            try:
                sock.sendto(blob, addr)
            except OSError:
                return

    sock, _ = udp_server(flood)
    card.send([guest_udp_frame(GATEWAY, 40002, sock.getsockname()[1], b"hello")])
    frames = bytes_ = 0
    start = time.perf_counter()
    try:
        while time.perf_counter() - start < seconds:
            card.wait_interrupt(0.05)
            for f in card.received():
                if len(f) >= 42 + PAYLOAD:
                    frames += 1
                    bytes_ += PAYLOAD
        elapsed = time.perf_counter() - start
    finally:
        stop.set()
        sock.close()
    return frames / elapsed, bytes_ * 8 / elapsed / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rrs", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    rows = {}
    for mode in ("none", "process", "none", "process"):  # interleaved: host noise falls on both
        card = Card(mode)
        try:
            if mode == "process" and not card.device.wait_backend(30):
                raise RuntimeError("the backend process did not start")
            row = rows.setdefault(mode, {"rr": [], "tx": [], "rx": []})
            row["rr"] += rr(card, args.rrs)
            row["tx"].append(tx(card, args.seconds))
            row["rx"].append(rx(card, args.seconds))
        finally:
            card.close()
    print(f"bench/isolation.py: rrs {args.rrs} x2, {args.seconds:g} s per throughput run x2, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, python {sys.version.split()[0]}")
    print()
    print("| --net-isolation | UDP RR p50 / p99 µs | guest->host kframes/s, Gbit/s "
          "| host->guest kframes/s, Gbit/s |")
    print("|---|---:|---:|---:|")
    for mode, row in rows.items():
        samples = sorted(row["rr"])
        p50 = statistics.median(samples) * 1e6
        p99 = samples[int(len(samples) * 0.99)] * 1e6
        txf = max(r[0] for r in row["tx"]) / 1e3
        txg = max(r[1] for r in row["tx"])
        rxf = max(r[0] for r in row["rx"]) / 1e3
        rxg = max(r[1] for r in row["rx"])
        label = "process (sandboxed child)" if mode == "process" else "none (in the VMM)"
        print(f"| {label} | {p50:.0f} / {p99:.0f} | {txf:.1f}, {txg:.2f} | {rxf:.1f}, {rxg:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
