"""TCP flow lifetime limits: keepalive after idleness, half-open and closing timeouts.

Issue 8, defect 9: when the guest's RSTs were lost, NAT flows and their host connections
stayed established until voidbox exited. The core (voidbox.net.tcp) is driven here with a
fake clock; the last test goes through TcpNat and checks the host side is reset.
"""

from __future__ import annotations

import socket

import pytest

from tests.unit.test_tcp import Endpoint, sends
from tests.unit.test_tcp_nat import GUEST, REMOTE, AllowAll, Rig, Server, StepLoop, segment_bytes
from voidbox.net.config import NatConfig
from voidbox.net.tcp import ACK, FIN, RST, SYN, Act, Segment, TcpFlow, TcpState
from voidbox.net.tcp_nat import TcpNat

MSS = 1460
IDLE, INTERVAL, PROBES, HANDSHAKE, FIN_T = 100.0, 10.0, 3, 30.0, 20.0
LIMITS = dict(idle_timeout=IDLE, keepalive_interval=INTERVAL, keepalive_probes=PROBES,
              handshake_timeout=HANDSHAKE, fin_timeout=FIN_T)


def pair(now=0.0, **kw):
    """A guest (no limits) and a NAT flow (with LIMITS), ESTABLISHED at `now`."""
    guest_flow, acts = TcpFlow.connect(40000, 80, 1000, now, mss=MSS)
    guest = Endpoint(guest_flow, b"", eof=False)
    guest.handle(acts)
    nat = Endpoint(TcpFlow.accept(guest.outbox.pop(), 5000, now, mss=MSS,
                                  **{**LIMITS, **kw}), b"", eof=False)
    nat.handle(nat.flow.host_connected(now))
    guest.receive(nat.outbox.pop(), now)
    nat.receive(guest.outbox.pop(), now)
    assert nat.flow.state is TcpState.ESTABLISHED
    return guest, nat


def fire(ep: Endpoint, now: float):
    acts = ep.flow.on_timer(now)
    ep.handle(acts)
    return acts


def test_limits_are_off_unless_asked_for():
    guest, _ = pair()
    assert guest.flow.state is TcpState.ESTABLISHED and guest.flow.deadline is None


def test_idle_established_flow_is_probed_and_kept_while_the_guest_answers():
    guest, nat = pair()
    assert nat.flow.deadline == IDLE
    assert fire(nat, IDLE - 1) == []  # early: nothing
    (probe,) = sends(fire(nat, IDLE))
    # A keepalive as Linux sends it: an ACK one below snd_una, which the guest must answer.
    assert probe.flags == ACK and probe.seq == (nat.flow.snd_una - 1) & 0xFFFFFFFF
    assert not probe.payload and nat.flow.deadline == IDLE + INTERVAL
    guest.receive(nat.outbox.pop(), IDLE + 1)
    (answer,) = guest.outbox
    assert answer.flags == ACK
    nat.receive(guest.outbox.pop(), IDLE + 1)
    assert nat.flow.state is TcpState.ESTABLISHED
    assert nat.flow.deadline == IDLE + 1 + IDLE  # idle again from the answer


def test_guest_traffic_postpones_the_idle_deadline():
    guest, nat = pair()
    guest.src = memoryview(b"hello")
    guest.pump(60.0)
    nat.receive(guest.outbox.pop(), 60.0)
    assert nat.flow.deadline == 60.0 + IDLE
    assert sends(fire(nat, IDLE)) == []  # the old deadline: too early now


def test_unanswered_keepalives_reset_both_sides():
    _, nat = pair()
    now = IDLE
    for _ in range(PROBES):
        (probe,) = sends(fire(nat, now))
        assert probe.flags == ACK
        now = nat.flow.deadline
    acts = fire(nat, now)
    assert [s.flags for s in sends(acts)] == [RST | ACK]
    assert acts[-1][0] is Act.ABORT
    assert nat.flow.closed and nat.flow.expired and nat.flow.deadline is None


def test_a_guest_that_forgot_the_connection_resets_it_on_the_first_probe():
    _, nat = pair()
    (probe,) = sends(fire(nat, IDLE))
    # The guest's stack has no such connection: RFC 9293 §3.10.7.1, RST with seq = SEG.ACK.
    rst = Segment(probe.dst_port, probe.src_port, probe.ack, 0, RST, 0)
    acts = nat.flow.guest_segment(rst, IDLE + 0.1, nat.write)
    assert Act.ABORT in [k for k, _ in acts] and nat.flow.closed


def test_close_wait_is_kept_alive_like_established():
    guest, nat = pair()
    guest.eof = True
    guest.pump(5.0)
    nat.receive(guest.outbox.pop(), 5.0)
    assert nat.flow.state is TcpState.CLOSE_WAIT
    assert nat.flow.deadline == 5.0 + IDLE


def test_host_connect_that_never_completes_times_out_with_a_refusal():
    syn = Segment(40000, 80, 1000, 0, SYN, 65535, mss=MSS)
    flow = TcpFlow.accept(syn, 5000, 0.0, mss=MSS, **LIMITS)
    assert flow.deadline == HANDSHAKE
    acts = flow.on_timer(HANDSHAKE)
    assert [s.flags for s in sends(acts)] == [RST | ACK]
    assert acts[-1][0] is Act.ABORT and flow.closed and flow.expired


def test_unanswered_syn_ack_times_out_even_with_retries_left():
    syn = Segment(40000, 80, 1000, 0, SYN, 65535, mss=MSS)
    flow = TcpFlow.accept(syn, 5000, 0.0, mss=MSS, max_retries=100, **LIMITS)
    flow.host_connected(0.0)
    now, seen = 0.0, []
    while not flow.closed:
        now = flow.deadline
        seen.append(kinds := [k for k, _ in flow.on_timer(now)])
        assert len(seen) < 20
    assert now == HANDSHAKE and kinds[-1] is Act.ABORT and flow.expired


def test_forwarded_connection_the_guest_never_answers_times_out():
    flow, _ = TcpFlow.connect(33000, 8080, 5000, 0.0, mss=MSS, max_retries=100, **LIMITS)
    now = 0.0
    while not flow.closed:
        now = flow.deadline
        acts = flow.on_timer(now)
    assert now == HANDSHAKE and acts[-1][0] is Act.ABORT


@pytest.mark.parametrize("guest_closes_first", [False, True])
def test_unacknowledged_fin_times_out_when_the_guest_goes_silent(guest_closes_first):
    guest, nat = pair(max_retries=100)
    heard = 0.0  # the guest's last segment: the handshake's ACK, or its FIN
    if guest_closes_first:  # CLOSE-WAIT, then our FIN: LAST-ACK
        guest.eof = True
        guest.pump(1.0)
        nat.receive(guest.outbox.pop(), 1.0)
        heard = 1.0
    nat.handle(nat.flow.host_eof(1.0))
    assert nat.flow.state is (TcpState.LAST_ACK if guest_closes_first else TcpState.FIN_WAIT_1)
    now = 1.0
    while not nat.flow.closed:  # the guest hears nothing: our FIN is retransmitted
        now = nat.flow.deadline
        acts = fire(nat, now)
    assert now == heard + FIN_T and acts[-1][0] is Act.ABORT and nat.flow.expired


def test_fin_wait_2_probes_after_the_fin_timeout():
    guest, nat = pair()
    nat.handle(nat.flow.host_eof(1.0))
    guest.receive(nat.outbox.pop(), 1.0)  # our FIN; the guest ACKs it and keeps its side
    nat.receive(guest.outbox.pop(), 1.0)
    assert nat.flow.state is TcpState.FIN_WAIT_2 and guest.flow.state is TcpState.CLOSE_WAIT
    assert nat.flow.deadline == 1.0 + FIN_T
    (probe,) = sends(fire(nat, 1.0 + FIN_T))
    guest.receive(probe, 1.0 + FIN_T)
    nat.receive(guest.outbox.pop(), 1.0 + FIN_T)  # alive: kept, half-closed
    assert nat.flow.state is TcpState.FIN_WAIT_2
    assert nat.flow.deadline == 1.0 + 2 * FIN_T


def test_time_wait_is_unchanged():
    guest, nat = pair()
    nat.handle(nat.flow.host_eof(1.0))
    guest.receive(nat.outbox.pop(), 1.0)
    nat.receive(guest.outbox.pop(), 1.0)
    guest.eof = True
    guest.pump(2.0)
    (fin,) = guest.outbox
    assert fin.flags & FIN
    nat.receive(guest.outbox.pop(), 2.0)
    assert nat.flow.state is TcpState.TIME_WAIT
    assert nat.flow.deadline == 2.0 + nat.flow.time_wait


# ---- through the relay ---------------------------------------------------------------------

def test_abandoned_flow_is_reset_towards_the_host():
    """The guest vanishes without a RST (its frames lost): after the idle timeout and the
    unanswered keepalives the host connection is reset and the flow forgotten."""
    def handler(conn, res):
        conn.sendall(b"hello")
        try:
            res["data"] = conn.recv(10)
        except ConnectionResetError:
            res["reset"] = True

    rig = Rig()
    try:
        rig.nat.flow_kw.update(idle_timeout=5.0, keepalive_interval=1.0, keepalive_probes=2)
        srv = Server(handler)
        g = rig.connect(srv.port, b"", eof=False)
        rig.run(lambda: bytes(g.sink) == b"hello")
        (flow,) = rig.nat.flows.values()
        assert flow.core.state is TcpState.ESTABLISHED
        rig.drop = lambda pkt: True  # the guest hears nothing more, and says nothing
        start = rig.loop.now
        while rig.nat.flow_count() and rig.loop.now - start < 60:
            rig.loop.now = rig.loop.next_timer()
            rig.loop.run_once(0)
            rig.take()
        assert rig.nat.flow_count() == 0
        assert rig.loop.now - start == pytest.approx(5.0 + 2 * 1.0)
        assert rig.nat.counters["tcp_keepalive_probes"] == 2
        assert rig.nat.counters["tcp_flows_expired"] == 1
        assert srv.join() == {"reset": True}
    finally:
        rig.close()


def test_nat_config_limits_reach_the_flows():
    loop = StepLoop()
    cfg = NatConfig(tcp_idle_timeout=11.0, tcp_keepalive_interval=2.0, tcp_keepalive_probes=4,
                    tcp_handshake_timeout=3.0, tcp_fin_timeout=5.0)
    nat = TcpNat(loop, lambda pkt: None, AllowAll(), cfg)
    assert nat.flow_kw == dict(idle_timeout=11.0, keepalive_interval=2.0, keepalive_probes=4,
                               handshake_timeout=3.0, fin_timeout=5.0)
    defaults = TcpNat(loop, lambda pkt: None, AllowAll(), NatConfig()).flow_kw
    assert defaults == dict(idle_timeout=7200.0, keepalive_interval=75.0, keepalive_probes=9,
                            handshake_timeout=60.0, fin_timeout=60.0)
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        syn = Segment(40000, lsock.getsockname()[1], 1000, 0, SYN, 65535, mss=MSS)
        nat.guest_segment(GUEST, REMOTE, memoryview(segment_bytes(syn)))
        (flow,) = nat.flows.values()
        assert flow.core.idle_timeout == 11.0 and flow.core.fin_timeout == 5.0
        nat.close()
    loop.close()
