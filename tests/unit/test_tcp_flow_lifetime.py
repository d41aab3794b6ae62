"""A closed TCP flow is freed the moment it closes, by reference counting alone.

The network loop collects garbage rarely (run.GC_THRESHOLDS): a flow kept alive by a
reference cycle (its writer closure, its timer callback, a loop watcher) stays in memory
until a full collection, which issue 8 saw as 10,000 flow objects alive after 10,000
connections had closed. These tests run with the cyclic collector disabled and count the
relay's flow objects (tcp_nat._Flow) left in memory after every flow has ended.
"""

from __future__ import annotations

import gc
import socket
import threading

import pytest

from tests.unit.test_tcp_nat import Rig, recv_all, syn
from voidbox.net import tcp_nat
from voidbox.net.tcp import TcpState

FLOWS = 40


def flow_objects() -> int:
    return sum(1 for o in gc.get_objects() if type(o) is tcp_nat._Flow)


@pytest.fixture
def no_gc():
    gc.collect()  # whatever earlier tests left; nothing is collected from here on
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture(params=[None, "plain"], ids=["send_ip", "stream"])
def rig(request):
    r = Rig(stream=request.param)
    yield r
    r.close()


class ManyServer:
    """A loopback server taking `n` connections one after another in a thread; each gets
    handler(conn) and is then closed."""

    def __init__(self, n: int, handler):
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(FLOWS)
        self.port = self.lsock.getsockname()[1]
        self.errors: list = []
        self.thread = threading.Thread(target=self._run, args=(n, handler), daemon=True)
        self.thread.start()

    def _run(self, n, handler):
        self.lsock.settimeout(30)
        try:
            for _ in range(n):
                conn, _ = self.lsock.accept()
                with conn:
                    conn.settimeout(30)
                    handler(conn)
        except Exception as e:  # surfaced by join()
            self.errors.append(e)

    def join(self):
        self.thread.join(30)
        assert not self.thread.is_alive(), "server thread hung"
        self.lsock.close()
        assert not self.errors, self.errors


def settle(rig: Rig) -> None:
    """Run the loop's leftover callbacks (deferred pumps, end-of-turn work)."""
    for _ in range(5):
        rig.loop.run_once(0)


def echo_to_eof(conn):
    conn.sendall(recv_all(conn))


def banner_then_close(conn):
    conn.recv(64)  # the guest's "ping": closing with it unread would send RST
    conn.sendall(b"banner")


@pytest.mark.parametrize("handler,guest_eof", [(echo_to_eof, True), (banner_then_close, False)],
                         ids=["guest_closes_first", "host_closes_first"])
def test_closed_flows_are_freed_without_the_cyclic_collector(rig, no_gc, handler, guest_eof):
    base = flow_objects()  # a failed earlier test's traceback may hold its flows
    srv = ManyServer(FLOWS, handler)
    guests = [rig.connect(srv.port, b"ping %d" % i, eof=guest_eof) for i in range(FLOWS)]
    rig.run(lambda: all(g.shut_wr for g in guests))
    for g in guests:
        g.eof = True  # the host-first guests close their side once the banner is in
    # Guest-first flows end at the last ACK, host-first ones after TIME-WAIT's timer.
    rig.run(lambda: rig.nat.flow_count() == 0)
    srv.join()
    settle(rig)
    assert rig.nat.counters["tcp_flows_closed"] == FLOWS
    assert flow_objects() == base


def wait_for_reset(conn):
    try:
        conn.recv(1)
    except ConnectionResetError:
        pass


def test_reset_and_refused_flows_are_freed_without_the_cyclic_collector(rig, no_gc):
    base = flow_objects()
    srv = ManyServer(FLOWS, wait_for_reset)
    guests = [rig.connect(srv.port, b"", eof=False) for _ in range(FLOWS)]
    rig.run(lambda: all(g.flow.state is TcpState.ESTABLISHED for g in guests))
    for g in guests:  # the guest aborts: RST, the host side is reset too
        rig.inject(g.flow._reset_segment())
    srv.join()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        for sport in range(5000, 5000 + FLOWS):  # nothing listens: refused, RST to the guest
            rig.inject(syn(port, sport=sport))
            rig.loop.run_once(0)
    rig.run(lambda: rig.nat.flow_count() == 0)
    settle(rig)
    assert rig.nat.counters["tcp_flows_closed"] == 2 * FLOWS
    assert flow_objects() == base
